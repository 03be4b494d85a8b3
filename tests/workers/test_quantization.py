"""`--quantization int8|int4`: 1-3 stages quantizing their own layers while loading run as
transformers runs the same weights quantized and dequantized.

Tolerance: the kernel reproduces the dequantized weights exactly (bfloat16-chosen scales and
zeros); only the activations are rounded to bfloat16 inside each matmul (~2^-8 relative per
linear layer), so logits within 8% of the largest reference logit, and the greedy token equal
wherever the reference's top two are further apart than twice that.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from workers.backend import SequenceChunk, StageConfig
from workers.model_facts import read_model_facts
from workers.quantization import is_quantized_weight, quantization_bits
from workers.quantized_linear import QuantizedLinear, quantize_weight
from workers.torch_backend import TorchStageBackend

PROMPT = [5, 17, 99, 3, 250, 42, 7, 300]
NEW_TOKENS = 5
SIZES = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3)


def _dequantized_copy(model_dir: Path, target: Path, quantization: str) -> Path:
    shutil.copytree(model_dir, target)
    tensors = load_file(str(model_dir / "model.safetensors"))
    bits = quantization_bits(quantization)
    for name, tensor in tensors.items():
        if is_quantized_weight(name):
            tensors[name] = quantize_weight(tensor, bits).dequantize().to(tensor.dtype)
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["int8", "int4"])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_quantized_stages_match_transformers_on_dequantized_weights(checkpoint_factory, tmp_path, family, quantization):
    model_dir = checkpoint_factory(family, **SIZES)
    reference_dir = _dequantized_copy(model_dir, tmp_path / "dequantized", quantization)
    model = transformers.AutoModelForCausalLM.from_pretrained(reference_dir, dtype=torch.float32).eval()
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False)
        ref_logits = model(generated).logits[0]
    expected = generated[0, len(PROMPT) :].tolist()
    atol = 0.08 * float(ref_logits.abs().max())
    for bounds in ([(0, 3)], [(0, 1), (1, 3)], [(0, 1), (1, 2), (2, 3)]):
        chain = [
            TorchStageBackend(StageConfig(str(model_dir), a, b, kv_budget_bytes=2**20, quantization=quantization))
            for a, b in bounds
        ]
        assert all(isinstance(layer.w_gate_up, QuantizedLinear) for b in chain for layer in b.model.layers)
        position, inputs = 0, PROMPT
        for step in range(NEW_TOKENS):
            x = torch.tensor(inputs)
            for backend in chain:
                x = backend.forward([SequenceChunk("r", position, len(inputs))], x)
            position += len(inputs)
            torch.testing.assert_close(x[0], ref_logits[position - 1], atol=atol, rtol=0)
            top2 = ref_logits[position - 1].topk(2).values
            if float(top2[0] - top2[1]) > 2 * atol:
                assert int(x[0].argmax()) == expected[step], (bounds, step)
            inputs = [expected[step]]  # teacher-forced: the reference's token


def test_quantized_layer_bytes(checkpoint_factory):
    model_dir = checkpoint_factory("llama", **SIZES)
    full = read_model_facts(model_dir)
    int8 = read_model_facts(model_dir, quantization="int8")
    int4 = read_model_facts(model_dir, quantization="int4")
    assert full.layer_bytes[0] > int8.layer_bytes[0] > int4.layer_bytes[0]
    linear = 2 * 128 * 128 + 2 * 64 * 128 + 3 * 128 * 256  # q, o; k, v (2 KV heads of 32); gate, up, down
    assert int4.layer_bytes[0] == pytest.approx(linear * 0.625 + 2 * 128 * 4, rel=0.01)
    assert int8.layer_bytes[0] == pytest.approx(linear * 1.25 + 2 * 128 * 4, rel=0.01)
