"""The Knowledge base's interface: what calm observed (Monitor), measured (`calm profile`) and learned
(calibration), whatever stores it.

Backends sit side by side behind `Knowledge` (SQLite, the embedded default, in sqlite.py; PostgreSQL, shared by
several routers, in postgres.py): the loop, the fronts, `calm profile`, `calm bench` and `calm kb` only ever use
these methods. Rows are plain dicts with the fields below; a backend refuses unknown or missing keys rather than
storing a silent NULL. What every backend shares (the guard that turns a store's failures into one-line
KnowledgeErrors, and degraded mode) is here too.
"""

from __future__ import annotations

import functools
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, TextIO, TypeVar

import numpy as np

from calm_cli.errors import CalmError

OBSERVATION_REQUIRED = ("ts", "request_id", "policy", "model", "latency_ms", "ttft_ms", "queue_ms", "load_ms",
                        "tokens_in", "tokens_out", "tokens_per_s", "energy_j", "energy_estimated", "memory_mb",
                        "cache_hit", "provider")
OBSERVATION_DEFAULTS: dict[str, Any] = {"domain": None, "confidence": None, "escalated_from": None,
                                        "error_code": None, "injected_slowdown": 1.0, "draft_tokens": None,
                                        "accepted_tokens": None}
OBSERVATION_FIELDS = OBSERVATION_REQUIRED + tuple(OBSERVATION_DEFAULTS)
PROFILE_METRICS = ("load_ms", "ttft_ms", "tokens_per_s", "joules_per_token", "memory_mb", "energy_estimated",
                   "confidence", "n_samples", "updated_at")
CALIBRATION_REQUIRED = ("model", "task", "item_id", "score", "embedding")
CALIBRATION_DEFAULTS: dict[str, Any] = {"domain": None, "latency_ms": None, "energy_j": None, "tokens_out": None,
                                        "confidence": None, "ts": None}
EMBEDDING = np.dtype("<f4")  # fixed byte order so stored embeddings move between machines
BOOLEANS = {"observations": ("energy_estimated", "cache_hit"), "profiles": ("energy_estimated",)}  # flag columns


def reset_remedy(where: Path | str) -> str:
    """The way out of an unusable store, said the same way by every message."""
    name = where.name if isinstance(where, Path) else str(where)
    return (f"run `calm kb reset --yes` (it keeps the file as {name}.damaged-<time> beside it and starts a "
            "fresh one)")


class KnowledgeError(CalmError):
    """The knowledge base cannot be used; the message is one line: where it is, what is wrong, what to do.

    `resettable` says whether `calm kb reset` is the remedy (it sets an unusable store aside and starts a fresh
    one); it is not for a lock, a full disk or permissions, which a fresh store would not escape.
    """

    def __init__(self, path: Path | str, problem: str, remedy: str | None = None, resettable: bool = True):
        self.path, self.problem, self.resettable = path, problem, resettable
        self.remedy = remedy or reset_remedy(path)
        super().__init__(f"{path}: {problem}; {self.remedy}")


@dataclass(frozen=True)
class CalibrationSet:
    """Calibration as matrices for the router: one embedding per item, one score vector per model."""

    embeddings: np.ndarray  # float32 [n_items, dim]
    items: list[tuple[str, str, str | None]]  # (task, item_id, domain), the row order of embeddings
    scores: dict[str, np.ndarray]  # model -> float64 [n_items], NaN where the model was not scored
    confidence: dict[str, np.ndarray]  # model -> float64 [n_items], the answer's confidence; NaN where unknown


