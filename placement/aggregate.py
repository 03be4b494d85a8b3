"""CP-SAT model over device *classes* and layer boundaries (the network-free core problem).

Parts:
- ``device_classes(net)``: devices with the same capacity table and memory-feasible starts are
  interchangeable; each class is solved as a count, which removes the symmetry that makes a flat
  per-device MILP (Helix) slow.
- ``solve_aggregate(net, time_limit_s, hint=None)``: the CP-SAT model below; returns the slots
  ``(class, start, k, count)``, the model's flow value and its proven upper bound.
- ``slots_to_ranges(net, classes, slots)``: give concrete devices to the slots.

Design of the model. With links that are complete and never binding, a placement's max flow is
the largest total_flow for which per-device flows ``0 <= f_i <= cap_i(k_i)`` exist with, at every layer
boundary p, flow of ranges ending at p == flow of ranges starting at p (and total_flow leaving layer 0).
So per class c, start s, length k: integer count ``n[c,s,k]`` and integer flow ``f[c,s,k]``
(scaled), with
    f[c,s,k] <= n[c,s,k] * min(cap_c(k), f_sat)       (no device carries more than total_flow <= f_sat)
    sum_{s,k} n[c,s,k] <= |c|
    sum_{c,k} f[c,p-k,k] == sum_{c,k} f[c,p,k]        for p = 1..L-1
    total_flow = sum_{c,k} f[c,0,k];  sum k*f = total_flow*L (redundant, tightens the LP)
    maximise total_flow.
Capacities are rounded up, so the model's bound is a valid bound of the true problem (also when
links bind: dropping link constraints only relaxes). The exact value of the found placement
is then computed by max flow.
"""
from __future__ import annotations

import math
from collections import defaultdict

from ortools.sat.python import cp_model

from placement import clock
from placement.bounds import saturated_bound
from placement.network import Network

Slot = tuple[int, int, int, int]  # (class index, start, k, count)


def device_classes(net: Network) -> list[list[int]]:
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i in range(net.n):
        if net.cap[i]:
            key = (tuple(net.cap[i]), tuple(tuple(s) for s in net.starts[i]), net.src_cap[i] > 0, net.sink_cap[i] > 0)
            groups[key].append(i)
    return list(groups.values())


def _unit(net: Network, f_sat: float) -> float:
    """tokens/s per model unit: about 2e6 units for the saturated bound."""
    return max(f_sat, 1e-9) / 2e6


def solve_aggregate(net: Network, time_limit_s: float, hint: list[Slot] | None = None,
                    workers: int = 2, classes: list[list[int]] | None = None,
                    min_flow: float | None = None, move_cost: dict[tuple[int, int, int], int] | None = None
                    ) -> tuple[list[Slot], float, float, bool]:
    """Returns (slots, model flow tok/s, proven bound tok/s, optimal?)."""
    classes = classes if classes is not None else device_classes(net)
    L = net.L
    f_sat = saturated_bound(net)
    unit = _unit(net, f_sat)
    m = cp_model.CpModel()
    n_var, f_var = {}, {}
    ends: dict[int, list] = defaultdict(list)
    begins: dict[int, list] = defaultdict(list)
    layer_sum = []
    for c, members in enumerate(classes):
        i0 = members[0]
        N = len(members)
        for k in range(1, net.kmax(i0) + 1):
            cu = math.ceil(min(net.cap[i0][k - 1], f_sat) / unit)
            for s in net.starts[i0][k - 1]:
                nv = m.NewIntVar(0, N, f"n{c}_{s}_{k}")
                fv = m.NewIntVar(0, N * cu, f"f{c}_{s}_{k}")
                m.Add(fv <= cu * nv)
                n_var[c, s, k], f_var[c, s, k] = nv, fv
                begins[s].append(fv)
                ends[s + k].append(fv)
                layer_sum.append(k * fv)
        m.Add(sum(n_var[key] for key in n_var if key[0] == c) <= N)
    total_flow = m.NewIntVar(0, math.ceil(f_sat / unit) + 1, "total_flow")
    m.Add(total_flow == sum(begins[0]))
    for p in range(1, L):
        m.Add(sum(ends[p]) == sum(begins[p]))
    m.Add(sum(layer_sum) == L * total_flow)
    if min_flow is None:
        m.Maximize(total_flow)
    else:  # re-planning: reach min_flow, then move as little as possible
        m.Add(total_flow >= math.ceil(min_flow / unit))
        m.Minimize(sum(move_cost.get(key, 0) * v for key, v in n_var.items()) if move_cost else 0)
    if hint:
        used = {(c, s, k): cnt for c, s, k, cnt in hint}
        for key, v in n_var.items():
            m.AddHint(v, used.get(key, 0))
    solver = cp_model.CpSolver()
    solver.parameters.num_workers = workers
    clock.limit(solver, max(0.05, time_limit_s))
    status = solver.Solve(m)
    clock.charge(solver)
    bound = solver.BestObjectiveBound() * unit if status in (cp_model.OPTIMAL, cp_model.FEASIBLE) \
        else f_sat
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return [], 0.0, bound, False
    slots = [(c, s, k, solver.Value(v)) for (c, s, k), v in n_var.items()
             if solver.Value(v) > 0 and solver.Value(f_var[c, s, k]) > 0]
    if min_flow is not None:
        bound = f_sat
    return slots, solver.Value(total_flow) * unit, min(bound, f_sat), status == cp_model.OPTIMAL


def slots_to_ranges(classes: list[list[int]], slots: list[Slot]) -> dict[int, tuple[int, int]]:
    """Any device of the class may take any of its slots (links are handled elsewhere)."""
    free = [list(members) for members in classes]
    out = {}
    for c, s, k, cnt in sorted(slots):
        for _ in range(cnt):
            out[free[c].pop(0)] = (s, s + k)
    return out
