"""Remote members: a fleet member answered by a real OpenAI-compatible server started by the test on loopback
(another `calm serve`, on the tiny fleet), next to local members. Routed and forced answers, streaming, the
server's confidence and energy in the record, fallback and the circuit breaker when the server is stopped, and
traffic returning when it is back."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from calm_cli import policy as policy_mod
from calm_cli.bench import llama_server
from calm_cli.bench.llama_server import LlamaServer
from calm_cli.fleet.store import Store
from calm_cli.knowledge import open_knowledge
from calm_cli.loop.assemble import assemble
from calm_cli.loop.calm import chat_job
from calm_cli.members import remote
from calm_cli.members.base import Ask, RunFailed
from calm_cli.resources import POLICIES
from test_http import Served, free_port, start


def remote_policy(tmp_path: Path, url: str, *, first: bool = False) -> Path:
    """The default policy with one more member, smol-remote, served at `url` (as smollm2-135m there)."""
    data = yaml.safe_load((POLICIES / "default.yaml").read_text())
    member = {"model": "smol-remote", "description": "Small talk and greetings answered by a remote server.",
              "examples": ["Hello there!", "How are you today?"], "max_tokens": 8,
              "endpoint": {"url": url, "model": "smollm2-135m", "timeout_s": 30, "watts": 40}}
    data["fleet"] = [member] + data["fleet"] if first else data["fleet"] + [member]
    data["name"] = "mixed"
    path = tmp_path / "mixed.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def remote_server(tiny_env: dict) -> Served:
    served = start(tiny_env)
    yield served
    served.stop()


@pytest.fixture
def router_env(tiny_env: dict, tiny_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    for key, value in tiny_env.items():
        if key.startswith("CALM_"):
            monkeypatch.setenv(key, value)
    monkeypatch.setenv("CALM_DATA_DIR", str(tmp_path / "router-data"))
    return tiny_env


def test_a_policy_with_an_endpoint_validates_and_names_a_clash(tmp_path: Path) -> None:
    path = remote_policy(tmp_path, "http://127.0.0.1:9/v1")
    loaded = policy_mod.load(path)
    assert loaded.fleet[-1].endpoint["model"] == "smollm2-135m"
    data = yaml.safe_load(path.read_text())
    data["fleet"][-1]["model"] = "gemma3-270m"  # a models.lock name with an endpoint is ambiguous
    data["fleet"] = data["fleet"][:-1][1:] + [data["fleet"][-1]]
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(Exception, match="has an endpoint, so it names a remote member"):
        policy_mod.load(path)
    data["fleet"][-1]["endpoint"]["url"] = "ftp://x"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(Exception, match="endpoint.url"):
        policy_mod.load(path)
    data["fleet"][-1]["model"] = "smol-remote"
    data["fleet"][-1]["endpoint"] |= {"url": "http://127.0.0.1:9/v1", "logprobs": "yes"}
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(Exception, match="endpoint.logprobs"):
        policy_mod.load(path)


def test_the_bench_moves_one_fleet_member_to_a_server_and_nothing_else() -> None:
    """calm bench --remote's policy: the member renamed MEMBER-remote with the server's endpoint (and no draft),
    its pin following it; members that are not in the fleet, or draft for another, are refused by name."""
    import dataclasses

    from calm_cli.bench.remote import remote_policy
    from calm_cli.errors import UsageError

    base = policy_mod.load(POLICIES / "default.yaml")
    base = dataclasses.replace(base, cache={**base.cache, "pinned": ["qwen2.5-coder-0.5b"]})
    moved = remote_policy(base, "qwen2.5-coder-0.5b", "http://127.0.0.1:8081/v1", 15.0)
    names = [m.model for m in moved.fleet]
    assert names == [m.model if m.model != "qwen2.5-coder-0.5b" else "qwen2.5-coder-0.5b-remote" for m in base.fleet]
    member = next(m for m in moved.fleet if m.endpoint)
    assert member.endpoint == {"url": "http://127.0.0.1:8081/v1", "model": "qwen2.5-coder-0.5b", "timeout_s": 600,
                               "watts": 15.0, "logprobs": True}
    assert member.draft is None and member.description == next(m.description for m in base.fleet
                                                                 if m.model == "qwen2.5-coder-0.5b")
    assert moved.cache["pinned"] == ["qwen2.5-coder-0.5b-remote"] and moved.escalation == base.escalation
    assert moved.name == "default, qwen2.5-coder-0.5b remote"
    with pytest.raises(UsageError, match="--remote qwen2.5-coder-1.5b: not a fleet member of policy default"):
        remote_policy(base, "qwen2.5-coder-1.5b", "http://127.0.0.1:8081/v1", 15.0)  # the escalation target
    drafting = dataclasses.replace(base, fleet=tuple(dataclasses.replace(m, draft="smollm2-135m")
                                                     if m.model == "gemma3-270m" else m for m in base.fleet))
    with pytest.raises(UsageError, match="it drafts for gemma3-270m, and a draft must be local"):
        remote_policy(drafting, "smollm2-135m", "http://127.0.0.1:8081/v1", 15.0)


def test_forced_remote_answers_as_the_server_does_and_streams(remote_server: Served, router_env: dict,
                                                              tmp_path: Path) -> None:
    url = remote_server.base + "/v1"
    direct = remote_server.client().chat.completions.create(
        model="smollm2-135m", max_tokens=8, temperature=0, messages=[{"role": "user", "content": "Hello there!"}])
    result = subprocess.run([sys.executable, "-m", "calm_cli", "route", "--json", "--model", "smol-remote",
                             "--max-tokens", "8", "--temperature", "0", "--policy", str(remote_policy(tmp_path, url)),
                             "Hello there!"], env=router_env | {"CALM_DATA_DIR": str(tmp_path / "d")},
                            capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    record = json.loads(result.stdout)
    assert record["model"] == "smol-remote" and record["answer"] == direct.choices[0].message.content
    m = record["metrics"]
    assert m["provider"] == f"remote:{url}" and m["tokens_out"] == direct.usage.completion_tokens
    served = direct.model_extra["calm"]["metrics"]
    assert m["confidence"] == pytest.approx(served["confidence"], abs=1e-3)  # the server's own figure
    # The server's own energy figure (its record in the last chunk), not the policy's 40 W x the wall time.
    assert 0 < m["energy_j"] < 40 * m["latency_ms"] / 1000 / 2 and m["energy_estimated"] is True
    # Streamed through the router's own loop: the pieces add up to the answer.
    calm = assemble(policy_mod.load(remote_policy(tmp_path, url)), Store(Path(router_env["CALM_HOME"]) / "cache"),
                    open_knowledge(tmp_path / "kb.sqlite"))
    try:
        pieces: list[str] = []
        streamed = calm.answer({"id": 1, "query": "Hello there!", "model": "smol-remote", "max_tokens": 8,
                                "temperature": 0}, on_text=pieces.append)
        assert "".join(pieces) == streamed["answer"] == record["answer"]
        assert calm.cache.state()["used_mb"] == 0  # a remote member takes no local memory
    finally:
        calm.close()


def test_profile_calibrates_a_remote_member_as_it_does_a_local_one(remote_server: Served, router_env: dict,
                                                                  tiny_home: Path, humaneval_data: Path,
                                                                  tmp_path: Path) -> None:
    """calm profile measures the remote member through its server, on the same calibration items as a local
    member: its profile (kept apart as precision "remote", no local memory, the server's provider) and one
    calibration row per item, which Analyze then reads like any member's."""
    from calm_cli.eval import profile
    from calm_cli.loop.analyze import Analyzer
    from calm_cli.members import catalog

    if not (tiny_home / "cache" / "data").exists():
        (tiny_home / "cache" / "data").symlink_to(humaneval_data)
    url = remote_server.base + "/v1"
    policy = policy_mod.load(remote_policy(tmp_path, url))
    store = Store(tiny_home / "cache")
    kb = open_knowledge(tmp_path / "kb.sqlite")
    steps: list[str] = []
    rows, failed = profile.calibrate(policy, store, kb, ["smol-remote", "smollm2-135m"], 2, ["humaneval"], 0,
                                     lambda m: None, lambda label, total: lambda: steps.append(label))
    assert failed == {}
    assert [r.model for r in rows] == ["smol-remote", "smollm2-135m"] and len(steps) == 4
    remote_row, local_row = rows
    assert remote_row.provider == f"remote:{url}" and remote_row.memory_mb == 0 and remote_row.items == 2
    assert remote_row.tokens_per_s > 0 and 0 < remote_row.confidence <= 1  # the calm server's own figure
    assert local_row.provider != remote_row.provider and local_row.memory_mb > 0
    stored = kb.profile("smol-remote")
    assert stored["precision"] == profile.REMOTE_PRECISION and stored["provider"] == f"remote:{url}"
    assert stored["memory_mb"] == 0 and stored["n_samples"] == 2 + len(profile.SPEED_PROMPTS)
    calibration = kb.calibration(["smol-remote", "smollm2-135m"])
    assert len(calibration.items) == 2 and all(t == "humaneval" for t, _, _ in calibration.items)
    assert not np.isnan(calibration.scores["smol-remote"]).any()  # the same items as the local member
    assert not np.isnan(calibration.scores["smollm2-135m"]).any()
    members = catalog.members(policy, store, "fp32")
    assert Analyzer(members, kb, policy.goals).profile("smol-remote")["provider"] == f"remote:{url}"
    kb.close()


def test_profile_goes_on_past_a_remote_member_whose_server_is_down(router_env: dict, tiny_home: Path,
                                                                  humaneval_data: Path, tmp_path: Path) -> None:
    """Nobody listens at the endpoint: the local member is still profiled and stored, the remote one is named
    with the reason, nothing is stored for it, and the command exits 1 in one line, without a traceback."""
    if not (tiny_home / "cache" / "data").exists():
        (tiny_home / "cache" / "data").symlink_to(humaneval_data)
    policy = remote_policy(tmp_path, f"http://127.0.0.1:{free_port()}/v1")
    env = router_env | {"CALM_DATA_DIR": str(tmp_path / "d")}
    done = subprocess.run([sys.executable, "-m", "calm_cli", "profile", "--policy", str(policy), "--tasks",
                           "humaneval", "--limit", "1", "--models", "smol-remote,smollm2-135m"], env=env,
                          capture_output=True, timeout=300)
    err = done.stderr.decode()
    assert done.returncode == 1 and "Traceback" not in err, err
    assert "profile: smol-remote failed, nothing stored for it" in err and "ConnectError" in err
    assert "calm: not profiled: smol-remote (see above); the others were stored" in err
    assert "smollm2-135m" in done.stdout.decode() and "smol-remote" not in done.stdout.decode()
    stats = json.loads(subprocess.run([sys.executable, "-m", "calm_cli", "kb", "stats", "--json"], env=env,
                                      capture_output=True, timeout=60).stdout)
    assert stats["rows"]["profiles"] == 1 and stats["rows"]["calibration"] == 1


def test_a_dead_server_falls_back_opens_the_breaker_and_recovers(tiny_env: dict, router_env: dict, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(remote, "COOLDOWN_S", 1.0)
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    calm = assemble(policy_mod.load(remote_policy(tmp_path, url, first=True)),
                    Store(Path(router_env["CALM_HOME"]) / "cache"), open_knowledge(tmp_path / "kb.sqlite"))
    order = ["smol-remote", "smollm2-135m"]
    request = {"id": "x", "query": "Hello there!", "max_tokens": 4}

    def first():
        return calm.executor.first(order, chat_job(request, None), lambda m: False, request_id="x", domain=None,
                                   started=time.perf_counter())

    try:
        # Nobody listens: each request falls back to the local member; the failures are recorded against it.
        for _ in range(remote.FAILURES_TO_OPEN):
            got = first()
            assert got.run.model == "smollm2-135m" and got.fallback_from == "smol-remote"
            assert "ConnectError" in got.failures[0]
        started = time.perf_counter()
        got = first()  # open: refused at once, without a connection attempt
        assert got.fallback_from == "smol-remote" and "times in a row" in got.failures[0]
        assert time.perf_counter() - started < 5
        errors = [r for r in calm.kb.recent("smol-remote") if r["error_code"]]
        assert len(errors) == remote.FAILURES_TO_OPEN + 1  # Analyze counts each against the member
        # The server comes up on that port; after the cooldown one request probes and closes the breaker.
        served = start(tiny_env, port=port)
        try:
            time.sleep(remote.COOLDOWN_S)
            got = first()
            assert got.run.model == "smol-remote" and got.fallback_from is None
            assert first().run.model == "smol-remote"
        finally:
            served.stop()
    finally:
        calm.close()


def test_malformed_and_error_replies_are_member_failures() -> None:
    """A real (misbehaving) server on loopback: a 500, and a stream that is not JSON, are the member's failures,
    each said in one line."""
    import threading

    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    async def chat(request):
        body = await request.json()
        if body["messages"][0]["content"] == "crash":
            return JSONResponse({"error": {"message": "the model crashed"}}, status_code=500)
        return Response("data: {not json\n\n", media_type="text/event-stream")

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])]),
                                           host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        member = remote.RemoteMember(policy_mod.MemberPolicy("r", "remote member for the test",
                                                             endpoint={"url": f"http://127.0.0.1:{port}/v1"}))
        client = member.load()
        with pytest.raises(RunFailed, match="answered 500: the model crashed"):
            member.generate(client, Ask("crash", 4))
        with pytest.raises(RunFailed, match="malformed stream"):
            member.generate(client, Ask("hi", 4))
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.mark.fleet
def test_a_real_llama_cpp_server_as_a_remote_member(gguf_file, fleet_store, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """llama.cpp's OpenAI-compatible server (llama-cpp-python[server], the engine bench's reference) serves the
    pinned SmolLM2 GGUF as a remote member beside the real local members: a routed-and-forced answer with
    logprob confidence, streaming, fallback while it is down and traffic back when it returns."""
    needs_llama_server()
    monkeypatch.setenv("CALM_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setattr(remote, "COOLDOWN_S", 1.0)
    server = LlamaServer(gguf_file("smollm2-135m"), "smollm2")
    url = server.url
    data = yaml.safe_load(remote_policy(tmp_path, url, first=True).read_text())
    data["fleet"][0]["endpoint"]["model"] = "smollm2"
    path = tmp_path / "llama.yaml"
    path.write_text(yaml.safe_dump(data))
    calm = assemble(policy_mod.load(path), fleet_store, open_knowledge(tmp_path / "kb.sqlite"))
    try:
        server.start()
        pieces: list[str] = []
        record = calm.answer({"id": 1, "query": "What is 2 + 2?", "model": "smol-remote", "max_tokens": 16,
                              "temperature": 0}, on_text=pieces.append)
        assert record["error"] is None and record["model"] == "smol-remote", record
        assert "4" in record["answer"] and "".join(pieces) == record["answer"]
        m = record["metrics"]
        assert m["provider"] == f"remote:{url}" and m["tokens_out"] > 0 and m["ttft_ms"] <= m["latency_ms"]
        assert m["confidence"] is not None and 0 < m["confidence"] <= 1  # from the server's logprobs
        # The policy's 40 W x the member's own wall time (the record's latency adds routing and hand-offs).
        assert 0.85 * 40 * m["latency_ms"] / 1000 <= m["energy_j"] <= 40 * m["latency_ms"] / 1000
        # endpoint.logprobs false: none asked for, so the same greedy answer comes without a confidence.
        quiet = remote.RemoteMember(policy_mod.MemberPolicy(
            "smol-quiet", "the same server, no logprobs", endpoint={"url": url, "model": "smollm2", "logprobs": False}))
        run = quiet.generate(quiet.load(), Ask("What is 2 + 2?", 16))
        assert run.text == record["answer"] and math.isnan(run.confidence)
        request = {"id": "x", "query": "Hello there!", "max_tokens": 4}

        def first():
            return calm.executor.first(["smol-remote", "smollm2-135m"], chat_job(request, None), lambda m: False,
                                       request_id="x", domain=None, started=time.perf_counter())

        server.stop()
        for _ in range(remote.FAILURES_TO_OPEN + 1):
            got = first()
            assert got.run.model == "smollm2-135m" and got.fallback_from == "smol-remote"
        server.start()  # the same port
        time.sleep(remote.COOLDOWN_S)
        assert first().run.model == "smol-remote"
    finally:
        calm.close()
        server.stop()


@pytest.mark.fleet
def test_bench_runs_a_member_on_llama_cpp_beside_the_all_local_run(fleet_store, humaneval_data: Path,
                                                                   tmp_path: Path) -> None:
    """calm bench --remote: SmolLM2 answered by a real llama.cpp server on loopback, calibrated on the items the
    local SmolLM2 was, beside the all-local run in one table, with the paired network overhead."""
    import os

    needs_llama_server()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALM_")} | {"CALM_DATA_DIR": str(tmp_path)}

    def calm(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "calm_cli", *args], env=env, capture_output=True, timeout=1800)

    profiled = calm("profile", "--limit", "1", "--tasks", "humaneval", "--models", "smollm2-135m")
    assert profiled.returncode == 0, profiled.stderr.decode()[-2000:]
    out = tmp_path / "bench.json"
    bench = calm("bench", "--policy", str(POLICIES / "default.yaml"), "--tasks", "humaneval", "--n", "1",
                 "--remote", "smollm2-135m", "--remote-requests", "4", "--json", str(out))
    assert bench.returncode == 0 and b"Traceback" not in bench.stderr, bench.stderr.decode()[-3000:]
    result = json.loads(out.read_text())
    systems = {s["name"]: s for s in result["systems"]}
    assert {"calm (default)", "calm (default, smollm2-135m remote)", "smollm2-135m alone",
            "smollm2-135m-remote alone"} <= set(systems)
    scenario = result["scenarios"]["remote"]
    assert "error" not in scenario, scenario
    assert scenario["calibration_items"] == 1 and scenario["failures"] == 0 and 0 <= scenario["routed_share"] <= 1
    assert scenario["overhead"]["requests"] == 4 and len(scenario["overhead"]["added_p50_ms"]) == 3
    assert scenario["energy_check"]["server_cpu_s_alone"] > 0
    assert "smollm2-135m-remote alone" in bench.stdout.decode()  # printed in the one table
    # A member the first policy does not have is refused before anything runs.
    refused = calm("bench", "--policy", str(POLICIES / "default.yaml"), "--tasks", "humaneval", "--n", "1",
                   "--remote", "nope")
    assert refused.returncode == 2 and b"--remote nope: not a fleet member of policy default" in refused.stderr


def needs_llama_server() -> None:
    """Skip where llama-cpp-python[server] is not installed, except in CI, where `make bench-setup` installs it."""
    import os

    if not llama_server.available():
        if os.environ.get("CI") == "true":
            pytest.fail("llama-cpp-python[server] is missing: `make bench-setup` installs it")
        pytest.skip("llama-cpp-python[server] is not installed here: `make bench-setup` installs it")
