"""Greedy linked column sequences: a fast start (and CP-SAT hint) for ``linked_columns.py``.

Parts:
- ``greedy_linked(net, classes, linked, src, snk, deadline, seed)``: for targets flow_target from the
  bound downwards (bisection), build columns left to right: each next column uses only classes
  linked to every class of the previous one (source classes first, sink classes last), takes the
  most layers that still reach flow_target, and fills it with the least connected classes first (the
  hubs stay free to bridge later columns). Returns the columns ``[(length, ((class, count),
  ...)), ...]`` of the best target reached, or None.
"""
from __future__ import annotations

import random

from placement import clock
from placement.network import Network

Column = tuple[int, tuple[tuple[int, int], ...]]


def _fill(net: Network, classes: list[list[int]], order: list[int], rem: list[int], l: int, flow_target: float
          ) -> tuple[tuple[int, int], ...] | None:
    total, out = 0.0, []
    for c in order:
        if rem[c] <= 0 or net.kmax(classes[c][0]) < l:
            continue
        cap = net.cap[classes[c][0]][l - 1]
        need = min(rem[c], max(1, int((flow_target - total) // cap) + (1 if (flow_target - total) % cap else 0)))
        out.append((c, need))
        total += need * cap
        if total >= flow_target:
            return tuple(out)
    return None


def _build(net: Network, classes: list[list[int]], linked: list[list[bool]], src: list[bool],
           snk: list[bool], flow_target: float, rng: random.Random, degree: list[float], noise: float = 0.1
           ) -> list[Column] | None:
    work = [max(k * c for k, c in enumerate(net.cap[m[0]], 1)) for m in classes]
    rem = [len(c) for c in classes]
    prev: list[int] = []
    cols: list[Column] = []
    b = 0
    while b < net.L:
        ok = [c for c in range(len(classes)) if rem[c] > 0 and all(linked[p][c] for p in prev)
              and (b > 0 or src[c])]
        order = sorted(ok, key=lambda c: (degree[c] * rng.uniform(0.8, 1.25), -max(net.cap[classes[c][0]])))
        best, best_score = None, -1.0
        for l in range(min(net.L - b, max((net.kmax(c[0]) for c in classes), default=0)), 0, -1):
            last = b + l == net.L
            got = _fill(net, classes, [c for c in order if snk[c]] if last else order, rem, l, flow_target)
            if got:   # layers per unit of the used devices' potential (max_k k*cap(k))
                score = l / sum(k * work[c] for c, k in got) * rng.uniform(1 - noise, 1 + noise)
                if score > best_score:
                    best, best_score = (l, got), score
        if best is None:
            return None
        cols.append(best)
        for c, k in best[1]:
            rem[c] -= k
        prev = [c for c, _ in best[1]]
        b += best[0]
    return cols


def greedy_linked(net: Network, classes: list[list[int]], linked: list[list[bool]], src: list[bool],
                  snk: list[bool], hi: float, deadline: float, seed: int = 0, tries: int = 8
                  ) -> list[Column] | None:
    rng = random.Random(seed)
    degree = [sum(linked[c][d] for d in range(len(classes))) + sum(linked[d][c] for d in range(len(classes)))
              for c in range(len(classes))]
    lo, best = 0.0, None
    while hi - lo > 1e-3 * hi and clock.now() < deadline:
        flow_target = (lo + hi) / 2
        got = next((g for g in (_build(net, classes, linked, src, snk, flow_target, rng, degree) for _ in range(tries)) if g),
                   None)
        if got:
            lo, best = flow_target, got
        else:
            hi = flow_target
    return best
