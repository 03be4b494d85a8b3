"""devices.json reading and placement printing for ``potluck plan``.

Parts:
- ``devices_from_json(obj) -> (devices, links)``; the format:

    {"devices": [{"id": "4090-a", "memory_bytes": 24e9, "kind": "RTX4090",
                  "tokens_per_s": [900.0, 450.0, ...]            # optional capacity table, k = 1..
                  "decode_layer_time_s": [[1, 0.0004], [16, 0.0007]],  # or measured per-layer steps
                  "flops_per_s": 1.6e14, "memory_bandwidth_bytes_per_s": 1.0e12,  # or roofline
                  "max_layers": 40, "max_batch": 64}, ...],
     "links": [{"src": "4090-a", "dst": "mac", "bandwidth_bytes_per_s": 1.25e8,
                "latency_s": 0.001, "directed": false}, ...]}     # optional

  ``"links"`` absent or empty: fully connected with 10 Gbit/s, 1 ms. ``"source"``/``"sink"`` are
  the request coordinator. Sizes may be written as numbers or strings like "24GB", "16GiB".
- ``stage_memory_bytes(problem, start, end)``: weights and KV reserve a range needs.
- ``format_placement_table(placement, problem) -> str``: one row per device (layers, flow,
  weights, KV reserve, memory).
- ``placement_to_json(placement, problem=None) -> dict`` (with ``problem``: memory per device).
"""
from __future__ import annotations

import re
from typing import Any

from placement.problem import DeviceSpec, LinkSpec, Placement, PlacementProblem

