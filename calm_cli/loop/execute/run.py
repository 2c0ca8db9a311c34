"""Execute: run a request's job on the planned member through the scheduler, falling back to the next candidate
when a member fails, and on the policy's larger member when Plan says the answer should be escalated.

Every failed attempt, a first try or an escalation, is recorded the same way (an observation with error code
model_failed), so Analyze counts it against the member.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

from calm_cli.errors import MemberFailure, ModelsFailed
from calm_cli.knowledge import Knowledge
from calm_cli.loop import monitor
from calm_cli.loop.execute.scheduler import AskJob, Cancel, Driver, Ticket, WorkJob
from calm_cli.members.base import Run


@dataclass
class Attempts:
    """The first answer, the member it fell back from (if any), and each failure on the way."""

    run: Run
    fallback_from: str | None
    failures: list[str]
    queued_ms: float  # waiting for a member (and its load) inside the scheduler


class Executor:
    """Runs jobs on members through the scheduler and records every run and failure in the knowledge base."""

    def __init__(self, driver: Driver, knowledge: Knowledge, policy: str,
                 log: Callable[[str], None] = lambda message: None):
        self.driver, self.knowledge, self.policy, self.log = driver, knowledge, policy, log

    def _run(self, ticket: Ticket, request_id: Any, domain: str | None, started: float,
             escalated_from: str | None = None, cancel: Cancel | None = None) -> Run:
        """The ticket's run; every member that failed on the way is recorded, whatever the outcome."""
        if cancel is not None:
            cancel.attach(self.driver, ticket)
        try:
            run = self.driver.run(ticket)
        finally:
            for name, _ in ticket.failures:
                self.knowledge.record(monitor.failure_observation(
                    name, request_id=request_id, policy=self.policy, domain=domain, code=MemberFailure.code,
                    latency_ms=(time.perf_counter() - started) * 1000, escalated_from=escalated_from))
        run.hit, run.load_ms = ticket.hit, ticket.load_ms
        return run

    def first(self, order: list[str], job: AskJob | WorkJob, stream: Callable[[str], bool], *, request_id: Any,
              domain: str | None, started: float, predicted_ms: float = 0.0, waited_s: float = 0.0,
              timeout_s: float | None = None, cancel: Cancel | None = None) -> Attempts:
        """The first member of `order` that answers; ModelsFailed naming each failure when none does (Timeout
        when it waited `timeout_s` for a member; `waited_s` it had waited before)."""
        ticket = Ticket(job, list(order), stream, predicted_ms, timeout_s, arrived=time.monotonic() - waited_s)
        run = self._run(ticket, request_id, domain, started, cancel=cancel)
        return Attempts(run, order[0] if ticket.failures else None, [f"{m}: {e}" for m, e in ticket.failures],
                        ticket.queued_ms)

    def escalate(self, first: Run, larger: str, job: AskJob | WorkJob, stream: bool, *, request_id: Any,
                 domain: str | None, started: float, cancel: Cancel | None = None) -> Run | str:
        """The larger member's run, or why it failed (the first answer then stands)."""
        try:
            return self._run(Ticket(job, [larger], lambda member: stream), request_id, domain, started,
                             escalated_from=first.model, cancel=cancel)
        except ModelsFailed as exc:
            message = f"escalation to {larger} failed, kept {first.model}'s answer: {exc}"
            self.log(message)
            return message

    def record(self, runs: list[Run], *, request_id: Any, domain: str | None, queue_ms: float) -> None:
        """One observation per run of an answered request."""
        self.knowledge.record_many([monitor.observation(
            run, request_id=request_id, policy=self.policy, domain=domain, queue_ms=queue_ms,
            escalated_from=runs[0].model if i else None) for i, run in enumerate(runs)])
