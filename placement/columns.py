"""Column placements: aligned stage boundaries, solved by pattern ILPs (CP-SAT) and bisection.

Parts:
- ``column_patterns(net, classes, flow_target)``: for each column length l, the minimal multisets of
  device classes whose capacities at l sum to at least flow_target.
- ``solve_columns(net, classes, flow_target, time_limit_s)``: CP-SAT: choose how many columns of each
  pattern so that the lengths add up to exactly L and no class is over-used; fewest columns
  first (fewest hops = lowest latency).
- ``best_columns(net, classes, lo, hi, deadline)``: bisection on flow_target; returns the best ranges.

Design. Cut the layers into consecutive columns ``[b_j, b_{j+1})``; every used device holds
exactly one column. With complete, non-binding links each boundary is a complete bipartite
junction, so the max flow is ``min_j sum_{i in column j} cap_i(l_j)``: throughput flow_target is reachable
iff columns with capacity >= flow_target can be chosen whose lengths sum to L. For fixed flow_target that is a tiny
integer program over pattern counts (classes x lengths, not devices x layers), and feasibility is
monotone in flow_target, so bisection finds the best column placement. On the Helix instances this reaches
the network-free bound (single24) and Gurobi's proven optimum (cluster10) in well under a second.
"""
from __future__ import annotations

from collections.abc import Sequence

from ortools.sat.python import cp_model

from placement import clock
from placement.network import Network

Pattern = tuple[int, tuple[tuple[int, int], ...], float]  # (length, ((class, count), ...), capacity)
MAX_DEVICES_PER_COLUMN = 8
MAX_CLASSES_PER_COLUMN = 3


def column_patterns(net: Network, classes: list[list[int]], flow_target: float) -> list[Pattern]:
    out: list[Pattern] = []
    kmax = max((net.kmax(c[0]) for c in classes), default=0)
    for l in range(1, kmax + 1):
        caps = [(net.cap[c[0]][l - 1], ci, len(c)) for ci, c in enumerate(classes) if net.kmax(c[0]) >= l]
        caps.sort(reverse=True)

        def rec(x: int, chosen: list[tuple[int, int]], total: float, size: int, smallest: float) -> None:
            if total >= flow_target:
                if total - smallest < flow_target:
                    out.append((l, tuple(sorted(chosen)), total))
                return
            if x == len(caps) or size >= MAX_DEVICES_PER_COLUMN or len(chosen) >= MAX_CLASSES_PER_COLUMN:
                return
            cap, ci, avail = caps[x]
            rest = MAX_DEVICES_PER_COLUMN - size
            if total + cap * min(avail, rest) + sum(c * min(a, rest) for c, _, a in caps[x + 1:]) < flow_target:
                return
            for cnt in range(min(avail, rest), 0, -1):
                rec(x + 1, chosen + [(ci, cnt)], total + cnt * cap, size + cnt, cap)
            rec(x + 1, chosen, total, size, smallest)

        rec(0, [], 0.0, 0, 0.0)
    return out


