"""What a worker measured about its device, as typed data that travels in `Register` (no torch).

Parts:
- `ChipPrior`: vendor peak figures for a known chip (workers/device_memory.py's table): a prior
  only; measured figures win.
- `LayerTimings`: for one layer of the model a worker will serve, the decode step time per layer
  at batch sizes x context lengths and the prefill time per layer per token at a few lengths;
  `decode_layer_time_s(context_len)` interpolates the step times at one context length.
- `DeviceProfile`: frozen; device, kind, name ("cpu: AMD EPYC", "cuda: NVIDIA GeForce RTX 4090"),
  usable `memory_bytes`, measured `matmul_flops_per_s` and `memory_bandwidth_bytes_per_s`,
  optional `layer_timings`, `peer_rtt_s` / `peer_bandwidth_bytes_per_s` by peer address, when and
  how long it was measured, the fault-injection `slowdown` in force, and the `prior`.
  `to_json()` / `from_json()`; `with_peers(rtt_s, bandwidth_bytes_per_s)`. The wire codec
  (workers/codec.py) carries it typed inside `Register`: the scheduler parses it once, there.
- `device_spec(profile, device_id, ...)`: THE conversion of a profile to a placement
  `DeviceSpec`; the scheduler's planner and router both use it (scheduler/planner.py), so they
  charge a worker the same decode and prefill times.
- `dtype_itemsize_bytes(dtype)`: bytes per element of a torch dtype name.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from placement.problem import DeviceSpec

_ITEMSIZE_BYTES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1,
                   "float8_e5m2": 1, "int8": 1, "uint8": 1}


def dtype_itemsize_bytes(dtype: str) -> int:
    """Bytes per element of a torch dtype name ("float16", "torch.bfloat16", ...)."""
    name = dtype.removeprefix("torch.")
    if name not in _ITEMSIZE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}")
    return _ITEMSIZE_BYTES[name]


@dataclass(frozen=True)
class ChipPrior:
    """Vendor peak figures: a prior only. Dense fp16 tensor FLOP/s (fp32 accumulate) for GPUs,
    fp32 GPU FLOP/s for Apple Silicon."""

    chip: str
    flops_per_s: float
    memory_bandwidth_bytes_per_s: float
    memory_bytes: int | None
    source: str = "vendor peak (prior only; measured figures win)"


@dataclass(frozen=True)
class LayerTimings:
    model: str  # model directory name
    layer_index: int  # the layer that was timed
    layer_weight_bytes: int
    dtype: str
    decode_step_s: tuple[tuple[int, int, float], ...]  # (batch_size, context_len, s per layer step)
    prefill_s_per_token: tuple[tuple[int, float], ...]  # (prompt tokens, s per token per layer)

    def decode_layer_time_s(self, context_len: int) -> tuple[tuple[int, float], ...]:
        """((batch_size, s per layer step), ...) at `context_len`, linear in the context length
        between the measured ones (and extrapolated beyond them, never below the shortest's time)."""
        out = []
        for batch in sorted({b for b, _, _ in self.decode_step_s}):
            pts = sorted((c, t) for b, c, t in self.decode_step_s if b == batch)
            if len(pts) == 1 or context_len <= pts[0][0]:
                out.append((batch, pts[0][1]))
                continue
            lo, hi = pts[0], pts[1]
            for a, b in zip(pts, pts[1:]):
                lo, hi = a, b
                if context_len <= b[0]:
                    break
            t = lo[1] + (hi[1] - lo[1]) * (context_len - lo[0]) / (hi[0] - lo[0])
            out.append((batch, max(t, pts[0][1])))
        return tuple(out)


@dataclass(frozen=True)
class DeviceProfile:
    device: str  # torch device string: "cpu", "cuda:0", "mps"
    kind: str  # cpu | cuda | mps
    name: str  # "<kind>: <model>"
    memory_bytes: int  # usable now
    matmul_flops_per_s: float
    matmul_dtype: str
    memory_bandwidth_bytes_per_s: float
    measured_at_unix_s: float
    profile_time_s: float  # how long measuring took
    slowdown: float = 1.0  # fault injection in force while measuring (1.0 = none)
    layer_timings: LayerTimings | None = None
    peer_rtt_s: dict[str, float] = field(default_factory=dict)
    peer_bandwidth_bytes_per_s: dict[str, float] = field(default_factory=dict)
    prior: ChipPrior | None = None  # vendor figures; a reference only
    backend: str = "torch"  # the worker backend that measured it (workers/backend_plugins.py)

    def with_peers(self, rtt_s: dict[str, float], bandwidth_bytes_per_s: dict[str, float]) -> DeviceProfile:
        return dataclasses.replace(self, peer_rtt_s={**self.peer_rtt_s, **rtt_s},
                                   peer_bandwidth_bytes_per_s={**self.peer_bandwidth_bytes_per_s,
                                                               **bandwidth_bytes_per_s})

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (lists for tuples); `from_json` reads it back."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DeviceProfile:
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in data.items() if k in fields}
        lt = kw.get("layer_timings")
        if lt is not None:
            kw["layer_timings"] = LayerTimings(
                model=lt["model"], layer_index=int(lt["layer_index"]),
                layer_weight_bytes=int(lt["layer_weight_bytes"]), dtype=lt["dtype"],
                decode_step_s=tuple((int(b), int(c), float(t)) for b, c, t in lt["decode_step_s"]),
                prefill_s_per_token=tuple((int(n), float(t)) for n, t in lt["prefill_s_per_token"]),
            )
        if kw.get("prior") is not None:
            kw["prior"] = ChipPrior(**kw["prior"])
        kw["peer_rtt_s"] = {str(k): float(v) for k, v in (kw.get("peer_rtt_s") or {}).items()}
        kw["peer_bandwidth_bytes_per_s"] = {
            str(k): float(v) for k, v in (kw.get("peer_bandwidth_bytes_per_s") or {}).items()}
        return cls(**kw)


