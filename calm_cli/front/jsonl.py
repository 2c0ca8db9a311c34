"""Request lines in, record lines out: `calm batch` and `calm serve-stdin` around one Calm loop.

Every input line gets exactly one output line. A line that cannot be a request (bad UTF-8, oversize, bad
JSON, wrong fields, an id already used) gets an error record and never stops the run.

Input is read from the raw file descriptor, never through Python's buffered stdin: a thread blocked in
`sys.stdin.buffer.readline()` holds the buffer's lock, and interpreter shutdown then aborts the process
("Fatal Python error: _enter_buffered_busy") when a signal ends it with stdin still open. Reads wait in
select() with a short timeout, so a stop request ends them within POLL_S.

A reader thread only splits and parses lines; requests are answered on a small pool of threads (in_flight), each
handing its phases to the one scheduler, which runs different members in parallel and batches the questions for
one member.
"""

from __future__ import annotations

import json
import os
import queue
import select
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any, Callable, Iterator

from calm_cli import schema, settings
from calm_cli.bounded import MAX_LINE_BYTES
from calm_cli.loop import monitor
from calm_cli.loop.calm import Calm

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


def handle(calm: Calm, job: Job, timeout_s: float | None = None) -> dict:
    """The record for one job; nothing raised escapes (an internal failure is an error record)."""
    if job.record is not None:
        return job.record
    request = job.request
    if request.get("type") == "stats":
        return {"id": request["id"], "type": "stats", **calm.stats()}
    queue_ms = (time.perf_counter() - job.arrived) * 1000
    try:
        return calm.answer(request, queue_ms=queue_ms, timeout_s=timeout_s)
    except Exception as exc:  # the run goes on; the record says what happened
        return monitor.error_record(request["id"], "internal", f"{type(exc).__name__}: {exc}")


def in_flight(calm: Calm) -> int:
    """Requests answered at once: enough to keep every member step the machine allows full of batched work,
    and one more so the scheduler always has the next one at hand."""
    return settings.concurrency() * int(settings.get("batch")) + 1


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
    """Answer every line of `source_fd` into `out` in input order, several at once (the scheduler runs members
    in parallel and batches questions for one member). With `resume`, lines already answered in the output
    file are skipped, so a killed or interrupted run continues without duplicates or gaps. SIGINT or SIGTERM:
    what is being answered is finished and every other line read gets an 'unavailable' record. A batch is
    offline work: queue.max_waiting and timeout_s do not apply."""
    stop = threading.Event()
    with stop_on_signals(stop) as got:
        intake = Intake()
        jobs = [intake.job(line, i) for i, line in enumerate(LineReader(source_fd, stop))]
        done = resume_point(out_path) if resume and out_path else 0
        finished: dict[int, dict] = {}
        landed = threading.Condition()
        next_index, ok, failed = done, 0, 0

        def answer(job: Job) -> None:
            record = handle(calm, job)
            with landed:
                finished[job.index] = record
                landed.notify()

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

        pool = ThreadPoolExecutor(max_workers=in_flight(calm), thread_name_prefix="calm-batch")
        for job in jobs[done:]:
            if job.record is None:
                if not stop.is_set():  # a signal while reading: every line read is refused below
                    pool.submit(answer, job)
            else:
                finished[job.index] = job.record
        while next_index < len(jobs) and not stop.is_set():
            with landed:  # write in input order as soon as the prefix is complete
                if next_index not in finished:
                    landed.wait(POLL_S)
                    continue
                record = finished.pop(next_index)
            write(record)
        if stop.is_set():
            pool.shutdown(wait=False, cancel_futures=True)  # lines not started are refused below
            calm.close(drain=False)  # lines waiting for a member end as unavailable; running ones finish
        pool.shutdown(wait=True)
        refused = 0
        for job in jobs[next_index:]:
            record = finished.pop(job.index, None)
            refused += record is None or (record.get("error") or {}).get("message") == SHUTDOWN
            write(record or refusal(job))
    return BatchResult(ok, failed, got.get("signal"), refused)


def serve(calm: Calm, source_fd: int, out: IO[str], log: Callable[[str], None] = lambda message: None) -> int:
    """Answer request lines as they come, several at once, until EOF, SIGINT or SIGTERM; returns the records
    written (in the order answers finish).

    EOF: everything read is answered, then it returns. A signal: what is being answered is finished, and every
    line read but not answered gets an 'unavailable' record, so no line is lost or half-written. More than the
    policy's queue.max_waiting requests at once get 'queue_full'; one that waited longer than queue.timeout_s
    for a member gets a 'timeout' record instead of a late answer.
    """
    stop = threading.Event()
    intake: queue.Queue[Job | None] = queue.Queue()
    max_waiting = calm.policy.queue.get("max_waiting", 512)
    timeout_s = calm.policy.queue.get("timeout_s")
    written = 0
    closed = False
    lock = threading.Lock()
    outstanding = threading.Semaphore(max_waiting)

    def emit(record: dict) -> None:
        nonlocal written, closed
        with lock:
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

    def answer(job: Job) -> None:
        try:
            emit(refusal(job) if stop.is_set() else handle(calm, job, timeout_s))
        finally:
            outstanding.release()

    with stop_on_signals(stop):
        calm.prefetch()  # a long-lived process: warm what fits before the first request arrives
        log(f"calm: serving policy {calm.policy.name}; one JSON request per line")
        thread = threading.Thread(target=reader, name="calm-stdin", daemon=True)
        thread.start()
        pool = ThreadPoolExecutor(max_workers=in_flight(calm), thread_name_prefix="calm-serve")
        stopped = False
        while True:
            try:
                job = intake.get(timeout=POLL_S)
            except queue.Empty:
                job = False  # nothing new: look at the stop flag
            if stop.is_set() and not stopped:
                stopped = True
                calm.close(drain=False)  # requests waiting for a member end as unavailable; running ones finish
            if job is None:
                break
            if job is False:
                continue
            if job.record is not None or stopped:
                emit(refusal(job))
            elif job.request.get("type") == "stats":
                emit(handle(calm, job))
            elif not outstanding.acquire(blocking=False):
                emit(monitor.error_record(job.request["id"], "queue_full",
                                          f"{max_waiting} requests are already in hand (queue.max_waiting)"))
            else:
                pool.submit(answer, job)
        pool.shutdown(wait=True)
        thread.join()
    return written
