"""Re-planning: keep a fresh solve's throughput (within a tolerance), move as few layers as possible.

Parts:
- ``moved(net, ranges, current)``: (layers, bytes) the devices must newly load.
- ``relabel(net, ranges, current)``: permute a placement's ranges among interchangeable devices
  (same capacity table, memory and source/sink links) to maximise overlap with ``current``; one
  linear assignment per device class (OR-Tools ``SimpleLinearSumAssignment``).
- ``repair(net, current)``: survivors keep their ranges; layer gaps left by departed devices are
  covered by stretching a neighbour or by an idle (e.g. joining) device.
- ``blend(...)``: per device, its current range or its fresh one; the mix with fewest moves
  that reaches the target (exhaustive for up to 12 differing devices, else greedy).
- ``descend(...)``: local search with the exact max flow that first reaches the throughput target,
  then only accepts moves that lower migration (or raise flow at equal migration); its moves
  include shifting one stage boundary, or two nearby ones at once, for every device touching it.
- ``replan(...)``: the candidates above plus the fresh solution; picks the best (see its note).

What "moves" means. A layer is moved to a device when the device holds it in the new placement and
did not hold it in ``current`` (it must load it); layers that are dropped cost nothing. A fresh
solve's moves are counted against ``current`` exactly as it is returned (device ids as they come
out of the solver, no relabeling): relabeling interchangeable devices is part of re-planning.
"""
from __future__ import annotations

import itertools
import random
import time
from typing import Iterable, Iterator, Mapping

from ortools.graph.python import linear_sum_assignment

from ortools.graph.python import max_flow as max_flow_lib

from ortools.sat.python import cp_model

from placement import clock
from placement.aggregate import device_classes
from placement.flow import flow_value
from placement.local_search import _moves
from placement.network import Network
from placement.problem import Ranges

Current = Mapping[int, tuple[int, int]]
BLEND_EXACT = 12
MODEL_UNITS = 50       # flow resolution of the min-moves model: target / 50
MODEL_OPTIONS = 4000   # (device, start, k) triples up to which the exact min-moves model runs


def moved(net: Network, r: Mapping[int, tuple[int, int]], current: Current) -> tuple[int, int]:
    """(moved layers, moved bytes) of ``r`` against ``current``."""
    lb = net.problem.model.layer_bytes
    layers, nbytes = 0, 0
    for i, (s, e) in r.items():
        cs, ce = current.get(i, (0, 0))
        for x in range(s, e):
            if not cs <= x < ce:
                layers += 1
                nbytes += lb[x]
    return layers, nbytes


def _new_bytes(net: Network, se: tuple[int, int] | None, cur: tuple[int, int] | None) -> int:
    if se is None:
        return 0
    cs, ce = cur or (0, 0)
    lb = net.problem.model.layer_bytes
    return sum(lb[x] for x in range(se[0], se[1]) if not cs <= x < ce)


def relabel(net: Network, r: Ranges, current: Current, across_classes: bool = False) -> Ranges:
    """Same ranges (as a multiset per device class), handed to the devices that already hold most
    of them. Exact throughput is unchanged when links treat the class's devices alike.
    ``across_classes``: one assignment over all devices (throughput may change; a start point)."""
    out: Ranges = {}
    groups = [[i for i in range(net.n) if net.cap[i]]] if across_classes else device_classes(net)
    for members in groups:
        slots = [r.get(i) for i in members]            # None = the device is unused
        a = linear_sum_assignment.SimpleLinearSumAssignment()
        for x, i in enumerate(members):
            for y, se in enumerate(slots):
                if se is None or net.fits(i, se[0], se[1] - se[0]):
                    a.add_arc_with_cost(x, y, _new_bytes(net, se, current.get(i)))
        if a.solve() != a.OPTIMAL:
            out.update({i: r[i] for i in members if i in r})
            continue
        for x, i in enumerate(members):
            se = slots[a.right_mate(x)]
            if se is not None:
                out[i] = se
    return out


