"""The PostgreSQL knowledge base: one database that several calm processes (routers, on one machine or many)
share, so what one observes, profiles and calibrates, every other sees at its next reload (learned_version).

The schema is SQLite's, built by the same numbered migrations, translated: REAL as double precision (timestamps
too: seconds since the epoch), INTEGER as bigint, the 0/1 flags as boolean, embeddings as bytea of little-endian
float32; a one-row table `calm_schema_version` stands in for SQLite's user_version. Calm's tables live in the
connection's current schema, so a URL may put them in a schema of their own (`?options=-csearch_path%3Dcalm`).
Opening checks and applies migrations in one transaction under an advisory lock (MIGRATION_LOCK), so routers
started at once migrate once; then every table and column of that version is checked, as SQLite's are.

A handle holds one connection, in autocommit mode: a write is one short transaction, and one call at a time uses
the connection (base.guarded's lock). Writers in many processes insert at once without losing a row (MVCC).

A server that is down, a bad URL, a missing database or role, a lost connection: each is a one-line
KnowledgeError naming the URL with its password masked, and not resettable (fresh tables would not help).
A table or column missing, or a newer calm's schema, is: `calm kb reset` (start_over) drops calm's tables and
makes them afresh. Tables named like calm's without calm's version table are someone else's: refused, never
dropped. With `on_degraded` the handle degrades as SQLite's does (base.guarded): it learns in memory for the
rest of the process; a lost connection is not reopened, as a replaced SQLite file is not.
"""

from __future__ import annotations

import json
import re
import threading
import time
from contextlib import suppress
from typing import Any, Callable, TextIO

import numpy as np

from calm_cli.bounded import one_line
from calm_cli.knowledge.base import (BOOLEANS, CALIBRATION_COLUMNS, EMBEDDING, OBSERVATION_FIELDS, PROFILE_METRICS,
                                     CalibrationSet, Knowledge, KnowledgeError, calibration_rows, calibration_set,
                                     check_keys, guarded, observation_rows, plain)
from calm_cli.knowledge.sqlite import TABLES, schema_at

try:
    import psycopg
    import psycopg.conninfo
    import psycopg.rows
except ImportError:  # an optional extra: without it CALM_KB_URL is refused in one line, not at import
    psycopg = None  # type: ignore[assignment]

VERSION_TABLE = "calm_schema_version"
CALM_TABLES = (*TABLES, "meta")  # what the migrations make (meta: learned_version)
MIGRATION_LOCK = 0x63616C6D2D6B62  # b"calm-kb": the advisory lock key of every calm process's migration
CONNECT_TIMEOUT_S = 10  # libpq waits forever by default for a host that does not answer
RESET_REMEDY = "run `calm kb reset --yes` (it drops calm's tables in that database and makes them afresh)"
CONNECT_REMEDY = ("check that the PostgreSQL server is running and reachable, and the user, password and "
                  "database CALM_KB_URL names")

