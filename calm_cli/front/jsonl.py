"""Request lines in, record lines out: `calm batch` and `calm serve-stdin` around one Calm loop.

Every input line gets exactly one output line. A line that cannot be a request (bad UTF-8, oversize, bad
JSON, wrong fields, an id already used) gets an error record and never stops the run.

Input is read from the raw file descriptor, never through Python's buffered stdin: a thread blocked in
`sys.stdin.buffer.readline()` holds the buffer's lock, and interpreter shutdown then aborts the process
("Fatal Python error: _enter_buffered_busy") when a signal ends it with stdin still open. Reads wait in
select() with a short timeout, so a stop request ends them within POLL_S.

All planning and answering (and so every knowledge-base call) happens on the calling thread; a reader thread
only splits and parses lines.
"""

from __future__ import annotations

import json
import os
import queue
import select
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any, Callable, Iterator

from calm_cli import schema
from calm_cli.bounded import MAX_LINE_BYTES
from calm_cli.errors import QueueFull
from calm_cli.loop import monitor
from calm_cli.loop.calm import Calm
from calm_cli.loop.execute.queue import RequestQueue

POLL_S = 0.1  # how soon a blocked read notices a stop request
READ_CHUNK = 1 << 16
EXIT_SOME_FAILED = 3  # batch: every line has its record, but some records are errors
SHUTDOWN = "calm is shutting down"


@dataclass
class Job:
    index: int  # 0-based input line
    request: dict | None
    record: dict | None  # set at parse time for lines that are not valid requests
    arrived: float


@dataclass(frozen=True)
class Line:
    """One input line without its newline: at most MAX_LINE_BYTES + 1 of its bytes, and its true size."""

    raw: bytes
    size: int


class LineReader:
    """Complete lines from a raw file descriptor, stoppable, with bounded memory: bytes of a line beyond
    MAX_LINE_BYTES + 1 are counted, not kept. After `stop` is set, the complete lines already read are still
    yielded (they were read, so they are owed a record); a partial last line is not. At EOF a last line
    without a newline counts."""

    def __init__(self, fd: int, stop: threading.Event | None = None, max_line: int = MAX_LINE_BYTES):
        self.fd, self.stop, self.max_line = fd, stop or threading.Event(), max_line

    def __iter__(self) -> Iterator[Line]:
        kept, size, eof = bytearray(), 0, False
        while not eof:
            if self.stop.is_set():
                return
            ready, _, _ = select.select([self.fd], [], [], POLL_S)
            if not ready:
                continue
            chunk = os.read(self.fd, READ_CHUNK)
            eof = not chunk
            for piece in chunk.split(b"\n")[:-1] if chunk else []:
                yield from self._ended(kept, size, piece)
                kept, size = bytearray(), 0
            tail = chunk.rsplit(b"\n", 1)[-1] if chunk else b""
            kept += tail[: max(0, self.max_line + 1 - len(kept))]
            size += len(tail)
        if size:
            yield from self._ended(kept, size, b"")

    def _ended(self, kept: bytearray, size: int, piece: bytes) -> Iterator[Line]:
        raw = bytes(kept + piece[: max(0, self.max_line + 1 - len(kept))]).rstrip(b"\r")
        yield Line(raw, size + len(piece))


def parse_line(line: Line, index: int) -> Job:
    """A Job for one input line; an invalid line carries its error record (schema.parse_request's bounds)."""
    parsed = schema.parse_request(line.raw, index + 1, line.size)
    record = None if parsed.request else monitor.error_record(parsed.id, parsed.code, parsed.message)
    return Job(index, parsed.request, record, time.perf_counter())


class Intake:
    """Turns lines into jobs for one run and refuses an id that an earlier line of the run already used,
    so every record's id names one request."""

    def __init__(self) -> None:
        self.seen: dict[Any, int] = {}

    def job(self, line: Line, index: int) -> Job:
        try:
            job = parse_line(line, index)
        except Exception as exc:  # noqa: BLE001 - one line must never end the run; its record says why
            return Job(index, None, monitor.error_record(index + 1, "internal",
                                                         f"line {index + 1}: {type(exc).__name__}: {exc}"[:500]),
                       time.perf_counter())
        if job.request is None:
            return job
        key = (type(job.request["id"]).__name__, job.request["id"])
        first = self.seen.setdefault(key, index)
        if first != index:
            job.record = monitor.error_record(job.request["id"], "bad_request",
                                              f"line {index + 1}: id {job.request['id']!r} is already used by "
                                              f"line {first + 1}")
            job.request = None
        return job


