"""Request lines in, record lines out: `calm batch` and `calm serve-stdin` around one Calm loop.

Every input line gets exactly one output line. A line that cannot be a request (bad UTF-8, oversize, bad
JSON, wrong fields) gets an error record and never stops the run.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import IO, Any, Callable

from calm_cli import monitor, schema
from calm_cli.execute import QueueClosed, QueueFull, RequestQueue
from calm_cli.orchestrator import Calm

MAX_LINE_BYTES = 64 * 1024
EXIT_SOME_FAILED = 3  # batch: every line has its record, but some records are errors


@dataclass
class Job:
    index: int  # 0-based input line
    request: dict | None
    record: dict | None  # set at parse time for lines that are not valid requests
    arrived: float


def parse_line(raw: bytes, index: int) -> Job:
    """A Job for one input line (without its newline); invalid lines carry their error record."""
    line_id: Any = index + 1
    now = time.perf_counter()
    if len(raw) > MAX_LINE_BYTES:
        return Job(index, None, monitor.error_record(line_id, "too_large",
                                                     f"line {index + 1} has {len(raw)} bytes, over {MAX_LINE_BYTES}"), now)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Job(index, None, monitor.error_record(line_id, "bad_utf8",
                                                     f"line {index + 1} is not valid UTF-8 (byte {exc.start})"), now)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        return Job(index, None, monitor.error_record(line_id, "bad_json", f"line {index + 1}: {exc}"), now)
    if isinstance(data, dict) and isinstance(data.get("id"), (str, int)) and not isinstance(data.get("id"), bool):
        line_id = data["id"]
    problems = schema.problems(data, "request.schema.json", f"line {index + 1}")
    if problems:
        return Job(index, None, monitor.error_record(line_id, "bad_request", "; ".join(problems)), now)
    data.setdefault("id", line_id)
    return Job(index, data, None, now)


def handle(calm: Calm, job: Job, queue: RequestQueue | None = None) -> dict:
    """The record for one job; nothing raised escapes (an internal failure is an error record)."""
    if job.record is not None:
        return job.record
    request = job.request
    if request.get("type") == "stats":
        waiting = {"discipline": calm.policy.queue["discipline"], "waiting": len(queue) if queue else 0}
        return {"id": request["id"], "type": "stats", **calm.stats(), "queue": waiting}
    queue_ms = (time.perf_counter() - job.arrived) * 1000
    try:
        return calm.answer(request, queue_ms=queue_ms)
    except Exception as exc:  # the run goes on; the record says what happened
        return monitor.error_record(request["id"], "internal", f"{type(exc).__name__}: {exc}")


def predicted_ms(calm: Calm, job: Job) -> float:
    """Shortest-predicted-job-first needs a guess before the run: the planned member's predicted latency."""
    if job.request is None or job.request.get("type") == "stats":
        return 0.0
    decision = calm.plan(calm.encoder.embed([job.request["query"]])[0])
    chosen = next(c for c in decision.candidates if c.model == decision.model)
    return chosen.latency_ms + chosen.load_ms


def _complete_lines(path: str) -> int:
    """Whole lines already in an output file; a torn last line (a kill mid-write) is cut off."""
    if not os.path.exists(path):
        return 0
    with open(path, "rb+") as fh:
        data = fh.read()
        keep = data.rfind(b"\n") + 1
        if keep != len(data):
            fh.truncate(keep)
    return data[:keep].count(b"\n")


def run_batch(calm: Calm, source: IO[bytes], out_path: str | None, out: IO[str], resume: bool,
              progress: Callable[[int, int], None]) -> tuple[int, int]:
    """Answer every line of `source` into `out` in input order; (answered, failed). With `resume`, lines
    already in the output file are skipped, so a killed run continues without duplicates or gaps."""
    lines = source.read().split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    done = _complete_lines(out_path) if resume and out_path else 0
    jobs = [parse_line(raw.rstrip(b"\r"), i) for i, raw in enumerate(lines) if i >= done]
    queue: RequestQueue[Job] = RequestQueue(calm.policy.queue["discipline"], max(len(jobs), 1))
    for job in jobs:
        queue.put(job, predicted_ms(calm, job) if queue.discipline == "sjf" else 0.0)
    queue.close()
    finished: dict[int, dict] = {}
    next_index, ok, failed = done, 0, 0
    for job in queue:
        finished[job.index] = handle(calm, job, queue)
        while next_index in finished:  # write in input order as soon as the prefix is complete
            record = finished.pop(next_index)
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            out.flush()
            if out_path:
                os.fsync(out.fileno())
            failed += record.get("error") is not None
            ok += record.get("error") is None
            next_index += 1
            progress(next_index, len(lines))
    return ok, failed


def serve(calm: Calm, source: IO[bytes], out: IO[str]) -> int:
    """Answer request lines as they come until EOF, SIGINT or SIGTERM; returns the lines answered.

    EOF: everything read is answered, then the process ends. A signal: the request in hand is finished, and
    every request still waiting gets a 'unavailable' record, so no line is lost or half-written.
    """
    queue: RequestQueue[Job] = RequestQueue(calm.policy.queue["discipline"], calm.policy.queue.get("max_waiting", 512))
    stopping = threading.Event()
    write_lock = threading.Lock()
    late: list[Job] = []  # read by the reader after the queue closed: answered 'unavailable' at the end

    def emit(record: dict) -> None:
        with write_lock:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            out.flush()

    def reader() -> None:
        for index, raw in enumerate(iter(source.readline, b"")):
            if stopping.is_set():
                break
            job = parse_line(raw.rstrip(b"\r\n"), index)
            try:
                queue.put(job, predicted_ms(calm, job) if queue.discipline == "sjf" else 0.0)
            except QueueFull as exc:
                emit(monitor.error_record(job.request["id"] if job.request else index + 1, "queue_full", str(exc)))
            except QueueClosed:
                late.append(job)
                break
        queue.close()

    def on_signal(signum: int, frame: object) -> None:
        stopping.set()
        queue.close()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    calm.prefetch()  # a long-lived process: warm what fits before the first request arrives
    thread = threading.Thread(target=reader, name="calm-stdin", daemon=True)
    thread.start()
    answered = 0

    def refuse(job: Job) -> None:
        emit(job.record or monitor.error_record(job.request["id"], "unavailable", "calm is shutting down"))

    try:
        for job in queue:
            if stopping.is_set():
                refuse(job)
            else:
                emit(handle(calm, job, queue))
            answered += 1
        thread.join(timeout=0.5)  # a line the reader held when the queue closed still gets its record
        for job in late:
            refuse(job)
            answered += 1
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return answered
