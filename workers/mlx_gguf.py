"""GGUF weights for the MLX backend: llama.cpp's block types mapped onto MLX's affine quantization.

Parts:
- `MLX_GGUF_BITS`: the GGUF types an MLX stage keeps quantized, and their MLX bit width. Every
  one is, per group of 32 inputs, w = scale * code + offset with unsigned codes (GGUF's own
  `GroupCodes` reading, workers/quantized_linear.py `codes_from_gguf`), which is exactly MLX's
  affine form w = scales * q + biases at `group_size=32`:
  Q4_0 d*(q-8): scale d, bias -8d (4 bits); Q4_1 d*q+m (4 bits); Q5_0 / Q5_1 likewise (5 bits);
  Q8_0 d*q, q signed: code q+128, bias -128d (8 bits); Q4_K / Q5_K: sub-blocks of 32 with scale
  d*sc and bias -dmin*m (4 / 5 bits).
- `DEQUANTIZED_GGUF_TYPES`: Q6_K, dequantized to the run dtype at load: its scales are per 16
  inputs and MLX's smallest group is 32 (two sub-blocks' int8 scales cannot share one group's
  scale: their codes would need 6 + 8 bits).
- `MLXQuantized`: a weight [out, in] as MLX holds it (`q` uint32 packed, `scales`, `biases`,
  `bits`, `group_size`); `dequantize_rows(ids)` is an embedding lookup of only those rows.
- `pack_codes(codes, bits)`: uint8 codes [out, in] -> MLX's packing (a little-endian bit stream
  per row, read as uint32; checked against `mx.dequantize` for bits 2-8 in the tests).
- `load_gguf_stage(path, start, end, num_layers, tied, dtype)`: one stage's tensors (HF names) as
  `mx.array` (float types, Q6_K) or `MLXQuantized`, and the `(file, start, end)` byte ranges read
  (only the stage's own tensors, through workers/gguf_file.py).

Scales and biases are kept in float16 where every value round-trips exactly (Q4_0, Q4_1, Q8_0,
Q5_0, Q5_1: fp16 d and m times small powers of two), else in float32 (K-quants: d * sc needs up to
17 significant bits); with float32 activations the matmul then computes on exactly the weights
`gguf.quants.dequantize` gives. A bfloat16 / float16 run keeps them in the run dtype instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

MLX_GGUF_BITS = {"Q4_0": 4, "Q4_1": 4, "Q5_0": 5, "Q5_1": 5, "Q8_0": 8, "Q4_K": 4, "Q5_K": 5}
DEQUANTIZED_GGUF_TYPES = ("Q6_K",)
MLX_GROUP = 32


@dataclass(frozen=True)
class MLXQuantized:
    q: mx.array  # uint32 [out, in * bits / 32]
    scales: mx.array  # [out, in / group_size]
    biases: mx.array
    bits: int
    group_size: int
    shape: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scales.nbytes + self.biases.nbytes

    def dequantize_rows(self, ids: mx.array, dtype: mx.Dtype) -> mx.array:
        """Rows `ids` of the weight (an embedding lookup), [len(ids), in] in `dtype`."""
        # in float32: float16 scales would make MLX dequantize in float16 (scale * code rounds)
        wide = mx.float32 if dtype == mx.float32 else self.scales.dtype
        scales, biases = self.scales[ids].astype(wide), self.biases[ids].astype(wide)
        rows = mx.dequantize(self.q[ids], scales, biases, group_size=self.group_size, bits=self.bits)
        return rows.astype(dtype)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes [out, in] (each < 2**bits) -> uint32 [out, in * bits / 32]: code j of a row
    occupies bits [j * bits, (j + 1) * bits) of the row's little-endian bit stream."""
    out, inn = codes.shape
    if (inn * bits) % 32:
        raise ValueError(f"{inn} inputs of {bits} bits do not fill whole 32-bit words")
    if bits in (4, 8):  # whole nibbles / bytes: no bit stream needed
        if bits == 8:
            return np.ascontiguousarray(codes, dtype=np.uint8).view(np.uint32)
        pairs = codes.reshape(out, -1, 2)
        return np.ascontiguousarray(pairs[..., 0] | (pairs[..., 1] << 4), dtype=np.uint8).view(np.uint32)
    stream = ((codes[..., None] >> np.arange(bits, dtype=np.uint8)) & 1).reshape(out, inn * bits)
    return np.packbits(stream, axis=1, bitorder="little").view(np.uint32)


def _scale_dtype(values: tuple[np.ndarray, ...], run_dtype: mx.Dtype) -> mx.Dtype:
    if run_dtype != mx.float32:
        return run_dtype
    exact = all(np.array_equal(v.astype(np.float16).astype(np.float32), v) for v in values)
    return mx.float16 if exact else mx.float32


def mlx_quantized(codes, run_dtype: mx.Dtype) -> MLXQuantized:
    """A `GroupCodes` (workers/quantized_linear.py; group 32) as MLX's affine quantization."""
    if codes.group_size != MLX_GROUP:
        raise ValueError(f"MLX groups are 32, 64 or 128 inputs; these codes have groups of {codes.group_size}")
    scale, offset = codes.scale.numpy(), codes.offset.numpy()
    dtype = _scale_dtype((scale, offset), run_dtype)
    return MLXQuantized(
        q=mx.array(pack_codes(codes.codes.numpy(), codes.bits)),
        scales=mx.array(scale).astype(dtype),
        biases=mx.array(offset).astype(dtype),
        bits=codes.bits,
        group_size=MLX_GROUP,
        shape=tuple(codes.shape),
    )


def load_gguf_stage(
    path: str | Path, start_layer: int, end_layer: int, num_layers: int, tied: bool, dtype: mx.Dtype
) -> tuple[dict[str, mx.array | MLXQuantized], tuple[tuple[str, int, int], ...]]:
    """Stage [start_layer, end_layer)'s tensors of the GGUF at `path` and the byte ranges read."""
    import gguf
    import torch

    from workers.gguf_file import load_gguf_stage_tensors, open_gguf
    from workers.quantized_linear import QuantizedRows

    model = open_gguf(str(Path(path).resolve()))
    first_read = len(model.bytes_read)
    raw = load_gguf_stage_tensors(model, start_layer, end_layer, num_layers, tied, torch.float32)
    tensors: dict[str, mx.array | MLXQuantized] = {}
    for name in list(raw):
        value = raw.pop(name)  # one tensor's codes at a time beside the stage's file bytes
        if not isinstance(value, QuantizedRows):
            tensors[name] = mx.array(value.numpy()).astype(dtype)
        elif value.type_name in MLX_GGUF_BITS:
            tensors[name] = mlx_quantized(value.codes(), dtype)
        else:  # DEQUANTIZED_GGUF_TYPES (load_gguf_stage_tensors refused the rest)
            weight = gguf.quants.dequantize(value.raw, value.qtype).reshape(value.shape)
            if value.order is not None:
                weight = weight[value.order.numpy()]
            tensors[name] = mx.array(np.ascontiguousarray(weight, dtype=np.float32)).astype(dtype)
        held = tensors[name]
        mx.eval(*((held.q, held.scales, held.biases) if isinstance(held, MLXQuantized) else (held,)))
        del value
    return tensors, tuple(model.bytes_read[first_read:])
