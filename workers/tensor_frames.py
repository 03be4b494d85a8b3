"""Tensors as wire payloads (workers/protocol.py `TensorPayload`) and back, without copies on CPU.

Parts:
- `tensor_to_payload`: a tensor's bytes as a payload that shares its memory (any dtype, bf16 too).
- `payload_to_tensor`: a received frame as a tensor of the sent dtype and shape; a frame whose size
  does not match its header raises `ProtocolError`.
"""

from __future__ import annotations

import math
import warnings

import torch

from workers import protocol as p

warnings.filterwarnings("ignore", message="The given buffer is not writable")


_DTYPE_NAMES: dict[torch.dtype, str] = {}  # torch.float32 -> "float32", filled as dtypes are seen
_DTYPES: dict[str, torch.dtype] = {}  # and back


def tensor_to_payload(tensor: torch.Tensor) -> p.TensorPayload:
    """A tensor as a wire payload; the payload's buffer shares the tensor's memory on CPU."""
    if tensor.requires_grad:
        tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    tensor = tensor.contiguous()
    name = _DTYPE_NAMES.get(tensor.dtype)
    if name is None:
        name = _DTYPE_NAMES[tensor.dtype] = str(tensor.dtype).removeprefix("torch.")
    data = tensor.view(torch.uint8).numpy() if tensor.numel() else b""
    return p.TensorPayload(dtype=name, shape=tuple(tensor.shape), data=data)


def _dtype(name: str) -> torch.dtype:
    dtype = _DTYPES.get(name)
    if dtype is None:
        dtype = getattr(torch, name, None) if isinstance(name, str) else None
        if not isinstance(dtype, torch.dtype):
            raise p.ProtocolError(f"unknown dtype {name!r}")
        _DTYPES[name] = dtype
    return dtype


def payload_to_tensor(payload: p.TensorPayload) -> torch.Tensor:
    dtype = _dtype(payload.dtype)
    expected = math.prod(payload.shape) * dtype.itemsize
    if memoryview(payload.data).nbytes != expected:
        raise p.ProtocolError("tensor frame size does not match its shape")
    if expected == 0:
        return torch.empty(payload.shape, dtype=dtype)
    return torch.frombuffer(payload.data, dtype=dtype).view(payload.shape)
