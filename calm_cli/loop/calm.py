"""The MAPE-K loop, thin: for each request Monitor (meters, records), Analyze (what each member is expected to
cost now), Plan (score the members, pick one or route straight to the larger), Execute (run it under a cache
lease, fall back on failure, escalate when the answer should be), over the Knowledge base.

The loop receives its parts (the encoder's embed function, the planner, the analyzer, the executor, the
members and the knowledge base) instead of building them, so it runs with fakes in fast tests;
`calm_cli.loop.build` assembles the real ones. Shared by route, batch, serve-stdin, profile and bench.
"""

from __future__ import annotations

import time
from dataclasses import replace
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
from calm_cli.loop.execute.scheduler import AskJob, Cancel, WorkJob
from calm_cli.members.base import Ask, Member
from calm_cli.policy import Policy

Embed = Callable[[list[str]], np.ndarray]


def chat_job(request: dict, on_text: Callable[[str], None] | None,
             on_final: Callable[[str], None] | None = None) -> AskJob:
    """A chat request's job: each member answers in its own prompt format, with its own max_tokens and
    temperature where the request sets none, streaming to `on_text` only when the loop says the run is final
    (`on_final` hears that member's name first, so a front can name it before the first piece)."""

    def ask_for(member: Member, stream: bool) -> Ask:
        config = member.config
        sampling = Sampling(temperature=float(request.get("temperature", config.temperature)),
                            top_k=int(request.get("top_k", 0)), top_p=float(request.get("top_p", 1.0)),
                            seed=request.get("seed"))
        if stream and on_final is not None:
            on_final(member.name)
        return Ask(request["query"], int(request.get("max_tokens", config.max_tokens)), sampling,
                   on_text if stream else None, tuple(request.get("stop", ())))

    return AskJob(ask_for)


