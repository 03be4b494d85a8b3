"""GGUF files written from tiny Hugging Face checkpoints with the `gguf` package (as llama.cpp's
converter would: llama q/k rows permuted, names mapped, the tokenizer's vocabulary and merges).

Parts:
- `write_gguf(model_dir, path, quant)`: F32 / Q8_0 / Q4_0 / ... through `gguf.quants.quantize`;
  Q4_K, which `gguf.quants` cannot write, through `quantize_q4_k` (blocks built here with the
  package's block sizes; `gguf.quants.dequantize` reads them back).
- `dequantized_checkpoint(gguf_path, model_dir, out_dir)`: a GGUF dequantized back into a
  safetensors checkpoint (the reference for Mixtral GGUFs, which transformers cannot load).
- MoE checkpoints as llama.cpp's converter writes them: each layer's experts stacked into one
  [experts, out, in] tensor per projection (`blk.N.ffn_{gate,up,down}_exps`), the router
  (`ffn_gate_inp`) kept F32 as llama-quantize keeps it, Qwen2-MoE's shared expert as
  `ffn_*_shexp`; Qwen3-MoE as architecture `qwen3moe`, Qwen2-MoE as `qwen2moe` and Mixtral as
  `llama` with `expert_count` (q/k rows permuted like Llama's).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import load_file

from workers.gguf_file import LLAMA_PERMUTED, gguf_name, unpermute_rows


def quantize_q4_k(weight: np.ndarray) -> np.ndarray:
    """[out, in] float32 (in a multiple of 256) -> Q4_K blocks [out, in / 256 * 144] uint8."""
    out, inn = weight.shape
    sub = weight.reshape(-1, 8, 32)  # super-blocks of 8 sub-blocks of 32
    low = np.minimum(sub.min(-1), 0)
    scale = (sub.max(-1) - low) / 15
    d = (scale.max(-1) / 63).astype(np.float16)
    dmin = (-low.min(-1) / 63).astype(np.float16)
    sc = np.clip(np.rint(scale / np.maximum(d.astype(np.float32), 1e-12)[:, None]), 0, 63).astype(np.uint8)
    mn = np.clip(np.rint(-low / np.maximum(dmin.astype(np.float32), 1e-12)[:, None]), 0, 63).astype(np.uint8)
    eff_scale = d.astype(np.float32)[:, None] * sc
    eff_min = dmin.astype(np.float32)[:, None] * mn
    q = np.clip(np.rint((sub + eff_min[..., None]) / np.maximum(eff_scale, 1e-12)[..., None]), 0, 15).astype(np.uint8)
    packed = np.zeros((sub.shape[0], 12), dtype=np.uint8)
    packed[:, 0:4] = (sc[:, 0:4] & 63) | ((sc[:, 4:8] >> 4) << 6)
    packed[:, 4:8] = (mn[:, 0:4] & 63) | ((mn[:, 4:8] >> 4) << 6)
    packed[:, 8:12] = (sc[:, 4:8] & 15) | ((mn[:, 4:8] & 15) << 4)
    pairs = q.reshape(-1, 4, 2, 32)  # chunk j: sub-blocks 2j (low nibble) and 2j+1 (high nibble)
    qs = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, 128)
    blocks = np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2), packed, qs], axis=1)
    return blocks.reshape(out, -1)


def _permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (the inverse of `unpermute_rows`)."""
    order = unpermute_rows(weight.shape[0], heads)
    result = np.empty_like(weight)
    result[order] = weight
    return result


