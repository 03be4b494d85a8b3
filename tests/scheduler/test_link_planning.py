"""The planner over measured links: consecutive stages stay off a slow link whenever a plan that
avoids it keeps >= 90% of the throughput, and cross it only when none does.

The link figures are those the three namespace boxes measured (tests/e2e/test_links_netns.py,
which runs `check_slow_link_rule` on its own measured table too): a - b 0.14 ms / 180 MB/s,
a - c and b - c 40.9 ms / 12.6 MB/s (c behind 20 ms each way and 100 Mbit/s).
"""
from __future__ import annotations

from dataclasses import replace

import pytest

from placement.problem import PlacementProblem
from placement.solver import solve_placement
from scheduler.cluster import LayerPlan, WorkerState
from scheduler.link_table import LinkTable, probe_requests
from scheduler.planner import SLOW_LINK_KEEP_FRACTION, PlannerConfig, device_spec, model_spec, plan_layers
from scheduler.routing import LoadSnapshot, StageLoad, choose_route, RouteRequest
from workers.device_profile import DeviceProfile, LayerTimings
from workers.protocol import ModelFacts

LAYER_BYTES = 400 * 2**20
MODEL = ModelFacts("llama", 32, 1024, 32000, 4096, "float16", (LAYER_BYTES,) * 32, 250 * 2**20, 250 * 2**20,
                   2 * 8 * 128 * 2, 1024 * 2)
CONFIG = PlannerConfig(max_model_len=512, max_concurrent_sequences=4, time_limit_s=1.0)
MEASURED = {("a", "b"): (0.00014, 180e6), ("a", "c"): (0.0409, 12.6e6), ("b", "c"): (0.0409, 12.6e6)}


def _worker(worker_id: str, slowness: float, memory_bytes: int = 8 * 2**30) -> WorkerState:
    """Neither a nor b holds the 12.5 GiB model alone (about 19 of 32 layers fit in 8 GiB)."""
    timings = LayerTimings("m", 1, LAYER_BYTES, "float16",
                           ((1, 128, 0.0006 * slowness), (64, 128, 0.0012 * slowness)), ((512, 2e-6 * slowness),))
    profile = DeviceProfile("cuda", "cuda", "cuda: test", memory_bytes, 1e14, "float16", 1e12, 0.0, 0.0, layer_timings=timings)
    host = {"a": "10.0.0.1", "b": "10.0.0.2", "c": "10.0.0.3"}[worker_id]
    return WorkerState(worker_id, f"tcp://{host}:7000", memory_bytes, "cuda", profile, 1, 0.0, 0.0,
                       echo_address=f"tcp://{host}:7001")


def _table(measured: dict[tuple[str, str], tuple[float, float]]) -> LinkTable:
    table = LinkTable()
    for (a, b), (rtt_s, bandwidth) in measured.items():
        table.record(a, [(b, rtt_s, bandwidth)])
    return table


def _crosses(plan: LayerPlan, slow: set[tuple[str, str]]) -> bool:
    return any(tuple(sorted(pair)) in slow for route in plan.pipelines for pair in zip(route, route[1:]))


def check_slow_link_rule(table: LinkTable, workers: list[WorkerState]) -> tuple[LayerPlan, float]:
    """Plan over `table`; if a pipeline hands activations over a slow link, the best plan without
    the slow links must fall short of 90% of its throughput. Returns (plan, that plan's throughput)."""
    plan = plan_layers(MODEL, workers, CONFIG, 1, links=table)
    slow = table.slow_pairs(w.worker_id for w in workers)
    assert slow
    devices = tuple(device_spec(w, MODEL) for w in sorted(workers, key=lambda w: w.worker_id))
    problem = PlacementProblem(model_spec(MODEL), devices, kv_reserve_tokens=CONFIG.max_model_len * CONFIG.max_concurrent_sequences,
                               prompt_tokens_per_output_token=CONFIG.prompt_tokens_per_output_token,
                               links=tuple(l for l in table.link_specs(d.device_id for d in devices)
                                           if tuple(sorted((l.src, l.dst))) not in slow))
    avoiding = solve_placement(problem, time_limit_s=CONFIG.time_limit_s).throughput_tokens_per_s
    if _crosses(plan, slow):
        assert avoiding < SLOW_LINK_KEEP_FRACTION * plan.predicted_tokens_per_s, (plan, avoiding)
    else:
        assert plan.predicted_tokens_per_s >= SLOW_LINK_KEEP_FRACTION * avoiding * 0.999
    return plan, avoiding