_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def _bytes(x: Any) -> int:
    if isinstance(x, (int, float)):
        return int(x)
    m = re.fullmatch(r"\s*([0-9.eE+-]+)\s*([a-zA-Z]*)\s*", str(x))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {x!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def devices_from_json(obj: dict) -> tuple[tuple[DeviceSpec, ...], tuple[LinkSpec, ...]]:
    """Raises ValueError (one line: which entry, what is wrong) for a file of another shape."""
    if not isinstance(obj, dict):
        raise ValueError(f'the file holds a JSON {type(obj).__name__}; write {{"devices": [...]}} '
                         '(see examples/devices.json)')
    if not isinstance(obj.get("devices", []), list) or not isinstance(obj.get("links", []) or [], list):
        raise ValueError('"devices" and "links" must be lists (see examples/devices.json)')
    devices = []
    for n, d in enumerate(obj.get("devices", [])):
        if not isinstance(d, dict):
            raise ValueError(f"device {n} is a JSON {type(d).__name__}, not an object")
        if "memory_bytes" not in d:
            raise ValueError(f"device {n} ({d.get('id', 'no id')}) has no memory_bytes")
        did = str(d.get("id", d.get("device_id", f"device-{n}")))
        pre = d.get("prefill_layer_time_per_token_s")
        tps = d.get("tokens_per_s")
        dlt = d.get("decode_layer_time_s")
        devices.append(DeviceSpec(
            did, _bytes(d["memory_bytes"]),
            tokens_per_s=tuple(float(x) for x in tps) if tps else None,
            decode_layer_time_s=tuple((int(b), float(t)) for b, t in dlt) if dlt else None,
            flops_per_s=float(d["flops_per_s"]) if d.get("flops_per_s") else None,
            memory_bandwidth_bytes_per_s=float(d["memory_bandwidth_bytes_per_s"])
            if d.get("memory_bandwidth_bytes_per_s") else None,
            max_batch=int(d.get("max_batch", 64)),
            max_layers=int(d["max_layers"]) if d.get("max_layers") is not None else None,
            kind=str(d.get("kind", "")),
            prefill_layer_time_per_token_s=float(pre) if pre else None))
    links = tuple(LinkSpec(str(l["src"]), str(l["dst"]), float(l["bandwidth_bytes_per_s"]),
                           float(l.get("latency_s", 0.001)), bool(l.get("directed", False)))
                  for l in obj.get("links", []) or [])
    return tuple(devices), links


def stage_memory_bytes(problem: PlacementProblem, start_layer: int, end_layer: int) -> tuple[int, int]:
    """(weight bytes, KV reserve bytes) a device holding ``[start_layer, end_layer)`` needs."""
    model = problem.model
    weights = sum(model.layer_bytes[start_layer:end_layer])
    weights += model.embedding_bytes if start_layer == 0 else 0
    weights += model.lm_head_bytes if end_layer == model.num_layers else 0
    return weights, problem.kv_reserve_tokens * model.kv_bytes_per_token_per_layer * (end_layer - start_layer)


def format_placement_table(placement: Placement, problem: PlacementProblem) -> str:
    flow_of: dict[str, float] = {}
    for p in placement.pipelines:
        for s in p.stages:
            flow_of[s.device_id] = flow_of.get(s.device_id, 0.0) + p.flow_tokens_per_s
    rows = [("device", "kind", "layers", "count", "flow tok/s", "weights GB", "KV GB", "memory GB")]
    for d in problem.devices:
        r = placement.ranges.get(d.device_id)
        layers = f"[{r[0]}, {r[1]})" if r else "-"
        weights, kv = stage_memory_bytes(problem, *r) if r else (0, 0)
        rows.append((d.device_id, d.kind or "-", layers, str(r[1] - r[0]) if r else "0",
                     f"{flow_of.get(d.device_id, 0.0):.1f}", f"{weights / 1e9:.1f}", f"{kv / 1e9:.1f}",
                     f"{d.memory_bytes / 1e9:.1f}"))
    rows[1:] = sorted(rows[1:], key=lambda x: (x[2] == "-", int(x[2][1:].split(",")[0]) if x[2] != "-" else 0))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    lines.append(f"throughput {placement.throughput_tokens_per_s:.2f} tok/s (upper bound "
                 f"{placement.upper_bound_tokens_per_s:.2f}, gap {100 * placement.gap:.2f}%, {placement.status}); "
                 f"per-token latency {placement.latency_s * 1e3:.2f} ms; {len(placement.pipelines)} pipeline(s); "
                 f"solved in {placement.solve_time_s:.2f} s")
    for n, p in enumerate(placement.pipelines[:8]):
        path = " -> ".join(f"{s.device_id}[{s.start_layer},{s.end_layer})" for s in p.stages)
        lines.append(f"  pipeline {n}: {p.flow_tokens_per_s:.2f} tok/s, {p.latency_s * 1e3:.2f} ms: {path}")
    return "\n".join(lines)


def placement_to_json(placement: Placement, problem: PlacementProblem | None = None) -> dict:
    """With ``problem``: also ``memory`` per placed device (weight, KV reserve, device bytes)."""
    out = {
        "ranges": {d: [s, e] for d, (s, e) in placement.ranges.items()},
        "throughput_tokens_per_s": placement.throughput_tokens_per_s,
        "latency_s": placement.latency_s if placement.latency_s != float("inf") else None,
        "upper_bound_tokens_per_s": placement.upper_bound_tokens_per_s,
        "status": placement.status,
        "solve_time_s": placement.solve_time_s,
        "moved_layers": placement.moved_layers,
        "objective": placement.objective,
        "pipelines": [{"flow_tokens_per_s": p.flow_tokens_per_s, "latency_s": p.latency_s,
                       "stages": [[s.device_id, s.start_layer, s.end_layer] for s in p.stages]}
                      for p in placement.pipelines],
    }
    if problem is not None:
        memory = {}
        for device_id, (start, end) in placement.ranges.items():
            weights, kv = stage_memory_bytes(problem, start, end)
            memory[device_id] = {"weight_bytes": weights, "kv_reserve_bytes": kv,
                                 "memory_bytes": problem.device(device_id).memory_bytes}
        out["memory"] = memory
    return out
