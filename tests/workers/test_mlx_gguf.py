"""GGUF files on the MLX backend: the block types mapped onto MLX's affine quantization exactly,
stages equal to transformers on the same file, to the torch backend, and mixed torch -> mlx.

Tolerances: the MLX stage computes in float32 on exactly the weights `gguf.quants.dequantize`
gives (the mapping is exact), so its logits are within float32 rounding of transformers' (which
dequantizes the GGUF to float32): atol 1e-3 (measured <= 3e-5) and the same greedy tokens, for
every type. The torch backend runs quantized weights on bfloat16 activations (see
tests/workers/test_gguf_stages.py: 8% of the largest logit), so against torch (and a torch -> mlx
pipeline) logits agree within that and greedy tokens wherever the reference's top two logits are
further apart than twice torch's measured deviation at that step.
"""

from __future__ import annotations

import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers

mx = pytest.importorskip("mlx.core")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gguf_checkpoints import write_gguf  # noqa: E402

from workers.backend import SequenceChunk, StageConfig, load_backend  # noqa: E402
from workers.gguf_file import open_gguf  # noqa: E402
from workers.mlx_gguf import MLX_GGUF_BITS, mlx_quantized, pack_codes  # noqa: E402
from workers.quantized_linear import codes_from_gguf  # noqa: E402

PROMPT = [5, 17, 99, 3, 250, 42, 7, 300]
NEW_TOKENS = 6
SIZES = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=3)  # Q4_K needs 256 inputs
QUANTS = ["F32", "Q8_0", "Q4_0", "Q4_K"]
MLX_ATOL = 1e-3
# byte offsets of each type's float16 fields in a block (d, and m / dmin where there is one)
_HALF_FIELDS = {"Q4_0": (0,), "Q5_0": (0,), "Q8_0": (0,), "Q4_1": (0, 2), "Q5_1": (0, 2), "Q4_K": (0, 2), "Q5_K": (0, 2)}


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_packed_codes_are_what_mlx_dequantizes(bits):
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 2**bits, size=(8, 256)).astype(np.uint8)
    scales = rng.random((8, 8)).astype(np.float32) + 0.1
    biases = rng.standard_normal((8, 8)).astype(np.float32)
    w = mx.dequantize(mx.array(pack_codes(codes, bits)), mx.array(scales), mx.array(biases), group_size=32, bits=bits)
    expected = (codes.reshape(8, 8, 32) * scales[..., None] + biases[..., None]).reshape(8, 256)
    np.testing.assert_array_equal(np.array(w), expected)


