"""The SQLite knowledge base, calm's embedded default: what calm observed, measured and learned, in one file.

Several calm processes may share the file at once (a `calm serve` beside a `calm bench` and a `calm kb stats`):
each opens its own connection, the file is in WAL mode so readers never wait for writers, every write is a
short BEGIN IMMEDIATE transaction (so two writers never deadlock upgrading a read lock), and waiting for a
lock is left to SQLite's busy timeout.

A file that cannot serve (not SQLite, damaged pages, truncated, a table or column missing, someone else's
database, a newer schema, a directory in its place) is refused with a one-line KnowledgeError naming the file,
what is wrong and what to do; so is every SQLite failure of a later call. Opening checks only what is cheap
(the header, the schema version, every table and column: about 1 ms whatever the size); damaged data pages are
found by the call that reads them, and `stats` and `reset` run SQLite's quick_check (O(size): about 0.6 s
for a million observations, 120 MB).
A value that does not fit its column (text in a number column: a row written by something else) is refused,
not skipped, naming the table, column and value: silently leaving rows out would change what calm learns.

Degraded mode (the serving commands): a store opened with `on_degraded` never fails for the file's
sake. When the file cannot be opened, or a later call fails (damage found mid-run, disk full, the file deleted
or replaced, a lock held past the busy timeout), it switches for the rest of the process to an in-memory
store with the same schema, tells `on_degraded` why (once), and retries the call there: requests go on being
answered and learning goes on for the process, but nothing learned is kept. `degraded` then holds the reason,
which every record carries as its top-level "knowledge" field ("degraded: <reason>").
"""

from __future__ import annotations

import functools
import json
import os
import sqlite3
import threading
import time
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TextIO

import numpy as np

from calm_cli import settings
from calm_cli.knowledge.base import (BOOLEANS, CALIBRATION_COLUMNS, EMBEDDING, OBSERVATION_FIELDS,
                                     PROFILE_METRICS, CalibrationSet, Knowledge, KnowledgeError, calibration_rows,
                                     calibration_set, check_keys, guarded, observation_rows, percentile, plain,
                                     reset_remedy)

FILENAME = "knowledge.sqlite"
MEMORY = ":memory:"  # as a path: a store that keeps nothing, where a degraded process goes on (of any backend)


def default_path() -> Path:
    """Where calm keeps its knowledge base file: the data_dir setting."""
    return settings.path("data_dir") / FILENAME

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
    (  # 5: a counter bumped with every change to profiles or calibration, so a long-running loop sees them
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)",
        "INSERT INTO meta (key, value) VALUES ('learned_version', 0)",
    ),
    (  # 6: draft tokens a run checked and kept (speculative decoding): on an escalation by verification, how
       # much of the first member's answer the larger member kept, i.e. how often the two agree
        "ALTER TABLE observations ADD COLUMN draft_tokens INTEGER CHECK (draft_tokens >= 0)",
        "ALTER TABLE observations ADD COLUMN accepted_tokens INTEGER CHECK (accepted_tokens >= 0)",
    ),
)
_BUMP = "UPDATE meta SET value = value + 1 WHERE key = 'learned_version'"
TABLES = ("observations", "profiles", "calibration")  # what calm learned; `meta` is bookkeeping

# The SQLite storage classes a column of each declared type may hold (besides NULL), and their Python types.
_STORAGE = {"INTEGER": ("integer", "real"), "REAL": ("integer", "real"), "TEXT": ("text",), "BLOB": ("blob",)}
_PYTHON = {"integer": int, "real": float, "text": str, "blob": bytes}


@functools.cache
def schema_at(version: int, tables: tuple[str, ...] = TABLES) -> dict[str, dict[str, str]]:
    """Each table's columns and declared types as the first `version` MIGRATIONS make them: what a file of
    that schema version must have (and, translated, what a PostgreSQL knowledge base must)."""
    conn = sqlite3.connect(":memory:")
    try:
        for step in MIGRATIONS[:version]:
            for statement in step:
                conn.execute(statement)
        found = {t: {row[1]: row[2] for row in conn.execute(f"PRAGMA table_info({t})")} for t in tables}
        return {t: columns for t, columns in found.items() if columns}
    finally:
        conn.close()


COLUMNS = schema_at(len(MIGRATIONS))


def _moved(path: Path) -> KnowledgeError:
    return KnowledgeError(path, "the file was deleted, moved or replaced while calm had it open",
                          "run calm again to use the file now at that path", resettable=False)


