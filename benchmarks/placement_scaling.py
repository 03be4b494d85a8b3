"""Solve time of potluck's placement solver on generated clusters of 8, 64 and 512 devices.

    python -m benchmarks.placement_scaling [--sizes 8 64 512] [--time-limit 60]

Clusters mix five device kinds (capacity tables shaped like the Helix LLaMA-2 70B tables, with
per-kind memory limits), fully connected; the model has 80 layers. Prints, per size: seconds,
throughput, bound and gap, all measured in this run.
"""
from __future__ import annotations

import argparse
import random
import time

from placement.problem import DeviceSpec, ModelSpec, PlacementProblem
from placement.solver import solve_placement

KINDS = {  # kind: (one-layer tokens/s, exponent of the fall with k, max layers)
    "A100": (23800.0, 1.05, 12), "RTX4090": (12000.0, 1.1, 10), "L4": (7500.0, 1.1, 7),
    "M2Ultra": (5000.0, 1.0, 40), "T4": (5700.0, 1.2, 4)}


def generated_problem(n: int, seed: int = 0) -> PlacementProblem:
    rng = random.Random(seed)
    devices = []
    for x in range(n):
        kind = rng.choice(list(KINDS))
        base, expo, kmax = KINDS[kind]
        table = tuple(base / k ** expo for k in range(1, kmax + 1))
        devices.append(DeviceSpec(f"{kind}-{x}", int(1.6e9 * kmax), tokens_per_s=table, kind=kind))
    model = ModelSpec.uniform(80, int(1.53e9), activation_bytes_per_token=16384, token_bytes=2)
    return PlacementProblem(model, tuple(devices))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[8, 64, 512])
    ap.add_argument("--time-limit", type=float, default=60.0)
    a = ap.parse_args()
    print("| devices | seconds | throughput tok/s | bound | gap |")
    print("|---|---|---|---|---|")
    for n in a.sizes:
        problem = generated_problem(n)
        t0 = time.monotonic()
        p = solve_placement(problem, time_limit_s=a.time_limit)
        print(f"| {n} | {time.monotonic() - t0:.2f} | {p.throughput_tokens_per_s:.1f} | "
              f"{p.upper_bound_tokens_per_s:.1f} | {100 * p.gap:.2f}% |", flush=True)


if __name__ == "__main__":
    main()
