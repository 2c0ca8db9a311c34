"""Execute: which model sessions stay loaded, and in what order waiting requests run.

Split as in llama-swap: the eviction policy is a pure function from (wanted model, loaded models) to the
names to evict (`plan_evictions`, `plan_fit`), so it can be called speculatively and tested as a table;
`ModelCache` is the machinery that loads, measures, drops and logs. `RequestQueue` orders waiting requests
FIFO or shortest-predicted-job-first with ageing. Pure Python: the caller passes the loader, so tests run
synchronously and deterministically; real sessions are wired by the caller.
"""

from __future__ import annotations

import gc
import heapq
import itertools
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, NamedTuple, TypeVar

EVICTION_POLICIES = ("lru", "cost-aware")
EPS_MB = 1e-6  # float slack so sums of sizes that fit exactly are not read as a breach
EXACT_LIMIT = 12  # cost-aware searches every subset of up to this many evictable models (2**12 sets)
AGEING = 1.0  # SJF: ms of priority a waiting job gains per ms it waits (see RequestQueue)


# ---------------------------------------------------------------- the pure eviction policy


@dataclass(frozen=True)
class Candidate:
    """A model that should be loaded: its name and the memory it is expected to take."""

    name: str
    memory_mb: float


@dataclass(frozen=True)
class Loaded:
    """A loaded model as the policy sees it: `last_used` is a monotonically increasing tick and `load_ms`
    what loading it again would cost."""

    name: str
    memory_mb: float
    last_used: int
    load_ms: float


@dataclass(frozen=True)
class Eviction:
    """The names to evict, in order; or, when `refused` is set, why the wanted model cannot fit at all:
    'exceeds-budget' (bigger than the whole budget) or 'pinned-full' (the pinned models leave no room)."""

    evict: tuple[str, ...] = ()
    refused: Literal["", "exceeds-budget", "pinned-full"] = ""
    detail: str = ""

    @property
    def fits(self) -> bool:
        return not self.refused


def plan_evictions(wanted: Candidate, loaded: Sequence[Loaded], budget_mb: float, max_loaded: int,
                   policy: str, pinned: frozenset[str], demand: Mapping[str, float]) -> Eviction:
    """What to evict so that `wanted` fits both the memory budget and the count limit. Neither logs nor
    mutates. `demand[name]` is the expected number of near-future requests for a model (missing: 0)."""
    _check_policy(policy)
    if any(m.name == wanted.name for m in loaded):
        return Eviction()
    if wanted.memory_mb > budget_mb + EPS_MB:
        return Eviction(refused="exceeds-budget",
                        detail=f"{wanted.name} needs {wanted.memory_mb:.0f} MB, more than the whole cache budget "
                               f"of {budget_mb:.0f} MB")
    return _plan(loaded, wanted.memory_mb, 1, budget_mb, max_loaded, policy, pinned, demand, wanted.name)


def plan_fit(loaded: Sequence[Loaded], budget_mb: float, max_loaded: int, policy: str, pinned: frozenset[str],
             demand: Mapping[str, float]) -> Eviction:
    """What to evict so that the models already loaded fit a (new, smaller) budget and count limit."""
    _check_policy(policy)
    return _plan(loaded, 0.0, 0, budget_mb, max_loaded, policy, pinned, demand, "the loaded models")


def _check_policy(policy: str) -> None:
    if policy not in EVICTION_POLICIES:
        raise ValueError(f"eviction policy {policy!r} is not one of {', '.join(EVICTION_POLICIES)}")


def _plan(loaded: Sequence[Loaded], extra_mb: float, extra_models: int, budget_mb: float, max_loaded: int,
          policy: str, pinned: frozenset[str], demand: Mapping[str, float], what: str) -> Eviction:
    """Make room for `extra_models` more models of `extra_mb` in all; pinned models never go."""
    evictable = [m for m in loaded if m.name not in pinned]
    free_mb = sum(m.memory_mb for m in loaded) + extra_mb - budget_mb
    free_slots = len(loaded) + extra_models - max_loaded
    chosen = _select(evictable, free_mb, free_slots, policy, demand)
    if chosen is None:
        held = [m for m in loaded if m.name in pinned]
        return Eviction(refused="pinned-full",
                        detail=f"the pinned models ({', '.join(m.name for m in held)}) hold "
                               f"{sum(m.memory_mb for m in held):.0f} MB in {len(held)} slot(s) of a "
                               f"{budget_mb:.0f} MB, {max_loaded}-slot cache: no room for {what}")
    return Eviction(evict=chosen)


