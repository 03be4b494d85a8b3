"""`potluck status`: a running cluster as a table in the terminal.

Parts:
- `fetch_cluster(url, api_key)`: `GET {url}/cluster` (raises `StatusError` with a clear message).
- `format_cluster(cluster)`: the header line (model, layers, epoch, plan) and one row per worker:
  id, device, state, layer range, a bar along the model's layers, KV used, tokens processed,
  step time, in-flight requests; then the pipelines (with each usable one's predicted time per
  token) and the links the workers measured (round trip, bandwidth).
- `base_url(url)`: the server's base URL from what the user pasted (`.../v1` as printed by serve).
- `run_status(args) -> int`: prints it (the workers that failed and why below the table), or with
  `--devices-json` the workers as a devices.json for `potluck plan` (`api/device_entries.py`);
  exit 7 (`ExitCode.UNREACHABLE`) when the server is unreachable or refuses.
- `strip_control_characters(text)`: what is printed has no terminal escape codes (worker names).
"""

from __future__ import annotations

import argparse
import json
import logging
import unicodedata
import sys
from typing import Any

import httpx

from api.device_entries import device_entry, devices_document
from api.startup import ExitCode


class StatusError(Exception):
    pass


def base_url(url: str) -> str:
    """`http://h:8000/v1/` -> `http://h:8000`; a URL without a scheme gets http://."""
    base = url.strip().rstrip("/")
    if "://" not in base:
        base = f"http://{base}"
    for suffix in ("/v1", "/cluster", "/dashboard"):
        base = base.removesuffix(suffix)
    return base


def fetch_cluster(url: str, api_key: str | None, timeout_s: float = 10.0) -> dict[str, Any]:
    base = base_url(url)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(f"{base}/cluster", headers=headers, timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise StatusError(f"cannot reach the potluck server at {base}: {exc or type(exc).__name__}") from None
    if response.status_code == 401:
        raise StatusError(f"{base} needs an API key: pass --api-key or set POTLUCK_API_KEY")
    if response.status_code != 200:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:200]
        raise StatusError(f"{base}/cluster answered HTTP {response.status_code}: {message}")
    try:
        return response.json()
    except ValueError:
        raise StatusError(f"{base}/cluster did not answer JSON; is this a potluck server?") from None


def layer_bar(layers: list[int] | None, num_layers: int, width: int = 24) -> str:
    """`[0, 3)` of 6 layers -> `|############............|`."""
    if not layers or num_layers <= 0:
        return "|" + "." * width + "|"
    start = round(width * layers[0] / num_layers)
    end = max(start + 1, round(width * layers[1] / num_layers))
    return "|" + "." * start + "#" * (end - start) + "." * (width - end) + "|"


def _table(rows: list[list[str]], header: list[str]) -> list[str]:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return lines


def format_cluster(cluster: dict[str, Any]) -> str:
    model = cluster["model"]
    num_layers = int(model["num_layers"])
    plan = cluster.get("plan")
    lines = [
        f"model {model['id']} ({model.get('type', '?')}, {num_layers} layers, max_model_len {model.get('max_model_len')})"
        f"  epoch {cluster.get('epoch')}  running requests {cluster.get('running_requests', 0)}"
        f"  tokens generated {cluster.get('tokens_generated', 0)}",
        "",
    ]
    rows = []
    for w in cluster.get("workers", []):
        layers = w.get("loaded_layers") or w.get("assigned_layers")
        capacity, free = w.get("kv_capacity_tokens", 0), w.get("kv_free_tokens", 0)
        kv = f"{100 * (1 - free / capacity):.1f}% of {capacity}" if capacity else "-"
        rows.append([
            w["id"], w.get("device", "?"), w.get("state", "?"),
            f"[{layers[0]}, {layers[1]})" if layers else "-", layer_bar(layers, num_layers), kv,
            str(w.get("tokens_processed", 0)), f"{1000 * float(w.get('step_time_ewma_s', 0.0)):.1f}",
            str(w.get("in_flight_requests", 0)),
        ])  # fmt: skip
    header = ["WORKER", "DEVICE", "STATE", "LAYERS", "0".ljust(26 - len(str(num_layers))) + str(num_layers), "KV USED", "TOKENS", "MS/STEP", "IN FLIGHT"]
    lines += _table(rows, header) if rows else ["no workers registered"]
    for failure in cluster.get("failed_workers", []):
        lines.append(f"FAILED {failure['id']}: {failure['reason']}")
    lines.append("")
    if plan is None:
        lines.append("no plan yet")
    else:
        predicted = plan.get("predicted_tokens_per_s") or 0.0
        if predicted > 0:
            lines.append(f"predicted {predicted:.1f} tok/s (bound {plan.get('upper_bound_tokens_per_s') or predicted:.1f})")
        usable = {tuple(p): t for p, t in zip(plan.get("usable_pipelines", []), plan.get("pipeline_token_latency_s") or [None] * 99)}
        for i, route in enumerate(plan.get("pipelines", [])):
            stages = " -> ".join(f"{wid} [{plan['ranges'][wid][0]}, {plan['ranges'][wid][1]})" for wid in route)
            state = "not ready" if tuple(route) not in usable else "usable"
            if (token_s := usable.get(tuple(route))) is not None:
                state += f", {1000 * token_s:.1f} ms/token predicted"
            lines.append(f"pipeline {i}: {stages}  ({state})")
    lines += format_links(cluster.get("links", []))
    return "\n".join(lines)


def format_links(links: list[dict[str, Any]]) -> list[str]:
    """The measured links as table rows (none: no lines)."""
    if not links:
        return []
    rows = [[" - ".join(row["workers"]), f"{1000 * row['rtt_s']:.2f}", f"{8 * row['bandwidth_bytes_per_s'] / 1e6:.1f}"]
            for row in links]
    return ["", *_table(rows, ["LINK", "RTT MS", "MBIT/S"])]


def run_status(args: argparse.Namespace) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # no per-request log lines in the table
    try:
        cluster = fetch_cluster(args.url, getattr(args, "api_key", None))
    except StatusError as exc:
        print(f"potluck status: {exc}", file=sys.stderr)
        return ExitCode.UNREACHABLE
    if getattr(args, "devices_json", False):
        entries = [device_entry(w["profile"], w["id"], w.get("memory_bytes")) for w in cluster.get("workers", []) if w.get("profile")]
        print(json.dumps(devices_document(entries), indent=2))
        return 0
    print(strip_control_characters(format_cluster(cluster)))
    return 0


def strip_control_characters(text: str) -> str:
    """`text` without terminal control characters (escape sequences in a worker's name), lines kept."""
    return "".join(c for c in text if c == "\n" or (c.isprintable() and unicodedata.category(c) != "Cf"))
