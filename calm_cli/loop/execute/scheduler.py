"""Execute under concurrency, in llama-swap's router shape (../shared/SCHEDULER.md): one loop owns what waits,
which members are loaded or loading, and what each runs; events come in, effects go out.

A request's own pipeline (plan, the fallback order, escalation, its record: loop/calm.py) runs on its front's
thread. For each phase it hands the scheduler a Ticket: a job and the members to try in order, and waits for
the outcome. `Scheduler` is the pure part: only the loop thread calls it, one event at a time, so it needs no
lock; it decides and calls `Effects`, and never loads, runs or waits. Tests drive it synchronously with a
recording Effects. `Driver` is the machinery: the loop thread, its event queue and a worker pool that performs
the effects (loads and model steps: onnxruntime releases the GIL while it runs) and posts their results back.

Admission, in the queue's order (FIFO, or shortest predicted job first with ageing): a ticket joins its first
member's running batch when that member is loaded and batches (a question), or runs alone on it when the member
is idle (other work, a member that does not batch, a question too long for a batch slot); a member not loaded is
loaded once the eviction policy finds room among the idle ones. A ticket whose member cannot be held at all
(too big, pinned members in the way) or fails falls back to its next member. One that waits for room while
members run requests holds the queue: nothing behind it overtakes it, so it cannot starve. At most
`concurrency` steps run at once: different members in parallel, one member's steps one after another.

Drafts: a member whose policy names a draft (speculative decoding: prompt-lookup or a draft member) answers one
request at a time, trading batching for single-request speed; for a draft member, the scheduler lends each such
run the draft's session when the draft is loaded (a lease, so the draft is not evicted under it); when it is
not, the run decodes with prompt lookup and the draft is prefetched if it fits without evicting anything. A
verification job (escalation checking the first answer) also runs alone.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from calm_cli.engine.batch import DecodeBatch, Generation
from calm_cli.engine.session import ORT_ERRORS
from calm_cli.errors import CalmError, MemberFailure, ModelsFailed, ShuttingDown, Timeout
from calm_cli.loop.execute.cache import CacheError, MemberCache
from calm_cli.loop.execute.queue import AGEING
from calm_cli.members.base import Ask, Member, Run, Work


@dataclass(frozen=True)
class AskJob:
    """A question: each member answers it with its own defaults (`ask_for`); members that batch decode it with
    the other questions they are answering."""

    ask_for: Callable[[Member, bool], Ask]  # (member, may stream) -> the question for that member
    alone: bool = False  # needs the member to itself (verifying a whole answer): never batched


@dataclass(frozen=True)
class WorkJob:
    """Any other work on a member's session (a benchmark item): it has the member to itself while it runs."""

    work: Work


@dataclass(eq=False)
class Ticket:
    """One phase of one request: what to run, the members still to try, and (once done) its outcome."""

    job: AskJob | WorkJob
    order: list[str]
    stream: Callable[[str], bool] = lambda member: False  # may the run on this member stream
    predicted_ms: float = 0.0  # shortest-predicted-job-first's key
    timeout_s: float | None = None  # ends as Timeout if it waits longer than this for a member
    seq: int = 0
    arrived: float = field(default_factory=time.monotonic)  # when the request arrived (before it was planned)
    failures: list[tuple[str, MemberFailure]] = field(default_factory=list)
    hit: bool = True  # False once it waited for a load of the member that answered
    load_ms: float = 0.0
    submitted: float = field(default_factory=time.monotonic)
    queued_ms: float = 0.0  # from submission to the member starting on it (loads included)
    cancelled: bool = False
    outcome: Run | CalmError | None = None
    done: threading.Event = field(default_factory=threading.Event)
    generation: Generation | None = None  # while it decodes in a batch (owned by the member's step)
    draft: tuple[str, Handle] | None = None  # the draft member lent for its run, as loaded then, if any

    def result(self, timeout: float | None = None) -> Run:
        """The run, once finished; raises what ended it otherwise (ModelsFailed after every member failed)."""
        self.done.wait(timeout)
        if isinstance(self.outcome, CalmError):
            raise self.outcome
        assert self.outcome is not None
        return self.outcome


