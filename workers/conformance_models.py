"""Tiny checkpoints and transformers' answers on them, for the backend conformance suite.

Parts:
- `FAMILIES`: every family potluck runs (llama, mistral, qwen2, qwen3) and its config overrides.
- `tiny_checkpoint(root, family, dtype)`: a random-weight safetensors checkpoint (4 layers, hidden
  64, GQA 4/2 heads, vocab 256; norms and biases perturbed so their wiring is tested), built once
  per (root, family, dtype) with `transformers`, which the suite needs (the `test` extra).
- `tiny_gguf(root, family, quant)`: that checkpoint written as a GGUF (F32, Q8_0, Q4_0, with the
  `gguf` package, as llama.cpp's converter lays it out), and beside it a safetensors checkpoint of
  the weights the GGUF holds (dequantized), transformers' reference for a backend reading it.
- `Reference`: transformers' float32 logits of a prompt at every position, and its greedy tokens.

The conformance suite (workers/conformance.py) compares a backend's outputs against these.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

FAMILIES: dict[str, dict] = {
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "qwen3": {"head_dim": 32},
}
TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 256,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "initializer_range": 0.2,  # peaky logits: greedy comparisons do not hinge on near-ties
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def tiny_checkpoint(root: str | Path, family: str, dtype: str = "float32") -> Path:
    """The tiny `family` checkpoint under `root` (built on first use)."""
    path = Path(root) / f"{family}-{dtype}"
    if (path / "config.json").is_file():
        return path
    import torch
    import transformers

    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }[family]
    torch.manual_seed(0)
    model = model_cls(config_cls(**{**TINY, **FAMILIES[family]})).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                param.add_(torch.randn_like(param) * 0.1)
    model.to(getattr(torch, dtype)).save_pretrained(path, safe_serialization=True)
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2]}))
    return path


def tiny_gguf(root: str | Path, family: str, quant: str) -> tuple[Path, Path]:
    """(the GGUF of the tiny `family` checkpoint in `quant`, a checkpoint of its weights dequantized)."""
    import gguf
    from safetensors.numpy import load_file, save_file

    from workers.gguf_file import LLAMA_PERMUTED, gguf_name, unpermute_rows

    source = tiny_checkpoint(root, family)
    path, dequantized_dir = Path(root) / f"{family}-{quant}.gguf", Path(root) / f"{family}-{quant}-dequantized"
    if path.is_file() and (dequantized_dir / "config.json").is_file():
        return path, dequantized_dir
    config = json.loads((source / "config.json").read_text())
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    rope = config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    writer = gguf.GGUFWriter(str(path), config["model_type"])
    for add, value in (
        (writer.add_block_count, config["num_hidden_layers"]), (writer.add_context_length, config["max_position_embeddings"]),
        (writer.add_embedding_length, config["hidden_size"]), (writer.add_feed_forward_length, config["intermediate_size"]),
        (writer.add_head_count, heads), (writer.add_head_count_kv, kv_heads), (writer.add_key_length, head_dim),
        (writer.add_value_length, head_dim), (writer.add_layer_norm_rms_eps, config["rms_norm_eps"]),
        (writer.add_rope_freq_base, rope), (writer.add_vocab_size, config["vocab_size"]),
    ):  # fmt: skip
        add(value)
    dequantized = {}
    for name, array in load_file(str(source / "model.safetensors")).items():
        array = array.astype(np.float32)
        qtype = gguf.GGMLQuantizationType[quant]
        if array.ndim == 2 and quant != "F32":  # rows quantize independently: permuting commutes
            array = gguf.quants.dequantize(gguf.quants.quantize(array, qtype), qtype).reshape(array.shape)
        dequantized[name] = array
        stored = array
        if config["model_type"] in LLAMA_PERMUTED and ("q_proj" in name or "k_proj" in name):
            order = unpermute_rows(array.shape[0], heads if "q_proj" in name else kv_heads)
            stored = np.empty_like(array)
            stored[order] = array  # llama.cpp's q/k row permutation
        if array.ndim == 1 or quant == "F32":
            writer.add_tensor(gguf_name(name), np.ascontiguousarray(stored))
        else:
            writer.add_tensor(gguf_name(name), gguf.quants.quantize(stored, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    dequantized_dir.mkdir(parents=True, exist_ok=True)
    save_file(dequantized, str(dequantized_dir / "model.safetensors"), metadata={"format": "pt"})
    for name in ("config.json", "generation_config.json"):
        (dequantized_dir / name).write_text((source / name).read_text())
    return path, dequantized_dir


@dataclass(frozen=True)
class Reference:
    logits: np.ndarray  # float32 [len(prompt), vocab]: the next-token logits at every position
    greedy: tuple[int, ...]  # greedy continuation of the prompt


@cache
def reference(model_dir: Path, prompt: tuple[int, ...], new_tokens: int) -> Reference:
    """transformers' float32 answers for `prompt` on the checkpoint at `model_dir`."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        logits = model(ids).logits[0].float().numpy()
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
            eos_token_id=None, pad_token_id=0,
        )  # fmt: skip
    return Reference(logits, tuple(out[0, len(prompt) :].tolist()))
