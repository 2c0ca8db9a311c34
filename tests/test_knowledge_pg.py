"""The PostgreSQL knowledge base against a real PostgreSQL server this module starts (initdb and pg_ctl as an
unprivileged user, listening on 127.0.0.1 only) and stops: migrations, the same answers as SQLite from every
method, writers and openers in several processes at once, learned_version across connections, a server that is
down or lost, tables that cannot serve, and `calm kb` / `calm route` with CALM_KB_URL set.

Without PostgreSQL's server binaries or psycopg these tests skip, saying why; with CI=true they fail instead."""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import itertools
import json
import math
import multiprocessing
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from click.testing import CliRunner

from calm_cli import settings
from calm_cli.cli import main
from calm_cli.knowledge import KnowledgeError, open_knowledge
from calm_cli.knowledge import sqlite as sqlite_kb
from calm_cli.knowledge.base import OBSERVATION_DEFAULTS, Knowledge
from calm_cli.knowledge.sqlite import SQLiteKnowledge

CI = os.environ.get("CI", "").lower() == "true"
PASSWORD = "s3cret-pw"  # in every URL, so any message that printed it would fail its test


def _unavailable(reason: str) -> None:
    if CI:
        pytest.fail(f"CI=true but {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


if importlib.util.find_spec("psycopg") is None:
    _unavailable("psycopg cannot be imported: install the [test] (or [postgres]) extra")

import psycopg  # noqa: E402

from calm_cli.knowledge import postgres  # noqa: E402
from calm_cli.knowledge.postgres import PostgresKnowledge  # noqa: E402


def obs(**over: object) -> dict:
    """A complete observation; keyword arguments override fields."""
    base = {"ts": 1000.0, "request_id": "r1", "policy": "default", "model": "smollm2-135m", "latency_ms": 120.0,
            "ttft_ms": 30.0, "queue_ms": 1.0, "load_ms": 0.0, "tokens_in": 12, "tokens_out": 8,
            "tokens_per_s": 66.0, "energy_j": 1.5, "energy_estimated": True, "memory_mb": 300.0,
            "cache_hit": False, "provider": "cpu"}
    return {**base, **over}


def cal(model: str, task: str, item: object, score: float, embedding: list[float], **over: object) -> dict:
    return {"model": model, "task": task, "item_id": item, "score": score, "embedding": np.array(embedding),
            **over}


# -- the server -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Server:
    port: int
    icu: bool  # whether databases get an ICU en-US collation (one that does not sort by code point)

    def url(self, database: str, password: str = PASSWORD) -> str:
        return f"postgresql://calm:{password}@127.0.0.1:{self.port}/{database}"

    def admin(self) -> psycopg.Connection:
        return psycopg.connect(self.url("postgres"), autocommit=True)


def _bindir() -> Path | None:
    """Where initdb and pg_ctl are: pg_config's bindir (Debian keeps them out of PATH), else the usual places."""
    candidates = []
    if shutil.which("pg_config"):
        found = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True)
        candidates.append(Path(found.stdout.strip()))
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    if shutil.which("initdb"):
        candidates.append(Path(str(shutil.which("initdb"))).parent)
    return next((d for d in candidates if (d / "initdb").is_file() and (d / "pg_ctl").is_file()), None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Server]:
    """A throwaway PostgreSQL cluster in a temporary directory, trusting local connections, on 127.0.0.1 only.
    initdb refuses to run as root, so as root the server runs as nobody."""
    bindir = _bindir()
    if bindir is None:
        _unavailable("PostgreSQL's server binaries (initdb, pg_ctl) are not installed (Debian: apt-get install "
                     "postgresql)")
    assert bindir is not None
    as_user: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="calm-pg-"))  # not under pytest's tmp: its parents are root-only
    if os.geteuid() == 0:
        as_user = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        if not shutil.which("setpriv"):
            shutil.rmtree(root)
            _unavailable("running as root and setpriv is missing, so initdb cannot run as an unprivileged user")
        os.chown(root, 65534, 65534)
    data, log, port = root / "data", root / "server.log", _free_port()
    options = (f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={root} -c fsync=off "
               "-c max_connections=60")
    try:
        subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(data), "-U", "calm", "--auth=trust", "-E",
                        "UTF8", "--no-sync"], check=True, capture_output=True, timeout=120)
        started = subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t",
                                  "60", "-o", options, "start"], capture_output=True, text=True, timeout=120)
        assert started.returncode == 0, f"{started.stderr}\n{log.read_text() if log.exists() else ''}"
        with psycopg.connect(f"postgresql://calm@127.0.0.1:{port}/postgres", autocommit=True) as conn:
            try:
                conn.execute("CREATE DATABASE icu_probe TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US'"
                             " LOCALE 'C'")
                icu = True
            except psycopg.Error:
                icu = False
        yield Server(port, icu)
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                       capture_output=True, timeout=120)
        shutil.rmtree(root, ignore_errors=True)


