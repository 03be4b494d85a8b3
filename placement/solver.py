"""``solve_placement``: the placement solver potluck's scheduler calls.

Parts:
- ``solve_placement(problem, time_limit_s, current, migration_cost_per_layer, deterministic)``:
  wall seconds by default; ``deterministic=True`` makes the limit a work budget (``clock.py``).
- ``_throughput(net, deadline)``: the throughput pipeline below.
- re-planning (``current`` given): ``placement/replan.py``, fewest moves within a tolerance.

Design (throughput mode), each step under the one deadline, best exact max flow kept:
0. A cheap feasible placement (``greedy.py``: greedy pipelines over a grid of stage targets),
   so that every later step only improves on an answer that exists.
1. Bounds: the saturated network-free bound (``bounds.py``).
1b. Sparse graphs (links missing or too thin to ignore, but one linked part can hold the model):
   the linked column sequence CP-SAT (``linked_columns.py``), which orders the columns along the
   links (hub/spoke alternation on Helix's pruned graph), for 75% of the time.
2. Column bisection (``columns.py``): aligned boundaries, device classes, pattern ILP; exact max
   flow when links are complete and never bind, and often equal to the bound.
3. Links that bind or are missing: the column multisets of several target flow_target are handed to the
   link-aware assignment CP-SAT (``assign.py``) with shuffled middle orders.
4. Small clusters: the class-aggregated CP-SAT (``aggregate.py``), which is exact with
   non-binding links and allows staggered boundaries, hinted with the best so far; its proven
   bound tightens the reported bound.
5. Local search with exact max flow (``local_search.py``) in the time that is left.
Every step is skipped once the best placement meets the bound (proven optimal: it returns at
once), and links that even the bound's flow cannot fill count as absent limits.
Latency mode is in ``latency.py``.
"""
from __future__ import annotations

import contextlib
import math
import random
import time
from typing import Mapping

from placement import clock
from placement.aggregate import device_classes, slots_to_ranges, solve_aggregate
from placement.assign import assign_devices
from placement.bounds import upper_bound
from placement.columns import best_columns, solve_columns
from placement.flow import evaluate_ranges, flow_value
from placement.greedy import greedy_placement
from placement.latency import solve_latency
from placement.linked_columns import solve_linked_columns, spans_model
from placement.local_search import improve
from placement.network import Network, build_network
from placement.problem import Placement, PlacementProblem, Ranges
from placement.replan import moved, replan

REPLAN_TOLERANCE = 0.03      # re-planning keeps >= 97% of the fresh throughput
SMALL_REPLAN_DEVICES = 10
SMALL_REPLAN_S = 0.9
SMALL_CLUSTER = 12
LINKED_SHARE = 0.75          # share of the time for the linked column model on sparse graphs


def _throughput(net: Network, deadline: float, start: float) -> tuple[Ranges, float, float]:
    """Best ranges, their exact flow, and the proven upper bound."""
    ub = upper_bound(net)
    net.links_trivial_below(ub)  # links wider than the whole cluster's bound never bind
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

    def proven() -> bool:  # the best meets the bound: nothing left to search for
        return best_v >= ub * (1 - 1e-6)

    # 0. a cheap feasible placement first (well under a second even at 512 devices)
    greedy_ranges, _ = greedy_placement(net, start + min(0.15 * total, 1.0))
    offer(greedy_ranges)
    if proven():
        return best, best_v, ub
    linked = not net.links_trivial and spans_model(net, ub)
    if linked:   # sparse graph: the column order must follow the links (hubs and spokes)
        linked_ranges, _ = solve_linked_columns(net, start + LINKED_SHARE * total - clock.now())  # exact flow
        offer(linked_ranges)
    col_end = start + (LINKED_SHARE + 0.05 if linked else 0.5) * total
    # one CP-SAT worker per column probe on small clusters: more probes fit in a re-plan's share;
    # larger clusters keep two (docs/performance-notes.md)
    workers = 1 if net.n <= SMALL_CLUSTER else 2
    columns_value, columns_ranges = (0.0, None) if proven() else best_columns(net, classes, 0.0, ub * (1 + 1e-9), col_end, workers)
    offer(columns_ranges)
    if not net.links_trivial and columns_value > 0 and not proven():
        rng = random.Random(0)
        fracs = [0.6, 0.7, 0.8, 0.5, 0.9, 0.65, 0.75, 0.55, 0.85, 0.62, 0.68]
        x = 0
        while clock.now() < start + (LINKED_SHARE + 0.1 if linked else 0.8) * total and not proven():
            flow_target = columns_value * fracs[x % len(fracs)]
            cols = solve_columns(net, classes, flow_target, min(2.0, deadline - clock.now()), workers, min_columns=True)
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
                r, _ = assign_devices(net, classes, cols, min(5.0, max(0.05, deadline - clock.now())))
                offer(r)
            x += 1
    options = sum(len(net.options(c[0])) for c in classes)
    if net.n <= SMALL_CLUSTER and options <= 2500 and best_v < ub * (1 - 1e-6) \
            and start + 0.9 * total - clock.now() > options * 2e-4:
        slots, _, agg_bound, opt = solve_aggregate(net, max(0.05, start + 0.9 * total - clock.now() - options * 2e-4),
                                                   hint=_as_slots(net, classes, best))
        offer(slots_to_ranges(classes, slots))
        ub = min(ub, agg_bound * (1 + 1e-9))
        if opt and net.links_trivial:
            ub = min(ub, best_v * (1 + 1e-9))
    if best and best_v < ub * (1 - 1e-6) and clock.now() < deadline:
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