# Ordered schema steps, SQLite's (sqlite.MIGRATIONS) translated: MIGRATIONS[i] takes version i to i + 1.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (  # 1: what the Monitor records per request, and what `calm profile` measures per model
        """CREATE TABLE observations (
            id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            ts DOUBLE PRECISION NOT NULL,
            request_id TEXT NOT NULL,
            policy TEXT NOT NULL,
            model TEXT NOT NULL,
            domain TEXT,
            latency_ms DOUBLE PRECISION NOT NULL CHECK (latency_ms >= 0),
            ttft_ms DOUBLE PRECISION,
            queue_ms DOUBLE PRECISION NOT NULL,
            load_ms DOUBLE PRECISION NOT NULL,
            tokens_in BIGINT NOT NULL,
            tokens_out BIGINT NOT NULL,
            tokens_per_s DOUBLE PRECISION,
            energy_j DOUBLE PRECISION,
            energy_estimated BOOLEAN NOT NULL,
            memory_mb DOUBLE PRECISION,
            confidence DOUBLE PRECISION,
            cache_hit BOOLEAN NOT NULL,
            provider TEXT NOT NULL,
            escalated_from TEXT,
            error_code TEXT,
            injected_slowdown DOUBLE PRECISION NOT NULL DEFAULT 1.0 CHECK (injected_slowdown > 0)
        )""",
        "CREATE INDEX observations_model_ts ON observations (model, ts)",
        """CREATE TABLE profiles (
            model TEXT NOT NULL,
            precision TEXT NOT NULL,
            provider TEXT NOT NULL,
            load_ms DOUBLE PRECISION,
            ttft_ms DOUBLE PRECISION,
            tokens_per_s DOUBLE PRECISION,
            joules_per_token DOUBLE PRECISION,
            memory_mb DOUBLE PRECISION,
            energy_estimated BOOLEAN,
            n_samples BIGINT,
            updated_at DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (model, precision, provider)
        )""",
    ),
    (  # 2: per-item answer quality from calibration runs, with the query embedding the router learns from
        """CREATE TABLE calibration (
            model TEXT NOT NULL,
            task TEXT NOT NULL,
            item_id TEXT NOT NULL,
            domain TEXT,
            score DOUBLE PRECISION NOT NULL CHECK (score BETWEEN 0 AND 1),
            latency_ms DOUBLE PRECISION,
            energy_j DOUBLE PRECISION,
            tokens_out BIGINT,
            embedding BYTEA NOT NULL,
            dim BIGINT NOT NULL CHECK (dim > 0 AND octet_length(embedding) = 4 * dim),
            ts DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (model, task, item_id)
        )""",
    ),
    (  # 3: the profile's mean answer confidence, so Analyze can see a model grow unsure (drift)
        "ALTER TABLE profiles ADD COLUMN confidence DOUBLE PRECISION",
    ),
    (  # 4: each calibration answer's confidence, so escalation can learn what a confidence means per model
        "ALTER TABLE calibration ADD COLUMN confidence DOUBLE PRECISION CHECK (confidence BETWEEN 0 AND 1)",
    ),
    (  # 5: a counter bumped with every change to profiles or calibration, so a long-running loop sees them
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value BIGINT NOT NULL)",
        "INSERT INTO meta (key, value) VALUES ('learned_version', 0)",
    ),
    (  # 6: draft tokens a run checked and kept (speculative decoding): on an escalation by verification, how
       # much of the first member's answer the larger member kept, i.e. how often the two agree
        "ALTER TABLE observations ADD COLUMN draft_tokens BIGINT CHECK (draft_tokens >= 0)",
        "ALTER TABLE observations ADD COLUMN accepted_tokens BIGINT CHECK (accepted_tokens >= 0)",
    ),
)
_BUMP = "UPDATE meta SET value = value + 1 WHERE key = 'learned_version'"
_TYPES = {"INTEGER": "bigint", "REAL": "double precision", "TEXT": "text", "BLOB": "bytea"}  # SQLite's -> ours
_C = 'COLLATE "C"'  # text sorted by code point, as SQLite sorts it


def columns_at(version: int) -> dict[str, dict[str, str]]:
    """Each table's columns and types (as information_schema names them) at schema `version`: SQLite's schema
    of that version, translated."""
    return {table: {column: "boolean" if column in BOOLEANS.get(table, ()) else _TYPES[declared]
                    for column, declared in columns.items()}
            for table, columns in schema_at(version, CALM_TABLES).items()}


def _password(url: str) -> str | None:
    """The password in a URL's authority (user:password@host), if any."""
    authority = re.match(r"[^:/]*://([^/?#]*)", url)
    user, at, _ = authority.group(1).rpartition("@") if authority else ("", "", "")
    return user.split(":", 1)[1] if at and ":" in user else None


def masked(url: str) -> str:
    """`url` as calm prints it: a password, in the authority or as a password= parameter, shown as ***."""
    secret = _password(url)
    if secret is not None:
        url = url.replace(f":{secret}@", ":***@", 1)
    return re.sub(r"(\bpassword\s*=\s*)('[^']*'|[^\s&#]*)", r"\1***", url)


def _message(exc: BaseException, url: str) -> str:
    """A driver's error as one line, without the URL's password (libpq may quote the URL it could not parse)."""
    text = (" ".join(str(exc).split()) or type(exc).__name__).replace(url, masked(url))
    secret = _password(url)
    return one_line(text.replace(secret, "***") if secret else text, 300)


