"""Backend plugins (workers/backend_plugins.py) and the numpy boundary (workers/host_arrays.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from workers import protocol as p
from workers.backend_plugins import _source_tree_entry_points, describe_backends, discover, get_plugin
from workers.host_arrays import array_to_payload, bf16_bits_to_float32, float32_to_bf16_bits, payload_to_array
from workers.tensor_frames import payload_to_tensor, tensor_to_payload
from workers.torch_backend import to_numpy, to_torch

REPO = Path(__file__).resolve().parents[2]


def test_this_trees_pyproject_declares_the_in_tree_backends() -> None:
    declared = _source_tree_entry_points()
    assert declared["torch"].value == "workers.torch_backend:PLUGIN"
    assert declared["torch"].load() is get_plugin("torch")
    assert {"torch", "mlx"} <= set(discover())


def test_potluck_backends_lists_each_backend_with_its_devices() -> None:
    out = subprocess.run([sys.executable, "-m", "api.cli", "backends"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    torch_line = next(line for line in out.stdout.splitlines() if line.startswith("torch "))
    assert "devices: " in torch_line and "cpu" in torch_line
    assert out.stdout.splitlines() == describe_backends()


def test_an_unknown_backend_is_one_line_naming_the_installed_ones(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "workers", "--scheduler", "127.0.0.1:1", "--backend", "nope"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode != 0
    message = out.stderr.strip()
    assert "\n" not in message and "no backend named 'nope' is installed (installed: " in message and "torch" in message


def test_bf16_crosses_as_raw_bits_both_ways() -> None:
    values = torch.randn(5, 8).to(torch.bfloat16)
    as_array = to_numpy(values)
    assert as_array.dtype == np.uint16
    assert torch.equal(to_torch(as_array, torch.bfloat16), values)
    payload = array_to_payload(as_array, "bfloat16")
    assert payload == p.TensorPayload("bfloat16", (5, 8), payload.data)
    assert torch.equal(payload_to_tensor(payload), values)  # a torch stage reads a numpy stage's frame
    assert np.array_equal(payload_to_array(tensor_to_payload(values)), as_array)  # and back
    floats = values.float().numpy()
    assert np.array_equal(bf16_bits_to_float32(as_array), floats)
    raw = torch.randn(1000)
    assert np.array_equal(float32_to_bf16_bits(raw.numpy()), to_numpy(raw.to(torch.bfloat16)))  # same rounding


def test_a_frame_of_the_wrong_size_or_dtype_is_a_protocol_error() -> None:
    with pytest.raises(p.ProtocolError, match="does not match"):
        payload_to_array(p.TensorPayload("float32", (2, 3), b"\0" * 20))
    with pytest.raises(p.ProtocolError, match="unknown dtype"):
        payload_to_array(p.TensorPayload("complex64", (1,), b"\0" * 8))
    with pytest.raises(ValueError, match="cannot travel as bfloat16"):
        array_to_payload(np.zeros(3, np.float32), "bfloat16")
