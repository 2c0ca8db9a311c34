"""The Knowledge base of calm's MAPE-K loop: what calm observed, measured and learned, in one SQLite file.

Several calm processes may share the file at once (a `calm serve` beside a `calm bench` and a `calm kb stats`):
each opens its own connection, the file is in WAL mode so readers never wait for writers, every write is a
short BEGIN IMMEDIATE transaction (so two writers never deadlock upgrading a read lock), and waiting for a
lock is left to SQLite's busy timeout.
"""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, TextIO

import numpy as np

from calm_cli import settings

FILENAME = "knowledge.sqlite"
BUSY_TIMEOUT_S = 10.0  # a writer holds the lock for milliseconds; this only bounds a pathological wait

# Ordered schema steps: MIGRATIONS[i] takes a file from user_version i to i + 1. Only ever append.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (  # 1: what the Monitor records per request, and what `calm profile` measures per model
        """CREATE TABLE observations (
            id INTEGER PRIMARY KEY,
            ts REAL NOT NULL,
            request_id TEXT NOT NULL,
            policy TEXT NOT NULL,
            model TEXT NOT NULL,
            domain TEXT,
            latency_ms REAL NOT NULL CHECK (latency_ms >= 0),
            ttft_ms REAL,
            queue_ms REAL NOT NULL,
            load_ms REAL NOT NULL,
            tokens_in INTEGER NOT NULL,
            tokens_out INTEGER NOT NULL,
            tokens_per_s REAL,
            energy_j REAL,
            energy_estimated INTEGER NOT NULL CHECK (energy_estimated IN (0, 1)),
            memory_mb REAL,
            confidence REAL,
            cache_hit INTEGER NOT NULL CHECK (cache_hit IN (0, 1)),
            provider TEXT NOT NULL,
            escalated_from TEXT,
            error_code TEXT,
            injected_slowdown REAL NOT NULL DEFAULT 1.0 CHECK (injected_slowdown > 0)
        )""",
        "CREATE INDEX observations_model_ts ON observations (model, ts)",
        """CREATE TABLE profiles (
            model TEXT NOT NULL,
            precision TEXT NOT NULL,
            provider TEXT NOT NULL,
            load_ms REAL,
            ttft_ms REAL,
            tokens_per_s REAL,
            joules_per_token REAL,
            memory_mb REAL,
            energy_estimated INTEGER CHECK (energy_estimated IN (0, 1)),
            n_samples INTEGER,
            updated_at REAL NOT NULL,
            PRIMARY KEY (model, precision, provider)
        )""",
    ),
    (  # 2: per-item answer quality from calibration runs, with the query embedding the router learns from
        """CREATE TABLE calibration (
            model TEXT NOT NULL,
            task TEXT NOT NULL,
            item_id TEXT NOT NULL,
            domain TEXT,
            score REAL NOT NULL CHECK (score BETWEEN 0 AND 1),
            latency_ms REAL,
            energy_j REAL,
            tokens_out INTEGER,
            embedding BLOB NOT NULL,
            dim INTEGER NOT NULL CHECK (dim > 0 AND length(embedding) = 4 * dim),
            ts REAL NOT NULL,
            PRIMARY KEY (model, task, item_id)
        )""",
    ),
    (  # 3: the profile's mean answer confidence, so Analyze can see a model grow unsure (drift)
        "ALTER TABLE profiles ADD COLUMN confidence REAL",
    ),
    (  # 4: each calibration answer's confidence, so escalation can learn what a confidence means per model
        "ALTER TABLE calibration ADD COLUMN confidence REAL CHECK (confidence BETWEEN 0 AND 1)",
    ),
)
TABLES = ("observations", "profiles", "calibration")

OBSERVATION_REQUIRED = ("ts", "request_id", "policy", "model", "latency_ms", "ttft_ms", "queue_ms", "load_ms",
                        "tokens_in", "tokens_out", "tokens_per_s", "energy_j", "energy_estimated", "memory_mb",
                        "cache_hit", "provider")
OBSERVATION_DEFAULTS: dict[str, Any] = {"domain": None, "confidence": None, "escalated_from": None,
                                        "error_code": None, "injected_slowdown": 1.0}
OBSERVATION_FIELDS = OBSERVATION_REQUIRED + tuple(OBSERVATION_DEFAULTS)
PROFILE_METRICS = ("load_ms", "ttft_ms", "tokens_per_s", "joules_per_token", "memory_mb", "energy_estimated",
                   "confidence", "n_samples", "updated_at")
