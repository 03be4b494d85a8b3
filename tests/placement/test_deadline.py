"""Every solve returns a feasible, non-empty placement within its time limit (item: never nothing)."""
from __future__ import annotations

import time

import pytest

from benchmarks.placement_scaling import generated_problem
from benchmarks.sim_cluster import make_cluster, placement_problem
from placement.greedy import greedy_placement
from placement.network import build_network, stage_bytes
from placement.problem import DeviceSpec, InfeasiblePlacementError, ModelSpec, PlacementProblem
from placement.solver import solve_placement


def _check(problem: PlacementProblem, limit: float) -> None:
    t0 = time.monotonic()
    got = solve_placement(problem, time_limit_s=limit)
    wall = time.monotonic() - t0
    assert wall <= limit * 1.1 + 0.5, wall
    assert got.ranges and got.throughput_tokens_per_s > 0 and got.pipelines
    L = problem.model.num_layers
    covered: set[int] = set()
    for dev, (s, e) in got.ranges.items():
        assert 0 <= s < e <= L
        assert stage_bytes(problem, s, e) <= problem.device(dev).memory_bytes
        covered |= set(range(s, e))
    assert covered == set(range(L))
    assert got.throughput_tokens_per_s <= got.upper_bound_tokens_per_s * (1 + 1e-9)


@pytest.mark.parametrize("n", [8, 64])
@pytest.mark.parametrize("limit", [0.5, 2.0])
@pytest.mark.parametrize("seed", [1, 3])
def test_sim_cluster_feasible_within_limit(n: int, limit: float, seed: int) -> None:
    # seeds 1 and 3 at 64 devices returned an empty placement before the greedy start
    _check(placement_problem(make_cluster(n, seed=seed)), limit)


@pytest.mark.parametrize("n", [8, 64])
def test_generated_cluster_feasible_within_limit(n: int) -> None:
    _check(generated_problem(n), 0.5)


@pytest.mark.slow
def test_512_devices_within_limit() -> None:
    _check(placement_problem(make_cluster(512, seed=1)), 1.0)
    _check(generated_problem(512), 1.0)


def test_greedy_is_fast_and_feasible() -> None:
    net = build_network(generated_problem(512))
    t0 = time.monotonic()
    ranges, value = greedy_placement(net, t0)      # deadline now: only the first target is tried
    assert time.monotonic() - t0 < 0.5
    assert value > 0 and set().union(*(range(s, e) for s, e in ranges.values())) == set(range(net.L))


def test_infeasible_cluster_raises_with_missing_bytes() -> None:
    model = ModelSpec.uniform(40, 1_000_000_000)
    devices = tuple(DeviceSpec(f"d{i}", 8_000_000_000, tokens_per_s=(100.0,) * 40) for i in range(4))
    with pytest.raises(InfeasiblePlacementError) as err:
        solve_placement(PlacementProblem(model, devices), time_limit_s=0.5)
    assert err.value.missing_bytes >= 8 * 1_000_000_000
    assert "missing" in str(err.value)
