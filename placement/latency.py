"""Latency mode: one pipeline that minimises a single request's per-token decode latency.

Parts:
- ``solve_latency(net)``: ranges of the best single path found.

Design. Latency = source hop + sum of stage times + hops between stages + sink hop. For every
m, the m devices with the fastest one-layer stage are filled greedily (fastest first, up to what
memory allows) until they hold the L layers; the order of the stages is then searched exhaustively
for m <= 7 (links and memory per position differ) and kept in speed order beyond. A device that
only adds a hop is never part of the best m, so slow devices are left out.
"""
from __future__ import annotations

import itertools
import math

from placement.flow import path_latency
from placement.network import Network


def _fill(net: Network, devs: list[int]) -> list[int] | None:
    left = net.L
    ks = []
    for i in devs:
        k = min(net.kmax(i), left)
        ks.append(k)
        left -= k
    return ks if left == 0 and all(k >= 1 for k in ks) else None


def _path_ok(net: Network, order: list[tuple[int, int]]) -> list[tuple[int, int, int]] | None:
    stages, b = [], 0
    for x, (i, k) in enumerate(order):
        if not net.fits(i, b, k):
            return None
        if x and net.arc_cap.get((order[x - 1][0], i), 0.0) <= 0:
            return None
        stages.append((i, b, b + k))
        b += k
    if net.src_cap[order[0][0]] <= 0 or net.sink_cap[order[-1][0]] <= 0:
        return None
    return stages


def solve_latency(net: Network) -> dict[int, tuple[int, int]]:
    speed = sorted((i for i in range(net.n) if net.cap[i]), key=lambda i: net.stage_latency(i, 1))
    best: tuple[float, list[tuple[int, int, int]]] = (math.inf, [])
    for m in range(1, len(speed) + 1):
        devs = speed[:m]
        ks = _fill(net, devs)
        if ks is None:
            continue
        pairs = list(zip(devs, ks))
        orders = itertools.permutations(pairs) if m <= 7 else [pairs]
        for order in orders:
            stages = _path_ok(net, list(order))
            if stages:
                t = path_latency(net, stages)
                if t < best[0]:
                    best = (t, stages)
        if best[1] and m > len(best[1]) + 2:
            break
    return {i: (s, e) for i, s, e in best[1]}
