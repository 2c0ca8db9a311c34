"""Write llama.cpp's token ids for the tokenizer corpus: the golden files tests/test_tokenizers.py checks.

llama.cpp (through llama-cpp-python) is the oracle: it tokenizes straight from the GGUF, as the model
was converted. Run it from the repository root with a venv that has llama-cpp-python and gguf
(not needed anywhere else):

    /work/venv-oracle/bin/python scripts/make_golden_tokens.py \\
        smollm2-135m=/tmp/gguf/smollm2-135m.gguf \\
        gemma3-270m=/tmp/gguf/gemma3-270m.gguf \\
        qwen2.5-coder-0.5b=/tmp/gguf/qwen2.5-coder-0.5b.gguf \\
        qwen2.5-coder-1.5b=/tmp/gguf/qwen2.5-coder-1.5b.gguf

It reads tests/fixtures/tokenizer_corpus.json (a JSON list of strings) and writes
tests/fixtures/golden_tokens/<model-name>.json:

    {"gguf_sha256": ..., "llama_cpp_python": version, "add_bos": true,
     "cases": [{"text": ..., "ids": [...], "lossless": bool}, ...]}

``ids`` is ``Llama.tokenize(text, add_bos=True, special=True)``: add_bos=True asks llama.cpp to add
BOS/EOS where the GGUF says so (add_bos_token / add_eos_token), special=True parses control tokens
in the text. ``lossless`` says whether llama.cpp (llama_detokenize) turns the ids without added BOS/EOS
(add_bos=False) back into exactly the text, i.e. whether a decode round-trip can be expected.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
from pathlib import Path

import llama_cpp

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tests" / "fixtures" / "tokenizer_corpus.json"
GOLDEN_DIR = ROOT / "tests" / "fixtures" / "golden_tokens"
MODELS = ("smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def detokenize(llm: llama_cpp.Llama, ids: list[int]) -> bytes:
    """llama.cpp's own llama_detokenize, special tokens rendered. Not Llama.detokenize: it cuts
    pieces longer than 32 bytes (Qwen's runs of spaces) and drops a leading space after BOS."""
    tokens = (llama_cpp.llama_token * len(ids))(*ids)
    size = 4 * len(ids) + 64
    while True:
        buffer = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_detokenize(llm._model.vocab, tokens, len(ids), buffer, size, False, True)
        if n >= 0:
            return buffer.raw[:n]
        size = -n


def golden(gguf: Path, texts: list[str]) -> dict:
    llm = llama_cpp.Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    cases = []
    for text in texts:
        ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        plain = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        lossless = detokenize(llm, plain) == text.encode("utf-8")
        cases.append({"text": text, "ids": ids, "lossless": lossless})
    return {
        "gguf_sha256": sha256(gguf),
        "llama_cpp_python": llama_cpp.__version__,
        "add_bos": True,
        "cases": cases,
    }


def dumps(data: dict) -> str:
    """JSON with one case per line, so a changed id shows up as a one-line diff."""
    head = json.dumps({k: v for k, v in data.items() if k != "cases"})[:-1]
    cases = ",\n".join(" " + json.dumps(case) for case in data["cases"])
    return f'{head}, "cases": [\n{cases}\n]}}\n'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "models", nargs="+", metavar="NAME=GGUF", help=f"model name ({', '.join(MODELS)}) and its GGUF path"
    )
    args = parser.parse_args()
    texts = json.loads(CORPUS.read_text(encoding="utf-8"))
    GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
    for spec in args.models:
        name, _, path = spec.partition("=")
        if name not in MODELS or not path:
            parser.error(f"expected NAME=GGUF with NAME one of {', '.join(MODELS)}, got {spec!r}")
        out = GOLDEN_DIR / f"{name}.json"
        data = golden(Path(path), texts)
        out.write_text(dumps(data), encoding="utf-8")
        print(f"{out.relative_to(ROOT)}: {len(data['cases'])} cases, {out.stat().st_size // 1024} KiB")


if __name__ == "__main__":
    main()