def device_spec(profile: DeviceProfile, device_id: str, *, context_len: int = 1024,
                layer_weight_bytes: int | None = None, weight_itemsize_bytes: int | None = None,
                memory_bytes: int | None = None, kind: str | None = None, max_batch: int = 64) -> DeviceSpec:
    """The placement `DeviceSpec` of a measured device:

    - `memory_bytes`: the profile's usable memory unless given; `kind`: the profile's name unless given.
    - `decode_layer_time_s`: the measured per-layer decode step times by batch size at
      `context_len`, only if the profile timed this model's layer (`layer_weight_bytes` of the
      model to place, when given, must match the timed layer's within 5%); with them
      `prefill_layer_time_per_token_s`, of the longest prompt timed.
    - `flops_per_s` / `memory_bandwidth_bytes_per_s`: the measured rates, for the roofline. The
      roofline charges `batch x layer_bytes / flops` (fp16: 2 FLOPs per 2-byte weight), so the
      FLOP rate is scaled by itemsize / 2 for weights of another width (fp32: x2).
    """
    from placement.problem import DeviceSpec  # placement is pure; a worker never needs it

    lt = profile.layer_timings
    if weight_itemsize_bytes is None:
        weight_itemsize_bytes = dtype_itemsize_bytes(lt.dtype if lt is not None else profile.matmul_dtype)
    decode_s = prefill_s = None
    same_layer = lt is not None and (layer_weight_bytes is None or
                                     abs(lt.layer_weight_bytes - layer_weight_bytes) <= 0.05 * layer_weight_bytes)
    if same_layer and lt is not None and lt.decode_step_s:
        decode_s = lt.decode_layer_time_s(context_len)
        if lt.prefill_s_per_token:
            prefill_s = max(lt.prefill_s_per_token)[1]
    return DeviceSpec(device_id, int(profile.memory_bytes if memory_bytes is None else memory_bytes),
                      decode_layer_time_s=decode_s, prefill_layer_time_per_token_s=prefill_s,
                      flops_per_s=profile.matmul_flops_per_s * weight_itemsize_bytes / 2.0,
                      memory_bandwidth_bytes_per_s=profile.memory_bandwidth_bytes_per_s,
                      kind=profile.name if kind is None else kind, max_batch=max_batch)
