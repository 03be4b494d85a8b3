"""Tiny checkpoints and transformers' answers on them, for the backend conformance suite.

Parts:
- `FAMILIES`: every family potluck runs (llama, mistral, qwen2, qwen3) and its config overrides.
- `tiny_checkpoint(root, family, dtype)`: a random-weight safetensors checkpoint (4 layers, hidden
  64, GQA 4/2 heads, vocab 256; norms and biases perturbed so their wiring is tested), built once
  per (root, family, dtype) with `transformers`, which the suite needs (the `test` extra).
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
