"""`--quantization int8|int4` for safetensors checkpoints: weight-only, group-wise, while loading.

Parts:
- `QUANTIZATIONS`, `quantization_bits(name)`: "none" | "int8" | "int4" -> None | 8 | 4.
- `is_quantized_weight(name)`: the decoder layers' linear weights (q/k/v/o, gate/up/down, and
  MoE experts' projections); norms, biases, embeddings and the LM head stay in the compute dtype.
- `quantizer(quantization)`: the per-tensor conversion `load_stage_tensors` applies as it reads
  each tensor, so a worker quantizes only its own layers and never holds its stage in float.
- `quantized_bytes_per_weight(bits)`: what a weight costs in memory as the kernel holds it (4-bit
  planes + bfloat16 scale and zero per 32 weights: int4 0.625 B, int8 1.25 B).
- `quantized_layer_bytes(model_dir, quantization, dtype)`: `CheckpointSizes` in served bytes,
  from the safetensors headers only (placement plans with these).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path

import torch

from workers.checkpoint import (
    EMBED_PREFIX,
    LM_HEAD_PREFIX,
    NORM_PREFIX,
    CheckpointSizes,
    checkpoint_files,
    layer_parameter_bytes,
    read_safetensors_header,
)
from workers.quantized_linear import KERNEL_GROUP, GroupCodes, quantize_weight

QUANTIZATIONS = ("none", "int8", "int4")
_BITS = {"none": None, "int8": 8, "int4": 4}
_LINEAR_RE = re.compile(r"^model\.layers\.(\d+)\.(self_attn\.[qkvo]_proj|mlp\.(experts\.\d+\.)?(gate|up|down)_proj|(mlp|block_sparse_moe)\.experts\.\d+\.w[123])\.weight$")
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")
_HEADER_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I8": 1, "U8": 1, "BOOL": 1}


def quantization_bits(name: str) -> int | None:
    if name not in _BITS:
        raise ValueError(f"unknown quantization {name!r}; use one of {', '.join(QUANTIZATIONS)}")
    return _BITS[name]


def is_quantized_weight(name: str) -> bool:
    return bool(_LINEAR_RE.match(name))


def quantizer(quantization: str) -> Callable[[str, torch.Tensor], torch.Tensor | GroupCodes] | None:
    """name, float tensor -> `GroupCodes` for the linear weights, the tensor for the rest."""
    bits = quantization_bits(quantization)
    if bits is None:
        return None

    def convert(name: str, tensor: torch.Tensor) -> torch.Tensor | GroupCodes:
        return quantize_weight(tensor, bits, name=name) if is_quantized_weight(name) else tensor

    return convert


def quantized_bytes_per_weight(bits: int) -> float:
    planes = math.ceil(bits / 4)
    return planes * (0.5 + 2 * 2 / KERNEL_GROUP)


def quantized_layer_bytes(model_dir: str | Path, quantization: str, dtype: torch.dtype) -> CheckpointSizes:
    """Bytes per layer as served: quantized linear weights at their kernel size, the rest in `dtype`."""
    bits = quantization_bits(quantization)
    if bits is None:
        return layer_parameter_bytes(model_dir)
    itemsize = torch.empty((), dtype=dtype).element_size()
    layers: dict[int, float] = {}
    embed = norm = head = 0.0
    for path in sorted(set(checkpoint_files(model_dir).values())):
        for name, meta in read_safetensors_header(path).items():
            count = math.prod(meta["shape"])
            nbytes = count * (quantized_bytes_per_weight(bits) if is_quantized_weight(name) else itemsize)
            match = _LAYER_RE.match(name)
            if match:
                layers[int(match.group(1))] = layers.get(int(match.group(1)), 0) + nbytes
            elif name.startswith(EMBED_PREFIX):
                embed += nbytes
            elif name.startswith(NORM_PREFIX):
                norm += nbytes
            elif name.startswith(LM_HEAD_PREFIX):
                head += nbytes
    num_layers = max(layers) + 1 if layers else 0
    tied = head == 0
    return CheckpointSizes(
        tuple(int(layers.get(i, 0)) for i in range(num_layers)),
        int(embed),
        int(norm),
        int(embed if tied else head),
        tied,
    )
