"""Run potluck's placement solver on a Helix benchmark instance.

    python -m benchmarks.helix --instance single24_llama70b [--graph milp|full] [--time-limit 60] [--json]

Prints ``{"objective", "bound", "seconds", "placement": {"<node id>": [start, end]}}``. Nodes the
solver leaves idle get a one-layer range ``[0, 1)`` (Helix's MILP requires every node to hold a
layer; an extra parallel range never lowers the max flow), and the objective is re-evaluated
on the final placement. ``--table`` runs every headline instance and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import time

from benchmarks.helix_facts import DEFAULT_FACTS, helix_problem, load_facts
from placement.flow import evaluate_placement
from placement.solver import solve_placement


def run(facts: dict, instance: str, graph: str, time_limit_s: float) -> dict:
    problem = helix_problem(facts, instance, graph)
    t0 = time.monotonic()
    placement = solve_placement(problem, time_limit_s=time_limit_s)
    ranges = dict(placement.ranges)
    for d in problem.devices:
        ranges.setdefault(d.device_id, (0, 1))
    objective, _, _ = evaluate_placement(problem, ranges)
    seconds = time.monotonic() - t0
    return {"instance": instance, "graph": graph, "objective": objective,
            "bound": max(placement.upper_bound_tokens_per_s, objective), "seconds": seconds,
            "status": placement.status, "latency_s": placement.latency_s,
            "placement": {d: [s, e] for d, (s, e) in sorted(ranges.items(), key=lambda x: int(x[0]))}}


HEADLINE = [("cluster10_llama30b", "milp"), ("single24_llama70b", "milp"), ("hetero42_llama70b", "full"),
            ("hetero42_llama70b", "milp"), ("3region24_llama70b", "milp")]


def table(facts: dict, time_limit_s: float) -> str:
    """Markdown table: ours (objective, bound, seconds) beside Helix's stored placements and baselines."""
    from benchmarks.helix_facts import stored_ranges
    from benchmarks.placement_baselines import all_baselines
    rows = ["| instance | links | potluck | bound | s | Helix MILP | Helix sim. Swarm | Helix sim. Petals "
            "| even split | exo | Petals greedy | Parallax DP |", "|" + "---|" * 12]
    for inst, graph in HEADLINE:
        res = run(facts, inst, graph, time_limit_s)
        problem = helix_problem(facts, inst, graph)
        stored = []
        for method in ("helix_milp_optimal" if inst.startswith("cluster10") else "helix_milp", "swarm", "petals"):
            key = f"{inst}/{method}"
            stored.append(f"{evaluate_placement(problem, stored_ranges(facts, key))[0]:.1f}"
                          if key in facts["solutions"] else "-")
        base = []
        for ranges in all_baselines(problem).values():
            try:
                base.append(f"{evaluate_placement(problem, ranges)[0]:.1f}" if ranges else "n/a")
            except ValueError:
                base.append("n/a")
        rows.append(f"| {inst} | {graph} | **{res['objective']:.1f}** | {res['bound']:.1f} | {res['seconds']:.1f} | "
                    + " | ".join(stored + base) + " |")
        print(rows[-1], flush=True)
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--facts", default=str(DEFAULT_FACTS))
    ap.add_argument("--instance")
    ap.add_argument("--table", action="store_true", help="run the headline instances, print a markdown table")
    ap.add_argument("--graph", choices=["milp", "full"], default="milp",
                    help="link set: the one Helix's MILP used (default) or the complete cluster")
    ap.add_argument("--time-limit", type=float, default=60.0)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    facts = load_facts(a.facts)
    if a.table:
        print(table(facts, a.time_limit))
        return
    if not a.instance:
        ap.error("--instance required (or --table)")
    res = run(facts, a.instance, a.graph, a.time_limit)
    if a.json:
        print(json.dumps({k: res[k] for k in ("objective", "bound", "seconds", "placement", "status", "graph")}))
    else:
        print(f"{a.instance} ({a.graph} links): objective {res['objective']:.4f} tok/s, bound {res['bound']:.4f}, "
              f"{res['seconds']:.2f} s, {res['status']}")
        for d, (s, e) in res["placement"].items():
            print(f"  node {d}: [{s}, {e})")


if __name__ == "__main__":
    main()
