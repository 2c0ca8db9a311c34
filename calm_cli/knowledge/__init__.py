"""The Knowledge base of calm's MAPE-K loop, behind one interface (base.Knowledge) with its backends beside it.

`open_knowledge` is how everything gets one: the SQLite file in the data directory unless told otherwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from calm_cli.knowledge.base import CalibrationSet, Knowledge, KnowledgeError
from calm_cli.knowledge.sqlite import SQLiteKnowledge, default_path, start_over

__all__ = ["CalibrationSet", "Knowledge", "KnowledgeError", "default_path", "open_knowledge", "start_over"]


def open_knowledge(path: Path | None = None, *, on_degraded: Callable[[str], None] | None = None) -> Knowledge:
    """The knowledge base at `path` (default: the data directory's file). With `on_degraded`, a store that
    cannot serve never raises: the process goes on learning in memory and `on_degraded` hears why, once."""
    return SQLiteKnowledge(path, on_degraded=on_degraded)