def solve_placement(problem: PlacementProblem, *, time_limit_s: float = 10.0,
                    current: Mapping[str, tuple[int, int]] | None = None,
                    migration_cost_per_layer: float | None = None,
                    replan_tolerance: float = REPLAN_TOLERANCE, deterministic: bool = False) -> Placement:
    """Place the model (see `_solve_placement`). ``deterministic``: ``time_limit_s`` is a budget
    of work (``placement/clock.py``: CP-SAT's deterministic time plus a fixed cost per heuristic
    step) instead of wall seconds, so the answer does not depend on the machine's speed or load."""
    with clock.work_budget() if deterministic else contextlib.nullcontext():
        return _solve_placement(problem, time_limit_s, current, migration_cost_per_layer, replan_tolerance)


def _solve_placement(problem: PlacementProblem, time_limit_s: float, current: Mapping[str, tuple[int, int]] | None,
                     migration_cost_per_layer: float | None, replan_tolerance: float) -> Placement:
    """Place the model; see the module docstring. Raises ``InfeasiblePlacementError`` when the
    devices cannot hold the model. Never runs past ``time_limit_s`` (plus one evaluation).

    Re-planning (``current``: device id -> range it holds now; unknown ids are ignored, departed
    devices simply absent from ``problem``): the answer keeps at least ``1 - replan_tolerance``
    of the throughput of the fresh solve made inside this call and, among such placements, moves
    the fewest layers (default: fewest bytes to load, ties by throughput) or, with
    ``migration_cost_per_layer`` (tokens/s charged per moved layer), maximises
    ``throughput - migration_cost_per_layer * moved_layers``. A layer is *moved* to a device when
    the device holds it now and did not before; a fresh solve's moves are counted against
    ``current`` as returned (no relabeling), while relabeling interchangeable devices is part of
    re-planning. ``Placement.moved_layers`` reports the count. With at most ``SMALL_REPLAN_DEVICES``
    devices re-planning stops after ``SMALL_REPLAN_S`` seconds (the scheduler calls it on every
    join and leave). See ``placement/replan.py``."""
    t0 = clock.now()
    net = build_network(problem)
    limit_s = max(0.1, time_limit_s)
    if current and problem.objective == "throughput" and net.n <= SMALL_REPLAN_DEVICES:
        limit_s = min(limit_s, SMALL_REPLAN_S)
    deadline = t0 + limit_s
    notes: list[str] = []
    idx = {d: i for i, d in enumerate(net.ids)}
    cur = {idx[d]: (int(s), int(e)) for d, (s, e) in (current or {}).items() if d in idx}
    if problem.objective == "latency":
        ranges = solve_latency(net)
        ub = upper_bound(net)
    else:
        # re-planning: a fresh solve first (its value sets the tolerance), then the migration-aware
        # search; a small cluster's fresh solve gets 40% of the time (docs/performance-notes.md)
        share = (0.4 if net.n <= SMALL_REPLAN_DEVICES else 0.35) if cur else 1.0
        ranges, value, ub = _throughput(net, t0 + share * (deadline - t0), t0)
        if cur:
            ranges = replan(net, ranges, value, cur, deadline, migration_cost_per_layer, replan_tolerance)
    value, latency, pipes = evaluate_ranges(net, ranges)
    moved_layers = moved(net, ranges, cur)[0] if cur else 0
    optimal = problem.objective == "throughput" and value >= ub * (1 - 1e-6)
    if not math.isfinite(latency):
        notes.append("no source-to-sink path found in time")
    return Placement({net.ids[i]: se for i, se in sorted(ranges.items())}, value, latency, max(ub, value),
                     pipes, clock.now() - t0, "optimal" if optimal else "feasible", moved_layers,
                     problem.objective, tuple(notes))