def _select(evictable: list[Loaded], free_mb: float, free_slots: int, policy: str,
            demand: Mapping[str, float]) -> tuple[str, ...] | None:
    """The names to evict to free `free_mb` MB and `free_slots` slots; None when evicting all is not enough."""

    def enough(group: Sequence[Loaded]) -> bool:
        return len(group) >= free_slots and sum(m.memory_mb for m in group) >= free_mb - EPS_MB

    if not enough(evictable):
        return None
    if enough(()):
        return ()
    if policy == "lru":
        chosen: list[Loaded] = []
        for m in sorted(evictable, key=lambda m: (m.last_used, m.name)):
            chosen.append(m)
            if enough(chosen):
                break
        return tuple(m.name for m in chosen)

    def cost(m: Loaded) -> float:
        return demand.get(m.name, 0.0) * m.load_ms

    if len(evictable) <= EXACT_LIMIT:
        best: tuple[tuple[float, int, tuple[int, ...]], tuple[Loaded, ...]] | None = None
        for k in range(max(free_slots, 1), len(evictable) + 1):
            for group in itertools.combinations(evictable, k):
                if not enough(group):
                    continue
                key = (round(sum(cost(m) for m in group), 6), k, tuple(sorted(m.last_used for m in group)))
                if best is None or key < best[0]:
                    best = (key, group)
        assert best is not None  # enough(evictable) holds
        chosen = list(best[1])
    else:
        # Too many to search: cheapest per MB freed (per slot when only the count binds), then drop any
        # the rest make redundant, costliest first.
        per_mb = free_mb > EPS_MB
        chosen = []
        for m in sorted(evictable, key=lambda m: (cost(m) / max(m.memory_mb, EPS_MB) if per_mb else cost(m),
                                                  m.last_used)):
            chosen.append(m)
            if enough(chosen):
                break
        for m in sorted(chosen, key=cost, reverse=True):
            rest = [c for c in chosen if c is not m]
            if enough(rest):
                chosen = rest
    return tuple(m.name for m in sorted(chosen, key=lambda m: (cost(m), m.last_used)))


class DecayedDemand:
    """Expected near-future requests per model from recent history: request counts decayed exponentially
    per request. With half-life H requests, a model that gets a share p of the traffic scores about
    p * H / ln 2, its expected requests over the next H / ln 2 requests. Call it from one thread."""

    def __init__(self, half_life: float = 32.0):
        self._decay = 0.5 ** (1.0 / half_life)
        self._tick = 0
        self._counts: dict[str, tuple[float, int]] = {}

    def observe(self, name: str) -> None:
        self._tick += 1
        value, at = self._counts.get(name, (0.0, self._tick))
        self._counts[name] = (value * self._decay ** (self._tick - at) + 1.0, self._tick)

    def __call__(self) -> dict[str, float]:
        return {n: v * self._decay ** (self._tick - at) for n, (v, at) in self._counts.items()}


# ---------------------------------------------------------------- the cache machinery


class CacheError(RuntimeError):
    """A model cannot be held within the budget: too big alone, or the pinned models leave no room."""


@dataclass(frozen=True)
class CacheEvent:
    """One committed load or eviction, for the log."""

    kind: Literal["load", "evict"]
    model: str
    memory_mb: float
    reason: str


class Acquired(NamedTuple):
    """What acquire() gives: the session, whether it was already loaded, the measured load time (0 on a
    hit) and the names evicted to make room, for the request's record."""

    session: object
    hit: bool
    load_ms: float
    evicted: list[str]


@dataclass
class _Entry:
    session: object
    memory_mb: float
    last_used: int


