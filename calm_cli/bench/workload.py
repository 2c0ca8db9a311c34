"""`calm bench`: calm's policies against the single larger model, each member alone, random routing and a
hindsight oracle, on one pinned, seeded workload, with the same engine in the same run.

Every system starts cold (its first request pays the model loads). Latency per query includes routing,
queueing and loading; energy is joules per query (estimated where NVML is absent, and said so). The
benchmark writes its observations to a copy of the knowledge base, so the calibration `calm profile` left
there is used and nothing the benchmark does stays behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import sqlite3
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from calm_cli.eval import evaluate, tasks
from calm_cli.fleet.store import Store
from calm_cli.knowledge import Knowledge, KnowledgeError, open_knowledge
from calm_cli.bench.hooks import Slowed
from calm_cli.errors import MemberFailure, ModelsFailed
from calm_cli.loop.analyze import WINDOW
from calm_cli.loop.assemble import assemble
from calm_cli.loop.calm import Calm
from calm_cli.loop.execute.queue import RequestQueue
from calm_cli.loop.execute.scheduler import WorkJob
from calm_cli.members import catalog
from calm_cli.members.base import Member, NotExported, Run
from calm_cli.policy import Policy

BASELINE = "qwen2.5-coder-1.5b"
HIT_WINDOW = 10  # requests in the sliding window of the cache-hit-rate recovery measure


@dataclass
class QueryResult:
    item: tasks.Item
    model: str
    score: float
    latency_ms: float
    energy_j: float
    energy_estimated: bool
    cache_hit: bool = True
    escalated: bool = False
    queue_ms: float = 0.0
    failed: bool = False  # every member failed: scored 0, and counted in the summary's failures


@dataclass
class SystemResult:
    name: str
    results: list[QueryResult]
    peak_memory_mb: float
    baseline: bool = False
    extra: dict = field(default_factory=dict)

    def summary(self, goals: dict) -> dict:
        r = self.results
        latency = np.array([q.latency_ms for q in r])
        energy = np.array([q.energy_j for q in r])
        domains: dict[str, list[float]] = {}
        for q in r:
            domains.setdefault(q.item.domain, []).append(q.score)
        models: dict[str, int] = {}
        for q in r:
            models[q.model] = models.get(q.model, 0) + 1
        out = {
            "name": self.name, "baseline": self.baseline, "queries": len(r),
            "quality": round(float(np.mean([q.score for q in r])), 4),
            "quality_by_domain": {d: round(float(np.mean(v)), 4) for d, v in sorted(domains.items())},
            "latency_p50_ms": round(float(np.percentile(latency, 50)), 1),
            "latency_p95_ms": round(float(np.percentile(latency, 95)), 1),
            "latency_mean_ms": round(float(latency.mean()), 1),
            "energy_j_per_query": round(float(energy.mean()), 3),
            "energy_estimated": any(q.energy_estimated for q in r),
            "peak_memory_mb": round(self.peak_memory_mb, 1),
            "cache_hit_rate": round(float(np.mean([q.cache_hit for q in r])), 4),
            "escalation_rate": round(float(np.mean([q.escalated for q in r])), 4),
            "failures": sum(q.failed for q in r),
            "models": models,
            "latency_goal_violations": int((latency > goals.get("latency_p95_ms", np.inf)).sum()),
            "energy_goal_violations": int((energy > goals.get("energy_j_per_query", np.inf)).sum()),
            **self.extra,
        }
        return out


def copy_knowledge(source: Path, into: Path) -> Knowledge:
    """A private copy of the knowledge base (sqlite's backup API: consistent even while others write)."""
    target = into / "bench-knowledge.sqlite"
    if source.exists():
        try:
            with sqlite3.connect(source) as src, sqlite3.connect(target) as dst:
                src.backup(dst)
        except sqlite3.DatabaseError as exc:
            raise KnowledgeError(source, f"cannot be copied for the benchmark: {exc}") from exc
    return open_knowledge(target)


def item_work(item: tasks.Item, rule: str):
    """The loop's work for a benchmark item: the chosen member answers it and is graded."""

    def work(member: Member, session: object, stream: bool) -> Run:
        o = evaluate.evaluate_member(member, session, item, rule)
        rate = o.tokens_out / (o.latency_ms / 1000) if o.tokens_out and o.latency_ms else 0.0
        return Run(member.name, o.answer, o.latency_ms, o.latency_ms, o.tokens_in, o.tokens_out, rate, o.energy_j,
                   o.energy_estimated, o.confidence, o.provider, "eos", payload=o)

    return work


def run_alone(member: Member, items: list[tasks.Item], rule: str, step: Callable[[], None]) -> SystemResult:
    """One member answers everything; its load is paid by the first query."""
    started = time.perf_counter()
    session = member.load()
    load_ms = (time.perf_counter() - started) * 1000
    results = []
    for i, item in enumerate(items):
        try:
            o = evaluate.evaluate_member(member, session, item, rule)
        except MemberFailure:  # a remote server that failed: scored 0 and counted as a failure; the run goes on
            results.append(QueryResult(item, "none", 0.0, 0.0, 0.0, False, cache_hit=False, failed=True))
        else:
            results.append(QueryResult(item, member.name, o.score, o.latency_ms + (load_ms if i == 0 else 0.0),
                                       o.energy_j, o.energy_estimated, cache_hit=i > 0))
        step()
    return SystemResult(f"{member.name} alone", results, member.memory_of(session),
                        baseline=member.name == BASELINE)


def fleet_members(policies: list[Policy], store: Store, precision: str) -> dict[str, Member]:
    """Every member of the policies, and the baseline (the single larger model), as the loop would run them."""
    out: dict[str, Member] = {}
    for policy in policies:
        out.update(catalog.members(policy, store, precision))
    if BASELINE not in out:
        out[BASELINE] = catalog.outside(BASELINE, store, precision)
    return out


def serve_item(calm: Calm, item: tasks.Item, rule: str, i: int, forced: str | None = None,
               queue_ms: float = 0.0) -> QueryResult:
    """One benchmark item through the loop; a request whose every member failed is scored 0 and the run goes on."""
    started = time.perf_counter()
    try:
        served = calm.serve(item.query, WorkJob(item_work(item, rule)), request_id=f"bench-{i}", domain=item.domain,
                            forced=forced, queue_ms=queue_ms)
    except ModelsFailed as exc:
        calm.log(f"bench: request {i} failed: {exc}")
        return QueryResult(item, "none", 0.0, (time.perf_counter() - started) * 1000 + queue_ms, 0.0, False,
                           cache_hit=False, queue_ms=queue_ms, failed=True)
    final = served.runs[-1]
    return QueryResult(item, final.model, final.payload.score, served.total_ms + queue_ms,
                       sum(r.energy_j for r in served.runs), any(r.energy_estimated for r in served.runs),
                       cache_hit=all(r.hit for r in served.runs), escalated=len(served.runs) > 1, queue_ms=queue_ms)


def run_calm(calm: Calm, items: list[tasks.Item], rule: str, step: Callable[[int], None],
             forced: Callable[[int], str | None] = lambda i: None,
             before: Callable[[int], None] = lambda i: None) -> SystemResult:
    """Items through the MAPE-K loop (or forced members, for random routing); `before(i)` injects events. The
    loop is closed after (its members unloaded)."""
    results, peak = [], 0.0
    try:
        for i, item in enumerate(items):
            before(i)
            results.append(serve_item(calm, item, rule, i, forced=forced(i)))
            peak = max(peak, calm.cache.state()["used_mb"])
            step(i)
    finally:
        calm.close()
    return SystemResult(f"calm ({calm.policy.name})", results, peak)


def oracle(alone: dict[str, SystemResult]) -> SystemResult:
    """Hindsight upper bound: per item, the cheapest (by energy) member that got it right, else the cheapest."""
    names = list(alone)
    results = []
    for i in range(len(alone[names[0]].results)):
        options = [alone[n].results[i] for n in names]
        right = [q for q in options if q.score >= 1.0] or options
        best = min(right, key=lambda q: q.energy_j)
        results.append(QueryResult(best.item, best.model, best.score, best.latency_ms, best.energy_j,
                                   best.energy_estimated))
    return SystemResult("oracle (hindsight)", results, max(s.peak_memory_mb for s in alone.values()))


def hit_rate_recovery(results: list[QueryResult], at: int, window: int = HIT_WINDOW) -> int | None:
    """Requests after `at` until the windowed cache hit rate is back at its level just before `at`."""
    hits = np.array([q.cache_hit for q in results], dtype=float)
    if at < window or at >= len(hits):
        return None
    before = hits[at - window:at].mean()
    for j in range(at + 1, len(hits) - window + 1):
        if hits[j:j + window].mean() >= before:
            return j - at
    return None


def traffic_moved_after(results: list[QueryResult], model: str, at: int, window: int = HIT_WINDOW) -> int | None:
    """Requests after `at` until `model`'s share of a window falls below half its share before `at`."""
    chose = np.array([q.model == model for q in results], dtype=float)
    before = chose[:at].mean() if at else 0.0
    if before == 0:
        return None
    for j in range(at, len(chose) - window + 1):
        if chose[j:j + window].mean() < before / 2:
            return j - at
    return None


@contextlib.contextmanager
def _scenario(name: str, out: dict, log: Callable[[str], None]) -> Iterator[None]:
    """A scenario that fails is reported in its place; the systems already measured are kept and printed."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - any failure of one scenario must not discard the others
        log(f"bench: scenario {name} failed: {type(exc).__name__}: {exc}")
        out[name] = {"error": f"{type(exc).__name__}: {exc}"}


def make_calm(policy: Policy, store: Store, kb: Knowledge, adaptive: bool = True) -> Calm:
    """A loop whose members can be slowed mid-run (bench/hooks.py); static routing predicts from profiles only."""
    return assemble(policy, store, kb, window=WINDOW if adaptive else 0, wrap=Slowed)


def random_routing(policy: Policy, store: Store, kb: Knowledge, items: list[tasks.Item], rule: str, seed: int,
                   step: Callable[[int], None]) -> SystemResult:
    rng = random.Random(seed)
    members = [m.model for m in policy.fleet]
    picks = [rng.choice(members) for _ in items]
    calm = make_calm(policy, store, kb)
    result = run_calm(calm, items, rule, step, forced=lambda i: picks[i])
    result.name = "random routing"
    return result


def run_arrivals(calm: Calm, items: list[tasks.Item], rule: str, rate: float, seed: int,
                 step: Callable[[int], None]) -> SystemResult:
    """Requests arrive as a Poisson stream of `rate` per second; one worker serves them in the order the
    policy's queue discipline gives (FIFO or shortest-predicted-job-first); latency includes the wait."""
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, size=len(items)))
    queue: RequestQueue[int] = RequestQueue(calm.policy.queue["discipline"], max(len(items), 1))
    results: list[QueryResult | None] = [None] * len(items)
    start, released, served_n, peak = time.perf_counter(), 0, 0, 0.0
    while served_n < len(items):
        now = time.perf_counter() - start
        while released < len(items) and arrivals[released] <= now:
            item = items[released]
            decision = calm.plan(calm.embed([item.query])[0])
            chosen = next(c for c in decision.candidates if c.model == decision.model)
            queue.put(released, (chosen.latency_ms or 0.0) + chosen.load_ms)
            released += 1
        if not len(queue):
            time.sleep(max(0.0, arrivals[released] - now))
            continue
        i = queue.get()
        waited = (time.perf_counter() - start - arrivals[i]) * 1000
        item = items[i]
        results[i] = serve_item(calm, item, rule, i, queue_ms=waited)
        peak = max(peak, calm.cache.state()["used_mb"])
        served_n += 1
        step(served_n)
    calm.close()
    name = f"calm ({calm.policy.name}, {calm.policy.queue['discipline']}, {rate}/s)"
    return SystemResult(name, [r for r in results if r is not None], peak)


