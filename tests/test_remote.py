"""Remote members: a fleet member answered by a real OpenAI-compatible server started by the test on loopback
(another `calm serve`, on the tiny fleet), next to local members. Routed and forced answers, streaming, the
server's confidence and energy in the record, fallback and the circuit breaker when the server is stopped, and
traffic returning when it is back."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from calm_cli import policy as policy_mod
from calm_cli.fleet.store import Store
from calm_cli.knowledge import open_knowledge
from calm_cli.loop.assemble import assemble
from calm_cli.loop.calm import chat_job
from calm_cli.members import remote
from calm_cli.members.base import RunFailed
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

    from calm_cli.members.base import Ask

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


def _llama_server(gguf: Path, port: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias",
                             "smollm2", "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048",
                             "--n_threads", "1", "--verbose", "false"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def _wait_models(port: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.3)
    raise AssertionError("the llama.cpp server was not ready within 180 s")


@pytest.mark.fleet
def test_a_real_llama_cpp_server_as_a_remote_member(gguf_file, fleet_store, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """llama.cpp's OpenAI-compatible server (llama-cpp-python[server], the engine bench's reference) serves the
    pinned SmolLM2 GGUF as a remote member beside the real local members: a routed-and-forced answer with
    logprob confidence, streaming, fallback while it is down and traffic back when it returns."""
    import os

    if not _has("llama_cpp.server"):
        if os.environ.get("CI") == "true":
            pytest.fail("llama-cpp-python[server] is missing: `make bench-setup` installs it")
        pytest.skip("llama-cpp-python[server] is not installed here: `make bench-setup` installs it")
    monkeypatch.setenv("CALM_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setattr(remote, "COOLDOWN_S", 1.0)
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    data = yaml.safe_load(remote_policy(tmp_path, url, first=True).read_text())
    data["fleet"][0]["endpoint"]["model"] = "smollm2"
    path = tmp_path / "llama.yaml"
    path.write_text(yaml.safe_dump(data))
    server = _llama_server(gguf_file("smollm2-135m"), port)
    calm = assemble(policy_mod.load(path), fleet_store, open_knowledge(tmp_path / "kb.sqlite"))
    try:
        _wait_models(port, server)
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
        request = {"id": "x", "query": "Hello there!", "max_tokens": 4}

        def first():
            return calm.executor.first(["smol-remote", "smollm2-135m"], chat_job(request, None), lambda m: False,
                                       request_id="x", domain=None, started=time.perf_counter())

        server.terminate()
        server.wait(60)
        for _ in range(remote.FAILURES_TO_OPEN + 1):
            got = first()
            assert got.run.model == "smollm2-135m" and got.fallback_from == "smol-remote"
        server = _llama_server(gguf_file("smollm2-135m"), port)
        _wait_models(port, server)
        time.sleep(remote.COOLDOWN_S)
        assert first().run.model == "smol-remote"
    finally:
        calm.close()
        server.terminate()
        server.wait(60)


def _has(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False
