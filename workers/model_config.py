"""The one normaliser of Hugging Face model configs (Llama, Mistral, Qwen2, Qwen3, and the MoE
families Qwen3-MoE, Qwen2-MoE and Mixtral).

Parts:
- `SUPPORTED_MODEL_TYPES`: model_type -> family traits (qkv bias, q/k norm).
- `MOE_MODEL_TYPES`: the families whose layers route tokens to experts.
- `UnsupportedModelError`: raised for any other architecture, naming what is supported.
- `RopeScaling`: the rope scaling variant (none / linear / llama3) and its parameters.
- `ModelConfig`: frozen, family-independent view of a config; `ModelConfig.from_hf(model_dir)`
  reads `config.json` (+ `generation_config.json` for eos / bos), accepting both the
  transformers 4 (`rope_theta` + `rope_scaling`) and transformers 5 (`rope_parameters`) layouts.
- `ModelConfig.layer_is_moe(index)`: whether decoder layer `index` is an MoE layer (Qwen MoE:
  `decoder_sparse_step` / `mlp_only_layers` leave some layers dense).
- `ModelConfig.rope_inv_freq()`: per-pair RoPE inverse frequencies with scaling applied.
- `ModelConfig.kv_bytes_per_token_per_layer(dtype)`, `ModelConfig.activation_bytes_per_token(dtype)`.
- `parse_dtype(name)`: "float32" / "bfloat16" / "float16" (and "fp16"-style aliases) -> torch.dtype.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# model_type -> (qkv_bias, qk_norm)
SUPPORTED_MODEL_TYPES: dict[str, tuple[bool, bool]] = {
    "llama": (False, False),
    "mistral": (False, False),
    "qwen2": (True, False),
    "qwen3": (False, True),
    "mixtral": (False, False),
    "qwen2_moe": (True, False),
    "qwen3_moe": (False, True),
}
MOE_MODEL_TYPES = frozenset({"mixtral", "qwen2_moe", "qwen3_moe"})
_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture is not one potluck can run."""


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """A dtype name ("float32", "torch.bfloat16", "fp16", ...) -> torch.dtype."""
    if isinstance(name, torch.dtype):
        return name
    key = str(name).removeprefix("torch.").lower()
    if key not in _DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; use float32, bfloat16 or float16")
    return _DTYPES[key]


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. kind: "linear" (positions / factor) or "llama3" (per-band)."""

    kind: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    model_type: str  # llama | mistral | qwen2 | qwen3 | mixtral | qwen2_moe | qwen3_moe
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2: biases on q/k/v projections
    qk_norm: bool  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    torch_dtype: str  # checkpoint dtype name, e.g. "bfloat16"
    hidden_act: str = "silu"
    # MoE (0 experts: a dense model). Routing: softmax over all experts' logits, top-k, and with
    # norm_topk_prob the k weights renormalised to sum to 1 (Mixtral always: that equals a softmax
    # over the top-k logits).
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0  # each routed expert's SwiGLU width
    norm_topk_prob: bool = False
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE: one always-on expert, sigmoid-gated
    decoder_sparse_step: int = 1  # Qwen MoE: layer i is MoE when (i + 1) % step == 0 ...
    mlp_only_layers: tuple[int, ...] = ()  # ... and i is not listed here

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def layer_is_moe(self, index: int) -> bool:
        """Decoder layer `index` routes to experts (else it has one dense SwiGLU MLP)."""
        if not self.is_moe or index in self.mlp_only_layers:
            return False
        return (index + 1) % self.decoder_sparse_step == 0

    @property
    def num_layers(self) -> int:
        return self.num_hidden_layers

    @property
    def dtype(self) -> torch.dtype:
        return parse_dtype(self.torch_dtype)

    @classmethod
    def from_hf(cls, model_dir: str | Path) -> ModelConfig:
        """Read `config.json` (+ `generation_config.json`) of a Hugging Face model directory."""
        model_dir = Path(model_dir)
        raw = json.loads((model_dir / "config.json").read_text())
        gen_path = model_dir / "generation_config.json"
        gen = json.loads(gen_path.read_text()) if gen_path.exists() else {}
        return cls.from_dict(raw, gen)

    @classmethod
    def from_path(cls, path: str | Path) -> ModelConfig:
        """A Hugging Face model directory or a GGUF file (the first part of a split one)."""
        if str(path).endswith(".gguf"):
            from workers.gguf_file import open_gguf

            return cls.from_dict(*open_gguf(str(Path(path).resolve())).hf_config())
        return cls.from_hf(path)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], generation: dict[str, Any] | None = None) -> ModelConfig:
        generation = generation or {}
        model_type = _model_type(raw)
        qkv_bias, qk_norm = SUPPORTED_MODEL_TYPES[model_type]
        if raw.get("attention_bias"):  # Llama variants may set it explicitly
            qkv_bias = True
        act = raw.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise UnsupportedModelError(f"hidden_act {act!r} is not supported (only silu)")
        if raw.get("mlp_bias"):
            raise UnsupportedModelError("mlp_bias=True is not supported")

        hidden = int(raw["hidden_size"])
        heads = int(raw["num_attention_heads"])
        kv_heads = int(raw.get("num_key_value_heads") or heads)
        head_dim = int(raw.get("head_dim") or hidden // heads)
        if heads % kv_heads:
            raise UnsupportedModelError(f"num_attention_heads {heads} not a multiple of {kv_heads}")

        rope = dict(raw.get("rope_parameters") or {})
        legacy = raw.get("rope_scaling") or {}
        rope = {**legacy, **rope}
        theta = float(rope.get("rope_theta", raw.get("rope_theta", 10000.0)))
        max_pos = int(raw.get("max_position_embeddings", 2048))

        eos = _ids(generation.get("eos_token_id")) + _ids(raw.get("eos_token_id"))
        bos = generation.get("bos_token_id", raw.get("bos_token_id"))
        if isinstance(bos, list):
            bos = bos[0] if bos else None
        dtype = raw.get("dtype") or raw.get("torch_dtype") or "float32"
        return cls(
            model_type=model_type,
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_hidden_layers=int(raw["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=_rope_scaling(rope, max_pos),
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            qk_norm=qk_norm,
            bos_token_id=None if bos is None else int(bos),
            eos_token_ids=tuple(dict.fromkeys(eos)),
            torch_dtype=str(parse_dtype(dtype)).removeprefix("torch."),
            hidden_act=act,
            **_moe_fields(model_type, raw),
        )

    def rope_inv_freq(self) -> torch.Tensor:
        """float32 [head_dim // 2]: angle per position of each rotary pair, scaling applied."""
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64).float() / self.head_dim
        inv_freq = 1.0 / (self.rope_theta**exponents)
        scaling = self.rope_scaling
        if scaling is None:
            return inv_freq
        if scaling.kind == "linear":
            return inv_freq / scaling.factor
        # llama3: keep high frequencies, divide low ones by factor, interpolate in between.
        old_len = scaling.original_max_position_embeddings
        low_wavelen = old_len / scaling.low_freq_factor
        high_wavelen = old_len / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
        smooth = (old_len / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)

    def kv_bytes_per_token_per_layer(self, dtype: str | torch.dtype) -> int:
        """K and V bytes one token occupies in one layer's cache."""
        itemsize = parse_dtype(dtype).itemsize
        return 2 * self.num_key_value_heads * self.head_dim * itemsize

    def activation_bytes_per_token(self, dtype: str | torch.dtype) -> int:
        """Bytes of one token's hidden state sent between stages."""
        return self.hidden_size * parse_dtype(dtype).itemsize


