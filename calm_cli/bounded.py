"""Bounded parsing of outside data: files, YAML documents and JSON lines that cannot exhaust calm.

Parsers blow up before any schema sees the data: json and PyYAML recurse once per nesting level
(RecursionError), int() refuses more than 4,300 digits (ValueError), YAML aliases share nodes so a small
file can stand for billions of values, and reading a FIFO or /dev/zero never ends. So every bound below is
enforced before or while parsing, and every refusal is one short line.

Bounds:
- files (policies, models.lock): regular files only, at most MAX_FILE_BYTES, UTF-8;
- request lines: at most MAX_LINE_BYTES, UTF-8;
- nesting: at most MAX_DEPTH levels of lists and mappings;
- integers: at most MAX_INT_CHARS characters as written; floats must stay finite;
- YAML: at most MAX_VALUES values once aliases are expanded, no recursive aliases, no duplicate keys.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from pathlib import Path
from typing import Any

import yaml

from calm_cli.errors import UsageError

MAX_FILE_BYTES = 1 << 20
MAX_LINE_BYTES = 64 * 1024
MAX_DEPTH = 64
MAX_INT_CHARS = 32  # int64 needs 20; int() is quadratic in the digits, so a long literal is refused unread
MAX_VALUES = 10_000
MAX_ITEMS = 1_000  # per list or mapping: jsonschema's uniqueItems is quadratic in it
MAX_PROBLEM_CHARS = 300


class Refused(UsageError):
    """Input calm will not parse; str() is one bounded line without the source's name."""


class TooLarge(Refused):
    """Input over one of the stated bounds (size, nesting, number length, values)."""