@pytest.mark.parametrize("type_name", sorted(MLX_GGUF_BITS))
def test_gguf_blocks_map_onto_mlx_exactly(type_name):
    """Random blocks (every code pattern, sane float16 scales): MLX's weights == gguf's, bit for bit."""
    qtype = gguf.GGMLQuantizationType[type_name]
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    rows, inputs = 16, 512
    rng = np.random.default_rng(len(type_name))
    raw = rng.integers(0, 256, size=(rows * inputs // block_elems, block_bytes), dtype=np.uint8)
    for at in _HALF_FIELDS[type_name]:
        halves = (rng.random(raw.shape[0]) * 0.02 + 0.001).astype(np.float16)
        raw[:, at : at + 2] = halves.view(np.uint8).reshape(-1, 2)
    expected = gguf.quants.dequantize(raw.reshape(rows, -1), qtype).reshape(rows, inputs)
    weight = mlx_quantized(codes_from_gguf(raw.reshape(-1), type_name, (rows, inputs)), mx.float32)
    assert weight.bits == MLX_GGUF_BITS[type_name] and weight.group_size == 32
    np.testing.assert_array_equal(np.array(weight.dequantize_rows(mx.arange(rows), mx.float32)), expected)
    x = rng.standard_normal((3, inputs)).astype(np.float32)
    y = mx.quantized_matmul(mx.array(x), weight.q, weight.scales, weight.biases, transpose=True, group_size=32, bits=weight.bits)
    np.testing.assert_allclose(np.array(y), x @ expected.T, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def gguf_files(checkpoint_factory, tmp_path_factory) -> dict[tuple[str, str], Path]:
    out = {}
    for family in ("llama", "qwen3"):
        model_dir = checkpoint_factory(family, tie_word_embeddings=False, **SIZES)
        folder = tmp_path_factory.mktemp(f"mlx-gguf-{family}")
        for quant in QUANTS:
            out[family, quant] = write_gguf(model_dir, folder / f"{family}-{quant}.gguf", quant)
    return out


def _reference(path: Path) -> tuple[list[int], np.ndarray]:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False)
        logits = model(generated).logits[0].numpy()
    return generated[0, len(PROMPT) :].tolist(), logits


def _stages(path: Path, bounds, backends) -> list:
    return [load_backend(StageConfig(str(path), a, b, kv_budget_bytes=2**20), name) for (a, b), name in zip(bounds, backends)]


def _teacher_forced(chain, expected: list[int]) -> np.ndarray:
    """Last-token logits [NEW_TOKENS, vocab] at the prompt's end and after each reference token."""
    rows, position, inputs = [], 0, PROMPT
    for step in range(NEW_TOKENS):
        x = np.array(inputs, np.int64)
        for stage in chain:
            x = stage.forward([SequenceChunk("r", position, len(inputs))], x)
        rows.append(x[0])
        position += len(inputs)
        inputs = [expected[step]]
    return np.stack(rows)


def _free_run(chain) -> list[int]:
    tokens, position, inputs = [], 0, PROMPT
    while len(tokens) < NEW_TOKENS:
        x = np.array(inputs, np.int64)
        for stage in chain:
            x = stage.forward([SequenceChunk("g", position, len(inputs))], x)
        tokens.append(int(np.argmax(x[0])))
        position += len(inputs)
        inputs = tokens[-1:]
    return tokens


def _check(family: str, quant: str, gguf_files) -> None:
    path = gguf_files[family, quant]
    expected, ref_logits = _reference(path)
    positions = [len(PROMPT) - 1 + i for i in range(NEW_TOKENS)]
    reference = ref_logits[positions]
    torch_atol = 1e-4 if quant == "F32" else 0.08 * float(np.abs(ref_logits).max())
    model = open_gguf(str(path.resolve()))
    for bounds in ([(0, 3)], [(0, 1), (1, 3)], [(0, 1), (1, 2), (2, 3)]):
        chain = _stages(path, bounds, ["mlx"] * len(bounds))
        for stage, (a, b) in zip(chain, bounds):  # each stage read exactly its own tensors' bytes
            wanted = {
                (str(i.path), i.start_byte, i.start_byte + i.num_bytes)
                for n, i in model.tensors.items()
                if (n.startswith("model.layers.") and a <= int(n.split(".")[2]) < b)
                or (a == 0 and n.startswith("model.embed_tokens."))
                or (b == 3 and (n.startswith("model.norm.") or n.startswith("lm_head.")))
            }
            assert set(stage.gguf_bytes_read) == wanted and len(stage.gguf_bytes_read) == len(wanted)
        logits = _teacher_forced(chain, expected)
        diff = float(np.abs(logits - reference).max())
        assert diff <= MLX_ATOL, f"{family} {quant} {bounds}: mlx logits off transformers' by {diff:.2e}"
        assert _free_run(chain) == expected, f"{family} {quant} {bounds}: greedy tokens"
    mlx_logits = logits
    gaps = np.sort(reference, axis=1)[:, -1] - np.sort(reference, axis=1)[:, -2]
    for backends in (["torch"], ["torch", "mlx"]):  # the torch backend alone, and torch -> mlx
        bounds = [(0, 3)] if len(backends) == 1 else [(0, 1), (1, 3)]
        other = _teacher_forced(_stages(path, bounds, backends), expected)
        diff = float(np.abs(other - reference).max())
        assert diff <= torch_atol, f"{family} {quant} {backends}: logits off by {diff:.3f} (> {torch_atol:.3f})"
        # where torch's logits are within e of the reference's and its top two are more than 2e
        # apart, torch's greedy token is the reference's, which the mlx stage must give too
        clear = gaps > 2 * np.abs(other - reference).max(axis=1) if quant != "F32" else np.ones(NEW_TOKENS, bool)
        assert clear.any(), f"{family} {quant} {backends}: every step is a near-tie"
        same = other.argmax(1)[clear] == mlx_logits.argmax(1)[clear]
        assert same.all(), f"{family} {quant} {backends}: greedy tokens differ from the mlx stage's"


def test_mlx_gguf_q4_k_matches_transformers_and_torch(gguf_files):
    _check("llama", "Q4_K", gguf_files)


@pytest.mark.slow
@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_mlx_gguf_stages_match_transformers_and_torch(gguf_files, family, quant):
    if (family, quant) != ("llama", "Q4_K"):  # that one is the fast lane's
        _check(family, quant, gguf_files)


def test_mlx_refuses_quantization_of_a_gguf(gguf_files):
    path = gguf_files["llama", "Q4_0"]
    with pytest.raises(ValueError, match="already quantized"):
        load_backend(StageConfig(str(path), 0, 3, quantization="int8"), "mlx")


def test_mlx_last_stage_returns_all_logits_when_asked(gguf_files):
    """A chunk with `all_logits` (echo / prompt logprobs) gets a row per token; others their last."""
    path = gguf_files["llama", "Q4_K"]
    _, ref_logits = _reference(path)
    first, last = _stages(path, [(0, 1), (1, 3)], ["mlx", "mlx"])
    chunks = [SequenceChunk("a", 0, len(PROMPT), all_logits=True), SequenceChunk("b", 0, 3)]
    ids = np.array(PROMPT + PROMPT[:3], np.int64)
    logits = last.forward(chunks, first.forward(chunks, ids))
    assert logits.shape == (len(PROMPT) + 1, last.vocab_size) and logits.dtype == np.float32
    assert float(np.abs(logits[: len(PROMPT)] - ref_logits[: len(PROMPT)]).max()) <= MLX_ATOL
    assert float(np.abs(logits[-1] - ref_logits[2]).max()) <= MLX_ATOL
