"""Plan: score every member of the fleet for one query and pick the best that meets the hard goals.

score = w_semantic x semantic fit + w_quality x learned quality
        - w_latency x predicted latency / latency goal - w_energy x predicted energy / energy goal
        - w_memory x memory / cache budget - w_load x load time if cold / latency goal

Semantic fit is the query embedding's cosine to the member's description and examples (the better of
the two). Learned quality is a similarity-weighted mean of the member's scores on the calibration items
nearest to the query (`calm profile` fills them in the knowledge base). Every term is kept per candidate.

Escalation is planned from the same calibration: a small member's raw confidence means different things per
model and per kind of query, so the decision compares the larger member's expected quality for queries like
this one with the probability that the first answer is right given the confidence it came with
(`calibrated_correctness`). Where calibration is missing, the policy's raw confidence threshold decides.
"""

from __future__ import annotations

import math

from dataclasses import asdict, dataclass
from typing import Mapping

import numpy as np

from calm_cli.loop.analyze import Prediction
from calm_cli.policy import MemberPolicy, Policy

KNN = 16  # calibration items that vote on a query's expected quality
DEFAULT_SCALE_MS = 1000.0  # normaliser for latency and load terms when the policy sets no latency goal
DEFAULT_SCALE_J = 10.0  # normaliser for the energy term when the policy sets no energy goal
CONFIDENCE_BANDWIDTH = 0.15  # how close in confidence a calibration answer must be to speak for a new one
PRIOR_WEIGHT = 0.5  # pull toward the member's local quality when few near answers had a similar confidence


@dataclass
class Candidate:
    model: str
    score: float | None
    semantic: float
    quality: float | None
    latency_ms: float | None  # None: nothing measured yet (no profile, no recent runs), not 0 ms
    energy_j: float | None
    memory_mb: float
    load_ms: float
    filtered_by: str | None = None

    def as_dict(self) -> dict:
        d = asdict(self)
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.items()}


@dataclass
class Decision:
    model: str
    candidates: list[Candidate]
    reason: str


