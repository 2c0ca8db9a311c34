"""Execute's scheduler (loop/execute/scheduler.py), driven synchronously as ../shared/SCHEDULER.md asks: events
in, effects out. A recorder stands in for the driver's workers, and the test feeds back what they would post
(loaded, load_failed, stepped): no threads, no models, no sleeps, and a fake clock for timeouts and ageing.

First a table (these events -> these effects, in this order), then the invariants under random interleavings
(hypothesis), then determinism."""

from __future__ import annotations

import gc
import random
from collections import Counter
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings as hsettings, strategies as st

from calm_cli.errors import MemberFailure
from calm_cli.loop.execute.cache import CacheError, MemberCache
from calm_cli.loop.execute.scheduler import AskJob, Handle, Scheduler, Ticket, WorkJob
from calm_cli.members.base import Run


@pytest.fixture(scope="module", autouse=True)
def frozen_heap():
    """The cache runs a full gc after each eviction; freezing pytest's own heap out of it keeps the random
    workloads fast without changing what the cache does (as in test_cache.py)."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


def make_run(member: str) -> Run:
    return Run(model=member, text="ok", latency_ms=1.0, ttft_ms=1.0, tokens_in=1, tokens_out=1, tokens_per_s=1.0,
               energy_j=0.0, energy_estimated=True, confidence=1.0, provider="fake", stop_reason="stop")


ASK = AskJob(ask_for=lambda member, stream: None)  # never called: the test's fake steps decide every outcome
VERIFY = AskJob(ask_for=lambda member, stream: None, alone=True)  # escalation checking a first answer
WORK = WorkJob(work=lambda member, session, stream: make_run(member.name))


class Clock:
    """The scheduler's clock, moved only by the test."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Recorder:
    """Effects as data: ("load", member), ("step", member, [ticket ids], alone), ("finish", ticket id, outcome
    kind). It also keeps what is in flight, so the test knows which events it may feed back."""

    def __init__(self) -> None:
        self.effects: list[tuple] = []
        self.names: dict[Ticket, str] = {}  # Ticket is eq=False: hashed by identity
        self.pending_loads: list[str] = []
        self.pending_steps: dict[str, bool] = {}  # member -> whether its step in flight runs alone
        self.running: dict[str, list[Ticket]] = {}  # member -> tickets admitted and not yet finished there
        self.finished: dict[str, int] = {}

    def load(self, member: str) -> None:
        assert member not in self.pending_loads, f"{member} loaded twice at once"
        self.pending_loads.append(member)
        self.effects.append(("load", member))

    def step(self, member: str, handle: Handle, admit: list[Ticket], alone: bool) -> None:
        running = self.running.setdefault(member, [])
        if handle.parallel > 1:  # a remote member: each request its own step, up to `parallel` at once
            assert alone and len(admit) == 1 and len(running) < handle.parallel
            running += admit
            self.effects.append(("step", member, [self.names[t] for t in admit], alone))
            return
        assert member not in self.pending_steps, f"two steps of {member} at once"
        if alone:  # a job that runs alone has the member to itself: nothing before it, nothing joins it
            assert len(admit) == 1 and not running
        else:
            assert all(isinstance(t.job, AskJob) for t in admit) and handle.batch is not None
            assert len(running) + len(admit) <= handle.batch.slots.rows
        running += admit
        self.pending_steps[member] = alone
        self.effects.append(("step", member, [self.names[t] for t in admit], alone))

    def finish(self, ticket: Ticket) -> None:
        name = self.names[ticket]
        self.finished[name] = self.finished.get(name, 0) + 1
        self.effects.append(("finish", name, type(ticket.outcome).__name__))


