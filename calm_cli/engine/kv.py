"""A request's KV state over a loaded decoder: the positions fed so far, held where the graph reads them.

One kind per graph (`open_kv` picks). Optimum's plain graph takes the whole past in and returns a longer
`present` each step; GrowingKV keeps those as onnxruntime values bound to the next step (IOBinding), so on
CUDA the cache never leaves the GPU. The fused graph updates fixed buffers in place; SharedKV allocates them
once per request, and nothing is copied or grown per token.

Both take `feed(rows)`: each row's new tokens (a whole prompt on the first call, one token after), giving the
logits at each row's last new position. Speculative decoding's verify step needs two more things of the
same state, and both fit it: logits at every new position (SharedKV: a `logits_index` over all new positions
with a logits buffer of that many rows; the plain graph makes them already) and rolling back n positions
(SharedKV: lower `lengths`, since the kernel reads each row's length and the next feed overwrites what lies
beyond it; GrowingKV: drop the mask's last columns and cut the presents' position axis).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import onnxruntime as ort

from calm_cli.engine.decoder import Decoder


class KV(ABC):
    """A request's KV state and the binding of the session's inputs and outputs to it."""

    def __init__(self, decoder: Decoder):
        self.decoder = decoder
        self.io = decoder.session.io_binding()

    @abstractmethod
    def feed(self, rows: list[list[int]]) -> np.ndarray:
        """Append each row's tokens (several on the first call, one after); logits at each row's last: [B, V]."""

    def _run(self, arrays: dict[str, np.ndarray]) -> None:
        """Bind host arrays as inputs and run; binding and run share one call so the arrays outlive the run."""
        for name, array in arrays.items():
            self.io.bind_cpu_input(name, array)
        self.decoder.session.run_with_iobinding(self.io)


class GrowingKV(KV):
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
        d = self.decoder
        if self.mask is None:
            width = max(map(len, rows))
            pad = d.tokenizer.pad_id or 0
            ids = np.asarray([[pad] * (width - len(r)) + r for r in rows], dtype=np.int64)
            self.mask = np.asarray([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=np.int64)
            feed = empty_past(d, self.batch)
        else:
            ids = np.asarray(rows, dtype=np.int64)
            self.mask = np.concatenate([self.mask, np.ones((len(rows), 1), dtype=np.int64)], axis=1)
            feed = {}
        feed.update(input_ids=ids, attention_mask=self.mask)
        if d.uses_position_ids:
            feed["position_ids"] = np.clip(np.cumsum(self.mask, axis=1) - 1, 0, None)[:, -ids.shape[1]:].copy()
        self.io.bind_output("logits")  # rebound each step: a filled output would be reused as a fixed buffer
        for name in d.layout.present_names:
            self.io.bind_output(name, self.device, d.device_id)
        self._run(feed)
        logits, *presents = self.io.get_outputs()
        for name, value in zip(d.layout.past_names, presents):
            self.io.bind_ortvalue_input(name, value)
        return logits.numpy()[:, -1]


class SharedKV(KV):
    """The fused graph: KV buffers of a fixed capacity that GroupQueryAttention updates in place.

    Each buffer is bound as both `past` and `present`, so a step writes only its new positions. Rows are
    right-padded; `seqlens_k` tells the kernel each row's length, and only each row's last logits are made,
    straight into one host array bound for the whole request (no per-step output allocation or copy).
    """

    def __init__(self, decoder: Decoder, batch: int, capacity: int):
        super().__init__(decoder)
        self.logits = np.empty((batch, decoder.vocab), decoder.logits_type)
        self.io.bind_output("logits", "cpu", 0, self.logits.dtype, list(self.logits.shape), self.logits.ctypes.data)
        layout = decoder.layout
        self.buffers = [ort.OrtValue.ortvalue_from_numpy(np.zeros((batch, layout.heads, capacity, layout.head_dim),
                                                                  layout.dtype)) for _ in layout.past_names]
        for past, present, buffer in zip(layout.past_names, layout.present_names, self.buffers):
            self.io.bind_ortvalue_input(past, buffer)
            self.io.bind_ortvalue_output(present, buffer)
        self.lengths = np.zeros(batch, dtype=np.int64)

    def feed(self, rows: list[list[int]]) -> np.ndarray:
        """As `KV.feed`; the array returned is this state's logits buffer: the next feed overwrites it."""
        width = max(map(len, rows))
        counts = np.asarray([len(r) for r in rows], dtype=np.int64)
        self.lengths += counts
        self._run({"input_ids": np.asarray([r + [0] * (width - len(r)) for r in rows], dtype=np.int64),
                   "seqlens_k": (self.lengths - 1).astype(np.int32),
                   "total_sequence_length": np.asarray(self.lengths.max(), dtype=np.int32),
                   "logits_index": np.arange(len(rows), dtype=np.int64) * width + counts - 1})
        return self.logits


def open_kv(decoder: Decoder, batch: int, capacity: int) -> KV:
    """A request's KV state for `batch` rows of up to `capacity` tokens each (the fused graph allocates it)."""
    return SharedKV(decoder, batch, capacity) if decoder.fused else GrowingKV(decoder, batch)


def empty_past(decoder: Decoder, batch: int) -> dict[str, np.ndarray]:
    """A past of no positions, as host arrays: the first step's input to the plain graph or to decode.forward."""
    layout = decoder.layout
    return {n: np.zeros((batch, layout.heads, 0, layout.head_dim), layout.dtype) for n in layout.past_names}