def _pg_error(where: str, url: str, exc: Exception) -> KnowledgeError:
    """What a PostgreSQL failure means for calm's user, by its SQLSTATE (none: the connection itself)."""
    state, what = getattr(exc, "sqlstate", None) or "", _message(exc, url)
    if state in ("42P01", "42703"):  # undefined table, column: calm's tables were changed by someone
        return KnowledgeError(where, f"{what}, so calm's tables are damaged or not calm's", RESET_REMEDY)
    if state == "42501":  # insufficient privilege
        return KnowledgeError(where, what, "grant CALM_KB_URL's user the rights to create and use tables in its "
                                           "database (or schema)", resettable=False)
    if state.startswith("53"):  # disk full, out of memory, too many connections
        return KnowledgeError(where, what, "free what the PostgreSQL server lacks", resettable=False)
    if state.startswith("40"):  # serialization failure, deadlock
        return KnowledgeError(where, what, "try again", resettable=False)
    if not state or state.startswith(("08", "28", "57")):  # no connection: down, refused, denied, lost, shut down
        return KnowledgeError(where, f"cannot use the PostgreSQL server: {what}", CONNECT_REMEDY, resettable=False)
    return KnowledgeError(where, f"PostgreSQL: {what}", "see the PostgreSQL server's log", resettable=False)


def _connect(url: str, where: str) -> psycopg.Connection:
    """A connection in autocommit mode, rows as dicts; a URL's own connect_timeout and application_name win."""
    if psycopg is None:
        raise KnowledgeError(where, "psycopg is not installed, so calm cannot use PostgreSQL",
                             "install calm's postgres extra (pip install 'calm-cli[postgres]'), or unset CALM_KB_URL",
                             resettable=False)
    try:
        given = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.Error as exc:
        raise KnowledgeError(where, f"not a usable PostgreSQL URL: {_message(exc, url)}", "fix CALM_KB_URL",
                             resettable=False) from exc
    params = {"connect_timeout": CONNECT_TIMEOUT_S, "application_name": "calm", **given}
    try:
        return psycopg.connect(**params, autocommit=True, row_factory=psycopg.rows.dict_row)
    except psycopg.Error as exc:
        raise _pg_error(where, url, exc) from exc


def _lock_migrations(conn: psycopg.Connection) -> None:
    """Wait for any other calm process checking or changing calm's tables; held to the transaction's end."""
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))


def _existing(conn: psycopg.Connection, tables: tuple[str, ...]) -> list[str]:
    """Which of `tables` are in the connection's current schema (where calm makes them)."""
    rows = conn.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema() "
                        "AND table_name = ANY(%s) ORDER BY table_name", (list(tables),))
    return [row["table_name"] for row in rows]


def _version(conn: psycopg.Connection, where: str) -> int:
    """Calm's schema version here: 0 for no calm tables; someone else's tables of calm's names are refused."""
    if not _existing(conn, (VERSION_TABLE,)):
        theirs = _existing(conn, CALM_TABLES)
        if theirs:
            raise KnowledgeError(where, f"table(s) {', '.join(theirs)} but no {VERSION_TABLE}, so not calm's",
                                 "point CALM_KB_URL at another database, or at a schema of calm's own "
                                 "(?options=-csearch_path%3Dcalm)", resettable=False)
        return 0
    rows = conn.execute(f"SELECT version FROM {VERSION_TABLE}").fetchall()
    if len(rows) != 1:
        raise KnowledgeError(where, f"{VERSION_TABLE} has {len(rows)} rows, not one, so it is damaged", RESET_REMEDY)
    version = int(rows[0]["version"])
    if version > len(MIGRATIONS):
        raise KnowledgeError(where, f"knowledge base schema version {version}, but this calm knows only up to "
                                    f"version {len(MIGRATIONS)}: it was written by a newer calm",
                             f"upgrade calm, point CALM_KB_URL elsewhere, or {RESET_REMEDY}")
    return version