GGUF_ARCHITECTURES = {"qwen3_moe": "qwen3moe", "qwen2_moe": "qwen2moe", "mixtral": "llama"}
_EXPERT_RE = re.compile(r"^model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight$")
_MIXTRAL_PROJ = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def _stack_experts(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-expert HF tensors -> one [experts, out, in] stack per layer and projection, HF-named as
    potluck maps `blk.N.ffn_*_exps` (`model.layers.N.mlp.experts.{gate,up,down}_proj.weight`);
    Mixtral's `block_sparse_moe.gate` becomes `mlp.gate` (`ffn_gate_inp`)."""
    stacks: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    out = {}
    for name, array in tensors.items():
        match = _EXPERT_RE.match(name)
        if match:
            proj = _MIXTRAL_PROJ.get(match.group(3), match.group(3))
            stacks.setdefault((match.group(1), proj), {})[int(match.group(2))] = array
        else:
            out[name.replace(".block_sparse_moe.gate.", ".mlp.gate.")] = array
    for (layer, proj), per_expert in stacks.items():
        out[f"model.layers.{layer}.mlp.experts.{proj}.weight"] = np.stack([per_expert[e] for e in sorted(per_expert)])
    return out


def _quantize(array: np.ndarray, quant: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """A 2-D or stacked 3-D float32 array -> its blocks (bytes per row last) and type."""
    if quant == "Q4_K":
        blocks = quantize_q4_k(array.reshape(-1, array.shape[-1]))
        return blocks.reshape(*array.shape[:-1], -1), gguf.GGMLQuantizationType.Q4_K
    qtype = gguf.GGMLQuantizationType[quant]
    return gguf.quants.quantize(array, qtype), qtype


def write_gguf(model_dir: Path, path: Path, quant: str, split_max_tensors: int = 0) -> Path:
    """Write `model_dir` as a GGUF at `path`; with `split_max_tensors`, as a split GGUF whose
    parts gguf names `<stem>-0000i-of-0000N.gguf` (the first part's path is returned)."""
    config = json.loads((model_dir / "config.json").read_text())
    arch = GGUF_ARCHITECTURES.get(config["model_type"], config["model_type"])
    tensors = _stack_experts(load_file(str(model_dir / "model.safetensors")))
    writer = gguf.GGUFWriter(str(path), arch, split_max_tensors=split_max_tensors)
    num_experts = config.get("num_experts") or config.get("num_local_experts")  # transformers 5 saves the latter
    if num_experts:
        writer.add_expert_count(num_experts)
        writer.add_expert_used_count(config["num_experts_per_tok"])
        if config.get("moe_intermediate_size"):  # Qwen MoE (Mixtral's experts are feed_forward_length wide)
            writer.add_expert_feed_forward_length(config["moe_intermediate_size"])
        if config.get("shared_expert_intermediate_size"):
            writer.add_expert_shared_feed_forward_length(config["shared_expert_intermediate_size"])
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(config.get("head_dim") or config["hidden_size"] // heads)
    writer.add_value_length(config.get("head_dim") or config["hidden_size"] // heads)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    writer.add_vocab_size(config["vocab_size"])
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = sorted({**tok["model"]["vocab"], **{t["content"]: t["id"] for t in tok["added_tokens"]}}.items(), key=lambda kv: kv[1])
    special = {t["content"] for t in tok["added_tokens"] if t["special"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([t for t, _ in vocab])
    writer.add_token_types([3 if t in special else 1 for t, _ in vocab])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])
    for name, array in tensors.items():
        array = array.astype(np.float32)
        if arch in LLAMA_PERMUTED and ("q_proj" in name or "k_proj" in name):
            array = _permute(array, heads if "q_proj" in name else kv_heads)
        router = name.endswith(".mlp.gate.weight") or name.endswith(".shared_expert_gate.weight")
        if name.endswith(".shared_expert_gate.weight"):  # llama.cpp's ffn_gate_inp_shexp is [hidden]
            array = array.reshape(-1)
        if array.ndim == 1 or quant == "F32" or router:
            writer.add_tensor(gguf_name(name), array)
        else:
            blocks, qtype = _quantize(array, quant)
            writer.add_tensor(gguf_name(name), blocks, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if split_max_tensors:
        return sorted(path.parent.glob(f"{path.stem}-00001-of-*.gguf"))[0]
    return path


def dequantized_checkpoint(gguf_path: Path, model_dir: Path, out_dir: Path) -> Path:
    """The tensors of `gguf_path` dequantized by `gguf.quants.dequantize` (as transformers does)
    and saved as a safetensors checkpoint with `model_dir`'s config and tokenizer: a reference for
    families transformers cannot load from a GGUF (Mixtral: llama.cpp's `llama` with experts).
    llama q/k rows are un-permuted and stacked experts split back into the checkpoint's names."""
    import shutil

    import torch
    from safetensors.torch import save_file

    from workers.gguf_file import hf_name

    config = json.loads((model_dir / "config.json").read_text())
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    arch = GGUF_ARCHITECTURES.get(config["model_type"], config["model_type"])
    mixtral = config["model_type"] == "mixtral"
    tensors: dict[str, torch.Tensor] = {}
    for tensor in gguf.GGUFReader(gguf_path).tensors:
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        array = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32).reshape(shape)
        name = hf_name(tensor.name)
        if arch in LLAMA_PERMUTED and (".q_proj." in name or ".k_proj." in name):
            array = array[unpermute_rows(shape[0], heads if ".q_proj." in name else kv_heads)]
        stacked = re.match(r"^(model\.layers\.\d+\.)mlp\.experts\.(\w+)_proj\.weight$", name)
        if stacked:
            for e, expert in enumerate(array):
                if mixtral:
                    proj = {"gate": "w1", "up": "w3", "down": "w2"}[stacked.group(2)]
                    key = f"{stacked.group(1)}block_sparse_moe.experts.{e}.{proj}.weight"
                else:
                    key = f"{stacked.group(1)}mlp.experts.{e}.{stacked.group(2)}_proj.weight"
                tensors[key] = torch.from_numpy(np.ascontiguousarray(expert))
            continue
        if mixtral:
            name = name.replace(".mlp.gate.", ".block_sparse_moe.gate.")
        tensors[name] = torch.from_numpy(np.ascontiguousarray(array))
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        if (model_dir / name).exists():
            shutil.copy(model_dir / name, out_dir / name)
    return out_dir
