"""What `calm bench` injects into a loop to test its adaptation, kept out of the loop: members made slower from
a chosen request on (the wait is real and recorded with each run)."""

from __future__ import annotations

import time

from calm_cli.members.base import Ask, Member, Run, Work


class Slowed(Member):
    """`inner`, made `factor` times slower once `factor` is set above 1 (the slow scenario sets it mid-run)."""

    def __init__(self, inner: Member):
        self.inner, self.factor = inner, 1.0
        self.name, self.config, self.precision, self.remote = inner.name, inner.config, inner.precision, inner.remote
        self.parallel = inner.parallel

    def estimate_mb(self) -> float:
        return self.inner.estimate_mb()

    def load_estimate_ms(self) -> float:
        return self.inner.load_estimate_ms()

    def load(self) -> object:
        return self.inner.load()

    def memory_of(self, session: object) -> float:
        return self.inner.memory_of(session)

    def generate(self, session: object, ask: Ask, draft: object | None = None) -> Run:
        return self.inner.generate(session, ask, draft)

    def run(self, session: object, work: Work, stream: bool) -> Run:
        run = self.inner.run(session, lambda member, s, st: work(self, s, st), stream)
        if self.factor > 1.0:
            extra = run.latency_ms * (self.factor - 1.0)
            time.sleep(extra / 1000)
            run.latency_ms += extra
            run.injected_slowdown = self.factor
        return run
