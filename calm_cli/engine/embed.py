"""Sentence embeddings for routing: the MiniLM encoder (int8 per channel), mean pooling, L2 normalisation."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from calm_cli.engine.session import open_session, provider_of

MAX_TOKENS = 256  # all-MiniLM-L6-v2 was trained on 256-token inputs; longer text is cut


class Encoder:
    """One loaded encoder session; `embed` turns texts into unit vectors whose dot product is cosine."""

    def __init__(self, directory: Path):
        started = time.perf_counter()
        self.session = open_session(directory / "model.onnx")
        self.provider = provider_of(self.session)
        self.load_ms = (time.perf_counter() - started) * 1000
        self.tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        self.tokenizer.enable_truncation(MAX_TOKENS)
        self.tokenizer.enable_padding(pad_id=self.tokenizer.token_to_id("[PAD]") or 0)
        self.input_names = {i.name for i in self.session.get_inputs()}

    def embed(self, texts: list[str]) -> np.ndarray:
        """[len(texts), dim] float32, each row of unit length."""
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        encodings = self.tokenizer.encode_batch(texts)
        ids = np.asarray([e.ids for e in encodings], dtype=np.int64)
        mask = np.asarray([e.attention_mask for e in encodings], dtype=np.int64)
        feed = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self.input_names:
            feed["token_type_ids"] = np.zeros_like(ids)
        hidden = self.session.run(["last_hidden_state"], feed)[0]
        weights = mask[..., None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
        return (pooled / np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)).astype(np.float32)
