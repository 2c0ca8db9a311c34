"""Execute's eviction policy, as in llama-swap's Swapper: a pure function from (wanted member, loaded members) to
the names to evict (`plan_evictions`, `plan_fit`). It neither logs nor mutates, so it can be called
speculatively for every waiting request and tested as a table; the cache (cache.py) is the machinery.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

EVICTION_POLICIES = ("lru", "cost-aware")
EPS_MB = 1e-6  # float slack so sums of sizes that fit exactly are not read as a breach
EXACT_LIMIT = 12  # cost-aware searches every subset of up to this many evictable models (2**12 sets)


@dataclass(frozen=True)
class Wanted:
    """A member that should be loaded: its name and the memory it is expected to take."""

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
    """The names to evict, in order; or, when `refused` is set, why the wanted model cannot fit now:
    'exceeds-budget' (bigger than the whole budget), 'pinned-full' (the pinned models leave no room) or 'busy'
    (members running requests hold the room: it may fit once they finish)."""

    evict: tuple[str, ...] = ()
    refused: Literal["", "exceeds-budget", "pinned-full", "busy"] = ""
    detail: str = ""

    @property
    def fits(self) -> bool:
        return not self.refused


def plan_evictions(wanted: Wanted, loaded: Sequence[Loaded], budget_mb: float, max_loaded: int,
                   policy: str, pinned: frozenset[str], demand: Mapping[str, float],
                   in_use: frozenset[str] = frozenset()) -> Eviction:
    """What to evict so that `wanted` fits both the memory budget and the count limit. Neither logs nor
    mutates. `demand[name]` is the expected number of near-future requests for a model (missing: 0); members
    `in_use` (running a request) are never evicted, like pinned ones, but only for now."""
    check_policy(policy)
    if any(m.name == wanted.name for m in loaded):
        return Eviction()
    if wanted.memory_mb > budget_mb + EPS_MB:
        return Eviction(refused="exceeds-budget",
                        detail=f"{wanted.name} needs {wanted.memory_mb:.0f} MB, more than the whole cache budget "
                               f"of {budget_mb:.0f} MB")
    return _plan(loaded, wanted.memory_mb, 1, budget_mb, max_loaded, policy, pinned, demand, wanted.name, in_use)


def plan_fit(loaded: Sequence[Loaded], budget_mb: float, max_loaded: int, policy: str, pinned: frozenset[str],
             demand: Mapping[str, float], in_use: frozenset[str] = frozenset()) -> Eviction:
    """What to evict so that the models already loaded fit a (new, smaller) budget and count limit."""
    check_policy(policy)
    return _plan(loaded, 0.0, 0, budget_mb, max_loaded, policy, pinned, demand, "the loaded models", in_use)


def check_policy(policy: str) -> None:
    if policy not in EVICTION_POLICIES:
        raise ValueError(f"eviction policy {policy!r} is not one of {', '.join(EVICTION_POLICIES)}")


def _plan(loaded: Sequence[Loaded], extra_mb: float, extra_models: int, budget_mb: float, max_loaded: int,
          policy: str, pinned: frozenset[str], demand: Mapping[str, float], what: str,
          in_use: frozenset[str]) -> Eviction:
    """Make room for `extra_models` more models of `extra_mb` in all; pinned and in-use models never go."""
    free_mb = sum(m.memory_mb for m in loaded) + extra_mb - budget_mb
    free_slots = len(loaded) + extra_models - max_loaded
    chosen = _select([m for m in loaded if m.name not in pinned | in_use], free_mb, free_slots, policy, demand)
    if chosen is None and _select([m for m in loaded if m.name not in pinned], free_mb, free_slots, policy,
                                  demand) is not None:
        busy = sorted(m.name for m in loaded if m.name in in_use)
        return Eviction(refused="busy", detail=f"no room for {what} while {', '.join(busy)} run(s) requests")
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