class Rig:
    """A Scheduler over a real MemberCache with fake sizes, a Recorder for effects and a fake clock; its
    methods are the events, by ticket name. Members in `rows` batch with that many rows; others do not."""

    def __init__(self, *, sizes: dict[str, float] | None = None, measured: dict[str, float] | None = None,
                 costs: dict[str, float] | None = None, rows: dict[str, int | None] | None = None,
                 budget: float = 10_000, max_loaded: int = 4, eviction: str = "lru", prefetch: bool = False,
                 pinned: tuple[str, ...] = (), concurrency: int = 1, discipline: str = "fifo",
                 parallel: dict[str, int] | None = None, drafts: dict[str, str | None] | None = None):
        sizes, measured, costs = sizes or {}, measured or {}, costs or {}
        self.rows = rows or {}
        self.parallel = parallel or {}
        self.clock = Clock()
        self.fx = Recorder()
        self.cache = MemberCache(
            {"budget_mb": budget, "max_loaded": max_loaded, "eviction": eviction, "prefetch": prefetch,
             "pinned": list(pinned)},
            # the cache holds the Handle as the member's session (as loop/assemble.py's memory_of expects)
            memory_of=lambda name, handle: handle.session.mb or measured.get(name, sizes.get(name, 1000)),
            estimate_mb=lambda name: sizes.get(name, 1000),
            load_cost_ms=lambda name: costs.get(name, 1000))
        self.sched = Scheduler(self.cache, self.fx, discipline=discipline, concurrency=concurrency,
                               clock=self.clock, drafts=drafts)
        self.tickets: dict[str, Ticket] = {}

    # -- events

    def submit(self, name: str, *order: str, work: bool = False, verify: bool = False, predicted_ms: float = 0.0,
               timeout_s: float | None = None) -> None:
        now = self.clock()
        ticket = Ticket(WORK if work else VERIFY if verify else ASK, list(order), predicted_ms=predicted_ms,
                        timeout_s=timeout_s, arrived=now, submitted=now)
        self.tickets[name] = ticket
        self.fx.names[ticket] = name
        self.sched.submit(ticket)

    def loaded(self, member: str, mb: float | None = None) -> None:
        """The load ended; the session measures `mb` (by default the member's `measured`, else its size)."""
        self.fx.pending_loads.remove(member)
        rows = self.rows.get(member)
        batch = None if rows is None else SimpleNamespace(slots=SimpleNamespace(rows=rows))
        self.sched.loaded(member, Handle(session=SimpleNamespace(mb=mb), batch=batch,
                                         parallel=self.parallel.get(member, 1)), 10.0)

    def load_failed(self, member: str) -> None:
        self.fx.pending_loads.remove(member)
        self.sched.load_failed(member, MemberFailure(f"{member} would not load"))

    def stepped(self, member: str, done: tuple[str, ...] = (), failed: tuple[str, ...] = (),
                error: bool = False) -> None:
        """The member's step ends: `done` answered, `failed` failed on it (they fall back), or with `error` the
        member failed under the whole step."""
        self.fx.pending_steps.pop(member, None)  # a remote member's steps are not tracked one per member
        finished: list[tuple[Ticket, Any]] = [(self.tickets[n], make_run(member)) for n in done]
        finished += [(self.tickets[n], MemberFailure(f"{member} broke on {n}")) for n in failed]
        running = self.fx.running[member]
        for ticket, _ in finished:
            running.remove(ticket)
        if error:
            running.clear()
        self.sched.stepped(member, finished, MemberFailure(f"{member} crashed") if error else None)

    def cancel(self, name: str) -> None:
        self.sched.cancel(self.tickets[name])

    def tick(self, seconds: float) -> None:
        self.clock.now += seconds

    def expire(self) -> None:
        self.sched.expire()

    def shutdown(self, drain: bool) -> None:
        self.sched.shutdown(drain)

    def prefetch(self, member: str) -> None:
        self.sched.prefetch(member)

    def set_budget(self, mb: float) -> None:
        self.sched.set_budget(mb)

    # -- checks written as events (they cause no effects)

    def cached(self, *members: str) -> None:
        assert {m["model"] for m in self.cache.state()["loaded"]} == set(members)

    def is_idle(self) -> None:
        assert self.sched.idle

    def lent(self, name: str, draft: str | None) -> None:
        """The draft member lent to the ticket's run (None: it runs without one)."""
        got = self.tickets[name].draft
        assert (got[0] if got else None) == draft

    def in_use(self, member: str, leases: int) -> None:
        assert {m["model"]: m["in_use"] for m in self.cache.state()["loaded"]}[member] == leases

    def says(self, name: str, *parts: str) -> None:
        message = str(self.tickets[name].outcome)
        assert all(p in message for p in parts), message


# ---------------------------------------------------------------- the table: events -> effects, in order


def ev(kind: str):
    return lambda *args, **kw: (kind, args, kw)


# Events (and checks), named as the Rig's methods; each is (method, args, kwargs) until play_table calls it.
submit, loaded, load_failed, stepped = ev("submit"), ev("loaded"), ev("load_failed"), ev("stepped")
cancel, tick, expire, shutdown = ev("cancel"), ev("tick"), ev("expire"), ev("shutdown")
prefetch, set_budget, cached, is_idle, says = ev("prefetch"), ev("set_budget"), ev("cached"), ev("is_idle"), ev("says")
lent, in_use = ev("lent"), ev("in_use")


def load(member: str) -> tuple:
    return ("load", member)


def step(member: str, *tickets: str, alone: bool = False) -> tuple:
    return ("step", member, list(tickets), alone)