CALIBRATION_REQUIRED = ("model", "task", "item_id", "score", "embedding")
CALIBRATION_DEFAULTS: dict[str, Any] = {"domain": None, "latency_ms": None, "energy_j": None, "tokens_out": None,
                                        "confidence": None, "ts": None}
_BOOLEANS = {"observations": ("energy_estimated", "cache_hit"), "profiles": ("energy_estimated",)}
_EMBEDDING = np.dtype("<f4")  # fixed byte order so a file moves between machines


class KnowledgeError(RuntimeError):
    """The file cannot serve as calm's knowledge base (not SQLite, someone else's, or from a newer calm)."""


@dataclass(frozen=True)
class CalibrationSet:
    """Calibration as matrices for the router: one embedding per item, one score vector per model."""

    embeddings: np.ndarray  # float32 [n_items, dim]
    items: list[tuple[str, str, str | None]]  # (task, item_id, domain), the row order of embeddings
    scores: dict[str, np.ndarray]  # model -> float64 [n_items], NaN where the model was not scored
    confidence: dict[str, np.ndarray]  # model -> float64 [n_items], the answer's confidence; NaN where unknown


def default_path() -> Path:
    """Where calm keeps its knowledge base: the data_dir setting."""
    return settings.path("data_dir") / FILENAME


def _check_keys(kind: str, row: dict, required: Iterable[str], optional: Iterable[str]) -> None:
    """Unknown or missing keys raise ValueError naming them all, so a typo never becomes a silent NULL."""
    unknown = sorted(set(row) - set(required) - set(optional))
    missing = sorted(set(required) - set(row))
    problems = ([f"unknown key(s) {', '.join(unknown)}"] if unknown else []) + \
               ([f"missing key(s) {', '.join(missing)}"] if missing else [])
    if problems:
        raise ValueError(f"{kind}: {'; '.join(problems)}")


def _plain(row: dict) -> dict:
    """numpy scalars as Python numbers, which sqlite3 can bind."""
    return {k: v.item() if isinstance(v, np.generic) else v for k, v in row.items()}


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


