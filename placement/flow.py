"""Max-flow evaluation of a placement (Helix's objective) and its split into pipelines.

Parts:
- ``max_flow(net, ranges)``: value and arc flows of the max flow S -> T through the split-node
  graph (``in_i -> out_i`` capped by the device's capacity for its layer count; ``S -> in_i`` if
  the range starts at 0; ``out_i -> T`` if it ends at L; ``out_i -> in_j`` if ``e_i == s_j`` and a
  link exists). OR-Tools ``SimpleMaxFlow`` on capacities scaled to integer micro-tokens/s.
- ``decompose(net, ranges, flows)``: path decomposition into ``Pipeline`` objects.
- ``evaluate_placement(problem, ranges)``: ``(throughput, latency of the best path, pipelines)``.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Mapping

from ortools.graph.python import max_flow as ortools_max_flow

from placement.network import Network, build_network
from placement.problem import Pipeline, PlacementProblem, Ranges, Stage

SCALE = 1_000_000  # capacities in micro-tokens/s
S_NODE, T_NODE = 0, 1


def _arcs(net: Network, ranges: Ranges) -> list[tuple[int, int, float]]:
    """(tail, head, capacity tok/s); node ids: S=0, T=1, in_i=2+2i, out_i=3+2i."""
    L = net.L
    arcs: list[tuple[int, int, float]] = []
    by_start: dict[int, list[int]] = defaultdict(list)
    for i, (s, e) in ranges.items():
        k = e - s
        if k < 1:
            continue
        if k > net.kmax(i):
            raise ValueError(f"device {net.ids[i]} cannot hold {k} layers (max {net.kmax(i)})")
        arcs.append((2 + 2 * i, 3 + 2 * i, net.cap[i][k - 1]))
        by_start[s].append(i)
        if s == 0 and net.src_cap[i] > 0:
            arcs.append((S_NODE, 2 + 2 * i, net.src_cap[i]))
        if e == L and net.sink_cap[i] > 0:
            arcs.append((3 + 2 * i, T_NODE, net.sink_cap[i]))
    for i, (s, e) in ranges.items():
        if e - s < 1 or e == L:
            continue
        for j in by_start.get(e, ()):
            c = net.arc_cap.get((i, j), 0.0)
            if c > 0:
                arcs.append((3 + 2 * i, 2 + 2 * j, c))
    return arcs


def max_flow(net: Network, ranges: Ranges) -> tuple[float, dict[tuple[int, int], float]]:
    """Max-flow value (tokens/s) and the positive arc flows keyed by (tail, head) node ids."""
    arcs = _arcs(net, ranges)
    if not arcs:
        return 0.0, {}
    smf = ortools_max_flow.SimpleMaxFlow()
    for a, b, c in arcs:
        smf.add_arc_with_capacity(a, b, int(c * SCALE))
    if smf.solve(S_NODE, T_NODE) != smf.OPTIMAL:
        return 0.0, {}
    flows = {}
    for x in range(smf.num_arcs()):
        f = smf.flow(x)
        if f > 0:
            flows[(smf.tail(x), smf.head(x))] = f / SCALE
    return smf.optimal_flow() / SCALE, flows


def flow_value(net: Network, ranges: Ranges) -> float:
    return max_flow(net, ranges)[0]


def path_latency(net: Network, stages: list[tuple[int, int, int]]) -> float:
    """Per-token decode latency of a path: stage times, hop latencies, source and sink hops."""
    t = net.src_lat[stages[0][0]] + net.sink_lat[stages[-1][0]]
    for x, (i, s, e) in enumerate(stages):
        t += net.stage_latency(i, e - s)
        if x:
            t += net.arc_lat.get((stages[x - 1][0], i), 0.0)
    return t


def decompose(net: Network, ranges: Ranges, flows: dict[tuple[int, int], float]) -> tuple[Pipeline, ...]:
    """Split an S-T flow into paths (largest bottleneck first); each path is one pipeline."""
    out: dict[int, dict[int, float]] = defaultdict(dict)
    for (a, b), f in flows.items():
        out[a][b] = f
    pipes = []
    eps = 1.0 / SCALE
    while True:
        path, node = [S_NODE], S_NODE
        while node != T_NODE:
            nxt = [(f, b) for b, f in out[node].items() if f > eps]
            if not nxt:
                break
            node = max(nxt)[1]
            path.append(node)
        if node != T_NODE:
            break
        bottleneck = min(out[a][b] for a, b in zip(path, path[1:]))
        for a, b in zip(path, path[1:]):
            out[a][b] -= bottleneck
        devs = [(x - 2) // 2 for x in path[1:-1:2]]
        stages = [(i, ranges[i][0], ranges[i][1]) for i in devs]
        pipes.append(Pipeline(tuple(Stage(net.ids[i], s, e) for i, s, e in stages), bottleneck,
                              path_latency(net, stages)))
    pipes.sort(key=lambda p: -p.flow_tokens_per_s)
    return tuple(pipes)


def evaluate_ranges(net: Network, ranges: Ranges) -> tuple[float, float, tuple[Pipeline, ...]]:
    value, flows = max_flow(net, ranges)
    pipes = decompose(net, ranges, flows)
    latency = min((p.latency_s for p in pipes), default=math.inf)
    return value, latency, pipes


def evaluate_placement(problem: PlacementProblem, ranges: Mapping[str, tuple[int, int]]
                       ) -> tuple[float, float, tuple[Pipeline, ...]]:
    """(max-flow throughput tokens/s, per-token latency of the fastest used pipeline, pipelines)."""
    net = build_network(problem)
    idx = {d: i for i, d in enumerate(net.ids)}
    return evaluate_ranges(net, {idx[d]: (int(s), int(e)) for d, (s, e) in ranges.items()})