def repair(net: Network, current: Current) -> Ranges:
    """Survivors keep their (still feasible) ranges; each uncovered layer run is given to the
    strongest of: a neighbour stretched over it, or an idle device holding exactly the run."""
    r = {i: se for i, se in current.items() if 0 <= i < net.n and net.fits(i, se[0], se[1] - se[0])}
    for _ in range(net.L):
        covered = {x for s, e in r.values() for x in range(s, e)}
        gap = next((x for x in range(net.L) if x not in covered), None)
        if gap is None:
            break
        b = next((x for x in range(gap, net.L) if x in covered), net.L)
        opts = [(i, (s, b)) for i, (s, e) in r.items() if e == gap] + \
               [(i, (gap, e)) for i, (s, e) in r.items() if s == b] + \
               [(i, (gap, b)) for i in range(net.n) if i not in r]
        ok = [(i, se) for i, se in opts if net.fits(i, se[0], se[1] - se[0])]
        if not ok:  # no single device spans the run: give its first layer to anyone who can take it
            ok = [(i, (gap, gap + 1)) for i in range(net.n) if i not in r and net.fits(i, gap, 1)]
            if not ok:
                break
        i, se = max(ok, key=lambda o: net.cap[o[0]][o[1][1] - o[1][0] - 1])
        r[i] = se
    return r


class _Scorer:
    """Lexicographic key: (flow up to the target, migration objective); cached by placement."""

    def __init__(self, net: Network, current: Current, target: float, cost_per_layer: float | None) -> None:
        self.net, self.current, self.target, self.cost = net, current, target, cost_per_layer
        self.cache: dict[tuple, tuple[float, tuple[float, ...], float]] = {}

    def __call__(self, r: Ranges) -> tuple[float, tuple[float, ...], float]:
        key = tuple(sorted(r.items()))
        if key not in self.cache:
            v = flow_value(self.net, r)
            layers, nbytes = moved(self.net, r, self.current)
            obj = (-float(nbytes), v) if self.cost is None else (v - self.cost * layers, -float(layers))
            reach = round(min(v, self.target) / self.target, 9) if self.target > 0 else 1.0
            self.cache[key] = (reach, obj, v)
        return self.cache[key]

    def key(self, r: Ranges) -> tuple:
        reach, obj, _ = self(r)
        return (reach, tuple(round(x, 9) for x in obj))


Edit = tuple[tuple[int, tuple[int, int] | None], ...]   # (device, new range or None = drop)


def _boundary_moves(net: Network, r: Ranges, reach: int = 4) -> list[Edit]:
    """Move a stage boundary p to p +- d for every device ending or starting at p at once."""
    out: list[Edit] = []
    for p in sorted({e for _, e in r.values() if e < net.L}):
        for q in range(max(1, p - reach), min(net.L - 1, p + reach) + 1):
            if q == p:
                continue
            edit = tuple((i, (s, q) if e == p else (q, e)) for i, (s, e) in r.items() if e == p or s == p)
            if all(se[0] < se[1] and net.fits(i, se[0], se[1] - se[0]) for i, se in edit):
                out.append(edit)
    return out


def _boundary_pair_moves(net: Network, r: Ranges, reach: int = 4) -> list[Edit]:
    """Move two nearby stage boundaries p1 < p2 to q1 < q2 at once (a stage between them may move both
    ends): the re-plan that shifts a whole column, e.g. [6,13) [13,17) [17,20) -> [6,10) [10,14)
    [14,20), is made of two boundary moves of which neither alone raises the flow."""
    out: list[Edit] = []
    bounds = sorted({e for _, e in r.values() if e < net.L})
    pairs = [(p1, p2) for x, p1 in enumerate(bounds) for p2 in bounds[x + 1:x + 3]]   # next two only
    for p1, p2 in pairs:
        touch = [(i, se) for i, se in r.items() if se[0] in (p1, p2) or se[1] in (p1, p2)]
        for q1 in range(max(1, p1 - reach), min(net.L - 1, p1 + reach) + 1):
            for q2 in range(max(q1 + 1, p2 - reach), min(net.L - 1, p2 + reach) + 1):
                if (q1, q2) == (p1, p2):
                    continue
                to = {p1: q1, p2: q2}
                edit = tuple((i, (to.get(s, s), to.get(e, e))) for i, (s, e) in touch)
                if all(se[0] < se[1] and net.fits(i, se[0], se[1] - se[0]) for i, se in edit):
                    out.append(edit)
    return out


