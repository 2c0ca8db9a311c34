"""Generation and scoring over an exported decoder: onnxruntime + numpy + tokenizers, no torch.

Two graphs can serve (see session.decoder_graph). Optimum's plain graph takes the whole past KV cache in and
returns a longer `present` each step; the loop keeps those as onnxruntime values bound to the next step
(IOBinding), so on CUDA the cache never leaves the GPU. The fused graph (fleet/fuse.py, CPU) updates fixed
KV buffers in place: one allocation per request, nothing copied or grown per token, logits only for the
positions asked for.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import onnxruntime as ort
from tokenizers.decoders import DecodeStream

from calm_cli.engine.meters import EnergyMeter, rss_mb
from calm_cli.engine.sampling import Sampler, Sampling, log_softmax
from calm_cli.engine.session import decoder_graph, open_session, provider_of
from calm_cli.fleet.gguf_tokenizer import GGUFTokenizer, load_tokenizer

_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class PromptError(ValueError):
    """A prompt the model cannot take: empty, not UTF-8, or longer than the context window."""


@dataclass(frozen=True)
class Step:
    token: int
    logprob: float  # log p(token) under the model (temperature 1), whatever the sampling


def _logprob(logits: np.ndarray, token: int) -> float:
    """log softmax(logits)[token], computed every step: float32 exponentials in one scratch array, summed
    pairwise (numpy's float32 sum; 3e-8 from a float64 log_softmax on a 262k vocabulary, 1.5x faster)."""
    top = logits.max()
    shifted = logits - top
    np.exp(shifted, out=shifted)
    return float(logits[token] - top) - float(np.log(shifted.sum()))


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


class _Cache:
    """A request's KV cache and the binding of the session's inputs and outputs to it."""

    def __init__(self, decoder: Decoder):
        self.decoder = decoder
        self.io = decoder.session.io_binding()

    def _run(self, arrays: dict[str, np.ndarray]) -> None:
        """Bind host arrays as inputs and run; binding and run share one call so the arrays outlive the run."""
        for name, array in arrays.items():
            self.io.bind_cpu_input(name, array)
        self.decoder.session.run_with_iobinding(self.io)


class _GrowingCache(_Cache):
    """Optimum's graph: the past goes in whole and comes back one step longer, kept as onnxruntime values.

    Rows are left-padded and masked. Outputs stay where the provider put them (the GPU under CUDA) and are
    bound as the next step's past; only the logits come back to the host.
    """

    def __init__(self, decoder: Decoder, batch: int):
        super().__init__(decoder)
        self.batch = batch
        self.mask: np.ndarray | None = None
        self.device = "cuda" if decoder.provider == "CUDAExecutionProvider" else "cpu"

    def feed(self, rows: list[list[int]]) -> np.ndarray:
        """Append each row's tokens (several on the first call, one after); logits at each row's last: [B, V]."""
        d = self.decoder
        if self.mask is None:
            width = max(map(len, rows))
            pad = d.tokenizer.pad_id or 0
            ids = np.asarray([[pad] * (width - len(r)) + r for r in rows], dtype=np.int64)
            self.mask = np.asarray([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=np.int64)
            feed = d._empty_cache(self.batch)
        else:
            ids = np.asarray(rows, dtype=np.int64)
            self.mask = np.concatenate([self.mask, np.ones((len(rows), 1), dtype=np.int64)], axis=1)
            feed = {}
        feed.update(input_ids=ids, attention_mask=self.mask)
        if d.uses_position_ids:
            feed["position_ids"] = np.clip(np.cumsum(self.mask, axis=1) - 1, 0, None)[:, -ids.shape[1]:].copy()
        self.io.bind_output("logits")  # rebound each step: a filled output would be reused as a fixed buffer
        for name in d.present_names:
            self.io.bind_output(name, self.device, d.device_id)
        self._run(feed)
        logits, *presents = self.io.get_outputs()
        for name, value in zip(d.past_names, presents):
            self.io.bind_ortvalue_input(name, value)
        return logits.numpy()[:, -1]


class _SharedCache(_Cache):
    """The fused graph: KV buffers of a fixed capacity that GroupQueryAttention updates in place.

    Each buffer is bound as both `past` and `present`, so a step writes only its new positions. Rows are
    right-padded; `seqlens_k` tells the kernel each row's length, and only each row's last logits are made,
    straight into one host array bound for the whole request (no per-step output allocation or copy).
    """

    def __init__(self, decoder: Decoder, batch: int, capacity: int):
        super().__init__(decoder)
        logits = decoder.session.get_outputs()[0]
        self.logits = np.empty((batch, logits.shape[-1]), _NP_TYPES[logits.type])
        self.io.bind_output("logits", "cpu", 0, self.logits.dtype, list(self.logits.shape), self.logits.ctypes.data)
        heads, head_dim = decoder.cache_shape
        self.buffers = [ort.OrtValue.ortvalue_from_numpy(np.zeros((batch, heads, capacity, head_dim),
                                                                  decoder.cache_type)) for _ in decoder.past_names]
        for past, present, buffer in zip(decoder.past_names, decoder.present_names, self.buffers):
            self.io.bind_ortvalue_input(past, buffer)
            self.io.bind_ortvalue_output(present, buffer)
        self.lengths = np.zeros(batch, dtype=np.int64)

    def feed(self, rows: list[list[int]]) -> np.ndarray:
        """Append each row's tokens (several on the first call, one after); logits at each row's last: [B, V].

        The array returned is this cache's logits buffer: the next feed overwrites it.
        """
        width = max(map(len, rows))
        counts = np.asarray([len(r) for r in rows], dtype=np.int64)
        self.lengths += counts
        self._run({"input_ids": np.asarray([r + [0] * (width - len(r)) for r in rows], dtype=np.int64),
                   "seqlens_k": (self.lengths - 1).astype(np.int32),
                   "total_sequence_length": np.asarray(self.lengths.max(), dtype=np.int32),
                   "logits_index": np.arange(len(rows), dtype=np.int64) * width + counts - 1})
        return self.logits


@dataclass
class Decoder:
    """One loaded decoder model: its session, tokenizer, cache layout and load-time footprint."""

    directory: Path
    tokenizer: GGUFTokenizer = field(init=False)

    def __post_init__(self) -> None:
        started, before = time.perf_counter(), rss_mb()
        self.session = open_session(decoder_graph(self.directory))
        self.provider = provider_of(self.session)
        self.device_id = int(self.session.get_provider_options().get(self.provider, {}).get("device_id", 0))
        self.meter = EnergyMeter(on_gpu=self.provider == "CUDAExecutionProvider")
        self.load_ms = (time.perf_counter() - started) * 1000
        self.memory_mb = rss_mb() - before if self.meter.handle is None else self.meter.memory_mb()
        self.tokenizer = load_tokenizer(self.directory)
        config = json.loads((self.directory / "config.json").read_text(encoding="utf-8"))
        self.context = int(config.get("max_position_embeddings") or 2048)
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.past_names = [n for n in inputs if n.startswith("past_key_values.")]
        self.present_names = [n.replace("past_key_values.", "present.") for n in self.past_names]
        _, heads, _, head_dim = inputs[self.past_names[0]].shape
        self.cache_shape = (int(heads), int(head_dim))
        self.cache_type = _NP_TYPES[inputs[self.past_names[0]].type]
        self.fused = "seqlens_k" in inputs
        self.uses_position_ids = "position_ids" in inputs
        self.output_names = ["logits", *self.present_names]

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
        """One step with a growing past (numpy in and out): logits for every new position [B, S, V].

        The fused graph takes no padding here (its kernel reads each row's length, not a mask): every row
        must be as long as the mask.
        """
        feed = {"input_ids": ids, **past}
        if self.fused:
            if not mask.all():
                raise ValueError("the fused graph takes no padding in _forward")
            batch, new = ids.shape
            total = mask.shape[1]
            feed.update(seqlens_k=np.full(batch, total - 1, dtype=np.int32),
                        total_sequence_length=np.asarray(total, dtype=np.int32),
                        logits_index=np.arange(batch * new, dtype=np.int64))
        else:
            feed["attention_mask"] = mask
            if self.uses_position_ids:
                feed["position_ids"] = positions
        logits, *presents = self.session.run(self.output_names, feed)
        return logits.reshape(ids.shape[0], ids.shape[1], -1), dict(zip(self.past_names, presents))

    def _cache(self, batch: int, capacity: int) -> _GrowingCache | _SharedCache:
        """A per-request KV cache for `capacity` tokens per row."""
        return _SharedCache(self, batch, capacity) if self.fused else _GrowingCache(self, batch)

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
        cache = self._cache(1, len(prompt_ids) + max_new_tokens)
        step = prompt_ids
        for _ in range(max_new_tokens):
            last = cache.feed([step])[0]
            token = sampler.choose(last)
            if token in stops:
                return
            yield Step(token, _logprob(last, token))
            step = [token]

    def greedy(self, prompt_ids: list[int], max_new_tokens: int) -> Iterator[int]:
        return (step.token for step in self.generate(prompt_ids, max_new_tokens))

    def generate_batch(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy answers to several prompts in one batch (left padding, masked), for batch work."""
        if not prompts or any(not p for p in prompts):
            raise PromptError("every prompt of a batch must be non-empty")
        for p in prompts:
            self.fit(p, max_new_tokens, truncate=False)
        stops = set(self.tokenizer.stop_ids)
        pad = self.tokenizer.pad_id or 0
        out: list[list[int]] = [[] for _ in prompts]
        done = np.zeros(len(prompts), dtype=bool)
        cache = self._cache(len(prompts), max(map(len, prompts)) + max_new_tokens)
        rows = prompts
        for _ in range(max_new_tokens):
            tokens = cache.feed(rows).argmax(-1)
            for row, token in enumerate(tokens.tolist()):
                if not done[row]:
                    if token in stops:
                        done[row] = True
                    else:
                        out[row].append(token)
            if done.all():
                break
            rows = [[pad if d else t] for d, t in zip(done.tolist(), tokens.tolist())]
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