def fin(ticket: str, kind: str = "Run") -> tuple:
    return ("finish", ticket, kind)


def scenario(name: str, config: dict, *rows):
    """rows alternate: an event, then the effects it must cause (exactly these, in this order)."""
    return pytest.param(config, list(zip(rows[::2], rows[1::2])), id=name)


BATCH_A = {"rows": {"a": 4}}
SJF_EVENTS = (  # q1 long and first; q2 shorter by more than it waited less; q3 shortest but barely waited
    submit("q1", "a", predicted_ms=5000), [load("a")],
    tick(1.0), [],
    submit("q2", "a", predicted_ms=3000), [],
    tick(3.95), [],
    submit("q3", "a", predicted_ms=100), [],
)
COST_EVENTS = (  # a is dear to reload, b cheap; b was used last
    submit("q1", "a"), [load("a")],
    loaded("a"), [step("a", "q1", alone=True)],
    stepped("a", done=["q1"]), [fin("q1")],
    submit("q2", "b"), [load("b")],
    loaded("b"), [step("b", "q2", alone=True)],
    stepped("b", done=["q2"]), [fin("q2")],
    submit("q3", "c"), [load("c")],
)
COST_CONFIG = {"budget": 2000, "costs": {"a": 5000, "b": 100}}

SCENARIOS = [
    scenario("miss-loads-then-steps", BATCH_A,
             submit("q1", "a"), [load("a")],
             loaded("a"), [step("a", "q1")],
             stepped("a", done=["q1"]), [fin("q1")],
             is_idle(), []),
    scenario("joins-the-running-batch-at-its-next-step", BATCH_A,
             submit("q1", "a"), [load("a")],
             loaded("a"), [step("a", "q1")],
             submit("q2", "a"), [],  # a's step is in flight: q2 waits to be admitted by the next one
             stepped("a"), [step("a", "q2")],
             stepped("a", done=["q1"]), [fin("q1"), step("a")],
             stepped("a", done=["q2"]), [fin("q2")],
             is_idle(), []),
    scenario("different-members-in-parallel-up-to-concurrency", {"concurrency": 2},
             submit("q1", "a"), [load("a")],
             submit("q2", "b"), [load("b")],
             submit("q3", "c"), [load("c")],
             loaded("a"), [step("a", "q1", alone=True)],
             loaded("b"), [step("b", "q2", alone=True)],
             loaded("c"), [],  # two steps run: c waits for one to end
             stepped("a", done=["q1"]), [fin("q1"), step("c", "q3", alone=True)],
             stepped("b", done=["q2"]), [fin("q2")],
             stepped("c", done=["q3"]), [fin("q3")]),
    scenario("work-runs-alone-and-nothing-joins-it", BATCH_A,
             submit("w1", "a", work=True), [load("a")],
             loaded("a"), [step("a", "w1", alone=True)],
             submit("q2", "a"), [],
             stepped("a", done=["w1"]), [fin("w1"), step("a", "q2")],
             stepped("a", done=["q2"]), [fin("q2")]),
    scenario("work-waits-for-the-batch-to-empty", BATCH_A,
             submit("q1", "a"), [load("a")],
             loaded("a"), [step("a", "q1")],
             submit("w2", "a", work=True), [],
             stepped("a"), [step("a")],
             stepped("a", done=["q1"]), [fin("q1"), step("a", "w2", alone=True)],
             stepped("a", done=["w2"]), [fin("w2")]),
    scenario("a-member-that-does-not-batch-answers-one-at-a-time", {},
             submit("q1", "a"), [load("a")],
             submit("q2", "a"), [],
             loaded("a"), [step("a", "q1", alone=True)],
             stepped("a", done=["q1"]), [fin("q1"), step("a", "q2", alone=True)],
             stepped("a", done=["q2"]), [fin("q2")]),
    scenario("a-fifth-question-waits-for-a-free-row", BATCH_A,
             submit("q1", "a"), [load("a")],
             submit("q2", "a"), [], submit("q3", "a"), [], submit("q4", "a"), [], submit("q5", "a"), [],
             loaded("a"), [step("a", "q1", "q2", "q3", "q4")],
             stepped("a", done=["q2"]), [fin("q2"), step("a", "q5")],
             stepped("a", done=["q1", "q3", "q4", "q5"]), [fin("q1"), fin("q3"), fin("q4"), fin("q5")]),
    scenario("load-failure-falls-back-to-the-next-member", {},
             submit("q1", "a", "b"), [load("a")],
             load_failed("a"), [load("b")],
             loaded("b"), [step("b", "q1", alone=True)],
             stepped("b", done=["q1"]), [fin("q1")]),
    scenario("too-big-for-the-budget-falls-back-at-once", {"sizes": {"a": 5000}, "budget": 2000},
             submit("q1", "a", "b"), [load("b")],
             loaded("b"), [step("b", "q1", alone=True)],
             stepped("b", done=["q1"]), [fin("q1")]),
    scenario("member-failure-in-a-step-falls-back", {},
             submit("q1", "a", "b"), [load("a")],
             loaded("a"), [step("a", "q1", alone=True)],
             stepped("a", failed=["q1"]), [load("b")],
             loaded("b"), [step("b", "q1", alone=True)],
             stepped("b", done=["q1"]), [fin("q1")],
             cached("a", "b"), []),  # one ticket's failure does not unload the member
    scenario("a-step-error-retries-its-tickets-and-unloads-the-member", BATCH_A,
             submit("q1", "a", "b"), [load("a")],
             submit("q2", "a"), [],
             loaded("a"), [step("a", "q1", "q2")],
             submit("q3", "a"), [],  # joining at the next step: it fails with the member too
             stepped("a", error=True), [fin("q2", "ModelsFailed"), fin("q3", "ModelsFailed"), load("b")],
             cached(), [],
             loaded("b"), [step("b", "q1", alone=True)],
             stepped("b", done=["q1"]), [fin("q1")],
             submit("q4", "a"), [load("a")]),  # loaded afresh
    scenario("every-member-failing-ends-as-models-failed-naming-each", {},
             submit("q1", "a", "b", "c"), [load("a")],
             load_failed("a"), [load("b")],
             loaded("b"), [step("b", "q1", alone=True)],
             stepped("b", failed=["q1"]), [load("c")],
             load_failed("c"), [fin("q1", "ModelsFailed")],
             says("q1", "a: a would not load", "b: b broke on q1", "c: c would not load"), [],
             is_idle(), []),
    scenario("eviction-waits-for-the-member-to-go-idle-and-nothing-overtakes", {"budget": 1000, **BATCH_A},
             submit("q1", "a"), [load("a")],
             loaded("a"), [step("a", "q1")],
             submit("q2", "b"), [],  # b fits only once a goes: a runs q1, so q2 waits
             submit("q3", "a"), [],  # behind q2: it must not join a's batch and keep a busy forever
             stepped("a"), [step("a")],
             stepped("a", done=["q1"]), [fin("q1"), load("b")],
             cached(), [],  # a was evicted to make room for b
             loaded("b"), [step("b", "q2", alone=True)],
             stepped("b", done=["q2"]), [fin("q2"), load("a")],
             loaded("a"), [step("a", "q3")],
             stepped("a", done=["q3"]), [fin("q3")],
             cached("a"), []),
    scenario("a-raised-budget-unblocks-the-waiting-ticket", {"budget": 1000},
             submit("q1", "a"), [load("a")],
             loaded("a"), [step("a", "q1", alone=True)],
             submit("q2", "b"), [],
             set_budget(2000), [load("b")],
             loaded("b"), [],  # concurrency 1: b steps once a's step ends
             stepped("a", done=["q1"]), [fin("q1"), step("b", "q2", alone=True)]),
    scenario("a-load-that-measured-more-evicts-and-its-victim-loads-afresh",
             {"budget": 2000, "measured": {"b": 1500}},
             submit("q1", "a"), [load("a")],
             loaded("a"), [step("a", "q1", alone=True)],
             stepped("a", done=["q1"]), [fin("q1")],
             submit("q2", "b"), [load("b")],  # 1000 MB expected: fits beside a
             loaded("b"), [step("b", "q2", alone=True)],  # took 1500 MB: idle a was evicted for it
             cached("b"), [],
             submit("q3", "a"), [],  # a must be loaded again, and b runs q2
             stepped("b", done=["q2"]), [fin("q2"), load("a")],
             loaded("a"), [step("a", "q3", alone=True)],
             stepped("a", done=["q3"]), [fin("q3")]),
    scenario("a-load-that-measured-more-than-the-busy-room-waits-and-loads-again",
             {"budget": 2000, "measured": {"b": 1500}},
             submit("q1", "a"), [load("a")],
             loaded("a"), [step("a", "q1", alone=True)],
             submit("q2", "b"), [load("b")],  # 1000 MB expected: fits beside a
             loaded("b"), [],  # took 1500 MB while a runs q1: dropped, and q2 waits (as a busy refusal does)
             cached("a"), [],
             stepped("a", done=["q1"]), [fin("q1"), load("b")],  # a idle: evicted for b's measured 1500 MB
             loaded("b"), [step("b", "q2", alone=True)]),
    scenario("a-prefetch-that-measured-more-is-loaded-again-for-the-request-that-waited",
             {"budget": 2000, "measured": {"b": 1500}, "prefetch": True},
             submit("q1", "a"), [load("a")],
             loaded("a"), [step("a", "q1", alone=True)],
             stepped("a", done=["q1"]), [fin("q1")],
             prefetch("b"), [load("b")],  # fits beside idle a by its 1000 MB estimate
             submit("q2", "b"), [],  # waits for that load
             loaded("b"), [load("b")],  # 1500 MB: a prefetch may not evict, but q2's miss may
             cached(), [],
             loaded("b"), [step("b", "q2", alone=True)],
             cached("b"), []),
    scenario("a-pinned-member-is-never-evicted", {"budget": 2000, "pinned": ("a",)},
             submit("q1", "a"), [load("a")],
             loaded("a"), [step("a", "q1", alone=True)],
             stepped("a", done=["q1"]), [fin("q1")],
             submit("q2", "b"), [load("b")],
             loaded("b"), [step("b", "q2", alone=True)],
             stepped("b", done=["q2"]), [fin("q2")],
             submit("q3", "c"), [load("c")],
             cached("a"), []),  # b went, though a was used longer ago
    scenario("lru-evicts-the-least-recently-used", COST_CONFIG, *COST_EVENTS,
             cached("b"), [],  # a was evicted for c
             loaded("c"), [step("c", "q3", alone=True)],
             stepped("c", done=["q3"]), [fin("q3")],
             submit("q4", "a"), [load("a")]),
    scenario("cost-aware-keeps-the-dear-reload", {**COST_CONFIG, "eviction": "cost-aware"}, *COST_EVENTS,
             cached("a"), [],  # b, cheap to load again, was evicted for c
             loaded("c"), [step("c", "q3", alone=True)],
             stepped("c", done=["q3"]), [fin("q3")],
             submit("q4", "a"), [step("a", "q4", alone=True)]),  # a hit
    scenario("fifo-admits-in-arrival-order", {}, *SJF_EVENTS,
             loaded("a"), [step("a", "q1", alone=True)],
             stepped("a", done=["q1"]), [fin("q1"), step("a", "q2", alone=True)],
             stepped("a", done=["q2"]), [fin("q2"), step("a", "q3", alone=True)]),
    scenario("sjf-admits-the-shortest-with-ageing", {"discipline": "sjf"}, *SJF_EVENTS,
             loaded("a"), [step("a", "q2", alone=True)],  # 3000 + 1000 ms < q1's 5000 + 0
             stepped("a", done=["q2"]), [fin("q2"), step("a", "q1", alone=True)],  # q1 5000 < q3 100 + 4950
             stepped("a", done=["q1"]), [fin("q1"), step("a", "q3", alone=True)]),
    scenario("a-waiting-ticket-times-out-a-running-one-does-not", {},
             submit("q1", "a", timeout_s=5), [load("a")],
             submit("q2", "a", timeout_s=5), [],
             tick(3), [],
             loaded("a"), [step("a", "q1", alone=True)],
             tick(1.5), [],
             expire(), [],
             tick(2.5), [],
             expire(), [fin("q2", "Timeout")],
             stepped("a", done=["q1"]), [fin("q1")],
             is_idle(), []),
    scenario("cancel-ends-a-waiting-ticket-at-once", {},
             submit("q1", "a"), [load("a")],
             submit("q2", "a"), [],
             cancel("q2"), [fin("q2", "ShuttingDown")],
             loaded("a"), [step("a", "q1", alone=True)],
             cancel("q1"), [],  # running: its step ends it (the driver's), the scheduler does not
             stepped("a", done=["q1"]), [fin("q1")],
             is_idle(), []),
    scenario("drain-answers-what-was-taken-and-refuses-new-work", {},
             submit("q1", "a"), [load("a")],
             submit("q2", "a"), [],
             shutdown(True), [],
             submit("q3", "a"), [fin("q3", "ShuttingDown")],
             prefetch("b"), [],
             loaded("a"), [step("a", "q1", alone=True)],
             stepped("a", done=["q1"]), [fin("q1"), step("a", "q2", alone=True)],
             stepped("a", done=["q2"]), [fin("q2")],
             is_idle(), []),
    scenario("shutdown-without-drain-ends-the-waiting-and-lets-the-running-finish", {},
             submit("q1", "a"), [load("a")],
             submit("q2", "a"), [],
             loaded("a"), [step("a", "q1", alone=True)],
             shutdown(False), [fin("q2", "ShuttingDown")],
             stepped("a", done=["q1"]), [fin("q1")],
             is_idle(), []),
    scenario("prefetch-loads-only-what-fits-without-evicting", {"prefetch": True, "budget": 2000},
             prefetch("a"), [load("a")],
             prefetch("a"), [],  # already loading
             loaded("a"), [],
             submit("q1", "a"), [step("a", "q1", alone=True)],  # a hit: no load
             prefetch("b"), [load("b")],
             loaded("b"), [],
             prefetch("c"), [],  # would need an eviction
             stepped("a", done=["q1"]), [fin("q1")],
             cached("a", "b"), []),
    scenario("prefetch-off-by-default", {},
             prefetch("a"), [],
             cached(), []),
    # Questions that come after waiting work do not join the batch before it: the work is not starved.
    # A remote member: each request runs at once on its own, up to `parallel`, outside the CPU's concurrency.
    scenario("a-remote-member-runs-its-requests-side-by-side", {"parallel": {"r": 2}, "concurrency": 1},
             submit("q1", "r"), [load("r")],
             submit("q2", "r"), [], submit("q3", "r"), [],
             loaded("r"), [step("r", "q1", alone=True), step("r", "q2", alone=True)],
             submit("l1", "a"), [load("a")],
             loaded("a"), [step("a", "l1", alone=True)],  # the local member's step is not held up by r's two
             stepped("r", done=["q2"]), [fin("q2"), step("r", "q3", alone=True)],
             stepped("r", failed=["q1"]), [fin("q1", "ModelsFailed")],
             stepped("r", done=["q3"]), [fin("q3")],
             stepped("a", done=["l1"]), [fin("l1")],
             cached("r", "a"), []),
    scenario("questions-behind-waiting-work-do-not-overtake-it", BATCH_A,
             submit("q1", "a"), [load("a")],
             loaded("a"), [step("a", "q1")],
             submit("w2", "a", work=True), [],
             submit("q3", "a"), [],  # would fit the batch, but w2 waits for it to empty
             stepped("a", done=["q1"]), [fin("q1"), step("a", "w2", alone=True)],
             stepped("a", done=["w2"]), [fin("w2"), step("a", "q3")],
             stepped("a", done=["q3"]), [fin("q3")]),
    # Drafts: a member with a draft member answers alone and borrows the draft's session while it is loaded.
    scenario("a-member-with-a-draft-answers-alone-borrowing-the-loaded-draft",
             {"rows": {"a": 4, "d": 4}, "drafts": {"a": "d"}, "concurrency": 2},
             submit("q1", "d"), [load("d")],
             loaded("d"), [step("d", "q1")],
             submit("q2", "a"), [load("a")],
             loaded("a"), [step("a", "q2", alone=True)],  # a batches, but drafting needs it alone
             lent("q2", "d"), [], in_use("d", 2), [],  # q1's lease and the one lent to q2
             submit("q3", "a"), [],  # runs after q2, not beside it
             stepped("d", done=["q1"]), [fin("q1")],
             in_use("d", 1), [],
             stepped("a", done=["q2"]), [fin("q2"), step("a", "q3", alone=True)],
             lent("q3", "d"), [], lent("q2", None), [],
             stepped("a", done=["q3"]), [fin("q3")],
             in_use("d", 0), [], is_idle(), []),
    scenario("a-draft-not-loaded-is-prefetched-and-the-run-goes-without-it",
             {"drafts": {"a": "d"}, "prefetch": True},
             submit("q1", "a"), [load("a")],
             loaded("a"), [load("d"), step("a", "q1", alone=True)],
             lent("q1", None), [],
             loaded("d"), [],
             stepped("a", done=["q1"]), [fin("q1")],
             submit("q2", "a"), [step("a", "q2", alone=True)],
             lent("q2", "d"), [],
             stepped("a", done=["q2"]), [fin("q2")],
             in_use("d", 0), []),
    scenario("a-member-drafting-by-prompt-lookup-answers-alone-and-borrows-nothing",
             {"rows": {"a": 4}, "drafts": {"a": None}},
             submit("q1", "a"), [load("a")],
             submit("q2", "a"), [],
             loaded("a"), [step("a", "q1", alone=True)],
             lent("q1", None), [],
             stepped("a", done=["q1"]), [fin("q1"), step("a", "q2", alone=True)],
             stepped("a", done=["q2"]), [fin("q2")]),
    scenario("a-draft-that-would-need-an-eviction-is-not-loaded",
             {"drafts": {"a": "d"}, "prefetch": True, "sizes": {"a": 1500, "d": 800}, "budget": 2000},
             submit("q1", "a"), [load("a")],
             loaded("a"), [step("a", "q1", alone=True)],
             stepped("a", done=["q1"]), [fin("q1")],
             cached("a"), []),
    scenario("a-verification-waits-for-the-batch-and-runs-alone", BATCH_A,
             submit("q1", "a"), [load("a")],
             loaded("a"), [step("a", "q1")],
             submit("v2", "a", verify=True), [],
             submit("q3", "a"), [],  # would fit the batch, but v2 waits for it to empty
             stepped("a", done=["q1"]), [fin("q1"), step("a", "v2", alone=True)],
             stepped("a", done=["v2"]), [fin("v2"), step("a", "q3")],
             stepped("a", done=["q3"]), [fin("q3")]),
    scenario("a-cancelled-ticket-that-fails-ends-as-cancelled-not-on-the-next-member", {},
             submit("q1", "a", "b"), [load("a")],
             loaded("a"), [step("a", "q1", alone=True)],
             cancel("q1"), [],
             stepped("a", failed=["q1"]), [fin("q1", "ShuttingDown")],
             says("q1", "cancelled")),
    scenario("after-shutdown-without-drain-a-failure-does-not-fall-back", {},
             submit("q1", "a", "b"), [load("a")],
             loaded("a"), [step("a", "q1", alone=True)],
             shutdown(False), [],
             stepped("a", failed=["q1"]), [fin("q1", "ShuttingDown")],
             is_idle(), []),
]