class KnowledgeBase:
    """One process's connection to the knowledge base file; opening it creates or migrates the schema."""

    def __init__(self, path: Path | None = None):
        self.path = Path(path) if path is not None else default_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        self._conn.row_factory = sqlite3.Row
        try:
            self._conn.execute("PRAGMA journal_mode = WAL")
            self._conn.execute("PRAGMA synchronous = NORMAL")  # WAL + NORMAL: durable but for a power cut
            self._conn.execute("PRAGMA foreign_keys = ON")
            self._migrate()
        except sqlite3.DatabaseError as exc:
            self._conn.close()
            if getattr(exc, "sqlite_errorname", "") == "SQLITE_NOTADB":
                raise KnowledgeError(f"{self.path} is not an SQLite database, so not a calm knowledge base; "
                                     "move it away or set CALM_DATA_DIR elsewhere") from exc
            raise
        except BaseException:
            self._conn.close()
            raise

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> KnowledgeBase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transactions and schema --------------------------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction that takes the lock up front, so it waits (busy timeout) rather than fails."""
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    @contextmanager
    def _snapshot(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: several queries see one state of the file while writers go on."""
        self._conn.execute("BEGIN")
        try:
            yield self._conn
        finally:
            self._conn.execute("COMMIT")

    def _version(self) -> int:
        return self._conn.execute("PRAGMA user_version").fetchone()[0]

    def _refuse_newer(self, version: int) -> None:
        if version > len(MIGRATIONS):
            raise KnowledgeError(f"{self.path} has knowledge base schema version {version}, but this calm knows "
                                 f"only up to version {len(MIGRATIONS)}: it was written by a newer calm; "
                                 "upgrade calm or set CALM_DATA_DIR elsewhere")

    def _migrate(self) -> None:
        """Apply the missing MIGRATIONS steps, all in one transaction, so a file is never half-migrated."""
        version = self._version()
        self._refuse_newer(version)
        if version == len(MIGRATIONS):
            return
        with self._write() as conn:
            version = self._version()  # another process may have migrated while we waited for the lock
            self._refuse_newer(version)
            if version == 0 and conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
                raise KnowledgeError(f"{self.path} is an SQLite database but not a calm knowledge base "
                                     "(it has tables but no calm schema version); move it away")
            for step in MIGRATIONS[version:]:
                for statement in step:
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {len(MIGRATIONS)}")

    def _rows(self, table: str, cursor: sqlite3.Cursor) -> list[dict]:
        """Rows as plain dicts: flags as bools and embeddings as numpy arrays."""
        out = []
        for row in cursor:
            d = dict(row)
            for name in _BOOLEANS.get(table, ()):
                if d.get(name) is not None:
                    d[name] = bool(d[name])
            if "embedding" in d:
                d["embedding"] = np.frombuffer(d["embedding"], dtype=_EMBEDDING)
            out.append(d)
        return out

    # -- observations (Monitor) ---------------------------------------------------------------------------

    def record(self, obs: dict) -> None:
        """Store one served request."""
        self.record_many([obs])

    def record_many(self, observations: list[dict]) -> None:
        """Store many served requests in one transaction; nothing is stored if any of them is invalid."""
        for obs in observations:
            _check_keys("observation", obs, OBSERVATION_REQUIRED, OBSERVATION_DEFAULTS)
        rows = [{**OBSERVATION_DEFAULTS, **_plain(obs)} for obs in observations]
        sql = (f"INSERT INTO observations ({', '.join(OBSERVATION_FIELDS)}) "
               f"VALUES ({', '.join(':' + f for f in OBSERVATION_FIELDS)})")
        with self._write() as conn:
            conn.executemany(sql, rows)

    def recent(self, model: str, window: int = 200, since_ts: float | None = None) -> list[dict]:
        """The latest `window` observations of `model` (at or after `since_ts`), newest first, errors included."""
        sql = f"SELECT {', '.join(OBSERVATION_FIELDS)} FROM observations WHERE model = ?"
        args: list[Any] = [model]
        if since_ts is not None:
            sql += " AND ts >= ?"
            args.append(since_ts)
        sql += " ORDER BY ts DESC, id DESC LIMIT ?"
        return self._rows("observations", self._conn.execute(sql, [*args, window]))

    # -- profiles (`calm profile`) ------------------------------------------------------------------------

    def upsert_profile(self, model: str, precision: str, provider: str, **metrics: Any) -> None:
        """Create or update the profile of (model, precision, provider); metrics not given keep their value."""
        _check_keys("profile", metrics, (), PROFILE_METRICS)
        row = {"updated_at": time.time(), **_plain(metrics)}
        cols = list(row)
        with self._write() as conn:
            conn.execute(f"INSERT INTO profiles (model, precision, provider, {', '.join(cols)}) "
                         f"VALUES (?, ?, ?, {', '.join('?' for _ in cols)}) "
                         f"ON CONFLICT (model, precision, provider) DO UPDATE SET "
                         f"{', '.join(f'{c} = excluded.{c}' for c in cols)}",
                         [model, precision, provider, *row.values()])

    def profile(self, model: str, precision: str | None = None, provider: str | None = None) -> dict | None:
        """The most recently updated profile of `model` matching the precision and provider given."""
        sql, args = "SELECT * FROM profiles WHERE model = ?", [model]
        for column, value in (("precision", precision), ("provider", provider)):
            if value is not None:
                sql += f" AND {column} = ?"
                args.append(value)
        rows = self._rows("profiles", self._conn.execute(sql + " ORDER BY updated_at DESC LIMIT 1", args))
        return rows[0] if rows else None

    def profiles(self) -> list[dict]:
        return self._rows("profiles", self._conn.execute("SELECT * FROM profiles ORDER BY model, precision, provider"))

    # -- calibration (quality per item, per model) --------------------------------------------------------

    def add_calibration(self, rows: list[dict]) -> None:
        """Store calibration results in one transaction; a row for an existing (model, task, item_id) replaces it."""
        now = time.time()
        clean = []
        for row in rows:
            _check_keys("calibration row", row, CALIBRATION_REQUIRED, CALIBRATION_DEFAULTS)
            r = {**CALIBRATION_DEFAULTS, **_plain(row)}
            embedding = np.asarray(r["embedding"], dtype=_EMBEDDING)
            if embedding.ndim != 1 or embedding.size == 0:
                raise ValueError(f"calibration row {r['model']}/{r['task']}/{r['item_id']}: embedding must be "
                                 f"a non-empty vector, got shape {embedding.shape}")
            clean.append({**r, "item_id": str(r["item_id"]), "embedding": embedding.tobytes(),
                          "dim": embedding.size, "ts": now if r["ts"] is None else r["ts"]})
        cols = (*CALIBRATION_REQUIRED, *CALIBRATION_DEFAULTS, "dim")
        keys = ("model", "task", "item_id")
        sql = (f"INSERT INTO calibration ({', '.join(cols)}) VALUES ({', '.join(':' + c for c in cols)}) "
               f"ON CONFLICT ({', '.join(keys)}) DO UPDATE SET "
               f"{', '.join(f'{c} = excluded.{c}' for c in cols if c not in keys)}")
        with self._write() as conn:
            conn.executemany(sql, clean)

    def calibration(self, models: list[str] | None = None) -> CalibrationSet:
        """Calibration of `models` (all when None) as an item x model matrix; items are sorted by (task, item_id).

        An item's embedding and domain are taken from its newest row; a model asked for without rows gets NaN.
        """
        sql, args = "SELECT model, task, item_id, domain, score, confidence, embedding FROM calibration", []
        if models is not None:
            sql += f" WHERE model IN ({', '.join('?' for _ in models)})"
            args = list(models)
        index: dict[tuple[str, str], int] = {}
        items: list = []
        vectors: list = []
        scored: list[tuple[str, int, float]] = []
        for row in self._rows("calibration", self._conn.execute(sql + " ORDER BY task, item_id, ts", args)):
            key = (row["task"], row["item_id"])
            i = index.setdefault(key, len(items))
            if i == len(items):
                items.append(None)
                vectors.append(None)
            items[i], vectors[i] = (*key, row["domain"]), row["embedding"]  # rows come oldest first: newest wins
            scored.append((row["model"], i, row["score"], row["confidence"]))
        dims = sorted({v.size for v in vectors})
        if len(dims) > 1:
            raise ValueError(f"{self.path}: calibration embeddings have different dimensions {dims}; "
                             "re-run calibration with one encoder")
        embeddings = np.stack(vectors) if vectors else np.zeros((0, 0), dtype=_EMBEDDING)
        names = list(models) if models is not None else sorted({m for m, *_ in scored})
        scores = {m: np.full(len(items), np.nan) for m in names}
        confidence = {m: np.full(len(items), np.nan) for m in names}
        for model, i, score, conf in scored:
            scores[model][i] = score
            confidence[model][i] = np.nan if conf is None else conf
        return CalibrationSet(embeddings=embeddings.astype(np.float32, copy=False), items=items, scores=scores,
                              confidence=confidence)

    def domain_quality(self) -> dict[tuple[str, str | None], tuple[float, int]]:
        """(model, domain) -> (mean calibration score, number of items): the Analyze step's quality prior."""
        rows = self._conn.execute("SELECT model, domain, avg(score), count(*) FROM calibration GROUP BY model, domain")
        return {(m, d): (float(mean), int(n)) for m, d, mean, n in rows}

    # -- maintenance (`calm kb ...`) ----------------------------------------------------------------------

    def stats(self) -> dict:
        """Counts and per-model summaries; latency percentiles and mean energy count successful requests only."""
        with self._snapshot() as conn:
            counts = {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in TABLES}
            first, last = conn.execute("SELECT min(ts), max(ts) FROM observations").fetchone()
            per_model = conn.execute(
                "SELECT model, count(*), count(error_code), avg(CASE WHEN error_code IS NULL THEN energy_j END) "
                "FROM observations GROUP BY model ORDER BY model").fetchall()
            latencies: dict[str, list[float]] = {}
            for model, latency in conn.execute("SELECT model, latency_ms FROM observations WHERE error_code IS NULL"):
                latencies.setdefault(model, []).append(latency)
            version = self._version()
        wal = self.path.with_name(self.path.name + "-wal")
        return {
            "path": str(self.path),
            "schema_version": version,
            "file_bytes": self.path.stat().st_size,
            "wal_bytes": wal.stat().st_size if wal.exists() else 0,
            "rows": counts,
            "first_ts": first,
            "last_ts": last,
            "models": {
                model: {
                    "observations": n,
                    "errors": errors,
                    "error_rate": errors / n,
                    "p50_latency_ms": _percentile(latencies.get(model, []), 50),
                    "p95_latency_ms": _percentile(latencies.get(model, []), 95),
                    "mean_energy_j": energy,
                }
                for model, n, errors, energy in per_model
            },
        }

    def export(self, fh: TextIO) -> int:
        """Write every row of every table as JSON Lines (a "table" field names it); returns the rows written."""
        n = 0
        with self._snapshot() as conn:
            for table in TABLES:
                columns = ", ".join(OBSERVATION_FIELDS) if table == "observations" else "*"
                for row in self._rows(table, conn.execute(f"SELECT {columns} FROM {table} ORDER BY rowid")):
                    if "embedding" in row:
                        row["embedding"] = row["embedding"].tolist()
                    fh.write(json.dumps({"table": table, **row}) + "\n")
                    n += 1
        return n

    def reset(self) -> None:
        """Delete every row of every table; the schema stays."""
        with self._write() as conn:
            for table in TABLES:
                conn.execute(f"DELETE FROM {table}")
