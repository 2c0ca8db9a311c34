"""The MAPE-K loop, thin: for each request Monitor (meters, records), Analyze (what each member is expected to
cost now), Plan (score the members, pick one or route straight to the larger), Execute (run it under a cache
lease, fall back on failure, escalate when the answer should be), over the Knowledge base.

The loop receives its parts (the encoder's embed function, the planner, the analyzer, the executor, the
members and the knowledge base) instead of building them, so it runs with fakes in fast tests;
`calm_cli.loop.build` assembles the real ones. Shared by route, batch, serve-stdin, profile and bench.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping

import numpy as np

from calm_cli.errors import BadRequest, CalmError
from calm_cli.knowledge import Knowledge
from calm_cli.loop import monitor
from calm_cli.loop.analyze import Analyzer
from calm_cli.loop.execute.run import Executor
from calm_cli.loop.monitor import Served
from calm_cli.loop.plan import Decision, Planner
from calm_cli.engine.sampling import Sampling
from calm_cli.members.base import Ask, Member, Run, Work
from calm_cli.policy import Policy

Embed = Callable[[list[str]], np.ndarray]


def chat_work(request: dict, on_text: Callable[[str], None] | None) -> Work:
    """The work of a chat request: the member answers in its own prompt format, with its own max_tokens and
    temperature where the request sets none, streaming to `on_text` only when the loop says the run is final."""

    def work(member: Member, session: object, stream: bool) -> Run:
        config = member.config
        sampling = Sampling(temperature=float(request.get("temperature", config.temperature)),
                            top_k=int(request.get("top_k", 0)), top_p=float(request.get("top_p", 1.0)),
                            seed=request.get("seed"))
        ask = Ask(request["query"], int(request.get("max_tokens", config.max_tokens)), sampling,
                  on_text if stream else None)
        return member.generate(session, ask)

    return work


class Calm:
    """One process's loop over one policy's members."""

    def __init__(self, policy: Policy, *, embed: Embed, planner: Planner, analyzer: Analyzer, executor: Executor,
                 members: Mapping[str, Member], knowledge: Knowledge,
                 log: Callable[[str], None] = lambda message: None):
        self.policy, self.embed, self.planner, self.analyzer = policy, embed, planner, analyzer
        self.executor, self.members, self.kb, self.log = executor, members, knowledge, log
        self.cache = executor.cache

    def plan(self, query_vec: np.ndarray) -> Decision:
        """Analyze every member the policy may run, then Plan over the predictions."""
        predictions = {name: self.analyzer.predict(name, self.cache.loaded(name)) for name in self.members}
        return self.planner.route(query_vec, predictions, self.analyzer.calibration())

    def serve(self, query: str, work: Work, *, request_id: Any, domain: str | None = None,
              forced: str | None = None, queue_ms: float = 0.0, stream: bool = False) -> Served:
        """Plan, execute with fallback, escalate, and record what happened.

        `work` does the member's job on a loaded session (answer a question, or grade a benchmark item). With
        `stream`, only a run whose result is final may stream: while the first answer may still be escalated it
        does not stream, and the caller passes it on whole if it stands.
        """
        started = time.perf_counter()
        query_vec = self.embed([query])[0]
        decision = Decision(forced, [], "forced by the request") if forced else self.plan(query_vec)
        routing_ms = (time.perf_counter() - started) * 1000
        # Fallbacks: members within the hard goals first, then the rest, since an answer that breaks a goal
        # beats none (a direct route to the larger member falls back to the planner's own choice this way).
        others = sorted((c for c in decision.candidates if c.model != decision.model),
                        key=lambda c: c.filtered_by is not None)
        order = [forced] if forced else [decision.model] + [c.model for c in others]
        larger = self.policy.escalation_member
        may_escalate = larger is not None and not forced
        first = self.executor.first(
            order, work, lambda name: stream and not (may_escalate and name != larger.model),
            request_id=request_id, domain=domain, started=started)
        runs, reason = [first.run], decision.reason
        if may_escalate and first.run.model != larger.model:
            escalation = self.planner.escalation(query_vec, first.run.model, first.run.confidence,
                                                 self.analyzer.calibration())
            if escalation.escalate:
                second = self.executor.escalate(first.run, larger.model, work, stream, request_id=request_id,
                                                domain=domain, started=started)
                if isinstance(second, str):
                    reason += f"; {escalation.reason}; {second}"
                else:
                    runs.append(second)
                    reason += f"; escalated to {larger.model}: {escalation.reason}"
        self.executor.record(runs, request_id=request_id, domain=domain, queue_ms=queue_ms)
        streamed = stream and (len(runs) > 1 or not may_escalate or first.run.model == larger.model)
        return Served(decision, runs, reason, first.fallback_from, routing_ms,
                      (time.perf_counter() - started) * 1000, streamed)

    def answer(self, request: dict, queue_ms: float = 0.0, on_text: Callable[[str], None] | None = None) -> dict:
        """One validated request (a dict per schemas/request.schema.json) -> its record. Never raises for the
        request's sake: what went wrong is the record's error. In the knowledge base's degraded mode the record
        says so in its "knowledge" field.

        `on_text` receives the final answer as it is generated (held back whole while it may be escalated).
        """
        record = self._answer(request, queue_ms, on_text)
        if self.kb.degraded is not None:
            record["knowledge"] = f"degraded: {self.kb.degraded}"
        return record

    def _answer(self, request: dict, queue_ms: float, on_text: Callable[[str], None] | None) -> dict:
        request_id, forced = request.get("id"), request.get("model")
        try:
            if forced is not None and forced not in self.members:
                raise BadRequest(f"model {forced!r} is not a member of policy {self.policy.name} "
                                 f"({', '.join(self.members)})")
            served = self.serve(request["query"], chat_work(request, on_text), request_id=request_id,
                                domain=request.get("domain"), forced=forced, queue_ms=queue_ms,
                                stream=on_text is not None)
        except CalmError as exc:
            return monitor.error_record(request_id, exc.code, str(exc))
        if on_text and not served.streamed:
            on_text(served.runs[-1].text)
        return monitor.record(request_id, self.policy.name, served, queue_ms, self.cache.state()["used_mb"],
                              self.members[served.runs[-1].model].precision)

    def prefetch(self) -> list[str]:
        """Warm the fleet in policy order where the policy allows it and each fits without evicting."""
        loaded = []
        for member in self.policy.fleet:
            try:
                if self.cache.prefetch(member.model):
                    loaded.append(member.model)
            except CalmError as exc:
                self.log(f"prefetch skipped {member.model}: {exc}")
        return loaded

    def stats(self) -> dict:
        return {"policy": self.policy.name, "cache": self.cache.state(),
                "precision": next((m.precision for m in self.members.values() if m.precision), None)}
