"""Validation of calm's file formats against schemas/, with one clear message per problem.

Outside data is parsed by calm_cli.bounded and checked here in two steps: `value_problems` first (what
JSON Schema cannot say: numbers must be finite and fit 64 bits, strings must be Unicode text without NUL,
keys must be strings, sizes stay within bounded's limits), then the schema, only on data that passed.
Every problem is one line, 'source: path: what is wrong', at most bounded.MAX_PROBLEM_CHARS long.
"""

from __future__ import annotations

import json
import math
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

import jsonschema

from calm_cli import bounded
from calm_cli.errors import UsageError
from calm_cli.resources import SCHEMAS

MAX_PROBLEMS = 20  # per file or line: more are counted, not listed
INT64 = 2**63 - 1
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_SURROGATE = re.compile("[\ud800-\udfff]")


class InvalidFile(UsageError):
    """A file that does not match its format; `problems` holds one line per problem (MAX_PROBLEMS at most,
    then one line counting the rest)."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = _capped(source, problems)
        super().__init__("\n".join(self.problems))


@lru_cache(maxsize=None)
def _validator(schema_name: str) -> jsonschema.protocols.Validator:
    schema = json.loads((SCHEMAS / schema_name).read_text(encoding="utf-8"))
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    # JSON Schema counts 5.0 as an integer; calm passes integers on to range(), numpy seeds and sqlite, so an
    # integer field takes a Python int only.
    strict = jsonschema.validators.extend(cls, type_checker=cls.TYPE_CHECKER.redefine(
        "integer", lambda checker, instance: isinstance(instance, int) and not isinstance(instance, bool)))
    return strict(schema, format_checker=cls.FORMAT_CHECKER)


def _where(path: Any) -> str:
    """A path inside the data as 'fleet[1].max_tokens'; an odd key is quoted, so the line stays one line."""
    parts = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" if _NAME.fullmatch(str(p))
                    else f"[{bounded.one_line(repr(p), 40)}]" for p in path)
    return parts.lstrip(".") or "(top level)"


def _line(source: str, path: Any, what: str) -> str:
    return bounded.one_line(f"{source}: {_where(path)}: {what}")


def _capped(source: str, found: list[str]) -> list[str]:
    if len(found) <= MAX_PROBLEMS:
        return found
    return found[:MAX_PROBLEMS] + [bounded.one_line(f"{source}: and {len(found) - MAX_PROBLEMS} more problem(s)")]


def value_problems(data: Any, source: str) -> list[str]:
    """What JSON Schema cannot check, for every format: jsonschema takes NaN for a number within any bounds,
    and a deep, cyclic or alias-expanded structure would exhaust it. Walks in document order without
    recursion, and stops at bounded.MAX_VALUES values, so it finds at most that many problems."""
    found: list[str] = []
    stack: list[tuple[Any, tuple, int]] = [(data, (), 0)]
    seen = 0
    while stack:
        value, path, depth = stack.pop()
        seen += 1
        if seen > bounded.MAX_VALUES:
            found.append(_line(source, (), f"more than {bounded.MAX_VALUES} values"))
            break
        if isinstance(value, float) and not math.isfinite(value):
            found.append(_line(source, path, "NaN/inf is not allowed"))
        elif isinstance(value, int) and not isinstance(value, bool) and not -INT64 - 1 <= value <= INT64:
            found.append(_line(source, path, "an integer outside the 64-bit range is not allowed"))
        elif isinstance(value, str):
            if "\0" in value:
                found.append(_line(source, path, "a NUL character is not allowed"))
            elif _SURROGATE.search(value):
                found.append(_line(source, path, "a lone surrogate (\\ud800-\\udfff) is not Unicode text"))
        elif isinstance(value, (dict, list, tuple, set, frozenset)):
            if depth >= bounded.MAX_DEPTH:
                found.append(_line(source, path, f"nested deeper than {bounded.MAX_DEPTH} levels"))
            elif len(value) > bounded.MAX_ITEMS:
                found.append(_line(source, path, f"{len(value)} items, over {bounded.MAX_ITEMS}"))
            elif isinstance(value, dict):
                for key, item in reversed(value.items()):
                    if isinstance(key, str):  # a key is a string like any other: no NUL, no lone surrogate
                        stack += [(item, path + (key,), depth + 1), (key, path + (key,), depth + 1)]
                    else:
                        found.append(_line(source, path, f"the key {bounded.one_line(repr(key), 60)} is not a string"))
            else:
                stack += [(item, path + (i,), depth + 1) for i, item in reversed(list(enumerate(value)))]
    return found


def _message(error: jsonschema.ValidationError) -> str:
    """jsonschema quotes the whole offending value; quote at most a short start of it."""
    quoted = repr(error.instance)
    if len(quoted) > 80 and quoted in error.message:
        return error.message.replace(quoted, bounded.one_line(quoted, 60), 1)
    return error.message


def problems(data: Any, schema_name: str, source: str) -> list[str]:
    """Every way `data` breaks the schema, as 'source: path: what was expected' (value_problems' only, when
    there are any)."""
    found = value_problems(data, source)
    if found:
        return found
    errors = sorted(_validator(schema_name).iter_errors(data), key=lambda e: list(map(str, e.absolute_path)))
    out = []
    for error in errors:
        # For oneOf/anyOf the best sub-error says more than "is not valid under any of the given schemas".
        best = jsonschema.exceptions.best_match([error]) if error.context else error
        out.append(_line(source, best.absolute_path, _message(best)))
    return out


def validate(data: Any, schema_name: str, source: str) -> None:
    found = problems(data, schema_name, source)
    if found:
        raise InvalidFile(source, found)


def read_yaml(path: Path) -> tuple[str, Any]:
    """A YAML file's text and data, read and parsed within calm_cli.bounded's limits; a file that cannot be
    read (not a regular file, too large, not UTF-8) or parsed raises InvalidFile naming it (and the line)."""
    source = bounded.one_line(str(path), 200)
    try:
        text = bounded.read_text(path)
        return text, bounded.load_yaml(text)
    except bounded.Refused as exc:
        raise InvalidFile(source, [bounded.one_line(f"{source}: {exc}")]) from exc


def load_yaml(path: Path) -> Any:
    """The data of a YAML file (see read_yaml)."""
    return read_yaml(path)[1]


# -- request lines ----------------------------------------------------------------------------------------------

MAX_MESSAGE_CHARS = 1000  # an error record's message


class RequestLine(NamedTuple):
    """One input line, parsed. Either `request` is a valid request (its id set, the line number when it had
    none) and `code` and `message` are None, or `request` is None and `code` (a monitor.ERROR_CODES entry)
    and `message` say why. `id` is what the line's record carries either way: the line's own id when it is
    a valid id, else the 1-based line number."""

    request: dict | None
    code: str | None
    message: str | None
    id: str | int


@lru_cache(maxsize=None)
def _id_validator() -> jsonschema.protocols.Validator:
    return _validator("request.schema.json").evolve(schema=_validator("request.schema.json").schema["$defs"]["id"])


def _valid_id(value: Any) -> bool:
    """Whether a line's id may be echoed in its record (an error record included)."""
    return not value_problems(value, "id") and _id_validator().is_valid(value)


