"""``solve_placement``: the placement solver potluck's scheduler calls.

Parts:
- ``solve_placement(problem, time_limit_s, current, migration_cost_per_layer)``.
- ``_throughput(net, deadline)``: the throughput pipeline below.
- ``_replan(net, fresh, current, deadline)``: fewest moved bytes within a throughput tolerance.

Design (throughput mode), each step under the one deadline, best exact max flow kept:
1. Bounds: the saturated network-free bound (``bounds.py``).
2. Column bisection (``columns.py``): aligned boundaries, device classes, pattern ILP; exact max
   flow when links are complete and never bind, and often equal to the bound.
3. Links that bind or are missing: the column multisets of several target F are handed to the
   link-aware assignment CP-SAT (``assign.py``) with shuffled middle orders.
4. Small clusters: the class-aggregated CP-SAT (``aggregate.py``), which is exact with
   non-binding links and allows staggered boundaries, hinted with the best so far; its proven
   bound tightens the reported bound.
5. Local search with exact max flow (``local_search.py``) in the time that is left.
Latency mode is in ``latency.py``.
"""
from __future__ import annotations

import math
import random
import time
from typing import Mapping

from placement.aggregate import device_classes, slots_to_ranges, solve_aggregate
from placement.assign import assign_devices
from placement.bounds import upper_bound
from placement.columns import best_columns, solve_columns
from placement.flow import evaluate_ranges, flow_value
from placement.latency import solve_latency
from placement.local_search import improve
from placement.network import Network, build_network
from placement.problem import Placement, PlacementProblem

Ranges = dict[int, tuple[int, int]]
REPLAN_TOLERANCE = 0.03
SMALL_CLUSTER = 12


def _throughput(net: Network, deadline: float, start: float) -> tuple[Ranges, float, float]:
    """Best ranges, their exact flow, and the proven upper bound."""
    ub = upper_bound(net)
    classes = device_classes(net)
    total = max(deadline - start, 0.05)
    best: Ranges = {}
    best_v = 0.0

    def offer(r: Ranges | None) -> None:
        nonlocal best, best_v
        if r:
            v = flow_value(net, r)
            if v > best_v:
                best, best_v = dict(r), v

    col_v, col_r = best_columns(net, classes, 0.0, ub * (1 + 1e-9), start + 0.5 * total)
    offer(col_r)
    if not net.links_trivial and col_v > 0:
        rng = random.Random(0)
        fracs = [0.6, 0.7, 0.8, 0.5, 0.9, 0.65, 0.75, 0.55, 0.85, 0.62, 0.68]
        x = 0
        while time.monotonic() < start + 0.8 * total:
            F = col_v * fracs[x % len(fracs)]
            cols = solve_columns(net, classes, F, min(2.0, deadline - time.monotonic()), min_columns=True)
            if cols and len(cols) > 3:
                mid = cols[1:-1]
                if x % 3 == 1:
                    rng.shuffle(mid)
                elif x % 3 == 2:
                    mid = sorted(cols, key=lambda p: (-p[2], p[0]))[1:-1]
                    srt = sorted(cols, key=lambda p: (-p[2], p[0]))
                    cols = srt if _ends_ok(net, classes, srt) else cols
                    mid = cols[1:-1]
                cols = [cols[0]] + mid + [cols[-1]]
            if cols:
                r, _ = assign_devices(net, classes, cols, min(5.0, max(0.05, deadline - time.monotonic())))
                offer(r)
            x += 1
    options = sum(len(net.options(c[0])) for c in classes)
    if net.n <= SMALL_CLUSTER and options <= 2500 and best_v < ub * (1 - 1e-6) \
            and start + 0.9 * total - time.monotonic() > options * 2e-4:
        slots, _, agg_bound, opt = solve_aggregate(net, max(0.05, start + 0.9 * total - time.monotonic() - options * 2e-4),
                                                   hint=_as_slots(net, classes, best))
        offer(slots_to_ranges(classes, slots))
        ub = min(ub, agg_bound * (1 + 1e-9))
        if opt and net.links_trivial:
            ub = min(ub, best_v * (1 + 1e-9))
    if best and best_v < ub * (1 - 1e-6) and time.monotonic() < deadline:
        best, best_v = improve(net, best, deadline)
    return best, best_v, max(ub, best_v)


def _ends_ok(net: Network, classes: list[list[int]], cols: list) -> bool:
    first = all(net.src_cap[classes[c][0]] > 0 for c, _ in cols[0][1])
    return first and all(net.sink_cap[classes[c][0]] > 0 for c, _ in cols[-1][1])


def _as_slots(net: Network, classes: list[list[int]], r: Ranges) -> list[tuple[int, int, int, int]]:
    cls_of = {i: c for c, members in enumerate(classes) for i in members}
    count: dict[tuple[int, int, int], int] = {}
    for i, (s, e) in r.items():
        key = (cls_of[i], s, e - s)
        count[key] = count.get(key, 0) + 1
    return [(c, s, k, n) for (c, s, k), n in count.items()]


def _moved(net: Network, r: Ranges, current: Mapping[int, tuple[int, int]]) -> tuple[int, float]:
    """(moved layers, moved bytes): layers a device must newly load."""
    layers, nbytes = 0, 0.0
    lb = net.problem.model.layer_bytes
    for i, (s, e) in r.items():
        cs, ce = current.get(i, (0, 0))
        new = [x for x in range(s, e) if not cs <= x < ce]
        layers += len(new)
        nbytes += sum(lb[x] for x in new)
    return layers, nbytes


