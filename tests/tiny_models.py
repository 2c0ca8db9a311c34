"""Tiny random-weight decoders (llama, qwen2, gemma3) and a byte-level tokenizer, built inside the tests."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from tokenizers.pre_tokenizers import ByteLevel

from calm_cli.fleet.gguf_tokenizer import tokenizer_from_metadata

VOCAB = 257  # 256 byte-level tokens + one end-of-turn control token
EOS = 256


def tiny_model(arch: str, seed: int = 0):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  eos_token_id=EOS, bos_token_id=EOS, pad_token_id=EOS)
    if arch == "llama":
        config = transformers.LlamaConfig(**common)
    elif arch == "qwen2":
        config = transformers.Qwen2Config(**common)
    else:  # a window of 8, shorter than the longest prompts of the tests
        config = transformers.Gemma3TextConfig(**common, head_dim=16, sliding_window=8, query_pre_attn_scalar=16)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def save_tokenizer(directory: Path, reverse: bool = False) -> None:
    """A GGUF-style byte-level tokenizer (any fixed order of the 256 symbols, `reverse`d for a tokenizer that
    numbers the same text differently) with <|im_end|> as EOS."""
    tokens = sorted(ByteLevel.alphabet(), key=lambda ch: ch.encode(), reverse=reverse)
    tokenizer_from_metadata({
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2",
        "tokenizer.ggml.tokens": [*tokens, "<|im_end|>"],
        "tokenizer.ggml.token_type": [1] * 256 + [3], "tokenizer.ggml.merges": [],
        "tokenizer.ggml.eos_token_id": EOS,
    }).save(directory)