class ModelCache:
    """The loaded sessions, held within the policy's `cache` budget (MB) and `max_loaded` count.

    Invariant: after every public call, the measured memory of the loaded models sums to at most the budget
    and at most `max_loaded` are loaded, or the call raised CacheError and nothing is half-loaded. Sessions
    are evicted before a load (onnxruntime frees memory only when a session is destroyed, so references are
    dropped and gc run first); a load whose measured memory exceeds its estimate evicts further, never the
    model just loaded. Measured memory replaces the caller's estimate for later plans, so estimates that run
    high cost only the first load. Thread-safe (one lock; loads are serialised)."""

    def __init__(self, cache: Mapping[str, Any], *, load: Callable[[str], object],
                 memory_of: Callable[[str, object], float], estimate_mb: Callable[[str], float],
                 load_cost_ms: Callable[[str], float], demand: Callable[[], Mapping[str, float]],
                 log: Callable[[CacheEvent], None] = lambda event: None):
        _check_policy(cache["eviction"])
        self.budget_mb = float(cache["budget_mb"])
        self.max_loaded = int(cache["max_loaded"])
        self.eviction: str = cache["eviction"]
        self.pinned: set[str] = set(cache.get("pinned", ()))
        self.prefetch_enabled = bool(cache.get("prefetch", False))  # opt-in: it spends memory on a guess
        self._load, self._memory_of, self._estimate_mb = load, memory_of, estimate_mb
        self._load_cost_ms, self._demand, self._log = load_cost_ms, demand, log
        self._loaded: dict[str, _Entry] = {}
        self._measured: dict[str, float] = {}
        self._tick = 0
        self._lock = threading.RLock()
        self.hits = self.misses = self.loads = self.evictions = 0

    def acquire(self, name: str) -> Acquired:
        """The session for `name`, loading it (after evicting per the policy) on a miss."""
        with self._lock:
            self._tick += 1
            entry = self._loaded.get(name)
            if entry is not None:
                entry.last_used = self._tick
                self.hits += 1
                return Acquired(entry.session, True, 0.0, [])
            self.misses += 1
            evicted = self._make_room(Candidate(name, self._estimate(name)), f"to load {name}")
            started = time.perf_counter()
            session = self._load(name)
            load_ms = (time.perf_counter() - started) * 1000
            memory = float(self._memory_of(name, session))
            self._measured[name] = memory
            try:
                evicted += self._make_room(Candidate(name, memory),
                                           f"to load {name}, which took {memory:.0f} MB, more than estimated")
            except CacheError:
                session = None  # drop the only reference so the memory is freed before the error propagates
                gc.collect()
                raise
            self._commit(name, session, memory, "miss")
            return Acquired(session, False, load_ms, evicted)

    def prefetch(self, name: str) -> bool:
        """Load `name` ahead of a predicted request, only if the policy allows prefetch and it fits without
        evicting anything (judged by the estimate, then by the measured memory). True when it loaded."""
        with self._lock:
            if not self.prefetch_enabled or name in self._loaded or len(self._loaded) >= self.max_loaded:
                return False
            if self._used_mb() + self._estimate(name) > self.budget_mb + EPS_MB:
                return False
            session = self._load(name)
            memory = float(self._memory_of(name, session))
            self._measured[name] = memory
            if self._used_mb() + memory > self.budget_mb + EPS_MB:
                del session
                gc.collect()
                return False
            self._tick += 1
            self._commit(name, session, memory, "prefetch")
            return True

    def set_budget(self, budget_mb: float) -> list[str]:
        """Change the memory budget, evicting at once (policy order, never pinned) to fit; returns the
        evicted names. Raises CacheError, changing nothing, when the pinned models alone exceed it."""
        if budget_mb <= 0:
            raise ValueError(f"cache budget must be positive, not {budget_mb}")
        with self._lock:
            plan = plan_fit(self._snapshot(), budget_mb, self.max_loaded, self.eviction, frozenset(self.pinned),
                            self._demand())
            if not plan.fits:
                raise CacheError(plan.detail)
            self.budget_mb = float(budget_mb)
            self._evict(plan.evict, f"budget cut to {budget_mb:.0f} MB")
            return list(plan.evict)

    def pin(self, name: str) -> None:
        """Never evict `name` while it is loaded (it is not loaded by pinning)."""
        with self._lock:
            self.pinned.add(name)

    def unpin(self, name: str) -> None:
        with self._lock:
            self.pinned.discard(name)

    def state(self) -> dict[str, Any]:
        """A JSON-ready snapshot: loaded models (most recent first), budget, and counters."""
        with self._lock:
            return {
                "budget_mb": self.budget_mb,
                "used_mb": self._used_mb(),
                "max_loaded": self.max_loaded,
                "eviction": self.eviction,
                "pinned": sorted(self.pinned),
                "loaded": [{"model": n, "memory_mb": e.memory_mb, "last_used": e.last_used, "pinned": n in self.pinned}
                           for n, e in sorted(self._loaded.items(), key=lambda kv: -kv[1].last_used)],
                "hits": self.hits,
                "misses": self.misses,
                "loads": self.loads,
                "evictions": self.evictions,
            }

    def _estimate(self, name: str) -> float:
        return self._measured[name] if name in self._measured else float(self._estimate_mb(name))

    def _used_mb(self) -> float:
        return sum(e.memory_mb for e in self._loaded.values())

    def _snapshot(self) -> list[Loaded]:
        return [Loaded(n, e.memory_mb, e.last_used, float(self._load_cost_ms(n))) for n, e in self._loaded.items()]

    def _make_room(self, wanted: Candidate, reason: str) -> list[str]:
        plan = plan_evictions(wanted, self._snapshot(), self.budget_mb, self.max_loaded, self.eviction,
                              frozenset(self.pinned), self._demand())
        if not plan.fits:
            raise CacheError(plan.detail)
        self._evict(plan.evict, reason)
        return list(plan.evict)

    def _evict(self, names: Sequence[str], reason: str) -> None:
        for name in names:
            memory = self._loaded.pop(name).memory_mb  # the session's last reference goes here
            self.evictions += 1
            self._log(CacheEvent("evict", name, memory, reason))
        if names:
            gc.collect()

    def _commit(self, name: str, session: object, memory: float, reason: str) -> None:
        self._loaded[name] = _Entry(session, memory, self._tick)
        self.loads += 1
        self._log(CacheEvent("load", name, memory, reason))