def _nearest(query: np.ndarray, embeddings: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the k embeddings nearest the query, and their similarities as (positive) weights."""
    sims = embeddings @ query
    top = np.argsort(-sims)[:k]
    return top, np.clip(sims[top], 1e-3, None)


def knn_quality(query: np.ndarray, embeddings: np.ndarray, scores: np.ndarray, k: int = KNN) -> float | None:
    """Similarity-weighted mean score over the k calibration items nearest the query that this member did."""
    have = ~np.isnan(scores)
    if not have.any():
        return None
    top, weights = _nearest(query, embeddings[have], k)
    return float((weights * scores[have][top]).sum() / weights.sum())


def calibrated_correctness(query: np.ndarray, embeddings: np.ndarray, scores: np.ndarray,
                           confidences: np.ndarray, confidence: float, k: int = 2 * KNN) -> float | None:
    """P(answer right | a query like this, answered with this confidence), from the member's calibration.

    A kernel-weighted mean over the k nearest items it answered: weight = query similarity x a Gaussian in
    confidence distance, shrunk toward its plain nearest-neighbour quality so a lone neighbour cannot decide.
    """
    have = ~np.isnan(scores) & ~np.isnan(confidences)
    if not have.any():
        return None
    top, near = _nearest(query, embeddings[have], k)
    s = scores[have][top]
    prior = float((near * s).sum() / near.sum())
    w = near * np.exp(-0.5 * ((confidences[have][top] - confidence) / CONFIDENCE_BANDWIDTH) ** 2)
    return float(((w * s).sum() + PRIOR_WEIGHT * prior) / (w.sum() + PRIOR_WEIGHT))


@dataclass(frozen=True)
class Escalation:
    """Whether to hand a query to the policy's larger member, and the figures that decided it."""

    escalate: bool
    reason: str
    expected_first: float | None = None  # P(first answer right | its confidence), when calibrated
    expected_larger: float | None = None  # the larger member's expected quality for the query


class Planner:
    """Holds the members' description embeddings; `decide` is cheap (a few dot products per member)."""

    def __init__(self, policy: Policy, members: list[MemberPolicy], embed) -> None:
        self.policy = policy
        self.members = members
        self.vectors = {}
        larger = policy.escalation_member
        extra = [larger] if larger is not None and larger.model not in {m.model for m in members} else []
        for m in [*members, *extra]:
            texts = [m.description, *m.examples]
            self.vectors[m.model] = embed(texts)

    def semantic(self, query: np.ndarray) -> dict[str, float]:
        out = {}
        for name, vecs in self.vectors.items():
            sims = vecs @ query
            out[name] = float(max(sims[0], sims[1:].max() if len(sims) > 1 else -1.0))
        return out

    def decide(self, query: np.ndarray, predictions: Mapping[str, Prediction],
               calibration=None) -> Decision:
        """The best member for `query`: hard goals filter, the weighted score ranks."""
        w, goals = self.policy.weights, self.policy.goals
        lat_scale = goals.get("latency_p95_ms", DEFAULT_SCALE_MS)
        j_scale = goals.get("energy_j_per_query", DEFAULT_SCALE_J)
        budget = float(self.policy.cache["budget_mb"])
        semantic = self.semantic(query)
        candidates = []
        for m in self.members:
            p = predictions[m.model]
            quality = None
            if calibration is not None and m.model in calibration.scores and len(calibration.embeddings):
                quality = knn_quality(query, calibration.embeddings, calibration.scores[m.model])
            score = (w["semantic"] * semantic[m.model] + w["quality"] * (quality or 0.0)
                     - w["latency"] * p.latency_ms / lat_scale - w["energy"] * p.energy_j / j_scale
                     - w["memory"] * p.memory_mb / budget - w["load"] * p.load_ms / lat_scale)
            c = Candidate(m.model, score, semantic[m.model], quality, p.latency_ms if p.known else None,
                          p.energy_j if p.known else None, p.memory_mb, p.load_ms)
            c.filtered_by = self._violation(c, p)
            candidates.append(c)
        allowed = [c for c in candidates if c.filtered_by is None]
        pool = allowed or candidates
        best = max(pool, key=lambda c: c.score)
        candidates.sort(key=lambda c: -c.score)
        if not allowed:
            reason = f"every member breaks a hard goal; {best.model} scored best anyway"
        else:
            runner_up = next((c for c in candidates if c is not best and c.filtered_by is None), None)
            margin = f" by {best.score - runner_up.score:.3f} over {runner_up.model}" if runner_up else ""
            reason = f"highest score{margin}"
            filtered = [c.model for c in candidates if c.filtered_by]
            if filtered:
                reason += f"; filtered: {', '.join(filtered)}"
        return Decision(best.model, candidates, reason)

    def route(self, query: np.ndarray, predictions: Mapping[str, Prediction], calibration=None) -> Decision:
        """The member for `query`: the best-scoring one within the hard goals, or the policy's larger member
        straight away when calibration expects it to be better by `direct_gain` (a direct route).

        `predictions` covers the fleet and, when the policy escalates, the larger member too."""
        decision = self.decide(query, {m.model: predictions[m.model] for m in self.members}, calibration)
        larger = self.policy.escalation_member
        if larger is not None:
            direct = self.direct(query, decision, calibration)
            if direct.escalate:
                chosen = self.larger_candidate(query, predictions[larger.model], direct.expected_larger)
                return Decision(larger.model, [chosen, *decision.candidates],
                                f"straight to {larger.model}: {direct.reason}")
        return decision

    def larger_candidate(self, query: np.ndarray, prediction: Prediction, quality: float | None) -> Candidate:
        """The larger member as a candidate of a direct route, so the record explains it like any other."""
        larger = self.policy.escalation_member
        known = prediction.known
        return Candidate(larger.model, None, self.semantic(query)[larger.model], quality,
                         prediction.latency_ms if known else None, prediction.energy_j if known else None,
                         prediction.memory_mb, prediction.load_ms)

    def _larger_quality(self, query: np.ndarray, calibration) -> float | None:
        larger = self.policy.escalation_member
        if larger is None or calibration is None or larger.model not in calibration.scores \
                or not len(calibration.embeddings):
            return None
        return knn_quality(query, calibration.embeddings, calibration.scores[larger.model])

    def direct(self, query: np.ndarray, decision: Decision, calibration=None) -> Escalation:
        """Send the query straight to the larger member when its expected quality beats the chosen member's by
        the policy's `direct_gain`: escalating after a small member's likely-wrong try costs both runs."""
        esc = self.policy.escalation
        chosen = next((c for c in decision.candidates if c.model == decision.model), None)
        larger = self._larger_quality(query, calibration)
        if "direct_gain" not in esc or chosen is None or chosen.quality is None or larger is None:
            return Escalation(False, "no direct route")
        gain = larger - chosen.quality
        return Escalation(gain >= esc["direct_gain"],
                          f"expected quality {larger:.2f} vs {chosen.quality:.2f} on {decision.model} "
                          f"(direct_gain {esc['direct_gain']})", chosen.quality, larger)

    def escalation(self, query: np.ndarray, first_model: str, confidence: float, calibration=None) -> Escalation:
        """Escalate when the larger member is expected to be right more often than this answer by `min_gain`;
        without calibration for both, when the raw confidence is below `confidence_threshold`."""
        esc = self.policy.escalation
        larger = self._larger_quality(query, calibration)
        first = None
        if larger is not None and first_model in calibration.scores:  # confidence has the same keys as scores
            first = calibrated_correctness(query, calibration.embeddings, calibration.scores[first_model],
                                           calibration.confidence[first_model], confidence)
        if "min_gain" in esc and first is not None and larger is not None:
            return Escalation(larger - first >= esc["min_gain"],
                              f"expected quality {larger:.2f} vs {first:.2f} for {first_model}'s answer at "
                              f"confidence {confidence:.2f} (min_gain {esc['min_gain']})", first, larger)
        threshold = esc.get("confidence_threshold", 0.0)
        if math.isnan(confidence):  # a remote member that returned no logprobs
            return Escalation(False, "confidence unavailable: not escalated")
        return Escalation(confidence < threshold, f"confidence {confidence:.2f} vs threshold {threshold}")

    def _violation(self, c: Candidate, p: Prediction) -> str | None:
        goals = self.policy.goals
        if not p.known:
            return None  # nothing measured yet: never exclude on a guess
        if "latency_p95_ms" in goals and c.latency_ms > goals["latency_p95_ms"]:
            return "latency_p95_ms"
        if "energy_j_per_query" in goals and c.energy_j > goals["energy_j_per_query"]:
            return "energy_j_per_query"
        if "memory_mb" in goals and c.memory_mb > goals["memory_mb"]:
            return "memory_mb"
        if "min_quality" in goals and c.quality is not None and c.quality < goals["min_quality"]:
            return "min_quality"
        return None
