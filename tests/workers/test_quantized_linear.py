"""Quantized weights: codes read from GGUF blocks reproduce `gguf.quants.dequantize` exactly; the
int4-plane kernel multiplies within bfloat16 rounding (relative 2^-7 allowed; ~2^-8 expected); the
C block kernel multiplies the file's blocks as float32 (relative 1e-5: only the order of float32
sums differs from a float32 matmul on the dequantized weight)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

import workers.quantized_linear as ql
from workers.native_kernel import native_kernel
from workers.quantized_linear import (
    SUPPORTED_GGUF_TYPES,
    QuantizedLinear,
    QuantizedRows,
    codes_from_gguf,
    quantize_weight,
)

_FP16_FIELDS = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [-2]}


def random_blocks(type_name: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random bytes for every block, with the float16 scale fields set to small finite values."""
    rng = np.random.default_rng(seed)
    qtype = gguf.GGMLQuantizationType[type_name]
    elems, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, cols // elems, nbytes), dtype=np.uint8)
    for at in _FP16_FIELDS[type_name]:
        at = at % nbytes
        values = (rng.random((rows, cols // elems)) * 0.02 + 0.001).astype(np.float16)
        raw[:, :, at : at + 2] = values.view(np.uint8).reshape(rows, cols // elems, 2)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("type_name", SUPPORTED_GGUF_TYPES)
def test_codes_and_kernel_match_gguf_dequantize(type_name):
    raw = random_blocks(type_name, 48, 512)
    reference = torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[type_name]))
    codes = codes_from_gguf(raw, type_name, (48, 512))
    assert torch.equal(codes.dequantize(), reference.float())
    if type_name in ql._DIRECT:  # the direct block reader agrees with the dequantize-based one
        direct = ql._DIRECT.pop(type_name)
        try:
            assert torch.equal(codes_from_gguf(raw, type_name, (48, 512)).dequantize(), reference.float())
        finally:
            ql._DIRECT[type_name] = direct
    x = torch.randn(5, 512)
    expected = x @ reference.float().t()
    got = QuantizedLinear(codes)(x)
    assert float((got - expected).abs().max() / expected.abs().max()) < 2**-7


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_weight_runs_as_its_dequantized_weights(bits):
    weight = torch.randn(40, 256)  # 40 rows: padded to a multiple of 16 inside
    codes = quantize_weight(weight, bits)
    assert float((codes.dequantize() - weight).abs().max()) < (0.6 if bits == 4 else 0.04)
    x = torch.randn(3, 256)
    expected = x.bfloat16().float() @ codes.dequantize().t()
    assert float((QuantizedLinear(codes)(x) - expected).abs().max() / expected.abs().max()) < 2**-7


def test_fused_parts_of_different_types_run_as_one_linear():
    a = codes_from_gguf(random_blocks("Q4_K", 32, 256), "Q4_K", (32, 256))
    b = codes_from_gguf(random_blocks("Q6_K", 16, 256, seed=1), "Q6_K", (16, 256))
    dense = torch.randn(16, 256)
    fused = QuantizedLinear([a, b, dense])
    x = torch.randn(2, 256)
    expected = x @ torch.cat([a.dequantize(), b.dequantize(), dense]).t()
    assert fused.out_features == 64
    assert float((fused(x) - expected).abs().max() / expected.abs().max()) < 2**-7


def test_packing_by_row_ranges_equals_packing_at_once(monkeypatch):
    codes = quantize_weight(torch.randn(200, 64), 8)  # 200 rows: 64-row ranges and a padded tail
    whole = QuantizedLinear(codes)
    monkeypatch.setattr(ql, "_PACK_ROWS", 64)
    ranged = QuantizedLinear(codes)
    for (p1, s1), (p2, s2) in zip(whole.segments[0][1], ranged.segments[0][1]):
        assert torch.equal(p1, p2) and torch.equal(s1, s2)


needs_native = pytest.mark.skipif(native_kernel() is None, reason="the C block kernel could not be built here")


def _dequantized(raw: np.ndarray, type_name: str, shape: tuple[int, int]) -> torch.Tensor:
    flat = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[type_name])
    return torch.from_numpy(np.ascontiguousarray(flat, dtype=np.float32)).view(shape)


@needs_native
@pytest.mark.parametrize("type_name", SUPPORTED_GGUF_TYPES)
@pytest.mark.parametrize("rows", [1, 3, 16, 17])
def test_block_kernel_is_a_float32_matmul_on_the_file_blocks(type_name, rows):
    raw = random_blocks(type_name, 40, 512)
    linear = QuantizedLinear(QuantizedRows(raw, type_name, (40, 512)))
    assert linear.segments[0][0] == "blocks" and linear.weight_bytes == raw.nbytes  # the file's bytes, no more
    x = torch.randn(rows, 512)
    expected = x @ _dequantized(raw, type_name, (40, 512)).t()
    assert float((linear(x) - expected).abs().max() / expected.abs().max()) < 1e-5


@needs_native
def test_block_kernel_fuses_types_and_takes_rows_in_model_order():
    a, b = random_blocks("Q4_K", 32, 256), random_blocks("Q6_K", 16, 256, seed=1)
    order = torch.randperm(32)
    dense = torch.randn(16, 256)
    fused = QuantizedLinear([QuantizedRows(a, "Q4_K", (32, 256), order=order), QuantizedRows(b, "Q6_K", (16, 256)), dense])
    assert [kind for kind, _, _ in fused.segments] == ["blocks", "blocks", "dense"]
    x = torch.randn(2, 256)
    expected = x @ torch.cat([_dequantized(a, "Q4_K", (32, 256))[order], _dequantized(b, "Q6_K", (16, 256)), dense]).t()
    assert float((fused(x) - expected).abs().max() / expected.abs().max()) < 1e-5


@needs_native
@pytest.mark.parametrize("type_name", SUPPORTED_GGUF_TYPES)
def test_embedding_rows_dequantized_by_the_kernel_equal_gguf(type_name):
    raw = random_blocks(type_name, 20, 256)
    table = QuantizedRows(raw, type_name, (20, 256))
    ids = torch.tensor([3, 0, 19, 3])
    assert torch.equal(table.lookup(ids, torch.float32), _dequantized(raw, type_name, (20, 256))[ids])


def test_without_the_c_kernel_gguf_rows_run_as_int4_planes(monkeypatch):
    raw = random_blocks("Q5_K", 32, 256)
    monkeypatch.setattr(ql, "native_kernel", lambda: None)
    linear = QuantizedLinear(QuantizedRows(raw, "Q5_K", (32, 256)))
    assert linear.segments[0][0] == "planes"
    x = torch.randn(2, 256)
    expected = x @ _dequantized(raw, "Q5_K", (32, 256)).t()
    assert float((linear(x) - expected).abs().max() / expected.abs().max()) < 2**-7
    ids = torch.tensor([1, 31])
    assert torch.equal(QuantizedRows(raw, "Q5_K", (32, 256)).lookup(ids, torch.float32), _dequantized(raw, "Q5_K", (32, 256))[ids])
