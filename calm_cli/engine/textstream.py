"""An answer's text as its tokens arrive, ending before any stop string; characters are never split.

Tokens are pushed one at a time rather than pulled from an iterator, so whoever steps the model (one
request's loop, or a scheduler stepping many) feeds each request its own stream.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers.decoders import DecodeStream

from calm_cli.engine.tokenizer import GGUFTokenizer


class TextStream:
    """Text that could still turn into a stop string is held back until it cannot. The pieces pushed out,
    with `finish()`'s, always join to what decoding the whole answer at once gives (an unfinished character
    included)."""

    def __init__(self, tokenizer: GGUFTokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = stop
        self.stopped = False  # a stop string appeared: the answer's text ends before it
        self._stream = DecodeStream(skip_special_tokens=True)
        self._ids: list[int] = []
        self._emitted = ""
        self._pending = ""

    def push(self, token: int) -> str:
        """The text this token lets out ('' while it may still be part of a stop string); sets `stopped` when
        a stop string appears, after which nothing more is to be pushed."""
        self._ids.append(token)
        self._pending += self._stream.step(self.tokenizer.tokenizer, token) or ""
        shown, self.stopped = self._cut(self._pending, final=False)
        self._emitted += shown
        self._pending = self._pending[len(shown):]
        return shown

    def finish(self) -> str:
        """The rest, once the tokens ended without a stop string: what was held back, any unfinished character."""
        shown, _ = self._cut(self.tokenizer.decode(self._ids, skip_special=True)[len(self._emitted):], final=True)
        return shown

    def _cut(self, text: str, final: bool) -> tuple[str, bool]:
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            return text[: min(hits)], True
        if final:
            return text, False
        keep = max((k for s in self.stop for k in range(len(s), 0, -1) if text.endswith(s[:k])), default=0)
        return text[: len(text) - keep], False
