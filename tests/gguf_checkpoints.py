"""GGUF files written from tiny Hugging Face checkpoints with the `gguf` package (as llama.cpp's
converter would: llama q/k rows permuted, names mapped, the tokenizer's vocabulary and merges).

Parts:
- `write_gguf(model_dir, path, quant)`: F32 / Q8_0 / Q4_0 / ... through `gguf.quants.quantize`;
  Q4_K, which `gguf.quants` cannot write, through `quantize_q4_k` (blocks built here with the
  package's block sizes; `gguf.quants.dequantize` reads them back).
"""

from __future__ import annotations

import json
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


def write_gguf(model_dir: Path, path: Path, quant: str, split_max_tensors: int = 0) -> Path:
    """Write `model_dir` as a GGUF at `path`; with `split_max_tensors`, as a split GGUF whose
    parts gguf names `<stem>-0000i-of-0000N.gguf` (the first part's path is returned)."""
    config = json.loads((model_dir / "config.json").read_text())
    arch = config["model_type"]
    tensors = load_file(str(model_dir / "model.safetensors"))
    writer = gguf.GGUFWriter(str(path), arch, split_max_tensors=split_max_tensors)
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
        if array.ndim == 1 or quant == "F32":
            writer.add_tensor(gguf_name(name), array)
        elif quant == "Q4_K":
            writer.add_tensor(gguf_name(name), quantize_q4_k(array), raw_dtype=gguf.GGMLQuantizationType.Q4_K)
        else:
            qtype = gguf.GGMLQuantizationType[quant]
            writer.add_tensor(gguf_name(name), gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if split_max_tensors:
        return sorted(path.parent.glob(f"{path.stem}-00001-of-*.gguf"))[0]
    return path