def _identity(path: Path) -> tuple[int, int] | None:
    """Which file is at `path` now (device, inode); None when none is."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _sqlite_error(path: Path, exc: sqlite3.DatabaseError, busy_timeout_s: float) -> KnowledgeError:
    """What a SQLite failure means for calm's user, by SQLite's error code."""
    name = getattr(exc, "sqlite_errorname", "")
    what = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        return KnowledgeError(path, f"{what} (another process held it for over {busy_timeout_s:g} s)",
                              "try again once the other calm process is done with it", resettable=False)
    if name == "SQLITE_FULL":
        return KnowledgeError(path, what, "free some disk space", resettable=False)
    if name == "SQLITE_READONLY_DBMOVED":
        return _moved(path)
    if name.startswith(("SQLITE_READONLY", "SQLITE_PERM", "SQLITE_CANTOPEN", "SQLITE_AUTH")):
        return KnowledgeError(path, what, "check that calm may read and write the file and its directory",
                              resettable=False)
    if name.startswith("SQLITE_IOERR"):
        return KnowledgeError(path, f"{what} (a disk I/O error)",
                              f"check the disk; if the file itself is damaged, {reset_remedy(path)}",
                              resettable=False)
    return KnowledgeError(path, f"the file is damaged: {what}")


def _misfit(path: Path, table: str, row: dict, where: str = "") -> KnowledgeError | None:
    """A value that does not fit its column's declared type (text in a number column...): a foreign row."""
    columns = COLUMNS[table]
    for name, value in row.items():
        declared = columns.get(name)
        if value is None or declared is None:
            continue
        if not isinstance(value, tuple(_PYTHON[s] for s in _STORAGE[declared])):
            return KnowledgeError(path, f"{table}{where}: column {name} ({declared}) holds "
                                        f"{type(value).__name__} {repr(value)[:40]}, a row calm did not write")
        if name == "embedding" and len(value) % EMBEDDING.itemsize:
            return KnowledgeError(path, f"{table}{where}: an embedding of {len(value)} bytes, not float32s, "
                                        "a row calm did not write")
    return None


