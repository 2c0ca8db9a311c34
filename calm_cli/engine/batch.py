"""Batching: several requests decoded in one step, which on a CPU reads the weights once for all of them.

`generate_batch` is static batching (one batch of prompts, decoded together until the last one ends). `Slots`
is continuous batching over the fused decoder graph: requests join and leave a running batch at step
boundaries.

Slots: the fused graph's KV buffers are caller-owned and updated in place (fleet/graph/fuse.py), one tensor per
layer of shape [rows, kv_heads, capacity, head_dim]. A request takes a free row; its prompt is prefilled in a
step of its own on a one-row view of the buffers (numpy views share memory with the OrtValues bound to them),
then it decodes one token per step together with every other active row: on a CPU a decode step is bound by
reading the weights, which a batch reads once for all its rows. Each row keeps its own length (`seqlens_k`), so
rows of different lengths share a step without padding their KV. A finished request frees its row at once.

A step runs over rows [0, hi) where hi is one past the highest active row; a free row inside that range is fed
a dummy token at position 0 of its own (free) buffer, which no one reads. New requests take the lowest free
row, so the range stays dense.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from calm_cli.engine.decoder import Decoder, PromptError, PromptTooLong
from calm_cli.engine.kv import open_kv


def generate_batch(decoder: Decoder, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy answers to several prompts in one batch, for batch work (padded as the KV state wants)."""
    if not prompts or any(not p for p in prompts):
        raise PromptError("every prompt of a batch must be non-empty")
    for p in prompts:
        decoder.fit(p, max_new_tokens, truncate=False)
    stops = set(decoder.tokenizer.stop_ids)
    pad = decoder.tokenizer.pad_id or 0
    out: list[list[int]] = [[] for _ in prompts]
    done = np.zeros(len(prompts), dtype=bool)
    kv = open_kv(decoder, len(prompts), max(map(len, prompts)) + max_new_tokens)
    rows = prompts
    for _ in range(max_new_tokens):
        tokens = kv.feed(rows).argmax(-1)
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


@dataclass
class _Binding:
    """The session's inputs and outputs bound to rows [lo, lo + n) of the buffers, with a logits buffer."""

    io: ort.IOBinding
    logits: np.ndarray


class Slots:
    """`rows` KV slots of `capacity` tokens each for one loaded fused decoder (not thread-safe: one runner
    steps it at a time)."""

    def __init__(self, decoder: Decoder, rows: int, capacity: int):
        if not decoder.fused:
            raise ValueError(f"{decoder.directory}: continuous batching needs the fused graph")
        if rows < 1 or capacity < 2:
            raise ValueError(f"need at least one row and two tokens of capacity, got {rows} x {capacity}")
        self.decoder, self.rows, self.capacity = decoder, rows, min(capacity, decoder.context)
        layout = decoder.layout
        self.buffers = [np.zeros((rows, layout.heads, self.capacity, layout.head_dim), layout.dtype)
                        for _ in layout.past_names]
        self.lengths = np.zeros(rows, dtype=np.int64)  # tokens in each row's KV; 0 = free or not yet filled
        self.active = np.zeros(rows, dtype=bool)
        self._bindings: dict[tuple[int, int, int], _Binding] = {}

    @property
    def kv_bytes(self) -> int:
        """Memory these slots hold (it counts against the cache budget with the member's weights)."""
        return sum(b.nbytes for b in self.buffers)

    def free(self) -> int:
        return int((~self.active).sum())

    def _binding(self, lo: int, n: int, width: int) -> _Binding:
        """IOBinding over rows [lo, lo + n) for `width` logits rows, made once and reused."""
        key = (lo, n, width)
        if key not in self._bindings:
            d = self.decoder
            io = d.session.io_binding()
            logits = np.empty((width, d.vocab), d.logits_type)
            io.bind_output("logits", "cpu", 0, logits.dtype, list(logits.shape), logits.ctypes.data)
            for past, present, buffer in zip(d.layout.past_names, d.layout.present_names, self.buffers):
                value = ort.OrtValue.ortvalue_from_numpy(buffer[lo:lo + n])  # a view: same memory
                io.bind_ortvalue_input(past, value)
                io.bind_ortvalue_output(present, value)
            self._bindings[key] = _Binding(io, logits)
        return self._bindings[key]

    def _run(self, binding: _Binding, ids: np.ndarray, seqlens: np.ndarray, index: np.ndarray) -> np.ndarray:
        binding.io.bind_cpu_input("input_ids", ids)
        binding.io.bind_cpu_input("seqlens_k", (seqlens - 1).astype(np.int32))
        binding.io.bind_cpu_input("total_sequence_length", np.asarray(seqlens.max(), dtype=np.int32))
        binding.io.bind_cpu_input("logits_index", index)
        self.decoder.session.run_with_iobinding(binding.io)
        return binding.logits

    def admit(self, prompt_ids: list[int], max_new_tokens: int) -> tuple[int, np.ndarray]:
        """Take the lowest free row and prefill the prompt there (a step of its own): (row, next-token logits).

        The logits array is reused by the next prefill of the same length: copy what must outlive it.
        """
        if not prompt_ids:
            raise PromptError("the prompt is empty")
        if len(prompt_ids) + max_new_tokens > self.capacity:
            raise PromptTooLong(f"prompt of {len(prompt_ids)} tokens + {max_new_tokens} new tokens exceeds a batch "
                              f"slot's capacity of {self.capacity} tokens")
        free = np.flatnonzero(~self.active)
        if not len(free):
            raise RuntimeError("no free slot: admit only while free() > 0")
        row = int(free[0])
        n = len(prompt_ids)
        logits = self._run(self._binding(row, 1, 1), np.asarray([prompt_ids], dtype=np.int64),
                           np.asarray([n], dtype=np.int64), np.asarray([n - 1], dtype=np.int64))
        self.active[row], self.lengths[row] = True, n
        return row, logits[0]

    def step(self, tokens: dict[int, int]) -> dict[int, np.ndarray]:
        """Feed one token to every active row: row -> next-token logits.

        The arrays returned are views of a buffer the next step overwrites.
        """
        rows = sorted(tokens)
        if rows != np.flatnonzero(self.active).tolist():
            raise ValueError(f"step over rows {rows}: every active row ({np.flatnonzero(self.active).tolist()}) "
                             "and no other must take a token")
        if (self.lengths[rows] + 1 > self.capacity).any():
            raise PromptTooLong(f"a batch slot is full ({self.capacity} tokens)")
        hi = rows[-1] + 1
        ids = np.zeros((hi, 1), dtype=np.int64)
        seqlens = np.ones(hi, dtype=np.int64)  # a row not stepped writes its dummy token at its own position 0
        ids[rows, 0] = [tokens[r] for r in rows]
        self.lengths[rows] += 1
        seqlens[rows] = self.lengths[rows]
        logits = self._run(self._binding(0, hi, len(rows)), ids, seqlens, np.asarray(rows, dtype=np.int64))
        return {r: logits[i] for i, r in enumerate(rows)}

    def release(self, row: int) -> None:
        """The request in `row` finished or was cancelled: its row is free for the next one."""
        self.active[row], self.lengths[row] = False, 0
