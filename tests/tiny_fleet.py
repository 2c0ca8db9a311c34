"""A whole calm fleet of tiny random-weight models, built inside the tests: every generative model of
models.lock (as a tiny llama, qwen2 or gemma3 decoder, fused like a real export) and the routing encoder
(a tiny BERT with a WordPiece tokenizer), laid out in a cache directory exactly as `calm models export`
leaves it (manifests included). Served at CALM_PRECISION=fp32, it runs every policy through every front
in seconds; answers are random bytes, so tests check machinery, never answers.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

from calm_cli.fleet import lock
from calm_cli.fleet.export_worker import _optimum_export
from calm_cli.fleet.graph import fuse
from calm_cli.fleet.store import Store, write_manifest
from tiny_models import EOS, VOCAB, save_tokenizer

CONTEXT = 2048  # room for the policies' max_tokens after the longest prompt template
ARCH = {"llama": "llama", "qwen2": "qwen2", "gemma3": "gemma3"}


def _decoder(arch: str, seed: int):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT,
                  eos_token_id=EOS, bos_token_id=EOS, pad_token_id=EOS)
    if arch == "llama":
        config = transformers.LlamaConfig(**common)
    elif arch == "qwen2":
        config = transformers.Qwen2Config(**common)
    else:
        config = transformers.Gemma3TextConfig(**common, head_dim=16, sliding_window=8, query_pre_attn_scalar=16)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


ENCODER_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", *"abcdefghijklmnopqrstuvwxyz0123456789.,!?'\"-+*/=()"]


def _encoder_tokenizer(directory: Path) -> None:
    """A WordPiece tokenizer over lowercase letters, digits and punctuation, with BERT's special tokens."""
    vocab = ENCODER_VOCAB
    tokenizer = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                            special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tokenizer.save(str(directory / "tokenizer.json"))


def _encoder(out: Path) -> None:
    config = transformers.BertConfig(vocab_size=len(ENCODER_VOCAB), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=512)
    torch.manual_seed(7)
    _optimum_export(transformers.BertModel(config).eval(), out, "feature-extraction")
    _encoder_tokenizer(out)


def build_tiny_fleet(cache_root: Path) -> Store:
    """Export a tiny stand-in for every model of models.lock into `cache_root` (fp32; the encoder too)."""
    store = Store(cache_root)
    built: dict[str, Path] = {}
    for i, spec in enumerate(lock.load().values()):
        final = store.export_dir(spec.name, "fp32")
        with store.staged(final) as stage:
            if not spec.generative:
                _encoder(stage)
            elif spec.architecture in built:  # same architecture: the same tiny weights under another name
                for item in built[spec.architecture].iterdir():
                    if item.name != "manifest.json":
                        shutil.copy2(item, stage / item.name)
            else:
                _optimum_export(_decoder(ARCH[spec.architecture], seed=i), stage, spec.task)
                fuse.fuse_export(stage)
                save_tokenizer(stage)
            write_manifest(stage, {"kind": "export", "model": spec.name, "precision": "fp32", "tiny": True})
        if spec.generative:
            built.setdefault(spec.architecture, final)
    return store
