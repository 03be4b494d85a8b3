"""benchmarks/device_check.py skips cleanly (one line, exit 0) on a machine without CUDA."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from benchmarks.device_check import SKIP_LINE


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the check would run for real")
def test_device_check_skips_without_cuda():
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.device_check"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines() == [SKIP_LINE]