@pytest.mark.slow  # CP-SAT, three solves
def test_a_slow_box_that_adds_little_is_kept_off_the_slow_link() -> None:
    workers = [_worker("a", 1.0), _worker("b", 1.0), _worker("c", 12.0)]
    plan, _ = check_slow_link_rule(_table(MEASURED), workers)
    assert not _crosses(plan, {("a", "c"), ("b", "c")})
    assert ("a", "b") in plan.pipelines or ("b", "a") in plan.pipelines


@pytest.mark.slow  # CP-SAT, three solves
def test_the_slow_link_is_crossed_only_when_no_plan_without_it_comes_close() -> None:
    # c is as fast as a and b: a third of the layers each beats two halves by far
    workers = [_worker("a", 1.0), _worker("b", 1.0), _worker("c", 1.0)]
    plan, avoiding = check_slow_link_rule(_table(MEASURED), workers)
    assert _crosses(plan, {("a", "c"), ("b", "c")}) and avoiding < SLOW_LINK_KEEP_FRACTION * plan.predicted_tokens_per_s


def test_without_links_nothing_is_slow_and_the_plan_is_as_before() -> None:
    workers = [_worker("a", 1.0), _worker("b", 1.0), _worker("c", 12.0)]
    assert LinkTable().link_specs("abc") == () and LinkTable().slow_pairs("abc") == set()
    assert plan_layers(MODEL, workers, CONFIG, 1).ranges == plan_layers(MODEL, workers, CONFIG, 1, links=LinkTable()).ranges


def test_routing_charges_each_hop_its_measured_latency() -> None:
    # two replicas of the second half: b (fast link from a) and c (slow link), c a little less loaded
    stages = (StageLoad("a", 0, 16, 0, 0, 10**6, 0.002, 1e-5), StageLoad("b", 16, 32, 0, 2, 10**6, 0.003, 1e-5),
              StageLoad("c", 16, 32, 0, 0, 10**6, 0.002, 1e-5))
    table = _table(MEASURED)
    request = RouteRequest(num_prompt_tokens=64, max_new_tokens=32)
    blind = LoadSnapshot(stages, 32, activation_bytes_per_token=2048)
    measured = replace(blind, hop_latency_s=table.hop_latency_s(), hop_bandwidth_bytes_per_s=table.hop_bandwidth_bytes_per_s())
    assert choose_route(blind, request).worker_ids == ("a", "c")
    assert choose_route(measured, request).worker_ids == ("a", "b")


def test_link_table_records_forgets_and_reports_changes() -> None:
    table = LinkTable()
    assert table.record("a", [("b", 0.010, 1e8)])
    assert not table.record("b", [("a", 0.011, 1.1e8)])  # within 25%: not worth a re-plan
    assert table.record("b", [("a", 0.040, 1.1e8)])
    assert table.hop_latency_s() == {("a", "b"): 0.020, ("b", "a"): 0.020}
    specs = table.link_specs(["a", "b", "c"])  # c unmeasured: default links keep it connected
    assert {(s.src, s.dst) for s in specs} == {("a", "b"), ("a", "c"), ("b", "c")}
    assert not table.record("a", [("z", 0.01, 1e8), ("c", float("inf"), 1e8), ("c", 0.01, float("nan"))], known="abc")
    assert len(table.rows()) == 1  # an unknown peer and figures that are not finite and positive: dropped
    table.forget("a")
    assert table.rows() == [] and table.link_specs(["a", "b"]) == ()


def test_probe_requests_ask_for_each_pair_on_another_host_once() -> None:
    workers = {w: WorkerState(w, f"tcp://{host}:7000", 2**30, "cpu", None, 1, 0.0, 0.0, echo_address=f"tcp://{host}:{port}")
               for w, host, port in (("a", "10.0.0.1", 7001), ("b", "10.0.0.2", 7001), ("c", "10.0.0.2", 7002))}
    keys = {"a": "ka", "b": "kb", "c": "kc"}
    everyone = probe_requests(workers, keys)
    assert {w: [peer[0] for peer in m.peers] for w, m in everyone.items()} == {"a": ["b", "c"]}  # b, c share a host
    joined = probe_requests(workers, keys, ("c",))
    assert joined["c"].peers == (("a", "tcp://10.0.0.1:7001", "ka"),)
