"""The compiled view of a ``PlacementProblem`` that every algorithm works on.

Parts:
- ``layer_step_time_s(device, layer_bytes, batch, model=None)``: one decode step of one layer
  (measured, or the roofline; MoE: over the experts the step reaches); the router charges
  stages by it too (scheduler/load.py).
- ``capacity_table(problem, device)``: tokens/s when holding k = 1..Kmax layers (measured or
  derived, decode plus the workload's prefill per output token), trimmed to what memory and
  ``max_layers`` allow.
- ``Network``: device index, capacity tables, memory-feasible (start, k) pairs, per-token stage
  latency, and the directed arcs (tokens/s, seconds) between source, devices and sink.
- ``Network.links_trivial``: every ordered device pair (and source/sink) is linked and no link
  can ever be the bottleneck, so only layer boundaries matter (the aggregated model is exact);
  ``links_trivial_below(bound)`` also counts links no flow under a proven bound can fill.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from placement.problem import (DEFAULT_LINK, SINK, SOURCE, DeviceSpec, InfeasiblePlacementError,
                               ModelSpec, PlacementProblem)


def layer_step_time_s(device: DeviceSpec, layer_bytes: float, batch: int, model: ModelSpec | None = None) -> float:
    """Seconds for one decode step of one layer at ``batch`` sequences: measured (linear
    interpolation), else the roofline. With ``model`` an MoE model, the roofline charges the
    bytes the step reads and multiplies with: ``layer_bytes`` scaled by the model's shares
    (``ModelSpec.decode_read_bytes_per_layer``, ``compute_bytes_per_token_per_layer``)."""
    if device.decode_layer_time_s:
        pts = sorted(device.decode_layer_time_s)
        if batch <= pts[0][0]:
            return pts[0][1]
        for (b0, t0), (b1, t1) in zip(pts, pts[1:]):
            if b0 <= batch <= b1:
                return t0 + (t1 - t0) * (batch - b0) / (b1 - b0)
        (b0, t0), (b1, t1) = (pts[-2], pts[-1]) if len(pts) > 1 else (pts[0], pts[0])
        slope = (t1 - t0) / (b1 - b0) if b1 != b0 else t1 / b1
        return t1 + slope * (batch - b1)
    assert device.flops_per_s and device.memory_bandwidth_bytes_per_s
    read_bytes = compute_bytes = layer_bytes
    if model is not None and model.expert_bytes:
        read_bytes = layer_bytes * model.decode_read_bytes_per_layer(batch) / model.mean_layer_bytes
        compute_bytes = layer_bytes * model.compute_bytes_per_token_per_layer() / model.mean_layer_bytes
    return max(read_bytes / device.memory_bandwidth_bytes_per_s, batch * compute_bytes / device.flops_per_s)


def prefill_time_per_token_s(problem: PlacementProblem, device: DeviceSpec) -> float:
    """Seconds per prompt token per layer: measured, else the roofline's compute time, else 0."""
    if device.prefill_layer_time_per_token_s is not None:
        return device.prefill_layer_time_per_token_s
    if device.flops_per_s:
        return problem.model.compute_bytes_per_token_per_layer() / device.flops_per_s
    return 0.0