def set_aside(path: Path) -> Path:
    """Move an unusable knowledge base (and its -wal and -shm) to <name>.damaged-<time> beside it; returns that."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    backup, n = path.with_name(f"{path.name}.damaged-{stamp}"), 1
    while backup.exists():
        n += 1
        backup = path.with_name(f"{path.name}.damaged-{stamp}-{n}")
    for suffix in ("", "-wal", "-shm"):  # sqlite opens <backup> with <backup>-wal, so they move together
        source = path.with_name(path.name + suffix)
        if source.exists():
            os.rename(source, backup.with_name(backup.name + suffix))
    return backup


def start_over(path: Path | None = None) -> tuple[Path, str] | None:
    """Empty the knowledge base (`calm kb reset`). A file that cannot serve is not deleted but set aside, and a
    fresh one made: returns where it went and what was wrong (None when the file was fine and only emptied)."""
    path = Path(path) if path is not None else default_path()
    try:
        with SQLiteKnowledge(path) as kb:
            kb.reset()
        return None
    except KnowledgeError as exc:
        if not exc.resettable:
            raise
        problem = exc.problem
    try:
        backup = set_aside(path)
    except OSError as exc:
        raise KnowledgeError(path, f"cannot move it aside: {exc.strerror or exc}",
                             "check the permissions of its directory, or move it away by hand",
                             resettable=False) from exc
    SQLiteKnowledge(path).close()
    return backup, problem


class SQLiteKnowledge(Knowledge):
    """One process's connection to the knowledge base file; opening it creates or migrates the schema.

    Without `on_degraded` a file that cannot serve raises KnowledgeError (the `calm kb` commands, profile,
    bench); with it, the base degrades to memory instead (the serving commands; see the module docstring).
    The path MEMORY opens a store in memory that keeps nothing: where a degraded handle goes on.
    """

    def __init__(self, path: Path | str | None = None, *, on_degraded: Callable[[str], None] | None = None,
                 busy_timeout_s: float = BUSY_TIMEOUT_S):
        self._lock = threading.RLock()
        self.in_memory = path == MEMORY
        self.path = Path(path) if path is not None else default_path()
        self.busy_timeout_s = busy_timeout_s
        self.degraded: str | None = None  # why this process works on an in-memory store instead of the file
        self._identity: tuple[int, int] | None = None  # the file opened, to see it replaced under us
        self._on_degraded = on_degraded
        try:
            self._open_file()
        except KnowledgeError as exc:
            if on_degraded is None:
                raise
            self._degrade(exc)

    def _connect(self, target: Path | str) -> sqlite3.Connection:
        # Several threads of one process share the connection (the loop's workers, a server's handlers); every
        # call holds self._lock (see base.guarded), which is the serialisation check_same_thread would demand.
        conn = sqlite3.connect(target, timeout=self.busy_timeout_s, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        return conn

    def _open_file(self) -> None:
        if self.in_memory:
            self._conn = self._connect(MEMORY)
            self._migrate()
            return
        if self.path.is_dir():
            raise KnowledgeError(self.path, "a directory is where the knowledge base file should be")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise KnowledgeError(self.path, f"cannot make its directory: {exc.strerror or exc}",
                                 "check CALM_DATA_DIR and its permissions", resettable=False) from exc
        try:
            self._conn = self._connect(self.path)
        except sqlite3.DatabaseError as exc:
            raise _sqlite_error(self.path, exc, self.busy_timeout_s) from exc
        try:
            self._check_schema()  # before anything is written: WAL mode alone would rewrite someone else's file
            self._conn.execute("PRAGMA journal_mode = WAL")
            self._conn.execute("PRAGMA synchronous = NORMAL")  # WAL + NORMAL: durable but for a power cut
            self._conn.execute("PRAGMA foreign_keys = ON")
            self._migrate()
            self._check_schema()
            self._identity = _identity(self.path)
        except sqlite3.DatabaseError as exc:
            self._conn.close()
            if getattr(exc, "sqlite_errorname", "") == "SQLITE_NOTADB":
                raise KnowledgeError(self.path, "not an SQLite database, so not a calm knowledge base") from exc
            raise _sqlite_error(self.path, exc, self.busy_timeout_s) from exc
        except BaseException:
            self._conn.close()
            raise

    def _failure(self, exc: Exception) -> KnowledgeError | None:
        """A constraint violation (IntegrityError) or misuse (ProgrammingError) is the caller's bad data, never
        the file's: it passes; every other SQLite failure is the file's."""
        if isinstance(exc, (sqlite3.IntegrityError, sqlite3.ProgrammingError)) or \
                not isinstance(exc, sqlite3.DatabaseError):
            return None
        return _sqlite_error(self.path, exc, self.busy_timeout_s)

    def _disconnect(self) -> None:
        with suppress(sqlite3.Error):  # closing a connection to a failing file may fail too; it is gone anyway
            self._conn.close()

    # -- transactions and schema --------------------------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction that takes the lock up front, so it waits (busy timeout) rather than fails."""
        # In WAL mode SQLite goes on writing to a file deleted or replaced under it (SQLITE_READONLY_DBMOVED
        # only guards rollback journals): what is learned would vanish unseen, so check it is still there.
        if self._identity is not None and _identity(self.path) != self._identity:
            raise _moved(self.path)
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
        except BaseException:
            self._rollback()
            raise
        self._conn.execute("COMMIT")

    @contextmanager
    def _snapshot(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: several queries see one state of the file while writers go on."""
        self._conn.execute("BEGIN")
        try:
            yield self._conn
        except BaseException:
            self._rollback()
            raise
        self._conn.execute("COMMIT")

    def _rollback(self) -> None:
        # The error in hand says what went wrong; a failing file may fail the rollback too (SQLite then has
        # rolled back itself), and that second error must not replace the first.
        with suppress(sqlite3.Error):
            self._conn.execute("ROLLBACK")

    def _version(self) -> int:
        return self._conn.execute("PRAGMA user_version").fetchone()[0]

    def _refuse_newer(self, version: int) -> None:
        if version > len(MIGRATIONS):
            raise KnowledgeError(self.path, f"knowledge base schema version {version}, but this calm knows only "
                                            f"up to version {len(MIGRATIONS)}: it was written by a newer calm",
                                 f"upgrade calm, set CALM_DATA_DIR elsewhere, or {reset_remedy(self.path)}")

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
                raise KnowledgeError(self.path, "an SQLite database but not a calm knowledge base (it has tables "
                                                "but no calm schema version)")  # made while we waited
            for step in MIGRATIONS[version:]:
                for statement in step:
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {len(MIGRATIONS)}")

    def _check_schema(self) -> None:
        """The file is a calm knowledge base of the version it says: every table and column of that version is
        there with its type. A newer calm's file, someone else's database (tables but no version, or a version
        but not calm's tables) and a dropped table or column are refused at open, not at the first query that
        needs them."""
        version = self._version()
        self._refuse_newer(version)
        if version == 0 and self._conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
            raise KnowledgeError(self.path, "an SQLite database but not a calm knowledge base (it has tables but "
                                            "no calm schema version)")
        for table, expected in schema_at(version).items():
            found = {row[1]: row[2] for row in self._conn.execute(f"PRAGMA table_info({table})")}
            if not found:
                raise KnowledgeError(self.path, f"table {table} is missing, so it is damaged or not calm's")
            for column, declared in expected.items():
                if found.get(column) != declared:
                    what = "is missing" if column not in found else f"is {found[column] or 'untyped'}, not {declared}"
                    raise KnowledgeError(self.path, f"column {table}.{column} {what}, so it is damaged or not calm's")

    def _check_integrity(self, conn: sqlite3.Connection) -> None:
        """SQLite's quick_check: every page of the file, O(size); for the maintenance commands only."""
        found = [line for (text,) in conn.execute("PRAGMA quick_check(3)") for line in text.splitlines()
                 if not line.startswith("*** in database")]
        if found != ["ok"]:
            raise KnowledgeError(self.path, f"the file is damaged: {'; '.join(found)}")

    def _check_stored(self, conn: sqlite3.Connection, table: str, columns: Iterable[str]) -> None:
        """Refuse the first row whose `columns` hold a value of the wrong type, before SQL aggregates it
        (avg() would silently count text as 0)."""
        columns = list(columns)
        wrong = " OR ".join(f"typeof({c}) NOT IN ('null', {', '.join(repr(s) for s in _STORAGE[COLUMNS[table][c]])})"
                            for c in columns)
        row = conn.execute(f"SELECT rowid AS _rowid, {', '.join(columns)} FROM {table} WHERE {wrong} LIMIT 1"
                           ).fetchone()
        if row is not None:
            error = _misfit(self.path, table, {c: row[c] for c in columns}, f" row {row['_rowid']}")
            assert error is not None
            raise error

    def _rows(self, table: str, cursor: sqlite3.Cursor) -> list[dict]:
        """Rows as plain dicts: flags as bools and embeddings as numpy arrays; a foreign value is refused."""
        out = []
        for row in cursor:
            d = dict(row)
            error = _misfit(self.path, table, d)
            if error is not None:
                raise error
            for name in BOOLEANS.get(table, ()):
                if d.get(name) is not None:
                    d[name] = bool(d[name])
            if "embedding" in d:
                d["embedding"] = np.frombuffer(d["embedding"], dtype=EMBEDDING)
            out.append(d)
        return out

    # -- observations (Monitor) ---------------------------------------------------------------------------

    @guarded()
    def record_many(self, observations: list[dict]) -> None:
        """Store many served requests in one transaction; nothing is stored if any of them is invalid."""
        rows = observation_rows(observations)
        sql = (f"INSERT INTO observations ({', '.join(OBSERVATION_FIELDS)}) "
               f"VALUES ({', '.join(':' + f for f in OBSERVATION_FIELDS)})")
        with self._write() as conn:
            conn.executemany(sql, rows)

    @guarded()
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

    @guarded()
    def upsert_profile(self, model: str, precision: str, provider: str, **metrics: Any) -> None:
        """Create or update the profile of (model, precision, provider); metrics not given keep their value."""
        check_keys("profile", metrics, (), PROFILE_METRICS)
        row = {"updated_at": time.time(), **plain(metrics)}
        cols = list(row)
        with self._write() as conn:
            conn.execute(f"INSERT INTO profiles (model, precision, provider, {', '.join(cols)}) "
                         f"VALUES (?, ?, ?, {', '.join('?' for _ in cols)}) "
                         f"ON CONFLICT (model, precision, provider) DO UPDATE SET "
                         f"{', '.join(f'{c} = excluded.{c}' for c in cols)}",
                         [model, precision, provider, *row.values()])
            conn.execute(_BUMP)

    @guarded()
    def profile(self, model: str, precision: str | None = None, provider: str | None = None) -> dict | None:
        """The most recently updated profile of `model` matching the precision and provider given."""
        sql, args = "SELECT * FROM profiles WHERE model = ?", [model]
        for column, value in (("precision", precision), ("provider", provider)):
            if value is not None:
                sql += f" AND {column} = ?"
                args.append(value)
        rows = self._rows("profiles", self._conn.execute(sql + " ORDER BY updated_at DESC LIMIT 1", args))
        return rows[0] if rows else None

    @guarded()
    def profiles(self) -> list[dict]:
        return self._rows("profiles", self._conn.execute("SELECT * FROM profiles ORDER BY model, precision, provider"))

    # -- calibration (quality per item, per model) --------------------------------------------------------

    @guarded()
    def add_calibration(self, rows: list[dict]) -> None:
        """Store calibration results in one transaction; a row for an existing (model, task, item_id) replaces it."""
        clean = calibration_rows(rows, time.time())
        cols, keys = CALIBRATION_COLUMNS, ("model", "task", "item_id")
        sql = (f"INSERT INTO calibration ({', '.join(cols)}) VALUES ({', '.join(':' + c for c in cols)}) "
               f"ON CONFLICT ({', '.join(keys)}) DO UPDATE SET "
               f"{', '.join(f'{c} = excluded.{c}' for c in cols if c not in keys)}")
        with self._write() as conn:
            conn.executemany(sql, clean)
            conn.execute(_BUMP)

    @guarded()
    def calibration(self, models: list[str] | None = None) -> CalibrationSet:
        """Calibration of `models` (all when None) as an item x model matrix; items are sorted by (task, item_id).

        An item's embedding and domain are taken from its newest row; a model asked for without rows gets NaN.
        """
        sql, args = "SELECT model, task, item_id, domain, score, confidence, embedding FROM calibration", []
        if models is not None:
            sql += f" WHERE model IN ({', '.join('?' for _ in models)})"
            args = list(models)
        rows = self._rows("calibration", self._conn.execute(sql + " ORDER BY task, item_id, ts", args))
        found, dims = calibration_set(rows, models)
        if len(dims) > 1:
            raise KnowledgeError(self.path, f"calibration embeddings have different dimensions {dims}",
                                 f"re-run `calm profile` with one encoder, or {reset_remedy(self.path)}")
        return found

    @guarded()
    def domain_quality(self) -> dict[tuple[str, str | None], tuple[float, int]]:
        """(model, domain) -> (mean calibration score, number of items): the Analyze step's quality prior."""
        with self._snapshot() as conn:
            self._check_stored(conn, "calibration", ("model", "domain", "score"))
            rows = conn.execute("SELECT model, domain, avg(score), count(*) FROM calibration GROUP BY model, domain")
            return {(m, d): (float(mean), int(n)) for m, d, mean, n in rows}

    @guarded()
    def learned_version(self) -> int:
        return int(self._conn.execute("SELECT value FROM meta WHERE key = 'learned_version'").fetchone()[0])

    # -- maintenance (`calm kb ...`) ----------------------------------------------------------------------

    @guarded()
    def stats(self) -> dict:
        """Counts and per-model summaries; latency percentiles and mean energy count successful requests only.

        It checks the file too (SQLite's quick_check), so damage no other call has touched yet is reported
        here, and the values it reads or summarizes against their columns' types; the other observation columns
        are left to the calls that read them (checking them all costs about 1.5 s per million rows)."""
        with self._snapshot() as conn:
            self._check_integrity(conn)
            self._check_stored(conn, "observations", ("ts", "model", "latency_ms", "energy_j", "error_code"))
            for table in ("profiles", "calibration"):  # small tables: every column
                self._check_stored(conn, table, COLUMNS[table])
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
            "file_bytes": 0 if self.in_memory else self.path.stat().st_size,
            "wal_bytes": wal.stat().st_size if not self.in_memory and wal.exists() else 0,
            "rows": counts,
            "first_ts": first,
            "last_ts": last,
            "models": {
                model: {
                    "observations": n,
                    "errors": errors,
                    "error_rate": errors / n,
                    "p50_latency_ms": percentile(latencies.get(model, []), 50),
                    "p95_latency_ms": percentile(latencies.get(model, []), 95),
                    "mean_energy_j": energy,
                }
                for model, n, errors, energy in per_model
            },
        }

    @guarded(retry=False)  # rows already written would be written twice
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

    @guarded()
    def reset(self) -> None:
        """Delete every row of every table; the schema stays. A damaged file is refused (KnowledgeError), not
        emptied: its damage would stay in the freed pages."""
        with self._write() as conn:
            self._check_integrity(conn)
            for table in TABLES:
                conn.execute(f"DELETE FROM {table}")
            conn.execute(_BUMP)
