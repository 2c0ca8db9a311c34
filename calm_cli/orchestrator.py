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
from calm_cli.engine.complete import complete
from calm_cli.engine.decoder import Decoder, PromptError
from calm_cli.engine.prompt import render, stop_strings
from calm_cli.engine.sampling import Sampling
from calm_cli.execute import CacheError, CacheEvent, DecayedDemand, ModelCache
from calm_cli.fleet import lock
from calm_cli.fleet.store import Store
from calm_cli.knowledge import Knowledge
from calm_cli.plan import Decision, Planner, Prediction
from calm_cli.policy import Member, Policy

WINDOW = 20  # recent requests per model that Analyze looks at: short, so slowdowns move traffic quickly
LOAD_MB_PER_S = 400.0  # load-time guess for a never-loaded model without a profile (disk and graph setup)


class Unavailable(RuntimeError):
    """A model the policy needs has no export (or the encoder is missing)."""


class ModelLoadError(RuntimeError):
    """A member's export exists but cannot be loaded (a damaged or foreign file): fall back, count it."""


class ModelsFailed(RuntimeError):
    """Every candidate member failed (the message names each failure)."""


@dataclass
class Run:
    """One member's work on one request, with its meters (the same fields for answers and bench items)."""

    model: str
    text: str
    latency_ms: float
    ttft_ms: float
    tokens_in: int
    tokens_out: int
    tokens_per_s: float
    energy_j: float
    energy_estimated: bool
    confidence: float
    provider: str
    stop_reason: str
    payload: Any = None  # what the work returned (a Completion, an evaluation Outcome)
    hit: bool = False
    load_ms: float = 0.0


Work = Callable[[Decoder, Member, bool], Run]


@dataclass
class Served:
    decision: Decision
    runs: list[Run]  # the first member's run, then the escalation's if any
    reason: str
    fallback_from: str | None
    routing_ms: float
    total_ms: float
    streamed: bool


