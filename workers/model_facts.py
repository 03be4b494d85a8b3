"""`read_model_facts`: what the scheduler must know of a model directory, read without loading it.

Sizes come from the safetensors headers and config.json only; when the model is served in
another dtype than the checkpoint's, parameter bytes are scaled to the served dtype. For MoE
models every layer's bytes include all its experts (memory holds them all), and the experts'
share is reported apart (`expert_bytes`, with the expert count and top-k) so that placement
charges a decode step only the experts it reads.
"""

from __future__ import annotations

from pathlib import Path

import torch

from workers.checkpoint import layer_parameter_bytes
from workers.model_config import ModelConfig, parse_dtype
from workers.protocol import ModelFacts


def read_model_facts(model_dir: str | Path, dtype: str = "auto") -> ModelFacts:
    config = ModelConfig.from_hf(model_dir)
    sizes = layer_parameter_bytes(model_dir)
    served = config.dtype if dtype == "auto" else parse_dtype(dtype)
    scale = torch.empty((), dtype=served).element_size() / torch.empty((), dtype=config.dtype).element_size()

    def scaled(num_bytes: int) -> int:
        return int(num_bytes * scale)

    return ModelFacts(
        model_type=config.model_type,
        num_layers=config.num_layers,
        hidden_size=config.hidden_size,
        vocab_size=config.vocab_size,
        max_position_embeddings=config.max_position_embeddings,
        dtype=str(served).removeprefix("torch."),
        layer_bytes=tuple(scaled(b) for b in sizes.layer_bytes),
        embedding_bytes=scaled(sizes.embedding_bytes),
        lm_head_bytes=scaled(sizes.final_norm_bytes + sizes.lm_head_bytes),
        kv_bytes_per_token_per_layer=config.kv_bytes_per_token_per_layer(served),
        activation_bytes_per_token=config.activation_bytes_per_token(served),
        eos_token_ids=tuple(config.eos_token_ids),
        expert_bytes=tuple(scaled(b) for b in sizes.expert_bytes) if config.is_moe else (),
        num_experts=config.num_experts,
        experts_per_token=config.num_experts_per_tok,
    )
