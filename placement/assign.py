"""Link-aware assignment of concrete devices to an ordered sequence of columns (CP-SAT).

Parts:
- ``assign_devices(net, classes, cols, time_limit_s, hint)``: returns ranges maximising the
  max flow when links are sparse or can bind (pruned graphs, multi-region clusters).

Design. The columns (length, class counts) are fixed in order. Booleans ``a[i,p]`` put device
i into column p (its class must be asked for there, counts must match, a device used once).
Integer flows (scaled): ``f[i,p] <= cap_i(l_p) * a[i,p]``; a junction flow ``g[i,j,p]`` for every
existing link between a candidate of column p and one of column p+1, bounded by the link
capacity times ``a[i,p]`` and times ``a[j,p+1]`` (no products needed); conservation
``f[i,p] = sum_j g[i,j,p]`` and ``f[j,p+1] = sum_i g[i,j,p]``; the first column is fed from the
source and the last drains to the sink within their link capacities. Maximise the flow into
column 0. For a fixed column sequence this is exactly the max flow of the best assignment.
"""
from __future__ import annotations

import math

from ortools.sat.python import cp_model

from placement import clock
from placement.columns import Pattern
from placement.network import Network


def assign_devices(net: Network, classes: list[list[int]], cols: list[Pattern], time_limit_s: float,
                   hint: dict[int, tuple[int, int]] | None = None, workers: int = 2
                   ) -> tuple[dict[int, tuple[int, int]] | None, float]:
    """(ranges, model flow tok/s) or (None, 0) when no assignment was found in time."""
    m = len(cols)
    top = max(c[2] for c in cols)
    unit = top / 2e6
    cls_of = {i: ci for ci, members in enumerate(classes) for i in members}
    model = cp_model.CpModel()
    starts, b = [], 0
    for l, _, _ in cols:
        starts.append(b)
        b += l
    a: dict[tuple[int, int], cp_model.IntVar] = {}
    f: dict[tuple[int, int], cp_model.IntVar] = {}
    cand: list[list[int]] = []
    for p, (l, parts, _) in enumerate(cols):
        cand_p = []
        for ci, cnt in parts:
            members = [i for i in classes[ci] if net.fits(i, starts[p], l)]
            cand_p.extend(members)
            cu = math.floor(net.cap[classes[ci][0]][l - 1] / unit)
            if p == 0 or p == m - 1:
                pass
            for i in members:
                a[i, p] = model.NewBoolVar(f"a{i}_{p}")
                ub = cu
                if p == 0:
                    ub = min(ub, math.floor(net.src_cap[i] / unit))
                if p == m - 1:
                    ub = min(ub, math.floor(net.sink_cap[i] / unit))
                f[i, p] = model.NewIntVar(0, max(0, ub), f"f{i}_{p}")
                model.Add(f[i, p] <= max(0, ub) * a[i, p])
            model.Add(sum(a[i, p] for i in members) == cnt)
        cand.append(cand_p)
    for i in cls_of:
        mine = [a[i, p] for p in range(m) if (i, p) in a]
        if len(mine) > 1:
            model.AddAtMostOne(mine)
    outs: dict[tuple[int, int], list] = {}
    ins: dict[tuple[int, int], list] = {}
    for p in range(m - 1):
        for i in cand[p]:
            for j in cand[p + 1]:
                c = net.arc_cap.get((i, j), 0.0)
                if c <= 0 or i == j:
                    continue
                cu = min(math.floor(c / unit), 4_000_000_000)
                g = model.NewIntVar(0, cu, f"g{i}_{j}_{p}")
                model.Add(g <= cu * a[i, p])
                model.Add(g <= cu * a[j, p + 1])
                outs.setdefault((i, p), []).append(g)
                ins.setdefault((j, p + 1), []).append(g)
    for (i, p), fv in f.items():
        if p < m - 1:
            model.Add(fv == sum(outs.get((i, p), [])))
        if p > 0:
            model.Add(fv == sum(ins.get((i, p), [])))
    total_flow = sum(f[i, 0] for i in cand[0])
    model.Maximize(total_flow)
    if hint:
        for (i, p), v in a.items():
            model.AddHint(v, 1 if hint.get(i) == (starts[p], starts[p] + cols[p][0]) else 0)
    solver = cp_model.CpSolver()
    solver.parameters.num_workers = workers
    clock.limit(solver, max(0.05, time_limit_s))
    status = solver.Solve(model)
    clock.charge(solver)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return None, 0.0
    ranges = {}
    for (i, p), v in a.items():
        if solver.Value(v):
            ranges[i] = (starts[p], starts[p] + cols[p][0])
    return ranges, solver.ObjectiveValue() * unit
