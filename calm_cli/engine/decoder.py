"""A loaded decoder export: its session, tokenizer, context window and graph layout, and the prompt as it
can be fed.

Loading is one explicit step (`Decoder.load`) whose time and memory are measured; the Decoder it returns
never changes afterwards, so every request on the model shares it. What a request owns (its KV state) lives
in kv.py, the decoding loop in decode.py.

Two graphs can serve (see session.decoder_graph): Optimum's plain graph, whose past KV goes in whole and
comes back one step longer, and the fused graph (fleet/graph/fuse.py, CPU), which updates caller-owned KV
buffers in place and makes logits only for the positions asked for (`fused`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from calm_cli.engine.meters import EnergyMeter, rss_mb
from calm_cli.engine.session import decoder_graph, open_session, provider_of
from calm_cli.engine.tokenizer import GGUFTokenizer, load_tokenizer
from calm_cli.errors import PromptError, PromptTooLong

__all__ = ["Decoder", "KVLayout", "PromptError", "PromptTooLong"]

NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


@dataclass(frozen=True)
class KVLayout:
    """The KV cache as the graph's inputs declare it: one past/present pair per layer and key/value, each
    [batch, heads, positions, head_dim] of `dtype`."""

    past_names: tuple[str, ...]
    present_names: tuple[str, ...]
    heads: int
    head_dim: int
    dtype: type[np.floating]


@dataclass(frozen=True, eq=False)
class Decoder:
    """One loaded decoder model: its session, tokenizer, context, graph layout and load-time footprint."""

    directory: Path
    session: ort.InferenceSession
    provider: str
    device_id: int
    tokenizer: GGUFTokenizer
    context: int  # tokens the model was trained to attend over (config.json's max_position_embeddings)
    layout: KVLayout
    fused: bool  # the fused graph: KV buffers updated in place, `seqlens_k` instead of a mask
    uses_position_ids: bool
    logits_type: type[np.floating]
    vocab: int
    meter: EnergyMeter
    load_ms: float  # opening the session, the part of a load that grows with the model
    memory_mb: float  # what opening the session took (RSS growth on CPU, NVML's figure on a GPU)

    @classmethod
    def load(cls, directory: Path) -> Decoder:
        """Open the export's decoder graph on the best provider and read its tokenizer and layout."""
        started, before = time.perf_counter(), rss_mb()
        session = open_session(decoder_graph(directory))
        provider = provider_of(session)
        meter = EnergyMeter(on_gpu=provider == "CUDAExecutionProvider")
        load_ms = (time.perf_counter() - started) * 1000
        memory_mb = rss_mb() - before if meter.handle is None else meter.memory_mb()
        tokenizer = load_tokenizer(directory)
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
        inputs = {i.name: i for i in session.get_inputs()}
        past_names = tuple(n for n in inputs if n.startswith("past_key_values."))
        _, heads, _, head_dim = inputs[past_names[0]].shape
        logits = session.get_outputs()[0]
        return cls(
            directory=directory, session=session, provider=provider,
            device_id=int(session.get_provider_options().get(provider, {}).get("device_id", 0)),
            tokenizer=tokenizer, context=int(config.get("max_position_embeddings") or 2048),
            layout=KVLayout(past_names, tuple(n.replace("past_key_values.", "present.") for n in past_names),
                            int(heads), int(head_dim), NP_TYPES[inputs[past_names[0]].type]),
            fused="seqlens_k" in inputs, uses_position_ids="position_ids" in inputs,
            logits_type=NP_TYPES[logits.type], vocab=int(logits.shape[-1]),
            meter=meter, load_ms=load_ms, memory_mb=memory_mb)

    def encode(self, prompt: str) -> list[int]:
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise PromptError(f"the prompt is not valid UTF-8 (at character {exc.start})") from None
        ids = self.tokenizer.encode(prompt)
        if not ids:
            raise PromptError("the prompt is empty")
        return ids

    def fit(self, ids: list[int], max_new_tokens: int, truncate: bool) -> list[int]:
        """The prompt as it can be fed: refused, or cut from the left when `truncate`, if too long."""
        room = self.context - max_new_tokens
        if len(ids) <= room:
            return ids
        if truncate and room > 0:
            return ids[len(ids) - room:]
        raise PromptTooLong(f"prompt of {len(ids)} tokens + {max_new_tokens} new tokens exceeds the context window "
                          f"of {self.context} tokens (ask for truncation, or fewer new tokens)")
