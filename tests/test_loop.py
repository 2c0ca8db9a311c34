"""The MAPE-K loop with fake parts (members that answer from a script, an embedding of keywords) and its real
planner, analyzer, cache, executor and an SQLite knowledge base: routing, fallback, escalation, streaming and
records, synchronous and fast."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from calm_cli.errors import MemberFailure, PromptTooLong
from calm_cli.knowledge import open_knowledge
from calm_cli.loop.analyze import Analyzer
from calm_cli.loop.calm import Calm
from calm_cli.loop.execute.cache import MemberCache
from calm_cli.loop.execute.run import Executor
from calm_cli.loop.execute.scheduler import Driver
from calm_cli.loop.plan import Planner
from calm_cli.members.base import Ask, Member, Run
from calm_cli.policy import MemberPolicy, Policy

WORDS = ("code", "chat", "fact")


def embed(texts: list[str]) -> np.ndarray:
    """Keyword counts, unit length: 'code' queries sit near the code member's description, and so on."""
    rows = np.array([[t.lower().count(w) + 0.01 for w in WORDS] for t in texts], dtype=np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


class Scripted(Member):
    """A member that answers 'name: query' with a set confidence, or fails as told."""

    def __init__(self, name: str, description: str, confidence: float = 0.9, mb: float = 100.0):
        self.name, self.config, self.precision = name, MemberPolicy(name, description, max_tokens=8), "int4"
        self.confidence, self.mb, self.fail, self.loads = confidence, mb, None, 0
        self.gate: threading.Event | None = None  # when set, generate waits for it (a request in progress)
        self.asks: list[Ask] = []

    def estimate_mb(self) -> float:
        return self.mb

    def load_estimate_ms(self) -> float:
        return 10.0

    def load(self) -> object:
        self.loads += 1
        return {"session": self.name}

    def memory_of(self, session: object) -> float:
        return self.mb

    def generate(self, session: object, ask: Ask, draft: object | None = None) -> Run:
        if self.fail is not None:
            raise self.fail
        if self.gate is not None:
            self.gate.wait(10)
        self.asks.append(ask)
        text = f"{self.name}: {ask.query}"
        for piece in (text[:4], text[4:]):
            if ask.on_text:
                ask.on_text(piece)
        run = Run(self.name, text, 5.0, 1.0, 3, 2, 100.0, 0.5, True, self.confidence, "fake", "eos")
        if ask.verify is not None:  # as if it kept 3 of the 4 tokens of the answer it checked
            run.draft, run.draft_tokens, run.accepted_tokens = "answer", 4, 3
        return run


def policy(escalate: bool = True, budget: float = 1000, max_loaded: int = 4, mode: str = "verify") -> Policy:
    fleet = (MemberPolicy("coder", "code code code"), MemberPolicy("talker", "chat chat chat"))
    escalation = {"enabled": True, "model": "big", "description": "fact fact", "confidence_threshold": 0.5,
                  "mode": mode} if escalate else {"enabled": False}
    return Policy(name="test", source="test", fleet=fleet, goals={}, weights={
        "semantic": 1.0, "quality": 1.0, "latency": 0.0, "energy": 0.0, "memory": 0.0, "load": 0.0},
        cache={"budget_mb": budget, "max_loaded": max_loaded, "eviction": "lru"}, queue={"discipline": "fifo"},
        escalation=escalation)


@pytest.fixture
def parts(tmp_path: Path):
    made: list[Calm] = []

    def make(pol: Policy, **members: Scripted) -> Calm:
        kb = open_knowledge(tmp_path / "kb.sqlite")
        analyzer = Analyzer(members, kb, pol.goals)
        cache = MemberCache(pol.cache, memory_of=lambda n, h: members[n].mb, estimate_mb=analyzer.memory_mb,
                            load_cost_ms=analyzer.load_cost_ms)
        driver = Driver(members, cache, discipline="fifo", concurrency=2)
        calm = Calm(pol, embed=embed, planner=Planner(pol, list(pol.fleet), embed), analyzer=analyzer,
                    executor=Executor(driver, kb, pol.name), members=members, knowledge=kb)
        made.append(calm)
        return calm

    yield make
    for calm in made:
        calm.close()


def fleet(**over: float) -> dict[str, Scripted]:
    return {"coder": Scripted("coder", "code", over.get("coder", 0.9)),
            "talker": Scripted("talker", "chat", over.get("talker", 0.9)),
            "big": Scripted("big", "fact", over.get("big", 0.9), mb=300)}


def failures(calm: Calm) -> list[tuple[str, str | None]]:
    return sorted((r["model"], r["escalated_from"]) for m in calm.members for r in calm.kb.recent(m)
                  if r["error_code"])


def test_routes_by_fit_and_records_the_run(parts) -> None:
    calm = parts(policy(escalate=False), **fleet())
    record = calm.answer({"id": 1, "query": "some code please"})
    assert record["model"] == "coder" and record["answer"] == "coder: some code please"
    assert record["routing"]["candidates"][0]["model"] == "coder" and record["routing"]["fallback_from"] is None
    assert record["metrics"]["precision"] == "int4" and record["metrics"]["cache_hit"] is False
    assert [r["model"] for r in calm.kb.recent("coder")] == ["coder"]
    again = calm.answer({"id": 2, "query": "more code"})
    assert again["metrics"]["cache_hit"] is True and calm.members["coder"].loads == 1


def test_a_failing_member_falls_back_and_is_counted(parts) -> None:
    members = fleet()
    members["coder"].fail = MemberFailure("the server is down")
    calm = parts(policy(escalate=False), **members)
    record = calm.answer({"id": 1, "query": "code"})
    assert record["model"] == "talker" and record["routing"]["fallback_from"] == "coder"
    assert failures(calm) == [("coder", None)]


def test_every_member_failing_is_model_failed(parts) -> None:
    members = fleet()
    for m in members.values():
        m.fail = MemberFailure(f"{m.name} broke")
    calm = parts(policy(escalate=False), **members)
    record = calm.answer({"id": 1, "query": "code"})
    assert record["error"]["code"] == "model_failed"
    assert "coder: coder broke" in record["error"]["message"] and "talker: talker broke" in record["error"]["message"]


def test_a_bad_request_is_not_retried_on_other_members(parts) -> None:
    members = fleet()
    members["coder"].fail = PromptTooLong("400 tokens exceed the context window")
    calm = parts(policy(escalate=False), **members)
    record = calm.answer({"id": 1, "query": "code"})
    assert record["error"]["code"] == "prompt_too_long" and failures(calm) == []
    assert members["talker"].loads == 0


def test_an_unsure_answer_escalates_and_streams_only_the_final_answer(parts) -> None:
    calm = parts(policy(), **fleet(coder=0.2))
    pieces: list[str] = []
    record = calm.answer({"id": 1, "query": "code"}, on_text=pieces.append)
    assert record["model"] == "big" and record["routing"]["escalated_from"] == "coder"
    assert "".join(pieces) == record["answer"] == "big: code" and len(pieces) == 2
    assert [r["escalated_from"] for r in calm.kb.recent("big")] == ["coder"]


@pytest.mark.parametrize("mode", ["verify", "regenerate"])
def test_escalation_verifies_the_first_answer_or_regenerates(parts, mode: str) -> None:
    """Mode verify hands the larger member the first answer to check (and it runs alone); regenerate does not."""
    members = fleet(coder=0.2)
    calm = parts(policy(mode=mode), **members)
    record = calm.answer({"id": 1, "query": "code"})
    assert record["model"] == "big"
    assert [a.verify for a in members["coder"].asks] == [None]
    assert [a.verify for a in members["big"].asks] == (["coder: code"] if mode == "verify" else [None])
    assert ("kept 3 of the 4 answer tokens" in record["routing"]["reason"]) == (mode == "verify")
    for i in range(3):
        record = calm.answer({"id": i + 2, "query": "code"})
    # What verification learned is evidence in the knowledge base: how much of coder's answers big keeps.
    learned = "recent verified escalations from coder kept 75% of its answers' tokens (n=3)"  # before this one
    assert (learned in record["routing"]["reason"]) == (mode == "verify")
    rows = [r for r in calm.kb.recent("big") if r["escalated_from"] == "coder"]
    assert [(r["draft_tokens"], r["accepted_tokens"]) for r in rows] == \
        ([(4, 3)] * 4 if mode == "verify" else [(None, None)] * 4)


def test_a_sure_answer_is_held_back_whole_then_given(parts) -> None:
    calm = parts(policy(), **fleet(coder=0.9))
    pieces: list[str] = []
    record = calm.answer({"id": 1, "query": "code"}, on_text=pieces.append)
    assert record["model"] == "coder" and pieces == ["coder: code"]


def test_a_failed_escalation_keeps_the_first_answer_and_is_recorded(parts) -> None:
    members = fleet(coder=0.2)
    members["big"].fail = MemberFailure("out of memory")
    calm = parts(policy(), **members)
    record = calm.answer({"id": 1, "query": "code"})
    assert record["model"] == "coder" and record["routing"]["escalated_from"] is None
    assert "escalation to big failed" in record["routing"]["reason"]
    assert failures(calm) == [("big", "coder")]


def test_a_member_running_a_request_is_never_evicted(parts) -> None:
    """Room for one member only: while coder answers, a request for talker cannot evict it: it waits, and is
    answered by talker once coder is done, instead of pulling the session from under the running request."""
    members = fleet()
    members["coder"].gate = threading.Event()
    calm = parts(policy(escalate=False, max_loaded=1), **members)
    first: dict = {}
    running = threading.Thread(target=lambda: first.update(calm.answer({"id": 1, "query": "code"})))
    running.start()
    for _ in range(1000):  # until coder is loaded and running the first request
        if any(m["in_use"] for m in calm.cache.state()["loaded"]):
            break
        time.sleep(0.01)
    assert calm.cache.state()["loaded"][0]["in_use"], first
    second: dict = {}
    waiting = threading.Thread(target=lambda: second.update(calm.answer({"id": 2, "query": "chat", "model": "talker"})))
    waiting.start()
    for _ in range(1000):  # until the talker request waits in the scheduler
        if calm.stats()["scheduler"]["waiting"]:
            break
        time.sleep(0.01)
    assert calm.stats()["scheduler"]["waiting"] == 1 and [m["model"] for m in calm.cache.state()["loaded"]] == ["coder"]
    members["coder"].gate.set()
    running.join()
    waiting.join()
    assert first["model"] == "coder" and first["error"] is None
    assert second["model"] == "talker" and second["error"] is None and failures(calm) == []


def test_a_new_calibration_is_seen_without_a_restart(parts) -> None:
    calm = parts(policy(escalate=False), **fleet())
    assert calm.analyzer.calibration().embeddings.shape == (0, 0)
    calm.kb.add_calibration([{"model": m, "task": "t", "item_id": "1", "score": 1.0, "domain": "code",
                              "embedding": embed(["code"])[0]} for m in ("coder", "talker")])
    record = calm.answer({"id": 1, "query": "code"})
    assert record["routing"]["candidates"][0]["quality"] == 1.0


def test_loads_run_one_at_a_time() -> None:
    """A load's memory is measured as the process's growth while it runs: two loads never overlap, even when
    two workers start them together."""
    running, most = [0], [0]
    lock = threading.Lock()

    class Slow(Scripted):
        def load(self) -> object:
            with lock:
                running[0] += 1
                most[0] = max(most[0], running[0])
            time.sleep(0.2)
            with lock:
                running[0] -= 1
            return super().load()

    members = {"a": Slow("a", "chat"), "b": Slow("b", "code")}
    cache = MemberCache({"budget_mb": 1000, "max_loaded": 4, "eviction": "lru", "prefetch": True},
                        memory_of=lambda n, h: 100.0, estimate_mb=lambda n: 100.0, load_cost_ms=lambda n: 10.0)
    driver = Driver(members, cache, discipline="fifo", concurrency=2)
    try:
        driver.prefetch("a")
        driver.prefetch("b")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(cache.state()["loaded"]) < 2:
            time.sleep(0.02)
        assert {m["model"] for m in cache.state()["loaded"]} == {"a", "b"} and most[0] == 1
    finally:
        driver.shutdown()
