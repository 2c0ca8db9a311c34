"""Plan and Analyze as tables: the score's terms, hard goals, kNN quality, sliding windows and drift."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from calm_cli import policy
from calm_cli.loop import analyze
from calm_cli.knowledge import CalibrationSet
from calm_cli.loop.analyze import Prediction
from calm_cli.loop.plan import Planner, calibrated_correctness, knn_quality


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32)
    return v / np.linalg.norm(v)


# Three orthogonal "topics": member descriptions point at them; queries are mixtures.
TOPICS = {"chat": _unit([1, 0, 0]), "facts": _unit([0, 1, 0]), "code": _unit([0, 0, 1])}


def _embed(texts: list[str]) -> np.ndarray:
    return np.vstack([TOPICS["chat"] if "conversation" in t else TOPICS["facts"] if "entities" in t
                      else TOPICS["code"] if "Programming" in t else _unit([1, 1, 1]) for t in texts])


@pytest.fixture
def planner() -> Planner:
    p = policy.load()
    return Planner(p, list(p.fleet), _embed)


def _pred(latency=100.0, energy=1.0, memory=500.0, load=0.0, known=True) -> Prediction:
    return Prediction(latency, energy, memory, load, known)


def test_semantic_fit_picks_the_matching_member(planner: Planner) -> None:
    preds = {m: _pred() for m in ("smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b")}
    assert planner.decide(_unit([0.1, 0.1, 1]), preds).model == "qwen2.5-coder-0.5b"
    assert planner.decide(_unit([1, 0.1, 0.1]), preds).model == "smollm2-135m"


def test_every_candidate_keeps_its_terms_and_order(planner: Planner) -> None:
    preds = {m: _pred() for m in ("smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b")}
    decision = planner.decide(_unit([0, 1, 0.2]), preds)
    scores = [c.score for c in decision.candidates]
    assert scores == sorted(scores, reverse=True) and decision.candidates[0].model == decision.model
    for c in decision.candidates:
        assert {"semantic", "quality", "latency_ms", "energy_j", "memory_mb", "load_ms"} <= set(c.as_dict())


def test_cold_and_slow_members_lose_score(planner: Planner) -> None:
    q = _unit([0.1, 0.1, 1])
    base = {m: _pred() for m in ("smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b")}
    warm = planner.decide(q, base)
    cold = planner.decide(q, {**base, "qwen2.5-coder-0.5b": _pred(load=3000)})
    score = lambda d: next(c.score for c in d.candidates if c.model == "qwen2.5-coder-0.5b")  # noqa: E731
    assert score(cold) < score(warm)


def test_hard_goal_filters_and_is_named(planner: Planner) -> None:
    preds = {"smollm2-135m": _pred(), "gemma3-270m": _pred(),
             "qwen2.5-coder-0.5b": _pred(latency=planner.policy.goals["latency_p95_ms"] * 2)}
    decision = planner.decide(_unit([0, 0, 1]), preds)
    assert decision.model != "qwen2.5-coder-0.5b"
    assert next(c for c in decision.candidates if c.model == "qwen2.5-coder-0.5b").filtered_by == "latency_p95_ms"
    assert "filtered: qwen2.5-coder-0.5b" in decision.reason


def test_unknown_costs_never_filter(planner: Planner) -> None:
    preds = {m: _pred(latency=1e9, known=False) for m in ("smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b")}
    assert all(c.filtered_by is None for c in planner.decide(_unit([0, 0, 1]), preds).candidates)


def test_learned_quality_can_overrule_semantic_fit(planner: Planner) -> None:
    embeddings = np.vstack([_unit([0.2, 0.2, 1])] * 20)
    calibration = CalibrationSet(embeddings=embeddings, items=[("t", str(i), "code") for i in range(20)], scores={
        "smollm2-135m": np.ones(20), "gemma3-270m": np.zeros(20), "qwen2.5-coder-0.5b": np.zeros(20)},
        confidence={})
    preds = {m: _pred() for m in ("smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b")}
    decision = planner.decide(_unit([0.2, 0.2, 1]), preds, calibration)
    assert decision.model == "smollm2-135m"
    assert next(c for c in decision.candidates if c.model == "smollm2-135m").quality == pytest.approx(1.0)


def test_knn_quality_weights_near_items_and_skips_gaps() -> None:
    emb = np.vstack([_unit([1, 0, 0]), _unit([0, 1, 0]), _unit([0.9, 0.1, 0])])
    scores = np.array([1.0, 0.0, np.nan])
    assert knn_quality(_unit([1, 0.05, 0]), emb, scores, k=2) > 0.9
    assert knn_quality(_unit([1, 0, 0]), emb, np.full(3, np.nan)) is None


# Sixteen code-like calibration items: the 0.5B member is right exactly when it was confident (>= 0.7, 6 of
# them); the larger member is right on 12.
CODE_ITEMS = np.vstack([_unit([0.1, 0.1, 1])] * 16)
SMALL_CONFIDENCE = np.linspace(0.3, 0.95, 16)
CALIBRATED = CalibrationSet(
    embeddings=CODE_ITEMS, items=[("t", str(i), "code") for i in range(16)],
    scores={"qwen2.5-coder-0.5b": (SMALL_CONFIDENCE >= 0.7).astype(float), "smollm2-135m": np.zeros(16),
            "gemma3-270m": np.zeros(16), "qwen2.5-coder-1.5b": np.array([1.0] * 12 + [0.0] * 4)},
    confidence={"qwen2.5-coder-0.5b": SMALL_CONFIDENCE, "smollm2-135m": np.full(16, 0.5),
                "gemma3-270m": np.full(16, 0.5), "qwen2.5-coder-1.5b": np.full(16, 0.7)})


def _with_escalation(planner: Planner, **settings) -> Planner:
    p = replace(planner.policy, escalation={**planner.policy.escalation, **settings})
    return Planner(p, planner.members, _embed)


def test_calibrated_correctness_follows_confidence_where_it_predicts_correctness() -> None:
    q = _unit([0.1, 0.1, 1])
    small = lambda c: calibrated_correctness(q, CODE_ITEMS, CALIBRATED.scores["qwen2.5-coder-0.5b"],  # noqa: E731
                                             SMALL_CONFIDENCE, c)
    assert small(0.9) > 0.75 and small(0.35) < 0.15
    assert 0.2 < small(0.69) < 0.8  # between the wrong and the right answers: uncertain
    assert calibrated_correctness(q, CODE_ITEMS, np.full(16, np.nan), SMALL_CONFIDENCE, 0.5) is None


def test_escalation_compares_expected_quality_when_calibrated(planner: Planner) -> None:
    gated = _with_escalation(planner, min_gain=0.1)
    q = _unit([0.1, 0.1, 1])
    unsure = gated.escalation(q, "qwen2.5-coder-0.5b", 0.4, CALIBRATED)
    assert unsure.escalate and unsure.expected_larger == pytest.approx(0.75)
    assert unsure.expected_first < 0.2 and "min_gain 0.1" in unsure.reason
    sure = gated.escalation(q, "qwen2.5-coder-0.5b", 0.92, CALIBRATED)
    assert not sure.escalate and sure.expected_first > 0.75


def test_escalation_falls_back_to_the_raw_threshold(planner: Planner) -> None:
    q = _unit([0.1, 0.1, 1])
    threshold = planner.policy.escalation["confidence_threshold"]
    gated = _with_escalation(planner, min_gain=0.1)
    no_calibration = gated.escalation(q, "qwen2.5-coder-0.5b", threshold - 0.01)
    assert no_calibration.escalate and no_calibration.expected_first is None and "threshold" in no_calibration.reason
    ungated = _with_escalation(planner)  # no min_gain: the threshold decides even with calibration
    ungated.policy.escalation.pop("min_gain", None)
    assert not ungated.escalation(q, "qwen2.5-coder-0.5b", threshold + 0.01, CALIBRATED).escalate


def test_direct_route_when_the_larger_member_is_far_better(planner: Planner) -> None:
    preds = {m: _pred() for m in ("smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b")}
    q = _unit([0.1, 0.1, 1])
    decision = planner.decide(q, preds, CALIBRATED)
    assert decision.model == "qwen2.5-coder-0.5b"  # 0.375 expected quality, the best small member
    direct = _with_escalation(planner, direct_gain=0.3).direct(q, decision, CALIBRATED)
    assert direct.escalate and direct.expected_larger == pytest.approx(0.75)  # 0.75 vs 0.375
    shown = planner.larger_candidate(q, _pred(latency=900.0), direct.expected_larger)
    assert shown.model == "qwen2.5-coder-1.5b" and shown.score is None and shown.latency_ms == 900.0
    assert shown.semantic == pytest.approx(planner.semantic(q)["qwen2.5-coder-1.5b"])
    assert not _with_escalation(planner, direct_gain=0.5).direct(q, decision, CALIBRATED).escalate
    never = _with_escalation(planner)
    never.policy.escalation.pop("direct_gain", None)
    assert not never.direct(q, decision, CALIBRATED).escalate


def _obs(latency, tokens=10, ttft=50.0, energy=2.0, confidence=0.8, error=None) -> dict:
    return {"latency_ms": latency, "tokens_out": tokens, "ttft_ms": ttft, "energy_j": energy,
            "confidence": confidence, "error_code": error}


def test_health_statistics_and_violations() -> None:
    rows = [_obs(100 + 10 * i) for i in range(10)] + [_obs(0, error="model_failed")]
    h = analyze.health("m", rows, {"latency_p95_ms": 150, "energy_j_per_query": 1.0})
    assert h.n == 10 and h.errors == 1 and h.error_rate == pytest.approx(1 / 11)
    assert h.latency_p50_ms == pytest.approx(145.0)  # latencies 100..190: the median lies between 140 and 150
    assert h.latency_p95_ms == pytest.approx(185.5)  # 95th percentile, linear between 180 and 190
    assert h.ms_per_token == pytest.approx(9.5)  # (latency - 50 ms TTFT) / 10 tokens = 5..14 ms: median 9.5
    assert len(h.violations) == 2


def test_too_few_samples_say_nothing() -> None:
    h = analyze.health("m", [_obs(100), _obs(120)], {"latency_p95_ms": 1})
    assert h.latency_p95_ms is None and not h.violations


def test_drift_against_the_profile() -> None:
    rows = [_obs(50 + 10 * 40, confidence=0.5) for _ in range(5)]  # 40 ms per token, unsure
    h = analyze.health("m", rows, {}, profile={"tokens_per_s": 100.0, "confidence": 0.95})
    assert any("ms/token" in d for d in h.drift)
    assert any("confidence" in d for d in h.drift)
