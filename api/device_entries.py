"""devices.json entries (the format `potluck plan` reads, `placement/io.py`) from measured profiles.

Parts:
- `device_entry(profile, device_id, memory_bytes=None)`: one entry from a profile in its JSON form
  (`workers.device_profile.DeviceProfile.to_json()`, also what `/cluster` lists per worker),
  through THE profile -> `DeviceSpec` conversion (`workers.device_profile.device_spec`): id,
  kind, usable memory, the roofline rates and, when the profile timed a model's layer, the
  measured per-layer decode step times (`timed_model` / `timed_layer_weight_bytes` say which
  model they are valid for: `potluck plan` drops them for another model).
- `devices_document(entries)`: `{"devices": [...]}`, a file `potluck plan --devices` takes as is.

What `potluck profile --json` and `potluck status --devices-json` print.
"""

from __future__ import annotations

from typing import Any

from workers.device_profile import DeviceProfile, device_spec


def device_entry(profile: dict[str, Any], device_id: str, memory_bytes: int | None = None) -> dict[str, Any]:
    measured = DeviceProfile.from_json(profile)
    spec = device_spec(measured, device_id, memory_bytes=memory_bytes)
    entry: dict[str, Any] = {
        "id": spec.device_id,
        "kind": spec.kind,
        "memory_bytes": spec.memory_bytes,
        "flops_per_s": spec.flops_per_s,
        "memory_bandwidth_bytes_per_s": spec.memory_bandwidth_bytes_per_s,
    }
    timings = measured.layer_timings
    if spec.decode_layer_time_s and timings is not None:
        entry["decode_layer_time_s"] = [list(step) for step in spec.decode_layer_time_s]
        if spec.prefill_layer_time_per_token_s is not None:
            entry["prefill_layer_time_per_token_s"] = spec.prefill_layer_time_per_token_s
        entry["timed_model"] = timings.model
        entry["timed_layer_weight_bytes"] = timings.layer_weight_bytes
    return entry


def devices_document(entries: list[dict[str, Any]]) -> dict[str, Any]:
    return {"devices": entries}
