"""The knowledge base: schema migrations, refusals, round trips, derived views and concurrent processes; damaged,
foreign and unusable files (real SQLite files, damaged for real) through SQLiteKnowledge, through `calm kb` and
through the serving commands' degraded mode on the tiny fleet."""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Callable

import jsonschema
import numpy as np
import pytest
from click.testing import CliRunner

from calm_cli.knowledge import sqlite as knowledge
from calm_cli import policy as policies
from calm_cli.cli import main
from calm_cli.fleet.store import Store
from calm_cli.knowledge import KnowledgeError
from calm_cli.knowledge.base import OBSERVATION_DEFAULTS
from calm_cli.knowledge.sqlite import SQLiteKnowledge
from calm_cli.loop.assemble import assemble
from calm_cli.resources import SCHEMAS


def obs(**over: object) -> dict:
    """A complete observation; keyword arguments override fields."""
    base = {"ts": 1000.0, "request_id": "r1", "policy": "default", "model": "smollm2-135m", "latency_ms": 120.0,
            "ttft_ms": 30.0, "queue_ms": 1.0, "load_ms": 0.0, "tokens_in": 12, "tokens_out": 8,
            "tokens_per_s": 66.0, "energy_j": 1.5, "energy_estimated": True, "memory_mb": 300.0,
            "cache_hit": False, "provider": "cpu"}
    return {**base, **over}


def cal(model: str, task: str, item: str, score: float, embedding: list[float], **over: object) -> dict:
    return {"model": model, "task": task, "item_id": item, "score": score, "embedding": np.array(embedding),
            **over}


@pytest.fixture
def kb(tmp_path: Path) -> SQLiteKnowledge:
    with SQLiteKnowledge(tmp_path / "kb.sqlite") as k:
        yield k


def _raw(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None)


def _tables(path: Path) -> set[str]:
    with _raw(path) as conn:
        return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


# -- opening, migrations and refusals ---------------------------------------------------------------------


def test_default_path_follows_data_dir_and_parents_are_created(calm_home: Path) -> None:
    with SQLiteKnowledge() as k:
        assert k.path == calm_home / "data" / "knowledge.sqlite"
    assert k.path.is_file()


