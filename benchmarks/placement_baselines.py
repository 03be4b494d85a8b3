"""Baseline placements from their published descriptions, scored by potluck's max-flow evaluator.

Parts:
- ``even_split(problem)``: vLLM-style pipeline parallel: the fewest devices (fastest first) that
  can hold the model, layers split evenly (clipped to what each holds).
- ``exo_memory_proportional(problem)``: exo: every device, layers proportional to its memory,
  one pipeline.
- ``petals_greedy(problem)``: Petals: servers join one by one (fastest first) and each takes the
  contiguous block window with the lowest current throughput coverage, as many blocks as it holds.
- ``parallax_dp(problem)``: Parallax: DP that splits devices into pipelines (each pipeline sorted
  fastest first, layers by water-filling proportional to k*cap) maximising the summed throughput.
- ``all_baselines(problem) -> {name: ranges}``.
"""
from __future__ import annotations

from placement.network import build_network
from placement.problem import PlacementProblem

RangesById = dict[str, tuple[int, int]]


def _chain(net, order: list[int], ks: list[int]) -> RangesById:
    out, b = {}, 0
    for i, k in zip(order, ks):
        if k > 0:
            out[net.ids[i]] = (b, b + k)
            b += k
    return out


def _clip_fill(net, order: list[int], want: list[float]) -> list[int] | None:
    """Round wanted layer counts, clip to each device's max, push the rest to devices with room."""
    L = net.L
    ks = [min(net.kmax(i), max(1, round(w))) for i, w in zip(order, want)]
    while sum(ks) > L:
        x = max(range(len(ks)), key=lambda j: ks[j])
        ks[x] -= 1
    while sum(ks) < L:
        room = [j for j, i in enumerate(order) if ks[j] < net.kmax(i)]
        if not room:
            return None
        ks[max(room, key=lambda j: want[j] - ks[j])] += 1
    return ks


def even_split(problem: PlacementProblem) -> RangesById:
    net = build_network(problem)
    order = sorted(range(net.n), key=lambda i: -net.cap[i][0] if net.cap[i] else 0)
    for m in range(1, net.n + 1):
        ks = _clip_fill(net, order[:m], [net.L / m] * m)
        if ks:
            return _chain(net, order[:m], ks)
    return {}


def exo_memory_proportional(problem: PlacementProblem) -> RangesById:
    net = build_network(problem)
    order = [i for i in range(net.n) if net.cap[i]]
    mem = [problem.devices[i].memory_bytes for i in order]
    ks = _clip_fill(net, order, [net.L * m / sum(mem) for m in mem])
    return _chain(net, order, ks) if ks else {}


def petals_greedy(problem: PlacementProblem) -> RangesById:
    net = build_network(problem)
    L = net.L
    cover = [0.0] * L
    out: RangesById = {}
    for i in sorted(range(net.n), key=lambda i: -(net.cap[i][-1] * net.kmax(i)) if net.cap[i] else 0):
        k = net.kmax(i)
        if not k:
            continue
        s = min(range(L - k + 1), key=lambda s: (min(cover[s:s + k]), sum(cover[s:s + k])))
        out[net.ids[i]] = (s, s + k)
        for x in range(s, s + k):
            cover[x] += net.cap[i][k - 1]
    return out


def parallax_dp(problem: PlacementProblem) -> RangesById:
    """Devices sorted fastest first; DP over prefixes cut into pipelines, each pipeline's layers by
    water-filling (layers proportional to per-layer speed, clipped to memory)."""
    net = build_network(problem)
    order = sorted((i for i in range(net.n) if net.cap[i]), key=lambda i: -net.cap[i][0])
    n = len(order)

    def pipeline(devs: list[int]) -> tuple[float, list[int]] | None:
        speed = [max(k * c for k, c in enumerate(net.cap[i], 1)) for i in devs]
        ks = _clip_fill(net, devs, [net.L * s / sum(speed) for s in speed])
        if not ks or any(k < 1 for k in ks):
            return None
        return min(net.cap[i][k - 1] for i, k in zip(devs, ks)), ks

    best: list[tuple[float, list[tuple[list[int], list[int]]]]] = [(0.0, [])] + [(-1.0, [])] * n
    for b in range(1, n + 1):
        best[b] = best[b - 1]
        for a in range(b):
            if best[a][0] < 0:
                continue
            got = pipeline(order[a:b])
            if got and best[a][0] + got[0] > best[b][0]:
                best[b] = (best[a][0] + got[0], best[a][1] + [(order[a:b], got[1])])
    out: RangesById = {}
    for devs, ks in best[n][1]:
        out.update(_chain(net, devs, ks))
    return out


def all_baselines(problem: PlacementProblem) -> dict[str, RangesById]:
    return {"even split (vLLM)": even_split(problem), "exo memory-proportional": exo_memory_proportional(problem),
            "Petals greedy": petals_greedy(problem), "Parallax DP+water-filling": parallax_dp(problem)}
