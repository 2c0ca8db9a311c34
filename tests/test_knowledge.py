"""The knowledge base: schema migrations, refusals, round trips, derived views and concurrent processes."""

from __future__ import annotations

import io
import json
import multiprocessing
import sqlite3
import time
from multiprocessing.synchronize import Event
from pathlib import Path

import numpy as np
import pytest

from calm_cli import knowledge
from calm_cli.knowledge import KnowledgeBase, KnowledgeError


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
def kb(tmp_path: Path) -> KnowledgeBase:
    with KnowledgeBase(tmp_path / "kb.sqlite") as k:
        yield k


def _raw(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None)


def _tables(path: Path) -> set[str]:
    with _raw(path) as conn:
        return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


# -- opening, migrations and refusals ---------------------------------------------------------------------


def test_default_path_follows_data_dir_and_parents_are_created(calm_home: Path) -> None:
    with KnowledgeBase() as k:
        assert k.path == calm_home / "data" / "knowledge.sqlite"
    assert k.path.is_file()


def test_empty_file_gets_the_whole_schema_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dir" / "kb.sqlite"
    with KnowledgeBase(path) as k:
        assert k.stats()["schema_version"] == len(knowledge.MIGRATIONS)
        assert k._conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert set(knowledge.TABLES) <= _tables(path)
    with _raw(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(knowledge.MIGRATIONS)
        columns = [r[1] for r in conn.execute("PRAGMA table_info(observations)")]
    assert sorted(columns) == sorted(("id", *knowledge.OBSERVATION_FIELDS))
    KnowledgeBase(path).close()  # reopening an up-to-date file changes nothing


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
    with KnowledgeBase(path) as k:
        assert k.stats()["schema_version"] == len(knowledge.MIGRATIONS)
        assert [o["request_id"] for o in k.recent("smollm2-135m")] == ["from-v1"]
        k.add_calibration([cal("m", "t", "1", 1.0, [1.0, 0.0])])
        assert k.domain_quality() == {("m", None): (1.0, 1)}


def test_migration_steps_apply_in_one_transaction(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "kb.sqlite"
    broken = (*knowledge.MIGRATIONS, ("CREATE TABLE extra (a)", "INSERT INTO no_such_table VALUES (1)"))
    monkeypatch.setattr(knowledge, "MIGRATIONS", broken)
    with pytest.raises(sqlite3.OperationalError, match="no_such_table"):
        KnowledgeBase(path)
    assert _tables(path) == set()
    with _raw(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 0


def test_a_file_from_a_newer_calm_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "kb.sqlite"
    KnowledgeBase(path).close()
    newer = len(knowledge.MIGRATIONS) + 3
    with _raw(path) as conn:
        conn.execute(f"PRAGMA user_version = {newer}")
    with pytest.raises(KnowledgeError) as err:
        KnowledgeBase(path)
    message = str(err.value)
    assert str(path) in message and f"version {newer}" in message and f"version {len(knowledge.MIGRATIONS)}" in message


def test_a_file_that_is_not_sqlite_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "kb.sqlite"
    path.write_bytes(b"these are not the pages you are looking for\n" * 200)
    with pytest.raises(KnowledgeError, match="not an SQLite database") as err:
        KnowledgeBase(path)
    assert str(path) in str(err.value)
    assert path.read_bytes().startswith(b"these are not")


def test_someone_elses_sqlite_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "kb.sqlite"
    with _raw(path) as conn:
        conn.execute("CREATE TABLE theirs (x)")
    with pytest.raises(KnowledgeError, match="not a calm knowledge base") as err:
        KnowledgeBase(path)
    assert str(path) in str(err.value)
    assert _tables(path) == {"theirs"}


# -- observations -----------------------------------------------------------------------------------------


def test_record_and_recent_round_trip(kb: KnowledgeBase) -> None:
    first = obs(ts=1.0, request_id="a")
    second = obs(ts=2.0, request_id="b", domain="code", confidence=0.8, cache_hit=True, escalated_from="gemma3-270m",
                 injected_slowdown=3.0, tokens_out=np.int64(5), latency_ms=np.float32(99.5))
    failed = obs(ts=3.0, request_id="c", error_code="prompt_too_long", ttft_ms=None, tokens_per_s=None)
    kb.record(first)
    kb.record_many([second, failed])
    kb.record(obs(ts=4.0, request_id="other", model="gemma3-270m"))
    got = kb.recent("smollm2-135m")
    assert [o["request_id"] for o in got] == ["c", "b", "a"]  # newest first, errors included
    assert got[2] == {**knowledge.OBSERVATION_DEFAULTS, **first}
    assert got[1]["cache_hit"] is True and got[1]["energy_estimated"] is True and got[1]["tokens_out"] == 5
    assert got[1]["injected_slowdown"] == 3.0 and got[1]["domain"] == "code" and got[1]["latency_ms"] == 99.5
    assert got[0]["error_code"] == "prompt_too_long" and got[0]["ttft_ms"] is None
    assert got[2]["injected_slowdown"] == 1.0 and got[2]["domain"] is None
    assert [o["request_id"] for o in kb.recent("smollm2-135m", window=2)] == ["c", "b"]
    assert [o["request_id"] for o in kb.recent("smollm2-135m", since_ts=2.0)] == ["c", "b"]
    assert kb.recent("no-such-model") == []


def test_record_names_unknown_and_missing_keys(kb: KnowledgeBase) -> None:
    bad = obs(latncy_ms=1.0)
    del bad["provider"], bad["ts"]
    with pytest.raises(ValueError) as err:
        kb.record(bad)
    assert "unknown key(s) latncy_ms" in str(err.value) and "missing key(s) provider, ts" in str(err.value)
    with pytest.raises(ValueError, match="missing key"):
        kb.record_many([obs(request_id="fine"), {"model": "x"}])
    assert kb.stats()["rows"]["observations"] == 0  # one bad row stores none of the batch


def test_profiles_upsert_merge_and_pick_the_newest(kb: KnowledgeBase) -> None:
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


def test_calibration_matrix_has_nan_where_a_model_was_not_scored(kb: KnowledgeBase) -> None:
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


def test_calibration_rejects_bad_rows(kb: KnowledgeBase) -> None:
    with pytest.raises(ValueError, match="missing key\\(s\\) embedding"):
        kb.add_calibration([{"model": "a", "task": "t", "item_id": "1", "score": 1.0}])
    with pytest.raises(ValueError, match="non-empty vector"):
        kb.add_calibration([cal("a", "t", "1", 1.0, [[1.0, 2.0]])])
    with pytest.raises(sqlite3.IntegrityError):
        kb.add_calibration([cal("a", "t", "1", 1.5, [1.0])])
    with pytest.raises(sqlite3.IntegrityError):
        kb.add_calibration([cal("a", "t", "1", 1.0, [1.0], confidence=1.2)])
    kb.add_calibration([cal("a", "t", "1", 1.0, [1.0, 2.0]), cal("a", "t", "2", 1.0, [1.0, 2.0, 3.0])])
    with pytest.raises(ValueError, match="different dimensions \\[2, 3\\]"):
        kb.calibration()


def test_domain_quality_is_the_mean_score_per_model_and_domain(kb: KnowledgeBase) -> None:
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


def test_stats_percentiles_match_numpy(kb: KnowledgeBase) -> None:
    rng = np.random.default_rng(1)
    latencies = rng.gamma(2.0, 100.0, size=101)
    energies = rng.uniform(0.1, 5.0, size=101)
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
    assert m["p50_latency_ms"] == pytest.approx(np.percentile(latencies, 50))
    assert m["p95_latency_ms"] == pytest.approx(np.percentile(latencies, 95))
    assert m["mean_energy_j"] == pytest.approx(energies.mean())
    g = s["models"]["gemma3-270m"]
    assert g["error_rate"] == 1.0 and g["p50_latency_ms"] is None and g["mean_energy_j"] is None
    json.dumps(s)  # `calm kb stats --json` can print it as is


def test_export_writes_every_row_and_reset_empties_every_table(kb: KnowledgeBase) -> None:
    kb.record_many([obs(request_id="a"), obs(request_id="b", cache_hit=True)])
    kb.upsert_profile("smollm2-135m", "int4", "cpu", tokens_per_s=40.0, energy_estimated=False)
    kb.add_calibration([cal("a", "t", "1", 1.0, [0.25, -1.5]), cal("b", "t", "1", 0.0, [0.25, -1.5])])
    buffer = io.StringIO()
    assert kb.export(buffer) == 5
    lines = [json.loads(line) for line in buffer.getvalue().splitlines()]
    assert [line["table"] for line in lines] == ["observations"] * 2 + ["profiles"] + ["calibration"] * 2
    expected = {"table": "observations", **knowledge.OBSERVATION_DEFAULTS, **obs(request_id="b", cache_hit=True)}
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
    with KnowledgeBase(Path(path)) as k:  # opening a fresh file at once also races the migration
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
        with KnowledgeBase(Path(path)) as k:  # open and close repeatedly, as short-lived `calm kb` commands do
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
    with KnowledgeBase(Path(path)) as k:
        s = k.stats()
        assert s["rows"]["observations"] == WRITERS * PER_WRITER
        assert {m: v["observations"] for m, v in s["models"].items()} == {f"m{w}": PER_WRITER for w in range(WRITERS)}
        ids = {o["request_id"] for w in range(WRITERS) for o in k.recent(f"m{w}", window=PER_WRITER)}
        assert len(ids) == WRITERS * PER_WRITER