def calibration_set(rows: Iterable[dict], models: list[str] | None) -> tuple[CalibrationSet, list[int]]:
    """The item x model matrices from calibration rows sorted by (task, item_id, ts); an item's embedding and
    domain come from its newest row. Also the distinct embedding sizes found (more than one is an error the
    caller names)."""
    index: dict[tuple[str, str], int] = {}
    items: list = []
    vectors: list = []
    scored: list[tuple[str, int, float, float | None]] = []
    for row in rows:
        key = (row["task"], row["item_id"])
        i = index.setdefault(key, len(items))
        if i == len(items):
            items.append(None)
            vectors.append(None)
        items[i], vectors[i] = (*key, row["domain"]), row["embedding"]  # oldest first: the newest wins
        scored.append((row["model"], i, row["score"], row["confidence"]))
    dims = sorted({v.size for v in vectors})
    embeddings = np.stack(vectors) if vectors and len(dims) == 1 else np.zeros((0, 0), dtype=EMBEDDING)
    names = list(models) if models is not None else sorted({m for m, *_ in scored})
    scores = {m: np.full(len(items), np.nan) for m in names}
    confidence = {m: np.full(len(items), np.nan) for m in names}
    for model, i, score, conf in scored:
        scores[model][i] = score
        confidence[model][i] = np.nan if conf is None else conf
    return CalibrationSet(embeddings=embeddings.astype(np.float32, copy=False), items=items, scores=scores,
                          confidence=confidence), dims


def check_keys(kind: str, row: dict, required: Iterable[str], optional: Iterable[str]) -> None:
    """Unknown or missing keys raise ValueError naming them all, so a typo never becomes a silent NULL."""
    unknown = sorted(set(row) - set(required) - set(optional))
    missing = sorted(set(required) - set(row))
    problems = ([f"unknown key(s) {', '.join(unknown)}"] if unknown else []) + \
               ([f"missing key(s) {', '.join(missing)}"] if missing else [])
    if problems:
        raise ValueError(f"{kind}: {'; '.join(problems)}")


def plain(row: dict) -> dict:
    """numpy scalars as Python numbers, which database drivers can bind."""
    return {k: v.item() if isinstance(v, np.generic) else v for k, v in row.items()}


def observation_rows(observations: list[dict]) -> list[dict]:
    """Observations checked (all of them, before any is stored) and completed with their defaults."""
    for obs in observations:
        check_keys("observation", obs, OBSERVATION_REQUIRED, OBSERVATION_DEFAULTS)
    return [{**OBSERVATION_DEFAULTS, **plain(obs)} for obs in observations]


CALIBRATION_COLUMNS = (*CALIBRATION_REQUIRED, *CALIBRATION_DEFAULTS, "dim")


def calibration_rows(rows: list[dict], now: float) -> list[dict]:
    """Calibration rows checked and completed as stored (CALIBRATION_COLUMNS): the embedding as little-endian
    float32 bytes with its size, the item id as text, `now` where no time is given."""
    clean = []
    for row in rows:
        check_keys("calibration row", row, CALIBRATION_REQUIRED, CALIBRATION_DEFAULTS)
        r = {**CALIBRATION_DEFAULTS, **plain(row)}
        embedding = np.asarray(r["embedding"], dtype=EMBEDDING)
        if embedding.ndim != 1 or embedding.size == 0:
            raise ValueError(f"calibration row {r['model']}/{r['task']}/{r['item_id']}: embedding must be "
                             f"a non-empty vector, got shape {embedding.shape}")
        clean.append({**r, "item_id": str(r["item_id"]), "embedding": embedding.tobytes(),
                      "dim": embedding.size, "ts": now if r["ts"] is None else r["ts"]})
    return clean


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


_T = TypeVar("_T")


def guarded(retry: bool = True) -> Callable[[Callable[..., _T]], Callable[..., _T]]:
    """A backend's method made safe to call: one call at a time per handle (`_lock`); every failure of the store
    becomes a one-line KnowledgeError (the backend's `_failure`), while the caller's own errors (a constraint
    violated, misuse) pass as they are, since a fresh store would fail them the same way. In degraded mode
    (`on_degraded`) the first failure switches the handle to an in-memory store for good and, with `retry`, the
    call runs again there."""

    def decorate(method: Callable[..., _T]) -> Callable[..., _T]:
        @functools.wraps(method)
        def call(self: Knowledge, *args: Any, **kwargs: Any) -> _T:
            with self._lock:
                if self._memory is not None:
                    return getattr(self._memory, method.__name__)(*args, **kwargs)
                try:
                    return method(self, *args, **kwargs)
                except KnowledgeError as exc:
                    error = exc
                except Exception as exc:
                    found = self._failure(exc)
                    if found is None:
                        raise
                    error = found
                    error.__cause__ = exc
                if self._on_degraded is None:
                    raise error
                self._disconnect()
                self._degrade(error)
                if not retry:
                    raise error
                return getattr(self._memory, method.__name__)(*args, **kwargs)

        return call

    return decorate


