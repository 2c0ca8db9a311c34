"""Validation of calm's file formats against schemas/, with one clear message per problem."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from calm_cli.resources import SCHEMAS


class InvalidFile(ValueError):
    """A file that does not match its format; `problems` holds one line per problem."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__("\n".join(problems))


@lru_cache(maxsize=None)
def _validator(schema_name: str) -> jsonschema.protocols.Validator:
    schema = json.loads((SCHEMAS / schema_name).read_text(encoding="utf-8"))
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def _where(error: jsonschema.ValidationError) -> str:
    parts = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
    return parts.lstrip(".") or "(top level)"


def problems(data: Any, schema_name: str, source: str) -> list[str]:
    """Every way `data` breaks the schema, as 'source: path: what was expected'."""
    errors = sorted(_validator(schema_name).iter_errors(data), key=lambda e: list(map(str, e.absolute_path)))
    out = []
    for error in errors:
        # For oneOf/anyOf the best sub-error says more than "is not valid under any of the given schemas".
        best = jsonschema.exceptions.best_match([error]) if error.context else error
        out.append(f"{source}: {_where(best)}: {best.message}")
    return out


def validate(data: Any, schema_name: str, source: str) -> None:
    found = problems(data, schema_name, source)
    if found:
        raise InvalidFile(source, found)


def load_yaml(path: Path) -> Any:
    """yaml.safe_load of a file, with read and syntax errors naming the file and the line."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidFile(str(path), [f"{path}: cannot read: {exc.strerror or exc}"]) from exc
    except UnicodeDecodeError as exc:
        raise InvalidFile(str(path), [f"{path}: not UTF-8 text (byte {exc.start})"]) from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise InvalidFile(str(path), [f"{path}: {where}invalid YAML: {getattr(exc, 'problem', exc)}"]) from exc
