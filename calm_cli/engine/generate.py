"""Generation and scoring over an exported decoder: onnxruntime + numpy + tokenizers, no torch.

The graph Optimum exports takes the whole past KV cache in and returns a longer `present` cache each step;
this loop feeds the cache back by name.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from tokenizers.decoders import DecodeStream

from calm_cli.engine.meters import EnergyMeter, rss_mb
from calm_cli.engine.sampling import Sampler, Sampling, log_softmax
from calm_cli.engine.session import open_session, provider_of
from calm_cli.fleet.gguf_tokenizer import GGUFTokenizer, load_tokenizer

_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class PromptError(ValueError):
    """A prompt the model cannot take: empty, not UTF-8, or longer than the context window."""


@dataclass(frozen=True)
class Step:
    token: int
    logprob: float  # log p(token) under the model (temperature 1), whatever the sampling


@dataclass
class Completion:
    """One answer with its meters; the JSON record's metrics are these fields."""

    text: str
    tokens_in: int
    tokens_out: int
    logprobs: list[float]
    latency_ms: float
    ttft_ms: float
    tokens_per_s: float
    energy_j: float
    energy_estimated: bool
    memory_mb: float
    provider: str
    stop_reason: str  # "eos", "stop_string" or "length"

    @property
    def confidence(self) -> float:
        """exp(mean token log-probability): the geometric-mean probability of the answer's tokens, 0..1."""
        return float(np.exp(np.mean(self.logprobs))) if self.logprobs else 0.0

    def metrics(self) -> dict:
        return {
            "latency_ms": round(self.latency_ms, 2), "ttft_ms": round(self.ttft_ms, 2),
            "tokens_in": self.tokens_in, "tokens_out": self.tokens_out,
            "tokens_per_s": round(self.tokens_per_s, 2), "energy_j": round(self.energy_j, 4),
            "energy_estimated": self.energy_estimated, "memory_mb": round(self.memory_mb, 1),
            "confidence": round(self.confidence, 4), "provider": self.provider,
        }