class Calm:
    """One process's loop over one policy's members."""

    def __init__(self, policy: Policy, *, embed: Embed, planner: Planner, analyzer: Analyzer, executor: Executor,
                 members: Mapping[str, Member], knowledge: Knowledge,
                 log: Callable[[str], None] = lambda message: None):
        self.policy, self.embed, self.planner, self.analyzer = policy, embed, planner, analyzer
        self.executor, self.members, self.kb, self.log = executor, members, knowledge, log
        self.driver = executor.driver
        self.cache = self.driver.scheduler.cache

    def plan(self, query_vec: np.ndarray) -> Decision:
        """Analyze every member the policy may run, then Plan over the predictions."""
        predictions = {name: self.analyzer.predict(name, self.cache.loaded(name)) for name in self.members}
        return self.planner.route(query_vec, predictions, self.analyzer.calibration())

    def serve(self, query: str, job: AskJob | WorkJob, *, request_id: Any, domain: str | None = None,
              forced: str | None = None, queue_ms: float = 0.0, stream: bool = False,
              timeout_s: float | None = None, cancel: Cancel | None = None) -> Served:
        """Plan, execute with fallback, escalate, and record what happened.

        `job` is the member's work: a question (batched where the member batches) or any work on its session
        (grading a benchmark item). With
        `stream`, only a run whose result is final may stream: while the first answer may still be escalated it
        does not stream, and the caller passes it on whole if it stands.
        """
        started = time.perf_counter()
        # A forced member needs no routing and is never escalated: no embedding either.
        query_vec = None if forced else self.embed([query])[0]
        decision = Decision(forced, [], "forced by the request") if forced else self.plan(query_vec)
        routing_ms = (time.perf_counter() - started) * 1000
        # Fallbacks: members within the hard goals first, then the rest, since an answer that breaks a goal
        # beats none (a direct route to the larger member falls back to the planner's own choice this way).
        others = sorted((c for c in decision.candidates if c.model != decision.model),
                        key=lambda c: c.filtered_by is not None)
        order = [forced] if forced else [decision.model] + [c.model for c in others]
        larger = self.policy.escalation_member
        may_escalate = larger is not None and not forced
        chosen = next((c for c in decision.candidates if c.model == order[0]), None)
        first = self.executor.first(
            order, job, lambda name: stream and not (may_escalate and name != larger.model),
            request_id=request_id, domain=domain, started=started,
            predicted_ms=((chosen.latency_ms or 0.0) + chosen.load_ms) if chosen else 0.0,
            waited_s=queue_ms / 1000 + (time.perf_counter() - started), timeout_s=timeout_s, cancel=cancel)
        runs, reason = [first.run], decision.reason
        if may_escalate and first.run.model != larger.model and not (cancel and cancel.cancelled):
            escalation = self.planner.escalation(query_vec, first.run.model, first.run.confidence,
                                                 self.analyzer.calibration())
            if escalation.escalate:
                second = self.executor.escalate(first.run, larger.model, self._escalation_job(job, first.run.text),
                                                stream, request_id=request_id,
                                                domain=domain, started=started, cancel=cancel)
                if isinstance(second, str):
                    reason += f"; {escalation.reason}; {second}"
                else:
                    runs.append(second)
                    reason += f"; escalated to {larger.model}: {escalation.reason}"
                    if second.draft == "answer":
                        reason += (f"; it kept {second.accepted_tokens} of the {second.draft_tokens} answer tokens "
                                   "it checked")
                if (agreed := self.analyzer.agreement(first.run.model, larger.model)) is not None:
                    reason += (f"; recent verified escalations from {first.run.model} kept {agreed[0]:.0%} of its "
                               f"answers' tokens (n={agreed[1]})")
        self.executor.record(runs, request_id=request_id, domain=domain, queue_ms=queue_ms + first.queued_ms)
        streamed = stream and (len(runs) > 1 or not may_escalate or first.run.model == larger.model)
        return Served(decision, runs, reason, first.fallback_from, routing_ms,
                      (time.perf_counter() - started) * 1000, streamed, first.queued_ms)

    def _escalation_job(self, job: AskJob | WorkJob, answer: str) -> AskJob | WorkJob:
        """The larger member's job: with escalation mode verify, a question checks the first answer and goes on
        from the first token it disagrees with (alone: the whole answer is checked in a few steps)."""
        if not self.policy.verifies or not isinstance(job, AskJob):
            return job
        return AskJob(lambda member, stream: replace(job.ask_for(member, stream), verify=answer), alone=True)

    def answer(self, request: dict, queue_ms: float = 0.0, on_text: Callable[[str], None] | None = None,
               timeout_s: float | None = None, cancel: Cancel | None = None,
               on_final: Callable[[str], None] | None = None) -> dict:
        """One validated request (a dict per schemas/request.schema.json) -> its record. Never raises for the
        request's sake: what went wrong is the record's error. In the knowledge base's degraded mode the record
        says so in its "knowledge" field.

        `on_text` receives the final answer as it is generated (held back whole while it may be escalated).
        `cancel` gives the request up (a client went away); `on_final` hears the member whose answer streams,
        before its first piece.
        """
        record = self._answer(request, queue_ms, on_text, timeout_s, cancel, on_final)
        if self.kb.degraded is not None:
            record["knowledge"] = f"degraded: {self.kb.degraded}"
        return record

    def _answer(self, request: dict, queue_ms: float, on_text: Callable[[str], None] | None,
                timeout_s: float | None, cancel: Cancel | None, on_final: Callable[[str], None] | None) -> dict:
        request_id, forced = request.get("id"), request.get("model")
        try:
            if forced is not None and forced not in self.members:
                raise BadRequest(f"model {forced!r} is not a member of policy {self.policy.name} "
                                 f"({', '.join(self.members)})")
            served = self.serve(request["query"], chat_job(request, on_text, on_final), request_id=request_id,
                                domain=request.get("domain"), forced=forced, queue_ms=queue_ms,
                                stream=on_text is not None, timeout_s=timeout_s, cancel=cancel)
        except CalmError as exc:
            return monitor.error_record(request_id, exc.code, str(exc))
        if on_text and not served.streamed:
            on_text(served.runs[-1].text)
        return monitor.record(request_id, self.policy.name, served, queue_ms, self.cache.state()["used_mb"],
                              self.members[served.runs[-1].model].precision)

    def prefetch(self) -> None:
        """Warm the fleet in policy order where the policy allows it and each fits without evicting (the loads
        run in the background; a request for a member being loaded waits for that load)."""
        for member in self.policy.fleet:
            self.driver.prefetch(member.model)

    def stats(self) -> dict:
        return {"policy": self.policy.name, "cache": self.cache.state(), "scheduler": self.driver.state(),
                "precision": next((m.precision for m in self.members.values() if m.precision), None)}

    def close(self, drain: bool = True) -> None:
        """Stop the scheduler: with `drain`, after what it took is done; else what waits ends as unavailable."""
        self.driver.shutdown(drain)
