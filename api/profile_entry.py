"""`potluck profile --json`: this machine as a devices.json that `potluck plan --devices` takes as is.

Parts:
- `default_device_id(device)`: `HOSTNAME-DEVICE` (e.g. `mac-studio-mps`).
- `run_profile_json(args) -> int`: measures the device (and, with `--model`, one layer of that
  model), prints `{"devices": [entry]}` (`api/device_entries.py`). Entries of several machines
  concatenate into one cluster's file; `potluck status --devices-json` writes a running cluster's.
"""

from __future__ import annotations

import argparse
import json
import socket
from pathlib import Path

from api.device_entries import device_entry, devices_document
from api.startup import check_model_dir


def default_device_id(device: str) -> str:
    return f"{socket.gethostname().split('.')[0]}-{device.replace(':', '')}"


def run_profile_json(args: argparse.Namespace) -> int:
    from workers.profiler import default_device, measure_device

    device = args.device or default_device()
    if args.model is not None:
        check_model_dir(Path(args.model), serving=False)
    profile = measure_device(device, model_dir=args.model)
    entry = device_entry(profile.to_json(), args.id or default_device_id(device))
    print(json.dumps(devices_document([entry]), indent=2))
    return 0