def _migrate(conn: psycopg.Connection, where: str) -> None:
    """Apply the missing MIGRATIONS, then check every table and column of the version reached. The caller holds
    the migration lock in a transaction, so tables are never half-migrated nor migrated twice."""
    version = _version(conn, where)
    if version < len(MIGRATIONS):
        for step in MIGRATIONS[version:]:
            for statement in step:
                conn.execute(statement)
        if version == 0:
            conn.execute(f"CREATE TABLE {VERSION_TABLE} (version INTEGER NOT NULL)")
            conn.execute(f"INSERT INTO {VERSION_TABLE} (version) VALUES (%s)", (len(MIGRATIONS),))
        else:
            conn.execute(f"UPDATE {VERSION_TABLE} SET version = %s", (len(MIGRATIONS),))
        version = len(MIGRATIONS)
    found: dict[str, dict[str, str]] = {}
    for row in conn.execute("SELECT table_name, column_name, data_type FROM information_schema.columns "
                            "WHERE table_schema = current_schema() AND table_name = ANY(%s)", (list(CALM_TABLES),)):
        found.setdefault(row["table_name"], {})[row["column_name"]] = row["data_type"]
    for table, expected in columns_at(version).items():
        if table not in found:
            raise KnowledgeError(where, f"table {table} is missing, so it is damaged or not calm's", RESET_REMEDY)
        for column, kind in expected.items():
            if found[table].get(column) != kind:
                what = "is missing" if column not in found[table] else f"is {found[table][column]}, not {kind}"
                raise KnowledgeError(where, f"column {table}.{column} {what}, so it is damaged or not calm's",
                                     RESET_REMEDY)


def start_over(url: str) -> str | None:
    """Make calm's tables afresh (`calm kb reset`): there is no file to set aside, so they are dropped and made
    again, under the migration lock, whether they were fine or could not serve. Returns what was wrong (None when
    nothing was); a database calm cannot reach or tables that are not calm's are refused (KnowledgeError)."""
    where, problem = masked(url), None
    try:
        PostgresKnowledge(url).close()
    except KnowledgeError as exc:
        if not exc.resettable:
            raise
        problem = exc.problem
    conn = _connect(url, where)
    try:
        with conn.transaction():
            _lock_migrations(conn)
            conn.execute(f"DROP TABLE IF EXISTS {', '.join((*CALM_TABLES, VERSION_TABLE))}")
            _migrate(conn, where)
    except psycopg.Error as exc:
        raise _pg_error(where, url, exc) from exc
    finally:
        conn.close()
    return problem


def _bound(table: str, row: dict) -> dict:
    """A row's values as PostgreSQL takes them: flags as booleans (SQLite also takes 1 and 0 for them)."""
    flags = BOOLEANS.get(table, ())
    return {k: bool(v) if k in flags and v is not None else v for k, v in row.items()}


