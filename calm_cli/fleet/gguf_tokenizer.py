"""Serving tokenizer built from a GGUF file's own tokenizer metadata.

Why: llama.cpp tokenizes from the ``tokenizer.ggml.*`` keys of the GGUF, so those keys are the
source of truth for the ids the exported model expects. transformers' GGUF converter
gets our files wrong (Unigram for Gemma, BOS for SmolLM2, an NFC normalizer for Qwen), so we build
the ``tokenizers`` pipeline ourselves and prove it against llama.cpp (tests/test_tokenizers.py).

The tokenizer built here is calm_cli.engine.tokenizer's GGUFTokenizer: serving reads back what it saves
with engine's :func:`~calm_cli.engine.tokenizer.load_tokenizer` and never imports this module. ``gguf`` is
imported lazily because it is an export-time dependency.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)

from calm_cli.engine.tokenizer import GGUFTokenizer

_KEY = "tokenizer.ggml."
# GGUF token types (gguf.TokenType); NORMAL, UNUSED and BYTE tokens live only in the model vocabulary.
_UNKNOWN = 2
_CONTROL = 3
_USER_DEFINED = 4

# Texts llama.cpp promotes to control tokens whatever their GGUF type (llama-vocab.cpp, load(): EOT,
# FIM and end-of-generation detection). Qwen2.5 stores "</s>" as a normal token and Gemma 3 as a
# user-defined one, yet llama.cpp splits both out as special tokens; we must do the same.
_LLAMA_CPP_CONTROL_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<｜end▁of▁sentence｜>", "[e~[",
    "<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>",
    "<|code_prefix|>", "<|prefix|>",
    "<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>",
    "<|code_suffix|>", "<|suffix|>",
    "<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>",
    "<|code_middle|>", "<|middle|>",
    "<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]",
    "<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>", "<|file_sep|>",
})

# Chat turns end with one of these (besides the GGUF's EOS); generation must stop there.
_END_OF_TURN_TEXTS = ("<|im_end|>", "<|endoftext|>", "<end_of_turn>", "<|eot_id|>", "<|end|>")

# Qwen2's split regex from its tokenizer.json (llama.cpp: LLAMA_VOCAB_PRE_TYPE_QWEN2).
_QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _qwen2_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """Qwen2 regex split, then byte-level mapping without GPT-2's own regex."""
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN2_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])


def _smollm_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """One digit per piece, then GPT-2's regex and byte-level mapping (llama.cpp: SMOLLM)."""
    return pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])


_GPT2_PRE_TOKENIZERS: dict[str, Callable[[], pre_tokenizers.PreTokenizer]] = {
    "qwen2": _qwen2_pre_tokenizer,
    "smollm": _smollm_pre_tokenizer,
}


def read_gguf_metadata(gguf_path: Path) -> dict[str, Any]:
    """The ``tokenizer.ggml.*`` keys of a GGUF file as plain Python values."""
    from gguf import GGUFReader  # export-time dependency; serving never calls this

    reader = GGUFReader(gguf_path)
    meta: dict[str, Any] = {}
    for name, field in reader.fields.items():
        if name.startswith(_KEY):
            meta[name] = field.contents()
    return meta


def build_tokenizer(gguf_path: Path) -> GGUFTokenizer:
    """Build the serving tokenizer from the GGUF file's own metadata."""
    return tokenizer_from_metadata(read_gguf_metadata(gguf_path))


