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

A step runs over rows [0, hi) where hi is one past the highest active row (at least `min_rows`); a free row
inside that range is fed a dummy token at position 0 of its own (free) buffer, which no one reads. New requests
take the lowest free row, so the range stays dense.

Why `min_rows` 2: onnxruntime's int4 MatMulNBits with int8 activations (accuracy level 4) computes one row by
another kernel than several, and the two round differently (logits up to 0.6 apart on SmolLM2; each agrees with
fp32 as often as the other). Stepping at least two rows, a request decodes the same tokens alone or in any
batch: answers do not depend on the load.

`DecodeBatch` puts requests' generations on top of Slots: sampling, stop tokens and strings, streamed text and
meters per request. A step's energy (wall time x the threads it ran on x CALM_WATTS_PER_CORE, an estimate: no
CPU energy counter here) is shared among the requests in it by the tokens each fed to the model.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnxruntime as ort

from calm_cli import settings
from calm_cli.engine.complete import Completion
from calm_cli.engine.decode import logprob_of
from calm_cli.engine.decoder import Decoder, PromptError, PromptTooLong
from calm_cli.engine.kv import open_kv
from calm_cli.engine.sampling import Sampler
from calm_cli.engine.textstream import TextStream


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

    def __init__(self, decoder: Decoder, rows: int, capacity: int, min_rows: int = 1):
        if not decoder.fused:
            raise ValueError(f"{decoder.directory}: continuous batching needs the fused graph")
        if rows < 1 or capacity < 2:
            raise ValueError(f"need at least one row and two tokens of capacity, got {rows} x {capacity}")
        self.decoder, self.rows, self.capacity = decoder, rows, min(capacity, decoder.context)
        self.min_rows = min(min_rows, rows)
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
        hi = max(rows[-1] + 1, self.min_rows)
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


@dataclass(eq=False)
class Generation:
    """One request's decoding inside a DecodeBatch. `cancelled` may be set by another thread; the batch drops
    the request at its next step. `completion` is set once it finished."""

    prompt_ids: list[int]
    max_new_tokens: int
    sampler: Sampler
    text: TextStream
    on_text: Callable[[str], None] | None = None
    cancelled: bool = False
    completion: Completion | None = None
    started: float = field(default_factory=time.perf_counter)
    row: int = -1
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)
    first_at: float | None = None
    energy_j: float = 0.0


class DecodeBatch:
    """Continuous batching of generations on one loaded fused decoder (one step at a time: not thread-safe)."""

    def __init__(self, decoder: Decoder, rows: int, capacity: int):
        self.slots = Slots(decoder, rows, capacity, min_rows=2)
        self.decoder = decoder
        self.active: dict[int, Generation] = {}
        threads = int(settings.get("threads")) or (os.cpu_count() or 1)
        self._joules_per_s = threads * float(settings.get("watts_per_core"))

    def fits(self, prompt_tokens: int, max_new_tokens: int) -> bool:
        return prompt_tokens + max_new_tokens <= self.slots.capacity

    def free(self) -> int:
        return self.slots.free()

    def step(self, admit: list[Generation]) -> list[Generation]:
        """Prefill each newcomer (its first token comes from it), then advance every generation already active by
        one token, together; returns those that finished or were cancelled in this step, their rows freed."""
        done: list[Generation] = []
        fed: dict[int, int] = {}  # id(generation) -> tokens it fed in this step, for the energy split
        started = time.perf_counter()
        for gen in [g for g in self.active.values() if g.cancelled]:
            done.append(self._release(gen, "cancelled"))
        stepping = dict(self.active)
        if stepping:
            out = self.slots.step({row: gen.tokens[-1] for row, gen in stepping.items()})
            for row, gen in stepping.items():
                fed[id(gen)] = 1
                if self._advance(gen, out[row]):
                    done.append(gen)
        for gen in admit:
            if gen.cancelled:
                gen.completion = self._completion(gen, "cancelled")
                done.append(gen)
                continue
            gen.row, logits = self.slots.admit(gen.prompt_ids, gen.max_new_tokens)
            self.active[gen.row] = gen
            fed[id(gen)] = len(gen.prompt_ids)
            if self._advance(gen, logits):
                done.append(gen)
        self._share_energy([g for g in [*stepping.values(), *admit] if id(g) in fed], fed,
                           (time.perf_counter() - started) * self._joules_per_s)
        return done

    def _advance(self, gen: Generation, logits: np.ndarray) -> bool:
        """Choose the next token of `gen` from its logits; True when that ended it (its row is then freed)."""
        now = time.perf_counter()
        token = gen.sampler.choose(logits)
        if token in self.decoder.tokenizer.stop_ids:
            self._release(gen, "eos", final_text=True)
            return True
        gen.first_at = gen.first_at or now
        gen.tokens.append(token)
        gen.logprobs.append(logprob_of(logits, token))
        piece = gen.text.push(token)
        if piece or gen.text.stopped:
            self._show(gen, piece)
        if gen.text.stopped:
            self._release(gen, "stop_string")
            return True
        if len(gen.tokens) == gen.max_new_tokens:
            self._release(gen, "length", final_text=True)
            return True
        return False

    def _show(self, gen: Generation, piece: str) -> None:
        gen.pieces.append(piece)
        if gen.on_text:
            gen.on_text(piece)

    def _release(self, gen: Generation, stop_reason: str, final_text: bool = False) -> Generation:
        if final_text and (rest := gen.text.finish()):
            self._show(gen, rest)
        self.slots.release(gen.row)
        del self.active[gen.row]
        gen.completion = self._completion(gen, stop_reason)
        return gen

    def _completion(self, gen: Generation, stop_reason: str) -> Completion:
        ended = time.perf_counter()
        first = gen.first_at or ended
        decode_s = ended - first
        n = len(gen.tokens)
        return Completion(
            text="".join(gen.pieces), tokens_in=len(gen.prompt_ids), tokens_out=n, logprobs=gen.logprobs,
            latency_ms=(ended - gen.started) * 1000, ttft_ms=(first - gen.started) * 1000,
            tokens_per_s=(n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0, energy_j=gen.energy_j,
            energy_estimated=True, memory_mb=self.decoder.memory_mb, provider=self.decoder.provider,
            stop_reason=stop_reason)

    @staticmethod
    def _share_energy(gens: list[Generation], fed: dict[int, int], joules: float) -> None:
        total = sum(fed[id(g)] for g in gens)
        for g in gens:
            g.energy_j += joules * fed[id(g)] / total
            if g.completion is not None:  # it finished in this step: its record carries this step's share
                g.completion.energy_j = g.energy_j
