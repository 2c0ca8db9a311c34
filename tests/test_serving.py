"""batch and serve-stdin on the real (smallest) fleet member: one record per line, in order, never lost."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest
import yaml
from click.testing import CliRunner

from calm_cli.cli import main
from calm_cli.resources import POLICIES, SCHEMAS

pytestmark = pytest.mark.fleet
RESPONSE = jsonschema.Draft202012Validator(json.loads((SCHEMAS / "response.schema.json").read_text()))


@pytest.fixture(scope="module")
def exported(fleet_store) -> None:
    for name in ("smollm2-135m", "minilm-l6"):
        result = CliRunner().invoke(main, ["models", "export", name])
        assert result.exit_code == 0, result.output


@pytest.fixture
def env(tmp_path: Path, exported) -> dict:
    """calm's shared model cache, but a private knowledge base and a one-model policy with short answers."""
    data = yaml.safe_load((POLICIES / "default.yaml").read_text())
    data["name"] = "smol"
    data["fleet"] = [dict(data["fleet"][0], max_tokens=12)]
    data["escalation"] = {"enabled": False}
    policy = tmp_path / "smol.yaml"
    policy.write_text(yaml.safe_dump(data))
    return {"vars": {**os.environ, "CALM_DATA_DIR": str(tmp_path / "data")}, "policy": str(policy)}


def _calm(env: dict, *args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "calm_cli", *args, "--policy", env["policy"]], env=env["vars"],
                          capture_output=True, **kw)


def test_batch_keeps_count_and_order_with_malformed_lines(tmp_path: Path, env: dict) -> None:
    lines = [
        json.dumps({"id": "a", "query": "What is the capital of France?"}).encode(),
        b"{not json",
        json.dumps({"id": "c"}).encode(),  # no query
        json.dumps({"id": "d", "query": "hi", "max_tokens": "many"}).encode(),
        b'{"id": "e", "query": "caf\xff"}',  # invalid UTF-8
        json.dumps({"id": "f", "query": "x" * 70_000}).encode(),  # oversize line
        json.dumps({"query": "Say hello."}).encode(),  # no id: the line number is used
        json.dumps({"id": 8, "type": "stats"}).encode(),
        json.dumps({"id": "i", "query": "Name a colour.", "model": "no-such-model"}).encode(),
    ]
    source = tmp_path / "in.jsonl"
    source.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out.jsonl"
    result = _calm(env, "batch", str(source), "-o", str(out))
    assert result.returncode == 3, result.stderr.decode()
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == ["a", 2, "c", "d", 5, 6, 7, 8, "i"]
    codes = [r["error"]["code"] if r.get("error") else None for r in records]
    assert codes == [None, "bad_json", "bad_request", "bad_request", "bad_utf8", "too_large", None, None,
                     "bad_request"]
    assert records[0]["answer"].strip() and records[0]["model"] == "smollm2-135m"
    for r in records:
        if r.get("type") != "stats":
            RESPONSE.validate(r)
    assert records[7]["type"] == "stats" and "cache" in records[7]


def test_batch_resumes_after_a_kill_without_duplicates_or_gaps(tmp_path: Path, env: dict) -> None:
    source = tmp_path / "in.jsonl"
    # Enough short lines that the kill lands mid-run however many the batch answers at once (8 were once all
    # answered between two polls).
    n = 32
    source.write_text("".join(json.dumps({"id": i, "query": f"What is {i} plus {i}?", "max_tokens": 8}) + "\n"
                              for i in range(n)))
    out = tmp_path / "out.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "calm_cli", "batch", str(source), "-o", str(out), "--policy",
                             env["policy"]], env=env["vars"], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and (not out.exists() or out.read_text().count("\n") < 2):
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the kill must land while the batch is still running"
    assert 2 <= out.read_text().count("\n") < n, "the kill must land mid-run"
    with out.open("a") as fh:
        fh.write('{"id": 99, "answer": "torn')  # what a kill in the middle of a write would leave
    result = _calm(env, "batch", str(source), "-o", str(out), "--resume")
    assert result.returncode == 0, result.stderr.decode()
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert ids == list(range(n))


def test_serve_stdin_round_trip_and_clean_eof(env: dict) -> None:
    requests = [{"id": 1, "query": "What is the capital of France?"}, {"id": 2, "type": "stats"},
                {"id": 3, "query": "Say hi."}]
    payload = "".join(json.dumps(r) + "\n" for r in requests)
    result = _calm(env, "serve-stdin", input=payload.encode(), timeout=600)
    assert result.returncode == 0, result.stderr.decode()
    records = [json.loads(line) for line in result.stdout.decode().splitlines()]
    # Stats are answered at once; questions as they finish (several run at once), each exactly once.
    assert sorted(r["id"] for r in records) == [1, 2, 3]
    records = [next(r for r in records if r["id"] == i) for i in (1, 2, 3)]
    assert records[0]["answer"].strip() and records[0]["model"] == "smollm2-135m"
    cache = records[1]["cache"]  # prefetched at start: the policy allows it and it fits
    assert [m["model"] for m in cache["loaded"]] + cache["loading"] == ["smollm2-135m"]
    assert cache["misses"] == 0 and records[1]["scheduler"]["waiting"] == 0
    # Both questions came while the prefetch loaded: they waited for that load (not a hit), and no second one.
    assert result.stderr.decode().count("cache: load smollm2-135m") == 1


def test_serve_stdin_sigterm_loses_no_line(env: dict) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "calm_cli", "serve-stdin", "--policy", env["policy"]],
                            env=env["vars"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    for i in range(5):
        proc.stdin.write((json.dumps({"id": i, "query": f"Count to {i + 3}."}) + "\n").encode())
    proc.stdin.flush()
    first = proc.stdout.readline()  # the first answer is out: the loop is running
    proc.send_signal(signal.SIGTERM)
    rest = proc.stdout.read()  # through the buffer readline filled: answers of one batch come out together
    assert proc.wait(timeout=300) == 0
    proc.stdin.close()
    records = [json.loads(first)] + [json.loads(line) for line in rest.decode().splitlines()]
    assert sorted(r["id"] for r in records) == list(range(5))  # in the order answers finish
    assert all(r["error"] is None or r["error"]["code"] == "unavailable" for r in records)