def play_table(config: dict, rows: list) -> Rig:
    """Feed a scenario's events to a fresh Rig, checking after each that it caused exactly its effects."""
    rig = Rig(**config)
    for (kind, args, kw), expected in rows:
        before = len(rig.fx.effects)
        getattr(rig, kind)(*args, **kw)
        assert rig.fx.effects[before:] == expected, f"after {kind}{args}"
    assert rig.fx.effects == [e for _, effects in rows for e in effects]
    return rig


@pytest.mark.parametrize("config,rows", SCENARIOS)
def test_events_give_these_effects_in_this_order(config: dict, rows: list) -> None:
    """The scheduler's rules, one scenario each: checking the effects of every event (not only the final list)
    pins down when each decision is taken, not just that it eventually is."""
    play_table(config, rows)


# ---------------------------------------------------------------- invariants under random interleavings


def check_invariants(rig: Rig) -> None:
    """What must hold after every event, whatever happened before."""
    cache, sched, fx = rig.cache, rig.sched, rig.fx
    state = cache.state()
    reserved = sum(cache._loading.values())  # loads in flight hold their reservation (no public view of it)
    assert state["used_mb"] + reserved <= cache.budget_mb + 1e-6
    assert len(state["loaded"]) + len(state["loading"]) <= cache.max_loaded
    in_use = {m["model"]: m["in_use"] for m in state["loaded"]}
    # A seat exists exactly for each loaded member: none left behind for one the cache evicted.
    assert set(sched.seats) == set(in_use)
    assert set(sched.loading) == set(state["loading"]) == set(fx.pending_loads)
    lent = Counter(t.draft[0] for s in sched.seats.values() for t in s.active
                   if t.draft and t.draft[0] in sched.seats and sched.seats[t.draft[0]].handle is t.draft[1])
    for member, seat in sched.seats.items():
        # One lease per ticket running or joining there, and one per run it drafts for: a member is never
        # evicted under a running request.
        assert in_use[member] == len(seat.active) + len(seat.joining) + lent[member]
        assert seat.active == fx.running.get(member, [])
        assert seat.stepping == (member in fx.pending_steps)
    assert len(fx.pending_steps) <= sched.concurrency
    assert all(n == 1 for n in fx.finished.values())  # finished at most once
    done = {t for t in rig.tickets.values() if fx.names[t] in fx.finished}
    assert not done & set(sched.waiting)
    assert not any(done & {*s.active, *s.joining} for s in sched.seats.values())


