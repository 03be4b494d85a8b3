"""`read_model_facts`: what the scheduler must know of a model directory, read without loading it.

Sizes come from the safetensors headers and config.json only (or a GGUF's header); when the model is served in
another dtype than the checkpoint's, parameter bytes are scaled to the served dtype. For MoE
models every layer's bytes include all its experts (memory holds them all), and the experts'
share is reported apart (`expert_bytes`, with the expert count and top-k) so that placement
charges a decode step only the experts it reads.
"""

from __future__ import annotations

from pathlib import Path

import torch

from workers.config_sizes import facts_of
from workers.quantization import quantized_layer_bytes
from workers.model_config import ModelConfig, parse_dtype
from workers.protocol import ModelFacts


def read_model_facts(model_dir: str | Path, dtype: str = "auto", quantization: str = "none") -> ModelFacts:
    """GGUF: the bytes of every tensor as stored (quantized); safetensors + `quantization`
    int4 / int8: each decoder layer at its quantized size (workers/quantization.py)."""
    config = ModelConfig.from_path(model_dir)
    served = config.dtype if dtype == "auto" else parse_dtype(dtype)
    if str(model_dir).endswith(".gguf"):
        from workers.gguf_file import open_gguf

        sizes = open_gguf(str(Path(model_dir).resolve())).layer_sizes()
        scale = 1.0  # quantized tensors run as they are stored, whatever the compute dtype
    else:
        sizes = quantized_layer_bytes(model_dir, quantization, served)
        scale = 1.0  # quantized_layer_bytes counts in the served dtype already
        if quantization == "none":
            scale = torch.empty((), dtype=served).element_size() / torch.empty((), dtype=config.dtype).element_size()

    def scaled(num_bytes: int) -> int:
        return int(num_bytes * scale)

    return facts_of(config, served, tuple(scaled(b) for b in sizes.layer_bytes), scaled(sizes.embedding_bytes),
                    scaled(sizes.final_norm_bytes + sizes.lm_head_bytes),
                    expert_bytes=tuple(scaled(b) for b in sizes.expert_bytes) if config.is_moe else (),
                    num_experts=config.num_experts, experts_per_token=config.num_experts_per_tok)