def _model_type(raw: dict[str, Any]) -> str:
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        for arch in raw.get("architectures") or ():
            if arch in _ARCHITECTURES:
                model_type = _ARCHITECTURES[arch]
                break
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"unsupported model: model_type={raw.get('model_type')!r}, "
            f"architectures={raw.get('architectures')!r}; supported model types: "
            f"{', '.join(sorted(SUPPORTED_MODEL_TYPES))} ({', '.join(sorted(_ARCHITECTURES))})"
        )
    return model_type


def _moe_fields(model_type: str, raw: dict[str, Any]) -> dict[str, Any]:
    """The MoE fields of a config (none for a dense family)."""
    if model_type not in MOE_MODEL_TYPES:
        return {}
    # Qwen configs say num_experts (transformers 5 saves num_local_experts, Mixtral's name)
    num_experts = int(raw.get("num_experts") or raw.get("num_local_experts") or 0)
    top_k = int(raw.get("num_experts_per_tok") or 0)
    if not 0 < top_k <= num_experts:
        raise UnsupportedModelError(
            f"{model_type}: num_experts_per_tok={top_k} must be in 1..num_experts={num_experts}"
        )
    if model_type == "mixtral":  # every layer is MoE; experts have the model's intermediate_size
        return {
            "num_experts": num_experts,
            "num_experts_per_tok": top_k,
            "moe_intermediate_size": int(raw["intermediate_size"]),
            "norm_topk_prob": True,
        }
    step = int(raw.get("decoder_sparse_step") or 1)
    return {
        "num_experts": num_experts,
        "num_experts_per_tok": top_k,
        "moe_intermediate_size": int(raw["moe_intermediate_size"]),
        "norm_topk_prob": bool(raw.get("norm_topk_prob", False)),
        "shared_expert_intermediate_size": int(raw.get("shared_expert_intermediate_size") or 0)
        if model_type == "qwen2_moe"
        else 0,
        "decoder_sparse_step": max(1, step),
        "mlp_only_layers": tuple(int(i) for i in raw.get("mlp_only_layers") or ()),
    }


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)]


def _rope_scaling(rope: dict[str, Any], max_pos: int) -> RopeScaling | None:
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind == "default":
        return None
    factor = float(rope.get("factor", 1.0))
    if kind == "linear":
        return RopeScaling("linear", factor)
    if kind == "llama3":
        return RopeScaling(
            "llama3",
            factor,
            low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(
                rope.get("original_max_position_embeddings", max_pos)
            ),
        )
    raise UnsupportedModelError(
        f"rope scaling type {kind!r} is not supported (supported: default, linear, llama3)"
    )