class Cancel:
    """A front's way to give up on a request whose client went away: a ticket still waiting ends at once, one
    decoding in a batch leaves it at the next step; one running alone finishes (its member is not interrupted).
    Every phase of the request (first answer, escalation) attaches its ticket."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tickets: list[tuple[Driver, Ticket]] = []
        self.cancelled = False

    def attach(self, driver: Driver, ticket: Ticket) -> None:
        with self._lock:
            self._tickets.append((driver, ticket))
            if not self.cancelled:
                return
        driver.cancel(ticket)

    def __call__(self) -> None:
        with self._lock:
            self.cancelled = True
            tickets = list(self._tickets)
        for driver, ticket in tickets:
            driver.cancel(ticket)


@dataclass
class Handle:
    """A loaded member as the scheduler holds it: its session and, if it batches, its batch. `parallel` > 1: a
    remote member, whose requests each run on their own at once (up to that many), outside the CPU's
    `concurrency` (they wait on the network, not on a core here)."""

    session: object
    batch: DecodeBatch | None
    parallel: int = 1


class Effects(Protocol):
    """What the scheduler asks for; the driver performs it on workers and posts the result back as an event."""

    def load(self, member: str) -> None:  # -> loaded or load_failed
        ...

    def step(self, member: str, handle: Handle, admit: list[Ticket], alone: bool) -> None:  # -> stepped
        ...

    def finish(self, ticket: Ticket) -> None:  # its outcome is set: wake whoever waits for it
        ...


@dataclass
class _Seat:
    """What runs on one loaded member: tickets decoding in its batch, the ones joining at its next step, and
    whether its step (or the job it runs alone) is in flight."""

    handle: Handle
    active: list[Ticket] = field(default_factory=list)
    joining: list[Ticket] = field(default_factory=list)
    alone: bool = False
    stepping: bool = False
    last_step: float = 0.0


class Scheduler:
    """The pure part: state and decisions, changed only by the loop thread through the event methods."""

    def __init__(self, cache: MemberCache, effects: Effects, *, discipline: str = "fifo", concurrency: int = 1,
                 ageing: float = AGEING, clock: Callable[[], float] = time.monotonic,
                 drafts: Mapping[str, str | None] | None = None):
        if discipline not in ("fifo", "sjf"):
            raise ValueError(f"queue discipline {discipline!r} is not one of fifo, sjf")
        self.cache, self.effects, self.discipline = cache, effects, discipline
        self.concurrency, self.ageing, self.clock = max(1, concurrency), ageing, clock
        self.drafts = dict(drafts or {})  # member -> the member that drafts for it (None: prompt lookup)
        self.waiting: list[Ticket] = []
        self.seats: dict[str, _Seat] = {}
        self.loading: dict[str, list[str]] = {}  # member -> what its begin_load evicted
        self.closing = False
        self.draining = True  # after a shutdown: whether what was taken is still answered
        self._seq = itertools.count()

    # ---------------------------------------------------------------------------------------- events

    def submit(self, ticket: Ticket) -> None:
        if self.closing or ticket.cancelled:
            self._end(ticket, ShuttingDown("cancelled by the client" if ticket.cancelled else "calm is shutting down"))
            return
        ticket.seq = next(self._seq)
        self.waiting.append(ticket)
        self.cache.want(ticket.order[0])
        self._drain()

    def loaded(self, member: str, handle: Handle, load_ms: float) -> None:
        evicted = self.loading.pop(member)
        try:
            self.cache.end_load(member, handle, load_ms, evicted)
        except CacheError:
            # It measured more than the room left, and the cache dropped it. The tickets waiting for it stay:
            # _drain asks the cache again with the measured size, so they wait while running members hold the
            # room (busy), load it as a miss (a prefetch may not evict; a miss may), or fall back when it can
            # never fit. (They used to fall back at once, failing a request that would fit a moment later.)
            pass
        else:
            self.cache.release(member)  # leases are the tickets' it runs; idle, it may be evicted
            # end_load evicts further idle members when the load measured more than its estimate: drop their
            # seats too, or a later ticket would join a member that is no longer loaded (hold() -> None).
            self._drop_evicted_seats()
            self.seats[member] = _Seat(handle)
            for t in self.waiting:
                if t.order[0] == member:
                    t.hit, t.load_ms = False, load_ms
        self._drain()

    def load_failed(self, member: str, error: MemberFailure) -> None:
        self.loading.pop(member)
        self.cache.abort_load(member)
        self._fail_waiting_for(member, error)
        self._drain()

    def stepped(self, member: str, finished: list[tuple[Ticket, Run | CalmError]],
                error: MemberFailure | None = None) -> None:
        """A step of `member` ended: `finished` tickets are done; with `error` the member failed under every
        ticket it was running, which fall back, and it is unloaded."""
        seat = self.seats[member]
        seat.stepping, seat.last_step = False, self.clock()
        for ticket, outcome in finished:
            seat.active.remove(ticket)
            self.cache.release(member)
            self._return_draft(ticket)
            if isinstance(outcome, MemberFailure):
                self._retry(ticket, member, outcome)
            else:
                self._end(ticket, outcome)
        if seat.alone and not seat.active:
            seat.alone = False
        if error is not None:
            for ticket in [*seat.active, *seat.joining]:
                self.cache.release(member)
                self._return_draft(ticket)
                self._retry(ticket, member, error)
            seat.active, seat.joining = [], []
            self._unload(member)
        self._drain()

    def prefetch(self, member: str) -> None:
        """Load `member` ahead of any request when the policy allows it and it fits without evicting."""
        if not self.closing and self.cache.prefetchable(member):
            self.loading[member] = self.cache.begin_load(member, "prefetch")
            self.effects.load(member)

    def cancel(self, ticket: Ticket) -> None:
        """A client went away: a waiting ticket ends now; a running one at its member's next step boundary."""
        ticket.cancelled = True
        if ticket in self.waiting:
            self.waiting.remove(ticket)
            self._end(ticket, ShuttingDown("cancelled by the client"))
            self._drain()

    def set_budget(self, budget_mb: float) -> list[str]:
        evicted = self.cache.set_budget(budget_mb)
        for name in evicted:
            self.seats.pop(name, None)
        self._drain()
        return evicted

    def shutdown(self, drain: bool) -> None:
        """Stop taking tickets; with `drain` what waits is still answered, else it ends as unavailable."""
        self.closing, self.draining = True, drain
        if not drain:
            for ticket in self.waiting:
                self._end(ticket, ShuttingDown("calm is shutting down"))
            self.waiting = []
        self._drain()

    @property
    def idle(self) -> bool:
        """Nothing waits, loads or runs: after a shutdown, the loop may end."""
        return not self.waiting and not self.loading and not any(s.active or s.joining for s in self.seats.values())

    def state(self) -> dict[str, Any]:
        return {"waiting": len(self.waiting), "loading": sorted(self.loading),
                "running": {m: len(s.active) + len(s.joining) for m, s in self.seats.items() if s.active or s.joining}}

    # ---------------------------------------------------------------------------------------- decisions

    def _ordered(self) -> list[Ticket]:
        if self.discipline == "fifo":
            return sorted(self.waiting, key=lambda t: t.seq)
        return sorted(self.waiting, key=lambda t: (t.predicted_ms + self.ageing * t.arrived * 1000, t.seq))

    def expire(self) -> None:
        """End the waiting tickets that waited longer than their timeout (called on every event and now and
        then by the driver, so a ticket times out even when nothing else happens)."""
        now = self.clock()
        for ticket in [t for t in self.waiting if t.timeout_s is not None and now - t.arrived > t.timeout_s]:
            self.waiting.remove(ticket)
            self._end(ticket, Timeout(f"waited {now - ticket.arrived:.1f} s for a member, over queue.timeout_s "
                                      f"{ticket.timeout_s:g} s"))

    def _drain(self) -> None:
        """Place what waits, in order, then start the steps there is room for."""
        self.expire()
        passed_over: set[str] = set()  # members an earlier ticket waits for: later ones may not cut in
        for ticket in self._ordered():
            if not self._place(ticket, passed_over):
                break
        self._start_steps()

    def _place(self, ticket: Ticket, passed_over: set[str]) -> bool:
        """Seat `ticket` or start what it needs; False when it must wait for room (nothing may overtake it).
        A ticket that cannot join its loaded member now (work waiting for the batch to empty, a full batch) keeps
        the later tickets for that member from joining before it, so questions cannot starve it."""
        while True:
            member = ticket.order[0]
            seat = self.seats.get(member)
            if seat is not None:
                if member in passed_over or not self._joins(seat, ticket):
                    passed_over.add(member)
                else:
                    self.waiting.remove(ticket)
                    lease = self.cache.hold(member)
                    assert lease is not None
                    seat.joining.append(ticket)
                    seat.alone = seat.handle.parallel == 1 and (seat.alone or not self._batched(seat, ticket))
                return True
            if member in self.loading:
                return True
            try:
                self.loading[member] = self.cache.begin_load(member)
            except CacheError as exc:
                if exc.busy:
                    return False
                self.waiting.remove(ticket)
                if not self._fall_back(ticket, member, exc):
                    return True
                self.waiting.append(ticket)  # its next member, tried at once
                continue
            self._drop_evicted_seats()
            self.effects.load(member)
            return True

    def _drop_evicted_seats(self) -> None:
        for name in list(self.seats):
            if not self.cache.loaded(name):  # evicted to make room (only idle members are)
                del self.seats[name]

    def _batched(self, seat: _Seat, ticket: Ticket) -> bool:
        job = ticket.job
        return seat.handle.batch is not None and isinstance(job, AskJob) and not job.alone \
            and ticket.order[0] not in self.drafts

    def _lend_draft(self, member: str, ticket: Ticket) -> None:
        """Lend `member`'s draft to the ticket's run if it is loaded; else prefetch it where it fits freely."""
        draft = self.drafts.get(member)
        if draft is None or draft == member or not isinstance(ticket.job, AskJob):
            return
        seat = self.seats.get(draft)
        if seat is not None and self.cache.hold(draft, hit=False) is not None:
            ticket.draft = (draft, seat.handle)
        elif draft not in self.loading:
            self.prefetch(draft)

    def _return_draft(self, ticket: Ticket) -> None:
        """End the lease lent with the ticket's run, unless the draft failed and was unloaded meanwhile (its
        lease went with it; the run kept the session object it had)."""
        if ticket.draft is not None:
            name, handle = ticket.draft
            seat = self.seats.get(name)
            if seat is not None and seat.handle is handle:
                self.cache.release(name)
            ticket.draft = None

    def _joins(self, seat: _Seat, ticket: Ticket) -> bool:
        busy = len(seat.active) + len(seat.joining)
        if seat.handle.parallel > 1:
            return busy < seat.handle.parallel
        if seat.alone:
            return False
        if self._batched(seat, ticket):
            return busy < seat.handle.batch.slots.rows
        return busy == 0

    def _start_steps(self) -> None:
        now = self.clock()
        for member, seat in self.seats.items():  # remote members: every newcomer runs at once, on its own
            if seat.handle.parallel > 1:
                for ticket in seat.joining:
                    ticket.queued_ms = (now - ticket.submitted) * 1000
                    seat.active.append(ticket)
                    self.effects.step(member, seat.handle, [ticket], True)
                seat.joining = []
        running = sum(s.stepping for s in self.seats.values())
        ready = sorted((m for m, s in self.seats.items()
                        if s.handle.parallel == 1 and not s.stepping and (s.active or s.joining)),
                       key=lambda m: self.seats[m].last_step)  # the member that waited longest goes first
        for member in ready[:max(0, self.concurrency - running)]:
            seat = self.seats[member]
            admit, seat.joining = seat.joining, []
            for ticket in admit:
                ticket.queued_ms = (now - ticket.submitted) * 1000
            seat.active += admit
            seat.stepping = True
            if seat.alone:
                for ticket in admit:
                    self._lend_draft(member, ticket)
            self.effects.step(member, seat.handle, admit, seat.alone)

    def _fall_back(self, ticket: Ticket, member: str, error: MemberFailure) -> bool:
        """Record the failure and move to the next member; False (and the ticket ended) when none is left."""
        ticket.failures.append((member, error))
        ticket.order = ticket.order[1:]
        if ticket.cancelled or (self.closing and not self.draining):  # nobody waits for another member's answer
            self._end(ticket, ShuttingDown("cancelled by the client" if ticket.cancelled else "calm is shutting down"))
            return False
        if not ticket.order:
            self._end(ticket, ModelsFailed("; ".join(f"{m}: {e}" for m, e in ticket.failures)))
            return False
        self.cache.want(ticket.order[0])
        return True

    def _retry(self, ticket: Ticket, member: str, error: MemberFailure) -> None:
        """A ticket no longer waiting failed on `member`: it waits again for its next member, if any."""
        if self._fall_back(ticket, member, error):
            self.waiting.append(ticket)

    def _fail_waiting_for(self, member: str, error: MemberFailure) -> None:
        for ticket in [t for t in self.waiting if t.order[0] == member]:
            self.waiting.remove(ticket)
            self._retry(ticket, member, error)

    def _unload(self, member: str) -> None:
        """A member that failed under a step is dropped, so the next request for it loads it afresh."""
        del self.seats[member]
        self.cache.evict(member, "it failed while running")

    def _end(self, ticket: Ticket, outcome: Run | CalmError) -> None:
        ticket.outcome = outcome
        self.effects.finish(ticket)


