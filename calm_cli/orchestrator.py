"""The MAPE-K loop in one object, shared by route, batch, serve-stdin, profile and bench in one process.

For each request: Monitor (meters and records), Analyze (recent QoS per model, from the knowledge base),
Plan (score the members, pick one), Execute (the cached-session scheduler runs it; fallback on failure;
escalation on low confidence), and write what was learned back to the Knowledge base.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from calm_cli import analyze, monitor, settings
from calm_cli.engine.embed import Encoder
from calm_cli.engine.generate import Completion, Decoder, PromptError
from calm_cli.engine.prompt import render, stop_strings
from calm_cli.engine.sampling import Sampling
from calm_cli.execute import CacheError, CacheEvent, DecayedDemand, ModelCache
from calm_cli.fleet import lock
from calm_cli.fleet.store import Store
from calm_cli.knowledge import KnowledgeBase
from calm_cli.plan import Candidate, Decision, Planner, Prediction
from calm_cli.policy import Member, Policy

WINDOW = 20  # recent requests per model that Analyze looks at: short, so slowdowns move traffic quickly
LOAD_MB_PER_S = 400.0  # load-time guess for a never-loaded model without a profile (disk and graph setup)


class Unavailable(RuntimeError):
    """A model the policy needs has no export (or the encoder is missing)."""


@dataclass
class Outcome:
    model: str
    done: Completion
    hit: bool
    load_ms: float


class Calm:
    """One process's loop: the encoder, the planner, the model cache and the knowledge base."""

    def __init__(self, policy: Policy, store: Store, kb: KnowledgeBase,
                 log: Callable[[str], None] = lambda message: None) -> None:
        self.policy, self.store, self.kb, self.log = policy, store, kb, log
        self.specs = lock.load()
        self.precision = str(settings.get("precision"))
        self.members = {m.model: m for m in policy.members}
        self.encoder = Encoder(self._export_dir(policy.encoder, encoder=True))
        self.planner = Planner(policy, list(policy.fleet), self.encoder.embed)
        self.demand = DecayedDemand()
        self.slowdown: dict[str, float] = {}  # injected by `calm bench --slow`; recorded with every observation
        self.cache = ModelCache(policy.cache, load=self._load, memory_of=self._memory_of,
                                estimate_mb=self._estimate_mb, load_cost_ms=self._load_cost_ms,
                                demand=self.demand, log=self._cache_event)
        self.calibration = kb.calibration([m.model for m in policy.members])
        self._profiles: dict[str, dict | None] = {}

    # ------------------------------------------------------------------ models and the cache

    def _export_dir(self, name: str, encoder: bool = False) -> Path:
        exports = self.store.exports(name)
        wanted = "int8" if encoder and self.precision == "int4" else self.precision
        if wanted not in exports:
            raise Unavailable(f"{name} has no {wanted} export: run `calm models export {name}`")
        return exports[wanted]

    def _load(self, name: str) -> Decoder:
        return Decoder(self._export_dir(name))

    def _weights_mb(self, name: str) -> float:
        directory = self._export_dir(name)
        return sum(p.stat().st_size for p in directory.glob("model.onnx*")) / 2**20

    def _memory_of(self, name: str, decoder: Decoder) -> float:
        # RSS growth undercounts a reload into memory freed by an earlier session; weights never lie.
        return max(decoder.memory_mb, self._weights_mb(name))

    def _profile(self, name: str) -> dict | None:
        if name not in self._profiles:
            self._profiles[name] = self.kb.profile(name, self.precision)
        return self._profiles[name]

    def _estimate_mb(self, name: str) -> float:
        profile = self._profile(name)
        return float(profile["memory_mb"]) if profile and profile.get("memory_mb") else self._weights_mb(name) * 1.2

    def _load_cost_ms(self, name: str) -> float:
        profile = self._profile(name)
        if profile and profile.get("load_ms"):
            return float(profile["load_ms"])
        return self._weights_mb(name) / LOAD_MB_PER_S * 1000

    def _cache_event(self, event: CacheEvent) -> None:
        self.log(f"cache: {event.kind} {event.model} ({event.memory_mb:.0f} MB): {event.reason}")

    # ------------------------------------------------------------------ analyze + plan

    def predict(self, member: Member) -> Prediction:
        """What a request is expected to cost on `member`, from recent runs, else its profile."""
        name = member.model
        profile = self._profile(name)
        health = analyze.health(name, self.kb.recent(name, WINDOW), self.policy.goals, profile)
        loaded = any(entry["model"] == name for entry in self.cache.state()["loaded"])
        load_ms = 0.0 if loaded else self._load_cost_ms(name)
        memory = self._estimate_mb(name)
        tokens = health.tokens_out or min(member.max_tokens, 64)
        if health.ms_per_token is not None:
            return Prediction(health.ttft_ms + tokens * health.ms_per_token, health.joules_per_token * tokens,
                              memory, load_ms, True)
        if profile and profile.get("tokens_per_s"):
            latency = profile["ttft_ms"] + tokens * 1000.0 / profile["tokens_per_s"]
            return Prediction(latency, (profile.get("joules_per_token") or 0.0) * tokens, memory, load_ms, True)
        return Prediction(0.0, 0.0, memory, load_ms, False)

    def plan(self, query_vec: np.ndarray) -> Decision:
        predictions = {m.model: self.predict(m) for m in self.policy.fleet}
        return self.planner.decide(query_vec, predictions, self.calibration)

    # ------------------------------------------------------------------ execute

    def _run(self, member: Member, query: str, request: dict,
             on_text: Callable[[str], None] | None = None) -> Outcome:
        spec = self.specs[member.model]
        acquired = self.cache.acquire(member.model)
        self.demand.observe(member.model)
        decoder: Decoder = acquired.session
        sampling = Sampling(temperature=float(request.get("temperature", member.temperature)),
                            top_k=int(request.get("top_k", 0)), top_p=float(request.get("top_p", 1.0)),
                            seed=request.get("seed"))
        max_tokens = int(request.get("max_tokens", member.max_tokens))
        done = decoder.complete(render(spec.prompt, query), max_tokens, sampling, stop_strings(spec.prompt),
                                on_text=on_text)
        factor = self.slowdown.get(member.model, 1.0)
        if factor > 1.0:  # an injected slowdown, for adaptation benchmarks: the wait is real and recorded
            extra = done.latency_ms * (factor - 1.0)
            time.sleep(extra / 1000)
            done.latency_ms += extra
        return Outcome(member.model, done, acquired.hit, acquired.load_ms)

    def answer(self, request: dict, queue_ms: float = 0.0, on_text: Callable[[str], None] | None = None) -> dict:
        """One validated request (a dict per schemas/request.schema.json) -> its record.

        `on_text` receives the final answer as it is generated. When the first answer may still be
        escalated, it is held back and passed on whole if it stands; the escalated answer streams.
        """
        started = time.perf_counter()
        request_id, query, domain = request.get("id"), request["query"], request.get("domain")
        forced = request.get("model")
        if forced is not None and forced not in self.members:
            return monitor.error_record(request_id, "bad_request",
                                        f"model {forced!r} is not a member of policy {self.policy.name} "
                                        f"({', '.join(self.members)})")
        query_vec = self.encoder.embed([query])[0]
        if forced:
            decision = Decision(forced, [], "forced by the request")
        else:
            decision = self.plan(query_vec)
        routing_ms = (time.perf_counter() - started) * 1000
        order = [decision.model] + [c.model for c in decision.candidates
                                    if c.model != decision.model and c.filtered_by is None]
        first, fallback_from, failures = None, None, []
        esc = self.policy.escalation_member
        may_escalate = esc is not None and not forced
        for name in order if not forced else [forced]:
            try:
                first = self._run(self.members[name], query, request,
                                  None if may_escalate and name != esc.model else on_text)
                break
            except PromptError as exc:
                return monitor.error_record(request_id, "prompt_too_long" if "context" in str(exc) else
                                            "bad_request", str(exc))
            except (CacheError, Unavailable, RuntimeError, MemoryError) as exc:
                failures.append(f"{name}: {exc}")
                self.kb.record(monitor.failure_observation(
                    name, request_id=request_id, policy=self.policy.name, domain=domain, code="model_failed",
                    latency_ms=(time.perf_counter() - started) * 1000, load_ms=0.0, provider="unknown"))
                fallback_from = fallback_from or name
        if first is None:
            return monitor.error_record(request_id, "model_failed", "; ".join(failures))
        runs = [first]
        escalated_from = None
        if (may_escalate and first.model != esc.model
                and first.done.confidence < self.policy.escalation["confidence_threshold"]):
            try:
                runs.append(self._run(esc, query, request, on_text))
                escalated_from = first.model
            except (CacheError, Unavailable, RuntimeError, MemoryError) as exc:
                self.log(f"escalation to {esc.model} failed, keeping {first.model}'s answer: {exc}")
        if on_text and may_escalate and first.model != esc.model and not escalated_from:
            on_text(first.done.text)
        for i, run in enumerate(runs):
            self.kb.record(monitor.observation(
                run.model, run.done, request_id=request_id, policy=self.policy.name, domain=domain,
                load_ms=run.load_ms, cache_hit=run.hit, escalated_from=first.model if i else None,
                slowdown=self.slowdown.get(run.model, 1.0), queue_ms=queue_ms))
        final = runs[-1]
        total_ms = (time.perf_counter() - started) * 1000
        metrics = {
            "latency_ms": round(total_ms + queue_ms, 2), "ttft_ms": round(routing_ms + sum(
                r.load_ms + r.done.latency_ms for r in runs[:-1]) + final.load_ms + final.done.ttft_ms, 2),
            "queue_ms": round(queue_ms, 2), "load_ms": round(sum(r.load_ms for r in runs), 2),
            "routing_ms": round(routing_ms, 2), "tokens_in": final.done.tokens_in,
            "tokens_out": final.done.tokens_out, "tokens_per_s": round(final.done.tokens_per_s, 2),
            "energy_j": round(sum(r.done.energy_j for r in runs), 4),
            "energy_estimated": any(r.done.energy_estimated for r in runs),
            "memory_mb": round(self.cache.state()["used_mb"], 1),
            "confidence": round(final.done.confidence, 4), "cache_hit": all(r.hit for r in runs),
            "provider": final.done.provider, "stop_reason": final.done.stop_reason, "precision": self.precision,
        }
        reason = decision.reason
        if escalated_from:
            reason += (f"; escalated to {final.model}: confidence {first.done.confidence:.2f} < "
                       f"{self.policy.escalation['confidence_threshold']}")
        return {
            "id": request_id, "answer": final.done.text, "model": final.model, "error": None,
            "routing": {"policy": self.policy.name, "candidates": [c.as_dict() for c in decision.candidates],
                        "reason": reason, "escalated_from": escalated_from, "fallback_from": fallback_from},
            "metrics": metrics,
        }

    def stats(self) -> dict:
        return {"policy": self.policy.name, "cache": self.cache.state(), "precision": self.precision}
