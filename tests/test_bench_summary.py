"""The workload bench's per-system summary: a failed request counts as a wrong answer and is named."""

from __future__ import annotations

from calm_cli.bench.workload import QueryResult, SystemResult
from calm_cli.eval.tasks import Item


def test_failed_requests_score_zero_and_are_counted() -> None:
    item = Item(task="arithmetic", item_id="arithmetic/1", domain="arithmetic", kind="gen", query="2+2?")
    results = [QueryResult(item, "qwen2.5-coder-0.5b", 1.0, 100.0, 2.0, True),
               QueryResult(item, "none", 0.0, 50.0, 0.0, False, cache_hit=False, failed=True)]
    summary = SystemResult("calm (default)", results, 900.0).summary({"latency_p95_ms": 80})
    assert summary["failures"] == 1 and summary["quality"] == 0.5 and summary["queries"] == 2
    assert summary["models"] == {"qwen2.5-coder-0.5b": 1, "none": 1}
    assert summary["energy_estimated"] and summary["latency_goal_violations"] == 1


def test_a_failed_scenario_is_reported_in_place_and_the_run_goes_on() -> None:
    from calm_cli.bench.workload import _scenario

    out: dict = {"shift": {"adaptive": {"quality": 0.5}}}
    logged: list[str] = []
    with _scenario("arrival", out, logged.append):
        raise StopIteration("no candidate for the chosen member")
    assert out["arrival"] == {"error": "StopIteration: no candidate for the chosen member"}
    assert out["shift"] == {"adaptive": {"quality": 0.5}} and "scenario arrival failed" in logged[0]
