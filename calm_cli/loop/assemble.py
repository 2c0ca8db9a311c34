"""The composition root: the real parts of one loop (the encoder, the policy's members, the cache, the planner,
the analyzer, the executor) put together for a policy, a model store and a knowledge base."""

from __future__ import annotations

from typing import Callable

from calm_cli import settings
from calm_cli.engine.embed import Encoder
from calm_cli.fleet.store import Store
from calm_cli.knowledge import Knowledge
from calm_cli.loop.analyze import WINDOW, Analyzer
from calm_cli.loop.calm import Calm
from calm_cli.loop.execute.cache import CacheEvent, MemberCache
from calm_cli.loop.execute.run import Executor
from calm_cli.loop.execute.scheduler import Driver, Handle
from calm_cli.loop.plan import Planner
from calm_cli.members import catalog
from calm_cli.members.base import Member
from calm_cli.policy import Policy


def assemble(policy: Policy, store: Store, knowledge: Knowledge, log: Callable[[str], None] = lambda message: None,
             *, window: int = WINDOW, wrap: Callable[[Member], Member] = lambda member: member) -> Calm:
    """A loop for `policy` over the exports in `store`. `window` 0 predicts from profiles alone and `wrap` wraps
    each member: the benchmark's static routing and injected slowdowns (bench/hooks.py)."""
    members = {name: wrap(m) for name, m in catalog.members(policy, store, str(settings.get("precision"))).items()}
    encoder = Encoder(catalog.encoder_dir(store, policy.encoder))
    analyzer = Analyzer(members, knowledge, policy.goals, window)
    analyzer.calibration()  # read once now: routing needs it, and a damaged store shows before the first answer

    def cache_event(event: CacheEvent) -> None:
        log(f"cache: {event.kind} {event.model} ({event.memory_mb:.0f} MB): {event.reason}")

    def memory_of(name: str, handle: Handle) -> float:  # the member's session and its batch's KV buffers
        kv = handle.batch.slots.kv_bytes / 2**20 if handle.batch is not None else 0.0
        return members[name].memory_of(handle.session) + kv

    cache = MemberCache(policy.cache, memory_of=memory_of, estimate_mb=analyzer.memory_mb,
                        load_cost_ms=analyzer.load_cost_ms, log=cache_event,
                        roomless=frozenset(n for n, m in members.items() if m.remote))
    driver = Driver(members, cache, discipline=policy.queue["discipline"], concurrency=settings.concurrency())
    return Calm(policy, embed=encoder.embed, planner=Planner(policy, list(policy.fleet), encoder.embed),
                analyzer=analyzer, executor=Executor(driver, knowledge, policy.name, log), members=members,
                knowledge=knowledge, log=log)
