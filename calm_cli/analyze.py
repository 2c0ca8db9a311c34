"""Analyze: each model's recent QoS against the policy's goals, and drift from its calibrated profile.

Plan reads these figures to predict what a request will cost on each member, so a model that has become
slow (or unsure) loses traffic within a few requests rather than after a re-calibration.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

DRIFT_LATENCY = 1.5  # recent per-token latency this many times the profile's counts as drift
DRIFT_CONFIDENCE = 0.15  # a fall of mean confidence by this much below the profile's counts as drift
MIN_SAMPLES = 3  # fewer recent requests than this say nothing yet


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