@dataclass
class Scenarios:
    shift: bool = False
    slow: tuple[str, float] | None = None
    budget_cut: tuple[float, int] | None = None
    arrival: float | None = None
    sweep: tuple[float, ...] = ()  # factors on the main policy's cost weights (latency, energy, load)
    remote: str | None = None  # a fleet member answered by llama.cpp's server on loopback (bench/remote.py)
    remote_requests: int = 40  # paired requests for that member's network overhead
    remote_logprobs: bool = True  # whether that member asks its server for logprobs (endpoint.logprobs)


def prepare(policies: list[Policy], store: Store, task_names: list[str] | None, n_per_task: int, seed: int,
            shift: bool, log: Callable[[str], None]) -> list[tasks.Item]:
    """The workload, once everything a run needs is there: every member's and the baseline's export, the
    encoder's, and the pinned data (checked before the first item, not after the members-alone runs)."""
    needed = {m.model for p in policies for m in p.members if not m.endpoint} | {BASELINE, policies[0].encoder}
    missing = sorted(n for n in needed if not store.exports(n))
    if missing:
        raise NotExported(f"not exported: {', '.join(missing)}: run `calm models export {' '.join(missing)}`")
    return workload(tasks.fetch_data(store.root, log=log, pins=tasks.pins_for(task_names)), task_names, n_per_task,
                    seed, shift)


