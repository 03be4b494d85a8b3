"""`potluck plan` as a user runs it: a model directory, a devices file, a table or JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.checkpoints import make_checkpoint

pytestmark = pytest.mark.slow  # a `potluck plan` subprocess per test


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("plan") / "llama", "llama", num_hidden_layers=8)


def plan(model_dir: Path, devices: dict, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    path = tmp_path / "devices.json"
    path.write_text(json.dumps(devices))
    command = [sys.executable, "-m", "api.cli", "plan", "--model", str(model_dir), "--devices", str(path), "--time-limit", "2", *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


DEVICES = {
    "devices": [
        {"id": "rtx4090", "memory_bytes": "24GB", "flops_per_s": 1.6e14, "memory_bandwidth_bytes_per_s": 1.0e12},
        {"id": "mac", "memory_bytes": "64GB", "flops_per_s": 2.7e13, "memory_bandwidth_bytes_per_s": 8.0e11},
        {"id": "cpu", "memory_bytes": "32GB", "flops_per_s": 1.0e12, "memory_bandwidth_bytes_per_s": 5.0e10},
    ]
}


def test_plan_prints_a_table_with_every_placed_device(model_dir: Path, tmp_path: Path) -> None:
    result = plan(model_dir, DEVICES, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "throughput" in result.stdout and "upper bound" in result.stdout
    for device in ("rtx4090", "mac", "cpu"):
        assert device in result.stdout


def test_plan_json_covers_every_layer_and_latency_mode_drops_slow_devices(model_dir: Path, tmp_path: Path) -> None:
    result = plan(model_dir, DEVICES, tmp_path, "--json", "--objective", "latency")
    assert result.returncode == 0, result.stderr
    placement = json.loads(result.stdout)
    covered = sorted(tuple(r) for r in placement["ranges"].values())
    assert covered[0][0] == 0 and covered[-1][1] == 8
    assert "cpu" not in placement["ranges"]  # it only slows one user's tokens down
    assert placement["latency_s"] > 0 and placement["upper_bound_tokens_per_s"] >= placement["throughput_tokens_per_s"]


def test_plan_says_how_much_memory_is_missing(model_dir: Path, tmp_path: Path) -> None:
    tiny = {"devices": [{"id": "pi", "memory_bytes": 1000, "flops_per_s": 1e9, "memory_bandwidth_bytes_per_s": 1e9}]}
    result = plan(model_dir, tiny, tmp_path)
    assert result.returncode == 1
    assert "bytes" in result.stderr and "missing" in result.stderr.lower()


def test_plan_rejects_a_bad_devices_file(model_dir: Path, tmp_path: Path) -> None:
    result = plan(model_dir, {"devices": [{"id": "x"}]}, tmp_path)
    assert result.returncode == 4
    assert "cannot read devices" in result.stderr
