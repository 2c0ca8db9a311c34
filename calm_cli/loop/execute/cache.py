"""Execute's member cache: which members stay loaded, within the policy's memory budget and model count.

The choice of what to evict is the pure `eviction.plan_evictions`; this module is the machinery around it: it
hands out leases on loaded members (a member under a lease runs a request and is never evicted), loads a
member outside its lock (other requests go on meanwhile; a second request for the same member waits for that
load instead of starting its own), measures what a load really took, and logs one line per committed load or
eviction. Memory a load is expected to take is reserved before the load starts, so loaded plus loading stays
within the budget at every instant.
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from calm_cli.errors import MemberFailure
from calm_cli.loop.execute.eviction import EPS_MB, Loaded, Wanted, check_policy, plan_evictions, plan_fit


class CacheError(MemberFailure):
    """A member cannot be held within the budget now: too big alone, the pinned members leave no room, or the
    members running requests hold it (`busy`: it may fit once they finish)."""

    def __init__(self, message: str, busy: bool = False):
        super().__init__(message)
        self.busy = busy


@dataclass(frozen=True)
class CacheEvent:
    """One committed load or eviction, for the log."""

    kind: Literal["load", "evict"]
    model: str
    memory_mb: float
    reason: str


class Lease(NamedTuple):
    """A loaded member's session for one request: whether it was loaded already, the measured load time (0 on
    a hit) and the names evicted to make room, for the request's record."""

    session: object
    hit: bool
    load_ms: float
    evicted: list[str]


class DecayedDemand:
    """Expected near-future requests per member from recent history: request counts decayed exponentially
    per request. With half-life H requests, a member that gets a share p of the traffic scores about
    p * H / ln 2, its expected requests over the next H / ln 2 requests. Not thread-safe: the cache calls it
    under its lock."""

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


@dataclass
class _Entry:
    session: object
    memory_mb: float
    last_used: int
    leases: int = 0