def stamped(calm: Calm, record: dict) -> dict:
    """Every record of a degraded run says so, error records included (Calm.answer stamps its own)."""
    if calm.kb.degraded is not None and "knowledge" not in record:
        record["knowledge"] = f"degraded: {calm.kb.degraded}"
    return record


def handle(calm: Calm, job: Job, waiting: int = 0) -> dict:
    """The record for one job; nothing raised escapes (an internal failure is an error record)."""
    if job.record is not None:
        return job.record
    request = job.request
    if request.get("type") == "stats":
        return {"id": request["id"], "type": "stats", **calm.stats(),
                "queue": {"discipline": calm.policy.queue["discipline"], "waiting": waiting}}
    queue_ms = (time.perf_counter() - job.arrived) * 1000
    try:
        return calm.answer(request, queue_ms=queue_ms)
    except Exception as exc:  # the run goes on; the record says what happened
        return monitor.error_record(request["id"], "internal", f"{type(exc).__name__}: {exc}")


def predicted_ms(calm: Calm, job: Job) -> float:
    """Shortest-predicted-job-first needs a guess before the run: the planned member's predicted latency."""
    if job.request is None or job.request.get("type") == "stats":
        return 0.0
    if job.request.get("model"):
        return 0.0  # forced: nothing to plan
    decision = calm.plan(calm.embed([job.request["query"]])[0])
    chosen = next(c for c in decision.candidates if c.model == decision.model)
    return (chosen.latency_ms or 0.0) + chosen.load_ms  # nothing measured yet: its load is all we know


def refusal(job: Job) -> dict:
    """The record of a job that was read but will not be answered because calm is stopping."""
    return job.record or monitor.error_record(job.request["id"], "unavailable", SHUTDOWN)


@contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[dict[str, int]]:
    """SIGINT and SIGTERM set `stop` (and remember which came) instead of interrupting the work in hand."""
    got: dict[str, int] = {}

    def on_signal(signum: int, frame: object) -> None:
        got.setdefault("signal", signum)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield got
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def resume_point(path: str) -> int:
    """Lines of an output file that a resumed batch keeps: whole lines before the first record refused for
    shutdown (those lines were never answered) or a torn last line (a kill mid-write); the rest is cut off."""
    if not os.path.exists(path):
        return 0
    with open(path, "rb+") as fh:
        data = fh.read()
        keep = data.rfind(b"\n") + 1
        start, count = 0, 0
        while start < keep:
            end = data.index(b"\n", start) + 1
            try:
                record = json.loads(data[start:end])
            except ValueError:
                record = None
            if isinstance(record, dict) and (record.get("error") or {}).get("message") == SHUTDOWN:
                keep = start
                break
            start, count = end, count + 1
        if keep != len(data):
            fh.truncate(keep)
    return count


@dataclass
class BatchResult:
    answered: int
    failed: int
    interrupted_by: int | None  # the signal that stopped the run, if one did
    refused: int  # lines given an 'unavailable' record because of it


