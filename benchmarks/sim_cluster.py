"""The modelled cluster and workload the simulator runs: devices, links, model, placement problem,
arrival traces.

Parts:
- ``SimModel``: a dense decoder (default: a 14B, 48-layer, GQA model in fp16) with the per-layer
  figures the device model needs (weight bytes, FLOPs per token, KV and activation bytes).
- ``DeviceKind`` / ``KINDS``: GPU and CPU kinds: memory, effective memory bandwidth and FLOP/s,
  a fixed per-layer step overhead. ``layer_step_s(kind, model, batch, ctx_tokens, prefill)``:
  one layer's step time, roofline plus attention KV reads (the simulator's ground truth).
- ``SimDevice``, ``SimCluster``, ``make_cluster(n, seed)``: devices spread over sites; links are
  fast inside a site and slower between sites; the coordinator sits in site 0.
- ``placement_problem(cluster)``: the ``placement.problem.PlacementProblem`` of the cluster,
  with each device's decode step time measured from the device model (as a profiler would).
- ``kv_capacity_tokens(cluster, device, start, end)``: KV tokens a stage can hold.
- ``with_device`` / ``without_device``: the cluster after a join or a loss.
- ``TraceConfig``, ``SimRequest``, ``bursty_trace(rate, cfg, seed)``: on/off-modulated Poisson
  arrivals (bursts at ``burst_factor`` x the mean rate, so the inter-arrival CV is > 1),
  log-normal prompt and output lengths; ``mean_output_tokens(cfg)``, ``mean_prompt_tokens(cfg)``;
  ``PlanMix`` / ``trace_mix(cfg)``: the workload placement plans for.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace

from placement.problem import SINK, SOURCE, DeviceSpec, LinkSpec, ModelSpec, PlacementProblem

RUNTIME_OVERHEAD_BYTES = 2 * 10**9


@dataclass(frozen=True)
class SimModel:
    num_layers: int = 48
    layer_bytes: int = 560_000_000              # ~0.28B params per layer, fp16
    embedding_bytes: int = 1_550_000_000
    lm_head_bytes: int = 1_550_000_000
    kv_bytes_per_token_per_layer: int = 4096    # 8 KV heads x 128 dims x (K, V) x fp16
    activation_bytes_per_token: int = 10240     # hidden 5120 x fp16
    flops_per_token_per_layer: float = 0.56e9   # 2 x params

    def spec(self) -> ModelSpec:
        return ModelSpec.uniform(self.num_layers, self.layer_bytes, embedding_bytes=self.embedding_bytes,
                                 lm_head_bytes=self.lm_head_bytes,
                                 kv_bytes_per_token_per_layer=self.kv_bytes_per_token_per_layer,
                                 activation_bytes_per_token=self.activation_bytes_per_token)


@dataclass(frozen=True)
class DeviceKind:
    name: str
    memory_bytes: int
    memory_bandwidth_bytes_per_s: float  # effective
    flops_per_s: float                   # effective fp16
    layer_overhead_s: float = 20e-6      # kernel launches etc. per layer and step


KINDS: tuple[DeviceKind, ...] = (
    DeviceKind("A100-80G", 80 * 10**9, 1.6e12, 200e12),
    DeviceKind("L40S-48G", 48 * 10**9, 0.7e12, 180e12),
    DeviceKind("RTX4090-24G", 24 * 10**9, 0.8e12, 80e12),
    DeviceKind("L4-24G", 24 * 10**9, 0.25e12, 60e12),
    DeviceKind("T4-16G", 16 * 10**9, 0.25e12, 25e12),
    DeviceKind("EPYC-CPU-256G", 256 * 10**9, 0.15e12, 4e12, 50e-6),
)
KIND_WEIGHTS = (2, 2, 3, 3, 3, 1)
MAX_BATCH = 64
PROFILE_CTX_TOKENS = 1024
PROFILE_PREFILL_TOKENS = 512


def layer_step_s(kind: DeviceKind, model: SimModel, batch: int, ctx_tokens: int, prefill_tokens: int = 0) -> float:
    """One layer, one step: read the weights once or compute every token (whichever is slower),
    plus reading the batch's KV (``ctx_tokens`` summed over the batch)."""
    weights_s = model.layer_bytes / kind.memory_bandwidth_bytes_per_s
    compute_s = (batch + prefill_tokens) * model.flops_per_token_per_layer / kind.flops_per_s
    kv_s = ctx_tokens * model.kv_bytes_per_token_per_layer / kind.memory_bandwidth_bytes_per_s
    return kind.layer_overhead_s + max(weights_s, compute_s) + kv_s