def _apply(r: Ranges, edit: Edit) -> Ranges:
    c = dict(r)
    for i, se in edit:
        if se is None:
            c.pop(i, None)
        else:
            c[i] = se
    return c


def descend(net: Network, start: Ranges, current: Current, scorer: _Scorer, deadline: float,
            seed: int = 0) -> Ranges:
    """First-improvement hill climbing on ``scorer.key`` with the usual moves plus "go back to
    the current range" and "drop" for every device. Candidates are kept as edits and built one at
    a time, so that a round over every option of every device (hundreds of thousands at 512
    devices) stops at ``deadline``."""
    rng = random.Random(seed)
    best, best_k = dict(start), scorer.key(start)
    stale = 0
    while clock.now() < deadline and stale < 25:
        cands: list[Edit] = []
        for i in list(best):
            if i in current and best[i] != current[i] and net.fits(i, current[i][0], current[i][1] - current[i][0]):
                cands.append(((i, current[i]),))
            if i not in current or best[i] != current[i]:
                cands.append(((i, None),))
        cands += _boundary_moves(net, best) + _boundary_pair_moves(net, best)
        rng.shuffle(cands)
        edits: Iterable[Edit] = cands
        if stale >= 2:  # first-improvement stalled: try every option of every device (lazily)
            edits = itertools.chain(cands, (((i, (s, s + k)),) for i in rng.sample(range(net.n), net.n)
                                            for s, k in net.options(i)))
        improved = False
        for c in _lazy(best, edits, _moves(net, best, rng)):
            if clock.now() >= deadline:
                break
            k = scorer.key(c)
            if k > best_k:
                best, best_k, improved = c, k, True
                break
        stale = 0 if improved else stale + 1
    return best


def _lazy(best: Ranges, edits: Iterable[Edit], extra: list[Ranges]) -> Iterator[Ranges]:
    for e in edits:
        yield _apply(best, e)
    yield from extra


def blend(net: Network, fresh: Ranges, current: Current, scorer: _Scorer, deadline: float) -> Ranges:
    """Each device either keeps its current range or takes its range in ``fresh`` (devices with
    no current range: the fresh one or nothing). Up to ``BLEND_EXACT`` differing devices every
    mix is tried, fewest moves first, until one reaches the target; beyond that, greedily
    revert devices of ``fresh`` to ``current`` while the target holds, most bytes saved first."""
    diff = [i for i in range(net.n) if fresh.get(i) != current.get(i)]
    base = {i: se for i, se in fresh.items() if i not in diff}

    def alt(i: int) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
        cur = current.get(i)
        if cur is not None and not net.fits(i, cur[0], cur[1] - cur[0]):
            cur = None
        return cur, fresh.get(i)

    def build(choice: list[tuple[int, int] | None]) -> Ranges:
        r = dict(base)
        r.update({i: se for i, se in zip(diff, choice) if se is not None})
        return r

    alts = [alt(i) for i in diff]
    if len(diff) <= BLEND_EXACT:
        combos = []
        for mask in range(1 << len(diff)):
            choice = [alts[x][(mask >> x) & 1] for x in range(len(diff))]
            cost = sum(_new_bytes(net, se, current.get(i)) for i, se in zip(diff, choice))
            combos.append((cost, mask, choice))
        combos.sort(key=lambda c: c[:2])
        best, best_k = None, None
        for cost, _, choice in combos:
            if clock.now() >= deadline or (best is not None and cost > best[0]):
                break
            r = build(choice)
            k = scorer.key(r)
            if k[0] >= 1.0 and (best_k is None or k > best_k):
                best, best_k = (cost, r), k
        return best[1] if best else dict(fresh)
    r = dict(fresh)
    order = sorted(range(len(diff)), key=lambda x: -_new_bytes(net, fresh.get(diff[x]), current.get(diff[x])))
    for x in order:
        if clock.now() >= deadline:
            break
        c = dict(r)
        c.pop(diff[x], None)
        if alts[x][0] is not None:
            c[diff[x]] = alts[x][0]
        if scorer.key(c) >= scorer.key(r):
            r = c
    return r


