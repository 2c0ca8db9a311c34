"""`calm profile`: calibrate the knowledge base — each member's speed, energy, memory and per-item quality.

Quality is learned per calibration item together with the item's query embedding, so Plan can estimate a
member's quality for a new query from the items most like it (plan.knn_quality). The calibration items
are the `tasks.split` side that `calm bench` never evaluates on.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from calm_cli import settings
from calm_cli.engine.embed import Encoder
from calm_cli.errors import MemberFailure, UsageError
from calm_cli.eval import evaluate, tasks
from calm_cli.fleet import lock
from calm_cli.fleet.store import Store
from calm_cli.knowledge import Knowledge
from calm_cli.members import catalog
from calm_cli.members.base import Ask, Member, NotExported
from calm_cli.policy import Policy

SPEED_PROMPTS = ("Explain briefly why the sky is blue.", "Write a Python function that returns the sum of a list.",
                 "List three facts about the Moon.")
SPEED_TOKENS = 64
CALIBRATION_FRACTION = 0.5
REMOTE_PRECISION = "remote"  # a remote member's profile: whatever its server serves, kept apart from exports


@dataclass
class ModelProfile:
    model: str
    load_ms: float
    memory_mb: float
    ttft_ms: float
    tokens_per_s: float
    joules_per_token: float
    energy_estimated: bool
    confidence: float  # NaN: a remote server that returned no logprobs
    quality: dict[str, float]  # domain -> mean score on the calibration items
    items: int
    provider: str


def calibration_items(n_per_task: int, seed: int, task_names: list[str] | None, data: dict) -> list[tasks.Item]:
    """About `n_per_task` calibration items per task (the side of the split that benchmarks leave alone)."""
    pool = tasks.load_items(task_names, max(2, int(n_per_task / CALIBRATION_FRACTION) + 2), seed, data)
    calibration, _ = tasks.split(pool, CALIBRATION_FRACTION, seed)
    by_task: dict[str, list[tasks.Item]] = {}
    for item in calibration:
        by_task.setdefault(item.task, []).append(item)
    return [item for items in by_task.values() for item in items[:n_per_task]]


def profile_member(member: Member, items: list[tasks.Item], embeddings: np.ndarray, kb: Knowledge,
                   step: Callable[[], None]) -> ModelProfile:
    """Measure one member, local or remote, and store its profile and calibration rows. A remote member is
    measured as it answers through its server (load: opening the client; memory: none here; quality: its
    generated answers, evaluate.evaluate_member)."""
    started = time.perf_counter()
    session = member.load()
    load_ms = (time.perf_counter() - started) * 1000
    runs = [member.generate(session, Ask(q, SPEED_TOKENS)) for q in SPEED_PROMPTS]
    tokens = sum(r.tokens_out for r in runs)
    rows, confidences = [], []
    for item, vec in zip(items, embeddings):
        outcome = evaluate.evaluate_member(member, session, item)
        confidence = outcome.confidence if math.isfinite(outcome.confidence) else None  # a server without logprobs
        rows.append({"model": member.name, "task": item.task, "item_id": item.item_id, "domain": item.domain,
                     "score": outcome.score, "latency_ms": outcome.latency_ms, "energy_j": outcome.energy_j,
                     "tokens_out": outcome.tokens_out,
                     "confidence": None if confidence is None else min(max(confidence, 0.0), 1.0),
                     "embedding": vec})
        if confidence is not None:
            confidences.append(confidence)
        step()
    kb.add_calibration(rows)
    known = confidences or [r.confidence for r in runs if math.isfinite(r.confidence)]
    provider = runs[0].provider
    result = ModelProfile(
        model=member.name, load_ms=load_ms, memory_mb=member.memory_of(session),
        ttft_ms=statistics.median(r.ttft_ms for r in runs),
        tokens_per_s=statistics.median(r.tokens_per_s for r in runs if r.tokens_out > 1) if tokens else 0.0,
        joules_per_token=sum(r.energy_j for r in runs) / max(tokens, 1),
        energy_estimated=any(r.energy_estimated for r in runs),
        confidence=float(np.mean(known)) if known else math.nan,
        quality={}, items=len(rows), provider=provider)
    for row in rows:
        result.quality.setdefault(row["domain"], []).append(row["score"])  # type: ignore[arg-type]
    result.quality = {d: float(np.mean(v)) for d, v in result.quality.items()}
    kb.upsert_profile(member.name, member.precision or REMOTE_PRECISION, provider, load_ms=result.load_ms,
                      ttft_ms=result.ttft_ms, tokens_per_s=result.tokens_per_s,
                      joules_per_token=result.joules_per_token, memory_mb=result.memory_mb,
                      energy_estimated=result.energy_estimated,
                      confidence=result.confidence if math.isfinite(result.confidence) else None,
                      n_samples=len(rows) + len(runs))
    return result


def embed_items(encoder: Encoder, items: list[tasks.Item]) -> np.ndarray:
    """Query embeddings, one at a time: routing embeds one query at a time, so calibration must too."""
    return np.vstack([encoder.embed([item.query]) for item in items]) if items else np.zeros((0, 0), np.float32)


def calibrate(policy: Policy, store: Store, knowledge: Knowledge, names: list[str], limit: int,
              task_names: list[str] | None, seed: int, log: Callable[[str], None],
              progress: Callable[[str, int], Callable[[], None]]) -> tuple[list[ModelProfile], dict[str, str]]:
    """`calm profile`: measure `names` (default: every member of the policy, local and remote; also any model
    of models.lock, such as the benchmark's baseline) on `limit` calibration items per task and store what
    was learned. `progress(label, total)` gives the step to call once per item. Returns the profiles and, by
    member, why any failed (a server down, a load that failed): the others are still measured, and a failed
    member keeps what it had."""
    precision = str(settings.get("precision"))
    fleet = catalog.members(policy, store, precision)
    specs = lock.load()
    chosen = list(dict.fromkeys(names)) or list(fleet)
    unknown = [n for n in chosen if n not in fleet and n not in specs]
    if unknown:
        raise UsageError(f"not a member of policy {policy.name} nor a model of models.lock: {', '.join(unknown)}")
    members = [fleet[n] if n in fleet else catalog.outside(n, store, precision) for n in chosen]
    encoders = [m.name for m in members if not m.remote and not specs[m.name].generative]
    if encoders:
        raise UsageError(f"{', '.join(encoders)}: an encoder answers no questions")
    missing = [m.name for m in members if not m.remote and precision not in store.exports(m.name)]
    if missing:
        raise NotExported(f"no {precision} export of {', '.join(missing)}: run `calm models export "
                          f"{' '.join(missing)}`")
    encoder = Encoder(catalog.encoder_dir(store, policy.encoder))
    data = tasks.fetch_data(store.root, log=log, pins=tasks.pins_for(task_names))
    items = calibration_items(limit, seed, task_names, data)
    log(f"profile: {len(items)} calibration items ({', '.join(f'{k} {v}' for k, v in tasks.counts(items).items())})")
    embeddings = embed_items(encoder, items)
    profiles, failed = [], {}
    for member in members:
        try:
            profiles.append(profile_member(member, items, embeddings, knowledge,
                                           progress(f"profiling {member.name}", len(items))))
        except MemberFailure as exc:
            log(f"profile: {member.name} failed, nothing stored for it: {exc}")
            failed[member.name] = str(exc)
    return profiles, failed
