"""A cheap feasible placement, built before any expensive step (so a solve never returns nothing).

Parts:
- ``greedy_pipelines(net, T, order)``: disjoint pipelines whose stages all carry at least ``T``
  tokens/s: each device takes the most layers it can at capacity ``T`` (memory at that position
  permitting), chained along existing links from the source to the sink.
- ``greedy_placement(net, deadline)``: ``greedy_pipelines`` over a geometric grid of ``T`` (plus
  ``T = 0``: every device at its most layers), best exact max flow kept, until the deadline.

Design. For a target ``T`` the devices are sorted by how many layers they hold at ``T``; pipelines
are built one after another from the unused devices, each next stage the device (linked to the
previous one, or to the source for the first stage) that covers the most layers from the current
boundary; the last stage must be linked to the sink. Linear-ish in the device count per ``T``
(a few milliseconds at 512 devices), so a grid of ``T`` is tried well within a second.
"""
from __future__ import annotations


from placement import clock
from placement.flow import flow_value
from placement.network import Network
from placement.problem import Ranges

SCAN = 48   # valid candidates looked at per stage


def _layers_at(net: Network, i: int, T: float) -> int:
    cap = net.cap[i]
    k = 0
    for x, c in enumerate(cap, 1):
        if c >= T:
            k = x
    return k


def greedy_pipelines(net: Network, T: float, max_pipelines: int = 1_000_000) -> Ranges:
    L = net.L
    kT = [_layers_at(net, i, T) for i in range(net.n)]
    avail = sorted((i for i in range(net.n) if kT[i] > 0), key=lambda i: (-kT[i], -(net.cap[i][kT[i] - 1])))
    out: Ranges = {}
    for _ in range(max_pipelines):
        chain: list[tuple[int, int, int]] = []
        in_chain: set[int] = set()
        pos, prev = 0, -1
        while pos < L:
            pick, pick_k, seen = -1, 0, 0
            for j in avail:
                if j in in_chain:
                    continue
                if prev < 0:
                    if net.src_cap[j] <= 0:
                        continue
                elif net.arc_cap.get((prev, j), 0.0) <= 0:
                    continue
                k = min(kT[j], L - pos)
                while k > 0 and not net.fits(j, pos, k):
                    k -= 1
                if k == 0:
                    continue
                if pos + k == L and net.sink_cap[j] <= 0:
                    k = L - pos - 1
                    while k > 0 and not net.fits(j, pos, k):
                        k -= 1
                    if k == 0:
                        continue
                seen += 1
                if k > pick_k:
                    pick, pick_k = j, k
                    if pos + k == L:
                        break
                if seen >= SCAN:
                    break
            if pick < 0:
                return out
            chain.append((pick, pos, pos + pick_k))
            in_chain.add(pick)
            pos += pick_k
            prev = pick
        for i, s, e in chain:
            out[i] = (s, e)
        avail = [i for i in avail if i not in in_chain]
    return out


def greedy_placement(net: Network, deadline: float) -> tuple[Ranges, float]:
    """Best (ranges, exact max flow) over the T grid; ``T = 0`` first (the most likely to exist)."""
    best: Ranges = {}
    best_v = 0.0
    top = max((c[0] for c in net.cap if c), default=0.0)
    # coarse to fine: every 8th step of the grid first, then the ones between
    steps = sorted(range(40), key=lambda x: (_bitrev(x % 8), x))
    grid = [0.0] + [top * 0.85 ** x for x in steps]
    for x, T in enumerate(grid):
        if x > 0 and clock.now() >= deadline:
            break
        r = greedy_pipelines(net, T)
        if not r:
            continue
        v = flow_value(net, r)
        if v > best_v:
            best, best_v = r, v
    return best, best_v


def _bitrev(x: int) -> int:
    return int(f"{x:03b}"[::-1], 2)
