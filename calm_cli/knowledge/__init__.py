"""The Knowledge base of calm's MAPE-K loop, behind one interface (base.Knowledge) with its backends beside it.

`open_knowledge` is how everything gets one: the PostgreSQL database at CALM_KB_URL when it is set, else the
SQLite file in the data directory, unless told otherwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from calm_cli import settings
from calm_cli.knowledge import sqlite
from calm_cli.knowledge.base import CalibrationSet, Knowledge, KnowledgeError
from calm_cli.knowledge.sqlite import SQLiteKnowledge, default_path

__all__ = ["CalibrationSet", "Knowledge", "KnowledgeError", "default_path", "open_knowledge", "start_over"]


def open_knowledge(path: Path | None = None, *, on_degraded: Callable[[str], None] | None = None) -> Knowledge:
    """The knowledge base at `path` (a SQLite file); without one, the PostgreSQL database at CALM_KB_URL when it
    is set, else the data directory's file. With `on_degraded`, a store that cannot serve never raises: the
    process goes on learning in memory and `on_degraded` hears why, once."""
    url = "" if path is not None else str(settings.get("kb_url"))
    if url:
        from calm_cli.knowledge.postgres import PostgresKnowledge  # psycopg is imported only where it is used

        return PostgresKnowledge(url, on_degraded=on_degraded)
    return SQLiteKnowledge(path, on_degraded=on_degraded)


def start_over() -> str:
    """Empty the knowledge base `open_knowledge()` opens (`calm kb reset`), or make a fresh one where it cannot
    serve; returns what was done, in one line."""
    url = str(settings.get("kb_url"))
    if url:
        from calm_cli.knowledge import postgres

        problem = postgres.start_over(url)
        done = f"dropped calm's tables at {postgres.masked(url)} and made them afresh"
        return done if problem is None else f"{problem}: {done}"
    outcome = sqlite.start_over()
    if outcome is None:
        return "reset"
    backup, problem = outcome
    return f"{problem}: kept the file as {backup}; started a fresh knowledge base"
