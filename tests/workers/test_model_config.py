"""ModelConfig.from_hf normalises Llama / Mistral / Qwen2 / Qwen3 configs and rejects the rest."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers

from workers.model_config import ModelConfig, RopeScaling, UnsupportedModelError

BASE = {
    "model_type": "llama",
    "vocab_size": 100,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
}


def test_tiny_checkpoints_normalised(tiny_checkpoints):
    llama = ModelConfig.from_hf(tiny_checkpoints["llama"])
    assert (llama.model_type, llama.num_key_value_heads, llama.head_dim) == ("llama", 2, 16)
    assert llama.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 16)
    assert not llama.qkv_bias and not llama.qk_norm and not llama.tie_word_embeddings
    qwen2 = ModelConfig.from_hf(tiny_checkpoints["qwen2"])
    assert qwen2.qkv_bias and qwen2.tie_word_embeddings and qwen2.rope_scaling is None
    qwen3 = ModelConfig.from_hf(tiny_checkpoints["qwen3"])
    assert qwen3.qk_norm and qwen3.head_dim == 32 and qwen3.num_hidden_layers == 5
    tok = json.loads((tiny_checkpoints["llama"] / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in tok["added_tokens"]}
    assert llama.eos_token_ids == (ids["</s>"], ids["<|im_end|>"])  # generation_config + config
    assert llama.bos_token_id == ids["<s>"] and llama.torch_dtype == "float32"


def test_legacy_and_v5_rope_layouts_agree():
    legacy = ModelConfig.from_dict(
        {**BASE, "rope_theta": 500000.0, "rope_scaling": {"type": "linear", "factor": 4.0}}
    )
    v5 = ModelConfig.from_dict(
        {**BASE, "rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 500000.0}}
    )
    assert legacy == v5 and legacy.rope_scaling == RopeScaling("linear", 4.0)
    plain = ModelConfig.from_dict({**BASE, "rope_theta": 500000.0})
    torch.testing.assert_close(v5.rope_inv_freq(), plain.rope_inv_freq() / 4.0)


def test_llama3_inv_freq_bands():
    cfg = ModelConfig.from_dict(
        {
            **BASE,
            "rope_parameters": {
                "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0,
            },
        }
    )
    base = ModelConfig.from_dict(BASE).rope_inv_freq()
    scaled = cfg.rope_inv_freq()
    wavelen = 2 * math.pi / base
    assert torch.equal(scaled[wavelen < 16], base[wavelen < 16])  # high frequencies untouched
    torch.testing.assert_close(scaled[wavelen > 64], base[wavelen > 64] / 8.0)  # low: / factor
    medium = (wavelen >= 16) & (wavelen <= 64)
    assert medium.any() and (scaled[medium] < base[medium]).all() and (scaled[medium] > base[medium] / 8).all()


def test_eos_int_or_list_and_dtype_keys():
    cfg = ModelConfig.from_dict({**BASE, "eos_token_id": [7, 9], "torch_dtype": "bfloat16"}, {"eos_token_id": 9})
    assert cfg.eos_token_ids == (9, 7) and cfg.dtype == torch.bfloat16
    cfg = ModelConfig.from_dict({**BASE, "eos_token_id": 3, "dtype": "float16", "head_dim": 32})
    assert cfg.eos_token_ids == (3,) and cfg.torch_dtype == "float16" and cfg.head_dim == 32
    assert cfg.num_key_value_heads == 4  # defaults to num_attention_heads


def test_mistral_from_transformers_config(tmp_path):
    transformers.MistralConfig(**{k: v for k, v in BASE.items() if k != "model_type"}, num_key_value_heads=2).save_pretrained(tmp_path)
    cfg = ModelConfig.from_hf(tmp_path)
    assert cfg.model_type == "mistral" and cfg.num_key_value_heads == 2 and cfg.head_dim == 16


def test_byte_sizes():
    cfg = ModelConfig.from_dict({**BASE, "num_key_value_heads": 2})
    assert cfg.kv_bytes_per_token_per_layer("float32") == 2 * 2 * 16 * 4
    assert cfg.kv_bytes_per_token_per_layer(torch.bfloat16) == 2 * 2 * 16 * 2
    assert cfg.activation_bytes_per_token("float16") == 64 * 2


@pytest.mark.parametrize(
    "raw",
    [
        {**BASE, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]},
        {**BASE, "model_type": "deepseek_v3"},
    ],
)
def test_unsupported_architecture_is_named(raw):
    with pytest.raises(UnsupportedModelError) as err:
        ModelConfig.from_dict(raw)
    message = str(err.value)
    assert raw["model_type"] in message
    for supported in ("llama", "mistral", "qwen2", "qwen3"):
        assert supported in message


def test_unsupported_rope_type():
    with pytest.raises(UnsupportedModelError, match="yarn"):
        ModelConfig.from_dict({**BASE, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}})


def test_backend_rejects_unsupported_checkpoint(tmp_path):
    from workers.backend import StageConfig, load_backend

    (tmp_path / "config.json").write_text(json.dumps({**BASE, "model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"]}))
    with pytest.raises(UnsupportedModelError, match="gpt_neox.*supported model types: llama, mistral, mixtral, qwen2, qwen2_moe, qwen3, qwen3_moe"):
        load_backend(StageConfig(str(tmp_path), 0, 1))