def parse_request(raw: bytes, line_no: int, size: int | None = None) -> RequestLine:
    """Parse one request line (without its newline) within the bounds; never raises.

    `size` is the line's true length when `raw` holds only its first bytes. Codes: too_large (over
    bounded.MAX_LINE_BYTES, nested deeper than bounded.MAX_DEPTH, an integer over bounded.MAX_INT_CHARS
    characters, a number beyond the float range), bad_utf8, bad_json (not JSON, NaN/Infinity, a key twice),
    bad_request (not a request per schemas/request.schema.json; a NUL or a lone surrogate in a string)."""
    size = len(raw) if size is None else size
    if size > bounded.MAX_LINE_BYTES:
        return RequestLine(None, "too_large", f"line {line_no} has {size} bytes, over {bounded.MAX_LINE_BYTES}",
                           line_no)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return RequestLine(None, "bad_utf8", f"line {line_no} is not valid UTF-8 (byte {exc.start})", line_no)
    try:
        data = bounded.loads_json(text)
    except bounded.Refused as exc:
        code = "too_large" if isinstance(exc, bounded.TooLarge) else "bad_json"
        return RequestLine(None, code, f"line {line_no}: {exc}", line_no)
    line_id = data["id"] if isinstance(data, dict) and "id" in data and _valid_id(data["id"]) else line_no
    found = _capped(f"line {line_no}", problems(data, "request.schema.json", f"line {line_no}"))
    if found:
        return RequestLine(None, "bad_request", bounded.one_line("; ".join(found), MAX_MESSAGE_CHARS), line_id)
    data.setdefault("id", line_id)
    return RequestLine(data, None, None, line_id)
