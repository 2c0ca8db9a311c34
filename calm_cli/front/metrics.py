"""Prometheus metrics of `calm serve`, on prometheus-client with a registry of its own (never the process-wide
default, so two servers in one test process do not collide).

Request metrics are observed from each request's record (the same record the response carries), so what
/metrics counts is what clients were told. The cache and the scheduler are read at scrape time by a collector:
their counters live in the loop and are not copied.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# Latency of a small-model answer on a CPU spans milliseconds (a cached short answer) to a minute.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class LoopCollector(Collector):
    """Cache and scheduler state as Prometheus families, read from the loop's own counters at scrape time."""

    def __init__(self, state: Callable[[], dict[str, Any] | None]):
        self.state = state

    def collect(self) -> Iterator[Metric]:
        stats = self.state()
        if stats is None:  # still loading: no loop to read
            return
        cache, scheduler = stats["cache"], stats["scheduler"]
        for name, key, help_text in (("calm_cache_hits", "hits", "Requests whose member was already loaded."),
                                     ("calm_cache_misses", "misses", "Requests that had to wait for a load."),
                                     ("calm_cache_loads", "loads", "Member loads committed."),
                                     ("calm_cache_evictions", "evictions", "Members evicted.")):
            family = CounterMetricFamily(name, help_text)
            family.add_metric([], float(cache[key]))
            yield family
        loaded = GaugeMetricFamily("calm_loaded_memory_bytes", "Memory of the loaded members, by member.",
                                   labels=["model"])
        for entry in cache["loaded"]:
            loaded.add_metric([entry["model"]], entry["memory_mb"] * 1e6)
        yield loaded
        budget = GaugeMetricFamily("calm_cache_budget_bytes", "The policy's memory budget for loaded members.")
        budget.add_metric([], cache["budget_mb"] * 1e6)
        yield budget
        waiting = GaugeMetricFamily("calm_queue_depth", "Requests waiting in the scheduler for a member.")
        waiting.add_metric([], float(scheduler["waiting"]))
        yield waiting
        running = GaugeMetricFamily("calm_running_requests", "Requests a member is answering now, by member.",
                                    labels=["model"])
        for model, count in scheduler["running"].items():
            running.add_metric([model], float(count))
        yield running


class Metrics:
    """The server's metrics: `observe` each record; `in_flight` reads the front's own count (set_function)."""

    def __init__(self, state: Callable[[], dict[str, Any] | None]):
        disable_created_metrics()  # no *_created series: a server's start time is not worth a series per label set
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("calm_requests", "Requests answered or refused, by endpoint, member and code "
                                "(ok or the error code).", ["endpoint", "model", "code"], registry=r)
        self.latency = Histogram("calm_request_latency_seconds", "Arrival to last token, by member.", ["model"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("calm_ttft_seconds", "Arrival to first token, by member.", ["model"],
                              buckets=TTFT_BUCKETS, registry=r)
        self.tokens_in = Counter("calm_prompt_tokens", "Prompt tokens of answered requests.", ["model"], registry=r)
        self.tokens_out = Counter("calm_completion_tokens", "Tokens generated for answered requests.", ["model"],
                                  registry=r)
        self.energy = Counter("calm_energy_joules", "Energy of answered requests (estimated: CPU-seconds x "
                              "CALM_WATTS_PER_CORE; measured: NVML).", ["model", "kind"], registry=r)
        self.escalations = Counter("calm_escalations", "Answers escalated to the larger member.",
                                   ["from_model", "to_model"], registry=r)
        self.fallbacks = Counter("calm_fallbacks", "Requests answered by another member after one failed.",
                                 ["from_model"], registry=r)
        self.in_flight = Gauge("calm_http_requests_in_flight", "Requests the HTTP front holds now.", registry=r)
        r.register(LoopCollector(state))

    def observe(self, endpoint: str, record: dict) -> None:
        error = record.get("error")
        model = record.get("model") or "none"
        self.requests.labels(endpoint, model, error["code"] if error else "ok").inc()
        if error:
            return
        m, routing = record["metrics"], record["routing"]
        self.latency.labels(model).observe(m["latency_ms"] / 1000)
        self.ttft.labels(model).observe(m["ttft_ms"] / 1000)
        self.tokens_in.labels(model).inc(m["tokens_in"])
        self.tokens_out.labels(model).inc(m["tokens_out"])
        self.energy.labels(model, "estimated" if m["energy_estimated"] else "measured").inc(m["energy_j"])
        if routing["escalated_from"]:
            self.escalations.labels(routing["escalated_from"], model).inc()
        if routing["fallback_from"]:
            self.fallbacks.labels(routing["fallback_from"]).inc()

    def refused(self, endpoint: str, code: str) -> None:
        """A request refused before the loop saw it (bad body, unknown model, full queue, missing key)."""
        self.requests.labels(endpoint, "none", code).inc()