# ------------------------------------------------------------------------------------------- the machinery


TICK_S = 0.2  # how often the loop looks at waiting tickets' timeouts when nothing else happens


class Driver:
    """The loop thread and its workers: real effects for a Scheduler over real members.

    Thread-safe entry points (`submit`, `cancel`, `set_budget`, `shutdown`) post events; only the loop thread
    touches the scheduler."""

    def __init__(self, members: Mapping[str, Member], cache: MemberCache, *, discipline: str, concurrency: int):
        self.members = members
        drafts = {name: m.config.draft_model for name, m in members.items()
                  if not m.remote and m.config.draft not in (None, "none")}
        self.scheduler = Scheduler(cache, self, discipline=discipline, concurrency=concurrency, drafts=drafts)
        self._events: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._workers = ThreadPoolExecutor(max_workers=concurrency + 1, thread_name_prefix="calm-worker")
        # Remote members' requests wait on the network: threads of their own, as many as they may run at once.
        self._network = ThreadPoolExecutor(max_workers=max(1, sum(m.parallel for m in members.values() if m.parallel > 1)),
                                           thread_name_prefix="calm-remote")
        self._decoding: dict[str, dict[int, Ticket]] = {}  # member -> its batch's tickets (its step's own)
        self._gate = threading.Lock()  # a submit is posted before the shutdown event, or refused
        # One load at a time: a load's memory is the process's growth while it runs (and its batch's KV buffers
        # are made), which a parallel load would inflate.
        self._one_load = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="calm-loop", daemon=True)
        self._thread.start()

    # -- entry points (any thread)

    def submit(self, ticket: Ticket) -> Ticket:
        """Hand `ticket` to the loop; once shutdown has begun it ends at once as unavailable."""
        with self._gate:
            if not self._closed:
                self._post(lambda: self.scheduler.submit(ticket))
                return ticket
        ticket.outcome = ShuttingDown("calm is shutting down")
        ticket.done.set()
        return ticket

    def run(self, ticket: Ticket) -> Run:
        """Submit and wait: the run, or what ended the ticket (ModelsFailed, ShuttingDown, a bad request)."""
        return self.submit(ticket).result()

    def cancel(self, ticket: Ticket) -> None:
        self._post(lambda: self.scheduler.cancel(ticket))

    def prefetch(self, member: str) -> None:
        self._post(lambda: self.scheduler.prefetch(member))

    def set_budget(self, budget_mb: float) -> list[str]:
        done: queue.Queue[list[str] | BaseException] = queue.Queue()

        def event() -> None:
            try:
                done.put(self.scheduler.set_budget(budget_mb))
            except BaseException as exc:  # noqa: BLE001 - handed back to the caller's thread
                done.put(exc)

        self._post(event)
        result = done.get()
        if isinstance(result, BaseException):
            raise result
        return result

    def state(self) -> dict[str, Any]:
        return self.scheduler.state()

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking work; wait until what was taken is done (drain) or ended; then stop the loop and unload
        every member. Calling it again does nothing."""
        with self._gate:
            if self._closed:
                return
            self._closed = True
            self._post(lambda: self.scheduler.shutdown(drain))
            self._post(None)
        self._thread.join(timeout)
        self._workers.shutdown(wait=True)
        self._network.shutdown(wait=True)

    def _post(self, event: Callable[[], None] | None) -> None:
        self._events.put(event)

    def _loop(self) -> None:
        stopping = False
        while True:
            try:
                event = self._events.get(timeout=TICK_S)
            except queue.Empty:
                self.scheduler.expire()
                continue
            if event is None:
                stopping = True
            else:
                event()
            if stopping and self.scheduler.idle and self._events.empty():
                self.scheduler.cache.clear()
                return

    # -- effects (called by the scheduler on the loop thread; the work runs on workers)

    def load(self, member: str) -> None:
        self._workers.submit(self._load, member)

    def _load(self, name: str) -> None:
        member = self.members[name]
        started = time.perf_counter()
        failure: MemberFailure
        try:
            with self._one_load:
                session = member.load()
                handle = Handle(session, member.batch(session), member.parallel)
        except MemberFailure as exc:
            failure = exc
        except MemoryError as exc:
            failure = MemberFailure(f"{name}: out of memory while loading")
            failure.__cause__ = exc
        except Exception as exc:  # noqa: BLE001 - a bug must end the tickets, never leave them waiting
            failure = MemberFailure(f"{name}: load failed: {type(exc).__name__}: {exc}")
            failure.__cause__ = exc
        else:
            load_ms = (time.perf_counter() - started) * 1000
            self._post(lambda: self.scheduler.loaded(name, handle, load_ms))
            return
        self._post(lambda: self.scheduler.load_failed(name, failure))

    def step(self, member: str, handle: Handle, admit: list[Ticket], alone: bool) -> None:
        (self._network if handle.parallel > 1 else self._workers).submit(self._step, member, handle, admit, alone)

    def _step(self, name: str, handle: Handle, admit: list[Ticket], alone: bool) -> None:
        member = self.members[name]
        finished: list[tuple[Ticket, Run | CalmError]] = []
        error: MemberFailure | None = None
        try:
            if alone:
                finished = [(t, self._alone(member, handle, t)) for t in admit]
            else:
                finished = self._batch_step(member, handle, admit)
        except MemberFailure as exc:
            error = exc
        except Exception as exc:  # noqa: BLE001 - a bug must end the tickets, never leave them waiting
            error = MemberFailure(f"{name} failed while running: {type(exc).__name__}: {exc}")
            error.__cause__ = exc
        if error is not None and handle.parallel > 1:  # only this step's ticket failed; the others run on
            finished, error = [(t, error) for t in admit], None
        self._post(lambda: self.scheduler.stepped(name, finished, error))

    def _alone(self, member: Member, handle: Handle, ticket: Ticket) -> Run | CalmError:
        stream = ticket.stream(member.name)
        job = ticket.job
        try:
            if isinstance(job, WorkJob):
                return member.run(handle.session, job.work, stream)
            lent = ticket.draft[1].session if ticket.draft else None
            return member.run(handle.session, lambda m, s, st: m.generate(s, job.ask_for(m, st), lent), stream)
        except MemberFailure as exc:
            return exc
        except CalmError as exc:  # the request itself is wrong: no other member would do better
            return exc

    def _batch_step(self, member: Member, handle: Handle, admit: list[Ticket]) -> list[tuple[Ticket, Run | CalmError]]:
        """One step of the member's batch: newcomers prepared and admitted, every active one a token further."""
        assert handle.batch is not None
        batch = handle.batch
        finished: list[tuple[Ticket, Run | CalmError]] = []
        joining: list[Generation] = []
        tickets = self._decoding.setdefault(member.name, {})  # id(generation) -> its ticket, for this member
        for ticket in admit:
            job = ticket.job
            assert isinstance(job, AskJob)
            try:
                gen = member.prepare(handle.session, job.ask_for(member, ticket.stream(member.name)))
            except CalmError as exc:
                finished.append((ticket, exc))
                continue
            if not batch.fits(len(gen.prompt_ids), gen.max_new_tokens):  # too long for a slot: answered alone
                finished.append((ticket, self._alone(member, handle, ticket)))
                continue
            ticket.generation = gen
            tickets[id(gen)] = ticket
            joining.append(gen)
        for gen in [*batch.active.values(), *joining]:
            gen.cancelled = tickets[id(gen)].cancelled
        try:
            done = batch.step(joining)
        except (*ORT_ERRORS, MemoryError) as exc:  # onnxruntime failed under the whole batch
            tickets.clear()
            failure = MemberFailure(f"{member.name} failed while decoding a batch: {type(exc).__name__}: {exc}")
            failure.__cause__ = exc
            raise failure from exc
        for gen in done:
            ticket = tickets.pop(id(gen))
            assert gen.completion is not None
            outcome: Run | CalmError = ShuttingDown("cancelled by the client") \
                if gen.completion.stop_reason == "cancelled" else member.run_of(handle.session, gen.completion)
            finished.append((ticket, outcome))
        return finished

    def finish(self, ticket: Ticket) -> None:
        ticket.done.set()