_names = itertools.count()


@pytest.fixture
def pg_url(pg_server: Server) -> str:
    """A fresh, empty database of its own, collated by ICU's en-US where the server has ICU (so 'a' < 'B'),
    as production databases often are; calm must still sort text by code point, as SQLite does."""
    name = f"kb{os.getpid()}_{next(_names)}"
    locale = "LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C'" if pg_server.icu else ""
    with pg_server.admin() as conn:
        conn.execute(f"CREATE DATABASE {name} TEMPLATE template0 {locale}")
    return pg_server.url(name)


def _raw(url: str) -> psycopg.Connection:
    return psycopg.connect(url, autocommit=True)


def _columns(conn: psycopg.Connection, schema: str = "public") -> dict[str, dict[str, str]]:
    found: dict[str, dict[str, str]] = {}
    for table, column, kind in conn.execute(
            "SELECT table_name, column_name, data_type FROM information_schema.columns WHERE table_schema = %s "
            "AND table_name = ANY(%s) ORDER BY table_name, ordinal_position", (schema, list(postgres.CALM_TABLES))):
        found.setdefault(table, {})[column] = kind
    return found


def _one_line(message: str, url: str) -> None:
    assert "\n" not in message.strip() and "Traceback" not in message, message
    assert postgres.masked(url) in message and PASSWORD not in message, message


# -- migrations -------------------------------------------------------------------------------------------


def test_every_migration_step_is_sqlites_translated(pg_server: Server) -> None:
    assert len(postgres.MIGRATIONS) == len(sqlite_kb.MIGRATIONS)
    name = f"steps{os.getpid()}"
    with pg_server.admin() as admin:
        admin.execute(f"CREATE DATABASE {name}")
    with _raw(pg_server.url(name)) as conn:
        for version in range(1, len(postgres.MIGRATIONS) + 1):
            conn.execute(f"CREATE SCHEMA v{version}")
            conn.execute(f"SET search_path TO v{version}")
            for step in postgres.MIGRATIONS[:version]:
                for statement in step:
                    conn.execute(statement)
            found, expected = _columns(conn, f"v{version}"), postgres.columns_at(version)
            assert found == expected
            assert {t: list(c) for t, c in found.items()} == {t: list(c) for t, c in expected.items()}  # in order


def test_an_empty_database_gets_the_whole_schema_and_a_second_open_changes_nothing(pg_url: str) -> None:
    with PostgresKnowledge(pg_url) as k:
        assert k.learned_version() == 0 and k.path == postgres.masked(pg_url) and PASSWORD not in k.path
    with _raw(pg_url) as conn:
        assert conn.execute("SELECT version FROM calm_schema_version").fetchall() == [(len(postgres.MIGRATIONS),)]
        columns = _columns(conn)
        assert columns == postgres.columns_at(len(postgres.MIGRATIONS))
        assert columns["observations"]["energy_estimated"] == "boolean"
        assert columns["calibration"]["embedding"] == "bytea" and columns["observations"]["ts"] == "double precision"
    PostgresKnowledge(pg_url).close()
    with _raw(pg_url) as conn:
        assert conn.execute("SELECT version FROM calm_schema_version").fetchall() == [(len(postgres.MIGRATIONS),)]
        assert _columns(conn) == columns
        assert conn.execute("SELECT value FROM meta").fetchall() == [(0,)]


def test_a_version_1_database_is_migrated_and_keeps_its_rows(pg_url: str) -> None:
    with _raw(pg_url) as conn:
        for statement in postgres.MIGRATIONS[0]:
            conn.execute(statement)
        conn.execute("CREATE TABLE calm_schema_version (version INTEGER NOT NULL)")
        conn.execute("INSERT INTO calm_schema_version VALUES (1)")
        fields = ", ".join(obs())
        conn.execute(f"INSERT INTO observations ({fields}) VALUES ({', '.join(['%s'] * len(obs()))})",
                     list(obs(request_id="old").values()))
    with PostgresKnowledge(pg_url) as k:
        assert [o["request_id"] for o in k.recent("smollm2-135m")] == ["old"]
        k.add_calibration([cal("m", "t", "1", 1.0, [1.0], confidence=0.5)])  # columns of steps 2 to 5
        assert k.learned_version() == 1
    with _raw(pg_url) as conn:
        assert conn.execute("SELECT version FROM calm_schema_version").fetchone() == (len(postgres.MIGRATIONS),)


