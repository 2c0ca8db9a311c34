"""A metered answer: a prompt's generation streamed as text up to its stop strings, with the latency, time to
first token, rate and energy of the work. Its fields are the JSON record's metrics."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from calm_cli.engine.decode import Step, generate
from calm_cli.engine.decoder import Decoder
from calm_cli.engine.sampling import Sampling
from calm_cli.engine.speculate import Counts, Speculation, speculative_steps
from calm_cli.engine.textstream import TextStream


@dataclass
class Completion:
    """One answer with its meters (loop/monitor.py makes the record's metrics from them)."""

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
    token_ids: list[int] = field(default_factory=list, repr=False)  # the answer's tokens (stop string included)
    draft: str | None = None  # what proposed the tokens it checked: "prompt-lookup", "answer", a draft model
    draft_tokens: int = 0  # draft tokens checked
    accepted_tokens: int = 0  # draft tokens kept

    @property
    def confidence(self) -> float:
        """exp(mean token log-probability): the geometric-mean probability of the answer's tokens, 0..1."""
        return float(np.exp(np.mean(self.logprobs))) if self.logprobs else 0.0


def complete(decoder: Decoder, prompt: str, max_new_tokens: int, sampling: Sampling = Sampling(),
             stop: Sequence[str] = (), on_text: Callable[[str], None] | None = None,
             truncate: bool = False, speculation: Speculation | None = None) -> Completion:
    """Answer `prompt`, streaming text to `on_text` as it is produced, and measure the work (a draft model's
    included: it runs in this process). With `speculation`, where it applies, drafts are checked several tokens
    per step (engine/speculate.py)."""
    decoder.meter.start()
    started = time.perf_counter()
    ids = decoder.fit(decoder.encode(prompt), max_new_tokens, truncate)
    steps: list[Step] = []
    first = None
    pieces: list[str] = []
    text = TextStream(decoder.tokenizer, stop)

    def show(piece: str) -> None:
        pieces.append(piece)
        if on_text:
            on_text(piece)

    counts, draft = Counts(), None
    if speculation is not None and speculation.applies(decoder, sampling):
        steps_of = speculative_steps(decoder, ids, max_new_tokens, speculation, sampling, counts)
        draft = "answer" if speculation.reference is not None else speculation.model_name or "prompt-lookup"
    else:
        steps_of = generate(decoder, ids, max_new_tokens, sampling)
    for step in steps_of:
        if first is None:
            first = time.perf_counter()
        steps.append(step)
        piece = text.push(step.token)
        if piece or text.stopped:
            show(piece)
        if text.stopped:
            stop_reason = "stop_string"
            break
    else:
        stop_reason = "length" if len(steps) == max_new_tokens else "eos"
        if rest := text.finish():
            show(rest)
    ended = time.perf_counter()
    reading = decoder.meter.read()
    first = first or ended
    decode_s = ended - first
    return Completion(
        text="".join(pieces), tokens_in=len(ids), tokens_out=len(steps), logprobs=[s.logprob for s in steps],
        latency_ms=(ended - started) * 1000, ttft_ms=(first - started) * 1000,
        tokens_per_s=(len(steps) - 1) / decode_s if len(steps) > 1 and decode_s > 0 else 0.0,
        energy_j=reading.energy_j, energy_estimated=reading.energy_estimated,
        memory_mb=decoder.memory_mb, provider=decoder.provider, stop_reason=stop_reason,
        token_ids=[s.token for s in steps], draft=draft, draft_tokens=counts.drafted,
        accepted_tokens=counts.accepted)
