"""A fleet member answered by a remote OpenAI-compatible server (llama.cpp server, vLLM, Ollama, another
`calm serve`): the same Member interface as a local export, so the loop routes, falls back and learns the same
way; only its costs differ (no local memory, no load).

Answers are streamed (`stream: true`), so TTFT is measured and pieces reach the client as they come.
Confidence is exp(mean log p) of the answer's tokens when the server returns logprobs (asked for unless
`endpoint.logprobs` is false: some servers pay dearly for them); failing that, a
`calm serve` server's own figure (its record rides in the last chunk); failing that it is unavailable (NaN
here, null in the record, and escalation by confidence does not apply). Energy: the server's own figure when it
reports one (a `calm serve` record), else the policy's `endpoint.watts` x wall time (estimated), else 0 and
estimated.

A circuit breaker keeps a dead server from costing every request a timeout: after FAILURES_TO_OPEN failures in a
row the member fails at once for COOLDOWN_S, then one request is let through (half-open); a success closes it.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from typing import Any

import httpx

from calm_cli.members.base import Ask, Member, Run, RunFailed
from calm_cli.policy import MemberPolicy

FAILURES_TO_OPEN = 3
COOLDOWN_S = 10.0
DEFAULT_TIMEOUT_S = 120.0
DEFAULT_PARALLEL = 8  # requests in flight to one server at once (endpoint.max_parallel)


class RemoteMember(Member):
    """`config.endpoint` (schemas/policy.schema.json, $defs.endpoint) says where and how to reach it."""

    precision = None
    remote = True

    def __init__(self, config: MemberPolicy, clock=time.monotonic):
        assert config.endpoint is not None
        self.name, self.config, self.endpoint = config.model, config, dict(config.endpoint)
        self.url = self.endpoint["url"].rstrip("/")
        self.remote_model = self.endpoint.get("model", self.name)
        self.parallel = int(self.endpoint.get("max_parallel", DEFAULT_PARALLEL))
        self.clock = clock
        self._lock = threading.Lock()
        self._failures = 0
        self._open_until = 0.0

    # -- costs: nothing local to hold or load

    def estimate_mb(self) -> float:
        return 0.0

    def load_estimate_ms(self) -> float:
        return 0.0

    def memory_of(self, session: object) -> float:
        return 0.0

    def load(self) -> httpx.Client:
        headers = {}
        key_env = self.endpoint.get("api_key_env")
        if key_env:
            key = os.environ.get(key_env, "")
            if not key:
                raise RunFailed(f"{self.name}: the environment variable {key_env} (endpoint.api_key_env) is not set")
            headers["Authorization"] = f"Bearer {key}"
        timeout = float(self.endpoint.get("timeout_s", DEFAULT_TIMEOUT_S))
        return httpx.Client(base_url=self.url + "/", headers=headers, timeout=httpx.Timeout(timeout, connect=5.0),
                            limits=httpx.Limits(max_connections=self.parallel))

    # -- answering

    def generate(self, session: object, ask: Ask, draft: object | None = None) -> Run:
        assert isinstance(session, httpx.Client)
        self._admit()
        try:
            run = self._generate(session, ask)
        except RunFailed:
            self._failed()
            raise
        with self._lock:
            self._failures, self._open_until = 0, 0.0
        return run

    def _admit(self) -> None:
        """The breaker: fail at once while open; let one request through once the cooldown has passed."""
        with self._lock:
            now = self.clock()
            if self._failures >= FAILURES_TO_OPEN and now < self._open_until:
                raise RunFailed(f"{self.name}: {self.url} failed {self._failures} times in a row; next try in "
                                f"{self._open_until - now:.1f} s")
            if self._failures >= FAILURES_TO_OPEN:
                self._open_until = now + COOLDOWN_S  # half-open: this request probes; the others still wait

    def _failed(self) -> None:
        with self._lock:
            self._failures += 1
            if self._failures >= FAILURES_TO_OPEN:
                self._open_until = self.clock() + COOLDOWN_S

    def _body(self, ask: Ask) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.remote_model, "messages": [{"role": "user", "content": ask.query}],
                                "max_tokens": ask.max_tokens, "temperature": ask.sampling.temperature,
                                "stream": True, "stream_options": {"include_usage": True}}
        if self.endpoint.get("logprobs", True):
            # llama.cpp's server sends the chosen tokens' logprobs only with top_logprobs set
            body.update(logprobs=True, top_logprobs=1)
        if ask.sampling.top_p < 1.0:
            body["top_p"] = ask.sampling.top_p
        if ask.sampling.seed is not None:
            body["seed"] = ask.sampling.seed
        if ask.stop:
            body["stop"] = list(ask.stop)
        return body

    def _generate(self, client: httpx.Client, ask: Ask) -> Run:
        started = time.perf_counter()
        first: float | None = None
        pieces: list[str] = []
        logprobs: list[float] = []
        usage: dict = {}
        finish: str | None = None
        server: dict = {}  # a calm serve server's own record
        try:
            with client.stream("POST", "chat/completions", json=self._body(ask)) as response:
                if response.status_code != 200:
                    response.read()
                    raise RunFailed(f"{self.name}: {self.url} answered {response.status_code}: "
                                    f"{_message(response.text)}")
                for line in response.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if not isinstance(chunk, dict):
                        raise ValueError("a chunk that is not an object")
                    if "error" in chunk:
                        raise RunFailed(f"{self.name}: {self.url} failed mid-answer: {_message(json.dumps(chunk))}")
                    for choice in chunk.get("choices") or []:
                        text = (choice.get("delta") or {}).get("content")
                        if text:
                            first = first or time.perf_counter()
                            pieces.append(text)
                            if ask.on_text:
                                ask.on_text(text)
                        logprobs += [float(t["logprob"]) for t in ((choice.get("logprobs") or {}).get("content") or [])]
                        finish = choice.get("finish_reason") or finish
                    usage = chunk.get("usage") or usage
                    server = chunk.get("calm") or server
        except httpx.HTTPError as exc:
            raise RunFailed(f"{self.name}: {self.url}: {type(exc).__name__}: {exc}") from exc
        except (ValueError, KeyError, TypeError) as exc:  # json's errors are ValueErrors
            raise RunFailed(f"{self.name}: {self.url} sent a malformed stream: {exc}") from exc
        ended = time.perf_counter()
        latency_ms = (ended - started) * 1000
        ttft_ms = ((first or ended) - started) * 1000
        tokens_out = int(usage.get("completion_tokens") or len(logprobs) or len(pieces))
        metrics = server.get("metrics") or {}
        if logprobs:
            confidence = math.exp(sum(logprobs) / len(logprobs))
        elif metrics.get("confidence") is not None:
            confidence = float(metrics["confidence"])
        else:
            confidence = math.nan  # unavailable: the record says null
        if metrics.get("energy_j") is not None:
            energy, estimated = float(metrics["energy_j"]), bool(metrics.get("energy_estimated", True))
        else:
            energy, estimated = latency_ms / 1000 * float(self.endpoint.get("watts", 0.0)), True
        decode_s = (ended - (first or ended))
        return Run(self.name, "".join(pieces), latency_ms, ttft_ms, int(usage.get("prompt_tokens") or 0), tokens_out,
                   (tokens_out - 1) / decode_s if tokens_out > 1 and decode_s > 0 else 0.0, energy, estimated,
                   confidence, f"remote:{self.url}", "length" if finish == "length" else "eos")


def _message(text: str) -> str:
    """The server's error message, short, on one line."""
    try:
        error = json.loads(text).get("error")
        text = error.get("message", text) if isinstance(error, dict) else str(error or text)
    except (ValueError, AttributeError):
        pass
    return " ".join(text.split())[:300]
