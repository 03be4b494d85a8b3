"""Model sizes from `config.json` alone: what `potluck plan` uses before any weight is downloaded.

Parts:
- `QUANTIZATION_BYTES_PER_WEIGHT`: bytes one weight of a decoder layer's matrices takes under
  `--quantization none|int8|int4` (a per-row scale for int8, a 2-byte scale per 32 weights for
  int4); norms, biases, embeddings and the LM head keep the served dtype.
- `layer_parameter_counts(config)`: (matrix weights, vector weights) of one decoder layer.
- `facts_from_config(config, dtype, quantization)`: a `ModelFacts` with bytes per layer, embeddings
  and LM head computed from the config's shapes.
- `facts_of(config, served, layer_bytes, embedding_bytes, lm_head_bytes, **moe)`: the one place a
  `ModelFacts` is built from a config and byte counts (here and `workers/model_facts.py`).

Only the dense families of `workers/model_config.py` are counted here; a mixture-of-experts
family adds its experts where it adds its layer (branch `moe`), and GGUF files carry their own
tensor sizes in their headers (branch `gguf`), which `potluck plan` prefers when it finds them.
"""

from __future__ import annotations

from typing import Any

from workers.model_config import ModelConfig, parse_dtype
from workers.protocol import ModelFacts

INT4_GROUP_SIZE = 32
# bytes per weight of a layer's matrices; None: the served dtype's itemsize
QUANTIZATION_BYTES_PER_WEIGHT: dict[str, float | None] = {
    "none": None,
    "int8": 1.0,  # + one 2-byte scale per output row, added in `facts_from_config`
    "int4": 0.5 + 2.0 / INT4_GROUP_SIZE,
}


def layer_parameter_counts(config: ModelConfig) -> tuple[int, int]:
    """(weights in the layer's matrices, weights in its norms and biases) of one decoder layer."""
    hidden, head_dim = config.hidden_size, config.head_dim
    q_width = config.num_attention_heads * head_dim
    kv_width = config.num_key_value_heads * head_dim
    attention = hidden * q_width + 2 * hidden * kv_width + q_width * hidden  # q, k, v, o
    mlp = 3 * hidden * config.intermediate_size  # gate, up, down
    vectors = 2 * hidden  # input and post-attention RMSNorm
    if config.qkv_bias:
        vectors += q_width + 2 * kv_width
    if config.qk_norm:
        vectors += 2 * head_dim
    return attention + mlp, vectors


def _matrix_rows(config: ModelConfig) -> int:
    """Output rows of one layer's matrices (each gets an int8 scale)."""
    q_width = config.num_attention_heads * config.head_dim
    kv_width = config.num_key_value_heads * config.head_dim
    return q_width + 2 * kv_width + config.hidden_size + 2 * config.intermediate_size + config.hidden_size


def facts_from_config(config: ModelConfig, dtype: str = "auto", quantization: str = "none") -> ModelFacts:
    """What placement needs of the model, computed from its config's shapes."""
    if quantization not in QUANTIZATION_BYTES_PER_WEIGHT:
        raise ValueError(f"--quantization takes {', '.join(QUANTIZATION_BYTES_PER_WEIGHT)}, got {quantization!r}")
    if config.num_experts:  # experts' sizes: not counted here yet (branch `moe` reads them from the headers)
        raise ValueError(f"{config.model_type}: sizes of mixture-of-experts layers come from the weight files' "
                         "headers; planning from config.json alone covers dense models only")
    served = config.dtype if dtype == "auto" else parse_dtype(dtype)
    itemsize = served.itemsize
    matrices, vectors = layer_parameter_counts(config)
    per_weight = QUANTIZATION_BYTES_PER_WEIGHT[quantization]
    if per_weight is None:
        matrix_bytes = matrices * itemsize
    else:
        matrix_bytes = int(matrices * per_weight) + (2 * _matrix_rows(config) if quantization == "int8" else 0)
    layer_bytes = matrix_bytes + vectors * itemsize
    embedding_bytes = config.vocab_size * config.hidden_size * itemsize
    lm_head_bytes = config.hidden_size * itemsize + embedding_bytes  # final norm + head (tied: a copy)
    return facts_of(config, served, (layer_bytes,) * config.num_layers, embedding_bytes, lm_head_bytes)


def facts_of(config: ModelConfig, served: Any, layer_bytes: tuple[int, ...], embedding_bytes: int,
             lm_head_bytes: int, **moe: Any) -> ModelFacts:
    """The `ModelFacts` of ``config`` served in dtype ``served`` (a torch dtype) with these byte
    counts; ``moe``: `expert_bytes`, `num_experts`, `experts_per_token` of a mixture of experts."""
    return ModelFacts(
        model_type=config.model_type,
        num_layers=config.num_layers,
        hidden_size=config.hidden_size,
        vocab_size=config.vocab_size,
        max_position_embeddings=config.max_position_embeddings,
        dtype=str(served).removeprefix("torch."),
        layer_bytes=layer_bytes,
        embedding_bytes=embedding_bytes,
        lm_head_bytes=lm_head_bytes,
        kv_bytes_per_token_per_layer=config.kv_bytes_per_token_per_layer(served),
        activation_bytes_per_token=config.activation_bytes_per_token(served),
        eos_token_ids=tuple(config.eos_token_ids),
        **moe,
    )
