"""The simulator's printed report: markdown tables over clusters (seeds) and traces.

Parts:
- ``markdown(sizes, replans, load)``: per cluster and policy the median over its traces of p50 and
  p99 TTFT, end-to-end latency and output tokens/s; ours against each baseline as the geometric
  mean over traces of the per-trace ratios (a p99 from one trace swings with small changes of the
  arrival rate, so one trace is a poor measure), with how many traces meet the p99 target, and the
  same over every cluster of a size; the placements; re-plan times.
"""
from __future__ import annotations

import math
import statistics

TARGET_P99_RATIO = 0.5  # issue: p99 TTFT at most half of round-robin's
OURS = "potluck"
BASELINES = ("round-robin", "least-loaded")


def _fmt(x: float) -> str:
    return "nan" if math.isnan(x) else (f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}")


def geo_mean(xs: list[float]) -> float:
    xs = [x for x in xs if x > 0 and math.isfinite(x)]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else math.nan


def ratios(runs: list[dict], baseline: str, key: str) -> list[float]:
    """Ours / baseline for ``key``, one per trace."""
    return [r[OURS][key] / r[baseline][key] for r in runs if r[baseline][key] > 0]


def _policy_rows(size: dict) -> list[str]:
    rows = []
    for name in size["runs"][0]:
        rs = [run[name] for run in size["runs"]]
        med = {k: statistics.median(r[k] for r in rs)
               for k in ("ttft_p50_s", "ttft_p99_s", "e2e_p50_s", "e2e_p99_s", "output_tokens_per_s")}
        rows.append(f"| {size['devices']} | {size['seed']} | {name} | {_fmt(med['ttft_p50_s'])} | {_fmt(med['ttft_p99_s'])} | "
                    f"{_fmt(med['e2e_p50_s'])} | {_fmt(med['e2e_p99_s'])} | {_fmt(med['output_tokens_per_s'])} | "
                    f"{sum(r['completed'] for r in rs)}/{sum(r['requests'] for r in rs)} |")
    return rows


def _ratio_row(devices: object, seed: object, name: str, runs: list[dict]) -> str:
    p99 = ratios(runs, name, "ttft_p99_s")
    met = sum(1 for x in p99 if x <= TARGET_P99_RATIO)
    return (f"| {devices} | {seed} | {name} | {len(runs)} | {_fmt(geo_mean(ratios(runs, name, 'ttft_p50_s')))} | "
            f"{_fmt(geo_mean(p99))} | {_fmt(max(p99, default=math.nan))} | {met}/{len(p99)} | "
            f"{_fmt(geo_mean(ratios(runs, name, 'output_tokens_per_s')))} |")


def markdown(sizes: list[dict], replans: list[dict], load: float) -> str:
    lines: list[str] = []
    if sizes:
        lines += [f"### Routing at {load:.0%} of measured saturation (bursty arrivals)", "",
                  "Median over each cluster's traces:", "",
                  "| devices | seed | policy | TTFT p50 s | TTFT p99 s | e2e p50 s | e2e p99 s | output tok/s | completed |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for size in sizes:
            lines += _policy_rows(size)
        lines += ["", "Ours / baseline, geometric mean over traces (p99 target <= 0.5 vs round-robin):", "",
                  "| devices | seed | vs | traces | TTFT p50 ratio | TTFT p99 ratio | worst p99 ratio | "
                  "traces with p99 ratio <= 0.5 | throughput ratio |", "|---|---|---|---|---|---|---|---|---|"]
        for size in sizes:
            for name in BASELINES:
                lines.append(_ratio_row(size["devices"], size["seed"], name, size["runs"]))
        for devices in sorted({s["devices"] for s in sizes}):
            of_size = [s for s in sizes if s["devices"] == devices]
            if len(of_size) > 1:
                for name in BASELINES:
                    lines.append(_ratio_row(devices, "all", name, [r for s in of_size for r in s["runs"]]))
        lines += ["", "| devices | seed | stages | baseline pipelines | placement tok/s | measured saturation tok/s | arrivals/s |",
                  "|---|---|---|---|---|---|---|"]
        for size in sizes:
            lines.append(f"| {size['devices']} | {size['seed']} | {size['stages']} | {size['baseline_pipelines']} | "
                         f"{_fmt(size['placement_tokens_per_s'])} | {_fmt(size['saturation_tokens_per_s'])} | "
                         f"{_fmt(size['arrival_rate_per_s'])} |")
    if replans:
        lines += [*([""] if lines else []), "### Re-plan time (`solve_placement(current=previous)`)", "",
                  "| devices | time limit s | join s | loss s | tok/s before | after join (moved layers) | "
                  "after loss (moved layers) |", "|---|---|---|---|---|---|---|"]
        for r in replans:
            lines.append(f"| {r['devices']} | {_fmt(r['time_limit_s'])} | {_fmt(r['join_s'])} | {_fmt(r['loss_s'])} | "
                         f"{_fmt(r['tokens_per_s_before'])} | {_fmt(r['tokens_per_s_after_join'])} "
                         f"({r['moved_layers_join']}) | {_fmt(r['tokens_per_s_after_loss'])} "
                         f"({r['moved_layers_loss']}) |")
    return "\n".join(lines)
