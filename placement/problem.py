"""Placement inputs and outputs: pure, frozen data with units in the names.

Parts:
- ``ModelSpec``: layers, per-layer weight bytes, KV and activation sizes; for MoE models the
  routed experts' share of each layer, so that memory counts every expert while decode time
  counts the experts a step reads (``decode_read_bytes_per_layer``,
  ``compute_bytes_per_token_per_layer``).
- ``DeviceSpec``: memory and either a measured capacity table ``tokens_per_s`` (entry k-1 is
  the device's token throughput when it holds k layers) or the figures to derive one
  (per-layer decode step time by batch size, or FLOP/s plus memory bandwidth).
- ``LinkSpec``: a network link. Links are undirected unless ``directed=True``; each direction of
  an undirected link gets the full bandwidth (Helix's model). The endpoints ``"source"`` and
  ``"sink"`` stand for the request coordinator (tokens in, tokens out).
- ``PlacementProblem``: model + devices + links + KV reserve + objective.
- ``Stage``, ``Pipeline``, ``Placement``: the answer. Layer ranges are half-open
  ``[start_layer, end_layer)``.
- ``InfeasiblePlacementError``: the model does not fit; says how many bytes are missing.

Link defaults: with no links at all the cluster is fully connected (``DEFAULT_LINK``), source
and sink included. When links are given but none touches ``"source"``/``"sink"``, the
coordinator is assumed to reach every device with ``DEFAULT_LINK``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

# device index (a `Network`'s order) -> [start_layer, end_layer): placement's ranges inside the solver
Ranges = dict[int, tuple[int, int]]

SOURCE = "source"
SINK = "sink"
DEFAULT_BANDWIDTH_BYTES_PER_S = 1.25e9  # 10 Gbit/s
DEFAULT_LATENCY_S = 0.001


class InfeasiblePlacementError(ValueError):
    """The model cannot be placed; ``missing_bytes`` says by how much memory it falls short."""

    def __init__(self, message: str, missing_bytes: int) -> None:
        super().__init__(message)
        self.missing_bytes = missing_bytes


@dataclass(frozen=True)
class ModelSpec:
    num_layers: int
    layer_bytes: tuple[int, ...]
    embedding_bytes: int
    lm_head_bytes: int
    kv_bytes_per_token_per_layer: int
    activation_bytes_per_token: int
    token_bytes: int = 4
    # MoE: per layer, the bytes of its routed experts (part of layer_bytes; () for a dense model).
    # Memory holds all of them; one token's step reads experts_per_token / num_experts of them.
    expert_bytes: tuple[int, ...] = ()
    num_experts: int = 0
    experts_per_token: int = 0

    def __post_init__(self) -> None:
        if self.num_layers < 1:
            raise ValueError("num_layers must be >= 1")
        if len(self.layer_bytes) != self.num_layers:
            raise ValueError(f"layer_bytes has {len(self.layer_bytes)} entries, expected {self.num_layers}")
        if self.expert_bytes and (len(self.expert_bytes) != self.num_layers
                                  or not 0 < self.experts_per_token <= self.num_experts):
            raise ValueError(f"expert_bytes needs {self.num_layers} entries and 0 < experts_per_token "
                             f"({self.experts_per_token}) <= num_experts ({self.num_experts})")

    @cached_property
    def mean_layer_bytes(self) -> float:
        """Mean weight bytes of one layer (all experts included)."""
        return sum(self.layer_bytes) / self.num_layers

    @cached_property
    def mean_expert_bytes(self) -> float:
        return sum(self.expert_bytes) / self.num_layers if self.expert_bytes else 0.0

    def decode_read_bytes_per_layer(self, batch: int) -> float:
        """Mean weight bytes of one layer that a decode step of ``batch`` sequences reads: all of
        a dense layer; of an MoE layer the rest plus the experts at least one of the batch's
        ``batch x k`` choices reaches (uniform routing: a fraction ``1 - (1 - k/E)^batch``)."""
        avg, experts = self.mean_layer_bytes, self.mean_expert_bytes
        if not experts:
            return avg
        reached = 1.0 - (1.0 - self.experts_per_token / self.num_experts) ** batch
        return avg - experts + experts * reached

    def compute_bytes_per_token_per_layer(self) -> float:
        """Mean weight bytes of one layer that one token multiplies with (the roofline's FLOPs:
        one FLOP pair per weight): the rest plus ``k/E`` of the routed experts."""
        avg, experts = self.mean_layer_bytes, self.mean_expert_bytes
        if not experts:
            return avg
        return avg - experts + experts * self.experts_per_token / self.num_experts

    @staticmethod
    def uniform(num_layers: int, layer_bytes: int, *, embedding_bytes: int = 0, lm_head_bytes: int = 0,
                kv_bytes_per_token_per_layer: int = 0, activation_bytes_per_token: int = 8192,
                token_bytes: int = 4) -> "ModelSpec":
        return ModelSpec(num_layers, (int(layer_bytes),) * num_layers, embedding_bytes, lm_head_bytes,
                         kv_bytes_per_token_per_layer, activation_bytes_per_token, token_bytes)


@dataclass(frozen=True)
class DeviceSpec:
    """One machine. Capacity comes from ``tokens_per_s`` if given, else it is derived:

    - ``decode_layer_time_s``: measured ``((batch_size, seconds_per_layer_step), ...)``;
    - else the roofline ``max(layer_bytes / memory_bandwidth, batch * layer_bytes / flops)``
      (fp16: one FLOP pair per weight byte and token).
    The batch is the largest the KV memory left after the weights allows (``max_batch`` caps it).
    ``max_layers`` caps the held layers in addition to memory.
    ``prefill_layer_time_per_token_s``: measured seconds per prompt token per layer of a long
    prefill; with the problem's ``prompt_tokens_per_output_token`` it is charged to every output
    token (the roofline's ``layer_bytes / flops`` when not given and ``flops_per_s`` is).
    """

    device_id: str
    memory_bytes: int
    tokens_per_s: tuple[float, ...] | None = None
    decode_layer_time_s: tuple[tuple[int, float], ...] | None = None
    flops_per_s: float | None = None
    memory_bandwidth_bytes_per_s: float | None = None
    max_batch: int = 64
    max_layers: int | None = None
    kind: str = ""
    prefill_layer_time_per_token_s: float | None = None

    def __post_init__(self) -> None:
        if self.device_id in (SOURCE, SINK):
            raise ValueError(f"device id {self.device_id!r} is reserved")
        if self.tokens_per_s is None and self.decode_layer_time_s is None and (
                self.flops_per_s is None or self.memory_bandwidth_bytes_per_s is None):
            raise ValueError(f"device {self.device_id}: give tokens_per_s, decode_layer_time_s, "
                             "or flops_per_s + memory_bandwidth_bytes_per_s")


@dataclass(frozen=True)
class LinkSpec:
    src: str
    dst: str
    bandwidth_bytes_per_s: float
    latency_s: float = DEFAULT_LATENCY_S
    directed: bool = False


DEFAULT_LINK = LinkSpec("*", "*", DEFAULT_BANDWIDTH_BYTES_PER_S, DEFAULT_LATENCY_S)


@dataclass(frozen=True)
class PlacementProblem:
    """``kv_reserve_tokens`` = context length x concurrency, reserved on every held layer.
    ``prompt_tokens_per_output_token``: the workload's prompt tokens per generated token (mean
    prompt / mean output); each output token then also costs that many prompt tokens of prefill
    on every stage, so throughput is of the workload, not of decode alone (0: decode only).
    ``kv_tokens_per_sequence``: KV tokens a running sequence holds (mean prompt + output); the
    decode batch a stage reaches is then capped by the memory its weights leave (0: no cap)."""

    model: ModelSpec
    devices: tuple[DeviceSpec, ...]
    links: tuple[LinkSpec, ...] = ()
    kv_reserve_tokens: int = 0
    objective: Literal["throughput", "latency"] = "throughput"
    prompt_tokens_per_output_token: float = 0.0
    kv_tokens_per_sequence: float = 0.0

    def __post_init__(self) -> None:
        for name in ("prompt_tokens_per_output_token", "kv_tokens_per_sequence"):
            if not 0 <= getattr(self, name) < float("inf"):
                raise ValueError(f"{name} must be finite and >= 0, got {getattr(self, name)!r}")
        ids = [d.device_id for d in self.devices]
        if len(set(ids)) != len(ids):
            raise ValueError("duplicate device ids")
        if self.objective not in ("throughput", "latency"):
            raise ValueError(f"objective must be 'throughput' or 'latency', not {self.objective!r}")
        known = set(ids) | {SOURCE, SINK}
        for link in self.links:
            if link.src not in known or link.dst not in known:
                raise ValueError(f"link {link.src}->{link.dst} names an unknown device")

    def device(self, device_id: str) -> DeviceSpec:
        for d in self.devices:
            if d.device_id == device_id:
                return d
        raise KeyError(device_id)


@dataclass(frozen=True)
class Stage:
    device_id: str
    start_layer: int
    end_layer: int


@dataclass(frozen=True)
class Pipeline:
    """Stages in order, covering ``[0, L)``; ``flow_tokens_per_s`` is its share of the max flow."""

    stages: tuple[Stage, ...]
    flow_tokens_per_s: float
    latency_s: float


@dataclass(frozen=True)
class Placement:
    ranges: dict[str, tuple[int, int]]
    throughput_tokens_per_s: float
    latency_s: float
    upper_bound_tokens_per_s: float
    pipelines: tuple[Pipeline, ...]
    solve_time_s: float
    status: Literal["optimal", "feasible"]
    moved_layers: int = 0
    objective: str = "throughput"
    notes: tuple[str, ...] = field(default=())

    @property
    def gap(self) -> float:
        """Relative distance to the upper bound (0 = proven optimal)."""
        if self.upper_bound_tokens_per_s <= 0:
            return 0.0
        return max(0.0, 1.0 - self.throughput_tokens_per_s / self.upper_bound_tokens_per_s)


PlacementResult = Placement