def tokenizer_from_metadata(meta: Mapping[str, Any]) -> GGUFTokenizer:
    """Build the tokenizer from ``tokenizer.ggml.*`` values; raise ValueError on anything unsupported."""
    model = meta[_KEY + "model"]
    pre = meta.get(_KEY + "pre", "default")
    if model == "llama":
        if meta.get(_KEY + "add_space_prefix", True):
            # llama.cpp's default for SPM; none of our models uses it, so it is not implemented.
            raise ValueError("unsupported GGUF tokenizer: model 'llama' with add_space_prefix true")
        default_add_bos = True
    elif model == "gpt2":
        if pre not in _GPT2_PRE_TOKENIZERS:
            raise ValueError(
                f"unsupported GGUF pre-tokenizer {pre!r} for tokenizer model 'gpt2' "
                f"(supported: {', '.join(sorted(_GPT2_PRE_TOKENIZERS))})"
            )
        default_add_bos = False
    else:
        raise ValueError(f"unsupported GGUF tokenizer model {model!r} (supported: 'gpt2', 'llama')")

    tokens: list[str] = list(meta[_KEY + "tokens"])
    types: list[int] = [int(t) for t in meta[_KEY + "token_type"]]
    vocab = {text: i for i, text in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("GGUF vocabulary has duplicate token texts; ids would not round-trip")
    special = [
        i
        for i, (text, kind) in enumerate(zip(tokens, types))
        if kind in (_UNKNOWN, _CONTROL) or text in _LLAMA_CPP_CONTROL_TEXTS
    ]
    special_set = set(special)
    user_defined = [i for i, k in enumerate(types) if k == _USER_DEFINED and i not in special_set]

    if model == "llama":
        unk_id = _optional_int(meta.get(_KEY + "unknown_token_id"))
        tokenizer = _spm_tokenizer(vocab, meta[_KEY + "scores"], None if unk_id is None else tokens[unk_id])
    else:
        tokenizer = _gpt2_tokenizer(vocab, meta[_KEY + "merges"], pre)

    # llama.cpp splits these out of the raw text before the model sees it (tokenizer_st_partition):
    # control/unknown ones only when parse_special is set, user-defined ones always. Likewise
    # `tokenizers` skips special added tokens only when encode_special_tokens is set.
    tokenizer.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in special])
    tokenizer.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i in user_defined])

    bos_id = _optional_int(meta.get(_KEY + "bos_token_id"))
    eos_id = _optional_int(meta.get(_KEY + "eos_token_id"))
    add_bos = bool(meta.get(_KEY + "add_bos_token", default_add_bos))
    add_eos = bool(meta.get(_KEY + "add_eos_token", False))
    if (add_bos and bos_id is None) or (add_eos and eos_id is None):
        raise ValueError("GGUF asks for BOS/EOS to be added but names no bos/eos_token_id")
    tokenizer.post_processor = _post_processor(
        tokens, bos_id if add_bos else None, eos_id if add_eos else None
    )

    end_of_turn = [vocab[t] for t in _END_OF_TURN_TEXTS if vocab.get(t) in special_set]
    stop_ids = list(dict.fromkeys([*([eos_id] if eos_id is not None else []), *end_of_turn]))
    return GGUFTokenizer(
        tokenizer=tokenizer,
        model=model,
        pre=pre,
        bos_id=bos_id,
        eos_id=eos_id,
        pad_id=_optional_int(meta.get(_KEY + "padding_token_id")),
        add_bos=add_bos,
        add_eos=add_eos,
        stop_ids=stop_ids,
    )


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _spm_tokenizer(vocab: dict[str, int], scores: Sequence[float], unk: str | None) -> Tokenizer:
    """llama.cpp's SPM tokenizer as BPE: byte fallback, spaces as '▁', merges ranked by score.

    llama.cpp repeatedly joins the adjacent pair whose concatenation is the highest-scoring token;
    BPE with every two-token split of every token, ranked by that token's score, does the same.
    """
    ranked: list[tuple[float, int, str, str]] = []
    for text, token_id in vocab.items():
        for cut in range(1, len(text)):
            left, right = text[:cut], text[cut:]
            if left in vocab and right in vocab:
                ranked.append((-float(scores[token_id]), token_id, left, right))
    ranked.sort()
    tokenizer = Tokenizer(models.BPE(
        vocab=vocab,
        merges=[(left, right) for _, _, left, right in ranked],
        unk_token=unk,
        byte_fallback=True,
    ))
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    return tokenizer


def _gpt2_tokenizer(vocab: dict[str, int], merges: Sequence[str], pre: str) -> Tokenizer:
    """Byte-level BPE with the file's own merges, as llama.cpp's BPE tokenizer runs it."""
    pairs = []
    for merge in merges:
        cut = merge.find(" ", 1)  # llama.cpp splits at the first space after the first character
        pairs.append((merge[:cut], merge[cut + 1:]))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=pairs))
    tokenizer.pre_tokenizer = _GPT2_PRE_TOKENIZERS[pre]()
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _post_processor(tokens: list[str], bos_id: int | None, eos_id: int | None) -> processors.PostProcessor:
    """Prepend BOS / append EOS exactly when the GGUF asks (add_bos_token / add_eos_token).

    Template pieces are named BOS/EOS rather than by token text, which may contain ':' or spaces.
    """
    named = {"BOS": bos_id, "EOS": eos_id}
    return processors.TemplateProcessing(
        single=[*(["BOS"] if bos_id is not None else []), "$A", *(["EOS"] if eos_id is not None else [])],
        special_tokens=[
            {"id": n, "ids": [i], "tokens": [tokens[i]]} for n, i in named.items() if i is not None
        ],
    )
