"""Evaluator against Helix's published objectives, devices.json parsing, table and JSON output."""
from __future__ import annotations

import pytest

from tests.support.problems import HELIX_FACTS as DEFAULT_FACTS
from tests.support.problems import helix_problem, load_facts, stored_ranges
from placement.flow import evaluate_placement
from placement.io import devices_from_json, format_placement_table, placement_to_json
from placement.problem import DeviceSpec, ModelSpec, PlacementProblem
from placement.solver import solve_placement

needs_facts = pytest.mark.skipif(not DEFAULT_FACTS.exists(), reason="Helix facts not present")


@needs_facts
@pytest.mark.parametrize("key", ["single24_llama70b/helix_milp", "3region24_llama70b/helix_milp",
                                 "hetero42_llama70b/helix_milp", "cluster10_llama30b/helix_milp_optimal"])
def test_evaluator_reproduces_helix(key: str) -> None:
    facts = load_facts()
    sol = facts["solutions"][key]
    value, _, pipes = evaluate_placement(helix_problem(facts, sol["instance"]), stored_ranges(facts, key))
    assert value == pytest.approx(sol["helix_reported_milp_objective"], rel=1e-7)
    assert sum(p.flow_tokens_per_s for p in pipes) == pytest.approx(value, rel=1e-6)


@needs_facts
def test_helix_targets_fast_instances() -> None:
    facts = load_facts()
    c10 = solve_placement(helix_problem(facts, "cluster10_llama30b"), time_limit_s=3.0)
    assert c10.throughput_tokens_per_s == pytest.approx(286.5874097546, rel=1e-7)
    s24 = solve_placement(helix_problem(facts, "single24_llama70b"), time_limit_s=5.0)
    assert s24.throughput_tokens_per_s >= 2000
    assert s24.status == "optimal"


def test_devices_json_table_and_json() -> None:
    obj = {"devices": [{"id": "a", "memory_bytes": "8GB", "kind": "4090", "tokens_per_s": [100, 50, 30, 20]},
                       {"id": "b", "memory_bytes": 8e9, "flops_per_s": 1e14, "memory_bandwidth_bytes_per_s": 1e12}],
           "links": [{"src": "a", "dst": "b", "bandwidth_bytes_per_s": 1e9, "latency_s": 0.002}]}
    devices, links = devices_from_json(obj)
    assert devices[0].memory_bytes == 8_000_000_000 and links[0].latency_s == 0.002
    problem = PlacementProblem(ModelSpec.uniform(4, 1_000_000_000), devices, links)
    p = solve_placement(problem, time_limit_s=1.0)
    text = format_placement_table(p, problem)
    assert "throughput" in text and "a" in text
    js = placement_to_json(p)
    covered = set()
    for s, e in js["ranges"].values():
        covered |= set(range(s, e))
    assert covered == set(range(4))
    assert js["throughput_tokens_per_s"] == pytest.approx(p.throughput_tokens_per_s)


def test_workload_mix_charges_prefill_to_each_output_token() -> None:
    from placement.network import capacity_table

    model = ModelSpec.uniform(4, 1_000_000)
    measured = DeviceSpec("m", 10**9, decode_layer_time_s=((1, 0.001), (64, 0.002)), prefill_layer_time_per_token_s=1e-4)
    roofline = DeviceSpec("r", 10**9, flops_per_s=1e9, memory_bandwidth_bytes_per_s=1e9)
    decode_only = PlacementProblem(model, (measured, roofline))
    mixed = PlacementProblem(model, (measured, roofline), prompt_tokens_per_output_token=4.0)
    assert capacity_table(decode_only, measured)[0] == pytest.approx(64 / 0.002)
    assert capacity_table(mixed, measured)[0] == pytest.approx(1 / (0.002 / 64 + 4 * 1e-4))
    assert capacity_table(mixed, measured)[1] == pytest.approx(capacity_table(mixed, measured)[0] / 2)
    # roofline: a decode step reads the 1 MB layer in 1 ms and computes 1 ms per sequence, so 1 ms per
    # token at any batch; prefill is compute-bound at 1 MB / 1 GFLOP/s = 1 ms per prompt token
    assert capacity_table(mixed, roofline)[0] == pytest.approx(1 / (0.001 + 4 * 0.001))


def test_kv_memory_caps_the_batch_in_the_capacity() -> None:
    from placement.network import capacity_table

    model = ModelSpec.uniform(4, 1_000_000, kv_bytes_per_token_per_layer=1_000)
    device = DeviceSpec("m", 10_000_000, decode_layer_time_s=((1, 0.001), (64, 0.002)))
    capped = PlacementProblem(model, (device,), kv_tokens_per_sequence=100)   # 100 kB per sequence and layer
    free = capacity_table(PlacementProblem(model, (device,)), device)
    table = capacity_table(capped, device)
    assert table[0] == pytest.approx(free[0])          # 1 layer: 9 MB hold 90 sequences > 64
    t15 = 0.001 + 0.001 * 14 / 63                       # 4 layers: 6 MB hold 15 sequences
    assert table[3] == pytest.approx(1 / (4 * t15 / 15))
    assert table[3] < free[3] * 0.5
    with pytest.raises(ValueError, match="kv_tokens_per_sequence"):
        PlacementProblem(model, (device,), kv_tokens_per_sequence=-1)
