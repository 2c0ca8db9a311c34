"""Speculative decoding on the fused graph: a draft proposes tokens, the model checks them all in one step and
keeps what it agrees with. On a CPU decoding is memory-bound (every step reads all the weights), so checking
k+1 positions costs little more than decoding one.

Three drafts, one loop (`speculative_steps`):
- prompt lookup (as llama.cpp's lookup decoding and vLLM's n-gram speculator): what followed the latest earlier
  occurrence of the context's last n-gram; free to make, strong where an answer repeats its prompt (code);
- a reference answer (escalation by verification): another member's answer, re-encoded with this model's
  tokenizer, proposed in long chunks while the model agrees with it, and searched for n-grams once it does not;
- a draft model with the same tokenizer (Qwen2.5-Coder-0.5B for the 1.5B): it decodes k tokens one by one.

Acceptance. Greedy: the longest prefix equal to the model's own argmax, then the model's token, so the output is
the model's greedy output up to floating-point rounding, which differs between the ways the same positions can
be computed: onnxruntime's 4-bit MatMulNBits computes one row (M = 1) with another kernel than several (the
1.5B's logits up to 0.24 apart, SmolLM2's 0.42; rows of any M >= 2 are bit-identical), and GroupQueryAttention
computes several new positions of one sequence (a check) with another kernel than one position of each of
several sequences (a batch step). Where two tokens nearly tie (0.002-0.02 logits apart at the divergences
measured, docs/ENGINE.md) the choice can flip; plain one-row decoding and batched decoding differ the same way.
Sampling: speculative sampling's rule (Leviathan et al. 2023; Chen et al. 2023): keep draft token x with
probability min(1, p(x)/q(x)) and, at the first rejection, draw from max(0, p - q) renormalised, so the output
distribution is the model's own (q is one-hot for lookup and reference drafts, the draft model's own
distribution otherwise).

The KV state rolls back past rejected positions by lowering the row's length (engine/kv.py); nothing is copied.
"""

from __future__ import annotations

import weakref
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from calm_cli.engine.decode import Step, logprob_of
from calm_cli.engine.decoder import Decoder
from calm_cli.engine.kv import SharedKV
from calm_cli.engine.sampling import Sampler, Sampling

REFERENCE_FIRST = 8  # reference tokens checked by the first step that checks a reference answer
REFERENCE_CHUNK = 32  # the most per step: the chunk doubles while the model keeps agreeing with the reference
MAX_DRAFT = 16  # the longest an adaptive draft grows
ADAPTIVE_START = 4  # an adaptive draft's first length


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


def lookup_draft(context: list[int], k: int, longest: int = 3, reference: list[int] | None = None) -> list[int]:
    """Up to `k` tokens that followed an earlier occurrence of the context's last n-gram (n from `longest` down
    to 1): in `reference` first (another answer to the same question), else the latest in the context itself;
    nothing when the last token never occurred before."""
    reference = reference or []
    for n in range(min(longest, len(context) - 1), 0, -1):
        tail = context[-n:]
        for start in range(len(reference) - n - 1, -1, -1):  # something must follow the occurrence
            if reference[start:start + n] == tail:
                return reference[start + n:start + n + k]
        for start in range(len(context) - n - 1, -1, -1):
            if context[start:start + n] == tail:
                return context[start + n:start + n + k]
    return []


def draft_tokens(value: int | str) -> tuple[int, bool]:
    """(k, adaptive) from a policy's or a command's draft_tokens: a number, or "adaptive" (from ADAPTIVE_START).
    ValueError for anything else."""
    if value == "adaptive":
        return ADAPTIVE_START, True
    k = int(value)
    if not 1 <= k <= MAX_DRAFT:
        raise ValueError(f"draft tokens must be 1-{MAX_DRAFT} or adaptive, not {value!r}")
    return k, False


@dataclass
class DraftLength:
    """Tokens per draft: fixed, or adaptive (as Hugging Face's assistant heuristic): two more after a draft
    kept whole, one fewer after a rejection, between 1 and MAX_DRAFT."""

    k: int
    adaptive: bool = False

    def update(self, drafted: int, kept: int) -> None:
        if self.adaptive and drafted:
            self.k = min(MAX_DRAFT, self.k + 2) if kept == drafted else max(1, self.k - 1)

    @property
    def widest(self) -> int:
        return MAX_DRAFT if self.adaptive else self.k


class Draft(ABC):
    """Proposes the tokens the model checks next."""

    widest: int  # the most tokens one proposal may hold

    @abstractmethod
    def propose(self, context: list[int], room: int) -> tuple[list[int], list[np.ndarray] | None]:
        """Up to `room` tokens to follow `context` (prompt and answer so far), with the distribution each was
        drawn from; None when they were chosen deterministically (q is then one-hot)."""

    def feedback(self, drafted: int, kept: int) -> None:
        """How many of the last proposal's tokens the model kept."""


