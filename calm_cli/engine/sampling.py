"""Choosing the next token from logits: greedy, or temperature with top-k / top-p, seeded."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy; top_k 0 and top_p 1.0 switch those filters off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


class Sampler:
    """One request's token chooser; owns its random generator so seeded runs repeat exactly."""

    def __init__(self, sampling: Sampling):
        self.sampling = sampling
        self.rng = np.random.default_rng(sampling.seed)

    def _support(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The tokens temperature, top-k and top-p leave, best first, and their probabilities."""
        s = self.sampling
        scaled = logits.astype(np.float64) / s.temperature
        candidates = np.arange(scaled.shape[-1])
        if s.top_k and s.top_k < scaled.shape[-1]:
            candidates = np.argpartition(-scaled, s.top_k - 1)[: s.top_k]
        order = candidates[np.argsort(-scaled[candidates], kind="stable")]
        probs = np.exp(scaled[order] - scaled[order[0]])
        probs /= probs.sum()
        if s.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(probs), s.top_p) + 1)
            order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
        return order, probs

    def choose(self, logits: np.ndarray) -> int:
        if self.sampling.greedy:
            return int(np.argmax(logits))
        order, probs = self._support(logits)
        return int(order[self.rng.choice(len(order), p=probs)])

    def probs(self, logits: np.ndarray) -> np.ndarray:
        """The distribution `choose` draws from, over the whole vocabulary (one-hot when greedy): what
        speculative sampling's acceptance rule compares."""
        dense = np.zeros(logits.shape[-1], dtype=np.float64)
        if self.sampling.greedy:
            dense[int(np.argmax(logits))] = 1.0
        else:
            order, probs = self._support(logits)
            dense[order] = probs
        return dense

    def draw(self, probs: np.ndarray) -> int:
        """A token from a dense distribution (which need not be normalised)."""
        return int(self.rng.choice(len(probs), p=probs / probs.sum()))

    def uniform(self) -> float:
        return float(self.rng.random())