def _replan(net: Network, fresh: Ranges, fresh_v: float, current: Mapping[int, tuple[int, int]],
            deadline: float, cost_per_layer: float | None) -> Ranges:
    """Start from the current placement (minus departed devices) and climb on
    flow - penalty * moved; keep it when it reaches (1 - tolerance) of the fresh throughput with
    fewer moved layers. ``cost_per_layer`` None: moved bytes, scaled so one model's worth of
    moves weighs the whole tolerance."""
    target = (1 - REPLAN_TOLERANCE) * fresh_v
    total_bytes = sum(net.problem.model.layer_bytes) or 1
    weight = (REPLAN_TOLERANCE * fresh_v / total_bytes) if cost_per_layer is None else cost_per_layer
    start = {i: se for i, se in current.items() if i < net.n and net.fits(i, se[0], se[1] - se[0])}

    def score(r: Ranges) -> float:
        v = flow_value(net, r)
        layers, nbytes = _moved(net, r, current)
        pen = nbytes if cost_per_layer is None else layers
        return v - weight * pen - (0 if v >= target else 10 * fresh_v)

    options = sum(len(net.options(i)) for i in range(net.n))
    if net.links_trivial and options <= 4000:
        singles = [[i] for i in range(net.n) if net.cap[i]]
        lb = net.problem.model.layer_bytes
        cost = {}
        for c, (i,) in enumerate(singles):
            cs, ce = current.get(i, (0, 0))
            for s, k in net.options(i):
                new = [x for x in range(s, s + k) if not cs <= x < ce]
                cost[c, s, k] = len(new) if cost_per_layer is not None else int(sum(lb[x] for x in new) // 1024)
        slots, _, _, _ = solve_aggregate(net, max(0.05, deadline - time.monotonic() - options * 2e-4),
                                         classes=singles, hint=_as_slots(net, singles, fresh),
                                         min_flow=target * (1 + 1e-6), move_cost=cost)
        cand = slots_to_ranges(singles, slots)
        if cand and flow_value(net, cand) >= target and \
                _moved(net, cand, current)[0] < _moved(net, fresh, current)[0]:
            return cand
    mid = time.monotonic() + (deadline - time.monotonic()) / 2
    cands = [improve(net, fresh, mid, score=score)[0]]
    if start:
        cands.append(improve(net, _repair(net, start), deadline, score=score, seed=1)[0])
    best = fresh
    for cand in cands:
        if flow_value(net, cand) >= target and _moved(net, cand, current)[0] < _moved(net, best, current)[0]:
            best = cand
    return best


def _repair(net: Network, r: Ranges) -> Ranges:
    """Cover every layer gap left by departed devices: stretch a neighbour or use an idle device."""
    r = dict(r)
    for _ in range(net.L):
        covered = set(x for s, e in r.values() for x in range(s, e))
        gap = next((x for x in range(net.L) if x not in covered), None)
        if gap is None:
            break
        b = next((x for x in range(gap, net.L) if x in covered), net.L)
        opts = [(i, (s, b)) for i, (s, e) in r.items() if e == gap] + \
               [(i, (gap, e)) for i, (s, e) in r.items() if s == b] + \
               [(i, (gap, b)) for i in range(net.n) if i not in r]
        ok = [(i, se) for i, se in opts if net.fits(i, se[0], se[1] - se[0])]
        if not ok:
            break
        i, se = max(ok, key=lambda o: net.cap[o[0]][o[1][1] - o[1][0] - 1])
        r[i] = se
    return r


def solve_placement(problem: PlacementProblem, *, time_limit_s: float = 10.0,
                    current: Mapping[str, tuple[int, int]] | None = None,
                    migration_cost_per_layer: float | None = None) -> Placement:
    """Place the model; see the module docstring. ``current`` (device id -> range) turns on
    re-planning: the answer keeps at least 97% of a fresh solve's throughput and moves as few
    layers (``migration_cost_per_layer`` tokens/s per layer, default: bytes to load) as it can.
    Raises ``InfeasiblePlacementError`` when the devices cannot hold the model."""
    t0 = time.monotonic()
    net = build_network(problem)
    deadline = t0 + max(0.1, time_limit_s)
    notes: list[str] = []
    if problem.objective == "latency":
        ranges = solve_latency(net)
        ub = upper_bound(net)
    else:
        share = 0.6 if current else 1.0
        ranges, value, ub = _throughput(net, t0 + share * (deadline - t0), t0)
        if current:
            idx = {d: i for i, d in enumerate(net.ids)}
            cur = {idx[d]: (int(s), int(e)) for d, (s, e) in current.items() if d in idx}
            ranges = _replan(net, ranges, value, cur, deadline, migration_cost_per_layer)
    value, latency, pipes = evaluate_ranges(net, ranges)
    moved = 0
    if current:
        idx = {d: i for i, d in enumerate(net.ids)}
        moved = _moved(net, ranges, {idx[d]: (int(s), int(e)) for d, (s, e) in current.items() if d in idx})[0]
    optimal = problem.objective == "throughput" and value >= ub * (1 - 1e-6)
    if not math.isfinite(latency):
        notes.append("no source-to-sink path found in time")
    return Placement({net.ids[i]: se for i, se in sorted(ranges.items())}, value, latency, max(ub, value),
                     pipes, time.monotonic() - t0, "optimal" if optimal else "feasible", moved,
                     problem.objective, tuple(notes))
