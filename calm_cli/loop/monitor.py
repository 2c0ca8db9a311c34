"""Monitor: every request becomes one record (schemas/response.schema.json) and every member run one
observation in the knowledge base, answered or failed alike."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from calm_cli.errors import ERROR_CODES
from calm_cli.loop.plan import Decision
from calm_cli.members.base import Run


@dataclass
class Served:
    """What the loop did for one request: the plan, the runs (the first member's, then the escalation's if
    any), why, and its timings."""

    decision: Decision
    runs: list[Run]
    reason: str
    fallback_from: str | None
    routing_ms: float
    total_ms: float
    streamed: bool
    queued_ms: float = 0.0  # of total_ms, waiting inside the scheduler for a member (and its load)


def error_record(request_id: Any, code: str, message: str) -> dict:
    """The record of a request that got no answer; it still has its line in the output."""
    assert code in ERROR_CODES, code
    return {"id": request_id, "answer": None, "model": None, "error": {"code": code, "message": message},
            "routing": None, "metrics": None}


def record(request_id: Any, policy: str, served: Served, queue_ms: float, cache_used_mb: float,
           precision: str | None) -> dict:
    """The record of an answered request: the final run's answer, the routing that led there, the costs of
    every run it took (latency from arrival to the last token, energy of all runs). `queue_ms` is what it
    waited before the loop took it; the record's queue_ms adds its wait inside the scheduler."""
    final = served.runs[-1]
    metrics = {
        "latency_ms": round(served.total_ms + queue_ms, 2),
        "ttft_ms": round(served.total_ms - final.latency_ms + final.ttft_ms, 2),
        "queue_ms": round(queue_ms + served.queued_ms, 2),
        "load_ms": round(sum(r.load_ms for r in served.runs), 2),
        "routing_ms": round(served.routing_ms, 2), "tokens_in": final.tokens_in, "tokens_out": final.tokens_out,
        "tokens_per_s": round(final.tokens_per_s, 2),
        "energy_j": round(sum(r.energy_j for r in served.runs), 4),
        "energy_estimated": any(r.energy_estimated for r in served.runs),
        "memory_mb": round(cache_used_mb, 1),
        "confidence": None if math.isnan(final.confidence) else round(final.confidence, 4),  # a remote gave none
        "cache_hit": all(r.hit for r in served.runs), "provider": final.provider,
        "stop_reason": final.stop_reason,
        "draft": final.draft, "draft_tokens": final.draft_tokens, "accepted_tokens": final.accepted_tokens,
    }
    if precision is not None:
        metrics["precision"] = precision
    return {
        "id": request_id, "answer": final.text, "model": final.model, "error": None,
        "routing": {"policy": policy, "candidates": [c.as_dict() for c in served.decision.candidates],
                    "reason": served.reason,
                    "escalated_from": served.runs[0].model if len(served.runs) > 1 else None,
                    "fallback_from": served.fallback_from},
        "metrics": metrics,
    }


def observation(run: Run, *, request_id: Any, policy: str, domain: str | None, queue_ms: float,
                escalated_from: str | None) -> dict:
    """One knowledge-base row for one member's run on one request."""
    return {
        "ts": time.time(), "request_id": str(request_id), "policy": policy, "model": run.model, "domain": domain,
        "latency_ms": run.latency_ms, "ttft_ms": run.ttft_ms, "queue_ms": queue_ms, "load_ms": run.load_ms,
        "tokens_in": run.tokens_in, "tokens_out": run.tokens_out, "tokens_per_s": run.tokens_per_s,
        "energy_j": run.energy_j, "energy_estimated": run.energy_estimated, "memory_mb": None,
        "confidence": None if math.isnan(run.confidence) else run.confidence, "cache_hit": run.hit, "provider": run.provider,
        "escalated_from": escalated_from, "error_code": None, "injected_slowdown": run.injected_slowdown,
        "draft_tokens": run.draft_tokens if run.draft else None,
        "accepted_tokens": run.accepted_tokens if run.draft else None,
    }


def failure_observation(model: str, *, request_id: Any, policy: str, domain: str | None, code: str,
                        latency_ms: float, escalated_from: str | None = None) -> dict:
    """A knowledge-base row for a member run that failed, so error rates count it (first tries and escalations
    alike)."""
    return {
        "ts": time.time(), "request_id": str(request_id), "policy": policy,
        "model": model, "domain": domain, "latency_ms": latency_ms, "ttft_ms": None, "queue_ms": 0.0,
        "load_ms": 0.0, "tokens_in": 0, "tokens_out": 0, "tokens_per_s": None, "energy_j": None,
        "energy_estimated": True, "memory_mb": None, "confidence": None, "cache_hit": False, "provider": "unknown",
        "escalated_from": escalated_from, "error_code": code, "injected_slowdown": 1.0,
    }
