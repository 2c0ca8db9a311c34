"""Execute: run a request's work on the planned member under a cache lease, fall back to the next candidate
when a member fails, and escalate to the policy's larger member when Plan says the answer should be.

Every failed attempt, a first try or an escalation, is recorded the same way (an observation with error code
model_failed), so Analyze counts it against the member.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from calm_cli.errors import MemberFailure, ModelsFailed
from calm_cli.knowledge import Knowledge
from calm_cli.loop import monitor
from calm_cli.loop.execute.cache import MemberCache
from calm_cli.members.base import Member, Run, Work


@dataclass
class Attempts:
    """The first answer, the member it fell back from (if any), and each failure on the way."""

    run: Run
    fallback_from: str | None
    failures: list[str]


class Executor:
    """Runs work on members through the cache and records every run and failure in the knowledge base."""

    def __init__(self, members: Mapping[str, Member], cache: MemberCache, knowledge: Knowledge, policy: str,
                 log: Callable[[str], None] = lambda message: None):
        self.members, self.cache, self.knowledge, self.policy, self.log = members, cache, knowledge, policy, log

    def attempt(self, name: str, work: Work, stream: bool) -> Run:
        """One run of `work` on member `name`, loading it first if needed; it cannot be evicted meanwhile."""
        with self.cache.lease(name) as lease:
            run = self.members[name].run(lease.session, work, stream)
        run.hit, run.load_ms = lease.hit, lease.load_ms
        return run

    def failed(self, name: str, request_id: Any, domain: str | None, started: float,
               escalated_from: str | None = None) -> None:
        self.knowledge.record(monitor.failure_observation(
            name, request_id=request_id, policy=self.policy, domain=domain, code=MemberFailure.code,
            latency_ms=(time.perf_counter() - started) * 1000, escalated_from=escalated_from))

    def first(self, order: list[str], work: Work, stream: Callable[[str], bool], *, request_id: Any,
              domain: str | None, started: float) -> Attempts:
        """The first member of `order` that answers; ModelsFailed naming each failure when none does."""
        failures: list[str] = []
        for name in order:
            try:
                return Attempts(self.attempt(name, work, stream(name)), order[0] if failures else None, failures)
            except MemberFailure as exc:
                failures.append(f"{name}: {exc}")
                self.failed(name, request_id, domain, started)
        raise ModelsFailed("; ".join(failures))

    def escalate(self, first: Run, larger: str, work: Work, stream: bool, *, request_id: Any, domain: str | None,
                 started: float) -> Run | str:
        """The larger member's run, or why it failed (the first answer then stands)."""
        try:
            return self.attempt(larger, work, stream)
        except MemberFailure as exc:
            self.failed(larger, request_id, domain, started, escalated_from=first.model)
            message = f"escalation to {larger} failed, kept {first.model}'s answer: {exc}"
            self.log(message)
            return message

    def record(self, runs: list[Run], *, request_id: Any, domain: str | None, queue_ms: float) -> None:
        """One observation per run of an answered request."""
        self.knowledge.record_many([monitor.observation(
            run, request_id=request_id, policy=self.policy, domain=domain, queue_ms=queue_ms,
            escalated_from=runs[0].model if i else None) for i, run in enumerate(runs)])
