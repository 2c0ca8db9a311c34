"""Monitor: every request becomes one record (schemas/response.schema.json) and one observation per model run."""

from __future__ import annotations

import time
from typing import Any


ERROR_CODES = ("bad_json", "bad_request", "bad_utf8", "too_large", "prompt_too_long", "model_failed", "timeout",
               "queue_full", "unavailable", "internal")


def error_record(request_id: Any, code: str, message: str) -> dict:
    """The record of a request that got no answer; it still has its line in the output."""
    assert code in ERROR_CODES, code
    return {"id": request_id, "answer": None, "model": None, "error": {"code": code, "message": message},
            "routing": None, "metrics": None}


def observation(run: Any, *, request_id: Any, policy: str, domain: str | None, queue_ms: float,
                escalated_from: str | None, slowdown: float) -> dict:
    """One knowledge-base row for one model's run (orchestrator.Run) on one request."""
    return {
        "ts": time.time(), "request_id": str(request_id), "policy": policy, "model": run.model, "domain": domain,
        "latency_ms": run.latency_ms, "ttft_ms": run.ttft_ms, "queue_ms": queue_ms, "load_ms": run.load_ms,
        "tokens_in": run.tokens_in, "tokens_out": run.tokens_out, "tokens_per_s": run.tokens_per_s,
        "energy_j": run.energy_j, "energy_estimated": run.energy_estimated, "memory_mb": None,
        "confidence": run.confidence, "cache_hit": run.hit, "provider": run.provider,
        "escalated_from": escalated_from, "error_code": None, "injected_slowdown": slowdown,
    }


def failure_observation(model: str, *, request_id: Any, policy: str, domain: str | None, code: str,
                        latency_ms: float, load_ms: float, provider: str) -> dict:
    """A knowledge-base row for a model run that failed, so error rates count it."""
    return {
        "ts": time.time(), "request_id": str(request_id), "policy": policy,
        "model": model, "domain": domain, "latency_ms": latency_ms, "ttft_ms": None, "queue_ms": 0.0,
        "load_ms": load_ms, "tokens_in": 0, "tokens_out": 0, "tokens_per_s": None, "energy_j": None,
        "energy_estimated": True, "memory_mb": None, "confidence": None, "cache_hit": False, "provider": provider,
        "escalated_from": None, "error_code": code, "injected_slowdown": 1.0,
    }