@dataclass(frozen=True)
class SimDevice:
    device_id: str
    kind: DeviceKind
    site: int


@dataclass(frozen=True)
class SimCluster:
    model: SimModel
    devices: tuple[SimDevice, ...]
    intra_site_latency_s: float = 0.0005
    intra_site_bandwidth_bytes_per_s: float = 3.0e9
    inter_site_latency_s: float = 0.010
    inter_site_bandwidth_bytes_per_s: float = 1.25e9
    kv_reserve_tokens: int = 8192

    def device(self, device_id: str) -> SimDevice:
        return next(d for d in self.devices if d.device_id == device_id)

    def site_of(self, node: str) -> int:
        return 0 if node in (SOURCE, SINK) else self.device(node).site

    def link(self, src_site: int, dst_site: int) -> tuple[float, float]:
        """(latency s, bandwidth bytes/s) between two sites."""
        if src_site == dst_site:
            return self.intra_site_latency_s, self.intra_site_bandwidth_bytes_per_s
        return self.inter_site_latency_s, self.inter_site_bandwidth_bytes_per_s


def _device(x: int, rng: random.Random, sites: int) -> SimDevice:
    kind = rng.choices(KINDS, weights=KIND_WEIGHTS)[0]
    return SimDevice(f"d{x:03d}-{kind.name}", kind, rng.randrange(sites))


