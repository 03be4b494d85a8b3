"""`/metrics` after real traffic on a live cluster, parsed with prometheus_client's parser.

Parts: histogram counts equal the requests sent, token counters equal the usage the API
returned, inter-token observations equal tokens after the first, finish reasons counted,
per-stage series for every worker (KV usage, tokens processed, layer range), gauges at rest.
"""

from __future__ import annotations

import time

import httpx
import pytest
from live_cluster import LiveCluster, shared_cluster, sse_events
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.slow  # a live cluster of worker processes

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(scope="module")
def live(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> LiveCluster:
    return shared_cluster(request.config, tmp_path_factory)


def scrape(live: LiveCluster) -> tuple[Samples, dict[str, str]]:
    response = httpx.get(f"{live.url}/metrics", timeout=30)  # open without the API key, as in vLLM
    assert response.status_code == 200, response.text
    samples: Samples = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(response.text):
        types[family.name] = family.type
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples, types


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_after_real_traffic(live: LiveCluster) -> None:
    before, _ = scrape(live)
    usages = [live.complete(f"request number {i}", max_tokens)["usage"] for i, max_tokens in enumerate([3, 7, 12])]
    body = {"model": live.model, "messages": [{"role": "user", "content": "stream please"}], "max_tokens": 9,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    with live.http.stream("POST", "/v1/chat/completions", json=body) as stream:
        events = list(sse_events(stream.iter_lines()))
    usages.append(events[-1]["usage"])
    after, types = scrape(live)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    n = len(usages)
    prompt = sum(u["prompt_tokens"] for u in usages)
    generated = sum(u["completion_tokens"] for u in usages)
    assert [u["completion_tokens"] for u in usages] == [3, 7, 12, 9]
    for histogram in ("potluck:time_to_first_token_seconds", "potluck:e2e_request_latency_seconds",
                      "potluck:request_prompt_tokens", "potluck:request_generation_tokens"):
        assert types[histogram] == "histogram"
        assert delta(f"{histogram}_count") == n, histogram
        assert delta(f"{histogram}_bucket", le="+Inf") == n, histogram
        assert delta(f"{histogram}_sum") > 0, histogram
    for histogram in ("potluck:inter_token_latency_seconds", "potluck:time_per_output_token_seconds"):
        assert delta(f"{histogram}_count") == generated - n, histogram
    assert delta("potluck:request_prompt_tokens_sum") == prompt
    assert delta("potluck:request_generation_tokens_sum") == generated
    assert types["potluck:prompt_tokens"] == types["potluck:generation_tokens"] == "counter"
    assert delta("potluck:prompt_tokens_total") == prompt > 0
    assert delta("potluck:generation_tokens_total") == generated
    assert delta("potluck:request_success_total", finished_reason="length") == n
    assert delta("potluck:request_success_total", finished_reason="stop") == 0
    assert value(after, "potluck:num_requests_running") == 0 and value(after, "potluck:num_requests_waiting") == 0
    assert value(after, "potluck:workers", state="ready") == 2 and value(after, "potluck:workers", state="error") == 0
    assert value(after, "potluck:pipelines", kind="usable") == 1


def test_per_stage_series_for_every_worker(live: LiveCluster) -> None:
    live.complete("make the stages work", 6)
    workers = live.cluster()["workers"]
    deadline = time.monotonic() + 10
    while True:  # heartbeats carry tokens_processed every 0.5 s
        samples, types = scrape(live)
        processed = {w["id"]: value(samples, "potluck:stage_tokens_processed_total", stage=w["id"], device=w["device"])
                     for w in workers}
        if all(v > 0 for v in processed.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert all(v > 0 for v in processed.values()), processed
    assert types["potluck:stage_tokens_processed"] == "counter" and types["potluck:kv_cache_usage_perc"] == "gauge"
    for w in workers:
        labels = {"stage": w["id"], "device": w["device"]}
        for name in ("potluck:kv_cache_usage_perc", "potluck:stage_step_time_seconds", "potluck:stage_kv_capacity_tokens",
                     "potluck:stage_in_flight_requests", "potluck:stage_running_requests"):
            assert (name, tuple(sorted(labels.items()))) in samples, (name, labels)
        assert 0.0 <= value(samples, "potluck:kv_cache_usage_perc", **labels) <= 1.0
        assert value(samples, "potluck:stage_kv_capacity_tokens", **labels) == w["kv_capacity_tokens"] > 0
        assert value(samples, "potluck:stage_start_layer", **labels) == w["loaded_layers"][0]
        assert value(samples, "potluck:stage_end_layer", **labels) == w["loaded_layers"][1]
        assert value(samples, "potluck:stage_step_time_seconds", **labels) > 0


def test_a_repeated_prompt_reports_cached_tokens_and_per_stage_prefix_hits(live: LiveCluster) -> None:
    workers = live.cluster()["workers"]
    before, _ = scrape(live)
    prompt = "The same long history, sent again by a chat client on its next turn. " * 3
    first = live.complete(prompt, 2)["usage"]
    second = live.complete(prompt, 2)["usage"]
    assert first["prompt_tokens"] == second["prompt_tokens"] > 32
    # whole 16-token blocks, never the one holding the last prompt token
    assert second["prompt_tokens_details"]["cached_tokens"] == (second["prompt_tokens"] - 1) // 16 * 16
    deadline = time.monotonic() + 10
    while True:  # heartbeats carry the counters every 0.5 s
        after, types = scrape(live)
        hits = [value(after, "potluck:prefix_cache_hits_total", stage=w["id"], device=w["device"])
                - value(before, "potluck:prefix_cache_hits_total", stage=w["id"], device=w["device"]) for w in workers]
        if all(h >= second["prompt_tokens_details"]["cached_tokens"] for h in hits) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert types["potluck:prefix_cache_queries"] == types["potluck:prefix_cache_hits"] == "counter"
    assert all(h >= second["prompt_tokens_details"]["cached_tokens"] for h in hits), hits
    for w in workers:
        labels = {"stage": w["id"], "device": w["device"]}
        queried = value(after, "potluck:prefix_cache_queries_total", **labels) - value(before, "potluck:prefix_cache_queries_total", **labels)
        assert queried >= first["prompt_tokens"] + second["prompt_tokens"]
