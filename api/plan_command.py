"""`potluck plan --model DIR --devices devices.json [--json]`: placement without running anything.

Parts:
- `run_plan(args) -> int`: reads the model's sizes from its safetensors headers, the devices and
  links from the JSON file (format: `placement/io.py`), solves, prints a table or JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from placement.io import devices_from_json, format_placement_table, placement_to_json
from placement.problem import InfeasiblePlacementError, PlacementProblem
from placement.solver import solve_placement
from scheduler.planner import model_spec
from workers.model_facts import read_model_facts


def run_plan(args: argparse.Namespace) -> int:
    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file() and not (model_dir.suffix == ".gguf" and model_dir.is_file()):
        print(f"potluck plan: {model_dir} is not a Hugging Face model directory (no config.json)", file=sys.stderr)
        return 2
    try:
        devices, links = devices_from_json(json.loads(Path(args.devices).read_text()))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"potluck plan: cannot read devices from {args.devices}: {exc}", file=sys.stderr)
        return 2
    if not devices:
        print(f"potluck plan: {args.devices} lists no devices", file=sys.stderr)
        return 2
    problem = PlacementProblem(
        model_spec(read_model_facts(model_dir, quantization=getattr(args, "quantization", "none"))),
        devices,
        links,
        kv_reserve_tokens=args.context_tokens * args.concurrency,
        objective=args.objective,
    )
    try:
        placement = solve_placement(problem, time_limit_s=args.time_limit)
    except InfeasiblePlacementError as exc:
        print(f"potluck plan: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(placement_to_json(placement), indent=2))
    else:
        print(format_placement_table(placement, problem))
    return 0