class LookupDraft(Draft):
    """Prompt lookup; with a `reference` answer, that answer itself while the model agrees with it."""

    def __init__(self, prompt_len: int, length: DraftLength, reference: Sequence[int] = ()):
        self.prompt_len, self.length, self.reference = prompt_len, length, list(reference)
        self.widest = max(length.widest, REFERENCE_CHUNK if reference else 0)
        self.checked, self.aligned, self.chunk = 0, bool(reference), REFERENCE_FIRST

    def propose(self, context: list[int], room: int) -> tuple[list[int], None]:
        made = len(context) - self.prompt_len
        if self.aligned:
            while self.checked < min(made, len(self.reference)):
                if context[self.prompt_len + self.checked] != self.reference[self.checked]:
                    self.aligned = False
                    break
                self.checked += 1
            if self.aligned and made < len(self.reference):
                return self.reference[made:made + min(self.chunk, room)], None
        return lookup_draft(context, min(self.length.k, room), reference=self.reference[self.checked:]), None

    def feedback(self, drafted: int, kept: int) -> None:
        """While aligned, a chunk kept whole doubles the next (a wrong one wastes at most as much as was kept
        before); after, the draft length adapts (or not) as configured."""
        if self.aligned and kept == drafted:
            self.chunk = min(REFERENCE_CHUNK, self.chunk * 2)
        elif not self.aligned:
            self.length.update(drafted, kept)


class ModelDraft(Draft):
    """A smaller model with the same tokenizer decodes the proposal; its own KV state follows the context,
    rolled back where the model rejected its tokens."""

    def __init__(self, draft: Decoder, capacity: int, sampler: Sampler, length: DraftLength):
        self.decoder, self.sampler, self.length = draft, sampler, length
        self.widest = length.widest
        self.kv = SharedKV(draft, 1, capacity)
        self.held: list[int] = []  # the tokens in its KV state
        self.stops = set(draft.tokenizer.stop_ids)

    def propose(self, context: list[int], room: int) -> tuple[list[int], list[np.ndarray] | None]:
        common = 0
        for held, token in zip(self.held, context):
            if held != token:
                break
            common += 1
        self.kv.lengths -= len(self.held) - common
        logits = self.kv.feed([context[common:]])[0]
        tokens: list[int] = []
        dists: list[np.ndarray] = []
        for i in range(min(self.length.k, room)):
            if self.sampler.sampling.greedy:
                token = int(np.argmax(logits))
            else:
                dists.append(self.sampler.probs(logits))
                token = self.sampler.draw(dists[-1])
            tokens.append(token)
            if token in self.stops or i == min(self.length.k, room) - 1:
                break
            logits = self.kv.feed([[token]])[0]
        self.held = context + tokens[:-1]
        return tokens, (dists or None)

    def feedback(self, drafted: int, kept: int) -> None:
        self.length.update(drafted, kept)


_VOCABS: weakref.WeakKeyDictionary[Decoder, int] = weakref.WeakKeyDictionary()


def _vocab_of(decoder: Decoder) -> int:
    """A hash of the whole vocabulary (token -> id), made once per loaded decoder (151,643 entries for Qwen):
    a draft is checked on every run it is lent to."""
    if decoder not in _VOCABS:
        _VOCABS[decoder] = hash(tuple(sorted(decoder.tokenizer.tokenizer.get_vocab().items())))
    return _VOCABS[decoder]


def shares_tokenizer(model: Decoder, draft: Decoder) -> bool:
    """Whether `draft`'s token ids mean what `model`'s do (the same vocabulary, in the same order)."""
    return draft.vocab <= model.vocab and _vocab_of(model) == _vocab_of(draft)


@dataclass(frozen=True)
class Speculation:
    """How one generation speculates: draft length `k` (fixed or adaptive), a draft model (None: prompt
    lookup) and a reference answer to verify (escalation): text, which this model's tokenizer re-encodes, or
    token ids already in its vocabulary."""

    k: int = 4
    adaptive: bool = False
    model: Decoder | None = None
    model_name: str | None = None
    reference: str | tuple[int, ...] | None = None

    def applies(self, decoder: Decoder, sampling: Sampling) -> bool:
        """Only the fused graph rolls back; prompt lookup only for greedy answers (its one-hot drafts rarely
        survive sampling's acceptance rule), a draft model or a reference for any sampling."""
        return decoder.fused and (sampling.greedy or self.model is not None or self.reference is not None) \
            and (self.k > 0 or self.reference is not None)

    def open(self, decoder: Decoder, prompt_ids: list[int], max_new_tokens: int, sampler: Sampler) -> Draft:
        length = DraftLength(max(self.k, 1), self.adaptive)
        if self.reference is not None:
            ids = self.reference if not isinstance(self.reference, str) else \
                decoder.tokenizer.encode(self.reference, add_special=False) if self.reference else []
            return LookupDraft(len(prompt_ids), length, ids)
        if self.model is not None:
            if not shares_tokenizer(decoder, self.model):
                raise ValueError(f"draft {self.model_name} does not share the model's tokenizer")
            return ModelDraft(self.model, len(prompt_ids) + max_new_tokens + length.widest + 1, sampler, length)
        return LookupDraft(len(prompt_ids), length)