@st.composite
def fleets(draw) -> dict:
    members = list("abcd"[:draw(st.integers(3, 4))])
    sizes = {m: draw(st.sampled_from([300, 500, 800, 1200, 2500])) for m in members}
    return {
        "sizes": sizes,
        "measured": {m: sizes[m] * draw(st.sampled_from([1.0, 0.5, 1.5, 2.0])) for m in members},
        "costs": {m: draw(st.sampled_from([100, 1000, 5000])) for m in members},
        "rows": {m: draw(st.sampled_from([None, 1, 2, 4])) for m in members},
        "budget": draw(st.sampled_from([800, 1500, 2500, 4000])),
        "max_loaded": draw(st.integers(1, 4)),
        "eviction": draw(st.sampled_from(["lru", "cost-aware"])),
        "prefetch": draw(st.booleans()),
        "pinned": draw(st.sampled_from([(), (), ("a",)])),
        "concurrency": draw(st.integers(1, 3)),
        "discipline": draw(st.sampled_from(["fifo", "sjf"])),
        "drafts": draw(st.sampled_from([{}, {"c": "a"}, {"b": "a", "c": "a"}, {"a": None}])),
    }


# Each op is (what, which, how): `what` picks the kind of event, `which` and `how` pick among what is possible
# now, so any list of ops is a valid run and shrinks well.
OPS = st.lists(st.tuples(st.integers(0, 9), st.integers(0, 2**16), st.integers(0, 2**16)),
               min_size=20, max_size=80)


