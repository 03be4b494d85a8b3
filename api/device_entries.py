"""devices.json entries (the format `potluck plan` reads, `placement/io.py`) from measured profiles.

Parts:
- `device_entry(profile, device_id, memory_bytes=None)`: one entry from a profile in its JSON form
  (`workers.profiler.DeviceProfile.to_json()`, also what `/cluster` lists per worker): id, kind,
  usable memory, the roofline rates and, when the profile timed a model's layer, the measured
  per-layer decode step times (`timed_model` says which model they are valid for).
- `devices_document(entries)`: `{"devices": [...]}`, a file `potluck plan --devices` takes as is.

What `potluck profile --json` and `potluck status --devices-json` print. Plain dicts only (no
torch), so `potluck status` stays light.
"""

from __future__ import annotations

from typing import Any

_ITEMSIZE = {"float32": 4, "float64": 8, "bfloat16": 2, "float16": 2}


def device_entry(profile: dict[str, Any], device_id: str, memory_bytes: int | None = None) -> dict[str, Any]:
    """The devices.json entry of a measured device. The roofline charges `batch x layer_bytes /
    flops` with 2 FLOPs per 2-byte weight, so the FLOP rate is scaled by the weights' itemsize / 2
    (as `scheduler/planner.py` does for a registered worker)."""
    timings = profile.get("layer_timings") or None
    dtype = (timings or {}).get("dtype") or profile.get("matmul_dtype") or "float16"
    entry: dict[str, Any] = {
        "id": device_id,
        "kind": profile.get("name") or profile.get("kind") or "",
        "memory_bytes": int(memory_bytes if memory_bytes is not None else profile["memory_bytes"]),
        "flops_per_s": float(profile["matmul_flops_per_s"]) * _ITEMSIZE.get(dtype, 2) / 2,
        "memory_bandwidth_bytes_per_s": float(profile["memory_bandwidth_bytes_per_s"]),
    }
    decode = (timings or {}).get("decode_step_s") or []
    if decode:  # [[batch, context, s per layer step], ...]: the shortest context's row
        shortest = min(int(context) for _, context, _ in decode)
        entry["decode_layer_time_s"] = sorted([int(b), float(t)] for b, c, t in decode if int(c) == shortest)
        prefill = timings.get("prefill_s_per_token") or []
        if prefill:
            entry["prefill_layer_time_per_token_s"] = float(max(prefill)[1])
        entry["timed_model"] = timings.get("model")
        entry["timed_layer_weight_bytes"] = int(timings.get("layer_weight_bytes") or 0)
    return entry


def devices_document(entries: list[dict[str, Any]]) -> dict[str, Any]:
    return {"devices": entries}