def _unit_flows(net: Network, r: Ranges, unit: float, limit: int) -> dict[int, int]:
    """Per-device flow, in whole ``unit``s, of a max flow (at most ``limit`` units) on capacities
    floored to units."""
    smf = max_flow_lib.SimpleMaxFlow()
    top = 2 + 2 * net.n                      # super source: caps the total at ``limit``
    smf.add_arc_with_capacity(top, 0, limit)
    for i, (s, e) in r.items():
        smf.add_arc_with_capacity(2 + 2 * i, 3 + 2 * i, int(net.cap[i][e - s - 1] / unit))
        if s == 0:
            smf.add_arc_with_capacity(0, 2 + 2 * i, 1 << 40)
        if e == net.L:
            smf.add_arc_with_capacity(3 + 2 * i, 1, 1 << 40)
        for j, (s2, _) in r.items():
            if s2 == e and j != i:
                smf.add_arc_with_capacity(3 + 2 * i, 2 + 2 * j, 1 << 40)
    if smf.solve(top, 1) != smf.OPTIMAL:
        return {}
    return {(smf.tail(x) - 2) // 2: smf.flow(x) for x in range(smf.num_arcs())
            if smf.head(x) == smf.tail(x) + 1 and smf.tail(x) >= 2 and smf.tail(x) % 2 == 0}


def min_moves_model(net: Network, hint: Ranges, current: Current, target: float, deadline: float,
                    by_layers: bool) -> Ranges:
    """Exact up to flow rounding for complete non-binding links: CP-SAT over device -> (start, k)
    booleans and per-device flows in coarse units (``target / MODEL_UNITS``, capacities rounded
    down, so any solution truly reaches ``target``); conservation at every layer boundary;
    minimise moved layers (or bytes, in 1% of the largest layer). Hinted with ``hint`` and its
    flows (at most the target's units). No presolve: it took ~0.17 s of a 0.5 s budget, and the
    search from the hint finds more in that time."""
    if target <= 0:
        return {}
    unit = target / MODEL_UNITS
    need = MODEL_UNITS
    lb = net.problem.model.layer_bytes
    lb_max = max(max(lb), 1)      # cost unit: 1% of the largest layer
    m = cp_model.CpModel()
    x, f = {}, {}
    begins: dict[int, list] = {}
    ends: dict[int, list] = {}
    cost = []
    for i in range(net.n):
        cs, ce = current.get(i, (0, 0))
        mine = []
        for s, k in net.options(i):
            cu = min(int(net.cap[i][k - 1] / unit), need)
            if cu <= 0:
                continue
            xv = m.NewBoolVar("")
            fv = m.NewIntVar(0, cu, "")
            m.Add(fv <= cu * xv)
            x[i, s, k], f[i, s, k] = xv, fv
            mine.append(xv)
            begins.setdefault(s, []).append(fv)
            ends.setdefault(s + k, []).append(fv)
            new = [y for y in range(s, s + k) if not cs <= y < ce]
            c = len(new) if by_layers else sum(lb[y] for y in new) * 100 // lb_max
            if c:
                cost.append(c * xv)
        if mine:
            m.AddAtMostOne(mine)
    m.Add(sum(begins.get(0, [])) >= need)
    for p in range(1, net.L):
        m.Add(sum(ends.get(p, [])) == sum(begins.get(p, [])))
    m.Minimize(sum(cost))
    fl = _unit_flows(net, hint, unit, need)
    reaches = sum(fl.get(i, 0) for i, (s, _) in hint.items() if s == 0) >= need
    for (i, s, k), xv in x.items():
        on = hint.get(i) == (s, s + k)
        m.AddHint(xv, on)
        if reaches:   # flows of a hint short of the target: CP-SAT found nothing in 0.2 s with, 13 moves in 0.02 s without
            m.AddHint(f[i, s, k], fl.get(i, 0) if on else 0)
    solver = cp_model.CpSolver()
    solver.parameters.num_workers = 2
    clock.limit(solver, max(0.02, deadline - clock.now()))
    solver.parameters.cp_model_presolve = False
    status = solver.Solve(m)
    clock.charge(solver)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return {}
    return {i: (s, s + k) for (i, s, k), xv in x.items() if solver.Value(xv)}


