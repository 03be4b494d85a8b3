"""GGUF model files (llama.cpp's format), read with the `gguf` package: header only, then byte ranges.

Parts:
- `is_gguf(path)`: whether a model path names a `.gguf` file.
- `gguf_parts(path)`: the files of a model: one `.gguf`, or every part of a split GGUF
  (`name-00001-of-00003.gguf`: any part may be named, all parts are found beside it).
- `GGUFTensorInfo`: one tensor's HF-style name, GGUF name, type, shape [out, in] and byte range.
- `GGUFModel`: the parsed headers of all parts (`gguf.GGUFReader`, which maps the files but reads
  only the header): `metadata` (key -> value), `tensors` (HF name -> info), `hf_config()` (the
  metadata as a Hugging Face `config.json` dict for `ModelConfig.from_dict`), `layer_sizes()`
  (the real quantized bytes per layer, from the header), and `read_tensor_bytes(info)` which copies
  exactly one tensor's byte range out of a memory map and records `(file, start, end)` in
  `bytes_read` (tests assert a stage read only its own tensors).
- `open_gguf(path)`: a `GGUFModel` parsed once per process and path.
- `hf_name(gguf_name)` / `gguf_name(hf_name)`: the tensor-name mapping. Per-expert MoE tensors
  (`blk.N.ffn_*_exps`) map to `model.layers.N.mlp.experts.*_proj.weight` stacked [experts, out, in];
  each expert's 2-D slice takes the same quantized kernel as a dense weight.
- `load_gguf_stage_tensors(model, start_layer, end_layer, ...)`: one stage's tensors, HF-named:
  dense ones as tensors, quantized ones as `QuantizedRows` (file bytes; a quantized expert stack
  as a list of one per expert); an unsupported type is an error naming the tensor before anything is read.
- MoE metadata (`expert_count`, ...) becomes the config's MoE fields; llama.cpp's `qwen3moe`,
  `qwen2moe` and `llama` with experts (Mixtral) name the families; `layer_sizes` reports each
  layer's expert bytes apart.
- `LLAMA_PERMUTED`: architectures whose q/k rows llama.cpp's converter permuted (undone at load).
"""

from __future__ import annotations

import functools
import mmap
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from workers.checkpoint import CheckpointSizes, stage_tensor_names
from workers.model_config import UnsupportedModelError
from workers.quantized_linear import (
    DENSE_GGUF_TYPES,
    SUPPORTED_GGUF_TYPES,
    QuantizedRows,
    UnsupportedQuantizationError,
)

# llama.cpp architecture (with `expert_count`) -> model_type
_MOE_ARCHITECTURES = {"qwen3moe": "qwen3_moe", "qwen2moe": "qwen2_moe", "llama": "mixtral"}
_SPLIT_RE = re.compile(r"^(?P<stem>.*)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$")
LLAMA_PERMUTED = ("llama", "mistral")

# GGUF per-layer suffix -> HF per-layer suffix
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.experts.gate_proj",
    "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",  # Qwen2-MoE's shared expert and its gate
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_GGUF_LAYER_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def is_gguf(path: str | Path) -> bool:
    return str(path).endswith(".gguf") and Path(path).is_file()