class Calm:
    """One process's loop: the encoder, the planner, the model cache and the knowledge base."""

    def __init__(self, policy: Policy, store: Store, kb: Knowledge,
                 log: Callable[[str], None] = lambda message: None) -> None:
        self.policy, self.store, self.kb, self.log = policy, store, kb, log
        self.specs = lock.load()
        self.precision = str(settings.get("precision"))
        self.members = {m.model: m for m in policy.members}
        self.encoder = Encoder(self._export_dir(policy.encoder, encoder=True))
        self.planner = Planner(policy, list(policy.fleet), self.encoder.embed)
        self.demand = DecayedDemand()
        self.slowdown: dict[str, float] = {}  # injected by `calm bench --slow`; recorded with every observation
        self.adaptive = True  # False: predict from calibrated profiles only (the benchmark's static routing)
        self.cache = ModelCache(policy.cache, load=self._load, memory_of=self._memory_of,
                                estimate_mb=self._estimate_mb, load_cost_ms=self._load_cost_ms,
                                demand=self.demand, log=self._cache_event)
        self.calibration = kb.calibration([m.model for m in policy.members])
        self._profiles: dict[str, dict | None] = {}

    # ------------------------------------------------------------------ models and the cache

    def _export_dir(self, name: str, encoder: bool = False) -> Path:
        """A member's export at the served precision; the encoder's int8 export (fp32 if that is all there is)."""
        exports = self.store.exports(name)
        for wanted in (["int8", "fp32"] if encoder else [self.precision]):
            if wanted in exports:
                return exports[wanted]
        raise Unavailable(f"{name} has no {'int8' if encoder else self.precision} export: "
                          f"run `calm models export {name}`")

    def _load(self, name: str) -> Decoder:
        directory = self._export_dir(name)
        try:
            return Decoder.load(directory)
        except MemoryError:
            raise
        except Exception as exc:  # onnxruntime's errors (InvalidProtobuf, Fail...) derive from Exception only
            raise ModelLoadError(f"cannot load {directory}: {str(exc)[:300]}") from exc

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
        recent = self.kb.recent(name, WINDOW) if self.adaptive else []
        health = analyze.health(name, recent, self.policy.goals, profile)
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
        decision = self.planner.decide(query_vec, predictions, self.calibration)
        larger = self.policy.escalation_member
        if larger is not None:
            direct = self.planner.direct(query_vec, decision, self.calibration)
            if direct.escalate:
                chosen = self.planner.larger_candidate(query_vec, self.predict(larger), direct.expected_larger)
                return Decision(larger.model, [chosen, *decision.candidates],
                                f"straight to {larger.model}: {direct.reason}")
        return decision

    # ------------------------------------------------------------------ execute

    def _generate(self, request: dict, on_text: Callable[[str], None] | None) -> Work:
        """The work of a chat request: generate an answer with the member's prompt format."""

        def work(decoder: Decoder, member: Member, stream: bool) -> Run:
            spec = self.specs[member.model]
            sampling = Sampling(temperature=float(request.get("temperature", member.temperature)),
                                top_k=int(request.get("top_k", 0)), top_p=float(request.get("top_p", 1.0)),
                                seed=request.get("seed"))
            done = complete(decoder, render(spec.prompt, request["query"]),
                            int(request.get("max_tokens", member.max_tokens)), sampling,
                            stop_strings(spec.prompt), on_text=on_text if stream else None)
            return Run(member.model, done.text, done.latency_ms, done.ttft_ms, done.tokens_in, done.tokens_out,
                       done.tokens_per_s, done.energy_j, done.energy_estimated, done.confidence, done.provider,
                       done.stop_reason, payload=done)

        return work

    def _execute(self, member: Member, work: Work, stream: bool) -> Run:
        acquired = self.cache.acquire(member.model)
        self.demand.observe(member.model)
        run = work(acquired.session, member, stream)
        run.hit, run.load_ms = acquired.hit, acquired.load_ms
        factor = self.slowdown.get(member.model, 1.0)
        if factor > 1.0:  # an injected slowdown, for adaptation benchmarks: the wait is real and recorded
            extra = run.latency_ms * (factor - 1.0)
            time.sleep(extra / 1000)
            run.latency_ms += extra
        return run

    def serve(self, query: str, work: Work, *, request_id: Any, domain: str | None = None,
              forced: str | None = None, queue_ms: float = 0.0, stream: bool = False) -> Served:
        """Plan, execute with fallback, escalate on low confidence, and record what happened.

        `work` does the member's job on a loaded decoder (generate an answer, or score a benchmark item).
        With `stream`, only a run whose result is final may stream: when the first answer may still be
        escalated, it does not stream, and the caller passes it on whole if it stands.
        """
        started = time.perf_counter()
        query_vec = self.encoder.embed([query])[0]
        decision = Decision(forced, [], "forced by the request") if forced else self.plan(query_vec)
        routing_ms = (time.perf_counter() - started) * 1000
        # Fallbacks: members within the hard goals first, then the rest, since an answer that breaks a goal
        # beats none (a direct route to the larger member falls back to the planner's own choice this way).
        others = sorted((c for c in decision.candidates if c.model != decision.model),
                        key=lambda c: c.filtered_by is not None)
        order = [forced] if forced else [decision.model] + [c.model for c in others]
        esc = self.policy.escalation_member
        may_escalate = esc is not None and not forced
        first, fallback_from, failures = None, None, []
        for name in order:
            try:
                first = self._execute(self.members[name], work, stream and not (may_escalate and name != esc.model))
                break
            except (CacheError, Unavailable, RuntimeError, MemoryError) as exc:
                if isinstance(exc, PromptError):
                    raise
                failures.append(f"{name}: {exc}")
                self.kb.record(monitor.failure_observation(
                    name, request_id=request_id, policy=self.policy.name, domain=domain, code="model_failed",
                    latency_ms=(time.perf_counter() - started) * 1000, load_ms=0.0, provider="unknown"))
                fallback_from = fallback_from or name
        if first is None:
            raise ModelsFailed("; ".join(failures))
        runs = [first]
        escalation = (self.planner.escalation(query_vec, first.model, first.confidence, self.calibration)
                      if may_escalate and first.model != esc.model else None)
        escalation_failed = None
        if escalation is not None and escalation.escalate:
            try:
                runs.append(self._execute(esc, work, stream))
            except (CacheError, Unavailable, RuntimeError, MemoryError) as exc:
                escalation_failed = f"escalation to {esc.model} failed, kept {first.model}'s answer: {exc}"
                self.log(escalation_failed)
                self.kb.record(monitor.failure_observation(
                    esc.model, request_id=request_id, policy=self.policy.name, domain=domain, code="model_failed",
                    latency_ms=(time.perf_counter() - started) * 1000, load_ms=0.0, provider="unknown"))
        for i, run in enumerate(runs):
            self.kb.record(monitor.observation(
                run, request_id=request_id, policy=self.policy.name, domain=domain, queue_ms=queue_ms,
                escalated_from=first.model if i else None, slowdown=self.slowdown.get(run.model, 1.0)))
        reason = decision.reason
        if len(runs) > 1:
            reason += f"; escalated to {esc.model}: {escalation.reason}"
        elif escalation_failed:
            reason += f"; {escalation.reason}; {escalation_failed}"
        return Served(decision, runs, reason, fallback_from, routing_ms, (time.perf_counter() - started) * 1000,
                      streamed=stream and (runs[-1] is not first or not may_escalate or first.model == esc.model))

    def answer(self, request: dict, queue_ms: float = 0.0, on_text: Callable[[str], None] | None = None) -> dict:
        """One validated request (a dict per schemas/request.schema.json) -> its record.

        `on_text` receives the final answer as it is generated (held back whole while it may be escalated).
        In the knowledge base's degraded mode (calm_cli.knowledge) the record says so in its "knowledge" field.
        """
        record = self._answer(request, queue_ms, on_text)
        if self.kb.degraded is not None:
            record["knowledge"] = f"degraded: {self.kb.degraded}"
        return record

    def _answer(self, request: dict, queue_ms: float, on_text: Callable[[str], None] | None) -> dict:
        request_id, forced = request.get("id"), request.get("model")
        if forced is not None and forced not in self.members:
            return monitor.error_record(request_id, "bad_request",
                                        f"model {forced!r} is not a member of policy {self.policy.name} "
                                        f"({', '.join(self.members)})")
        try:
            served = self.serve(request["query"], self._generate(request, on_text), request_id=request_id,
                                domain=request.get("domain"), forced=forced, queue_ms=queue_ms,
                                stream=on_text is not None)
        except PromptError as exc:
            return monitor.error_record(request_id, "prompt_too_long" if "context" in str(exc) else "bad_request",
                                        str(exc))
        except ModelsFailed as exc:
            return monitor.error_record(request_id, "model_failed", str(exc))
        final = served.runs[-1]
        if on_text and not served.streamed:
            on_text(final.text)
        metrics = {
            "latency_ms": round(served.total_ms + queue_ms, 2),
            "ttft_ms": round(served.total_ms - sum(r.latency_ms for r in served.runs[-1:]) + final.ttft_ms, 2),
            "queue_ms": round(queue_ms, 2), "load_ms": round(sum(r.load_ms for r in served.runs), 2),
            "routing_ms": round(served.routing_ms, 2), "tokens_in": final.tokens_in, "tokens_out": final.tokens_out,
            "tokens_per_s": round(final.tokens_per_s, 2),
            "energy_j": round(sum(r.energy_j for r in served.runs), 4),
            "energy_estimated": any(r.energy_estimated for r in served.runs),
            "memory_mb": round(self.cache.state()["used_mb"], 1), "confidence": round(final.confidence, 4),
            "cache_hit": all(r.hit for r in served.runs), "provider": final.provider,
            "stop_reason": final.stop_reason, "precision": self.precision,
        }
        return {
            "id": request_id, "answer": final.text, "model": final.model, "error": None,
            "routing": {"policy": self.policy.name, "candidates": [c.as_dict() for c in served.decision.candidates],
                        "reason": served.reason,
                        "escalated_from": served.runs[0].model if len(served.runs) > 1 else None,
                        "fallback_from": served.fallback_from},
            "metrics": metrics,
        }

    def prefetch(self) -> list[str]:
        """Warm the fleet in policy order where the policy allows it and each fits without evicting."""
        loaded = []
        for member in self.policy.fleet:
            try:
                if self.cache.prefetch(member.model):
                    loaded.append(member.model)
            except Unavailable as exc:
                self.log(f"prefetch skipped {member.model}: {exc}")
        return loaded

    def stats(self) -> dict:
        return {"policy": self.policy.name, "cache": self.cache.state(), "precision": self.precision}
