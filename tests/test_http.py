"""`calm serve` as its users reach it: the real `openai` client (and httpx for what the client hides) against a
real server started on a free loopback port, on the tiny random-weight fleet; stopped with SIGTERM after."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Iterator

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from calm_cli.resources import POLICIES

TINY = ("smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """A `calm serve` process and how to reach it."""

    def __init__(self, proc: subprocess.Popen, port: int, key: str | None):
        self.proc, self.port, self.key = proc, port, key
        self.base = f"http://127.0.0.1:{port}"
        self.stderr = b""

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base + "/v1", api_key=self.key or "unused", max_retries=0, **kw)

    def http(self) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        return httpx.Client(base_url=self.base, headers=headers, timeout=120)

    def stop(self) -> int:
        """SIGTERM, then the exit status (uvicorn drains, the loop drains and unloads)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=120)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        self.stderr = self.proc.stderr.read()
        return self.proc.returncode


def start(env: dict, key: str | None = None, policy: str = "default.yaml", extra: dict | None = None,
          port: int | None = None) -> Served:
    """`calm serve` on loopback (a shipped policy's name, or a path), once /health says it is ready."""
    port = port or free_port()
    env = {**env, **(extra or {})}
    if key:
        env["CALM_API_KEY"] = key
    proc = subprocess.Popen([sys.executable, "-m", "calm_cli", "serve", "--port", str(port), "--policy",
                             str(POLICIES / policy)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    served = Served(proc, port, key)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"calm serve exited {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(served.base + "/health", timeout=2).status_code == 200:
                return served
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    served.stop()
    raise AssertionError("calm serve was not ready within 120 s")


@pytest.fixture
def server(tiny_env: dict) -> Iterator[Served]:
    served = start(tiny_env)
    yield served
    assert served.stop() == 0, served.stderr.decode()[-2000:]
    assert b"Traceback" not in served.stderr


def test_chat_routed_and_forced_with_the_openai_client(server: Served) -> None:
    client = server.client()
    raw = client.chat.completions.with_raw_response.create(
        model="calm", messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=8)
    reply = raw.parse()
    assert raw.headers["x-calm-policy"] == "default" and raw.headers["x-calm-model"] in TINY
    assert reply.model == raw.headers["x-calm-model"] and reply.choices[0].message.role == "assistant"
    assert isinstance(reply.choices[0].message.content, str)
    assert reply.usage.completion_tokens <= 8 and reply.usage.prompt_tokens > 0
    record = reply.model_extra["calm"]
    assert record["model"] == reply.model and record["routing"]["policy"] == "default"
    assert record["metrics"]["tokens_out"] == reply.usage.completion_tokens
    forced = client.chat.completions.create(model="gemma3-270m", max_tokens=4,
                                            messages=[{"role": "system", "content": "Be brief."},
                                                      {"role": "user", "content": "Hi"}])
    assert forced.model == "gemma3-270m" and forced.model_extra["calm"]["routing"]["reason"] == "forced by the request"
    text = client.completions.create(model="auto", prompt="def add(a, b):", max_tokens=6)
    assert text.object == "text_completion" and text.model in TINY and text.usage.completion_tokens <= 6


def test_streamed_chat_equals_the_whole_answer(server: Served) -> None:
    client = server.client()
    ask = dict(model="smollm2-135m", messages=[{"role": "user", "content": "Count to ten."}], max_tokens=16,
               temperature=0)
    whole = client.chat.completions.create(**ask)
    pieces, finish, usage, record = [], None, None, None
    with client.chat.completions.with_streaming_response.create(**ask, stream=True,
                                                                stream_options={"include_usage": True}) as raw:
        assert raw.headers["content-type"].startswith("text/event-stream")
        assert raw.headers["x-calm-model"] == "smollm2-135m"
        for chunk in raw.parse():
            if chunk.choices:
                pieces.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
                record = (chunk.model_extra or {}).get("calm") or record
            if chunk.usage:
                usage = chunk.usage
    assert "".join(pieces) == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason and usage.completion_tokens == whole.usage.completion_tokens
    assert record["answer"] == whole.choices[0].message.content


def test_models_lists_every_member_and_calm(server: Served) -> None:
    names = [m.id for m in server.client().models.list()]
    assert names[0] == "calm" and set(names[1:]) == set(TINY)


@pytest.mark.parametrize("body,status,param,code", [
    ({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, 404, "model", "model_not_found"),
    ({"model": "calm"}, 400, None, "bad_request"),
    ({"model": "calm", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}, 400, "max_tokens",
     "bad_request"),
    ({"model": "calm", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role", "bad_request"),
    ({"model": "calm", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature",
     "bad_request"),
    ({"model": "calm", "messages": [{"role": "user", "content": "hi"}], "n": 3}, 400, "n", "bad_request"),
    ({"model": "calm", "messages": [{"role": "assistant", "content": "hi"}]}, 400, "messages", "bad_request"),
], ids=["unknown-model", "no-messages", "negative-max-tokens", "bad-role", "string-temperature", "n-3",
        "last-not-user"])
def test_bad_requests_get_openai_errors_naming_the_field(server: Served, body, status, param, code) -> None:
    with server.http() as http:
        got = http.post("/v1/chat/completions", json=body)
    assert got.status_code == status, got.text
    error = got.json()["error"]
    assert error["code"] == code and error["param"] == param and error["message"]
    assert error["type"] == "invalid_request_error"


def test_hostile_bodies_are_refused_in_one_piece(server: Served) -> None:
    with server.http() as http:
        deep = http.post("/v1/chat/completions", content=b"[" * 100000 + b"]" * 100000,
                         headers={"content-type": "application/json"})
        assert deep.status_code == 400 and "nest" in deep.json()["error"]["message"]
        huge = http.post("/v1/chat/completions", content=b'{"model": "calm", "max_tokens": ' + b"9" * 5000 + b"}")
        assert huge.status_code == 400 and huge.json()["error"]["code"] == "bad_json"
        nan = http.post("/v1/chat/completions", content=b'{"model": "calm", "temperature": NaN, "messages": []}')
        assert nan.status_code == 400 and nan.json()["error"]["code"] == "bad_json"
        utf8 = http.post("/v1/chat/completions", content=b'{"model": "calm\xff"}')
        assert utf8.status_code == 400 and utf8.json()["error"]["code"] == "bad_utf8"
        big = http.post("/v1/chat/completions", content=b" " * (2 << 20))
        assert big.status_code == 413
        assert http.get("/nowhere").status_code == 404
        assert http.get("/v1/chat/completions").status_code == 405
        # Still serving after all that.
        ok = http.post("/v1/chat/completions", json={"model": "calm", "max_tokens": 2,
                                                     "messages": [{"role": "user", "content": "hi"}]})
        assert ok.status_code == 200


def test_a_key_is_required_everywhere_but_health(tiny_env: dict) -> None:
    served = start(tiny_env, key="s3cret-key-123")
    try:
        assert httpx.get(served.base + "/health").status_code == 200
        for path in ("/v1/models", "/metrics"):
            refused = httpx.get(served.base + path)
            assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        wrong = openai.OpenAI(base_url=served.base + "/v1", api_key="wrong-key-000", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        assert [m.id for m in served.client().models.list()][0] == "calm"
    finally:
        assert served.stop() == 0


def metric_samples(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_count_what_was_sent(server: Served) -> None:
    client = server.client()
    sent: Counter = Counter()
    for i in range(3):
        reply = client.chat.completions.create(model="smollm2-135m", max_tokens=3,
                                               messages=[{"role": "user", "content": f"Say {i}"}])
        sent[reply.model] += 1
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with server.http() as http:
        samples = metric_samples(http.get("/metrics").text)
    ok = samples[("calm_requests_total", (("code", "ok"), ("endpoint", "chat"), ("model", "smollm2-135m")))]
    assert ok == 3
    assert samples[("calm_requests_total", (("code", "model_not_found"), ("endpoint", "chat"), ("model", "none")))] == 1
    assert samples[("calm_request_latency_seconds_count", (("model", "smollm2-135m"),))] == 3
    assert samples[("calm_completion_tokens_total", (("model", "smollm2-135m"),))] <= 9
    assert samples[("calm_energy_joules_total", (("kind", "estimated"), ("model", "smollm2-135m")))] > 0
    assert samples[("calm_cache_loads_total", ())] >= 1
    assert samples[("calm_loaded_memory_bytes", (("model", "smollm2-135m"),))] > 0
    assert ("calm_queue_depth", ()) in samples


def test_load_two_hundred_requests_at_concurrency_eight_each_answered_once(server: Served) -> None:
    """Every request gets exactly one answer, its own (the id and the question's number come back)."""
    client = server.client(timeout=300)
    answers: dict[int, str] = {}
    errors: list[str] = []
    lock = threading.Lock()
    members = ["calm", *TINY]

    def worker(k: int) -> None:
        for i in range(k, 200, 8):
            try:
                reply = client.chat.completions.create(
                    model=members[i % len(members)], max_tokens=4 + i % 5,
                    messages=[{"role": "user", "content": f"Question number {i}?"}], stream=bool(i % 3 == 0))
                if i % 3 == 0:
                    text = "".join(c.choices[0].delta.content or "" for c in reply if c.choices)
                else:
                    text = reply.choices[0].message.content
                    assert reply.model_extra["calm"]["id"] == reply.id
            except Exception as exc:  # noqa: BLE001 - collected and reported below
                with lock:
                    errors.append(f"{i}: {type(exc).__name__}: {exc}")
                continue
            with lock:
                assert i not in answers
                answers[i] = text

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and sorted(answers) == list(range(200))
    with server.http() as http:
        samples = metric_samples(http.get("/metrics").text)
    answered = sum(v for (name, labels), v in samples.items() if name == "calm_requests_total"
                   and dict(labels)["code"] == "ok")
    assert answered == 200
    assert samples[("calm_http_requests_in_flight", ())] == 0


def test_a_client_that_disconnects_mid_stream_loses_nobody_elses_answer(server: Served) -> None:
    client = server.client(timeout=300)
    ask = dict(model="smollm2-135m", max_tokens=200, temperature=0)
    results: dict[str, str] = {}

    def other(i: int) -> None:
        reply = client.chat.completions.create(**ask, messages=[{"role": "user", "content": f"Story {i}"}])
        results[f"other{i}"] = reply.choices[0].finish_reason

    others = [threading.Thread(target=other, args=(i,)) for i in range(3)]
    for t in others:
        t.start()
    with httpx.Client(base_url=server.base, timeout=120) as http:
        with http.stream("POST", "/v1/chat/completions", json={**ask, "stream": True, "messages": [
                {"role": "user", "content": "A long story, please."}]}) as response:
            for _ in response.iter_lines():
                break  # one line, then hang up
    for t in others:
        t.join()
    assert sorted(results) == ["other0", "other1", "other2"]
    deadline = time.monotonic() + 60
    with server.http() as http:
        while time.monotonic() < deadline:
            samples = metric_samples(http.get("/metrics").text)
            if samples[("calm_http_requests_in_flight", ())] == 0:
                break
            time.sleep(0.2)
    assert samples[("calm_http_requests_in_flight", ())] == 0  # the hung-up stream freed its place


def test_sigterm_finishes_the_requests_in_hand_then_exits(tiny_env: dict) -> None:
    served = start(tiny_env)
    client = served.client(timeout=300)
    got: dict[int, str] = {}

    def ask(i: int) -> None:
        reply = client.chat.completions.create(model="qwen2.5-coder-0.5b", max_tokens=64,
                                               messages=[{"role": "user", "content": f"Tell me about {i}"}])
        got[i] = reply.choices[0].finish_reason

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.0)  # the requests are in hand
    assert served.stop() == 0, served.stderr.decode()[-2000:]
    for t in threads:
        t.join()
    assert sorted(got) == [0, 1, 2, 3]
    with pytest.raises(httpx.TransportError):
        httpx.get(served.base + "/health", timeout=2)


def test_the_records_field_follows_the_response_schema(server: Served) -> None:
    import jsonschema

    schema = json.loads((Path(__file__).parent.parent / "schemas" / "response.schema.json").read_text())
    reply = server.client().chat.completions.create(model="calm", max_tokens=3,
                                                    messages=[{"role": "user", "content": "hello"}])
    jsonschema.validate(reply.model_extra["calm"], schema)


@pytest.mark.parametrize("policy", sorted(p.name for p in POLICIES.glob("*.yaml")))
def test_serve_answers_with_every_shipped_policy(policy: str, tiny_env: dict) -> None:
    served = start(tiny_env, policy=policy)
    try:
        raw = served.client().chat.completions.with_raw_response.create(
            model="calm", max_tokens=3, messages=[{"role": "user", "content": "What is 2 + 2?"}])
        reply = raw.parse()
        assert raw.headers["x-calm-policy"] == policy.removesuffix(".yaml")
        assert reply.model_extra["calm"]["error"] is None and reply.model in TINY
    finally:
        assert served.stop() == 0


def test_bench_serve_on_the_tiny_fleet(tiny_env: dict, tmp_path: Path) -> None:
    """`calm bench serve` runs its batching and HTTP measurements end to end and reports them."""
    out = tmp_path / "serve.json"
    result = subprocess.run([sys.executable, "-m", "calm_cli", "bench", "serve", "--parts", "batching,http,remote",
                             "--batch", "3", "--tokens", "4", "--repeats", "2", "--http", "4", "--json", str(out)],
                            env=tiny_env, capture_output=True, timeout=600)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    got = json.loads(out.read_text())
    assert len(got["batching"]["rounds"]) == 2 and got["batching"]["speedup"][0] > 0
    assert all(r["errors"] == 0 and r["same_answers"] == 3 for r in got["batching"]["rounds"])
    added, lo, hi = got["http"]["added_p50_ms"]
    assert lo <= added <= hi and got["http"]["requests"] == 4
    added, lo, hi = got["remote"]["added_p50_ms"]
    assert lo <= added <= hi and got["remote"]["requests"] == 4
    assert b"batching: 3 greedy questions" in result.stdout and b"through a remote member" in result.stdout


@pytest.mark.fleet
def test_a_real_answer_from_smollm2_through_the_openai_client(fleet_store, tmp_path: Path) -> None:
    """The real SmolLM2 (calm's shared cache, a private knowledge base), routed and streamed."""
    import os

    import yaml

    for name in ("smollm2-135m", "minilm-l6"):
        result = subprocess.run([sys.executable, "-m", "calm_cli", "models", "export", name], capture_output=True)
        assert result.returncode == 0, result.stderr.decode()[-2000:]
    data = yaml.safe_load((POLICIES / "default.yaml").read_text())
    data["name"], data["fleet"], data["escalation"] = "smol", [dict(data["fleet"][0], max_tokens=24)], \
        {"enabled": False}
    policy = tmp_path / "smol.yaml"
    policy.write_text(yaml.safe_dump(data))
    env = {k: v for k, v in os.environ.items() if k != "CALM_API_KEY"} | {"CALM_DATA_DIR": str(tmp_path / "data")}
    served = start(env, policy=str(policy))
    try:
        client = served.client(timeout=300)
        ask = dict(model="calm", temperature=0, messages=[{"role": "user", "content": "What is 2 + 2?"}])
        whole = client.chat.completions.create(**ask)
        assert whole.model == "smollm2-135m" and "4" in whole.choices[0].message.content  # SmolLM2 gets this one
        record = whole.model_extra["calm"]
        assert record["metrics"]["provider"] and record["metrics"]["tokens_out"] == whole.usage.completion_tokens
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**ask, stream=True)
                           if c.choices)
        assert streamed == whole.choices[0].message.content
    finally:
        assert served.stop() == 0, served.stderr.decode()[-2000:]