def gguf_parts(path: str | Path) -> list[Path]:
    """All files of the model `path` names, in order (one unless it is a split GGUF)."""
    path = Path(path)
    match = _SPLIT_RE.match(path.name)
    if not match:
        return [path]
    count = int(match.group("count"))
    parts = [path.with_name(f"{match.group('stem')}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"split GGUF {path.name}: missing part(s) {', '.join(missing)}")
    return parts


def hf_name(name: str) -> str | None:
    """GGUF tensor name -> Hugging Face name (None: a tensor potluck does not use)."""
    match = _GGUF_LAYER_RE.match(name)
    if match:
        suffix = _LAYER_NAMES.get(match.group(2))
        return None if suffix is None else f"model.layers.{match.group(1)}.{suffix}.{match.group(3)}"
    stem, _, kind = name.rpartition(".")
    return f"{_GLOBAL_NAMES[stem]}.{kind}" if stem in _GLOBAL_NAMES else None


def gguf_name(name: str) -> str:
    """Hugging Face tensor name -> GGUF name (the inverse of `hf_name`)."""
    match = _HF_LAYER_RE.match(name)
    if match:
        reverse = {v: k for k, v in _LAYER_NAMES.items()}
        return f"blk.{match.group(1)}.{reverse[match.group(2)]}.{match.group(3)}"
    stem, _, kind = name.rpartition(".")
    reverse = {v: k for k, v in _GLOBAL_NAMES.items()}
    return f"{reverse[stem]}.{kind}"


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str  # Hugging Face name
    gguf_name: str
    type_name: str  # GGMLQuantizationType name: F32, Q4_K, ...
    shape: tuple[int, ...]  # torch order: [out, in] ([experts, out, in] for stacked experts)
    path: Path
    start_byte: int  # absolute offset in `path`
    num_bytes: int

    @property
    def quant_type(self) -> gguf.GGMLQuantizationType:
        return gguf.GGMLQuantizationType[self.type_name]


class GGUFModel:
    """The headers of a GGUF model (all parts of a split one); tensors are read one range at a time."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.parts = gguf_parts(self.path)
        self.bytes_read: list[tuple[str, int, int]] = []  # (file, start, end) of every range copied
        self.metadata: dict[str, Any] = {}
        self.tensors: dict[str, GGUFTensorInfo] = {}
        for index, part in enumerate(self.parts):
            reader = gguf.GGUFReader(part)
            if index == 0:
                self.metadata = {
                    key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")
                }
            for tensor in reader.tensors:
                name = hf_name(tensor.name)
                if name is None:
                    continue
                self.tensors[name] = GGUFTensorInfo(
                    name=name,
                    gguf_name=tensor.name,
                    type_name=tensor.tensor_type.name,
                    shape=tuple(int(d) for d in reversed(tensor.shape.tolist())),
                    path=part,
                    start_byte=int(tensor.data_offset),
                    num_bytes=int(tensor.n_bytes),
                )
            del reader

    @cached_property
    def architecture(self) -> str:
        return str(self.metadata["general.architecture"])

    def _arch(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(f"{self.architecture}.{key}", default)

    def hf_config(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(config.json-style dict, generation_config-style dict) from the metadata."""
        heads = int(self._arch("attention.head_count"))
        hidden = int(self._arch("embedding_length"))
        vocab = self._arch("vocab_size") or len(self.metadata.get("tokenizer.ggml.tokens", ()))
        config: dict[str, Any] = {
            "model_type": self.architecture,
            "vocab_size": int(vocab),
            "hidden_size": hidden,
            "intermediate_size": int(self._arch("feed_forward_length")),
            "num_hidden_layers": int(self._arch("block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(self._arch("attention.head_count_kv", heads)),
            "head_dim": int(self._arch("attention.key_length", hidden // heads)),
            "rms_norm_eps": float(self._arch("attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_theta": float(self._arch("rope.freq_base", 10000.0)),
            "max_position_embeddings": int(self._arch("context_length", 2048)),
            "tie_word_embeddings": "lm_head.weight" not in self.tensors,
            "attention_bias": "model.layers.0.self_attn.q_proj.bias" in self.tensors,
            "dtype": "float32",  # transformers dequantizes a GGUF to float32; so do the norms here
        }
        config.update(self._moe_config())
        scaling = self._arch("rope.scaling.type")
        if scaling and scaling != "none":
            config["rope_scaling"] = {
                "rope_type": scaling,
                "factor": float(self._arch("rope.scaling.factor", 1.0)),
                "original_max_position_embeddings": int(
                    self._arch("rope.scaling.original_context_length", config["max_position_embeddings"])
                ),
            }
        generation: dict[str, Any] = {}
        if "tokenizer.ggml.eos_token_id" in self.metadata:
            eos = [int(self.metadata["tokenizer.ggml.eos_token_id"])]
            if "tokenizer.ggml.eot_token_id" in self.metadata:
                eos.append(int(self.metadata["tokenizer.ggml.eot_token_id"]))
            generation["eos_token_id"] = eos
        if "tokenizer.ggml.bos_token_id" in self.metadata:
            generation["bos_token_id"] = int(self.metadata["tokenizer.ggml.bos_token_id"])
        return config, generation

    def _moe_config(self) -> dict[str, Any]:
        """The MoE fields of the config ({} for a dense model), from llama.cpp's keys: `expert_count`,
        `expert_used_count`, `expert_feed_forward_length` (Qwen MoE; Mixtral's experts are
        `feed_forward_length` wide), `expert_shared_feed_forward_length` (Qwen2-MoE). The top-k
        weights are renormalised as llama.cpp does for each family (`expert_weights_norm` where
        the file says). Layers without a router (`ffn_gate_inp`) are dense: `mlp_only_layers`."""
        if not self._arch("expert_count"):
            return {}
        family = _MOE_ARCHITECTURES.get(self.architecture)
        if family is None:
            raise UnsupportedModelError(
                f"GGUF architecture {self.architecture!r} with experts is not supported "
                f"(MoE GGUFs: {', '.join(sorted(_MOE_ARCHITECTURES))})"
            )
        num_layers = int(self._arch("block_count"))
        routed = {int(n.split(".")[2]) for n in self.tensors if n.endswith(".mlp.gate.weight")}
        config: dict[str, Any] = {
            "model_type": family,
            "num_experts": int(self._arch("expert_count")),
            "num_experts_per_tok": int(self._arch("expert_used_count")),
            "norm_topk_prob": bool(self._arch("expert_weights_norm", family != "qwen2_moe")),
            "mlp_only_layers": [i for i in range(num_layers) if i not in routed],
        }
        if self._arch("expert_feed_forward_length"):
            config["moe_intermediate_size"] = int(self._arch("expert_feed_forward_length"))
        if self._arch("expert_shared_feed_forward_length"):
            config["shared_expert_intermediate_size"] = int(self._arch("expert_shared_feed_forward_length"))
        return config

    def layer_sizes(self) -> CheckpointSizes:
        """Bytes per decoder layer, embeddings, final norm and LM head as stored in the file."""
        num_layers = int(self._arch("block_count"))
        layers = [0] * num_layers
        experts = [0] * num_layers  # the routed experts' share (ffn_*_exps) of each layer
        embed = norm = head = 0
        for name, info in self.tensors.items():
            match = _HF_LAYER_RE.match(name)
            if match:
                layers[int(match.group(1))] += info.num_bytes
                if match.group(2).startswith("mlp.experts."):
                    experts[int(match.group(1))] += info.num_bytes
            elif name.startswith("model.embed_tokens."):
                embed += info.num_bytes
            elif name.startswith("model.norm."):
                norm += info.num_bytes
            elif name.startswith("lm_head."):
                head += info.num_bytes
        tied = head == 0
        return CheckpointSizes(tuple(layers), embed, norm, embed if tied else head, tied, tuple(experts))

    def read_tensor_bytes(self, info: GGUFTensorInfo) -> np.ndarray:
        """One tensor's bytes (a private uint8 copy) from a memory map of its file."""
        with open(info.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            view = np.frombuffer(mapped, dtype=np.uint8, count=info.num_bytes, offset=info.start_byte)
            data = view.copy()
            del view
        self.bytes_read.append((str(info.path), info.start_byte, info.start_byte + info.num_bytes))
        return data

    def permuted_heads(self, name: str) -> int | None:
        """For llama-family q/k weights: the head count llama.cpp permuted their rows by (else None)."""
        if self.architecture not in LLAMA_PERMUTED:
            return None
        if name.endswith("self_attn.q_proj.weight") or name.endswith("self_attn.q_proj.bias"):
            return int(self._arch("attention.head_count"))
        if name.endswith("self_attn.k_proj.weight") or name.endswith("self_attn.k_proj.bias"):
            heads = int(self._arch("attention.head_count"))
            return int(self._arch("attention.head_count_kv", heads))
        return None


@functools.lru_cache(maxsize=4)
def open_gguf(path: str | Path) -> GGUFModel:
    """The parsed headers of `path`, once per process (a worker reads them for its config and
    again for its tensors; `gguf.GGUFReader` parses every metadata array, tokens included)."""
    return GGUFModel(path)


def unpermute_rows(num_rows: int, num_heads: int) -> np.ndarray:
    """Row order that undoes llama.cpp's q/k permutation: new row i is stored row order[i]."""
    rows = np.arange(num_rows)
    half = num_rows // num_heads // 2
    return rows.reshape(num_heads, half, 2).swapaxes(1, 2).reshape(num_rows)


def load_gguf_stage_tensors(
    model: GGUFModel,
    start_layer: int,
    end_layer: int,
    num_layers: int,
    tie_word_embeddings: bool,
    dtype: torch.dtype,
) -> dict[str, torch.Tensor | QuantizedRows | list[QuantizedRows]]:
    """Read only stage [start_layer, end_layer)'s tensors (HF names, as `load_stage_tensors`).

    F32 / F16 / BF16 tensors come back as `dtype` tensors; quantized ones as `QuantizedRows`
    (their file bytes: an embedding table stays so, a linear weight's codes are read and packed
    for the kernel when its layer is built); a quantized stack of experts [E, out, in] as one
    `QuantizedRows` per expert (views of the one byte range read), which workers/moe.py packs
    expert by expert. llama.cpp's q/k row permutation is undone here. Every type
    is checked before anything is read: an unsupported one is an error naming the tensor.
    """
    names = stage_tensor_names(set(model.tensors), start_layer, end_layer, num_layers, tie_word_embeddings)
    for name in names:
        info = model.tensors[name]
        if info.type_name not in DENSE_GGUF_TYPES + SUPPORTED_GGUF_TYPES:
            raise UnsupportedQuantizationError(
                f"tensor {info.gguf_name} ({name}) has GGUF type {info.type_name}, which potluck cannot "
                f"run (supported: {', '.join(DENSE_GGUF_TYPES + SUPPORTED_GGUF_TYPES)})"
            )
    tensors: dict[str, torch.Tensor | QuantizedRows | list[QuantizedRows]] = {}
    for name in names:
        info = model.tensors[name]
        raw = model.read_tensor_bytes(info)
        heads = model.permuted_heads(name)
        order = None if heads is None else torch.from_numpy(unpermute_rows(info.shape[0], heads))
        if info.type_name in DENSE_GGUF_TYPES:
            array = gguf.quants.dequantize(raw.view(_NUMPY_DTYPES[info.type_name]), info.quant_type)
            tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).view(info.shape).to(dtype)
            tensors[name] = tensor if order is None else tensor[order].contiguous()
        elif len(info.shape) == 3:  # stacked experts [E, out, in]: each expert's rows are contiguous
            experts = raw.reshape(info.shape[0], -1)
            tensors[name] = [
                QuantizedRows(experts[e], info.type_name, info.shape[1:], f"{info.gguf_name}[{e}]")
                for e in range(info.shape[0])
            ]
        else:  # kept as file bytes; a linear weight's codes are read when its layer is built
            if len(info.shape) != 2:
                raise UnsupportedQuantizationError(f"tensor {info.gguf_name}: {len(info.shape)}-D quantized weights")
            tensors[name] = QuantizedRows(raw, info.type_name, info.shape, info.gguf_name, order)
        del raw
    return tensors


_NUMPY_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint8}
