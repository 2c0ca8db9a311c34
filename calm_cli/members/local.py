"""A fleet member served here: an ONNX export of a models.lock model, run by calm's engine (onnxruntime)."""

from __future__ import annotations

from pathlib import Path

from calm_cli import settings
from calm_cli.engine.batch import DecodeBatch, Generation
from calm_cli.engine.complete import Completion, complete
from calm_cli.engine.decoder import Decoder
from calm_cli.engine.prompt import render, stop_strings
from calm_cli.engine.sampling import Sampler
from calm_cli.engine.session import ORT_ERRORS, ProviderError
from calm_cli.engine.speculate import Speculation, draft_tokens, shares_tokenizer
from calm_cli.engine.textstream import TextStream
from calm_cli.errors import CalmError
from calm_cli.fleet.lock import ModelSpec
from calm_cli.members.base import Ask, Member, ModelLoadError, NotExported, Run, RunFailed, Work
from calm_cli.policy import MemberPolicy

LOAD_MB_PER_S = 400.0  # load-time guess for a never-loaded member without a profile (disk and graph setup)
OVERHEAD = 1.2  # memory of a loaded session beyond its weights, before anything was measured


class LocalMember(Member):
    """`export` is the member's export directory at the served precision, None when it has none (then it
    fails to load, naming the command that makes it, and the loop falls back)."""

    def __init__(self, config: MemberPolicy, spec: ModelSpec, precision: str, export: Path | None):
        self.name, self.config, self.spec, self.precision, self.export = config.model, config, spec, precision, export

    def _weights_mb(self) -> float:
        if self.export is None:  # not exported yet: the GGUF's size is the best guess of the int4 weights
            return sum(f.size for f in self.spec.files) / 2**20
        return sum(p.stat().st_size for p in self.export.glob("model.onnx*")) / 2**20

    def estimate_mb(self) -> float:
        return self._weights_mb() * OVERHEAD

    def load_estimate_ms(self) -> float:
        return self._weights_mb() / LOAD_MB_PER_S * 1000

    def load(self) -> Decoder:
        if self.export is None:
            raise NotExported(f"{self.name} has no {self.precision} export: run `calm models export {self.name}`")
        try:
            return Decoder.load(self.export)
        except MemoryError as exc:
            raise ModelLoadError(f"cannot load {self.export}: out of memory") from exc
        except (*ORT_ERRORS, ProviderError, OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(f"cannot load {self.export}: {str(exc)[:300]}") from exc

    def memory_of(self, session: object) -> float:
        # RSS growth undercounts a reload into memory freed by an earlier session; weights never lie.
        assert isinstance(session, Decoder)
        return max(session.memory_mb, self._weights_mb())

    def speculation(self, session: Decoder, ask: Ask, draft: object | None) -> Speculation | None:
        """How this answer speculates: verifying the answer it was given (escalation), else with the draft
        member lent for it, else prompt lookup, as the policy and CALM_SPECULATE say."""
        tokens = self.config.draft_tokens
        k, adaptive = (int(settings.get("speculate")), False) if tokens is None else draft_tokens(tokens)
        if ask.verify is not None:  # past the first disagreement, how well n-grams guess is unknown: adapt
            return Speculation(max(k, 1), True, reference=ask.verify)
        if self.config.draft == "none":
            return None
        if isinstance(draft, Decoder) and shares_tokenizer(session, draft):
            return Speculation(max(k, 1), adaptive, model=draft, model_name=self.config.draft_model)
        return Speculation(k, adaptive) if k > 0 else None

    def generate(self, session: object, ask: Ask, draft: object | None = None) -> Run:
        assert isinstance(session, Decoder)
        done = complete(session, render(self.spec.prompt, ask.query), ask.max_tokens, ask.sampling,
                        [*stop_strings(self.spec.prompt), *ask.stop], on_text=ask.on_text,
                        speculation=self.speculation(session, ask, draft))
        return self.run_of(session, done)

    def batch(self, session: object) -> DecodeBatch | None:
        """Continuous batching on the fused CPU graph (the plain graph, CUDA's, answers one at a time)."""
        assert isinstance(session, Decoder)
        rows = int(settings.get("batch"))
        return DecodeBatch(session, rows, int(settings.get("batch_tokens"))) if session.fused and rows > 1 else None

    def prepare(self, session: object, ask: Ask) -> Generation:
        assert isinstance(session, Decoder)
        ids = session.fit(session.encode(render(self.spec.prompt, ask.query)), ask.max_tokens, truncate=False)
        return Generation(ids, ask.max_tokens, Sampler(ask.sampling),
                          TextStream(session.tokenizer, [*stop_strings(self.spec.prompt), *ask.stop]),
                          on_text=ask.on_text)

    def run_of(self, session: object, completion: Completion) -> Run:
        done = completion
        return Run(self.name, done.text, done.latency_ms, done.ttft_ms, done.tokens_in, done.tokens_out,
                   done.tokens_per_s, done.energy_j, done.energy_estimated, done.confidence, done.provider,
                   done.stop_reason, payload=done, draft=done.draft, draft_tokens=done.draft_tokens,
                   accepted_tokens=done.accepted_tokens)

    def run(self, session: object, work: Work, stream: bool) -> Run:
        try:
            return work(self, session, stream)
        except CalmError:
            raise
        except (*ORT_ERRORS, MemoryError) as exc:
            raise RunFailed(f"{self.name} failed while answering: {type(exc).__name__}: {str(exc)[:300]}") from exc