def play(config: dict, ops: list[tuple[int, int, int]]) -> Rig:
    """Apply `ops`, checking the invariants after each event; then complete everything in flight, drain and
    complete again."""
    rig = Rig(**config)
    members = sorted(config["sizes"])
    fx = rig.fx
    for what, which, how in ops:
        if what <= 2:
            order = random.Random(which).sample(members, min(len(members), 1 + how % 3))
            rig.submit(f"t{len(rig.tickets)}", *order, work=how % 5 == 0, verify=how % 5 == 1,
                       predicted_ms=which % 50 * 100,
                       timeout_s=5.0 if how % 7 == 0 else None)
        elif what <= 5 and fx.pending_loads:
            member = fx.pending_loads[which % len(fx.pending_loads)]
            if how % 10 == 0:
                rig.load_failed(member)
            else:  # each load measures anew, often more than the cache expected: it may have to evict more
                rig.loaded(member, config["sizes"][member] * [1.0, 0.5, 1.5, 2.0][how // 10 % 4])
        elif what <= 8 and fx.pending_steps:
            member = sorted(fx.pending_steps)[which % len(fx.pending_steps)]
            if how % 23 == 0:
                rig.stepped(member, error=True)
            else:
                done, failed = [], []
                for i, ticket in enumerate(fx.running[member]):
                    fate = (how >> (3 * i)) % 8  # 0-2: decodes on, 3-6: answered, 7: failed on this member
                    if fate < 3 and fx.pending_steps[member]:
                        fate = 3  # a job that runs alone ends with its step
                    (failed if fate == 7 else done if fate >= 3 else []).append(fx.names[ticket])
                rig.stepped(member, done=tuple(done), failed=tuple(failed))
        elif what == 9 and how % 4 == 0 and rig.tickets:
            rig.cancel(sorted(rig.tickets)[which % len(rig.tickets)])
        elif what == 9 and how % 4 == 1:
            try:
                rig.set_budget([500, 1000, 2000, 3000, 5000][which % 5])
            except CacheError:
                pass  # what must stay does not fit the new budget: nothing changed
        elif what == 9 and how % 4 == 2:
            rig.prefetch(members[which % len(members)])
        elif what == 9:
            rig.tick(which % 4)
            rig.expire()
        check_invariants(rig)

    closed = False
    for _ in range(10_000):
        if fx.pending_loads:
            rig.loaded(fx.pending_loads[0])
        elif fx.pending_steps:
            member = sorted(fx.pending_steps)[0]
            rig.stepped(member, done=tuple(fx.names[t] for t in fx.running[member]))
        elif not closed:
            rig.shutdown(True)
            closed = True
        else:
            break
        check_invariants(rig)
    else:
        pytest.fail("the scheduler never settled: a livelock")
    return rig


SETTINGS = hsettings(max_examples=200, deadline=None, derandomize=True, database=None)


@SETTINGS
@given(config=fleets(), ops=OPS)
def test_invariants_under_random_interleavings(config: dict, ops: list) -> None:
    """Budget, count and lease invariants hold after every event, and once everything in flight completes and
    the scheduler drains, every ticket ever submitted has been answered exactly once."""
    rig = play(config, ops)
    assert set(rig.fx.finished) == set(rig.tickets)
    assert all(n == 1 for n in rig.fx.finished.values())
    assert all(t.outcome is not None for t in rig.tickets.values())
    assert rig.sched.idle and not rig.sched.waiting


# ---------------------------------------------------------------- determinism


@hsettings(SETTINGS, max_examples=50)
@given(config=fleets(), ops=OPS)
def test_the_same_events_give_the_same_effects(config: dict, ops: list) -> None:
    """Scheduling depends only on the events (and the clock), never on hashing or identity: a replay of a run
    decides the same, so a recorded trace reproduces a bug."""
    assert play(config, ops).fx.effects == play(config, ops).fx.effects
