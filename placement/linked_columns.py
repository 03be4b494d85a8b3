"""Link-aware column sequences for sparse graphs (pruned or multi-region clusters), CP-SAT.

Parts:
- ``link_classes(net, threshold)``: devices grouped by capacity table, memory starts, source/sink
  link and *neighbourhood* (links of capacity >= ``threshold``); members of a class are
  interchangeable, also for the links.
- ``solve_linked_columns(net, time_limit_s, positions)``: a greedy linked sequence
  (``linked_greedy.py``) first, then the CP-SAT model below hinted with it; returns the best
  ranges (or None) and their exact max flow.
- ``spans_model(net, threshold)``: cheap test whether any linked sequence can exist.

Design. A placement is a sequence of columns ``[b_p, b_{p+1})``; each used device holds exactly
one column. If every device of column p has a usable link to every device of column p+1 (and
the first column is fed by the source, the last drains to the sink), the junctions are complete
bipartite and never bind, so the max flow is at least the smallest column capacity. The column
pattern ILP (``columns.py``) ignores which devices are linked; here the order is part of the
model, so the alternating "hub" structure of a pruned graph (spokes linked only to hubs) is
found by the solver. Per position p: length booleans ``lam[p,l]``, counts ``m[p,c,l]`` of
class c holding l layers, presence ``z[p,c]``; ``sum_l l*len = L``, class counts respected,
column capacity ``sum cap_c(l) m[p,c,l] >= total_flow`` on used positions (used positions form a prefix),
``z[p,c] + z[p+1,d] <= 1`` for class pairs that are not completely linked, source classes only
at position 0, sink classes only at the last used position. Maximise total_flow. The redundant
``sum l*cap*m >= L*total_flow`` tightens the LP. Capacities are rounded down, so the model's total_flow is a lower
bound of the exact max flow of the placement it returns. The greedy start is a complete hint
(every variable), so CP-SAT begins at the greedy value instead of searching for a first solution.
"""
from __future__ import annotations

import math
from collections import defaultdict

from ortools.sat.python import cp_model

from placement import clock
from placement.bounds import upper_bound
from placement.columns import columns_to_ranges
from placement.flow import flow_value
from placement.linked_greedy import Column, greedy_linked
from placement.network import Network
from placement.problem import Ranges

MAX_CLASSES = 80   # the model has positions x classes^2 link clauses; beyond this it is skipped


def _neighbours(net: Network, i: int, thr: float) -> tuple[frozenset[int], frozenset[int]]:
    out = frozenset(j for j in range(net.n) if j != i and net.arc_cap.get((i, j), 0.0) >= thr)
    inn = frozenset(j for j in range(net.n) if j != i and net.arc_cap.get((j, i), 0.0) >= thr)
    return out, inn


def link_classes(net: Network, threshold: float) -> list[list[int]]:
    """Interchangeable devices: same table, starts, source/sink links, and neighbours. Devices
    that link each other (a clique) share their closed neighbourhood, the others the open one."""
    nb = {i: _neighbours(net, i, threshold) for i in range(net.n) if net.cap[i]}

    def base(i: int) -> tuple:
        return (tuple(net.cap[i]), tuple(tuple(s) for s in net.starts[i]),
                net.src_cap[i] >= threshold, net.sink_cap[i] >= threshold)

    closed: dict[tuple, list[int]] = defaultdict(list)
    for i, (o, n_in) in nb.items():
        closed[(base(i), o | {i}, n_in | {i})].append(i)
    groups = [g for g in closed.values() if len(g) > 1]
    taken = {i for g in groups for i in g}
    opened: dict[tuple, list[int]] = defaultdict(list)
    for i, (o, n_in) in nb.items():
        if i not in taken:
            opened[(base(i), o, n_in)].append(i)
    return groups + list(opened.values())


def spans_model(net: Network, threshold: float) -> bool:
    """Whether some connected part of the usable-link graph has a source device, a sink device and
    room for all layers (else no linked column sequence exists: skip the model)."""
    seen: set[int] = set()
    for root in range(net.n):
        if root in seen or not net.cap[root]:
            continue
        part, todo = [], [root]
        seen.add(root)
        while todo:
            i = todo.pop()
            part.append(i)
            for j in range(net.n):
                if j not in seen and net.cap[j] and (net.arc_cap.get((i, j), 0.0) >= threshold
                                                     or net.arc_cap.get((j, i), 0.0) >= threshold):
                    seen.add(j)
                    todo.append(j)
        if sum(net.kmax(i) for i in part) >= net.L and any(net.src_cap[i] >= threshold for i in part) \
                and any(net.sink_cap[i] >= threshold for i in part):
            return True
    return False


def _linked(net: Network, a: list[int], b: list[int], thr: float) -> bool:
    return all(net.arc_cap.get((i, j), 0.0) >= thr for i in a for j in b if i != j)


def solve_linked_columns(net: Network, time_limit_s: float, positions: int = 20, workers: int = 2,
                         threshold: float | None = None) -> tuple[Ranges | None, float]:
    """(ranges, exact max flow tok/s) of the best linked column sequence found in time: the
    greedy start (``linked_greedy.py``, at most 20% of the time) and CP-SAT hinted with it."""
    t0 = clock.now()
    ub = upper_bound(net)
    thr = ub if threshold is None else threshold
    classes = link_classes(net, thr)
    if not classes or ub <= 0 or len(classes) > MAX_CLASSES:
        return None, 0.0
    linked = [[_linked(net, a, b, thr) for b in classes] for a in classes]
    src = [net.src_cap[c[0]] >= thr for c in classes]
    snk = [net.sink_cap[c[0]] >= thr for c in classes]
    start_cols = greedy_linked(net, classes, linked, src, snk, ub, t0 + min(0.2 * time_limit_s, 5.0))
    best = columns_to_ranges(net, classes, start_cols) if start_cols else None
    best_v = flow_value(net, best) if best else 0.0
    P = max(1, min(max(positions, len(start_cols or [])), net.L))
    cols = _solve_model(net, classes, linked, src, snk, ub, P, start_cols, t0 + time_limit_s, workers)
    r = columns_to_ranges(net, classes, cols) if cols else None
    v = flow_value(net, r) if r else 0.0
    return (r, v) if v > best_v else (best, best_v)