def solve_columns(net: Network, classes: list[list[int]], flow_target: float, time_limit_s: float,
                  workers: int = 2, min_columns: bool = False) -> list[Pattern] | None:
    """A multiset of columns (as a list, one entry per column) reaching flow_target, or None."""
    pats = column_patterns(net, classes, flow_target)
    if not pats:
        return None
    m = cp_model.CpModel()
    y = [m.NewIntVar(0, net.L // p[0], f"y{x}") for x, p in enumerate(pats)]
    m.Add(sum(p[0] * v for p, v in zip(pats, y)) == net.L)
    for ci, members in enumerate(classes):
        terms = [cnt * v for p, v in zip(pats, y) for c, cnt in p[1] if c == ci]
        if terms:
            m.Add(sum(terms) <= len(members))
    # one column fed by the source, one draining to the sink (the same one if it is alone)
    one = m.NewBoolVar("single")
    m.Add(sum(y) == 1).OnlyEnforceIf(one)
    m.Add(sum(y) >= 2).OnlyEnforceIf(one.Not())
    ends: dict[str, list] = {}
    for flag, cap in (("first", net.src_cap), ("last", net.sink_cap)):
        ends[flag] = [m.NewBoolVar(f"{flag}{x}") if all(cap[classes[ci][0]] > 0 for ci, _ in p[1]) else None
                      for x, p in enumerate(pats)]
        if all(z is None for z in ends[flag]):
            return None
        m.AddExactlyOne([z for z in ends[flag] if z is not None])
    for x, v in enumerate(y):
        zf, zl = ends["first"][x], ends["last"][x]
        if zf is not None:
            m.Add(v >= 1).OnlyEnforceIf(zf)
        if zl is not None:
            m.Add(v >= 1).OnlyEnforceIf(zl)
        if zf is not None and zl is not None:
            m.Add(v >= zf + zl - one)
    if min_columns:
        m.Minimize(sum(y))
    solver = cp_model.CpSolver()
    solver.parameters.num_workers = workers
    clock.limit(solver, max(0.02, time_limit_s))
    if workers == 1:  # small clusters: a tiny model solved many times within a second, so no
        # probing either (2-core VM: 40-220 ms a probe with two workers, ~30 ms so; docs/placement.md)
        solver.parameters.cp_model_probing_level = 0
    status = solver.Solve(m)
    clock.charge(solver)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return None
    count = [solver.Value(v) for v in y]
    if sum(count) == 1:
        return [pats[count.index(1)]]
    picked = []
    for flag in ("first", "last"):
        x = next(x for x, z in enumerate(ends[flag]) if z is not None and solver.Value(z))
        count[x] -= 1
        picked.append(pats[x])
    middle = [p for p, c in zip(pats, count) for _ in range(c)]
    middle.sort(key=lambda p: (-p[2], p[0]))
    return [picked[0]] + middle + [picked[1]]


def columns_to_ranges(net: Network, classes: list[list[int]],
                      cols: Sequence[tuple]
                      ) -> dict[int, tuple[int, int]] | None:
    """Lay the columns (length, ((class, count), ...), ...) out left to right in the order given
    and hand out devices of each class. Returns None when some device cannot hold its column
    (memory differs per position)."""
    free = [list(c) for c in classes]
    out: dict[int, tuple[int, int]] = {}
    b = 0
    for l, parts, *_ in cols:
        for ci, cnt in parts:
            for _ in range(cnt):
                ok = [i for i in free[ci] if net.fits(i, b, l)]
                if not ok:
                    return None
                free[ci].remove(ok[0])
                out[ok[0]] = (b, b + l)
        b += l
    return out


def best_columns(net: Network, classes: list[list[int]], lo: float, hi: float, deadline: float,
                 workers: int = 2, rel_tol: float = 1e-7) -> tuple[float, dict[int, tuple[int, int]] | None]:
    """Bisection on flow_target in (lo, hi]; returns (column throughput, ranges) of the best found."""
    best: tuple[float, dict[int, tuple[int, int]] | None] = (0.0, None)
    while hi - lo > rel_tol * max(hi, 1e-9) and clock.now() < deadline:
        flow_target = hi if best[1] is None and lo == 0 and hi < 1e-9 else (lo + hi) / 2
        left = deadline - clock.now()
        cols = solve_columns(net, classes, flow_target, min(left, 5.0), workers)
        ranges = columns_to_ranges(net, classes, cols) if cols else None
        if ranges is None:
            hi = flow_target
            continue
        got = min(p[2] for p in cols)
        best = (got, ranges)
        lo = got
    if best[1] is not None:
        cols = solve_columns(net, classes, best[0] * (1 - 1e-12), max(0.05, min(2.0, deadline - clock.now())),
                             workers, min_columns=True)
        ranges = columns_to_ranges(net, classes, cols) if cols else None
        if ranges is not None:
            best = (min(p[2] for p in cols), ranges)
    return best
