"""Upper bounds on the max-flow throughput of any placement.

Parts:
- ``helix_bound(net)``: ``sum_i max_k k*cap_i(k) / L`` (every token crosses L layers).
- ``saturated_bound(net)``: the tighter ``sup flow`` with ``sum_i max_k k*min(cap_i(k), flow) >= flow*L``:
  a device never carries more than the total flow flow, so capacity above flow is wasted.
- ``cut_bound(net)``: source-side and sink-side link capacity.
- ``upper_bound(net)``: the least of them.
"""
from __future__ import annotations

from placement.network import Network


def helix_bound(net: Network) -> float:
    return sum(max((k * c for k, c in enumerate(cap, 1)), default=0.0) for cap in net.cap) / net.L


def _slack(net: Network, flow: float) -> float:
    total = 0.0
    for cap in net.cap:
        total += max((k * min(c, flow) for k, c in enumerate(cap, 1)), default=0.0)
    return total - flow * net.L


def saturated_bound(net: Network) -> float:
    """Exact sup of {flow : slack(flow) >= 0}. Between consecutive capacity values each device term is
    a max of a constant and a linear function, so slack is convex there: it suffices to test the
    breakpoints and bisect the one interval where slack changes sign."""
    top = helix_bound(net)
    points = sorted({0.0, top} | {c for cap in net.cap for c in cap if c < top}, reverse=True)
    if _slack(net, top) >= 0:
        return top
    for hi, lo in zip(points, points[1:]):
        if _slack(net, lo) >= 0:
            for _ in range(100):
                mid = (lo + hi) / 2
                if _slack(net, mid) >= 0:
                    lo = mid
                else:
                    hi = mid
            return hi
    return 0.0


def cut_bound(net: Network) -> float:
    return min(sum(net.src_cap[i] for i in range(net.n) if net.cap[i]),
               sum(net.sink_cap[i] for i in range(net.n) if net.cap[i]))


def upper_bound(net: Network) -> float:
    return min(saturated_bound(net), cut_bound(net))