def replan(net: Network, fresh: Ranges, fresh_v: float, current: Current, deadline: float,
           cost_per_layer: float | None, tolerance: float) -> Ranges:
    """Design. Candidates: (c) the fresh solution, (a) it relabeled towards ``current``,
    (b) ``current`` repaired, the ``blend`` of (a) and ``current``, then the blend and (b)
    improved by ``descend``. Eligible are those
    with exact throughput >= (1 - tolerance) * ``fresh_v``. With complete non-binding links and up to
    ``MODEL_OPTIONS`` (device, start, k) options, 65% of the time goes to ``min_moves_model``,
    hinted first with ``current`` repaired, then with the best candidate.
    ``cost_per_layer`` None: fewest moved bytes, ties by throughput. Given (tokens/s per moved
    layer): the most ``throughput - cost_per_layer * moved_layers``. Always within ``deadline``."""
    target = (1 - tolerance) * fresh_v
    scorer = _Scorer(net, current, target, cost_per_layer)
    rel = relabel(net, fresh, current)
    rep = repair(net, current)
    cross = relabel(net, fresh, current, across_classes=True)
    cands = [fresh, rel, rep, cross]
    options = sum(len(net.options(i)) for i in range(net.n))
    use_model = net.links_trivial and options <= MODEL_OPTIONS
    t0 = clock.now()
    # 35% for the heuristics with the model (descend converges in ~0.1 s on 6 devices x 20 layers;
    # at 20% it stopped after 0.03 s); the first start (the blend of the relabeled fresh solve) half
    heur_end = t0 + (deadline - t0) * (0.35 if use_model else 1.0)
    starts = [blend(net, rel, current, scorer, heur_end), cross] + ([rep] if rep else [])
    for x, s in enumerate(starts):
        now = clock.now()
        part = now + (heur_end - now) * (0.5 if x == 0 else 1 / (len(starts) - x))
        got = descend(net, s, current, scorer, now + 0.85 * (part - now), seed=x)
        cands += [s, got, blend(net, got, current, scorer, part)]

    def pick() -> Ranges:
        ok = [c for c in cands if c and scorer(c)[2] >= target * (1 - 1e-9)] or [fresh]
        return max(ok, key=lambda c: (scorer(c)[1], scorer(c)[2]))

    # the model twice: hinted with the current placement (repaired), which it sometimes turns into
    # a placement with very few moves at once (5 moves in 0.1 s on a test cluster where the
    # fewest-moves candidate as hint reached 16 in 0.45 s) and sometimes finds nothing that
    # reaches the target; then with the best found so far
    hints = ([rep] if rep else []) + [None]
    for x, hint in enumerate(hints):
        now = clock.now()
        if not use_model or deadline - now <= 0.05:
            break
        end = now + (deadline - now) * (0.4 if hint else 1.0)
        cands.append(min_moves_model(net, hint or pick(), current, target * (1 + 1e-6), end,
                                     cost_per_layer is not None))
    return pick()
