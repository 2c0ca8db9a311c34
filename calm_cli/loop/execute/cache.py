"""Execute's member cache: which members stay loaded, within the policy's memory budget and model count.

The choice of what to evict is the pure `eviction.plan_evictions`; this module is the bookkeeping around it:
leases on loaded members (a member under a lease runs a request and is never evicted), loads in flight with the
memory they are expected to take reserved before they start (so loaded plus loading stays within the budget at
every instant), what each load measured, the counters, and one log line per committed load or eviction. Its
transitions never block or load anything: the scheduler (scheduler.py) calls them from its loop and loads on
its workers.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable, Mapping
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

    def __init__(self, cache: Mapping[str, Any], *, memory_of: Callable[[str, object], float], estimate_mb: Callable[[str], float],
                 load_cost_ms: Callable[[str], float], log: Callable[[CacheEvent], None] = lambda event: None,
                 roomless: frozenset[str] = frozenset()):
        check_policy(cache["eviction"])
        self.budget_mb = float(cache["budget_mb"])
        self.max_loaded = int(cache["max_loaded"])
        self.eviction: str = cache["eviction"]
        self.pinned: set[str] = set(cache.get("pinned", ()))
        self.prefetch_enabled = bool(cache.get("prefetch", False))  # opt-in: it spends memory on a guess
        self.demand = DecayedDemand()
        self.roomless = roomless  # remote members: held (a client) but taking neither memory nor a slot here
        self._memory_of, self._estimate_mb = memory_of, estimate_mb
        self._load_cost_ms, self._log = load_cost_ms, log
        self._loaded: dict[str, _Entry] = {}
        self._loading: dict[str, float] = {}  # name -> MB reserved while its load runs
        self._why: dict[str, Literal["miss", "prefetch"]] = {}  # name -> why it is loading
        self._measured: dict[str, float] = {}
        self._tick = 0
        self._lock = threading.RLock()
        self.hits = self.misses = self.loads = self.evictions = 0

    def want(self, name: str) -> None:
        """A request wants `name`: counted in the demand that cost-aware eviction weighs."""
        with self._lock:
            self.demand.observe(name)

    def hold(self, name: str, hit: bool = True) -> Lease | None:
        """A lease on `name` if it is loaded (it cannot be evicted until released), else None. `hit`: a request
        found it loaded (counted in the hit rate); not when it is lent to another member's run as a draft."""
        with self._lock:
            entry = self._loaded.get(name)
            if entry is None:
                return None
            self._tick += 1
            entry.last_used, entry.leases = self._tick, entry.leases + 1
            self.hits += hit
            return Lease(entry.session, True, 0.0, [])

    def loading(self, name: str) -> bool:
        with self._lock:
            return name in self._loading

    def begin_load(self, name: str, why: Literal["miss", "prefetch"] = "miss") -> list[str]:
        """Make room for `name` (evicting idle members per the policy) and reserve its expected memory while it
        loads: a miss, or a prefetch. Returns the names evicted; CacheError when it cannot fit now (`busy`) or
        at all."""
        with self._lock:
            self._tick += 1
            self.misses += why == "miss"
            estimate = self._estimate(name)
            evicted = self._make_room(Wanted(name, estimate), f"to load {name}")
            self._loading[name], self._why[name] = estimate, why
            return evicted

    def end_load(self, name: str, session: object, load_ms: float, evicted: list[str]) -> Lease:
        """Commit a finished load with one lease on it, evicting further if it measured more than expected; when
        even that cannot make room, the session is dropped and CacheError raised. `evicted` is what its
        begin_load evicted, for the lease's record."""
        memory = float(self._memory_of(name, session))
        with self._lock:
            del self._loading[name]
            why = self._why.pop(name)
            self._measured[name] = memory
            try:
                evicted = evicted + self._make_room(
                    Wanted(name, memory), f"to load {name}, which took {memory:.0f} MB, more than estimated",
                    may_evict=why == "miss")  # a prefetch is a guess: it never evicts
            except CacheError:
                session = None  # drop the only reference so the memory is freed before the error propagates
                gc.collect()
                raise
            self._commit(name, session, memory, why, leases=1)
            return Lease(session, False, load_ms, evicted)

    def abort_load(self, name: str) -> None:
        """A load that failed: its reservation is freed."""
        with self._lock:
            del self._loading[name]
            self._why.pop(name)

    def release(self, name: str) -> None:
        """A lease ends: the member may be evicted again once no other holds it."""
        with self._lock:
            self._loaded[name].leases -= 1

    def prefetchable(self, name: str) -> bool:
        """Whether to load `name` ahead of a predicted request: the policy allows prefetch and it fits, by its
        estimate, without evicting anything."""
        with self._lock:
            return (self.prefetch_enabled and name not in self._loaded and name not in self._loading
                    and (name in self.roomless
                         or len(set(self._loaded) - self.roomless) + len(set(self._loading) - self.roomless)
                         < self.max_loaded)
                    and self._held_mb() + self._estimate(name) <= self.budget_mb + EPS_MB)

    def evict(self, name: str, reason: str) -> None:
        """Drop an idle member now (one that failed, so the next request loads it afresh)."""
        with self._lock:
            if name in self._loaded:
                self._evict([name], reason)

    def clear(self) -> None:
        """Drop every session (calm is stopping): not evictions, so the counters stay as the policy left them."""
        with self._lock:
            self._loaded.clear()
            gc.collect()

    def set_budget(self, budget_mb: float) -> list[str]:
        """Change the memory budget, evicting at once (policy order, never pinned or in use) to fit; returns the
        evicted names. Raises CacheError, changing nothing, when what must stay exceeds it."""
        if budget_mb <= 0:
            raise ValueError(f"cache budget must be positive, not {budget_mb}")
        with self._lock:
            plan = plan_fit(self._snapshot(), budget_mb, self.max_loaded, self.eviction, frozenset(self.pinned),
                            self.demand(), self._in_use())
            if not plan.fits:
                raise CacheError(plan.detail, busy=plan.refused == "busy")
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

    def loaded(self, name: str) -> bool:
        with self._lock:
            return name in self._loaded

    def state(self) -> dict[str, Any]:
        """A JSON-ready snapshot: loaded members (most recent first), budget, and counters."""
        with self._lock:
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
        return [*(Loaded(n, e.memory_mb, e.last_used, float(self._load_cost_ms(n))) for n, e in self._loaded.items()
                  if n not in self.roomless),
                *(Loaded(n, mb, self._tick, float(self._load_cost_ms(n))) for n, mb in self._loading.items()
                  if n not in self.roomless)]

    def _make_room(self, wanted: Wanted, reason: str, may_evict: bool = True) -> list[str]:
        if wanted.name in self.roomless:
            return []
        plan = plan_evictions(wanted, self._snapshot(), self.budget_mb, self.max_loaded, self.eviction,
                              frozenset(self.pinned), self.demand(), self._in_use() - {wanted.name})
        if not plan.fits:
            raise CacheError(plan.detail, busy=plan.refused == "busy")
        if plan.evict and not may_evict:
            raise CacheError(f"{wanted.name} took {wanted.memory_mb:.0f} MB: it does not fit without evicting")
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