class MemberCache:
    """The loaded members' sessions, within the policy's `cache` budget (MB) and `max_loaded` count.

    Invariant, at every instant: the measured memory of the loaded members plus the reservations of loads in
    flight sums to at most the budget, at most `max_loaded` are loaded or loading, and no member under a lease
    is evicted. A load whose measured memory exceeds its estimate evicts further (never the member just loaded),
    or is dropped again with CacheError when that is impossible. Measured memory replaces the estimate for
    later plans. Thread-safe."""

    def __init__(self, cache: Mapping[str, Any], *, load: Callable[[str], object],
                 memory_of: Callable[[str, object], float], estimate_mb: Callable[[str], float],
                 load_cost_ms: Callable[[str], float], log: Callable[[CacheEvent], None] = lambda event: None):
        check_policy(cache["eviction"])
        self.budget_mb = float(cache["budget_mb"])
        self.max_loaded = int(cache["max_loaded"])
        self.eviction: str = cache["eviction"]
        self.pinned: set[str] = set(cache.get("pinned", ()))
        self.prefetch_enabled = bool(cache.get("prefetch", False))  # opt-in: it spends memory on a guess
        self.demand = DecayedDemand()
        self._load, self._memory_of, self._estimate_mb = load, memory_of, estimate_mb
        self._load_cost_ms, self._log = load_cost_ms, log
        self._loaded: dict[str, _Entry] = {}
        self._loading: dict[str, float] = {}  # name -> MB reserved while its load runs
        self._measured: dict[str, float] = {}
        self._tick = 0
        self._cond = threading.Condition(threading.RLock())
        self.hits = self.misses = self.loads = self.evictions = 0

    @contextmanager
    def lease(self, name: str) -> Iterator[Lease]:
        """The member's session for the length of the block, loading it first on a miss (after evicting idle
        members per the policy); it cannot be evicted before the block ends."""
        lease = self._take(name)
        try:
            yield lease
        finally:
            with self._cond:
                self._loaded[name].leases -= 1
                self._cond.notify_all()

    def _take(self, name: str) -> Lease:
        with self._cond:
            self._tick += 1
            self.demand.observe(name)
            while name in self._loading:  # another request loads it: share that load
                self._cond.wait()
            entry = self._loaded.get(name)
            if entry is not None:
                entry.last_used, entry.leases = self._tick, entry.leases + 1
                self.hits += 1
                return Lease(entry.session, True, 0.0, [])
            self.misses += 1
            estimate = self._estimate(name)
            evicted = self._make_room(Wanted(name, estimate), f"to load {name}")
            self._loading[name] = estimate
        try:
            started = time.perf_counter()
            session = self._load(name)
            load_ms = (time.perf_counter() - started) * 1000
            memory = float(self._memory_of(name, session))
        except BaseException:
            with self._cond:
                del self._loading[name]
                self._cond.notify_all()
            raise
        with self._cond:
            del self._loading[name]
            self._measured[name] = memory
            try:
                evicted += self._make_room(Wanted(name, memory),
                                           f"to load {name}, which took {memory:.0f} MB, more than estimated")
            except CacheError:
                self._cond.notify_all()
                session = None  # drop the only reference so the memory is freed before the error propagates
                gc.collect()
                raise
            self._commit(name, session, memory, "miss", leases=1)
            self._cond.notify_all()
            return Lease(session, False, load_ms, evicted)

    def prefetch(self, name: str) -> bool:
        """Load `name` ahead of a predicted request, only if the policy allows prefetch and it fits without
        evicting anything (judged by the estimate, then by the measured memory). True when it loaded."""
        with self._cond:
            if not self.prefetch_enabled or name in self._loaded or name in self._loading \
                    or len(self._loaded) + len(self._loading) >= self.max_loaded:
                return False
            if self._held_mb() + self._estimate(name) > self.budget_mb + EPS_MB:
                return False
            session = self._load(name)
            memory = float(self._memory_of(name, session))
            self._measured[name] = memory
            if self._held_mb() + memory > self.budget_mb + EPS_MB:
                del session
                gc.collect()
                return False
            self._tick += 1
            self._commit(name, session, memory, "prefetch")
            return True

    def set_budget(self, budget_mb: float) -> list[str]:
        """Change the memory budget, evicting at once (policy order, never pinned or in use) to fit; returns the
        evicted names. Raises CacheError, changing nothing, when what must stay exceeds it."""
        if budget_mb <= 0:
            raise ValueError(f"cache budget must be positive, not {budget_mb}")
        with self._cond:
            plan = plan_fit(self._snapshot(), budget_mb, self.max_loaded, self.eviction, frozenset(self.pinned),
                            self.demand(), self._in_use())
            if not plan.fits:
                raise CacheError(plan.detail, busy=plan.refused == "busy")
            self.budget_mb = float(budget_mb)
            self._evict(plan.evict, f"budget cut to {budget_mb:.0f} MB")
            return list(plan.evict)

    def pin(self, name: str) -> None:
        """Never evict `name` while it is loaded (it is not loaded by pinning)."""
        with self._cond:
            self.pinned.add(name)

    def unpin(self, name: str) -> None:
        with self._cond:
            self.pinned.discard(name)

    def loaded(self, name: str) -> bool:
        with self._cond:
            return name in self._loaded

    def state(self) -> dict[str, Any]:
        """A JSON-ready snapshot: loaded members (most recent first), budget, and counters."""
        with self._cond:
            return {
                "budget_mb": self.budget_mb,
                "used_mb": self._used_mb(),
                "max_loaded": self.max_loaded,
                "eviction": self.eviction,
                "pinned": sorted(self.pinned),
                "loaded": [{"model": n, "memory_mb": e.memory_mb, "last_used": e.last_used, "pinned": n in self.pinned,
                            "in_use": e.leases}
                           for n, e in sorted(self._loaded.items(), key=lambda kv: -kv[1].last_used)],
                "loading": sorted(self._loading),
                "hits": self.hits,
                "misses": self.misses,
                "loads": self.loads,
                "evictions": self.evictions,
            }

    def _estimate(self, name: str) -> float:
        return self._measured[name] if name in self._measured else float(self._estimate_mb(name))

    def _used_mb(self) -> float:
        return sum(e.memory_mb for e in self._loaded.values())

    def _held_mb(self) -> float:
        return self._used_mb() + sum(self._loading.values())

    def _in_use(self) -> frozenset[str]:
        return frozenset({n for n, e in self._loaded.items() if e.leases} | set(self._loading))

    def _snapshot(self) -> list[Loaded]:
        """What the eviction policy sees: loaded members, and loads in flight holding their reservation."""
        return [*(Loaded(n, e.memory_mb, e.last_used, float(self._load_cost_ms(n))) for n, e in self._loaded.items()),
                *(Loaded(n, mb, self._tick, float(self._load_cost_ms(n))) for n, mb in self._loading.items())]

    def _make_room(self, wanted: Wanted, reason: str) -> list[str]:
        plan = plan_evictions(wanted, self._snapshot(), self.budget_mb, self.max_loaded, self.eviction,
                              frozenset(self.pinned), self.demand(), self._in_use() - {wanted.name})
        if not plan.fits:
            raise CacheError(plan.detail, busy=plan.refused == "busy")
        self._evict(plan.evict, reason)
        return list(plan.evict)

    def _evict(self, names: tuple[str, ...] | list[str], reason: str) -> None:
        for name in names:
            memory = self._loaded.pop(name).memory_mb  # the session's last reference goes here
            self.evictions += 1
            self._log(CacheEvent("evict", name, memory, reason))
        if names:
            gc.collect()

    def _commit(self, name: str, session: object, memory: float, reason: str, leases: int = 0) -> None:
        self._loaded[name] = _Entry(session, memory, self._tick, leases)
        self.loads += 1
        self._log(CacheEvent("load", name, memory, reason))