def run_batch(calm: Calm, source_fd: int, out_path: str | None, out: IO[str], resume: bool,
              progress: Callable[[int, int], None]) -> BatchResult:
    """Answer every line of `source_fd` into `out` in input order. With `resume`, lines already answered in the
    output file are skipped, so a killed or interrupted run continues without duplicates or gaps. SIGINT or
    SIGTERM: the line in hand is finished and every other line read gets an 'unavailable' record."""
    stop = threading.Event()
    with stop_on_signals(stop) as got:
        intake = Intake()
        jobs = [intake.job(line, i) for i, line in enumerate(LineReader(source_fd, stop))]
        done = resume_point(out_path) if resume and out_path else 0
        # A batch is offline work: every line waits its turn, so queue.max_waiting and timeout_s do not apply.
        waiting: RequestQueue[Job] = RequestQueue(calm.policy.queue["discipline"], max(len(jobs), 1))
        for job in jobs[done:]:
            if stop.is_set():
                break
            waiting.put(job, predicted_ms(calm, job) if waiting.discipline == "sjf" else 0.0)
        finished: dict[int, dict] = {}
        next_index, ok, failed = done, 0, 0

        def write(record: dict) -> None:
            nonlocal next_index, ok, failed
            out.write(json.dumps(stamped(calm, record), ensure_ascii=False) + "\n")
            out.flush()
            if out_path:
                os.fsync(out.fileno())
            failed += record.get("error") is not None
            ok += record.get("error") is None
            next_index += 1
            progress(next_index, len(jobs))

        while len(waiting) and not stop.is_set():
            job = waiting.get()
            finished[job.index] = handle(calm, job, len(waiting))
            while next_index in finished:  # write in input order as soon as the prefix is complete
                write(finished.pop(next_index))
        refused = 0
        for job in jobs[next_index:]:
            record = finished.pop(job.index, None)
            refused += record is None
            write(record or refusal(job))
    return BatchResult(ok, failed, got.get("signal"), refused)


def serve(calm: Calm, source_fd: int, out: IO[str], log: Callable[[str], None] = lambda message: None) -> int:
    """Answer request lines as they come until EOF, SIGINT or SIGTERM; returns the records written.

    EOF: everything read is answered, then the loop ends. A signal: the request in hand is finished, and every
    line read but not answered gets an 'unavailable' record, so no line is lost or half-written. A request
    that waited longer than the policy's queue.timeout_s gets a 'timeout' record instead of a late answer.
    """
    stop = threading.Event()
    intake: queue.Queue[Job | None] = queue.Queue()
    waiting: RequestQueue[Job] = RequestQueue(calm.policy.queue["discipline"], calm.policy.queue.get("max_waiting", 512))
    timeout_s = calm.policy.queue.get("timeout_s")
    written = 0
    closed = False

    def emit(record: dict) -> None:
        nonlocal written, closed
        if closed:
            return
        try:
            out.write(json.dumps(stamped(calm, record), ensure_ascii=False) + "\n")
            out.flush()
            written += 1
        except BrokenPipeError:  # the reader of our output went away: nobody is left to answer
            closed = True
            # Python's advice: point the dead descriptor at devnull, so the flush at exit cannot fail again.
            os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
            stop.set()
            log("calm: output closed by the reader; stopping")

    def reader() -> None:
        parse = Intake()
        try:
            for index, line in enumerate(LineReader(source_fd, stop)):
                intake.put(parse.job(line, index))
        except OSError as exc:
            log(f"calm: cannot read requests: {exc}")
        finally:
            intake.put(None)

    def admit(job: Job) -> None:
        if job.record is not None or stop.is_set():
            emit(refusal(job))
            return
        try:
            waiting.put(job, predicted_ms(calm, job) if waiting.discipline == "sjf" else 0.0)
        except QueueFull as exc:
            emit(monitor.error_record(job.request["id"], "queue_full", str(exc)))

    with stop_on_signals(stop):
        calm.prefetch()  # a long-lived process: warm what fits before the first request arrives
        log(f"calm: serving policy {calm.policy.name}; one JSON request per line")
        thread = threading.Thread(target=reader, name="calm-stdin", daemon=True)
        thread.start()
        reading = True
        while reading or len(waiting):
            try:
                while True:  # admit everything parsed so far; wait for more only when idle
                    job = intake.get(timeout=POLL_S) if reading and not len(waiting) else intake.get_nowait()
                    if job is None:
                        reading = False
                        break
                    admit(job)
            except queue.Empty:
                pass
            if stop.is_set():
                while len(waiting):
                    emit(refusal(waiting.get()))
                continue
            if len(waiting):
                job = waiting.get()
                waited_s = time.perf_counter() - job.arrived
                if timeout_s is not None and waited_s > timeout_s and job.request.get("type") != "stats":
                    emit(monitor.error_record(job.request["id"], "timeout",
                                              f"waited {waited_s:.1f} s in the queue, over queue.timeout_s "
                                              f"{timeout_s:g} s"))
                else:
                    emit(handle(calm, job, len(waiting)))
        thread.join()
    return written
