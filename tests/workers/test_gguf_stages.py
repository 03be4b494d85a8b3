"""GGUF files written with the `gguf` package run on 1, 2 and 3 stages as transformers runs them.

Tolerances (`_atol`), from the quant type and the kernel that runs it: F32 files run dense in
float32 (atol 1e-4, as the safetensors tests). Quantized types run by the C block kernel
(workers/native_kernel.py) are exact: float32 activations times the blocks' float32 values, the
same numbers transformers multiplies after dequantizing; the kernel sums each 32-weight group
before scaling it (d * sum(x * code)), a different float32 order than F32's, measured up to
1.02e-4 on these logits (|logit| <= ~5), so atol 3e-4, and every greedy token must match. Where that kernel cannot be built, quantized weights run through the int4 kernel on bfloat16 activations with float32 accumulation: each
matmul's input is rounded to bfloat16 (relative 2^-9) and its output too (2^-9), so a linear
layer's relative error is ~2^-8; through a few layers, with the residual stream in float32, we
allow 8% of the largest reference logit (measured up to 6.6%, llama Q4_K: these random-weight
models amplify; with the same weights dequantized to float32 the stage is within 0.3%) and require the same greedy token wherever the
reference's top two logits are further apart than twice that (on these random-weight models
near-ties occur; F32 must match every token). Decoding is teacher-forced with the reference's tokens.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gguf_checkpoints import write_gguf  # noqa: E402

from workers.backend import SequenceChunk, StageConfig  # noqa: E402
from workers.gguf_file import open_gguf  # noqa: E402
from workers.model_facts import read_model_facts  # noqa: E402
from workers.native_kernel import native_kernel  # noqa: E402
from workers.quantized_linear import UnsupportedQuantizationError, codes_from_gguf  # noqa: E402
from workers.torch_backend import TorchStageBackend  # noqa: E402

PROMPT = [5, 17, 99, 3, 250, 42, 7, 300]
NEW_TOKENS = 6
SIZES = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=3)  # Q4_K needs 256 inputs
QUANTS = ["F32", "Q8_0", "Q4_0", "Q4_K"]


@pytest.fixture(scope="module")
def gguf_files(checkpoint_factory, tmp_path_factory) -> dict[tuple[str, str], Path]:
    out = {}
    for family in ("llama", "qwen3"):
        model_dir = checkpoint_factory(family, tie_word_embeddings=False, **SIZES)
        folder = tmp_path_factory.mktemp(f"gguf-{family}")
        for quant in QUANTS:
            out[family, quant] = write_gguf(model_dir, folder / f"{family}-{quant}.gguf", quant)
    return out


def _reference(path: Path) -> tuple[list[int], torch.Tensor]:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False)
        logits = model(generated).logits[0]
    return generated[0, len(PROMPT) :].tolist(), logits


def _atol(quant: str, ref_logits: torch.Tensor) -> tuple[float, bool]:
    """(absolute logit tolerance, whether every greedy token must match) for `quant` here."""
    if quant == "F32":
        return 1e-4, True
    if native_kernel() is not None:  # exact values, float32 sums in another order
        return 3e-4, True
    return 0.08 * float(ref_logits.abs().max()), False


@pytest.mark.slow
@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_gguf_stages_match_transformers(gguf_files, family, quant):
    path = gguf_files[family, quant]
    expected, ref_logits = _reference(path)
    atol, exact = _atol(quant, ref_logits)
    for bounds in ([(0, 3)], [(0, 1), (1, 3)], [(0, 1), (1, 2), (2, 3)]):
        chain = [TorchStageBackend(StageConfig(str(path), a, b, kv_budget_bytes=2**20)) for a, b in bounds]
        model = open_gguf(str(path.resolve()))
        for backend, (a, b) in zip(chain, bounds):  # each stage read exactly its own tensors' bytes
            wanted = {
                (str(i.path), i.start_byte, i.start_byte + i.num_bytes)
                for n, i in model.tensors.items()
                if (n.startswith("model.layers.") and a <= int(n.split(".")[2]) < b)
                or (a == 0 and n.startswith("model.embed_tokens."))
                or (b == 3 and (n.startswith("model.norm.") or n.startswith("lm_head.")))
            }
            assert set(backend.gguf_bytes_read) == wanted and len(backend.gguf_bytes_read) == len(wanted)
        tokens, position, inputs = [], 0, PROMPT
        while len(tokens) < NEW_TOKENS:
            x = torch.tensor(inputs)
            for backend in chain:
                x = backend.forward([SequenceChunk("r", position, len(inputs))], x)
            position += len(inputs)
            torch.testing.assert_close(x[0], ref_logits[position - 1], atol=atol, rtol=0, msg=lambda m: f"{bounds} position {position}: {m}")
            top2 = ref_logits[position - 1].topk(2).values
            # greedy equality wherever the reference's choice is not within the tolerance of a tie
            if exact or float(top2[0] - top2[1]) > 2 * atol:
                assert int(x[0].argmax()) == expected[len(tokens)], (bounds, position)
            tokens.append(int(x[0].argmax()))
            inputs = [expected[len(tokens) - 1]]  # teacher-forced: the reference's token
        if exact:
            assert tokens == expected, (bounds, quant)


def test_gguf_layer_bytes_are_the_files(gguf_files):
    path = gguf_files["llama", "Q4_0"]
    facts = read_model_facts(path)
    model = open_gguf(str(path.resolve()))
    layer0 = sum(i.num_bytes for n, i in model.tensors.items() if n.startswith("model.layers.0."))
    assert facts.layer_bytes[0] == layer0
    f32 = read_model_facts(gguf_files["llama", "F32"])
    assert 5.5 < f32.layer_bytes[0] / facts.layer_bytes[0] < 7.5  # 32 bits vs 4.5


def test_unsupported_type_names_the_tensor():
    with pytest.raises(UnsupportedQuantizationError, match="blk.0.ffn_up.weight.*Q2_K"):
        codes_from_gguf(np.zeros(84, dtype=np.uint8), "Q2_K", (1, 256), "blk.0.ffn_up.weight")


@pytest.mark.slow
def test_split_gguf_reads_like_one_file(checkpoint_factory, tmp_path):
    model_dir = checkpoint_factory("llama", tie_word_embeddings=False, **SIZES)
    whole = write_gguf(model_dir, tmp_path / "whole.gguf", "Q8_0")
    first = write_gguf(model_dir, tmp_path / "split.gguf", "Q8_0", split_max_tensors=10)
    assert first.name.startswith("split-00001-of-0000") and first.name != "split-00001-of-00001.gguf"
    assert read_model_facts(first).layer_bytes == read_model_facts(whole).layer_bytes
    outputs = []
    for path in (whole, first):
        chain = [TorchStageBackend(StageConfig(str(path), a, b, kv_budget_bytes=2**20)) for a, b in [(0, 2), (2, 3)]]
        x = torch.tensor(PROMPT)
        for backend in chain:
            x = backend.forward([SequenceChunk("r", 0, len(PROMPT))], x)
        outputs.append(x)
    read_files = {Path(f).name for backend in chain for f, _, _ in backend.gguf_bytes_read}
    assert len(read_files) > 1  # the tensors came from several parts
    assert torch.equal(outputs[0], outputs[1])