def workload(data: dict, task_names: list[str] | None, n_per_task: int, seed: int,
             shift: bool = False) -> list[tasks.Item]:
    """The evaluation side of the split (never calibrated on), n per task, domains mixed by a seeded shuffle;
    with `shift`, knowledge and commonsense first, then code, arithmetic and science."""
    pool = tasks.load_items(task_names, 2 * n_per_task + 2, seed, data)
    _, evaluation = tasks.split(pool, 0.5, seed)
    by_task: dict[str, list[tasks.Item]] = {}
    for item in evaluation:
        by_task.setdefault(item.task, []).append(item)
    items = [item for chosen in by_task.values() for item in chosen[:n_per_task]]
    random.Random(seed).shuffle(items)
    if shift:
        first = {"knowledge", "commonsense"}
        items = [i for i in items if i.domain in first] + [i for i in items if i.domain not in first]
    return items


def run(policies: list[Policy], store: Store, kb_source: Path, precision: str, items: list[tasks.Item],
        rule: str, seed: int, scenarios: Scenarios, log: Callable[[str], None]) -> dict:
    """Every system on `items`, side by side; returns {"systems": [...], "scenarios": {...}}."""
    goals = policies[0].goals
    members = list(dict.fromkeys([m.model for p in policies for m in p.members] + [BASELINE]))
    systems: list[SystemResult] = []
    scenario_out: dict = {}
    with tempfile.TemporaryDirectory(prefix="calm-bench-") as tmp:
        def fresh_kb(tag: str) -> Knowledge:
            directory = Path(tmp) / tag
            directory.mkdir()
            return copy_knowledge(kb_source, directory)

        def progress(label: str) -> Callable[..., None]:
            log(f"bench: {label} ...")
            return lambda *a: None

        fleet = fleet_members(policies, store, precision)
        alone = {}
        for name in members:
            alone[name] = run_alone(fleet[name], items, rule, progress(f"{name} alone"))
        systems.extend(alone.values())
        for policy in policies:
            calm = make_calm(policy, store, fresh_kb(f"policy-{policy.name}"))
            systems.append(run_calm(calm, items, rule, progress(f"calm with policy {policy.name}")))
        log("bench: random routing ...")
        systems.append(random_routing(policies[0], store, fresh_kb("random"), items, rule, seed, lambda i: None))
        systems.append(oracle({n: alone[n] for n in members}))
        main_policy = policies[0]
        sweep = []
        for factor in scenarios.sweep:
            weights = {**main_policy.weights, **{k: main_policy.weights[k] * factor
                                                 for k in ("latency", "energy", "load")}}
            policy = dataclasses.replace(main_policy, weights=weights)
            r = run_calm(make_calm(policy, store, fresh_kb(f"sweep-{factor}")), items, rule,
                         progress(f"weight sweep: cost weights x{factor}"))
            sweep.append({**r.summary(goals), "name": f"calm ({main_policy.name}, cost weights x{factor})",
                          "factor": factor})
        if scenarios.remote:
            with _scenario("remote", scenario_out, log):
                from calm_cli.bench import remote

                name = scenarios.remote
                added, scenario_out["remote"] = remote.scenario(
                    main_policy, name, store, fresh_kb("remote"), items, seed, scenarios.remote_requests,
                    scenarios.remote_logprobs,
                    lambda member: run_alone(member, items, rule, progress(f"{member.name} alone")),
                    lambda policy, kb: run_calm(make_calm(policy, store, kb), items, rule,
                                                progress(f"calm with policy {policy.name}")), log)
                systems.extend(added)
        if scenarios.shift:
            with _scenario("shift", scenario_out, log):
                half = len(items) // 2
                for adaptive in (True, False):
                    calm = make_calm(main_policy, store, fresh_kb(f"shift-{adaptive}"), adaptive)
                    r = run_calm(calm, items, rule, progress(f"shift ({'adaptive' if adaptive else 'static'})"))
                    scenario_out.setdefault("shift", {})["adaptive" if adaptive else "static"] = {
                        "shift_at": half, "requests_to_recover_hit_rate": hit_rate_recovery(r.results, half),
                        "hit_rate_before": round(float(np.mean([q.cache_hit for q in r.results[:half]])), 3),
                        "hit_rate_after": round(float(np.mean([q.cache_hit for q in r.results[half:]])), 3),
                        "quality": r.summary(goals)["quality"]}
        if scenarios.slow:
            with _scenario("slow", scenario_out, log):
                model, factor = scenarios.slow
                at = len(items) // 3
                for adaptive in (True, False):
                    calm = make_calm(main_policy, store, fresh_kb(f"slow-{adaptive}"), adaptive)

                    def inject(i: int, calm: Calm = calm) -> None:
                        if i == at:
                            calm.members[model].factor = factor

                    r = run_calm(calm, items, rule, progress(f"slow {model} x{factor} ({adaptive=})"), before=inject)
                    after = r.results[at:]
                    goal = main_policy.goals.get("latency_p95_ms", float("inf"))
                    scenario_out.setdefault("slow", {})["adaptive" if adaptive else "static"] = {
                        "model": model, "factor": factor, "injected_at": at,
                        "requests_until_traffic_moved": traffic_moved_after(r.results, model, at),
                        "share_before": round(float(np.mean([q.model == model for q in r.results[:at]])), 3),
                        "share_after": round(float(np.mean([q.model == model for q in after])), 3),
                        "latency_violation_share_after": round(float(np.mean([q.latency_ms > goal for q in after])), 3),
                        "latency_p95_ms_after": round(float(np.percentile([q.latency_ms for q in after], 95)), 1)}
        if scenarios.budget_cut:
            with _scenario("budget_cut", scenario_out, log):
                budget, at = scenarios.budget_cut
                calm = make_calm(main_policy, store, fresh_kb("budget"))
                used: list[float] = []

                def cut(i: int) -> None:
                    if i == at:
                        calm.cache.set_budget(budget)
                    if i == at + 1:
                        used.append(calm.cache.state()["used_mb"])

                r = run_calm(calm, items, rule, progress(f"budget cut to {budget} MB at request {at}"), before=cut)
                scenario_out["budget_cut"] = {
                    "budget_mb": budget, "at_request": at, "used_mb_at_next_request": used[0] if used else None,
                    "within_budget_by_next_request": bool(used and used[0] <= budget + 1e-6),
                    "evictions": calm.cache.state()["evictions"], "quality": r.summary(goals)["quality"]}
        if scenarios.arrival:
            with _scenario("arrival", scenario_out, log):
                out = {}
                for discipline in ("fifo", "sjf"):
                    policy = dataclasses.replace(main_policy, queue={**main_policy.queue, "discipline": discipline})
                    calm = make_calm(policy, store, fresh_kb(f"arrival-{discipline}"))
                    r = run_arrivals(calm, items, rule, scenarios.arrival, seed, progress(f"arrivals {discipline}"))
                    summary = r.summary(goals)
                    out[discipline] = {k: summary[k] for k in ("latency_p50_ms", "latency_p95_ms", "latency_mean_ms",
                                                               "quality")}
                    out[discipline]["queue_ms_mean"] = round(float(np.mean([q.queue_ms for q in r.results])), 1)
                scenario_out["arrival"] = {"rate_per_s": scenarios.arrival, **out}
    return {"systems": [s.summary(goals) for s in systems], "scenarios": scenario_out, "sweep": sweep}
