"""Greedy generation over an exported decoder: onnxruntime + numpy + tokenizers, no torch.

The graph Optimum exports takes the whole past KV cache in and returns a longer `present` cache each step;
this loop feeds the cache back by name. It is the plain baseline; speed work builds on it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from tokenizers.decoders import DecodeStream

from calm_cli.engine.session import open_session, provider_of
from calm_cli.fleet.gguf_tokenizer import GGUFTokenizer, load_tokenizer

_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class PromptError(ValueError):
    """A prompt the model cannot take (empty, or longer than its context window)."""


@dataclass
class Decoder:
    """One loaded decoder model: its session, tokenizer and cache layout."""

    directory: Path
    tokenizer: GGUFTokenizer = field(init=False)

    def __post_init__(self) -> None:
        self.session = open_session(self.directory / "model.onnx")
        self.provider = provider_of(self.session)
        self.tokenizer = load_tokenizer(self.directory)
        config = json.loads((self.directory / "config.json").read_text(encoding="utf-8"))
        self.context = int(config.get("max_position_embeddings") or 2048)
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.past_names = [n for n in inputs if n.startswith("past_key_values.")]
        batch, heads, _, head_dim = inputs[self.past_names[0]].shape
        self.cache_shape = (1, int(heads), 0, int(head_dim))
        self.cache_type = _NP_TYPES[inputs[self.past_names[0]].type]
        self.present_of = {n: n.replace("past_key_values.", "present.") for n in self.past_names}
        self.uses_position_ids = "position_ids" in inputs
        self.output_names = ["logits", *self.present_of.values()]

    def encode(self, prompt: str) -> list[int]:
        ids = self.tokenizer.encode(prompt)
        if not ids:
            raise PromptError("the prompt is empty")
        return ids

    def logits(self, ids: list[int]) -> np.ndarray:
        """Next-token logits after every position of `ids` in one pass: [len(ids), vocab]."""
        if len(ids) > self.context:
            raise PromptError(f"{len(ids)} tokens exceed the context window of {self.context} tokens")
        feed = {"input_ids": np.asarray([ids], dtype=np.int64),
                "attention_mask": np.ones((1, len(ids)), dtype=np.int64),
                **{n: np.zeros(self.cache_shape, self.cache_type) for n in self.past_names}}
        if self.uses_position_ids:
            feed["position_ids"] = np.arange(len(ids), dtype=np.int64)[None, :]
        return self.session.run(["logits"], feed)[0][0]

    def greedy(self, prompt_ids: list[int], max_new_tokens: int) -> Iterator[int]:
        """Token ids chosen greedily, stopping at the model's stop tokens (not yielded)."""
        if len(prompt_ids) + max_new_tokens > self.context:
            raise PromptError(f"prompt of {len(prompt_ids)} tokens + {max_new_tokens} new tokens exceeds the "
                              f"context window of {self.context} tokens")
        past = {n: np.zeros(self.cache_shape, self.cache_type) for n in self.past_names}
        step_ids = np.asarray([prompt_ids], dtype=np.int64)
        seen = 0
        stops = set(self.tokenizer.stop_ids)
        for _ in range(max_new_tokens):
            total = seen + step_ids.shape[1]
            feed = {"input_ids": step_ids, "attention_mask": np.ones((1, total), dtype=np.int64), **past}
            if self.uses_position_ids:
                feed["position_ids"] = np.arange(seen, total, dtype=np.int64)[None, :]
            logits, *presents = self.session.run(self.output_names, feed)
            token = int(np.argmax(logits[0, -1]))
            if token in stops:
                return
            yield token
            past = dict(zip(self.past_names, presents))
            seen = total
            step_ids = np.asarray([[token]], dtype=np.int64)

    def stream_text(self, prompt: str, max_new_tokens: int, stop: list[str] = ()) -> Iterator[str]:
        """Answer text as it is produced, ending before any stop string; characters are never split.

        Text that could still turn into a stop string is held back until it cannot. The pieces always
        join to what decoding the whole answer at once gives (an unfinished character included).
        """
        stream = DecodeStream(skip_special_tokens=True)
        ids: list[int] = []
        emitted = ""

        def cut(text: str, final: bool) -> tuple[str, bool]:
            """The part of `text` that can be shown now, and whether a stop string ended the answer."""
            hits = [i for i in (text.find(s) for s in stop) if i >= 0]
            if hits:
                return text[: min(hits)], True
            if final:
                return text, False
            keep = max((k for s in stop for k in range(len(s), 0, -1) if text.endswith(s[:k])), default=0)
            return text[: len(text) - keep], False

        pending = ""
        for token in self.greedy(self.encode(prompt), max_new_tokens):
            ids.append(token)
            pending += stream.step(self.tokenizer.tokenizer, token) or ""
            shown, stopped = cut(pending, final=False)
            if shown:
                yield shown
                emitted += shown
                pending = pending[len(shown):]
            if stopped:
                return
        shown, _ = cut(self.tokenizer.decode(ids, skip_special=True)[len(emitted):], final=True)
        if shown:
            yield shown