def test_empty_file_gets_the_whole_schema_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dir" / "kb.sqlite"
    with SQLiteKnowledge(path) as k:
        assert k.stats()["schema_version"] == len(knowledge.MIGRATIONS)
        assert k._conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert set(knowledge.TABLES) <= _tables(path)
    with _raw(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(knowledge.MIGRATIONS)
        columns = [r[1] for r in conn.execute("PRAGMA table_info(observations)")]
    assert sorted(columns) == sorted(("id", *knowledge.OBSERVATION_FIELDS))
    wal = path.with_name(path.name + "-wal")
    before = (path.read_bytes(), wal.read_bytes() if wal.exists() else None)
    SQLiteKnowledge(path).close()  # reopening an up-to-date file changes nothing
    assert (path.read_bytes(), wal.read_bytes() if wal.exists() else None) == before


def test_a_version_1_file_is_migrated_and_keeps_its_rows(tmp_path: Path) -> None:
    assert len(knowledge.MIGRATIONS) > 1
    path = tmp_path / "old.sqlite"
    with _raw(path) as conn:
        for statement in knowledge.MIGRATIONS[0]:
            conn.execute(statement)
        conn.execute("PRAGMA user_version = 1")
        row = obs(request_id="from-v1")
        conn.execute(f"INSERT INTO observations ({', '.join(row)}) VALUES ({', '.join('?' for _ in row)})",
                     list(row.values()))
    assert "calibration" not in _tables(path)
    with SQLiteKnowledge(path) as k:
        assert k.stats()["schema_version"] == len(knowledge.MIGRATIONS)
        assert [o["request_id"] for o in k.recent("smollm2-135m")] == ["from-v1"]
        k.add_calibration([cal("m", "t", "1", 1.0, [1.0, 0.0])])
        assert k.domain_quality() == {("m", None): (1.0, 1)}


def test_migration_steps_apply_in_one_transaction(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "kb.sqlite"
    broken = (*knowledge.MIGRATIONS, ("CREATE TABLE extra (a)", "INSERT INTO no_such_table VALUES (1)"))
    monkeypatch.setattr(knowledge, "MIGRATIONS", broken)
    with pytest.raises(KnowledgeError, match="no such table: no_such_table") as err:
        SQLiteKnowledge(path)
    assert isinstance(err.value.__cause__, sqlite3.OperationalError)
    assert _tables(path) == set()
    with _raw(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 0


def test_a_file_from_a_newer_calm_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "kb.sqlite"
    SQLiteKnowledge(path).close()
    newer = len(knowledge.MIGRATIONS) + 3
    with _raw(path) as conn:
        conn.execute(f"PRAGMA user_version = {newer}")
    with pytest.raises(KnowledgeError) as err:
        SQLiteKnowledge(path)
    message = str(err.value)
    assert str(path) in message and f"version {newer}" in message and f"version {len(knowledge.MIGRATIONS)}" in message


def test_a_file_that_is_not_sqlite_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "kb.sqlite"
    path.write_bytes(b"these are not the pages you are looking for\n" * 200)
    with pytest.raises(KnowledgeError, match="not an SQLite database") as err:
        SQLiteKnowledge(path)
    assert str(path) in str(err.value)
    assert path.read_bytes().startswith(b"these are not")


def test_someone_elses_sqlite_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "kb.sqlite"
    with _raw(path) as conn:
        conn.execute("CREATE TABLE theirs (x)")
    with pytest.raises(KnowledgeError, match="not a calm knowledge base") as err:
        SQLiteKnowledge(path)
    assert str(path) in str(err.value)
    assert _tables(path) == {"theirs"}


# -- observations -----------------------------------------------------------------------------------------


def test_record_and_recent_round_trip(kb: SQLiteKnowledge) -> None:
    first = obs(ts=1.0, request_id="a")
    second = obs(ts=2.0, request_id="b", domain="code", confidence=0.8, cache_hit=True, escalated_from="gemma3-270m",
                 injected_slowdown=3.0, tokens_out=np.int64(5), latency_ms=np.float32(99.5))
    failed = obs(ts=3.0, request_id="c", error_code="prompt_too_long", ttft_ms=None, tokens_per_s=None)
    kb.record(first)
    kb.record_many([second, failed])
    kb.record(obs(ts=4.0, request_id="other", model="gemma3-270m"))
    got = kb.recent("smollm2-135m")
    assert [o["request_id"] for o in got] == ["c", "b", "a"]  # newest first, errors included
    assert got[2] == {**OBSERVATION_DEFAULTS, **first}
    assert got[1]["cache_hit"] is True and got[1]["energy_estimated"] is True and got[1]["tokens_out"] == 5
    assert got[1]["injected_slowdown"] == 3.0 and got[1]["domain"] == "code" and got[1]["latency_ms"] == 99.5
    assert got[0]["error_code"] == "prompt_too_long" and got[0]["ttft_ms"] is None
    assert got[2]["injected_slowdown"] == 1.0 and got[2]["domain"] is None
    assert [o["request_id"] for o in kb.recent("smollm2-135m", window=2)] == ["c", "b"]
    assert [o["request_id"] for o in kb.recent("smollm2-135m", since_ts=2.0)] == ["c", "b"]
    assert kb.recent("no-such-model") == []


def test_record_names_unknown_and_missing_keys(kb: SQLiteKnowledge) -> None:
    bad = obs(latncy_ms=1.0)
    del bad["provider"], bad["ts"]
    with pytest.raises(ValueError) as err:
        kb.record(bad)
    assert "unknown key(s) latncy_ms" in str(err.value) and "missing key(s) provider, ts" in str(err.value)
    with pytest.raises(ValueError, match="missing key"):
        kb.record_many([obs(request_id="fine"), {"model": "x"}])
    assert kb.stats()["rows"]["observations"] == 0  # one bad row stores none of the batch


def test_profiles_upsert_merge_and_pick_the_newest(kb: SQLiteKnowledge) -> None:
    kb.upsert_profile("m", "int4", "cpu", load_ms=500.0, tokens_per_s=40.0, energy_estimated=True, n_samples=10,
                      updated_at=10.0)
    kb.upsert_profile("m", "fp32", "cpu", tokens_per_s=20.0, updated_at=20.0)
    kb.upsert_profile("m", "int4", "cpu", tokens_per_s=np.float64(42.0), updated_at=5.0)
    p = kb.profile("m", "int4", "cpu")
    assert p is not None
    assert (p["tokens_per_s"], p["load_ms"], p["n_samples"], p["energy_estimated"]) == (42.0, 500.0, 10, True)
    assert kb.profile("m")["precision"] == "fp32"
    assert kb.profile("m", provider="cpu", precision="int4")["updated_at"] == 5.0
    assert kb.profile("m", provider="cuda") is None and kb.profile("nope") is None
    assert [(p["model"], p["precision"]) for p in kb.profiles()] == [("m", "fp32"), ("m", "int4")]
    before = time.time()
    kb.upsert_profile("n", "int4", "cuda", memory_mb=1.0)
    assert kb.profile("n")["updated_at"] >= before
    with pytest.raises(ValueError, match="unknown key\\(s\\) tokens_per_sec"):
        kb.upsert_profile("m", "int4", "cpu", tokens_per_sec=1.0)


# -- calibration ------------------------------------------------------------------------------------------


def test_calibration_matrix_has_nan_where_a_model_was_not_scored(kb: SQLiteKnowledge) -> None:
    kb.add_calibration([
        cal("a", "gsm8k", "2", 1.0, [0.0, 1.0, 0.0], domain="math"),
        cal("a", "gsm8k", "1", 0.0, [1.0, 0.0, 0.0], domain="math"),
        cal("b", "gsm8k", "1", 1.0, [1.0, 0.0, 0.0], domain="math", latency_ms=50.0, energy_j=2.0, tokens_out=9,
            confidence=0.8),
        cal("b", "mbpp", 7, 0.5, [0.0, 0.0, 1.0], domain="code"),
    ])
    cs = kb.calibration()
    assert cs.embeddings.shape == (3, 3) and cs.embeddings.dtype == np.float32
    assert cs.items == [("gsm8k", "1", "math"), ("gsm8k", "2", "math"), ("mbpp", "7", "code")]
    np.testing.assert_array_equal(cs.embeddings, np.eye(3, dtype=np.float32))
    assert set(cs.scores) == {"a", "b"}
    np.testing.assert_array_equal(cs.scores["a"], [0.0, 1.0, np.nan])
    np.testing.assert_array_equal(cs.scores["b"], [1.0, np.nan, 0.5])
    np.testing.assert_array_equal(cs.confidence["b"], [0.8, np.nan, np.nan])  # unknown confidence is NaN

    only_a = kb.calibration(["a", "never-scored"])
    assert only_a.items == [("gsm8k", "1", "math"), ("gsm8k", "2", "math")]
    assert only_a.embeddings.shape == (2, 3)
    assert np.isnan(only_a.scores["never-scored"]).all() and only_a.scores["never-scored"].shape == (2,)

    kb.add_calibration([cal("a", "gsm8k", "1", 1.0, [1.0, 0.0, 0.0], domain="math")])  # upsert on the key
    assert kb.stats()["rows"]["calibration"] == 4
    assert kb.calibration(["a"]).scores["a"][0] == 1.0

    empty = kb.calibration(["nobody"])
    assert empty.embeddings.shape == (0, 0) and empty.items == [] and empty.scores["nobody"].shape == (0,)


def test_calibration_rejects_bad_rows(kb: SQLiteKnowledge) -> None:
    with pytest.raises(ValueError, match="missing key\\(s\\) embedding"):
        kb.add_calibration([{"model": "a", "task": "t", "item_id": "1", "score": 1.0}])
    with pytest.raises(ValueError, match="non-empty vector"):
        kb.add_calibration([cal("a", "t", "1", 1.0, [[1.0, 2.0]])])
    with pytest.raises(sqlite3.IntegrityError):
        kb.add_calibration([cal("a", "t", "1", 1.5, [1.0])])
    with pytest.raises(sqlite3.IntegrityError):
        kb.add_calibration([cal("a", "t", "1", 1.0, [1.0], confidence=1.2)])
    kb.add_calibration([cal("a", "t", "1", 1.0, [1.0, 2.0]), cal("a", "t", "2", 1.0, [1.0, 2.0, 3.0])])
    with pytest.raises(KnowledgeError, match="different dimensions \\[2, 3\\]"):
        kb.calibration()


def test_domain_quality_is_the_mean_score_per_model_and_domain(kb: SQLiteKnowledge) -> None:
    rng = np.random.default_rng(0)
    rows, expected = [], {}
    for model in ("a", "b"):
        for domain in ("math", "code", None):
            scores = rng.integers(0, 2, size=7).astype(float)
            expected[(model, domain)] = (float(scores.mean()), 7)
            rows += [cal(model, f"task-{domain}", str(i), s, [1.0], domain=domain) for i, s in enumerate(scores)]
    kb.add_calibration(rows)
    got = kb.domain_quality()
    assert got.keys() == expected.keys()
    for key, (mean, n) in expected.items():
        assert got[key][0] == pytest.approx(mean) and got[key][1] == n


# -- stats, export, reset ---------------------------------------------------------------------------------


def test_stats_percentiles_and_means_count_successful_requests(kb: SQLiteKnowledge) -> None:
    # 101 successful latencies 10, 20, ..., 1010 ms in shuffled order: the median is the 51st smallest (510 ms)
    # and the 95th percentile the 96th smallest (960 ms). Energies 0.5 .. 1.5 J, symmetric about 1.0 J.
    rng = np.random.default_rng(1)
    latencies = rng.permutation(np.arange(1, 102) * 10.0)
    energies = 1.0 + (np.arange(101) - 50) / 100
    rows = [obs(ts=100.0 + i, request_id=str(i), latency_ms=float(l), energy_j=float(e))
            for i, (l, e) in enumerate(zip(latencies, energies))]
    rows += [obs(ts=50.0, request_id="err1", latency_ms=99999.0, energy_j=1000.0, error_code="timeout"),
             obs(ts=300.0, request_id="err2", latency_ms=99999.0, error_code="oom")]
    rows += [obs(ts=10.0, model="gemma3-270m", latency_ms=5.0, energy_j=None, error_code="load_failed")]
    kb.record_many(rows)
    kb.upsert_profile("smollm2-135m", "int4", "cpu", tokens_per_s=1.0)
    s = kb.stats()
    assert s["rows"] == {"observations": 104, "profiles": 1, "calibration": 0}
    assert (s["first_ts"], s["last_ts"]) == (10.0, 300.0)
    assert s["path"] == str(kb.path) and s["file_bytes"] > 0 and s["schema_version"] == len(knowledge.MIGRATIONS)
    m = s["models"]["smollm2-135m"]
    assert m["observations"] == 103 and m["errors"] == 2 and m["error_rate"] == pytest.approx(2 / 103)
    assert m["p50_latency_ms"] == pytest.approx(510.0)
    assert m["p95_latency_ms"] == pytest.approx(960.0)
    assert m["mean_energy_j"] == pytest.approx(1.0)
    g = s["models"]["gemma3-270m"]
    assert g["error_rate"] == 1.0 and g["p50_latency_ms"] is None and g["mean_energy_j"] is None
    json.dumps(s)  # `calm kb stats --json` can print it as is


def test_export_writes_every_row_and_reset_empties_every_table(kb: SQLiteKnowledge) -> None:
    kb.record_many([obs(request_id="a"), obs(request_id="b", cache_hit=True)])
    kb.upsert_profile("smollm2-135m", "int4", "cpu", tokens_per_s=40.0, energy_estimated=False)
    kb.add_calibration([cal("a", "t", "1", 1.0, [0.25, -1.5]), cal("b", "t", "1", 0.0, [0.25, -1.5])])
    buffer = io.StringIO()
    assert kb.export(buffer) == 5
    lines = [json.loads(line) for line in buffer.getvalue().splitlines()]
    assert [line["table"] for line in lines] == ["observations"] * 2 + ["profiles"] + ["calibration"] * 2
    expected = {"table": "observations", **OBSERVATION_DEFAULTS, **obs(request_id="b", cache_hit=True)}
    assert lines[1] == expected
    assert lines[2]["energy_estimated"] is False and lines[2]["tokens_per_s"] == 40.0
    assert lines[3]["embedding"] == [0.25, -1.5] and lines[3]["dim"] == 2

    kb.reset()
    assert kb.stats()["rows"] == {t: 0 for t in knowledge.TABLES}
    assert kb.export(io.StringIO()) == 0
    kb.record(obs())  # the schema stayed
    assert len(kb.recent("smollm2-135m")) == 1


# -- several processes at once ----------------------------------------------------------------------------

WRITERS, PER_WRITER, BATCH = 4, 300, 25


def _writer(path: str, worker: int, start: Event) -> None:
    start.wait()
    with SQLiteKnowledge(Path(path)) as k:  # opening a fresh file at once also races the migration
        n = 0
        while n < PER_WRITER:
            if n % 100 == 0:  # mostly one transaction per request, as `calm serve` records; some batches
                k.record_many([obs(ts=time.time(), request_id=f"{worker}-{n + j}", model=f"m{worker}")
                               for j in range(BATCH)])
                n += BATCH
            else:
                k.record(obs(ts=time.time(), request_id=f"{worker}-{n}", model=f"m{worker}"))
                n += 1


def _reader(path: str, start: Event, done: Event) -> None:
    start.wait()
    last, reads = 0, 0
    while not done.is_set() or reads == 0:
        with SQLiteKnowledge(Path(path)) as k:  # open and close repeatedly, as short-lived `calm kb` commands do
            for _ in range(20):
                count = k.stats()["rows"]["observations"]
                assert count >= last, "a reader saw the count go down"
                last = count
                k.recent("m0", window=50)
                reads += 1


def test_concurrent_writers_and_a_reader_share_one_file(tmp_path: Path) -> None:
    path = str(tmp_path / "shared" / "kb.sqlite")
    ctx = multiprocessing.get_context("spawn")
    start, done = ctx.Event(), ctx.Event()
    writers = [ctx.Process(target=_writer, args=(path, w, start)) for w in range(WRITERS)]
    reader = ctx.Process(target=_reader, args=(path, start, done))
    for p in (*writers, reader):
        p.start()
    start.set()
    for p in writers:
        p.join(120)
    done.set()
    reader.join(60)
    assert [p.exitcode for p in writers] == [0] * WRITERS, "a writer failed (its traceback is in captured stderr)"
    assert reader.exitcode == 0, "the reader failed (its traceback is in the captured stderr)"
    with SQLiteKnowledge(Path(path)) as k:
        s = k.stats()
        assert s["rows"]["observations"] == WRITERS * PER_WRITER
        assert {m: v["observations"] for m, v in s["models"].items()} == {f"m{w}": PER_WRITER for w in range(WRITERS)}
        ids = {o["request_id"] for w in range(WRITERS) for o in k.recent(f"m{w}", window=PER_WRITER)}
        assert len(ids) == WRITERS * PER_WRITER


# -- damaged, foreign and unusable files ------------------------------------------------------------------

NEWER = len(knowledge.MIGRATIONS) + 3
MODELS = ("smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b")


@pytest.fixture(scope="module")
def filled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real knowledge base of about 1.6 MB, written in turns so that every table's pages are spread through
    the file (damage in its middle then reaches each table)."""
    path = tmp_path_factory.mktemp("filled") / "knowledge.sqlite"
    rng = np.random.default_rng(2)
    with SQLiteKnowledge(path) as k:
        for turn in range(30):
            k.record_many([obs(ts=float(turn * 100 + i), request_id=f"{turn}-{i}") for i in range(100)])
            k.add_calibration([cal("smollm2-135m", "t", f"{turn}-{i}", float(i % 2), rng.standard_normal(384),
                                   domain="math") for i in range(20)])
            k.upsert_profile(MODELS[turn % 4], "fp32", f"provider-{turn}", tokens_per_s=40.0 + turn, ttft_ms=10.0,
                             load_ms=100.0, updated_at=float(turn))
    return path


def _corrupt_pages(path: Path) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as fh:  # the middle third of the file overwritten with other data
        fh.seek(size // 3)
        fh.write(np.random.default_rng(3).bytes(size // 3))


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def _drop_table(path: Path) -> None:
    with closing(_raw(path)) as conn:
        conn.execute("DROP TABLE calibration")


def _directory(path: Path) -> None:
    path.unlink()
    path.mkdir()
    (path / "something").write_text("not calm's")


def _foreign(path: Path) -> None:
    """Another program's database that happens to use SQLite's user_version too."""
    path.unlink()
    with closing(_raw(path)) as conn:
        conn.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
        conn.execute(f"PRAGMA user_version = {len(knowledge.MIGRATIONS)}")


def _text_in_real(path: Path) -> None:
    """What another program may write: SQLite keeps text as text in a REAL column. The row is the profile the
    loop reads for smollm2-135m (its newest)."""
    with closing(_raw(path)) as conn:
        conn.execute("UPDATE profiles SET tokens_per_s = 'fast' WHERE model = 'smollm2-135m' AND updated_at = 28")


def _newer(path: Path) -> None:
    with closing(_raw(path)) as conn:
        conn.execute(f"PRAGMA user_version = {NEWER}")


def _not_sqlite(path: Path) -> None:
    path.write_bytes(b"these are not the pages you are looking for\n" * 200)


# damage -> what the one-line message must say about it
DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "corrupt pages": (_corrupt_pages, "the file is damaged"),
    "truncated": (_truncate, "the file is damaged: database disk image is malformed"),
    "dropped table": (_drop_table, "table calibration is missing"),
    "directory": (_directory, "a directory is where the knowledge base file should be"),
    "foreign database": (_foreign, "table observations is missing"),
    "text in a REAL column": (_text_in_real, "column tokens_per_s (REAL) holds str 'fast', a row calm did not write"),
    "newer schema": (_newer, f"knowledge base schema version {NEWER}"),
    "not SQLite": (_not_sqlite, "not an SQLite database"),
}


def _damaged(filled: Path, directory: Path, kind: str) -> Path:
    """A copy of the filled knowledge base as `directory`/knowledge.sqlite, damaged by `kind`."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / knowledge.FILENAME
    shutil.copy(filled, path)
    DAMAGE[kind][0](path)
    return path


def _contents(path: Path) -> object:
    """What is on disk at `path`: the file's bytes, or a directory's listing."""
    return sorted(p.name for p in path.iterdir()) if path.is_dir() else path.read_bytes()


def _one_line_naming(message: str, path: Path, kind: str) -> None:
    assert "\n" not in message.strip() and "Traceback" not in message, message
    assert str(path) in message and DAMAGE[kind][1] in message, message


@pytest.mark.parametrize("kind", DAMAGE)
def test_an_unusable_file_is_refused_in_one_line_and_left_untouched(kind: str, filled: Path, tmp_path: Path) -> None:
    path = _damaged(filled, tmp_path, kind)
    before = _contents(path)
    with pytest.raises(KnowledgeError) as err:
        with SQLiteKnowledge(path) as k:  # some damage shows at open, some only when the data is read
            k.stats()
    message = str(err.value)
    _one_line_naming(message, path, kind)
    assert err.value.resettable and "calm kb reset --yes" in message
    assert f"{knowledge.FILENAME}.damaged-<time>" in message
    assert _contents(path) == before


READERS: dict[str, Callable[[SQLiteKnowledge], object]] = {
    "export": lambda k: k.export(io.StringIO()), "profiles": lambda k: k.profiles(),
    "profile": lambda k: k.profile("smollm2-135m", "fp32"), "calibration": lambda k: k.calibration(),
    "domain_quality": lambda k: k.domain_quality(), "stats": lambda k: k.stats(),
}


@pytest.mark.parametrize("kind, readers", [("corrupt pages", ["export", "calibration", "domain_quality", "stats"]),
                                           ("text in a REAL column", ["export", "profiles", "profile", "stats"])])
def test_damage_found_after_opening_fails_each_call_that_reads_it(kind: str, readers: list[str], filled: Path,
                                                                  tmp_path: Path) -> None:
    path = _damaged(filled, tmp_path, kind)
    with SQLiteKnowledge(path) as k:
        for name in readers:
            with pytest.raises(KnowledgeError) as err:
                READERS[name](k)
            _one_line_naming(str(err.value), path, kind)
        assert len(k.recent("smollm2-135m", window=3)) == 3  # what is not damaged can still be read


def test_text_in_a_number_column_is_refused_naming_the_row_not_summed(kb: SQLiteKnowledge) -> None:
    kb.record_many([obs(request_id="a", energy_j=2.0), obs(request_id="b", energy_j=4.0)])
    with _raw(kb.path) as conn:  # SQL's avg() would count the text as 0 and report 2.0 J
        conn.execute("UPDATE observations SET energy_j = 'lots' WHERE request_id = 'b'")
    with pytest.raises(KnowledgeError, match=r"observations row 2: column energy_j \(REAL\) holds str 'lots'"):
        kb.stats()
    with pytest.raises(KnowledgeError, match="column energy_j"):
        kb.recent("smollm2-135m")


def _in_memory_learning_goes_on(k: SQLiteKnowledge) -> None:
    k.record(obs(request_id="after", model="learned-in-memory"))
    k.upsert_profile("learned-in-memory", "fp32", "cpu", tokens_per_s=3.0)
    assert [o["request_id"] for o in k.recent("learned-in-memory")] == ["after"]
    assert k.profile("learned-in-memory")["tokens_per_s"] == 3.0


@pytest.mark.parametrize("kind", DAMAGE)
def test_degraded_mode_serves_from_memory_says_why_once_and_leaves_the_file(kind: str, filled: Path,
                                                                           tmp_path: Path) -> None:
    path = _damaged(filled, tmp_path, kind)
    before = _contents(path)
    said: list[str] = []
    with SQLiteKnowledge(path, on_degraded=said.append) as k:
        # what the loop asks of it, in the loop's order: calibration at start, then per request
        k.calibration(["smollm2-135m"])
        for n in range(3):
            k.profile("smollm2-135m", "fp32")
            k.recent("smollm2-135m", 20)
            k.record(obs(request_id=f"req-{n}"))
        assert k.degraded is not None
        _one_line_naming(k.degraded, path, kind)
        _in_memory_learning_goes_on(k)
    assert len(said) == 1 and said[0].startswith("calm: degraded mode") and k.degraded in said[0]
    assert _contents(path) == before


def test_a_healthy_file_is_not_degraded(filled: Path, tmp_path: Path) -> None:
    path = tmp_path / "kb.sqlite"
    shutil.copy(filled, path)
    said: list[str] = []
    with SQLiteKnowledge(path, on_degraded=said.append) as k:
        assert k.profile("smollm2-135m", "fp32")["tokens_per_s"] == 68.0
        assert k.calibration().embeddings.shape == (600, 384)
        k.record(obs(ts=time.time(), request_id="kept"))
    assert said == [] and k.degraded is None
    with SQLiteKnowledge(path) as k:
        assert "kept" in {o["request_id"] for o in k.recent("smollm2-135m", window=5)}


# -- failures in the middle of a run ----------------------------------------------------------------------


def test_a_file_replaced_mid_run_is_noticed_at_the_next_write(tmp_path: Path) -> None:
    path = tmp_path / "kb.sqlite"
    said: list[str] = []
    with SQLiteKnowledge(path, on_degraded=said.append) as k:
        k.record(obs(request_id="before"))
        path.unlink()  # SQLite would go on writing to the deleted file, and everything learned would vanish
        path.write_bytes(b"garbage" * 1000)
        k.record(obs(request_id="after"))
        assert k.degraded is not None and "deleted, moved or replaced while calm had it open" in k.degraded
        assert [o["request_id"] for o in k.recent("smollm2-135m")] == ["after"]
    assert len(said) == 1 and path.read_bytes() == b"garbage" * 1000


def test_a_lock_held_past_the_busy_timeout(tmp_path: Path) -> None:
    path = tmp_path / "kb.sqlite"
    SQLiteKnowledge(path).close()
    holder = _raw(path)
    holder.execute("BEGIN EXCLUSIVE")  # another process writing for longer than the busy timeout
    try:
        with SQLiteKnowledge(path, busy_timeout_s=0.2) as strict:
            with pytest.raises(KnowledgeError) as err:
                strict.record(obs())
        assert "database is locked" in str(err.value) and "try again" in str(err.value)
        assert not err.value.resettable  # a fresh file would not help: `calm kb reset` is not offered
        said: list[str] = []
        with SQLiteKnowledge(path, busy_timeout_s=0.2, on_degraded=said.append) as k:
            k.record(obs(request_id="in-memory"))
            assert [o["request_id"] for o in k.recent("smollm2-135m")] == ["in-memory"]
        assert len(said) == 1 and "database is locked" in said[0]
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def test_a_full_disk_mid_run(tmp_path: Path) -> None:
    path = tmp_path / "kb.sqlite"
    said: list[str] = []
    with SQLiteKnowledge(path, on_degraded=said.append) as k:
        # SQLite's own page limit: the same SQLITE_FULL a full disk gives, without filling one
        pages = k._conn.execute("PRAGMA page_count").fetchone()[0]
        k._conn.execute(f"PRAGMA max_page_count = {pages}")
        for n in range(100):
            k.record(obs(request_id=str(n), provider="x" * 500))
        assert k.degraded is not None and "database or disk is full; free some disk space" in k.degraded
        assert len(k.recent("smollm2-135m", window=100)) < 100  # the later ones are in memory only
    assert len(said) == 1
    with SQLiteKnowledge(path) as k:  # what made it to the file before the disk was full is still there
        assert 0 < k.stats()["rows"]["observations"] < 100


def test_a_constraint_violation_is_the_callers_error_not_the_files(tmp_path: Path) -> None:
    said: list[str] = []
    with SQLiteKnowledge(tmp_path / "kb.sqlite", on_degraded=said.append) as k:
        with pytest.raises(sqlite3.IntegrityError):
            k.record(obs(latency_ms=-1.0))
        assert k.degraded is None and said == []


# -- `calm kb` on damaged files ---------------------------------------------------------------------------


def _kb_cli(data_dir: Path, *args: str, stdin: str | None = None):
    result = CliRunner().invoke(main, ["kb", *args], env={"CALM_DATA_DIR": str(data_dir)}, input=stdin)
    # CliRunner catches any exception: only SystemExit (calm's own exits) is acceptable
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


@pytest.mark.parametrize("command", ["stats", "export", "show"])
@pytest.mark.parametrize("kind", DAMAGE)
def test_kb_commands_on_an_unusable_file_exit_1_in_one_line(kind: str, command: str, filled: Path,
                                                            tmp_path: Path, calm_home: Path) -> None:
    path = _damaged(filled, tmp_path / "data", kind)
    before = _contents(path)
    result = _kb_cli(path.parent, command)
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith(f"calm: {path}: ")
    _one_line_naming(result.stderr, path, kind)
    assert "run `calm kb reset --yes`" in result.stderr
    assert _contents(path) == before


@pytest.mark.parametrize("kind", [k for k in DAMAGE if k != "text in a REAL column"])
def test_kb_reset_sets_an_unusable_file_aside_and_starts_afresh(kind: str, filled: Path, tmp_path: Path,
                                                                calm_home: Path) -> None:
    path = _damaged(filled, tmp_path / "data", kind)
    before = _contents(path)
    result = _kb_cli(path.parent, "reset", "--yes")
    assert result.exit_code == 0, result.output
    assert "\n" not in result.stderr.strip() and DAMAGE[kind][1] in result.stderr
    aside = [p for p in path.parent.iterdir() if p.name.startswith(f"{knowledge.FILENAME}.damaged-")
             and not p.name.endswith(("-wal", "-shm"))]
    assert len(aside) == 1 and f"kept the file as {aside[0]};" in result.stderr
    assert _contents(aside[0]) == before  # nothing is lost: the damaged file is kept whole
    stats = _kb_cli(path.parent, "stats", "--json")
    assert stats.exit_code == 0 and json.loads(stats.stdout)["rows"] == {t: 0 for t in knowledge.TABLES}


def test_kb_reset_empties_a_file_whose_only_fault_is_a_foreign_value(filled: Path, tmp_path: Path,
                                                                      calm_home: Path) -> None:
    path = _damaged(filled, tmp_path / "data", "text in a REAL column")
    result = _kb_cli(path.parent, "reset", "--yes")
    assert result.exit_code == 0 and result.stderr == "kb: reset\n"
    assert sorted(p.name for p in path.parent.iterdir() if p.name.startswith(knowledge.FILENAME + ".")) == []
    assert _kb_cli(path.parent, "stats").exit_code == 0


def test_kb_reset_asks_first_and_says_what_is_wrong(filled: Path, tmp_path: Path, calm_home: Path) -> None:
    path = _damaged(filled, tmp_path / "data", "truncated")
    before = _contents(path)
    result = _kb_cli(path.parent, "reset", stdin="n\n")
    assert result.exit_code == 1 and "database disk image is malformed. Move it aside" in result.output
    assert _contents(path) == before and list(path.parent.iterdir()) == [path]


# -- serving in degraded mode, on the tiny fleet ----------------------------------------------------------

RESPONSE = jsonschema.Draft202012Validator(json.loads((SCHEMAS / "response.schema.json").read_text()))


def _calm_cli(env: dict, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "calm_cli", *args], env=env, input=stdin, capture_output=True,
                          timeout=300)


def test_route_on_a_healthy_knowledge_base_has_no_knowledge_field(tiny_env: dict) -> None:
    result = _calm_cli(tiny_env, "route", "--json", "--model", "smollm2-135m", "--max-tokens", "4", "hi")
    assert result.returncode == 0, result.stderr.decode()
    record = json.loads(result.stdout)
    RESPONSE.validate(record)
    assert "knowledge" not in record and b"degraded" not in result.stderr


@pytest.mark.parametrize("kind", DAMAGE)
def test_route_answers_in_degraded_mode_and_says_so(kind: str, filled: Path, tiny_env: dict) -> None:
    path = _damaged(filled, Path(tiny_env["CALM_DATA_DIR"]), kind)
    before = _contents(path)
    result = _calm_cli(tiny_env, "route", "--json", "--model", "smollm2-135m", "--max-tokens", "4", "hi")
    stderr = result.stderr.decode()
    assert result.returncode == 0 and "Traceback" not in stderr, stderr
    record = json.loads(result.stdout)
    RESPONSE.validate(record)
    assert record["error"] is None and record["model"] == "smollm2-135m"
    assert record["knowledge"].startswith("degraded: ")
    _one_line_naming(record["knowledge"], path, kind)
    said = [line for line in stderr.splitlines() if "degraded mode" in line]
    assert len(said) == 1 and record["knowledge"].removeprefix("degraded: ") in said[0]
    assert _contents(path) == before


def test_batch_and_serve_stdin_answer_every_request_in_degraded_mode(filled: Path, tiny_env: dict,
                                                                     tmp_path: Path) -> None:
    path = _damaged(filled, Path(tiny_env["CALM_DATA_DIR"]), "corrupt pages")
    lines = b"".join(json.dumps({"id": n, "query": "hi", "max_tokens": 2}).encode() + b"\n" for n in range(3))
    source = tmp_path / "in.jsonl"
    source.write_bytes(lines)
    batch = _calm_cli(tiny_env, "batch", str(source), "-o", str(tmp_path / "out.jsonl"))
    served = _calm_cli(tiny_env, "serve-stdin", stdin=lines)
    for result, out in ((batch, (tmp_path / "out.jsonl").read_text()), (served, served.stdout.decode())):
        stderr = result.stderr.decode()
        assert result.returncode == 0 and "Traceback" not in stderr, stderr
        assert sum("degraded mode" in line for line in stderr.splitlines()) == 1
        records = [json.loads(line) for line in out.splitlines()]
        assert sorted(r["id"] for r in records) == [0, 1, 2]
        for record in records:
            RESPONSE.validate(record)
            assert record["error"] is None and record["knowledge"].startswith(f"degraded: {path}: ")


def test_the_loop_goes_on_when_the_file_is_replaced_mid_run(tiny_home: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CALM_PRECISION", "fp32")
    path = tmp_path / "knowledge.sqlite"
    said: list[str] = []
    calm = assemble(policies.load(None), Store(tiny_home / "cache"), SQLiteKnowledge(path, on_degraded=said.append))
    request = {"query": "hi", "model": "smollm2-135m", "max_tokens": 2}
    first = calm.answer({"id": "first", **request})
    RESPONSE.validate(first)
    assert "knowledge" not in first and said == []
    path.unlink()
    path.write_bytes(b"garbage" * 100)
    later = [calm.answer({"id": n, **request}) for n in ("second", "third")]
    for record in later:
        RESPONSE.validate(record)
        assert record["error"] is None and record["knowledge"].startswith(f"degraded: {path}: the file was deleted")
    assert len(said) == 1
    assert [o["request_id"] for o in calm.kb.recent("smollm2-135m")] == ["third", "second"]  # learned in memory


def test_learned_version_moves_with_profiles_and_calibration_not_with_observations(tmp_path: Path) -> None:
    """A long-running loop reloads what it learned when this number moves, also when another process wrote."""
    path = tmp_path / "kb.sqlite"
    with SQLiteKnowledge(path) as mine, SQLiteKnowledge(path) as theirs:
        start = mine.learned_version()
        mine.record(obs())
        assert mine.learned_version() == start, "serving traffic alone must not force a reload"
        theirs.upsert_profile("m", "int4", "CPUExecutionProvider", tokens_per_s=10.0)
        after_profile = mine.learned_version()
        assert after_profile != start
        theirs.add_calibration([{"model": "m", "task": "t", "item_id": "1", "score": 1.0,
                                 "embedding": np.ones(4, np.float32)}])
        assert mine.learned_version() not in (start, after_profile)
        before_reset = mine.learned_version()
        theirs.reset()
        assert mine.learned_version() != before_reset