@dataclass
class Decoder:
    """One loaded decoder model: its session, tokenizer, cache layout and load-time footprint."""

    directory: Path
    tokenizer: GGUFTokenizer = field(init=False)

    def __post_init__(self) -> None:
        started, before = time.perf_counter(), rss_mb()
        self.session = open_session(self.directory / "model.onnx")
        self.provider = provider_of(self.session)
        self.meter = EnergyMeter(on_gpu=self.provider == "CUDAExecutionProvider")
        self.load_ms = (time.perf_counter() - started) * 1000
        self.memory_mb = rss_mb() - before if self.meter.handle is None else self.meter.memory_mb()
        self.tokenizer = load_tokenizer(self.directory)
        config = json.loads((self.directory / "config.json").read_text(encoding="utf-8"))
        self.context = int(config.get("max_position_embeddings") or 2048)
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.past_names = [n for n in inputs if n.startswith("past_key_values.")]
        _, heads, _, head_dim = inputs[self.past_names[0]].shape
        self.cache_shape = (int(heads), int(head_dim))
        self.cache_type = _NP_TYPES[inputs[self.past_names[0]].type]
        self.uses_position_ids = "position_ids" in inputs
        self.output_names = ["logits", *(n.replace("past_key_values.", "present.") for n in self.past_names)]

    def encode(self, prompt: str) -> list[int]:
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise PromptError(f"the prompt is not valid UTF-8 (at character {exc.start})") from None
        ids = self.tokenizer.encode(prompt)
        if not ids:
            raise PromptError("the prompt is empty")
        return ids

    def _empty_cache(self, batch: int) -> dict[str, np.ndarray]:
        return {n: np.zeros((batch, self.cache_shape[0], 0, self.cache_shape[1]), self.cache_type)
                for n in self.past_names}

    def _forward(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray,
                 past: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        feed = {"input_ids": ids, "attention_mask": mask, **past}
        if self.uses_position_ids:
            feed["position_ids"] = positions
        logits, *presents = self.session.run(self.output_names, feed)
        return logits, dict(zip(self.past_names, presents))

    def logits(self, ids: list[int]) -> np.ndarray:
        """Next-token logits after every position of `ids` in one pass: [len(ids), vocab]."""
        if len(ids) > self.context:
            raise PromptError(f"{len(ids)} tokens exceed the context window of {self.context} tokens")
        n = len(ids)
        logits, _ = self._forward(np.asarray([ids], dtype=np.int64), np.ones((1, n), dtype=np.int64),
                                  np.arange(n, dtype=np.int64)[None, :], self._empty_cache(1))
        return logits[0]

    def score(self, context: list[int], continuation: list[int]) -> list[float]:
        """log p(continuation token | everything before it), one per continuation token."""
        if not context or not continuation:
            raise PromptError("scoring needs a non-empty context and continuation")
        logp = log_softmax(self.logits(context + continuation)[len(context) - 1:-1])
        return [float(logp[i, t]) for i, t in enumerate(continuation)]

    def fit(self, ids: list[int], max_new_tokens: int, truncate: bool) -> list[int]:
        """The prompt as it can be fed: refused, or cut from the left when `truncate`, if too long."""
        room = self.context - max_new_tokens
        if len(ids) <= room:
            return ids
        if truncate and room > 0:
            return ids[len(ids) - room:]
        raise PromptError(f"prompt of {len(ids)} tokens + {max_new_tokens} new tokens exceeds the context window "
                          f"of {self.context} tokens (ask for truncation, or fewer new tokens)")

    def generate(self, prompt_ids: list[int], max_new_tokens: int, sampling: Sampling = Sampling(),
                 truncate: bool = False, stop_at_eos: bool = True) -> Iterator[Step]:
        """Chosen tokens with their log-probabilities; stops at the model's stop tokens (not yielded).

        stop_at_eos=False runs to max_new_tokens regardless, for benchmarks that need a fixed length.
        """
        prompt_ids = self.fit(prompt_ids, max_new_tokens, truncate)
        sampler = Sampler(sampling)
        stops = set(self.tokenizer.stop_ids) if stop_at_eos else set()
        past = self._empty_cache(1)
        step_ids = np.asarray([prompt_ids], dtype=np.int64)
        seen = 0
        for _ in range(max_new_tokens):
            total = seen + step_ids.shape[1]
            logits, past = self._forward(step_ids, np.ones((1, total), dtype=np.int64),
                                         np.arange(seen, total, dtype=np.int64)[None, :], past)
            last = logits[0, -1]
            token = sampler.choose(last)
            if token in stops:
                return
            yield Step(token, float(log_softmax(last)[token]))
            seen = total
            step_ids = np.asarray([[token]], dtype=np.int64)

    def greedy(self, prompt_ids: list[int], max_new_tokens: int) -> Iterator[int]:
        return (step.token for step in self.generate(prompt_ids, max_new_tokens))

    def generate_batch(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy answers to several prompts in one batch (left padding, masked), for batch work."""
        if not prompts or any(not p for p in prompts):
            raise PromptError("every prompt of a batch must be non-empty")
        for p in prompts:
            self.fit(p, max_new_tokens, truncate=False)
        width = max(map(len, prompts))
        pad = self.tokenizer.pad_id or 0
        ids = np.asarray([[pad] * (width - len(p)) + p for p in prompts], dtype=np.int64)
        mask = np.asarray([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=np.int64)
        stops = set(self.tokenizer.stop_ids)
        out: list[list[int]] = [[] for _ in prompts]
        done = np.zeros(len(prompts), dtype=bool)
        past = self._empty_cache(len(prompts))
        step_ids = ids
        for _ in range(max_new_tokens):
            positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)[:, -step_ids.shape[1]:]
            logits, past = self._forward(step_ids, mask, positions, past)
            tokens = logits[:, -1].argmax(-1)
            for row, token in enumerate(tokens.tolist()):
                if not done[row]:
                    if token in stops:
                        done[row] = True
                    else:
                        out[row].append(token)
            if done.all():
                break
            step_ids = np.where(done, pad, tokens)[:, None].astype(np.int64)
            mask = np.concatenate([mask, np.ones((len(prompts), 1), dtype=np.int64)], axis=1)
        return out

    def complete(self, prompt: str, max_new_tokens: int, sampling: Sampling = Sampling(),
                 stop: list[str] = (), on_text: Callable[[str], None] | None = None,
                 truncate: bool = False) -> Completion:
        """Answer `prompt`, streaming text to `on_text` as it is produced, and measure the work."""
        self.meter.start()
        started = time.perf_counter()
        ids = self.fit(self.encode(prompt), max_new_tokens, truncate)
        steps: list[Step] = []
        first = None
        pieces: list[str] = []
        stop_reason = "length"

        def tokens() -> Iterator[int]:
            nonlocal first, stop_reason
            stop_reason = "eos"
            for step in self.generate(ids, max_new_tokens, sampling):
                if first is None:
                    first = time.perf_counter()
                steps.append(step)
                yield step.token
            if len(steps) == max_new_tokens:
                stop_reason = "length"

        for piece, hit in self._text(tokens(), stop):
            pieces.append(piece)
            if on_text:
                on_text(piece)
            if hit:
                stop_reason = "stop_string"
        ended = time.perf_counter()
        reading = self.meter.read()
        first = first or ended
        decode_s = ended - first
        return Completion(
            text="".join(pieces), tokens_in=len(ids), tokens_out=len(steps), logprobs=[s.logprob for s in steps],
            latency_ms=(ended - started) * 1000, ttft_ms=(first - started) * 1000,
            tokens_per_s=(len(steps) - 1) / decode_s if len(steps) > 1 and decode_s > 0 else 0.0,
            energy_j=reading.energy_j, energy_estimated=reading.energy_estimated,
            memory_mb=self.memory_mb, provider=self.provider, stop_reason=stop_reason)

    def _text(self, tokens: Iterator[int], stop: list[str]) -> Iterator[tuple[str, bool]]:
        """Text pieces as tokens arrive, ending before any stop string; characters are never split.

        Text that could still turn into a stop string is held back until it cannot. The pieces always
        join to what decoding the whole answer at once gives (an unfinished character included).
        """
        stream = DecodeStream(skip_special_tokens=True)
        ids: list[int] = []
        emitted = ""

        def cut(text: str, final: bool) -> tuple[str, bool]:
            hits = [i for i in (text.find(s) for s in stop) if i >= 0]
            if hits:
                return text[: min(hits)], True
            if final:
                return text, False
            keep = max((k for s in stop for k in range(len(s), 0, -1) if text.endswith(s[:k])), default=0)
            return text[: len(text) - keep], False

        pending = ""
        for token in tokens:
            ids.append(token)
            pending += stream.step(self.tokenizer.tokenizer, token) or ""
            shown, stopped = cut(pending, final=False)
            if shown or stopped:
                yield shown, stopped
                emitted += shown
                pending = pending[len(shown):]
            if stopped:
                return
        shown, _ = cut(self.tokenizer.decode(ids, skip_special=True)[len(emitted):], final=True)
        if shown:
            yield shown, False

    def stream_text(self, prompt: str, max_new_tokens: int, stop: list[str] = ()) -> Iterator[str]:
        """Greedy answer text as it is produced (see `_text`)."""
        for piece, _ in self._text(self.greedy(self.encode(prompt), max_new_tokens), stop):
            if piece:
                yield piece
