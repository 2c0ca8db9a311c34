"""One interface for every fleet member, whatever runs it: today a local ONNX export (local.py); a remote
OpenAI-compatible server or a target with a draft model are other implementations, not branches in the loop.

The loop asks a member for its static cost (memory when loaded, what a cold load costs), to load (a session it
hands back to the member for each request) and to run a piece of work on that session: answer a question, or
whatever a benchmark item needs. Anything that goes wrong inside a member is a MemberFailure, so the loop falls
back by type.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable

from calm_cli.engine.batch import DecodeBatch, Generation
from calm_cli.engine.complete import Completion
from calm_cli.engine.sampling import Sampling
from calm_cli.errors import MemberFailure
from calm_cli.policy import MemberPolicy


class NotExported(MemberFailure):
    """A member the policy needs has no export at the served precision."""


class ModelLoadError(MemberFailure):
    """A member's export exists but cannot be loaded (a damaged or foreign file)."""


class RunFailed(MemberFailure):
    """A member failed while it ran a request (its runtime raised, memory ran out)."""


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
    injected_slowdown: float = 1.0  # set by a benchmark's slowdown hook (bench/hooks.py), recorded with the run
    draft: str | None = None  # what proposed the tokens it checked (speculative decoding), if anything did
    draft_tokens: int = 0
    accepted_tokens: int = 0


@dataclass(frozen=True)
class Ask:
    """A question for a member to answer in its own prompt format; `on_text` receives the answer as it comes."""

    query: str
    max_tokens: int
    sampling: Sampling = field(default_factory=Sampling)
    on_text: Callable[[str], None] | None = None
    stop: tuple[str, ...] = ()  # the request's own stop strings, besides the member's
    verify: str | None = None  # another member's answer to check and continue (escalation by verification)


# The work a request does on a loaded member: (member, session, stream) -> Run. A chat request asks the member
# to answer (loop/calm.py's chat_work); a benchmark grades an item instead.
Work = Callable[["Member", object, bool], Run]


class Member(ABC):
    """A fleet member: its policy entry, its static costs, and how to load it and run work on it."""

    name: str
    config: MemberPolicy
    precision: str | None  # the precision it serves (profiles are kept per precision); None when not local
    remote: bool = False  # served elsewhere: it takes no memory and no model slot in this process's cache
    parallel: int = 1  # requests it may run at once, each on its own (a remote server's); 1: one at a time

    @abstractmethod
    def estimate_mb(self) -> float:
        """Memory it is expected to take when loaded, before anything was measured."""

    @abstractmethod
    def load_estimate_ms(self) -> float:
        """What a cold load is expected to cost, before anything was measured."""

    @abstractmethod
    def load(self) -> object:
        """A session to run work on (slow; the cache calls it and keeps the result)."""

    @abstractmethod
    def memory_of(self, session: object) -> float:
        """What the loaded session takes."""

    @abstractmethod
    def generate(self, session: object, ask: Ask, draft: object | None = None) -> Run:
        """Answer a question, metered; `draft` is the session of the member that drafts for this one, when the
        scheduler could lend it (speculative decoding)."""

    def run(self, session: object, work: Work, stream: bool) -> Run:
        """Run `work` on the session; wrappers (a benchmark's slowdown) override this."""
        return work(self, session, stream)

    def batch(self, session: object) -> DecodeBatch | None:
        """Where this member decodes several questions together (continuous batching), if it can."""
        return None

    def prepare(self, session: object, ask: Ask) -> Generation:
        """A question as a generation its batch can take (only for members whose `batch` is not None)."""
        raise NotImplementedError(f"{self.name} does not batch")

    def run_of(self, session: object, completion: Completion) -> Run:
        """The run of a generation its batch finished."""
        raise NotImplementedError(f"{self.name} does not batch")
