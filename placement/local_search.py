"""Local search on concrete ranges, every candidate scored by the exact max flow.

Parts:
- ``improve(net, ranges, deadline, score=None, seed=0)``: first-improvement hill climbing with
  random restarts of the move order. Moves: swap the ranges of two devices, hand a range to an
  idle device, duplicate a range onto an idle device (parallel capacity), shift or resize one
  range by one layer, drop a device. ``score`` defaults to the max flow; re-planning passes one
  that also charges moved layers.
"""
from __future__ import annotations

import random
from typing import Callable

from placement import clock
from placement.flow import flow_value
from placement.network import Network
from placement.problem import Ranges



def _moves(net: Network, r: Ranges, rng: random.Random) -> list[Ranges]:
    used = list(r)
    idle = [i for i in range(net.n) if i not in r and net.cap[i]]
    out: list[Ranges] = []
    for _ in range(12):
        if len(used) >= 2:
            i, j = rng.sample(used, 2)
            if net.fits(i, *_sk(r[j])) and net.fits(j, *_sk(r[i])):
                c = dict(r)
                c[i], c[j] = r[j], r[i]
                out.append(c)
        if idle and used:
            i, j = rng.choice(used), rng.choice(idle)
            if net.fits(j, *_sk(r[i])):
                c = dict(r)
                c[j] = r[i]
                out.append(c)           # duplicate: parallel capacity
                c2 = dict(c)
                del c2[i]
                out.append(c2)          # replace
        if used:
            i = rng.choice(used)
            s, e = r[i]
            for ns, ne in ((s - 1, e - 1), (s + 1, e + 1), (s, e - 1), (s, e + 1), (s - 1, e), (s + 1, e)):
                if 0 <= ns < ne <= net.L and net.fits(i, ns, ne - ns):
                    c = dict(r)
                    c[i] = (ns, ne)
                    out.append(c)
            if len(used) > 1:
                c = dict(r)
                del c[i]
                out.append(c)
    rng.shuffle(out)
    return out


def _sk(se: tuple[int, int]) -> tuple[int, int]:
    return se[0], se[1] - se[0]


def improve(net: Network, ranges: Ranges, deadline: float, score: Callable[[Ranges], float] | None = None,
            seed: int = 0, max_rounds: int = 1_000_000) -> tuple[Ranges, float]:
    """Hill climbing until the deadline or no improving move in several rounds."""
    score = score or (lambda r: flow_value(net, r))
    rng = random.Random(seed)
    best, best_v = dict(ranges), score(ranges)
    stale = 0
    for _ in range(max_rounds):
        if clock.now() >= deadline or stale >= 40:
            break
        improved = False
        for cand in _moves(net, best, rng):
            if clock.now() >= deadline:
                break
            v = score(cand)
            if v > best_v * (1 + 1e-9) + 1e-9:
                best, best_v, improved = cand, v, True
                break
        stale = 0 if improved else stale + 1
    return best, best_v