class PostgresKnowledge(Knowledge):
    """One process's connection to a PostgreSQL knowledge base; opening it creates or migrates calm's tables.

    Without `on_degraded` a database that cannot serve raises KnowledgeError (the `calm kb` commands, profile,
    bench); with it, the handle degrades to memory instead (the serving commands; see base.guarded). `path` is
    where it is, as every message names it: the URL with its password masked.
    """

    def __init__(self, url: str, *, on_degraded: Callable[[str], None] | None = None):
        self._lock = threading.RLock()
        self.url, self.path = url, masked(url)
        self.degraded: str | None = None
        self._on_degraded = on_degraded
        try:
            self._conn = _connect(url, self.path)
            self._open()
        except KnowledgeError as exc:
            if on_degraded is None:
                raise
            self._degrade(exc)

    def _open(self) -> None:
        """Migrate and check calm's tables under the migration lock; on any failure the connection is closed."""
        try:
            with self._conn.transaction():
                _lock_migrations(self._conn)
                _migrate(self._conn, self.path)
        except psycopg.Error as exc:
            self._disconnect()
            raise _pg_error(self.path, self.url, exc) from exc
        except BaseException:
            self._disconnect()
            raise

    def _failure(self, exc: Exception) -> KnowledgeError | None:
        """Bad data (SQLSTATE classes 22 and 23: a value out of range, a constraint violated) and calm's own misuse
        are the caller's errors and pass; a table or column missing, rights and every connection failure are
        the database's."""
        if not isinstance(exc, psycopg.Error):
            return None
        state = exc.sqlstate or ""
        if state.startswith(("22", "23")) or (isinstance(exc, psycopg.ProgrammingError)
                                              and state not in ("42P01", "42703", "42501")):
            return None
        return _pg_error(self.path, self.url, exc)

    def _disconnect(self) -> None:
        with suppress(psycopg.Error):  # a lost connection may fail to close; it is gone anyway
            self._conn.close()

    def _snapshot(self) -> None:
        """Make the transaction begun one consistent view for several queries (stats, export)."""
        self._conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")

    # -- observations (Monitor) ---------------------------------------------------------------------------

    @guarded()
    def record_many(self, observations: list[dict]) -> None:
        """Store many served requests in one transaction; nothing is stored if any of them is invalid."""
        rows = [_bound("observations", row) for row in observation_rows(observations)]
        sql = (f"INSERT INTO observations ({', '.join(OBSERVATION_FIELDS)}) "
               f"VALUES ({', '.join(f'%({f})s' for f in OBSERVATION_FIELDS)})")
        with self._conn.transaction():
            self._conn.cursor().executemany(sql, rows)

    @guarded()
    def recent(self, model: str, window: int = 200, since_ts: float | None = None) -> list[dict]:
        """The latest `window` observations of `model` (at or after `since_ts`), newest first, errors included."""
        sql = f"SELECT {', '.join(OBSERVATION_FIELDS)} FROM observations WHERE model = %s"
        args: list[Any] = [model]
        if since_ts is not None:
            sql += " AND ts >= %s"
            args.append(since_ts)
        return self._conn.execute(sql + " ORDER BY ts DESC, id DESC LIMIT %s", [*args, window]).fetchall()

    # -- profiles (`calm profile`) ------------------------------------------------------------------------

    @guarded()
    def upsert_profile(self, model: str, precision: str, provider: str, **metrics: Any) -> None:
        """Create or update the profile of (model, precision, provider); metrics not given keep their value."""
        check_keys("profile", metrics, (), PROFILE_METRICS)
        row = _bound("profiles", {"updated_at": time.time(), **plain(metrics)})
        cols = list(row)
        with self._conn.transaction():
            self._conn.execute(f"INSERT INTO profiles (model, precision, provider, {', '.join(cols)}) "
                               f"VALUES (%s, %s, %s, {', '.join('%s' for _ in cols)}) "
                               f"ON CONFLICT (model, precision, provider) DO UPDATE SET "
                               f"{', '.join(f'{c} = excluded.{c}' for c in cols)}",
                               [model, precision, provider, *row.values()])
            self._conn.execute(_BUMP)

    @guarded()
    def profile(self, model: str, precision: str | None = None, provider: str | None = None) -> dict | None:
        """The most recently updated profile of `model` matching the precision and provider given."""
        sql, args = "SELECT * FROM profiles WHERE model = %s", [model]
        for column, value in (("precision", precision), ("provider", provider)):
            if value is not None:
                sql += f" AND {column} = %s"
                args.append(value)
        return self._conn.execute(sql + " ORDER BY updated_at DESC LIMIT 1", args).fetchone()

    @guarded()
    def profiles(self) -> list[dict]:
        return self._conn.execute(f"SELECT * FROM profiles ORDER BY model {_C}, precision {_C}, provider {_C}"
                                  ).fetchall()

    # -- calibration (quality per item, per model) --------------------------------------------------------

    @guarded()
    def add_calibration(self, rows: list[dict]) -> None:
        """Store calibration results in one transaction; a row for an existing (model, task, item_id) replaces it."""
        clean = calibration_rows(rows, time.time())
        cols, keys = CALIBRATION_COLUMNS, ("model", "task", "item_id")
        sql = (f"INSERT INTO calibration ({', '.join(cols)}) VALUES ({', '.join(f'%({c})s' for c in cols)}) "
               f"ON CONFLICT ({', '.join(keys)}) DO UPDATE SET "
               f"{', '.join(f'{c} = excluded.{c}' for c in cols if c not in keys)}")
        with self._conn.transaction():
            self._conn.cursor().executemany(sql, clean)
            self._conn.execute(_BUMP)

    @guarded()
    def calibration(self, models: list[str] | None = None) -> CalibrationSet:
        """Calibration of `models` (all when None) as an item x model matrix; items are sorted by (task, item_id).

        An item's embedding and domain are taken from its newest row; a model asked for without rows gets NaN.
        """
        sql, args = "SELECT model, task, item_id, domain, score, confidence, embedding FROM calibration", []
        if models is not None:
            sql += " WHERE model = ANY(%s)"
            args = [list(models)]
        rows = [{**row, "embedding": np.frombuffer(row["embedding"], dtype=EMBEDDING)}
                for row in self._conn.execute(f"{sql} ORDER BY task {_C}, item_id {_C}, ts", args)]
        found, dims = calibration_set(rows, models)
        if len(dims) > 1:
            raise KnowledgeError(self.path, f"calibration embeddings have different dimensions {dims}",
                                 f"re-run `calm profile` with one encoder, or {RESET_REMEDY}")
        return found

    @guarded()
    def domain_quality(self) -> dict[tuple[str, str | None], tuple[float, int]]:
        """(model, domain) -> (mean calibration score, number of items): the Analyze step's quality prior."""
        rows = self._conn.execute("SELECT model, domain, avg(score) AS mean, count(*) AS n FROM calibration "
                                  "GROUP BY model, domain")
        return {(r["model"], r["domain"]): (float(r["mean"]), int(r["n"])) for r in rows}

    @guarded()
    def learned_version(self) -> int:
        return int(self._conn.execute("SELECT value FROM meta WHERE key = 'learned_version'").fetchone()["value"])

    # -- maintenance (`calm kb ...`) ----------------------------------------------------------------------

    @guarded()
    def stats(self) -> dict:
        """Counts and per-model summaries as SQLite's backend gives them (latency percentiles and mean energy
        count successful requests only, percentiles interpolated as numpy's), computed by the server; the
        server enforces every column's type, so there is nothing more to check. `file_bytes` is what calm's
        tables take on the server, indexes included."""
        with self._conn.transaction():
            self._snapshot()
            counts = {t: self._conn.execute(f"SELECT count(*) AS n FROM {t}").fetchone()["n"] for t in TABLES}
            span = self._conn.execute("SELECT min(ts) AS first, max(ts) AS last FROM observations").fetchone()
            ok = "FILTER (WHERE error_code IS NULL)"
            per_model = self._conn.execute(
                f"SELECT model, count(*) AS n, count(error_code) AS errors, avg(energy_j) {ok} AS energy, "
                f"percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms) {ok} AS p50, "
                f"percentile_cont(0.95) WITHIN GROUP (ORDER BY latency_ms) {ok} AS p95 "
                f"FROM observations GROUP BY model ORDER BY model {_C}").fetchall()
            size = self._conn.execute(
                "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) AS bytes FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = current_schema() "
                "AND c.relkind = 'r' AND c.relname = ANY(%s)", ([*CALM_TABLES, VERSION_TABLE],)).fetchone()
            version = self._conn.execute(f"SELECT version FROM {VERSION_TABLE}").fetchone()["version"]
        return {
            "path": self.path,
            "schema_version": version,
            "file_bytes": int(size["bytes"]),
            "rows": counts,
            "first_ts": span["first"],
            "last_ts": span["last"],
            "models": {
                r["model"]: {
                    "observations": r["n"],
                    "errors": r["errors"],
                    "error_rate": r["errors"] / r["n"],
                    "p50_latency_ms": r["p50"],
                    "p95_latency_ms": r["p95"],
                    "mean_energy_j": r["energy"],
                }
                for r in per_model
            },
        }

    @guarded(retry=False)  # rows already written would be written twice
    def export(self, fh: TextIO) -> int:
        """Write every row of every table as JSON Lines (a "table" field names it); returns the rows written.
        Observations in the order they were stored, profiles and calibration by key; read through a server-side
        cursor, so a table of millions of rows is never held in memory at once."""
        order = {"observations": "id", "profiles": f"model {_C}, precision {_C}, provider {_C}",
                 "calibration": f"model {_C}, task {_C}, item_id {_C}"}
        n = 0
        with self._conn.transaction():
            self._snapshot()
            for table in TABLES:
                columns = ", ".join(OBSERVATION_FIELDS) if table == "observations" else "*"
                with self._conn.cursor(name=f"calm_export_{table}") as cursor:
                    cursor.execute(f"SELECT {columns} FROM {table} ORDER BY {order[table]}")
                    for row in cursor:
                        if "embedding" in row:
                            row["embedding"] = np.frombuffer(row["embedding"], dtype=EMBEDDING).tolist()
                        fh.write(json.dumps({"table": table, **row}) + "\n")
                        n += 1
        return n

    @guarded()
    def reset(self) -> None:
        """Delete every row of every table; the schema stays (start_over drops and remakes the tables)."""
        with self._conn.transaction():
            for table in TABLES:
                self._conn.execute(f"DELETE FROM {table}")
            self._conn.execute(_BUMP)

