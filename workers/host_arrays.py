"""Arrays at the backend boundary: numpy over raw buffers, named by wire dtype (no torch here).

Parts:
- `HIDDEN_DTYPES`: the wire names a stage's hidden states may have (float32, bfloat16, float16).
- `numpy_dtype(name)`: the numpy dtype that holds a wire dtype (bfloat16 -> uint16: its raw bits).
- `array_to_payload(array, dtype)`: an array as a wire `TensorPayload` sharing its memory.
- `payload_to_array(payload)`: a received frame as a read-only array (no copy); a frame whose size
  does not match its header, or an unknown dtype, raises `ProtocolError`.
- `bf16_bits_to_float32(bits)` / `float32_to_bf16_bits(values)`: for backends that compute bf16 in
  float32 (round to nearest even, as torch and MLX round).

The wire format is what workers/tensor_frames.py writes for torch tensors: the same dtype names and
bytes, so a numpy stage and a torch stage read each other's frames.
"""

from __future__ import annotations

import math

import numpy as np

from workers import protocol as p

HIDDEN_DTYPES = ("float32", "bfloat16", "float16")
_NUMPY_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(np.uint16),  # raw bits: numpy has no bfloat16
    "float64": np.dtype(np.float64),
    "int64": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "uint8": np.dtype(np.uint8),
}


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype holding wire dtype `name`; ValueError for an unknown one."""
    dtype = _NUMPY_DTYPES.get(name) if isinstance(name, str) else None
    if dtype is None:
        raise ValueError(f"unknown dtype {name!r}; known: {', '.join(_NUMPY_DTYPES)}")
    return dtype


def array_to_payload(array: np.ndarray, dtype: str) -> p.TensorPayload:
    """`array` (holding wire dtype `dtype`) as a payload; shares its memory when contiguous."""
    if array.dtype != numpy_dtype(dtype):
        raise ValueError(f"a {array.dtype} array cannot travel as {dtype}")
    array = np.ascontiguousarray(array)
    data = array.reshape(-1).view(np.uint8) if array.size else b""
    return p.TensorPayload(dtype=dtype, shape=tuple(int(n) for n in array.shape), data=data)


def payload_to_array(payload: p.TensorPayload) -> np.ndarray:
    """The payload's frame as an array of its dtype and shape (read-only, no copy)."""
    try:
        dtype = numpy_dtype(payload.dtype)
    except ValueError as exc:
        raise p.ProtocolError(str(exc)) from None
    expected = math.prod(payload.shape) * dtype.itemsize
    if memoryview(payload.data).nbytes != expected:
        raise p.ProtocolError("tensor frame size does not match its shape")
    if expected == 0:
        return np.empty(payload.shape, dtype=dtype)
    return np.frombuffer(payload.data, dtype=dtype).reshape(payload.shape)


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bits -> float32 values (exact)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def float32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> uint16 bfloat16 bits, rounded to nearest even (NaN stays NaN)."""
    as_int = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = as_int + 0x7FFF + ((as_int >> 16) & 1)
    bits = (rounded >> 16).astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():
        bits[nan] = 0x7FC0
    return bits