@dataclass
class Counts:
    steps: int = 0  # model runs after the prompt
    drafted: int = 0  # draft tokens checked
    accepted: int = 0  # draft tokens kept


def _accept(rows: np.ndarray, proposal: list[int], dists: list[np.ndarray] | None, sampler: Sampler,
            stops: set[int]) -> tuple[int, int]:
    """(draft tokens kept, the model's own token after them) given the model's logits after each position."""
    if sampler.sampling.greedy:
        targets = np.argmax(rows, axis=1)
        kept = 0
        while kept < len(proposal) and proposal[kept] == targets[kept] and proposal[kept] not in stops:
            kept += 1
        return kept, int(targets[kept])
    for j, token in enumerate(proposal):
        p = sampler.probs(rows[j])
        q = dists[j] if dists is not None else None
        if sampler.uniform() < min(1.0, p[token] / (q[token] if q is not None else 1.0)):
            if token in stops:
                return j, token  # the model ends here too
            continue
        if q is None:
            residual = p.copy()
            residual[token] = 0.0
        else:
            residual = np.maximum(p - q, 0.0)
        return j, sampler.draw(residual if residual.sum() > 0 else p)
    return len(proposal), sampler.choose(rows[len(proposal)])


def speculative_steps(decoder: Decoder, prompt_ids: list[int], max_new_tokens: int, speculation: Speculation,
                      sampling: Sampling = Sampling(), counts: Counts | None = None,
                      stop_at_eos: bool = True) -> Iterator[Step]:
    """As decode.generate: the chosen tokens with their log-probabilities, stopping at the model's stop tokens
    (unless not `stop_at_eos`: benchmarks of a fixed length), but checked a draft at a time. `counts` (if given)
    is kept up to date."""
    if not decoder.fused:
        raise ValueError("speculative decoding needs the fused graph (an int4 or fused fp32 export)")
    counts = counts if counts is not None else Counts()
    sampler = Sampler(sampling)
    draft = speculation.open(decoder, prompt_ids, max_new_tokens, sampler)
    stops = set(decoder.tokenizer.stop_ids) if stop_at_eos else set()
    kv = VerifyKV(decoder, len(prompt_ids) + max_new_tokens + draft.widest + 1, draft.widest + 1)
    last = kv.feed([prompt_ids])[0]
    following = sampler.choose(last)
    chosen = Step(following, logprob_of(last, following))
    context, made = list(prompt_ids), 0
    while following not in stops and made < max_new_tokens:
        yield chosen
        made += 1
        context.append(following)
        if made == max_new_tokens:
            return
        proposal, dists = draft.propose(context, max_new_tokens - made)
        rows = kv.feed_all([following, *proposal])
        counts.steps += 1
        kept, following = _accept(rows, proposal, dists, sampler, stops)
        draft.feedback(len(proposal), kept)
        counts.drafted, counts.accepted = counts.drafted + len(proposal), counts.accepted + kept
        for j in range(kept):
            yield Step(proposal[j], logprob_of(rows[j], proposal[j]))
        made += kept
        context += proposal[:kept]
        kv.rollback(len(proposal) - kept)
        chosen = Step(following, logprob_of(rows[kept], following))


@dataclass
class Speculated:
    tokens: list[int]
    steps: int  # model runs after the prompt
    drafted: int  # draft tokens checked
    accepted: int  # draft tokens kept


def speculate(decoder: Decoder, prompt_ids: list[int], max_new_tokens: int, speculation: Speculation,
              sampling: Sampling = Sampling(), stop_at_eos: bool = True) -> Speculated:
    """The model's continuation of `prompt_ids` (stopping at its stop tokens), checked a draft at a time."""
    counts = Counts()
    tokens = [s.token for s in speculative_steps(decoder, prompt_ids, max_new_tokens, speculation, sampling,
                                                 counts, stop_at_eos)]
    return Speculated(tokens, counts.steps, counts.drafted, counts.accepted)