# -- the same answers as SQLite ---------------------------------------------------------------------------


def _normal(value: Any) -> Any:
    """Comparable across backends: arrays as lists, floats to 9 digits (SQL sums in its own order), NaN named."""
    if isinstance(value, np.ndarray):
        return _normal(value.tolist())
    if isinstance(value, dict):
        return {k if isinstance(k, str) else repr(k): _normal(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_normal(v) for v in value]
    if isinstance(value, float):
        return "nan" if math.isnan(value) else round(value, 9)
    return value


def _scenario(kb: Knowledge) -> dict:
    """Every method of Knowledge, on data that reaches each column, default, ordering and NULL; returns what
    each answered."""
    out: dict[str, Any] = {}
    versions = [kb.learned_version()]
    kb.record(obs(ts=1.0, request_id="a"))
    kb.record_many([obs(ts=2.0, request_id="b", domain="code", confidence=0.8, cache_hit=True,
                        escalated_from="gemma3-270m", injected_slowdown=3.0, tokens_out=np.int64(5),
                        latency_ms=np.float32(99.5)),
                    obs(ts=3.0, request_id="c", error_code="prompt_too_long", ttft_ms=None, tokens_per_s=None),
                    obs(ts=4.0, request_id="d", model="gemma3-270m", energy_j=None, error_code="load_failed")])
    rng = np.random.default_rng(5)  # older than the rows above, so they lead `recent`
    kb.record_many([obs(ts=0.5 + i / 100, request_id=f"x{i}", latency_ms=float(v), energy_j=float(e), cache_hit=i % 2)
                    for i, (v, e) in enumerate(zip(rng.permutation(np.arange(1, 42) * 10.0), rng.random(41)))])
    out["recent"] = [kb.recent("smollm2-135m", window=5), kb.recent("smollm2-135m", window=2),
                     kb.recent("smollm2-135m", since_ts=2.0, window=3), kb.recent("no-such-model")]
    versions.append(kb.learned_version())  # observations alone do not move it

    kb.upsert_profile("m", "int4", "cpu", load_ms=500.0, tokens_per_s=40.0, energy_estimated=True, n_samples=10,
                      updated_at=10.0)
    kb.upsert_profile("m", "fp32", "cpu", tokens_per_s=20.0, updated_at=20.0, confidence=0.75)
    kb.upsert_profile("m", "int4", "cpu", tokens_per_s=np.float64(42.0), updated_at=5.0)
    kb.upsert_profile("B-model", "int4", "cuda", memory_mb=1.0, energy_estimated=False, joules_per_token=0.01,
                      ttft_ms=3.0, updated_at=1.0)
    kb.upsert_profile("a-model", "int4", "cuda", memory_mb=2.0, updated_at=2.0)
    versions.append(kb.learned_version())
    out["profile"] = [kb.profile("m"), kb.profile("m", "int4", "cpu"), kb.profile("m", provider="cpu",
                                                                                  precision="fp32"),
                      kb.profile("m", provider="cuda"), kb.profile("nope")]
    out["profiles"] = kb.profiles()

    kb.add_calibration([cal("a", "gsm8k", "B", 1.0, [0.0, 1.0, 0.0], domain="math", ts=1.0),
                        cal("a", "gsm8k", "a", 0.0, [1.0, 0.0, 0.0], domain="math", ts=2.0),
                        cal("b", "gsm8k", "a", 1.0, [1.0, 0.0, 0.0], domain="math", latency_ms=50.0, energy_j=2.0,
                            tokens_out=9, confidence=0.8, ts=3.0),
                        cal("b", "mbpp", 10, 0.5, [0.0, 0.0, 1.0], domain="code", ts=4.0),
                        cal("b", "mbpp", 9, 0.25, [0.5, 0.5, 0.0], ts=5.0),
                        cal("c", "_t", "_", 0.75, [0.25, -1.5, 3.0], domain="misc", ts=6.0)])
    kb.add_calibration([cal("a", "gsm8k", "a", 1.0, [1.0, 0.0, 0.0], domain="math", ts=7.0)])  # upsert on the key
    versions.append(kb.learned_version())
    out["calibration"] = [dataclasses.asdict(kb.calibration(models))
                          for models in (None, ["a", "never-scored"], ["nobody"])]
    out["domain_quality"] = sorted(kb.domain_quality().items(), key=repr)

    stats = kb.stats()
    assert stats["file_bytes"] > 0
    json.dumps(stats)  # `calm kb stats --json` prints it as is
    out["stats"] = {k: stats[k] for k in ("schema_version", "rows", "first_ts", "last_ts", "models")}
    buffer = io.StringIO()
    out["exported"] = kb.export(buffer)
    out["export"] = sorted(buffer.getvalue().splitlines())

    kb.reset()
    versions.append(kb.learned_version())
    out["after reset"] = [kb.stats()["rows"], kb.export(io.StringIO()), kb.profiles(), kb.recent("smollm2-135m")]
    kb.record(obs())  # the schema stayed
    out["after reset"].append(kb.recent("smollm2-135m"))
    out["learned_version"] = versions
    return _normal(out)


def test_every_method_answers_as_sqlites_does(pg_url: str, tmp_path: Path) -> None:
    with SQLiteKnowledge(tmp_path / "kb.sqlite") as lite:
        expected = _scenario(lite)
    with PostgresKnowledge(pg_url) as pg:
        got = _scenario(pg)
    for key in expected:
        assert got[key] == expected[key], key
    # and what SQLite answered is what was stored (not a shared mistake)
    assert [o["request_id"] for o in expected["recent"][0]] == ["c", "b", "a", "x40", "x39"]
    assert expected["recent"][0][1] == _normal({**OBSERVATION_DEFAULTS, **obs(ts=2.0, request_id="b", domain="code",
                                                confidence=0.8, cache_hit=True, escalated_from="gemma3-270m",
                                                injected_slowdown=3.0, tokens_out=5, latency_ms=99.5)})
    assert expected["calibration"][0]["items"] == [["_t", "_", "misc"], ["gsm8k", "B", "math"],
                                                   ["gsm8k", "a", "math"], ["mbpp", "10", "code"], ["mbpp", "9", None]]
    assert [p["model"] for p in expected["profiles"]] == ["B-model", "a-model", "m", "m"]
    assert expected["learned_version"] == [0, 0, 5, 7, 8]


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where a knowledge base shared by several handles lives, for the tests both backends must pass."""
    return str(tmp_path / "kb.sqlite") if request.param == "sqlite" else request.getfixturevalue("pg_url")


def _open(where: str, **kw: Any) -> Knowledge:
    return PostgresKnowledge(where, **kw) if where.startswith("postgresql://") else SQLiteKnowledge(Path(where), **kw)


def test_bad_rows_are_the_callers_error_not_the_stores(backend: str) -> None:
    said: list[str] = []
    with _open(backend, on_degraded=said.append) as k:
        with pytest.raises(ValueError, match="missing key"):
            k.record_many([obs(request_id="fine"), {"model": "x"}])
        with pytest.raises(ValueError, match=r"unknown key\(s\) tokens_per_sec"):
            k.upsert_profile("m", "int4", "cpu", tokens_per_sec=1.0)
        with pytest.raises((sqlite3.IntegrityError, psycopg.IntegrityError)):
            k.record_many([obs(request_id="fine"), obs(latency_ms=-1.0)])
        with pytest.raises((sqlite3.IntegrityError, psycopg.IntegrityError)):
            k.add_calibration([cal("a", "t", "1", 1.5, [1.0])])
        assert k.stats()["rows"] == {"observations": 0, "profiles": 0, "calibration": 0}  # none of each batch
        k.add_calibration([cal("a", "t", "1", 1.0, [1.0, 2.0]), cal("a", "t", "2", 1.0, [1.0, 2.0, 3.0])])
        assert k.degraded is None and said == []
    with _open(backend) as k, pytest.raises(KnowledgeError, match=r"different dimensions \[2, 3\]"):
        k.calibration()


def test_learned_version_moves_for_another_connection_with_profiles_and_calibration(backend: str) -> None:
    """Another router's loop reloads what was learned when this number moves."""
    with _open(backend) as mine, _open(backend) as theirs:
        start = mine.learned_version()
        theirs.record(obs())
        assert mine.learned_version() == start, "serving traffic alone must not force a reload"
        theirs.add_calibration([cal("m", "t", "1", 1.0, np.ones(4, np.float32))])
        after_calibration = mine.learned_version()
        assert after_calibration != start
        theirs.upsert_profile("m", "int4", "cpu", tokens_per_s=10.0)
        assert mine.learned_version() not in (start, after_calibration)
        before_reset = mine.learned_version()
        theirs.reset()
        assert mine.learned_version() != before_reset


# -- several processes at once ----------------------------------------------------------------------------

WRITERS, PER_WRITER, BATCH = 4, 200, 20


def _writer(url: str, worker: int, start: Event) -> None:
    start.wait()
    with PostgresKnowledge(url) as k:  # a fresh database: opening at once also races the migration
        n = 0
        while n < PER_WRITER:
            if n % 50 == 0:  # mostly one transaction per request, as `calm serve` records; some batches
                k.record_many([obs(ts=time.time(), request_id=f"{worker}-{n + j}", model=f"m{worker}")
                               for j in range(BATCH)])
                n += BATCH
            else:
                k.record(obs(ts=time.time(), request_id=f"{worker}-{n}", model=f"m{worker}"))
                n += 1
            if n == PER_WRITER // 2:  # every writer learns something too: the counter must lose no bump
                k.upsert_profile("shared", "int4", "cpu", tokens_per_s=float(worker))
                k.add_calibration([cal(f"m{worker}", "t", "1", 1.0, [1.0, 2.0])])


def test_concurrent_writer_processes_lose_no_row(pg_url: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    writers = [ctx.Process(target=_writer, args=(pg_url, w, start)) for w in range(WRITERS)]
    for p in writers:
        p.start()
    start.set()
    for p in writers:
        p.join(180)
    assert [p.exitcode for p in writers] == [0] * WRITERS, "a writer failed (its traceback is in captured stderr)"
    with PostgresKnowledge(pg_url) as k:
        s = k.stats()
        assert s["rows"] == {"observations": WRITERS * PER_WRITER, "profiles": 1, "calibration": WRITERS}
        assert {m: v["observations"] for m, v in s["models"].items()} == {f"m{w}": PER_WRITER for w in range(WRITERS)}
        ids = {o["request_id"] for w in range(WRITERS) for o in k.recent(f"m{w}", window=PER_WRITER)}
        assert len(ids) == WRITERS * PER_WRITER
        assert k.learned_version() == 2 * WRITERS


def _opener(url: str, start: Event, opening: Event) -> None:
    start.wait()
    opening.set()
    with PostgresKnowledge(url) as k:
        assert k.learned_version() == 0


def test_processes_opening_a_fresh_database_at_once_migrate_it_once(pg_url: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    start, opening = ctx.Event(), ctx.Event()
    openers = [ctx.Process(target=_opener, args=(pg_url, start, opening)) for _ in range(4)]
    for p in openers:
        p.start()
    start.set()
    for p in openers:
        p.join(120)
    assert [p.exitcode for p in openers] == [0] * 4, "an opener failed (its traceback is in captured stderr)"
    with _raw(pg_url) as conn:
        assert conn.execute("SELECT version FROM calm_schema_version").fetchall() == [(len(postgres.MIGRATIONS),)]
        assert conn.execute("SELECT key, value FROM meta").fetchall() == [("learned_version", 0)]


def test_opening_waits_for_the_migration_lock(pg_url: str) -> None:
    """Another process migrating holds the advisory lock: an opener waits for it instead of racing it."""
    ctx = multiprocessing.get_context("spawn")
    start, opening = ctx.Event(), ctx.Event()
    with _raw(pg_url) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (postgres.MIGRATION_LOCK,))
        opener = ctx.Process(target=_opener, args=(pg_url, start, opening))
        opener.start()
        start.set()
        assert opening.wait(60)
        time.sleep(1.5)
        assert opener.is_alive(), "the opener did not wait for the lock"
        assert holder.execute("SELECT to_regclass('calm_schema_version')").fetchone() == (None,)
        holder.execute("SELECT pg_advisory_unlock(%s)", (postgres.MIGRATION_LOCK,))
        opener.join(60)
    assert opener.exitcode == 0


# -- a server that is down or lost, tables that cannot serve ----------------------------------------------


def _in_memory_learning_goes_on(k: Knowledge) -> None:
    k.record(obs(request_id="after", model="learned-in-memory"))
    k.upsert_profile("learned-in-memory", "fp32", "cpu", tokens_per_s=3.0)
    k.add_calibration([cal("learned-in-memory", "t", "1", 1.0, [1.0])])
    assert [o["request_id"] for o in k.recent("learned-in-memory")] == ["after"]
    assert k.profile("learned-in-memory")["tokens_per_s"] == 3.0
    assert k.calibration().embeddings.shape == (1, 1)


def test_a_server_that_is_down_is_one_line_and_degraded_mode_goes_on_in_memory() -> None:
    url = f"postgresql://calm:{PASSWORD}@127.0.0.1:{_free_port()}/calm"
    with pytest.raises(KnowledgeError) as err:
        PostgresKnowledge(url)
    message = str(err.value)
    _one_line(message, url)
    assert "cannot use the PostgreSQL server" in message and "Connection refused" in message, message
    assert "check that the PostgreSQL server is running" in message and not err.value.resettable
    said: list[str] = []
    with PostgresKnowledge(url, on_degraded=said.append) as k:
        assert k.degraded == message
        _in_memory_learning_goes_on(k)
    assert len(said) == 1 and said[0] == f"calm: degraded mode, answering without keeping what is learned: {message}"


def test_without_psycopg_calm_kb_url_is_refused_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"postgresql://calm:{PASSWORD}@127.0.0.1:5432/calm"
    monkeypatch.setattr(postgres, "psycopg", None)
    with pytest.raises(KnowledgeError, match="psycopg is not installed") as err:
        PostgresKnowledge(url)
    _one_line(str(err.value), url)
    assert "pip install 'calm-cli[postgres]'" in str(err.value) and not err.value.resettable
    said: list[str] = []
    with PostgresKnowledge(url, on_degraded=said.append) as k:
        _in_memory_learning_goes_on(k)
    assert len(said) == 1 and "psycopg is not installed" in said[0]


@pytest.mark.parametrize("url, expected", [
    (f"postgresql://calm:{PASSWORD}@127.0.0.1:notaport/calm", 'invalid integer value "notaport"'),
    (f"postgresql://calm:{PASSWORD}@[::1/calm", "not a usable PostgreSQL URL"),
    (f"postgresql://calm:{PASSWORD}@127.0.0.1:5432/calm?nonsense=1", 'invalid URI query parameter: "nonsense"'),
])
def test_a_bad_url_is_one_line_without_the_password(url: str, expected: str) -> None:
    with pytest.raises(KnowledgeError) as err:
        PostgresKnowledge(url)
    _one_line(str(err.value), url)
    assert expected in str(err.value) and not err.value.resettable


def test_a_missing_database_is_named(pg_server: Server) -> None:
    url = pg_server.url("no_such_database")
    with pytest.raises(KnowledgeError, match='database "no_such_database" does not exist') as err:
        PostgresKnowledge(url)
    _one_line(str(err.value), url)
    assert not err.value.resettable


def _terminate(url: str) -> None:
    """What a server restart or an administrator does to calm's connections to this database (waiting up to 5 s
    for them to be gone)."""
    with _raw(url) as conn:
        conn.execute("SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE application_name = 'calm' "
                     "AND datname = current_database() AND pid <> pg_backend_pid()")


def test_a_connection_lost_mid_run(pg_url: str) -> None:
    with PostgresKnowledge(pg_url) as strict:
        strict.record(obs(request_id="kept"))
        _terminate(pg_url)
        with pytest.raises(KnowledgeError) as err:
            strict.record(obs(request_id="lost"))
        _one_line(str(err.value), pg_url)
        assert "cannot use the PostgreSQL server" in str(err.value) and not err.value.resettable
    said: list[str] = []
    with PostgresKnowledge(pg_url, on_degraded=said.append) as k:
        k.record(obs(request_id="kept too"))
        _terminate(pg_url)
        k.record(obs(request_id="in memory"))
        assert k.degraded is not None and "cannot use the PostgreSQL server" in k.degraded
        _one_line(k.degraded, pg_url)
        assert [o["request_id"] for o in k.recent("smollm2-135m")] == ["in memory"]
        _in_memory_learning_goes_on(k)
    assert len(said) == 1
    with PostgresKnowledge(pg_url) as k:
        assert {o["request_id"] for o in k.recent("smollm2-135m")} == {"kept", "kept too"}


def _drop_column(conn: psycopg.Connection) -> None:
    conn.execute("ALTER TABLE calibration DROP COLUMN confidence")


def _drop_table(conn: psycopg.Connection) -> None:
    conn.execute("DROP TABLE profiles")


def _newer(conn: psycopg.Connection) -> None:
    conn.execute(f"UPDATE calm_schema_version SET version = {len(postgres.MIGRATIONS) + 3}")


def _retyped(conn: psycopg.Connection) -> None:
    conn.execute("ALTER TABLE observations ALTER COLUMN ttft_ms TYPE text")


DAMAGE = {"dropped column": (_drop_column, "column calibration.confidence is missing"),
          "dropped table": (_drop_table, "table profiles is missing"),
          "retyped column": (_retyped, "column observations.ttft_ms is text, not double precision"),
          "newer schema": (_newer, f"knowledge base schema version {len(postgres.MIGRATIONS) + 3}, but this calm")}


def _kb_cli(url: str, tmp_path: Path, *args: str, stdin: str | None = None):
    result = CliRunner().invoke(main, ["kb", *args], input=stdin,
                                env={"CALM_KB_URL": url, "CALM_DATA_DIR": str(tmp_path / "data")})
    # CliRunner catches any exception: only SystemExit (calm's own exits) is acceptable
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


@pytest.mark.parametrize("kind", DAMAGE)
def test_tables_that_cannot_serve_are_refused_and_kb_reset_makes_them_afresh(kind: str, pg_url: str,
                                                                          tmp_path: Path) -> None:
    with PostgresKnowledge(pg_url) as k:
        k.record(obs())
    with _raw(pg_url) as conn:
        DAMAGE[kind][0](conn)
    with pytest.raises(KnowledgeError) as err:
        PostgresKnowledge(pg_url)
    _one_line(str(err.value), pg_url)
    assert DAMAGE[kind][1] in str(err.value) and err.value.resettable and "calm kb reset --yes" in str(err.value)
    said: list[str] = []
    with PostgresKnowledge(pg_url, on_degraded=said.append) as k:
        _in_memory_learning_goes_on(k)
    assert len(said) == 1 and DAMAGE[kind][1] in said[0]

    stats = _kb_cli(pg_url, tmp_path, "stats")
    assert stats.exit_code == 1 and stats.stderr.startswith(f"calm: {postgres.masked(pg_url)}: ")
    asked = _kb_cli(pg_url, tmp_path, "reset", stdin="n\n")
    assert asked.exit_code == 1 and f"{DAMAGE[kind][1]}" in asked.output
    assert "Drop calm's tables and make them afresh?" in asked.output
    result = _kb_cli(pg_url, tmp_path, "reset", "--yes")
    assert result.exit_code == 0, result.output
    assert result.stderr.startswith(f"kb: {DAMAGE[kind][1]}") and "\n" not in result.stderr.strip()
    assert f"dropped calm's tables at {postgres.masked(pg_url)} and made them afresh" in result.stderr
    with PostgresKnowledge(pg_url) as k:
        assert k.stats()["rows"] == {"observations": 0, "profiles": 0, "calibration": 0}


def test_someone_elses_tables_are_refused_and_never_dropped(pg_url: str, tmp_path: Path) -> None:
    with _raw(pg_url) as conn:
        conn.execute("CREATE TABLE observations (id integer, what text)")
        conn.execute("INSERT INTO observations VALUES (1, 'theirs')")
    with pytest.raises(KnowledgeError, match="table\\(s\\) observations but no calm_schema_version") as err:
        PostgresKnowledge(pg_url)
    _one_line(str(err.value), pg_url)
    assert not err.value.resettable and "calm kb reset" not in str(err.value)
    result = _kb_cli(pg_url, tmp_path, "reset", "--yes")
    assert result.exit_code == 1 and "so not calm's" in result.stderr
    with _raw(pg_url) as conn:
        assert conn.execute("SELECT * FROM observations").fetchall() == [(1, "theirs")]


# -- CALM_KB_URL: the setting, `calm kb` and serving ------------------------------------------------------


def test_kb_commands_use_calm_kb_url(pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CALM_KB_URL", pg_url)
    with open_knowledge() as k:
        assert isinstance(k, PostgresKnowledge)
        k.record_many([obs(request_id="a"), obs(request_id="b", model="gemma3-270m", error_code="timeout")])
        k.upsert_profile("smollm2-135m", "int4", "cpu", tokens_per_s=40.0)
    with open_knowledge(tmp_path / "explicit.sqlite") as k:  # an explicit path is a SQLite file still
        assert isinstance(k, SQLiteKnowledge)
    result = _kb_cli(pg_url, tmp_path, "stats", "--json")
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout)
    assert stats["path"] == postgres.masked(pg_url) and PASSWORD not in result.output
    assert stats["rows"] == {"observations": 2, "profiles": 1, "calibration": 0}
    assert stats["models"]["gemma3-270m"]["error_rate"] == 1.0 and stats["schema_version"] == len(postgres.MIGRATIONS)
    table = _kb_cli(pg_url, tmp_path, "stats")
    assert table.exit_code == 0 and table.stdout.startswith(f"{postgres.masked(pg_url)} (schema v")
    shown = _kb_cli(pg_url, tmp_path, "show")
    assert shown.exit_code == 0 and "smollm2-135m" in shown.stdout
    exported = _kb_cli(pg_url, tmp_path, "export")
    assert exported.exit_code == 0 and len(exported.stdout.splitlines()) == 3
    reset = _kb_cli(pg_url, tmp_path, "reset", "--yes")
    assert reset.exit_code == 0 and reset.stderr == f"kb: dropped calm's tables at {postgres.masked(pg_url)} and " \
                                                    "made them afresh\n"
    assert json.loads(_kb_cli(pg_url, tmp_path, "stats", "--json").stdout)["rows"]["observations"] == 0
    assert not (tmp_path / "data" / sqlite_kb.FILENAME).exists()  # no SQLite file was made beside it


def test_calm_kb_url_is_secret_and_only_takes_postgresql_urls(calm_home: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CALM_KB_URL", raising=False)
    assert settings.get("kb_url") == "" and settings.SETTINGS["kb_url"].secret
    for url in (f"postgresql://calm:{PASSWORD}@127.0.0.1:5432/db", f"postgres://calm:{PASSWORD}@h/db"):
        monkeypatch.setenv("CALM_KB_URL", url)
        assert settings.get("kb_url") == url and settings.problems() == []
    rows = {r["env"]: r for r in json.loads(CliRunner().invoke(main, ["settings", "--json"]).stdout)}
    assert rows["CALM_KB_URL"]["value"] == "(set)" and rows["CALM_KB_URL"]["problem"] is None
    monkeypatch.setenv("CALM_KB_URL", f"mysql://calm:{PASSWORD}@h/db")
    assert settings.problems() == ["CALM_KB_URL (set, not shown) is not valid: expected a postgresql:// or "
                                   "postgres:// URL (postgresql://user:password@host:5432/db), or nothing for the "
                                   "SQLite file in the data directory"]
    result = CliRunner().invoke(main, ["kb", "stats"])
    assert result.exit_code == 2 and PASSWORD not in result.output and "CALM_KB_URL" in result.stderr
    listed = CliRunner().invoke(main, ["settings"])
    assert PASSWORD not in listed.output and "INVALID" in listed.output


def test_route_records_into_postgresql_and_degrades_when_it_is_down(pg_url: str, tiny_env: dict) -> None:
    """The serving commands share what they observe through CALM_KB_URL, and answer without it when it fails."""
    args = [sys.executable, "-m", "calm_cli", "route", "--json", "--model", "smollm2-135m", "--max-tokens", "4", "hi"]
    shared = subprocess.run(args, env={**tiny_env, "CALM_KB_URL": pg_url}, capture_output=True, timeout=300)
    assert shared.returncode == 0, shared.stderr.decode()
    assert "knowledge" not in json.loads(shared.stdout) and b"degraded" not in shared.stderr
    with PostgresKnowledge(pg_url) as k:
        assert k.recent("smollm2-135m")

    down = f"postgresql://calm:{PASSWORD}@127.0.0.1:{_free_port()}/calm"
    alone = subprocess.run(args, env={**tiny_env, "CALM_KB_URL": down}, capture_output=True, timeout=300)
    stderr = alone.stderr.decode()
    assert alone.returncode == 0 and "Traceback" not in stderr, stderr
    record = json.loads(alone.stdout)
    assert record["error"] is None and record["knowledge"].startswith(f"degraded: {postgres.masked(down)}: ")
    assert PASSWORD not in stderr + alone.stdout.decode()
    assert sum("degraded mode" in line for line in stderr.splitlines()) == 1


def test_two_calm_serve_routers_share_what_they_learn(pg_url: str, tiny_env: dict) -> None:
    """Two `calm serve` routers on one PostgreSQL knowledge base: what router A observed about a member is in
    router B's predictions for it before B has run it once."""
    from test_http import start

    env = tiny_env | {"CALM_KB_URL": pg_url}
    a, b = start(env), start(env)
    try:
        for i in range(3):
            reply = a.client().chat.completions.create(model="gemma3-270m", max_tokens=4,
                                                       messages=[{"role": "user", "content": f"Hello {i}"}])
            assert reply.model == "gemma3-270m"
        routed = b.client().chat.completions.create(model="calm", max_tokens=4,
                                                    messages=[{"role": "user", "content": "Hello again"}])
        candidates = {c["model"]: c for c in routed.model_extra["calm"]["routing"]["candidates"]}
        assert candidates["gemma3-270m"]["latency_ms"] is not None  # predicted from A's three runs
        never = [m for m, c in candidates.items() if m not in ("gemma3-270m", routed.model)]
        assert all(candidates[m]["latency_ms"] is None for m in never)  # nobody ran these: nothing to share
    finally:
        assert a.stop() == 0 and b.stop() == 0
