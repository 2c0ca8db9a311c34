"""The serving tokenizer: what an export's tokenizer.json and tokenizer_meta.json hold, read back with
``tokenizers`` and ``json`` only.

Those files are written at export time by calm_cli.fleet.gguf_tokenizer, which builds the tokenizer from
the GGUF file's own metadata (so it encodes like llama.cpp) and depends on this module, never the reverse.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

TOKENIZER_FILE = "tokenizer.json"
META_FILE = "tokenizer_meta.json"


@dataclass
class GGUFTokenizer:
    """A `tokenizers.Tokenizer` that encodes like llama.cpp, plus what serving needs around it.

    BOS/EOS live in the tokenizer's post-processor, so ``Tokenizer.from_file`` alone gives the same
    ids as :meth:`encode`; the metadata is kept for prompt building and stopping.
    """

    tokenizer: Tokenizer
    model: str
    pre: str
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    add_bos: bool
    add_eos: bool
    stop_ids: list[int]

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        """Ids as llama.cpp's tokenize(text, add_special, parse_special=True) returns them."""
        return self.tokenizer.encode(text, add_special_tokens=add_special).ids

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special)

    def meta(self) -> dict[str, Any]:
        fields = asdict(self)
        del fields["tokenizer"]
        return fields

    def save(self, directory: Path) -> None:
        """Write tokenizer.json and tokenizer_meta.json into ``directory``."""
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(directory / TOKENIZER_FILE))
        (directory / META_FILE).write_text(json.dumps(self.meta(), indent=2) + "\n", encoding="utf-8")


def load_tokenizer(directory: Path) -> GGUFTokenizer:
    """Read back what :meth:`GGUFTokenizer.save` wrote (serving path: no gguf needed)."""
    meta = json.loads((directory / META_FILE).read_text(encoding="utf-8"))
    return GGUFTokenizer(tokenizer=Tokenizer.from_file(str(directory / TOKENIZER_FILE)), **meta)
