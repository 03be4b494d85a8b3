"""Placement problems for tests: small random clusters with an exhaustive reference solver, and
the clusters the benchmarks measure (so a test of placement on them does not reach into
`benchmarks/` itself).

Parts:
- `random_problem(seed, n, L)`: n devices with decreasing random capacity tables, memory for 1..L layers.
- `exhaustive_best(problem)`: max flow over every assignment of a range (or nothing) to every device.
- `sim_cluster(n, seed)` / `sim_problem(cluster)` / `with_device` / `without_device`: the
  simulator's heterogeneous clusters (benchmarks/sim_cluster.py) and their placement problem.
- `scaling_problem(...)`: the generated clusters of benchmarks/placement_scaling.py.
- `helix_problem`, `load_facts`, `stored_ranges`, `HELIX_FACTS`: the Helix paper's cluster
  (benchmarks/helix_facts.py).
"""
from __future__ import annotations

import itertools
import random

from benchmarks.helix_facts import DEFAULT_FACTS as HELIX_FACTS
from benchmarks.helix_facts import helix_problem, load_facts, stored_ranges
from benchmarks.placement_scaling import generated_problem as scaling_problem
from benchmarks.sim_cluster import make_cluster as sim_cluster
from benchmarks.sim_cluster import placement_problem as sim_problem
from benchmarks.sim_cluster import with_device, without_device
from placement.flow import evaluate_placement
from placement.problem import DeviceSpec, ModelSpec, PlacementProblem

__all__ = ["HELIX_FACTS", "exhaustive_best", "helix_problem", "load_facts", "random_problem", "scaling_problem",
           "sim_cluster", "sim_problem", "stored_ranges", "with_device", "without_device"]


def random_problem(seed: int, n: int, L: int) -> PlacementProblem:
    """n devices with decreasing random capacity tables and memory for 1..L layers."""
    rng = random.Random(seed)
    model = ModelSpec.uniform(L, 1_000, kv_bytes_per_token_per_layer=1, activation_bytes_per_token=64)
    devices = []
    for i in range(n):
        base = rng.uniform(50, 400)
        table = tuple(base / (k ** rng.uniform(0.8, 1.3)) for k in range(1, L + 1))
        kmax = rng.randint(1, L)
        devices.append(DeviceSpec(f"d{i}", kmax * 1_000 + 10 * kmax, tokens_per_s=table, kind=f"t{i % 2}"))
    return PlacementProblem(model, tuple(devices), kv_reserve_tokens=10)


def exhaustive_best(problem: PlacementProblem) -> float:
    """Max flow over every assignment of a range (or nothing) to every device."""
    L = problem.model.num_layers
    opts = [None] + [(s, e) for s in range(L) for e in range(s + 1, L + 1)]
    best = 0.0
    ids = [d.device_id for d in problem.devices]
    for combo in itertools.product(opts, repeat=len(ids)):
        ranges = {d: r for d, r in zip(ids, combo) if r is not None}
        if not ranges:
            continue
        fits = all((e - s) * 1_010 <= problem.device(d).memory_bytes for d, (s, e) in ranges.items())
        if fits:
            best = max(best, evaluate_placement(problem, ranges)[0])
    return best