def one_line(text: str, limit: int = MAX_PROBLEM_CHARS) -> str:
    """`text` as one printable line of at most `limit` characters: line breaks, control characters and lone
    surrogates are escaped, the rest is cut with an ellipsis."""
    if not text.isprintable():
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def read_text(path: Path, max_bytes: int = MAX_FILE_BYTES) -> str:
    """The UTF-8 text of a regular file of at most `max_bytes`."""
    try:
        return _read(path, max_bytes).decode("utf-8")
    except OSError as exc:
        raise Refused(f"cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise Refused(f"not UTF-8 text (byte {exc.start})") from exc


def _read(path: Path, max_bytes: int) -> bytes:
    """Refuses what is not a regular file before opening it, then opens with O_NONBLOCK and checks again
    with fstat, so a FIFO swapped in after the stat neither blocks the open nor gets read."""
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise Refused(f"is {_kind(mode)}, not a regular file")
    with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as fh:
        mode = os.fstat(fh.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise Refused(f"is {_kind(mode)}, not a regular file")
        data = fh.read(max_bytes + 1)  # the file may have grown since the stat
    if len(data) > max_bytes:
        raise TooLarge(f"is over {max_bytes} bytes, the limit for this file")
    return data


# -- YAML -----------------------------------------------------------------------------------------------------

class _Limit(yaml.MarkedYAMLError):
    """A bound crossed while composing or constructing; carries the line and column."""


class BoundedLoader(yaml.SafeLoader):
    """yaml.SafeLoader that counts nesting depth and values (aliases counted as the values they stand for)
    while composing, so deep or alias-bomb documents stop at the bound instead of exhausting the stack or
    the memory of whatever walks the result."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0
        self._values = 0
        self._sizes: dict[int, int] = {}  # id(node) -> values under it, alias expansions included

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node:
        alias = self.check_event(yaml.AliasEvent)
        collection = self.check_event(yaml.SequenceStartEvent, yaml.MappingStartEvent)
        mark = self.peek_event().start_mark
        if collection:
            self._depth += 1
            if self._depth > MAX_DEPTH:
                raise _Limit(None, None, f"nested deeper than {MAX_DEPTH} levels", mark)
        before = self._values
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= collection
        if alias:
            size = self._sizes.get(id(node))
            if size is None:
                raise _Limit(None, None, "recursive alias (an anchor used inside itself)", mark)
            self._values += size
        else:
            self._values += 1
            self._sizes[id(node)] = self._values - before
            if isinstance(node, yaml.MappingNode):
                self._refuse_duplicate_keys(node)
        if self._values > MAX_VALUES:
            raise _Limit(None, None, f"more than {MAX_VALUES} values once aliases are expanded", mark)
        return node

    @staticmethod
    def _refuse_duplicate_keys(node: yaml.MappingNode) -> None:
        """PyYAML keeps the last of two equal keys silently; a policy that says a thing twice is refused."""
        seen: set[tuple[str, str]] = set()
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                if (key.tag, key.value) in seen:
                    raise _Limit(None, None, f"duplicate key {one_line(repr(key.value), 80)}", key.start_mark)
                seen.add((key.tag, key.value))

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        # PyYAML's scalar constructors trust the resolver's pattern, so a value it never matched (`2020-13-01`,
        # or an explicit tag: `!!int x`, `!!int ""`, `!!bool x`, `!!timestamp x`) escapes as a bare ValueError,
        # IndexError, KeyError or AttributeError; give it the node's line like every other YAML error.
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError, TypeError, KeyError, IndexError, AttributeError) as exc:
            what = f"invalid {node.tag.rsplit(':', 1)[-1]} value {one_line(repr(node.value), 60)}" \
                if isinstance(node, yaml.ScalarNode) else f"invalid value: {exc}"
            raise yaml.constructor.ConstructorError(None, None, what, node.start_mark) from exc

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        if len(node.value) > MAX_INT_CHARS:
            raise _Limit(None, None, f"an integer of {len(node.value)} characters, over {MAX_INT_CHARS}",
                         node.start_mark)
        return super().construct_yaml_int(node)


BoundedLoader.add_constructor("tag:yaml.org,2002:int", BoundedLoader.construct_yaml_int)


def load_yaml(text: str) -> Any:
    """One YAML document, within the bounds; errors name the line and column."""
    try:
        loader = BoundedLoader(text)  # its reader already refuses unprintable characters
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except _Limit as exc:
        raise TooLarge(_at(exc, str(exc.problem))) from exc
    except yaml.YAMLError as exc:
        raise Refused(_at(exc, f"invalid YAML: {getattr(exc, 'problem', None) or exc}")) from exc


def _at(exc: yaml.YAMLError, what: str) -> str:
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    return one_line(where + what)


# -- JSON -----------------------------------------------------------------------------------------------------

_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_BRACKET = re.compile(r"[\[\]{}]")


def _check_depth(text: str) -> None:
    """json's decoder recurses once per level; count the levels first, without recursion (brackets inside
    strings do not count)."""
    depth = 0
    for match in _BRACKET.finditer(_STRING.sub('""', text)):
        depth += 1 if match.group() in "[{" else -1
        if depth > MAX_DEPTH:
            raise TooLarge(f"nested deeper than {MAX_DEPTH} levels")


def _int(literal: str) -> int:
    if len(literal) > MAX_INT_CHARS:
        raise TooLarge(f"an integer of {len(literal)} characters, over {MAX_INT_CHARS}")
    return int(literal)


def _float(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):
        raise TooLarge(f"the number {one_line(literal, 40)} is beyond the range of a float")
    return value


def _constant(name: str) -> None:
    raise Refused(f"{name} is not JSON (numbers must be finite)")


def _object(pairs: list[tuple[str, Any]]) -> dict:
    """json keeps the last of two equal keys silently; a line that says a thing twice (two ids) is refused."""
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise Refused(f"key {one_line(repr(key), 80)} appears twice")
        seen.add(key)
    return dict(pairs)


def loads_json(text: str) -> Any:
    """json.loads within the bounds: nesting, integer length, finite numbers, no NaN/Infinity, unique keys."""
    _check_depth(text)
    try:
        return json.loads(text, parse_int=_int, parse_float=_float, parse_constant=_constant,
                          object_pairs_hook=_object)
    except json.JSONDecodeError as exc:
        raise Refused(one_line(str(exc))) from exc
