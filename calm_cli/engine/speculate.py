"""Greedy speculative decoding with prompt-lookup drafts (as llama.cpp's lookup decoding and vLLM's n-gram
speculator): the draft is what followed the latest earlier occurrence of the context's last n-gram, free to
make; the model checks a whole draft in one step (on a CPU, decoding is memory-bound: k+1 positions cost little
more than one), keeps the longest prefix it agrees with plus its own next token, and the KV state rolls back
the rest. The output is the model's own greedy output; only numerics can differ (onnxruntime's int4 kernel
runs one row and several rows differently), and only where two tokens nearly tie.

Runs on the fused graph (its KV buffers take a rollback by lowering the row's length; see engine/kv.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from calm_cli.engine.decode import Step, logprob_of
from calm_cli.engine.decoder import Decoder
from calm_cli.engine.kv import SharedKV


class VerifyKV(SharedKV):
    """One row's KV state that can give the logits at every new position, and roll back positions."""

    def __init__(self, decoder: Decoder, capacity: int, widest: int):
        super().__init__(decoder, 1, capacity)
        self.rows = np.empty((widest, decoder.vocab), decoder.logits_type)

    def feed_all(self, tokens: list[int]) -> np.ndarray:
        """Append `tokens`; the logits after each of them [n, V] (a view the next feed overwrites)."""
        n = len(tokens)
        self.io.bind_output("logits", "cpu", 0, self.rows.dtype, [n, self.decoder.vocab], self.rows.ctypes.data)
        self.lengths += n
        self._run({"input_ids": np.asarray([tokens], dtype=np.int64),
                   "seqlens_k": (self.lengths - 1).astype(np.int32),
                   "total_sequence_length": np.asarray(self.lengths.max(), dtype=np.int32),
                   "logits_index": np.arange(n, dtype=np.int64)})
        return self.rows[:n]

    def rollback(self, n: int) -> None:
        """Forget the last `n` positions: the kernel reads the row's length; the next feed overwrites them."""
        self.lengths -= n


def lookup_draft(context: list[int], k: int, longest: int = 3) -> list[int]:
    """Up to `k` tokens that followed the latest earlier occurrence of the context's last n-gram (n from
    `longest` down to 1); nothing when the last token never occurred before."""
    for n in range(min(longest, len(context) - 1), 0, -1):
        tail = context[-n:]
        for start in range(len(context) - n - 1, -1, -1):
            if context[start:start + n] == tail:
                return context[start + n:start + n + k]
    return []


@dataclass
class Counts:
    steps: int = 0  # model runs after the prompt
    drafted: int = 0  # draft tokens checked
    accepted: int = 0  # draft tokens kept


def speculative_steps(decoder: Decoder, prompt_ids: list[int], max_new_tokens: int, k: int = 4,
                      counts: Counts | None = None) -> Iterator[Step]:
    """As decode.generate with greedy sampling: the chosen tokens with their log-probabilities, stopping at the
    model's stop tokens, but checked `k` drafted tokens at a time. `counts` (if given) is kept up to date."""
    if not decoder.fused:
        raise ValueError("speculative decoding needs the fused graph (an int4 or fused fp32 export)")
    counts = counts if counts is not None else Counts()
    stops = set(decoder.tokenizer.stop_ids)
    kv = VerifyKV(decoder, len(prompt_ids) + max_new_tokens + k + 1, k + 1)
    last = kv.feed([prompt_ids])[0]
    following = int(np.argmax(last))
    chosen = Step(following, logprob_of(last, following))
    context, made = list(prompt_ids), 0
    while following not in stops and made < max_new_tokens:
        yield chosen
        made += 1
        context.append(following)
        if made == max_new_tokens:
            return
        draft = lookup_draft(context, min(k, max_new_tokens - made))
        rows = kv.feed_all([following, *draft])
        targets = np.argmax(rows, axis=1)
        counts.steps += 1
        kept = 0
        while kept < len(draft) and draft[kept] == targets[kept] and draft[kept] not in stops:
            kept += 1
        counts.drafted, counts.accepted = counts.drafted + len(draft), counts.accepted + kept
        for j in range(kept):
            yield Step(draft[j], logprob_of(rows[j], draft[j]))
        made += kept
        context += draft[:kept]
        kv.rollback(len(draft) - kept)
        following = int(targets[kept])
        chosen = Step(following, logprob_of(rows[kept], following))


@dataclass
class Speculated:
    tokens: list[int]
    steps: int  # model runs after the prompt
    drafted: int  # draft tokens checked
    accepted: int  # draft tokens kept


def speculative_greedy(decoder: Decoder, prompt_ids: list[int], max_new_tokens: int, k: int = 4) -> Speculated:
    """The model's greedy continuation of `prompt_ids` (stopping at its stop tokens), checked `k` drafted
    tokens at a time."""
    counts = Counts()
    tokens = [s.token for s in speculative_steps(decoder, prompt_ids, max_new_tokens, k, counts)]
    return Speculated(tokens, counts.steps, counts.drafted, counts.accepted)