def make_cluster(num_devices: int, seed: int = 0, model: SimModel | None = None) -> SimCluster:
    """``num_devices`` devices of mixed kinds over ``ceil(n / 16)`` sites (at least 2)."""
    rng = random.Random(seed * 7919 + num_devices)
    sites = max(2, -(-num_devices // 16))
    devices = tuple(_device(x, rng, sites) for x in range(num_devices))
    return SimCluster(model or SimModel(), devices)


def with_device(cluster: SimCluster, seed: int = 0) -> SimCluster:
    rng = random.Random(seed + 104729)
    sites = max(d.site for d in cluster.devices) + 1
    new = _device(len(cluster.devices), rng, sites)
    new = replace(new, device_id="join-" + new.device_id)
    return replace(cluster, devices=cluster.devices + (new,))


def without_device(cluster: SimCluster, device_id: str) -> SimCluster:
    return replace(cluster, devices=tuple(d for d in cluster.devices if d.device_id != device_id))


def stage_weight_bytes(model: SimModel, start: int, end: int) -> int:
    b = (end - start) * model.layer_bytes
    b += model.embedding_bytes if start == 0 else 0
    b += model.lm_head_bytes if end == model.num_layers else 0
    return b


def kv_capacity_tokens(cluster: SimCluster, device: SimDevice, start: int, end: int) -> int:
    free = device.kind.memory_bytes - RUNTIME_OVERHEAD_BYTES - stage_weight_bytes(cluster.model, start, end)
    return max(0, free // (cluster.model.kv_bytes_per_token_per_layer * max(1, end - start)))


def device_spec(cluster: SimCluster, d: SimDevice) -> DeviceSpec:
    """What a worker's profile would report: decode step times at a few batches and the time per
    token of a ``PROFILE_PREFILL_TOKENS``-token prefill, per layer."""
    table = tuple((b, layer_step_s(d.kind, cluster.model, b, b * PROFILE_CTX_TOKENS))
                  for b in (1, 8, 16, 32, MAX_BATCH))
    prefill_s = layer_step_s(d.kind, cluster.model, 0, 0, PROFILE_PREFILL_TOKENS) / PROFILE_PREFILL_TOKENS
    return DeviceSpec(d.device_id, d.kind.memory_bytes - RUNTIME_OVERHEAD_BYTES, decode_layer_time_s=table,
                      max_batch=MAX_BATCH, kind=d.kind.name, prefill_layer_time_per_token_s=prefill_s)


@dataclass(frozen=True)
class PlanMix:
    """What placement plans for: prompt tokens per output token (0: decode throughput only) and
    KV tokens a running sequence holds (0: the batch is not capped by KV memory)."""

    prompt_tokens_per_output_token: float = 0.0
    kv_tokens_per_sequence: float = 0.0


def placement_problem(cluster: SimCluster, mix: PlanMix = PlanMix()) -> PlacementProblem:
    """Devices with profiled step times; links between every pair of devices and the coordinator;
    the workload ``mix`` placement plans for."""
    nodes = [SOURCE, SINK] + [d.device_id for d in cluster.devices]
    links = []
    for x, a in enumerate(nodes):
        for b in nodes[x + 1:]:
            if {a, b} == {SOURCE, SINK}:
                continue
            lat, bw = cluster.link(cluster.site_of(a), cluster.site_of(b))
            links.append(LinkSpec(a, b, bw, lat))
    return PlacementProblem(cluster.model.spec(), tuple(device_spec(cluster, d) for d in cluster.devices),
                            tuple(links), kv_reserve_tokens=cluster.kv_reserve_tokens,
                            prompt_tokens_per_output_token=mix.prompt_tokens_per_output_token,
                            kv_tokens_per_sequence=mix.kv_tokens_per_sequence)


@dataclass(frozen=True)
class TraceConfig:
    num_requests: int = 3000
    burst_factor: float = 2.5       # arrival rate while a burst is on, x the mean rate
    burst_on_s: float = 4.0         # mean length of a burst
    burst_off_s: float = 8.0        # mean gap between bursts
    prompt_median_tokens: int = 400
    prompt_sigma: float = 0.9
    output_median_tokens: int = 96
    output_sigma: float = 0.7
    max_prompt_tokens: int = 4096
    max_output_tokens: int = 512


@dataclass(frozen=True)
class SimRequest:
    request_id: int
    arrival_s: float
    prompt_tokens: int
    new_tokens: int


def mean_output_tokens(cfg: TraceConfig, seed: int = 12345, samples: int = 20000) -> float:
    rng = random.Random(seed)
    return sum(_length(rng, cfg.output_median_tokens, cfg.output_sigma, cfg.max_output_tokens)
               for _ in range(samples)) / samples


def mean_prompt_tokens(cfg: TraceConfig, seed: int = 12345, samples: int = 20000) -> float:
    rng = random.Random(seed)
    return sum(_length(rng, cfg.prompt_median_tokens, cfg.prompt_sigma, cfg.max_prompt_tokens)
               for _ in range(samples)) / samples


def trace_mix(cfg: TraceConfig) -> PlanMix:
    """The traces' own mix: mean prompt / mean output tokens, and mean prompt + output tokens
    (a request's KV is reserved for its prompt and all its new tokens)."""
    prompt, output = mean_prompt_tokens(cfg), mean_output_tokens(cfg)
    return PlanMix(prompt / output, prompt + output)


def _length(rng: random.Random, median: int, sigma: float, cap: int) -> int:
    return max(1, min(cap, int(round(median * math.exp(rng.gauss(0.0, sigma))))))


def bursty_trace(rate_per_s: float, cfg: TraceConfig, seed: int, bursty: bool = True) -> tuple[SimRequest, ...]:
    """Arrivals of mean rate ``rate_per_s``: on/off phases with exponential lengths; the off rate
    is set so that the long-run mean is ``rate_per_s`` (plain Poisson when not ``bursty``)."""
    rng = random.Random(seed)
    frac_on = cfg.burst_on_s / (cfg.burst_on_s + cfg.burst_off_s)
    on_rate = rate_per_s * (cfg.burst_factor if bursty else 1.0)
    off_rate = max(0.0, rate_per_s * (1 - frac_on * cfg.burst_factor) / (1 - frac_on)) if bursty else rate_per_s
    t, on, phase_end = 0.0, rng.random() < frac_on, 0.0
    out = []
    while len(out) < cfg.num_requests:
        if t >= phase_end:
            on = not on
            phase_end = t + rng.expovariate(1.0 / (cfg.burst_on_s if on else cfg.burst_off_s))
        rate = on_rate if on else off_rate
        dt = rng.expovariate(rate) if rate > 0 else math.inf
        if t + dt > phase_end:
            t = phase_end
            continue
        t += dt
        out.append(SimRequest(len(out), t,
                              _length(rng, cfg.prompt_median_tokens, cfg.prompt_sigma, cfg.max_prompt_tokens),
                              _length(rng, cfg.output_median_tokens, cfg.output_sigma, cfg.max_output_tokens)))
    return tuple(out)