class Knowledge(ABC):
    """One process's handle on the knowledge base. `degraded` is None, or why this process learns in memory only
    (the serving commands go on answering when the store fails; see the backend)."""

    degraded: str | None = None
    _lock: threading.RLock  # held through each guarded call
    _on_degraded: Callable[[str], None] | None = None
    _memory: Knowledge | None = None  # the in-memory store a degraded handle passes every call to

    def _failure(self, exc: Exception) -> KnowledgeError | None:
        """What a driver's exception means for calm's user; None for the caller's own error, which passes."""
        return None

    def _degrade(self, error: KnowledgeError) -> None:
        """Go on in memory for the rest of the process: same schema, nothing kept; `on_degraded` hears why, once.
        The store is SQLite's in-memory one whatever the backend: it needs no file and no server."""
        from calm_cli.knowledge.sqlite import MEMORY, SQLiteKnowledge  # here: sqlite.py imports this module

        assert self._on_degraded is not None
        self.degraded = str(error)
        self._memory = SQLiteKnowledge(MEMORY)
        self._on_degraded(f"calm: degraded mode, answering without keeping what is learned: {error}")

    @abstractmethod
    def _disconnect(self) -> None:
        """Let go of the store's connection (it may have failed: errors closing it are swallowed)."""

    def close(self) -> None:
        if self._memory is not None:  # the store's own connection went when the handle degraded
            self._memory.close()
        else:
            self._disconnect()

    # -- observations (Monitor) --------------------------------------------------------------------------

    def record(self, obs: dict) -> None:
        """Store one model run of one request."""
        self.record_many([obs])

    @abstractmethod
    def record_many(self, observations: list[dict]) -> None:
        """Store many runs at once; nothing is stored if any of them is invalid."""

    @abstractmethod
    def recent(self, model: str, window: int = 200, since_ts: float | None = None) -> list[dict]:
        """The latest `window` observations of `model` (at or after `since_ts`), newest first, errors included."""

    # -- profiles and calibration (what `calm profile` learned) ------------------------------------------

    @abstractmethod
    def upsert_profile(self, model: str, precision: str, provider: str, **metrics: Any) -> None:
        """Create or update the profile of (model, precision, provider); metrics not given keep their value."""

    @abstractmethod
    def profile(self, model: str, precision: str | None = None, provider: str | None = None) -> dict | None:
        """The most recently updated profile of `model` matching the precision and provider given."""

    @abstractmethod
    def profiles(self) -> list[dict]:
        ...

    @abstractmethod
    def add_calibration(self, rows: list[dict]) -> None:
        """Store calibration results at once; a row for an existing (model, task, item_id) replaces it."""

    @abstractmethod
    def calibration(self, models: list[str] | None = None) -> CalibrationSet:
        """Calibration of `models` (all when None) as an item x model matrix, items sorted by (task, item_id)."""

    @abstractmethod
    def domain_quality(self) -> dict[tuple[str, str | None], tuple[float, int]]:
        """(model, domain) -> (mean calibration score, number of items)."""

    @abstractmethod
    def learned_version(self) -> int:
        """A number that changes whenever profiles or calibration change (here or in another process), so a
        long-running loop reloads what it learned only when there is something new."""

    # -- maintenance (`calm kb ...`) ---------------------------------------------------------------------

    @abstractmethod
    def stats(self) -> dict:
        """Counts and per-model summaries (the store's integrity checked on the way)."""

    @abstractmethod
    def export(self, fh: TextIO) -> int:
        """Every row of every table as JSON Lines (a "table" field names it); returns the rows written."""

    @abstractmethod
    def reset(self) -> None:
        """Delete every row of every table; the schema stays."""

    def __enter__(self) -> Knowledge:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