def capacity_table(problem: PlacementProblem, device: DeviceSpec) -> tuple[float, ...]:
    """tokens/s for k = 1..K layers (index k-1) before the memory trim. Derived tables charge
    every output token its decode share at the best batch plus ``prompt_tokens_per_output_token``
    prompt tokens of prefill; with ``kv_tokens_per_sequence`` the batch is at most the sequences
    whose KV fits beside k layers' weights. A given ``tokens_per_s`` table is taken as is."""
    L = problem.model.num_layers
    kmax = L if device.max_layers is None else min(L, device.max_layers)
    if device.tokens_per_s is not None:
        return tuple(float(x) for x in device.tokens_per_s[:kmax])
    avg = sum(problem.model.layer_bytes) / L
    # per-token decode time at the best batch b <= cap: best[b-1] = min over b' <= b of t(b') / b'
    best: list[float] = []
    for b in range(1, device.max_batch + 1):
        t = layer_step_time_s(device, avg, b, problem.model) / b
        best.append(min(t, best[-1]) if best else t)
    prefill_s = problem.prompt_tokens_per_output_token * prefill_time_per_token_s(problem, device)
    kv_seq_bytes = problem.kv_tokens_per_sequence * problem.model.kv_bytes_per_token_per_layer
    out = []
    for k in range(1, kmax + 1):
        batch = device.max_batch
        if kv_seq_bytes > 0:   # the KV memory left after k layers' weights caps the batch
            batch = max(1, min(batch, int((device.memory_bytes - k * avg) // (k * kv_seq_bytes))))
        out.append(1.0 / (k * (best[batch - 1] + prefill_s)))
    return tuple(out)


def stage_latency_s(problem: PlacementProblem, device: DeviceSpec, k: int) -> float:
    """Per-token decode time of a stage of k layers (batch 1). With only a capacity table it is
    estimated as 1 / tokens_per_s[k-1] (the time per token at that load, an upper estimate)."""
    if device.tokens_per_s is not None:
        return 1.0 / device.tokens_per_s[k - 1]
    return k * layer_step_time_s(device, problem.model.mean_layer_bytes, 1, problem.model)


@dataclass
class Network:
    problem: PlacementProblem
    ids: list[str]
    cap: list[list[float]]            # cap[i][k-1], only k with some memory-feasible start
    starts: list[list[list[int]]]     # starts[i][k-1] = feasible start layers for k layers
    src_cap: list[float]              # S -> i, tokens/s (0 = no link)
    sink_cap: list[float]             # i -> T
    src_lat: list[float]
    sink_lat: list[float]
    arc_cap: Mapping[tuple[int, int], float]   # i -> j (devices), tokens/s (read with .get)
    arc_lat: Mapping[tuple[int, int], float]

    @property
    def L(self) -> int:
        return self.problem.model.num_layers

    @property
    def n(self) -> int:
        return len(self.ids)

    def kmax(self, i: int) -> int:
        return len(self.cap[i])

    def fits(self, i: int, s: int, k: int) -> bool:
        return 1 <= k <= len(self.cap[i]) and s in self._start_sets[i][k - 1]

    def options(self, i: int) -> list[tuple[int, int]]:
        """All memory-feasible (start, k) of device i."""
        return [(s, k) for k in range(1, self.kmax(i) + 1) for s in self.starts[i][k - 1]]

    def stage_latency(self, i: int, k: int) -> float:
        return stage_latency_s(self.problem, self.problem.devices[i], k)

    @property
    def links_trivial(self) -> bool:
        if self._trivial is None:
            self._trivial = self._links_trivial()
        return self._trivial

    def links_trivial_below(self, bound_tokens_per_s: float) -> bool:
        """Whether no link can bind in a cluster whose throughput is proven to stay below
        `bound_tokens_per_s` (no arc carries more than the whole flow); if so, `links_trivial`
        holds from now on (e.g. 1 Gbit/s links under a 70B model's few hundred tokens/s)."""
        if not self.links_trivial and self._links_trivial(bound_tokens_per_s):
            self._trivial = True
        return self.links_trivial

    def _links_trivial(self, bound_tokens_per_s: float = float("inf")) -> bool:
        top = [min(max(c), bound_tokens_per_s) if c else 0.0 for c in self.cap]
        if isinstance(self.arc_cap, CompleteArcs):
            two = sorted(top)[-2:] if self.n > 1 else [0.0]
            return all(self.src_cap[i] >= top[i] and self.sink_cap[i] >= top[i] for i in range(self.n) if top[i]) \
                and two[0] <= self.arc_cap.value
        for i in range(self.n):
            if not top[i]:
                continue
            if self.src_cap[i] < top[i] or self.sink_cap[i] < top[i]:
                return False
            for j in range(self.n):
                if i != j and top[j] and self.arc_cap.get((i, j), 0.0) < min(top[i], top[j]):
                    return False
        return True

    def __post_init__(self) -> None:
        self._start_sets = [[set(s) for s in per_k] for per_k in self.starts]
        self._trivial: bool | None = None


class CompleteArcs(Mapping):
    """Every ordered pair of distinct devices 0..n-1 with the same value (default links), without
    materialising n^2 entries."""

    def __init__(self, n: int, value: float) -> None:
        self.n, self.value = n, value

    def __getitem__(self, key: tuple[int, int]) -> float:
        a, b = key
        if a != b and 0 <= a < self.n and 0 <= b < self.n:
            return self.value
        raise KeyError(key)

    def get(self, key: tuple[int, int], default: float | None = None) -> float | None:  # type: ignore[override]
        a, b = key
        return self.value if a != b and 0 <= a < self.n and 0 <= b < self.n else default

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((a, b) for a in range(self.n) for b in range(self.n) if a != b)

    def __len__(self) -> int:
        return self.n * (self.n - 1)


def stage_bytes(problem: PlacementProblem, start: int, end: int) -> int:
    """Weights of layers [start, end) plus embedding/LM head at the ends plus the KV reserve."""
    m = problem.model
    b = sum(m.layer_bytes[start:end])
    b += m.embedding_bytes if start == 0 else 0
    b += m.lm_head_bytes if end == m.num_layers else 0
    return b + problem.kv_reserve_tokens * m.kv_bytes_per_token_per_layer * (end - start)


def build_network(problem: PlacementProblem) -> Network:
    m = problem.model
    L = m.num_layers
    caps, starts = [], []
    bytes_of_stage = [[0] * (L + 1) for _ in range(L + 1)]   # stage_bytes(s, e), computed once
    for s0 in range(L):
        for e0 in range(s0 + 1, L + 1):
            bytes_of_stage[s0][e0] = stage_bytes(problem, s0, e0)
    table_cache: dict = {}
    starts_cache: dict[tuple[int, int], list[list[int]]] = {}
    for d in problem.devices:
        try:
            key = (d.tokens_per_s, d.decode_layer_time_s, d.flops_per_s, d.memory_bandwidth_bytes_per_s,
                   d.max_batch, d.max_layers, d.prefill_layer_time_per_token_s,
                   d.memory_bytes if problem.kv_tokens_per_sequence else 0)
            hash(key)
        except TypeError:
            key = None
        table = table_cache.get(key) if key is not None else None
        if table is None:
            table = capacity_table(problem, d)
            if key is not None:
                table_cache[key] = table
        skey = (d.memory_bytes, len(table))
        if skey not in starts_cache:
            per_k = [[s for s in range(0, L - k + 1) if bytes_of_stage[s][s + k] <= d.memory_bytes]
                     for k in range(1, len(table) + 1)]
            while per_k and not per_k[-1]:
                per_k.pop()
            starts_cache[skey] = per_k
        per_k = [list(x) for x in starts_cache[skey]]
        caps.append(list(table[:len(per_k)]))
        starts.append(per_k)
    n = len(problem.devices)
    idx = {d.device_id: i for i, d in enumerate(problem.devices)}
    src_cap, sink_cap = [0.0] * n, [0.0] * n
    src_lat, sink_lat = [0.0] * n, [0.0] * n
    arc_cap: dict[tuple[int, int], float] = {}
    arc_lat: dict[tuple[int, int], float] = {}
    links = list(problem.links)
    if not links:   # complete graph of default links, filled in directly (fast at 512 devices)
        arc_cap = CompleteArcs(n, DEFAULT_LINK.bandwidth_bytes_per_s / m.activation_bytes_per_token)
        arc_lat = CompleteArcs(n, DEFAULT_LINK.latency_s)
    if not any(SOURCE in (l.src, l.dst) or SINK in (l.src, l.dst) for l in links):
        for d in problem.devices:
            links.append(DEFAULT_LINK.__class__(SOURCE, d.device_id, DEFAULT_LINK.bandwidth_bytes_per_s,
                                                DEFAULT_LINK.latency_s))
            links.append(DEFAULT_LINK.__class__(d.device_id, SINK, DEFAULT_LINK.bandwidth_bytes_per_s,
                                                DEFAULT_LINK.latency_s))
    for l in links:
        ends = [(l.src, l.dst)] if l.directed else [(l.src, l.dst), (l.dst, l.src)]
        for a, b in ends:
            if a == SOURCE and b in idx:
                src_cap[idx[b]] += l.bandwidth_bytes_per_s / m.token_bytes
                src_lat[idx[b]] = l.latency_s
            elif b == SINK and a in idx:
                sink_cap[idx[a]] += l.bandwidth_bytes_per_s / m.token_bytes
                sink_lat[idx[a]] = l.latency_s
            elif a in idx and b in idx and a != b:
                key = (idx[a], idx[b])
                arc_cap[key] = arc_cap.get(key, 0.0) + l.bandwidth_bytes_per_s / m.activation_bytes_per_token
                arc_lat[key] = l.latency_s
    net = Network(problem, [d.device_id for d in problem.devices], caps, starts, src_cap, sink_cap,
                  src_lat, sink_lat, arc_cap, arc_lat)
    _check_fits(problem, net)
    return net


def _check_fits(problem: PlacementProblem, net: Network) -> None:
    """Raise ``InfeasiblePlacementError`` when the devices together cannot hold every layer."""
    L = problem.model.num_layers
    held = sum(net.kmax(i) for i in range(net.n))
    can_start = any(net.starts[i][k - 1] and 0 in net.starts[i][k - 1]
                    for i in range(net.n) for k in range(1, net.kmax(i) + 1))
    can_end = any((L - k) in net.starts[i][k - 1] for i in range(net.n) for k in range(1, net.kmax(i) + 1))
    if held >= L and can_start and can_end:
        return
    per_layer = max(problem.model.layer_bytes) + problem.kv_reserve_tokens * problem.model.kv_bytes_per_token_per_layer
    need = stage_bytes(problem, 0, L)
    have = 0
    for i, d in enumerate(problem.devices):
        have += min(d.memory_bytes, stage_bytes(problem, 0, min(L, net.kmax(i))) if net.kmax(i) else 0)
    missing = max(need - have, per_layer * max(0, L - held), 1)
    raise InfeasiblePlacementError(
        f"the model does not fit: {held} of {L} layers can be held "
        f"(missing about {missing} bytes = {missing / 2**30:.2f} GiB of device memory"
        f"{'' if can_start else '; no device can hold the first layer with the embedding'}"
        f"{'' if can_end else '; no device can hold the last layer with the LM head'})", int(missing))
