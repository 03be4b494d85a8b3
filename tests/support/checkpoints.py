"""Tiny (or not so tiny) random-weight Hugging Face checkpoints, built on the spot.

Parts:
- `FAMILIES`: the families `make_checkpoint` can build (llama, mistral, qwen2, qwen3, and the MoE
  families qwen3_moe, qwen2_moe, mixtral).
- `MOE_DEFAULTS`: per MoE family, tiny expert settings (4-8 experts, top-2) merged under overrides.
- `TINY_DEFAULTS`: the small default sizes (hidden 64, 4 heads, 2 KV heads, 4 layers, vocab 384).
- `make_tokenizer(path, vocab_size)`: a byte-level BPE trained on a few paragraphs, padded with
  extra tokens to exactly `vocab_size`; writes `tokenizer.json` + `tokenizer_config.json`
  (bos `<s>`, eos `</s>`, `<|im_start|>` / `<|im_end|>`, a simple chat template).
- `make_checkpoint(path, family, **overrides) -> Path`: config + random weights (float32 unless
  `dtype=` says otherwise) saved with `save_pretrained(safe_serialization=True)`, plus the tokenizer
  and a `generation_config.json` whose eos list is [`</s>`, `<|im_end|>`]. Overrides are config
  fields, plus `seed`, `max_shard_size` (e.g. "200KB" for a sharded checkpoint) and `dtype`.
- `llama_100m(path)`: the ~100M-parameter Llama used by the demo and benchmarks.

Deterministic: the same arguments give the same weights and the same tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TINY_DEFAULTS: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 384,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6,
    "initializer_range": 0.2,  # peaky logits: greedy comparisons do not hinge on near-ties
}
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "qwen2_moe", "mixtral")
MOE_DEFAULTS: dict[str, dict[str, Any]] = {
    # layer 0 dense (mlp_only_layers), the rest MoE; 8 experts of width 32, top-2, renormalised
    "qwen3_moe": {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                  "decoder_sparse_step": 1, "mlp_only_layers": [0], "norm_topk_prob": True},
    # every other layer MoE (decoder_sparse_step 2), a shared expert, weights not renormalised
    "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                  "shared_expert_intermediate_size": 48, "decoder_sparse_step": 2, "norm_topk_prob": False},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
}  # fmt: skip
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = """\
Potluck pools mismatched machines into one inference cluster. Every worker loads a contiguous
range of layers, runs them, and streams hidden states to the next worker in the pipeline.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs!
How vexingly quick daft zebras jump; the five boxing wizards jump quickly.
In the beginning the tokenizer learned bytes, then pairs of bytes, then whole words that
appeared often: the, and, of, to, in, is, that, it, was, for, on, are, as, with, his, they.
Numbers too: 0 1 2 3 4 5 6 7 8 9 10 42 100 1000 3.14159 2024-01-01 12:30.
Hello, world! Hello again, world. What is the capital of France? Paris is the capital.
def add(a, b):\n    return a + b\n\nclass Worker:\n    pass\n
Unicode matters: cafe, naive, resume, jalapeno, and emoji-free text keeps the vocab small.
A request arrives, the scheduler places it, the first stage embeds the prompt, the last stage
samples a token, and the ring closes so that the next decode step can begin at once.
"""


def make_tokenizer(path: str | Path, vocab_size: int, model_max_length: int = 512) -> Path:
    """Train a byte-level BPE of exactly `vocab_size` tokens; write tokenizer files into `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    min_size = 256 + len(SPECIAL_TOKENS)
    if vocab_size < min_size:
        raise ValueError(f"vocab_size must be >= {min_size} (bytes + special tokens)")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([CORPUS] * 4, trainer=trainer)
    missing = vocab_size - tokenizer.get_vocab_size()
    if missing > 0:
        tokenizer.add_tokens([f"<|extra_{i}|>" for i in range(missing)])
    assert tokenizer.get_vocab_size() == vocab_size, (tokenizer.get_vocab_size(), vocab_size)
    tokenizer.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "pad_token": "</s>",
                "add_bos_token": False,
                "model_max_length": model_max_length,
                "chat_template": CHAT_TEMPLATE,
            },
            indent=2,
        )
    )
    return path


def make_checkpoint(path: str | Path, family: str, **overrides: Any) -> Path:
    """Build and save a random-weight `family` checkpoint (+ tokenizer) into `path`."""
    import torch
    import transformers

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")
    path = Path(path)
    seed = int(overrides.pop("seed", 0))
    max_shard_size = overrides.pop("max_shard_size", None)
    dtype = getattr(torch, str(overrides.pop("dtype", "float32")))
    fields = {**TINY_DEFAULTS, **MOE_DEFAULTS.get(family, {}), **overrides}
    vocab_size = int(fields["vocab_size"])
    make_tokenizer(path, vocab_size, model_max_length=int(fields["max_position_embeddings"]))
    tok = json.loads((path / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in tok["added_tokens"]}
    fields.setdefault("bos_token_id", ids["<s>"])
    fields.setdefault("eos_token_id", ids["</s>"])
    fields.setdefault("pad_token_id", ids["</s>"])
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM),
        "qwen2_moe": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM),
        "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM),
    }[family]
    config = config_cls(**fields)
    torch.manual_seed(seed)
    model = model_cls(config).to(dtype).eval()
    with torch.no_grad():  # norms init to 1 and biases to 0: perturb so their wiring is tested
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                param.add_(torch.randn_like(param) * 0.1)
    kwargs: dict[str, Any] = {"safe_serialization": True}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(path, **kwargs)
    generation = {"bos_token_id": ids["<s>"], "eos_token_id": [ids["</s>"], ids["<|im_end|>"]]}
    (path / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return path


def llama_100m(path: str | Path, **overrides: Any) -> Path:
    """A ~100M-parameter float32 Llama (hidden 768, 12 layers, vocab 16384, untied)."""
    fields = {
        "hidden_size": 768,
        "intermediate_size": 2048,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "num_key_value_heads": 4,
        "vocab_size": 16384,
        "max_position_embeddings": 2048,
        "initializer_range": 0.02,
        **overrides,
    }
    return make_checkpoint(path, "llama", **fields)
