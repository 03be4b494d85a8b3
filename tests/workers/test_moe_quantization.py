"""`--quantization int8|int4` on MoE safetensors (Qwen3-MoE, Mixtral): each expert's projections
are quantized while loading and run as per-expert `QuantizedLinear`s, grouped by expert; 1-3
stages run as transformers runs the same weights quantized and dequantized.

Tolerance as tests/workers/test_quantization.py (~2^-8 relative per linear layer from bfloat16
activations, 8% of the largest reference logit), on checkpoints that route every token to all 4
experts with initializer_range 0.1: top-k routing is discontinuous, and a near tie flipped by
that error would move a layer's output by a whole expert (tests/workers/test_gguf_moe.py).
"""

from __future__ import annotations

import pytest
import torch
import transformers

from tests.workers.test_quantization import _dequantized_copy
from workers.backend import SequenceChunk, StageConfig
from workers.torch_backend import TorchStageBackend

PROMPT = [5, 17, 99, 3, 250, 42, 7, 300]
NEW_TOKENS = 4
CHECKPOINTS = {  # hidden 64, experts of 32 (Qwen3-MoE) / 128 (Mixtral) inputs: groups of 32
    "qwen3_moe": dict(num_hidden_layers=3, num_experts=4, num_experts_per_tok=4, mlp_only_layers=[], initializer_range=0.1, seed=31),
    "mixtral": dict(num_hidden_layers=3, num_experts_per_tok=4, initializer_range=0.1, seed=32),
}


@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["int8", "int4"])
@pytest.mark.parametrize("family", list(CHECKPOINTS))
def test_quantized_moe_stages_match_transformers_on_dequantized_weights(checkpoint_factory, tmp_path, family, quantization):
    model_dir = checkpoint_factory(family, **CHECKPOINTS[family])
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        _dequantized_copy(model_dir, tmp_path / "dequantized", quantization), dtype=torch.float32
    ).eval()
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        generated = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False)
        ref_logits = reference(generated).logits[0]
    expected = generated[0, len(PROMPT) :].tolist()
    atol = 0.08 * float(ref_logits.abs().max())
    for bounds in ([(0, 3)], [(0, 1), (1, 3)], [(0, 1), (1, 2), (2, 3)]):
        chain = [
            TorchStageBackend(StageConfig(str(model_dir), a, b, kv_budget_bytes=2**20, quantization=quantization))
            for a, b in bounds
        ]
        blocks = [layer.moe for backend in chain for layer in backend.model.layers]
        assert all(block is not None and len(block.linears) == 4 for block in blocks)
        held = sum(w.weight_bytes for block in blocks for w in block.quantized_linears)
        experts = sum(4 * p.numel() for n, p in reference.named_parameters() if ".experts." in n)
        assert 0 < held < 0.5 * experts  # experts held quantized (int8 ~1.25 B, int4 ~0.63 B a weight, float32 4 B)
        position, inputs = 0, PROMPT
        for step in range(NEW_TOKENS):
            x = torch.tensor(inputs)
            for backend in chain:
                x = backend.forward([SequenceChunk("r", position, len(inputs))], x)
            position += len(inputs)
            torch.testing.assert_close(x[0], ref_logits[position - 1], atol=atol, rtol=0, msg=lambda m: f"{bounds} {step}: {m}")
            top2 = ref_logits[position - 1].topk(2).values
            if float(top2[0] - top2[1]) > 2 * atol:
                assert int(x[0].argmax()) == expected[step], (bounds, step)
            inputs = [expected[step]]  # teacher-forced: the reference's token
