"""The engine's Prometheus metrics, named like vLLM's with a `potluck:` prefix.

Parts:
- `RequestTimer`: per-request timestamps the hooks need (start, first token, last token).
- `EngineMetrics`: one `CollectorRegistry` per engine (never the global one). The engine calls
  `on_start` when `generate()` accepts a request, `on_token` per token (cheap: one clock read,
  two histogram observations, one counter increment), `on_finish` when it ends with a finish
  reason and `on_end` whatever happened. Series it owns:
  histograms `potluck:time_to_first_token_seconds`, `potluck:inter_token_latency_seconds`,
  `potluck:time_per_output_token_seconds` (vLLM's older name; the same per-token observations),
  `potluck:e2e_request_latency_seconds`, `potluck:request_prompt_tokens`,
  `potluck:request_generation_tokens`; counters `potluck:prompt_tokens_total`,
  `potluck:generation_tokens_total`, `potluck:request_success_total{finished_reason}`,
  `potluck:request_aborted_total`, `potluck:request_restarts_total{cause}` (a request moved to a
  new route: `worker_lost`, `reassigned`, `kv_full` (vLLM's preemption), `failed`).
- `EngineCollector`: gauges read from the engine at scrape time: `potluck:num_requests_running`,
  `potluck:num_requests_waiting`, `potluck:workers{state}`, `potluck:pipelines{kind}` and per
  worker (`stage` = worker id, `device` = its device): `potluck:kv_cache_usage_perc`,
  `potluck:stage_kv_capacity_tokens`, `potluck:stage_tokens_processed_total`,
  `potluck:stage_step_time_seconds`, `potluck:stage_in_flight_requests`,
  `potluck:stage_running_requests`, `potluck:stage_start_layer`, `potluck:stage_end_layer`
  (-1 while a worker holds no layers), and vLLM's prefix-cache counters per stage:
  `potluck:prefix_cache_queries` (prompt tokens looked up), `potluck:prefix_cache_hits` (found).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from scheduler.snapshots import worker_state_name

# vLLM's buckets (seconds), so dashboards built for vLLM read these the same way.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)
RESTART_CAUSES = ("worker_lost", "reassigned", "kv_full", "failed")
WORKER_STATES = ("ready", "loading", "draining", "idle", "error")


@dataclass
class RequestTimer:
    num_prompt_tokens: int
    started_s: float = field(default_factory=time.monotonic)
    last_token_s: float = 0.0
    num_tokens: int = 0
    finished: bool = False


class EngineMetrics:
    """Histograms and counters the engine updates, plus a collector reading it at scrape time."""

    def __init__(self, engine: Any) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.ttft = Histogram("potluck:time_to_first_token_seconds", "Time to first token, from the request's arrival.",
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("potluck:inter_token_latency_seconds", "Time between consecutive tokens of a request.",
                             buckets=ITL_BUCKETS, registry=r)
        self.tpot = Histogram("potluck:time_per_output_token_seconds",
                              "Time per output token after the first (vLLM's older name for inter-token latency).",
                              buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("potluck:e2e_request_latency_seconds", "Request latency from arrival to its last token.",
                             buckets=E2E_BUCKETS, registry=r)
        self.request_prompt = Histogram("potluck:request_prompt_tokens", "Prompt tokens per finished request.",
                                        buckets=TOKEN_BUCKETS, registry=r)
        self.request_generation = Histogram("potluck:request_generation_tokens", "Generated tokens per finished request.",
                                            buckets=TOKEN_BUCKETS, registry=r)
        self.prompt_tokens = Counter("potluck:prompt_tokens", "Prompt tokens of requests that produced a token.", registry=r)
        self.generation_tokens = Counter("potluck:generation_tokens", "Tokens generated (streamed to clients).", registry=r)
        self.request_success = Counter("potluck:request_success", "Requests that finished, by finish reason.",
                                       ["finished_reason"], registry=r)
        for reason in ("stop", "length"):
            self.request_success.labels(reason)
        self.request_aborted = Counter("potluck:request_aborted", "Requests that ended without a finish reason "
                                       "(client gone, failure, no capacity).", registry=r)
        self.request_restarts = Counter("potluck:request_restarts", "Requests started again on a new route, by cause "
                                        "(kv_full is a preemption: the stage could not grow it).", ["cause"], registry=r)
        for cause in RESTART_CAUSES:
            self.request_restarts.labels(cause)
        self.active = 0  # requests inside generate(): running (holding a route) or waiting for one
        r.register(EngineCollector(engine, self))

    # ------------------------------------------------------------------------ hooks (hot path)
    def on_start(self, num_prompt_tokens: int) -> RequestTimer:
        self.active += 1
        return RequestTimer(num_prompt_tokens)

    def on_token(self, timer: RequestTimer) -> None:
        now = time.monotonic()
        if timer.num_tokens == 0:
            self.ttft.observe(now - timer.started_s)
            self.prompt_tokens.inc(timer.num_prompt_tokens)
        else:
            gap = now - timer.last_token_s
            self.itl.observe(gap)
            self.tpot.observe(gap)
        timer.last_token_s = now
        timer.num_tokens += 1
        self.generation_tokens.inc()

    def on_finish(self, timer: RequestTimer, finish_reason: str) -> None:
        timer.finished = True
        self.e2e.observe(time.monotonic() - timer.started_s)
        self.request_prompt.observe(timer.num_prompt_tokens)
        self.request_generation.observe(timer.num_tokens)
        self.request_success.labels(finish_reason).inc()

    def on_restart(self, reason: str) -> None:
        cause = ("kv_full" if "KV cache is full" in reason else "worker_lost" if " lost" in reason
                 else "reassigned" if "re-assigned" in reason else "failed")
        self.request_restarts.labels(cause).inc()

    def on_end(self, timer: RequestTimer) -> None:
        self.active -= 1
        if not timer.finished:
            self.request_aborted.inc()


class EngineCollector(Collector):
    """Gauges computed from the engine's registry of workers and requests when Prometheus scrapes."""

    def __init__(self, engine: Any, metrics: EngineMetrics) -> None:
        self.engine = engine
        self.metrics = metrics

    def describe(self) -> list[Metric]:
        return []  # computed at scrape time; nothing to check for duplicates

    def collect(self) -> Iterator[Metric]:
        engine = self.engine
        running = len({state.request.request_id for state in list(engine.requests.values())})
        yield GaugeMetricFamily("potluck:num_requests_running", "Requests holding a route through the workers.", value=running)
        yield GaugeMetricFamily("potluck:num_requests_waiting", "Requests waiting for a usable route.",
                                value=max(0, self.metrics.active - running))
        workers = list(engine.cluster.workers.values())
        by_state = GaugeMetricFamily("potluck:workers", "Registered workers, by state.", labels=["state"])
        for state in WORKER_STATES:
            by_state.add_metric([state], sum(1 for w in workers if worker_state_name(w) == state))
        yield by_state
        plan = engine.cluster.plan
        pipelines = GaugeMetricFamily("potluck:pipelines", "Pipelines in the plan, and those usable now.", labels=["kind"])
        pipelines.add_metric(["planned"], len(plan.pipelines) if plan is not None else 0)
        pipelines.add_metric(["usable"], len(engine.cluster.usable_routes()))
        yield pipelines

        labels = ["stage", "device"]
        kv = GaugeMetricFamily("potluck:kv_cache_usage_perc", "KV cache usage of each stage (1 = full).", labels=labels)
        kv_cap = GaugeMetricFamily("potluck:stage_kv_capacity_tokens", "KV cache capacity of each stage, in tokens.", labels=labels)
        processed = CounterMetricFamily("potluck:stage_tokens_processed", "Tokens each stage has run through its layers.", labels=labels)
        step = GaugeMetricFamily("potluck:stage_step_time_seconds", "Moving average of each stage's batch step time.", labels=labels)
        in_flight = GaugeMetricFamily("potluck:stage_in_flight_requests", "Requests routed through each stage.", labels=labels)
        stage_running = GaugeMetricFamily("potluck:stage_running_requests", "Requests each stage reports running.", labels=labels)
        start = GaugeMetricFamily("potluck:stage_start_layer", "First layer each stage holds (-1: none).", labels=labels)
        end = GaugeMetricFamily("potluck:stage_end_layer", "End (exclusive) of each stage's layers (-1: none).", labels=labels)
        queries = CounterMetricFamily("potluck:prefix_cache_queries", "Prompt tokens each stage looked up in its prefix cache.", labels=labels)
        hits = CounterMetricFamily("potluck:prefix_cache_hits", "Prompt tokens each stage found in its prefix cache.", labels=labels)
        for w in sorted(workers, key=lambda w: w.worker_id):
            key = [w.worker_id, w.device]
            heartbeat = w.heartbeat
            capacity = heartbeat.kv_capacity_tokens if heartbeat and heartbeat.kv_capacity_tokens else w.kv_capacity_tokens
            free = w.kv_free_tokens
            kv.add_metric(key, 1.0 - free / capacity if capacity > 0 else 0.0)
            kv_cap.add_metric(key, capacity)
            processed.add_metric(key, heartbeat.tokens_processed if heartbeat else 0)
            step.add_metric(key, heartbeat.step_time_ewma_s if heartbeat else 0.0)
            in_flight.add_metric(key, w.in_flight)
            stage_running.add_metric(key, heartbeat.running_requests if heartbeat else 0)
            layers = w.loaded or w.assigned
            start.add_metric(key, layers[0] if layers else -1)
            end.add_metric(key, layers[1] if layers else -1)
            queries.add_metric(key, heartbeat.prefix_cache_queries_tokens if heartbeat else 0)
            hits.add_metric(key, heartbeat.prefix_cache_hits_tokens if heartbeat else 0)
        yield from (kv, kv_cap, processed, step, in_flight, stage_running, start, end, queries, hits)
