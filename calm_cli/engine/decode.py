"""The decoding loop over a loaded decoder: tokens with their log-probabilities (sampled, stopping at the
model's stop tokens), greedy decoding, and scoring (logits at every position, over a growing past)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from calm_cli.engine.decoder import Decoder, PromptError, PromptTooLong
from calm_cli.engine.kv import empty_past, open_kv
from calm_cli.engine.sampling import Sampler, Sampling, log_softmax


@dataclass(frozen=True)
class Step:
    token: int
    logprob: float  # log p(token) under the model (temperature 1), whatever the sampling


def logprob_of(logits: np.ndarray, token: int) -> float:
    """log softmax(logits)[token], computed every step: float32 exponentials in one scratch array, summed
    pairwise (numpy's float32 sum; 3e-8 from a float64 log_softmax on a 262k vocabulary, 1.5x faster)."""
    top = logits.max()
    shifted = logits - top
    np.exp(shifted, out=shifted)
    return float(logits[token] - top) - float(np.log(shifted.sum()))


def generate(decoder: Decoder, prompt_ids: list[int], max_new_tokens: int, sampling: Sampling = Sampling(),
             truncate: bool = False, stop_at_eos: bool = True) -> Iterator[Step]:
    """Chosen tokens with their log-probabilities; stops at the model's stop tokens (not yielded).

    stop_at_eos=False runs to max_new_tokens regardless, for benchmarks that need a fixed length.
    """
    prompt_ids = decoder.fit(prompt_ids, max_new_tokens, truncate)
    sampler = Sampler(sampling)
    stops = set(decoder.tokenizer.stop_ids) if stop_at_eos else set()
    kv = open_kv(decoder, 1, len(prompt_ids) + max_new_tokens)
    step = prompt_ids
    for _ in range(max_new_tokens):
        last = kv.feed([step])[0]
        token = sampler.choose(last)
        if token in stops:
            return
        yield Step(token, logprob_of(last, token))
        step = [token]


def greedy(decoder: Decoder, prompt_ids: list[int], max_new_tokens: int) -> Iterator[int]:
    return (step.token for step in generate(decoder, prompt_ids, max_new_tokens))


def forward(decoder: Decoder, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray,
            past: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One step with a growing past (numpy in and out): logits for every new position [B, S, V], and the past
    with them. A past may be fed again and again, so one context branches into several continuations.

    The fused graph takes no padding here (its kernel reads each row's length, not a mask): every row
    must be as long as the mask.
    """
    feed = {"input_ids": ids, **past}
    if decoder.fused:
        if not mask.all():
            raise ValueError("the fused graph takes no padding in forward")
        batch, new = ids.shape
        total = mask.shape[1]
        feed.update(seqlens_k=np.full(batch, total - 1, dtype=np.int32),
                    total_sequence_length=np.asarray(total, dtype=np.int32),
                    logits_index=np.arange(batch * new, dtype=np.int64))
    else:
        feed["attention_mask"] = mask
        if decoder.uses_position_ids:
            feed["position_ids"] = positions
    layout = decoder.layout
    out, *presents = decoder.session.run(["logits", *layout.present_names], feed)
    return out.reshape(ids.shape[0], ids.shape[1], -1), dict(zip(layout.past_names, presents))


def logits(decoder: Decoder, ids: list[int]) -> np.ndarray:
    """Next-token logits after every position of `ids` in one pass: [len(ids), vocab]."""
    if len(ids) > decoder.context:
        raise PromptTooLong(f"{len(ids)} tokens exceed the context window of {decoder.context} tokens")
    n = len(ids)
    out, _ = forward(decoder, np.asarray([ids], dtype=np.int64), np.ones((1, n), dtype=np.int64),
                     np.arange(n, dtype=np.int64)[None, :], empty_past(decoder, 1))
    return out[0]


def score(decoder: Decoder, context: list[int], continuation: list[int]) -> list[float]:
    """log p(continuation token | everything before it), one per continuation token."""
    if not context or not continuation:
        raise PromptError("scoring needs a non-empty context and continuation")
    logp = log_softmax(logits(decoder, context + continuation)[len(context) - 1:-1])
    return [float(logp[i, t]) for i, t in enumerate(continuation)]
