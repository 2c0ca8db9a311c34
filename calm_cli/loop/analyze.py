"""Analyze: each member's recent QoS against the policy's goals, drift from its calibrated profile, and what a
request is expected to cost on it.

Plan reads these predictions to score the members, so a member that has become slow (or unsure) loses traffic
within a few requests rather than after a re-calibration. What `calm profile` learned (profiles, calibration) is
read from the knowledge base again whenever it changed there, so a long-running loop sees a new calibration.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

import numpy as np

from calm_cli.knowledge import CalibrationSet, Knowledge
from calm_cli.members.base import Member

DRIFT_LATENCY = 1.5  # recent per-token latency this many times the profile's counts as drift
DRIFT_CONFIDENCE = 0.15  # a fall of mean confidence by this much below the profile's counts as drift
MIN_SAMPLES = 3  # fewer recent requests than this say nothing yet
WINDOW = 20  # recent requests per member that Analyze looks at: short, so slowdowns move traffic quickly


@dataclass
class Health:
    """One model's sliding-window statistics (over successful requests unless said otherwise)."""

    model: str
    n: int = 0
    errors: int = 0
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    ms_per_token: float | None = None  # (latency - ttft) per generated token, the decode cost
    ttft_ms: float | None = None
    joules_per_query: float | None = None
    joules_per_token: float | None = None
    tokens_out: float | None = None
    confidence: float | None = None
    violations: list[str] = field(default_factory=list)
    drift: list[str] = field(default_factory=list)

    @property
    def error_rate(self) -> float:
        total = self.n + self.errors
        return self.errors / total if total else 0.0


def health(model: str, observations: Iterable[dict], goals: dict, profile: dict | None = None) -> Health:
    """Statistics over `observations` (newest first, as the knowledge base returns them)."""
    rows = list(observations)
    ok = [r for r in rows if not r.get("error_code")]
    h = Health(model, n=len(ok), errors=len(rows) - len(ok))
    if len(ok) < MIN_SAMPLES:
        return h
    latency = np.array([r["latency_ms"] for r in ok], dtype=float)
    tokens = np.array([max(r["tokens_out"], 1) for r in ok], dtype=float)
    ttft = np.array([r["ttft_ms"] for r in ok], dtype=float)
    energy = np.array([r["energy_j"] for r in ok], dtype=float)
    h.latency_p50_ms, h.latency_p95_ms = (float(v) for v in np.percentile(latency, [50, 95]))
    h.ttft_ms = float(np.median(ttft))
    h.ms_per_token = float(np.median(np.clip(latency - ttft, 0, None) / tokens))
    h.joules_per_query = float(energy.mean())
    h.joules_per_token = float(energy.sum() / tokens.sum())
    h.tokens_out = float(tokens.mean())
    confidences = [r["confidence"] for r in ok if r.get("confidence") is not None]
    h.confidence = float(np.mean(confidences)) if confidences else None
    if "latency_p95_ms" in goals and h.latency_p95_ms > goals["latency_p95_ms"]:
        h.violations.append(f"p95 latency {h.latency_p95_ms:.0f} ms > goal {goals['latency_p95_ms']:.0f} ms")
    if "energy_j_per_query" in goals and h.joules_per_query > goals["energy_j_per_query"]:
        h.violations.append(f"{h.joules_per_query:.1f} J/query > goal {goals['energy_j_per_query']:.1f} J")
    if profile and profile.get("tokens_per_s"):
        expected = 1000.0 / profile["tokens_per_s"]
        if h.ms_per_token > DRIFT_LATENCY * expected:
            h.drift.append(f"{h.ms_per_token:.1f} ms/token vs {expected:.1f} profiled")
    if profile and profile.get("confidence") is not None and h.confidence is not None:
        if h.confidence < profile["confidence"] - DRIFT_CONFIDENCE:
            h.drift.append(f"confidence {h.confidence:.2f} vs {profile['confidence']:.2f} profiled")
    return h


@dataclass(frozen=True)
class Prediction:
    """What one request is expected to cost on a member (from recent runs, profiles and the cache state)."""

    latency_ms: float
    energy_j: float
    memory_mb: float
    load_ms: float  # 0 when the member is loaded already
    known: bool  # False when neither a profile nor recent observations exist


class Analyzer:
    """Predictions per member from the knowledge base: its recent window when there is one, else its profile.
    `window` 0 predicts from profiles alone (a benchmark's static routing)."""

    def __init__(self, members: Mapping[str, Member], knowledge: Knowledge, goals: dict, window: int = WINDOW):
        self.members, self.knowledge, self.goals, self.window = members, knowledge, goals, window
        self._version: int | None = None
        self._calibration: CalibrationSet | None = None
        self._profiles: dict[str, dict | None] = {}

    def _fresh(self) -> None:
        """Forget what was learned when the knowledge base says it changed (another process may have profiled)."""
        version = self.knowledge.learned_version()
        if version != self._version:
            self._version, self._calibration, self._profiles = version, None, {}

    def calibration(self) -> CalibrationSet:
        self._fresh()
        if self._calibration is None:
            self._calibration = self.knowledge.calibration(list(self.members))
        return self._calibration

    def profile(self, name: str) -> dict | None:
        self._fresh()
        if name not in self._profiles:
            precision = self.members[name].precision
            self._profiles[name] = self.knowledge.profile(name, precision) if precision else self.knowledge.profile(name)
        return self._profiles[name]

    def memory_mb(self, name: str) -> float:
        """A member's expected memory: measured by `calm profile`, else its own static estimate."""
        profile = self.profile(name)
        return float(profile["memory_mb"]) if profile and profile.get("memory_mb") else self.members[name].estimate_mb()

    def load_cost_ms(self, name: str) -> float:
        profile = self.profile(name)
        return float(profile["load_ms"]) if profile and profile.get("load_ms") else self.members[name].load_estimate_ms()

    def health(self, name: str) -> Health:
        recent = self.knowledge.recent(name, self.window) if self.window else []
        return health(name, recent, self.goals, self.profile(name))

    def agreement(self, first: str, larger: str) -> tuple[float, int] | None:
        """How much of `first`'s answers `larger` kept when it verified them on escalation (mode verify), as
        the fraction of checked tokens kept over its recent verifications, and how many those were; None before
        MIN_SAMPLES. A direct measure of whether the two members agree, for Plan and the record's reason."""
        rows = [r for r in self.knowledge.recent(larger, 10 * self.window or 200)
                if r["escalated_from"] == first and r.get("draft_tokens") and not r.get("error_code")]
        if len(rows) < MIN_SAMPLES:
            return None
        return sum(r["accepted_tokens"] for r in rows) / sum(r["draft_tokens"] for r in rows), len(rows)

    def predict(self, name: str, loaded: bool) -> Prediction:
        """What a request is expected to cost on `name`: recent runs, else its profile, else unknown."""
        member, profile, h = self.members[name], self.profile(name), self.health(name)
        load_ms = 0.0 if loaded else self.load_cost_ms(name)
        memory = self.memory_mb(name)
        tokens = h.tokens_out or min(member.config.max_tokens, 64)
        if h.ms_per_token is not None:
            return Prediction(h.ttft_ms + tokens * h.ms_per_token, h.joules_per_token * tokens, memory, load_ms, True)
        if profile and profile.get("tokens_per_s"):
            latency = profile["ttft_ms"] + tokens * 1000.0 / profile["tokens_per_s"]
            return Prediction(latency, (profile.get("joules_per_token") or 0.0) * tokens, memory, load_ms, True)
        return Prediction(0.0, 0.0, memory, load_ms, False)
