"""The serving tokenizer built from each GGUF encodes exactly as llama.cpp does.

Golden ids come from llama.cpp itself (scripts/make_golden_tokens.py); the tokenizer under test is
built from the GGUF, saved, and loaded back the way serving loads it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from calm_cli.engine.tokenizer import load_tokenizer
from calm_cli.fleet.gguf_tokenizer import build_tokenizer, tokenizer_from_metadata

GOLDEN_DIR = Path(__file__).parent / "fixtures" / "golden_tokens"

# What serving relies on besides the ids: BOS policy and where generation stops.
EXPECTED_META = {
    "smollm2-135m": {"model": "gpt2", "pre": "smollm", "add_bos": False, "eos_id": 2, "stop_ids": [2, 0]},
    "gemma3-270m": {
        "model": "llama", "pre": "default", "add_bos": True, "bos_id": 2, "eos_id": 1, "stop_ids": [1, 106]
    },
    **{
        name: {
            "model": "gpt2", "pre": "qwen2", "add_bos": False, "eos_id": 151645, "stop_ids": [151645, 151643]
        }
        for name in ("qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b")
    },
}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@pytest.mark.fleet
@pytest.mark.parametrize("name", sorted(EXPECTED_META))
def test_encodes_like_llama_cpp(name: str, gguf_file, tmp_path: Path) -> None:
    golden = json.loads((GOLDEN_DIR / f"{name}.json").read_text(encoding="utf-8"))
    path = gguf_file(name)
    assert _sha256(path) == golden["gguf_sha256"], f"{path} is not the GGUF the golden ids were made from"

    build_tokenizer(path).save(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert {k: tok.meta()[k] for k in EXPECTED_META[name]} == EXPECTED_META[name]

    mismatches = [
        f"{case['text']!r}\n  llama.cpp: {case['ids']}\n  ours:      {ours}"
        for case in golden["cases"]
        if (ours := tok.encode(case["text"], add_special=golden["add_bos"])) != case["ids"]
    ]
    assert not mismatches, f"{len(mismatches)}/{len(golden['cases'])} cases differ:\n" + "\n".join(mismatches)

    lossy = [
        case["text"]
        for case in golden["cases"]
        if case["lossless"] and tok.decode(tok.encode(case["text"], add_special=False)) != case["text"]
    ]
    assert not lossy, f"decode does not round-trip: {lossy}"


def _fake_meta(model: str, pre: str) -> dict:
    return {
        "tokenizer.ggml.model": model,
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": ["a", "b", "ab"],
        "tokenizer.ggml.token_type": [1, 1, 1],
        "tokenizer.ggml.merges": ["a b"],
    }


def test_unknown_pre_tokenizer_is_named() -> None:
    with pytest.raises(ValueError, match="'llama-bpe'"):
        tokenizer_from_metadata(_fake_meta("gpt2", "llama-bpe"))


def test_unknown_tokenizer_model_is_named() -> None:
    with pytest.raises(ValueError, match="'bert'"):
        tokenizer_from_metadata(_fake_meta("bert", "default"))


def test_spm_from_scores() -> None:
    """Merges follow token scores, bytes fall back, control and user-defined tokens split out."""
    tokens = ["<unk>", "<bos>", "<eos>", "<end_of_turn>", "</s>", "\n"]
    tokens += ["▁", "a", "b", "ab", "▁a", "▁ab", "ba"]
    types = [3, 3, 3, 3, 4, 4, 1, 1, 1, 1, 1, 1, 1]
    scores = [0, 0, 0, 0, 0, 0, -1, -2, -3, -5, -6, -7, -4]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256
    scores += [0] * 256
    meta = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.add_space_prefix": False,
    }
    tok = tokenizer_from_metadata(meta)
    ids = {t: i for i, t in enumerate(tokens)}
    # "ba" outscores "ab", so "aba" is a + ba; "é" is no token, so it is spelled in bytes.
    expected = ["<bos>", "ab", "▁a", "ba", "\n", "</s>", "<0xC3>", "<0xA9>", "<end_of_turn>"]
    assert tok.encode("ab aba\n</s>é<end_of_turn>") == [ids[t] for t in expected]
    assert tok.stop_ids == [2, 3]
    assert tok.decode(tok.encode("ab aba\né", add_special=False)) == "ab aba\né"