def _solve_model(net: Network, classes: list[list[int]], linked: list[list[bool]], src: list[bool],
                 snk: list[bool], ub: float, P: int, hint: list[Column] | None, deadline: float,
                 workers: int) -> list[Column] | None:
    L = net.L
    unit = ub / 100_000
    fmax = math.ceil(ub / unit) + 1
    kmax = max(net.kmax(c[0]) for c in classes)
    capu = [[math.floor(min(net.cap[c[0]][l - 1], ub) / unit) for l in range(1, net.kmax(c[0]) + 1)] for c in classes]
    m = cp_model.CpModel()
    total_flow = m.NewIntVar(0, fmax, "total_flow")
    used = [m.NewBoolVar(f"u{p}") for p in range(P)]
    lam = [[m.NewBoolVar(f"l{p}_{l}") for l in range(1, kmax + 1)] for p in range(P)]
    cnt: dict[tuple[int, int, int], cp_model.IntVar] = {}
    z = [[m.NewBoolVar(f"z{p}_{c}") for c in range(len(classes))] for p in range(P)]
    lasts: list[cp_model.IntVar] = []
    m.Add(used[0] == 1)
    total_len, work = [], []
    for p in range(P):
        m.Add(sum(lam[p]) == used[p])
        if p + 1 < P:
            m.Add(used[p] >= used[p + 1])
        total_len.extend(l * lam[p][l - 1] for l in range(1, kmax + 1))
        col = []
        for c, members in enumerate(classes):
            mine = []
            for l in range(1, net.kmax(members[0]) + 1):
                if capu[c][l - 1] <= 0:
                    continue
                v = m.NewIntVar(0, len(members), f"m{p}_{c}_{l}")
                m.Add(v <= len(members) * lam[p][l - 1])
                cnt[p, c, l] = v
                mine.append(v)
                col.append(capu[c][l - 1] * v)
                work.append(l * capu[c][l - 1] * v)
            if mine:
                m.Add(sum(mine) <= len(members) * z[p][c])
            else:
                m.Add(z[p][c] == 0)
        m.Add(sum(col) >= total_flow - fmax * (1 - used[p]))
        m.Add(sum(v for (pp, _, _), v in cnt.items() if pp == p) >= used[p])
    m.Add(sum(total_len) == L)
    m.Add(sum(work) >= L * total_flow)
    for c, members in enumerate(classes):
        m.Add(sum(v for (p, cc, l), v in cnt.items() if cc == c) <= len(members))
        if not src[c]:
            m.Add(z[0][c] == 0)
    for p in range(P):   # only sink classes in the last used column
        last = used[p] if p + 1 == P else m.NewBoolVar(f"last{p}")
        if p + 1 < P:
            m.Add(last >= used[p] - used[p + 1])
        lasts.append(last)
        for c in range(len(classes)):
            if not snk[c]:
                m.Add(z[p][c] + last <= 1)
    bad = [(c, d) for c in range(len(classes)) for d in range(len(classes)) if not linked[c][d]]
    for p in range(P - 1):
        for c, d in bad:
            m.AddBoolOr([z[p][c].Not(), z[p + 1][d].Not()])
    m.Maximize(total_flow)
    if hint and len(hint) <= P:
        _add_hint(m, hint, capu, P, kmax, len(classes), total_flow, used, lam, cnt, z, lasts)
    solver = cp_model.CpSolver()
    solver.parameters.num_workers = workers
    clock.limit(solver, max(0.05, deadline - clock.now()))
    status = solver.Solve(m)
    clock.charge(solver)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return None
    out: list[Column] = []
    for p in range(P):
        if not solver.Value(used[p]):
            break
        l = next(l for l in range(1, kmax + 1) if solver.Value(lam[p][l - 1]))
        out.append((l, tuple((c, solver.Value(cnt[p, c, l])) for c in range(len(classes))
                             if (p, c, l) in cnt and solver.Value(cnt[p, c, l]))))
    return out


def _add_hint(m: cp_model.CpModel, hint: list[Column], capu: list[list[int]], P: int, kmax: int, n_cls: int,
              total_flow: cp_model.IntVar, used: list, lam: list, cnt: dict, z: list, lasts: list) -> None:
    """A complete hint (every variable), so CP-SAT starts from the greedy sequence."""
    m.AddHint(total_flow, min(sum(capu[c][l - 1] * k for c, k in parts) for l, parts in hint))
    for p in range(P):
        l_p, parts = hint[p] if p < len(hint) else (0, ())
        has = dict(parts)
        m.AddHint(used[p], int(p < len(hint)))
        if p + 1 < P:   # the last position's flag is ``used`` itself
            m.AddHint(lasts[p], int(p == len(hint) - 1))
        for l in range(1, kmax + 1):
            m.AddHint(lam[p][l - 1], int(l == l_p))
        for c in range(n_cls):
            m.AddHint(z[p][c], int(c in has))
            for l in range(1, kmax + 1):
                if (p, c, l) in cnt:
                    m.AddHint(cnt[p, c, l], has.get(c, 0) if l == l_p else 0)