# ---------------------------------------------------------------- the request queue

T = TypeVar("T")


class QueueFull(Exception):
    """More requests are waiting than the policy's `queue.max_waiting` allows."""


class QueueClosed(Exception):
    """The queue is closed: no more puts, and get() has nothing left to return."""


class RequestQueue(Generic[T]):
    """Waiting requests for single worker threads (on 2 cores one model runs at a time).

    'fifo' serves in arrival order. 'sjf' serves the smallest effective priority
    predicted_ms - ageing * waited_ms. With ageing = 1 (AGEING) a waiting job gains one ms of priority per
    ms it waits, so it is passed by a later arrival only while it has waited less than the difference of
    their predicted times: no job waits longer than its own predicted run time (plus the job in service)
    because of jobs that came after it. ageing = 0 is pure SJF, which can starve long jobs. As every waiting
    job ages at the same rate, the order is fixed at put time: the heap key is predicted_ms + ageing * arrival.
    close() lets get() drain what is left and then raise QueueClosed, so a consumer loop ends cleanly."""

    def __init__(self, discipline: str = "fifo", max_waiting: int = 512, ageing: float = AGEING,
                 clock: Callable[[], float] = time.monotonic):
        if discipline not in ("fifo", "sjf"):
            raise ValueError(f"queue discipline {discipline!r} is not one of fifo, sjf")
        self.discipline, self.max_waiting, self.ageing = discipline, max_waiting, ageing
        self._clock = clock
        self._heap: list[tuple[float, int, T]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._closed = False

    def put(self, item: T, predicted_ms: float = 0.0) -> None:
        with self._cond:
            if self._closed:
                raise QueueClosed("the request queue is closed")
            if len(self._heap) >= self.max_waiting:
                raise QueueFull(f"{len(self._heap)} requests are already waiting (queue.max_waiting)")
            seq = next(self._seq)
            key = float(seq) if self.discipline == "fifo" else predicted_ms + self.ageing * self._clock() * 1000
            heapq.heappush(self._heap, (key, seq, item))
            self._cond.notify()

    def get(self) -> T:
        """The next request, blocking while none waits; QueueClosed once closed and drained."""
        with self._cond:
            while not self._heap:
                if self._closed:
                    raise QueueClosed("the request queue is closed")
                self._cond.wait()
            return heapq.heappop(self._heap)[2]

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def __len__(self) -> int:
        with self._cond:
            return len(self._heap)

    def __iter__(self) -> Iterator[T]:
        """Requests until the queue is closed and drained: `for request in queue: ...`."""
        while True:
            try:
                yield self.get()
            except QueueClosed:
                return
