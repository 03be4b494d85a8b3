"""`potluck plan --model DIR --devices devices.json [--json]`: will it fit, and how fast, before
anything is downloaded or started.

Parts:
- `plan_model_facts(model_dir, dtype, quantization) -> (facts, source)`: the model's sizes, from the
  first of: GGUF headers (`GGUF_FACTS`, a hook branch `gguf` fills), the safetensors headers, or
  `config.json` alone (bytes per layer from its shapes, `workers/config_sizes.py`), so a folder
  with only config.json can be planned. `--quantization int8|int4` always counts from the config.
- `read_devices(path, layer_weight_bytes)`: the devices file (format: `placement/io.py`,
  example: `examples/devices.json`); measured layer timings of another model are dropped (the
  roofline of the same entry is used instead).
- `run_plan(args) -> int`: solves and prints a table (per device: layers, weights, KV reserve,
  memory) or JSON; exit codes from `api/startup.py`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from typing import TYPE_CHECKING, Any

from api.startup import ExitCode, StartupError, check_model_dir

if TYPE_CHECKING:  # OR-Tools and torch load after the files were checked (a mistake answers at once)
    from placement.problem import DeviceSpec, LinkSpec
    from workers.protocol import ModelFacts

# Hook for GGUF checkpoints: (model_dir, dtype) -> facts, or None when the directory holds no GGUF
# file. Branch `gguf` sets it to a reader of the GGUF headers' tensor sizes.
GGUF_FACTS: Callable[[Path, str], ModelFacts | None] | None = None


def _has_safetensors(model_dir: Path) -> bool:
    return (model_dir / "model.safetensors").is_file() or (model_dir / "model.safetensors.index.json").is_file()


def plan_model_facts(model_dir: Path, dtype: str = "auto", quantization: str = "none") -> tuple[ModelFacts, str]:
    """The model's sizes and where they came from (for the table's last line)."""
    from workers.config_sizes import facts_from_config
    from workers.model_config import ModelConfig

    if quantization == "none":
        if GGUF_FACTS is not None:
            facts = GGUF_FACTS(model_dir, dtype)
            if facts is not None:
                return facts, "GGUF headers"
        if _has_safetensors(model_dir):
            from workers.model_facts import read_model_facts

            return read_model_facts(model_dir, dtype), "safetensors headers"
    facts = facts_from_config(ModelConfig.from_hf(model_dir), dtype, quantization)
    weights = facts.dtype if quantization == "none" else f"{quantization} layers, {facts.dtype} embeddings"
    return facts, f"config.json alone ({weights})"


def load_devices_json(path: str) -> Any:
    try:
        obj = json.loads(Path(path).read_text())
    except OSError as exc:
        raise StartupError(f"cannot read devices from {path}: {exc.strerror or exc}", ExitCode.DEVICES_FILE) from None
    except ValueError as exc:
        raise StartupError(f"cannot read devices from {path}: not valid JSON ({exc})", ExitCode.DEVICES_FILE) from None
    if not isinstance(obj, dict):
        raise StartupError(f'cannot read devices from {path}: the file holds a JSON {type(obj).__name__}; '
                           'write {"devices": [...]} (see examples/devices.json)', ExitCode.DEVICES_FILE)
    return obj


def read_devices(path: str, obj: Any, layer_weight_bytes: int) -> tuple[tuple[DeviceSpec, ...], tuple[LinkSpec, ...]]:
    from placement.io import devices_from_json

    if isinstance(obj, dict) and isinstance(obj.get("devices"), list):
        for entry in obj["devices"]:  # timings of another model's layer do not apply here
            timed = entry.get("timed_layer_weight_bytes") if isinstance(entry, dict) else None
            if timed and abs(timed - layer_weight_bytes) > 0.05 * layer_weight_bytes:
                entry.pop("decode_layer_time_s", None)
                entry.pop("prefill_layer_time_per_token_s", None)
    try:
        devices, links = devices_from_json(obj)
    except (ValueError, KeyError, TypeError) as exc:
        raise StartupError(f"cannot read devices from {path}: {exc}", ExitCode.DEVICES_FILE) from None
    if not devices:
        raise StartupError(f"{path} lists no devices (see examples/devices.json)", ExitCode.DEVICES_FILE)
    return devices, links


def run_plan(args: argparse.Namespace) -> int:
    from placement.io import format_placement_table, placement_to_json
    from placement.problem import InfeasiblePlacementError, PlacementProblem
    from placement.solver import solve_placement
    from scheduler.planner import model_spec

    model_dir = Path(args.model)
    devices_json = load_devices_json(args.devices)
    if model_dir.suffix == ".gguf":  # a GGUF file: the bytes of every tensor as stored (its header)
        if not model_dir.is_file():
            raise StartupError(f"{model_dir} is not a file", ExitCode.MODEL_DIR)
        from workers.model_facts import read_model_facts

        facts, source = read_model_facts(model_dir, args.dtype), "GGUF header"
    else:
        check_model_dir(model_dir, serving=False)
        facts, source = plan_model_facts(model_dir, args.dtype, args.quantization)
    devices, links = read_devices(args.devices, devices_json, max(facts.layer_bytes))
    problem = PlacementProblem(
        model_spec(facts),
        devices,
        links,
        kv_reserve_tokens=args.context_tokens * args.concurrency,
        objective=args.objective,
    )
    try:
        placement = solve_placement(problem, time_limit_s=args.time_limit)
    except InfeasiblePlacementError as exc:
        print(f"potluck plan: {exc}", file=sys.stderr)
        return ExitCode.FAILED
    if args.json:
        print(json.dumps({**placement_to_json(placement, problem), "model_sizes_from": source}, indent=2))
    else:
        print(format_placement_table(placement, problem))
        print(f"model sizes from {source}: {sum(facts.layer_bytes) / 1e9:.1f} GB in {facts.num_layers} layers; "
              f"KV reserve {args.context_tokens} tokens x {args.concurrency} sequences")
    return 0
