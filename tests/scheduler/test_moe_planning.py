"""MoE models in placement and planning: memory holds every expert, a decode step is charged only
the experts it reads; the facts of an MoE checkpoint, `potluck plan` on it, the router's costs."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest

from placement.network import build_network, capacity_table, prefill_time_per_token_s
from placement.problem import DeviceSpec, InfeasiblePlacementError, ModelSpec, PlacementProblem
from placement.solver import solve_placement

LAYER = 10**9  # a Qwen3-235B-A22B-like layer: 90% routed experts, 8 of 128 per token
DENSE = ModelSpec.uniform(48, LAYER, activation_bytes_per_token=8192)
MOE = replace(DENSE, expert_bytes=(9 * LAYER // 10,) * 48, num_experts=128, experts_per_token=8)


def test_read_and_compute_bytes_of_an_moe_layer():
    rest, experts = LAYER // 10, 9 * LAYER // 10
    assert MOE.decode_read_bytes_per_layer(1) == pytest.approx(rest + experts * 8 / 128)
    assert MOE.compute_bytes_per_token_per_layer() == pytest.approx(rest + experts * 8 / 128)
    # a batch reaches more experts: 1 - (120/128)^b of them under uniform routing
    assert MOE.decode_read_bytes_per_layer(16) == pytest.approx(rest + experts * (1 - (120 / 128) ** 16))
    assert MOE.decode_read_bytes_per_layer(512) == pytest.approx(LAYER, rel=1e-6)
    assert DENSE.decode_read_bytes_per_layer(7) == DENSE.compute_bytes_per_token_per_layer() == LAYER
    with pytest.raises(ValueError, match="experts_per_token"):
        replace(DENSE, expert_bytes=(1,) * 48, num_experts=4, experts_per_token=5)
    with pytest.raises(ValueError, match="48 entries"):
        replace(DENSE, expert_bytes=(1,) * 47, num_experts=4, experts_per_token=2)


def test_roofline_charges_read_experts_while_memory_counts_all():
    device = DeviceSpec("gpu", memory_bytes=48 * LAYER, flops_per_s=1e14, memory_bandwidth_bytes_per_s=1e12, max_batch=1)
    dense = PlacementProblem(DENSE, (device,))
    moe = PlacementProblem(MOE, (device,))
    active = MOE.decode_read_bytes_per_layer(1)
    # batch 1 is bandwidth-bound: tokens/s scale with the bytes read, LAYER / active = 6.4x
    for k in (1, 5, 12):
        assert capacity_table(moe, device)[k - 1] == pytest.approx(1e12 / (k * active))
        assert capacity_table(moe, device)[k - 1] / capacity_table(dense, device)[k - 1] == pytest.approx(LAYER / active)
    assert prefill_time_per_token_s(moe, device) == pytest.approx(active / 1e14)
    # memory: the same layers fit either way (every expert is held)
    assert build_network(moe).starts == build_network(dense).starts
    assert build_network(moe).kmax(0) == 48
    smaller = replace(device, memory_bytes=48 * LAYER - 1)
    with pytest.raises(InfeasiblePlacementError):
        build_network(PlacementProblem(MOE, (smaller,)))


def test_moe_placement_fits_by_all_experts_and_runs_faster_than_dense_at_batch_1():
    devices = tuple(DeviceSpec(f"d{i}", memory_bytes=17 * LAYER, flops_per_s=1e14, memory_bandwidth_bytes_per_s=1e12)
                    for i in range(3))
    dense = solve_placement(PlacementProblem(DENSE, devices), time_limit_s=5, deterministic=True)
    moe = solve_placement(PlacementProblem(MOE, devices), time_limit_s=5, deterministic=True)
    assert sum(e - s for s, e in moe.ranges.values()) == 48
    # one token per step reads 8/128 of the experts: 4.5x lower latency; at the best batch (64)
    # the steps reach ~98% of the experts, so throughput gains little
    assert moe.latency_s < dense.latency_s / 4
    assert dense.throughput_tokens_per_s < moe.throughput_tokens_per_s < 1.1 * dense.throughput_tokens_per_s
    with pytest.raises(InfeasiblePlacementError):  # 3 x 15 layers < 48, though the active bytes would fit
        solve_placement(PlacementProblem(MOE, tuple(replace(d, memory_bytes=15 * LAYER) for d in devices)), time_limit_s=5, deterministic=True)


def test_model_facts_and_plan_of_a_moe_checkpoint(moe_checkpoints, tmp_path):
    """Facts of a Qwen3-MoE checkpoint carry every expert in layer_bytes and the experts' share
    apart; `potluck plan` places by all experts' bytes (one byte less than the model: refused)."""
    from scheduler.planner import model_spec
    from workers.checkpoint import layer_parameter_bytes
    from workers.model_facts import read_model_facts

    path = moe_checkpoints["qwen3_moe"]
    sizes = layer_parameter_bytes(path)
    facts = read_model_facts(path)
    assert facts.layer_bytes == sizes.layer_bytes and facts.expert_bytes == sizes.expert_bytes
    assert facts.expert_bytes[0] == 0 and all(e > 0 for e in facts.expert_bytes[1:])
    assert (facts.num_experts, facts.experts_per_token) == (8, 2)
    half = read_model_facts(path, "bfloat16")
    assert half.expert_bytes == tuple(b // 2 for b in sizes.expert_bytes)
    spec = model_spec(facts)
    assert (spec.expert_bytes, spec.num_experts, spec.experts_per_token) == (facts.expert_bytes, 8, 2)
    mixtral = model_spec(read_model_facts(moe_checkpoints["mixtral"]))  # 2 of 4 experts per token
    assert mixtral.compute_bytes_per_token_per_layer() < sum(mixtral.layer_bytes) / mixtral.num_layers

    total = sizes.stage_bytes(0, len(sizes.layer_bytes))
    for memory, code in [(total, 0), (total - 1, 1)]:
        devices = tmp_path / f"devices{memory}.json"
        devices.write_text(json.dumps({"devices": [{"id": "box", "memory_bytes": memory, "flops_per_s": 1e12,
                                                    "memory_bandwidth_bytes_per_s": 1e11}]}))
        command = [sys.executable, "-m", "api.cli", "plan", "--model", str(path), "--devices", str(devices),
                   "--context-tokens", "0", "--concurrency", "0", "--time-limit", "2", "--json"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert result.returncode == code, result.stderr
        if code == 0:
            assert json.loads(result.stdout)["ranges"] == {"box": [0, 4]}
        else:
            assert "does not fit" in result.stderr


def test_router_costs_of_an_moe_stage_use_the_same_shares():
    """The router's per-layer costs (scheduler/load.py) come from the same roofline: an MoE layer's
    batch-1 step and prefill are charged the bytes one token uses."""
    from scheduler.load import layer_costs_s

    device = DeviceSpec("gpu", memory_bytes=48 * LAYER, flops_per_s=1e14, memory_bandwidth_bytes_per_s=1e12)
    active = MOE.compute_bytes_per_token_per_layer()
    step_s, per_request_s, prefill_s = layer_costs_s(device, LAYER, MOE)
    dense_step_s, _, dense_prefill_s = layer_costs_s(device, LAYER)
    assert step_s == pytest.approx(active / 1e12) and dense_step_s == pytest.approx(LAYER / 1e12)
    assert prefill_s == pytest.approx(active / 1e14) and dense_prefill_s == pytest.approx(LAYER / 1e14)
    assert per_request_s > 0  # a batch of 16 reaches more experts than one token
