"""Chained TorchStageBackends reproduce transformers: greedy tokens, logits, batching, chunking."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import Tokenizer

from workers import stage_model
from workers.backend import SequenceChunk, StageConfig
from workers.gemm import onednn_available
from workers.torch_backend import TorchStageBackend

FAMILIES = ("llama", "qwen2", "qwen3")
NEW_TOKENS = 8
PROMPT = "The quick brown fox jumps over the lazy dog. Hello"


def _splits(num_layers: int, num_stages: int) -> list[tuple[int, int]]:
    bounds = [round(i * num_layers / num_stages) for i in range(num_stages + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def _chain(model_dir: Path, num_stages: int, **kwargs) -> list[TorchStageBackend]:
    num_layers = transformers.AutoConfig.from_pretrained(model_dir).num_hidden_layers
    kwargs.setdefault("kv_budget_bytes", 4 * 2**20)
    return [
        TorchStageBackend(StageConfig(str(model_dir), start, end, **kwargs))
        for start, end in _splits(num_layers, num_stages)
    ]


def _step(chain: list[TorchStageBackend], chunks: list[SequenceChunk], tokens: list[int]) -> torch.Tensor:
    x = torch.tensor(tokens, dtype=torch.int64)
    for backend in chain:
        x = backend.forward(chunks, x)  # stage i's output is stage i+1's input
    return x


@pytest.fixture(scope="module")
def references(tiny_checkpoints: dict[str, Path]) -> dict[str, tuple[list[int], list[int], torch.Tensor]]:
    """family -> (prompt ids, generate()'s greedy tokens, transformers' logits at every position)."""
    out = {}
    for family, path in tiny_checkpoints.items():
        prompt = Tokenizer.from_file(str(path / "tokenizer.json")).encode(PROMPT).ids
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        ids = torch.tensor([prompt])
        with torch.no_grad():
            generated = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False
            )
            logits = model(generated).logits[0]
        out[family] = (prompt, generated[0, len(prompt) :].tolist(), logits)
    return out


@pytest.mark.parametrize("layout", ["packed", "transposed"])
@pytest.mark.parametrize("num_stages", [1, 2, 3])
@pytest.mark.parametrize("family", FAMILIES)
def test_chained_stages_match_transformers(tiny_checkpoints, references, family, num_stages, layout, monkeypatch):
    """Both weight layouts a stage may pick (oneDNN-packed or transposed for MKL) match."""
    if layout == "packed" and not onednn_available():
        pytest.skip("this torch has no oneDNN")
    monkeypatch.setattr(stage_model, "onednn_is_faster", lambda weight: layout == "packed")
    prompt, expected, ref_logits = references[family]
    chain = _chain(tiny_checkpoints[family], num_stages)
    assert all(b.model.layers[0].w_gate_up.is_mkldnn == (layout == "packed") for b in chain)
    assert chain[0].is_first and chain[-1].is_last
    assert [b.is_last for b in chain[:-1]] == [False] * (num_stages - 1)
    logits = _step(chain, [SequenceChunk("r", 0, len(prompt))], prompt)
    assert logits.dtype == torch.float32 and logits.shape == (1, chain[-1].vocab_size)
    tokens: list[int] = []
    position = len(prompt)
    while True:
        torch.testing.assert_close(logits[0], ref_logits[position - 1], atol=1e-4, rtol=0)
        tokens.append(int(logits[0].argmax()))
        if len(tokens) == len(expected):
            break
        logits = _step(chain, [SequenceChunk("r", position, 1)], [tokens[-1]])
        position += 1
    assert tokens == expected
    for backend in chain:
        backend.free("r")
        assert backend.kv_free_tokens() == backend.kv_capacity_tokens()


def _generate_alone(model_dir: Path, prompt: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    chain = _chain(model_dir, 2)
    logits = _step(chain, [SequenceChunk("solo", 0, len(prompt))], prompt)
    tokens, all_logits = [], [logits[0]]
    for step in range(steps):
        tokens.append(int(logits[0].argmax()))
        logits = _step(chain, [SequenceChunk("solo", len(prompt) + step, 1)], [tokens[-1]])
        all_logits.append(logits[0])
    return tokens, all_logits


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_batched_decode_equals_each_alone(tiny_checkpoints, family):
    path = tiny_checkpoints[family]
    prompts = [[5, 17, 99, 200, 3], list(range(40, 61)), [7, 300, 12], list(range(100, 140))]
    steps = 6
    alone = [_generate_alone(path, p, steps) for p in prompts]

    chain = _chain(path, 2, kv_block_size_tokens=4)  # many blocks per sequence: exercises gathers
    # Prefill the first three together (one varlen batch); the fourth joins mid-decode.
    first = prompts[:3]
    logits = _step(
        chain, [SequenceChunk(f"r{i}", 0, len(p)) for i, p in enumerate(first)], [t for p in first for t in p]
    )
    positions = [len(p) for p in first]
    tokens: list[list[int]] = [[] for _ in prompts]
    for i in range(3):
        torch.testing.assert_close(logits[i], alone[i][1][0], atol=1e-4, rtol=0)
        tokens[i].append(int(logits[i].argmax()))
    for step in range(steps):
        chunks = [SequenceChunk(f"r{i}", positions[i], 1) for i in range(3)]
        inputs = [tokens[i][-1] for i in range(3)]
        if step == 2:  # a prefill in the same batch as decodes
            chunks.append(SequenceChunk("r3", 0, len(prompts[3])))
            inputs += prompts[3]
        elif step > 2:
            chunks.append(SequenceChunk("r3", positions[3], 1))
            inputs.append(tokens[3][-1])
        logits = _step(chain, chunks, inputs)
        for row, chunk in enumerate(chunks):
            i = int(chunk.request_id[1:])
            k = len(tokens[i])  # index into the solo run's logits
            torch.testing.assert_close(logits[row], alone[i][1][k], atol=1e-4, rtol=0)
            if len(positions) <= i:
                positions.append(0)
            positions[i] = chunk.start_position + chunk.num_tokens
            tokens[i].append(int(logits[row].argmax()))
    for i in range(3):
        assert tokens[i][:steps] == alone[i][0][:steps]


def test_chunked_prefill_equals_one_shot(tiny_checkpoints, references):
    prompt, _, ref_logits = references["qwen2"]
    chain = _chain(tiny_checkpoints["qwen2"], 2, kv_block_size_tokens=4)
    cut = [0, 3, 9, len(prompt)]  # three chunks: a cached prefix that ends mid-block
    for start, end in zip(cut[:-1], cut[1:]):
        logits = _step(chain, [SequenceChunk("r", start, end - start)], prompt[start:end])
        torch.testing.assert_close(logits[0], ref_logits[end - 1], atol=1e-4, rtol=0)


def test_hidden_states_have_stage_dtype_and_shape(llama_checkpoint):
    first, last = _chain(llama_checkpoint, 2, dtype="bfloat16")
    hidden = first.forward([SequenceChunk("a", 0, 5), SequenceChunk("b", 0, 1)], torch.arange(6))
    assert hidden.dtype == torch.bfloat16 and hidden.shape == (6, first.hidden_size)
    logits = last.forward([SequenceChunk("a", 0, 5), SequenceChunk("b", 0, 1)], hidden)
    assert logits.dtype == torch.float32 and logits.shape == (2, last.vocab_size)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", ["sharded", "mistral"])
def test_sharded_and_mistral_checkpoints_match_transformers(request, checkpoint_factory, name):
    if name == "sharded":
        path = request.getfixturevalue("sharded_checkpoint")
    else:
        path = checkpoint_factory("mistral", num_hidden_layers=3, seed=5)
    prompt = [5, 17, 99, 200, 3, 42, 7, 11]
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(torch.tensor([prompt + [60]])).logits[0]
    chain = _chain(path, 2)
    logits = _step(chain, [SequenceChunk("r", 0, len(prompt))], prompt)
    torch.testing.assert_close(logits[0], ref[len(prompt) - 1], atol=1e-4, rtol=0)
    logits = _step(chain, [SequenceChunk("r", len(prompt), 1)], [60])
    torch.testing.assert_close(logits[0], ref[len(prompt)], atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_table_looks_up_what_a_step_would_compute(dtype):
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, 16, 2).float() / 16))
    table = stage_model.RopeTable(inv_freq, dtype, "cpu")

    def direct(positions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = torch.tensor(positions, dtype=torch.int64).to(torch.float32)[:, None] * inv_freq[None, :]
        cos, sin = freqs.cos().to(dtype)[:, None, :], freqs.sin().to(dtype)[:, None, :]
        return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)  # the layers' layout

    # one decode row, several decode rows, a prefill past the first size (the table grows), a mix
    for starts, lengths in [([5], [1]), ([3, 700, 9], [1, 1, 1]), ([250], [300]), ([0, 1000, 40], [4, 1, 30])]:
        cos, sin = table.lookup(starts, lengths)
        want_cos, want_sin = direct([p for s, n in zip(starts, lengths) for p in range(s, s + n)])
        assert torch.equal(cos, want_cos) and torch.equal(sin, want_sin)
    assert table.cos.shape[0] == 1024  # 256 doubled until it held position 1000


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_on_the_rolled_layout_is_rotate_half(dtype):
    """The layers' RoPE (q * cos + roll(q, hd / 2) * sin on the table's layout) against the
    rotate-half form transformers computes, on the heads slice a layer rotates (a strided view):
    bit-equal, in bf16 too (the same products rounded the same way; negating sin is exact)."""
    hd, heads = 16, 5
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, hd, 2).float() / hd))
    table = stage_model.RopeTable(inv_freq, dtype, "cpu")
    cos, sin = table.lookup([3, 900], [4, 1])  # [5, 1, hd]
    qkv = torch.randn(5, heads + 2, hd).to(dtype)
    qk = qkv[:, :heads]
    got = qk * cos + qk.roll(hd // 2, dims=-1) * sin
    c, s = cos[..., : hd // 2], sin[..., hd // 2 :]  # the plain cos and sin
    x1, x2 = qk[..., : hd // 2], qk[..., hd // 2 :]
    want = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    assert torch.equal(got, want)
