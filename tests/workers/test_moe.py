"""MoE families (Qwen3-MoE, Mixtral, Qwen2-MoE): config, routing, grouped experts, stages vs transformers,
a stage reads only its own layers' experts."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import Tokenizer

import workers.checkpoint as checkpoint_module
from tests.workers.test_stage_equivalence import _chain, _step
from workers import stage_model
from workers.backend import SequenceChunk, StageConfig
from workers.checkpoint import layer_parameter_bytes
from workers.gemm import onednn_available
from workers.model_config import ModelConfig, UnsupportedModelError
from workers.moe import MoeBlock
from workers.torch_backend import TorchStageBackend

MOE_FAMILIES = ("qwen3_moe", "mixtral", "qwen2_moe")
NEW_TOKENS = 8
PROMPT = "The quick brown fox jumps over the lazy dog. Hello"


def test_config_normalises_moe_families(moe_checkpoints):
    qwen3 = ModelConfig.from_hf(moe_checkpoints["qwen3_moe"])
    assert (qwen3.model_type, qwen3.num_experts, qwen3.num_experts_per_tok) == ("qwen3_moe", 8, 2)
    assert qwen3.moe_intermediate_size == 32 and qwen3.norm_topk_prob and qwen3.qk_norm
    assert [qwen3.layer_is_moe(i) for i in range(4)] == [False, True, True, True]  # mlp_only_layers=[0]
    qwen2 = ModelConfig.from_hf(moe_checkpoints["qwen2_moe"])
    assert [qwen2.layer_is_moe(i) for i in range(4)] == [False, True, False, True]  # decoder_sparse_step=2
    assert qwen2.shared_expert_intermediate_size == 48 and not qwen2.norm_topk_prob and qwen2.qkv_bias
    mixtral = ModelConfig.from_hf(moe_checkpoints["mixtral"])
    assert (mixtral.num_experts, mixtral.moe_intermediate_size, mixtral.norm_topk_prob) == (4, 128, True)
    assert all(mixtral.layer_is_moe(i) for i in range(3))
    dense = ModelConfig.from_dict({**json.loads((moe_checkpoints["mixtral"] / "config.json").read_text()), "model_type": "mistral"})
    assert not dense.is_moe and not dense.layer_is_moe(0)
    raw = json.loads((moe_checkpoints["qwen3_moe"] / "config.json").read_text())
    with pytest.raises(UnsupportedModelError, match="num_experts_per_tok=9"):
        ModelConfig.from_dict({**raw, "num_experts_per_tok": 9})


def _block(num_experts: int, top_k: int, norm: bool, shared: bool, dtype: torch.dtype, seed: int = 0) -> MoeBlock:
    gen = torch.Generator().manual_seed(seed)
    hidden, inter = 24, 16

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype)

    extra = {}
    if shared:
        extra = {"shared_gate_up": rand(hidden, 2 * 20), "shared_down": rand(20, hidden), "shared_gate": rand(hidden, 1)}
    return MoeBlock(rand(num_experts, hidden), rand(num_experts, hidden, 2 * inter), rand(num_experts, inter, hidden), top_k, norm, **extra)


def _per_token_reference(block: MoeBlock, x: torch.Tensor) -> torch.Tensor:
    """The MoE block written the plain way: every token, every chosen expert, in float64."""
    x64 = x.double()
    probs = torch.softmax(x64 @ block.w_router.double(), dim=-1)
    out = torch.zeros_like(x64)
    for t in range(x.shape[0]):
        top = torch.topk(probs[t], block.top_k)
        weights = top.values / top.values.sum() if block.norm_topk_prob else top.values
        for w, e in zip(weights, top.indices.tolist()):
            gate, up = (x64[t] @ block.w_gate_up[e].double()).chunk(2)
            out[t] += w * ((torch.nn.functional.silu(gate) * up) @ block.w_down[e].double())
        if block.w_shared_gate_up is not None:
            gate, up = (x64[t] @ block.w_shared_gate_up.double()).chunk(2)
            shared = (torch.nn.functional.silu(gate) * up) @ block.w_shared_down.double()
            out[t] += torch.sigmoid(x64[t] @ block.w_shared_gate.double()) * shared
    return out


@pytest.mark.parametrize("num_tokens", [1, 3, 37])
@pytest.mark.parametrize(("num_experts", "top_k", "norm", "shared"), [(8, 2, True, False), (8, 3, False, False), (4, 2, False, True)])
def test_grouped_experts_equal_per_token_loop(num_tokens, num_experts, top_k, norm, shared):
    block = _block(num_experts, top_k, norm, shared, torch.float32)
    x = torch.randn(num_tokens, 24, generator=torch.Generator().manual_seed(1))
    out = block(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    torch.testing.assert_close(out.double(), _per_token_reference(block, x), atol=1e-3, rtol=1e-5)
    weights, experts = block.route(x)
    assert experts.shape == (num_tokens, top_k) and (experts < num_experts).all()
    if num_tokens == 37:  # the tokens really spread over the experts (grouping is exercised)
        assert len(set(experts.flatten().tolist())) == num_experts
    if norm:  # Mixtral / norm_topk_prob: a softmax over the k largest logits
        top_logits = torch.topk(x @ block.w_router, top_k, dim=-1).values
        torch.testing.assert_close(weights, torch.softmax(top_logits, dim=-1))
    else:
        assert (weights.sum(-1) < 1).all()


def test_grouped_experts_in_bfloat16():
    block = _block(8, 2, True, False, torch.bfloat16)
    x = torch.randn(16, 24, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    out = block(x)
    assert out.dtype == torch.bfloat16
    reference = _per_token_reference(block, x)
    assert (out.double() - reference).abs().max() < 0.05 * reference.abs().max()


@pytest.fixture(scope="module")
def moe_references(moe_checkpoints: dict[str, Path]) -> dict[str, tuple[list[int], list[int], torch.Tensor]]:
    """family -> (prompt ids, generate()'s greedy tokens, transformers' logits at every position)."""
    out = {}
    for family, path in moe_checkpoints.items():
        prompt = Tokenizer.from_file(str(path / "tokenizer.json")).encode(PROMPT).ids
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        ids = torch.tensor([prompt])
        with torch.no_grad():
            generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False)
            logits = model(generated).logits[0]
        out[family] = (prompt, generated[0, len(prompt) :].tolist(), logits)
    return out


@pytest.mark.parametrize("layout", [pytest.param("packed", marks=pytest.mark.slow), "transposed"])  # fast lane: one
@pytest.mark.parametrize("num_stages", [1, 2, 3])
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_moe_stages_match_transformers(moe_checkpoints, moe_references, family, num_stages, layout, monkeypatch):
    """Greedy tokens equal, last-position logits within 1e-4 (fp32), 1-3 stages, both layouts of
    the attention weights (the experts are stored the same way in both)."""
    if layout == "packed" and not onednn_available():
        pytest.skip("this torch has no oneDNN")
    monkeypatch.setattr(stage_model, "onednn_is_faster", lambda weight: layout == "packed")
    prompt, expected, ref_logits = moe_references[family]
    chain = _chain(moe_checkpoints[family], num_stages)
    config = chain[0].model.config
    for backend in chain:
        for index, layer in zip(range(backend.model.start_layer, backend.model.end_layer), backend.model.layers):
            assert (layer.moe is not None) == config.layer_is_moe(index)
            assert layer.w_qkv.is_mkldnn == (layout == "packed")
    logits = _step(chain, [SequenceChunk("r", 0, len(prompt))], prompt)
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


def test_moe_batched_step_equals_each_alone(moe_checkpoints, moe_references):
    """Three prompts prefilled in one varlen batch, then decoded together: each row equals
    transformers' logits for that prompt alone (tokens of different sequences share experts)."""
    path = moe_checkpoints["qwen3_moe"]
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = [[5, 17, 99, 200, 3], list(range(40, 61)), [7, 300, 12]]
    chain = _chain(path, 2, kv_block_size_tokens=4)
    logits = _step(chain, [SequenceChunk(f"r{i}", 0, len(p)) for i, p in enumerate(prompts)], [t for p in prompts for t in p])
    next_tokens = [int(row.argmax()) for row in logits]
    decoded = _step(chain, [SequenceChunk(f"r{i}", len(p), 1) for i, p in enumerate(prompts)], next_tokens)
    for i, prompt in enumerate(prompts):
        with torch.no_grad():
            ref = model(torch.tensor([prompt + [next_tokens[i]]])).logits[0]
        torch.testing.assert_close(logits[i], ref[len(prompt) - 1], atol=1e-4, rtol=0)
        torch.testing.assert_close(decoded[i], ref[len(prompt)], atol=1e-4, rtol=0)


def _layer_of(name: str) -> int | None:
    match = re.match(r"model\.layers\.(\d+)\.", name)
    return int(match.group(1)) if match else None


@pytest.mark.parametrize("sharded", [False, True])
@pytest.mark.parametrize(("start", "end"), [(0, 1), (1, 3), (2, 4)])
def test_stage_reads_only_its_own_experts(checkpoint_factory, monkeypatch, sharded, start, end):
    """Every tensor the stage reads (recorded at safe_open.get_tensor) is of its own layers (or its
    embeddings / head); every expert of its own layers is read."""
    extra = {"max_shard_size": "100KB"} if sharded else {}
    path = checkpoint_factory("qwen3_moe", num_hidden_layers=4, seed=6, **extra)
    real_safe_open = checkpoint_module.safe_open
    read: list[str] = []

    class RecordingSafeOpen:
        def __init__(self, *args, **kwargs) -> None:
            self.inner = real_safe_open(*args, **kwargs)

        def __enter__(self):
            handle = self.inner.__enter__()
            outer = self

            class Handle:
                def get_tensor(self, name: str) -> torch.Tensor:
                    read.append(name)
                    return handle.get_tensor(name)

                def __getattr__(self, attr: str):
                    return getattr(handle, attr)

            outer.handle = Handle()
            return outer.handle

        def __exit__(self, *exc) -> None:
            self.inner.__exit__(*exc)

    monkeypatch.setattr(checkpoint_module, "safe_open", RecordingSafeOpen)
    backend = TorchStageBackend(StageConfig(str(path), start, end, kv_budget_bytes=2**20))
    assert len(read) == len(set(read)) and set(read) == backend.loaded_tensor_names
    layers_read = {_layer_of(n) for n in read} - {None}
    assert layers_read == set(range(start, end))
    experts_read = {n for n in read if ".mlp.experts." in n}
    every = set(checkpoint_module.checkpoint_files(path))
    own_experts = {n for n in every if ".mlp.experts." in n and start <= _layer_of(n) < end}
    assert experts_read == own_experts
    assert len(own_experts) == 3 * 8 * len([i for i in range(start, end) if i != 0])  # layer 0 is dense
    if sharded:
        assert len(set(checkpoint_module.checkpoint_files(path).values())) > 1


def test_moe_layer_bytes_count_every_expert(moe_checkpoints):
    """Per-layer bytes from the headers: a dense layer is smaller, an MoE layer holds all its
    experts; what a stage holds in memory equals them."""
    path = moe_checkpoints["qwen3_moe"]
    config = ModelConfig.from_hf(path)
    sizes = layer_parameter_bytes(path)
    h, e, i = config.hidden_size, config.num_experts, config.moe_intermediate_size
    attention = 4 * (2 * h * config.num_attention_heads * config.head_dim + 2 * h * config.num_key_value_heads * config.head_dim)
    norms = 4 * (2 * h + 2 * config.head_dim)
    dense_mlp = 4 * 3 * h * config.intermediate_size
    moe_mlp = 4 * (e * 3 * h * i + e * h)  # experts + router
    assert sizes.layer_bytes[0] == attention + norms + dense_mlp
    assert sizes.layer_bytes[1:] == (attention + norms + moe_mlp,) * 3
    assert sizes.expert_bytes == (0,) + (4 * e * 3 * h * i,) * 3
    # a stage holds Qwen3's q/k norm weights expanded to one row per head (workers/stage_model.py)
    qk_norm_expansion = 4 * (config.num_attention_heads + config.num_key_value_heads - 2) * config.head_dim
    for start, end in [(0, 2), (2, 4)]:
        backend = TorchStageBackend(StageConfig(str(path), start, end, kv_budget_bytes=2**20))
        assert backend.weight_bytes == sizes.stage_bytes(start, end) + (end - start) * qk_norm_expansion


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_moe_stages_run_in_bfloat16(moe_checkpoints, family):
    first, last = _chain(moe_checkpoints[family], 2, dtype="bfloat16")
    moe = next(layer.moe for b in (first, last) for layer in b.model.layers if layer.moe is not None)
    assert moe.w_gate_up.dtype == torch.bfloat16
    chunks = [SequenceChunk("a", 0, 5), SequenceChunk("b", 0, 1)]
    hidden = first.forward(chunks, torch.arange(6))
    assert hidden.dtype == torch.bfloat16 and hidden.shape == (6, first.hidden_size)
    logits = last.forward(chunks, hidden)
    assert logits.dtype == torch.float32 and logits.shape == (2, last.vocab_size) and torch.isfinite(logits).all()


def test_expert_layouts_build_the_same_block(moe_checkpoints):
    """Per-expert (hub), fused (transformers 5) and stacked-per-projection (GGUF) expert tensors
    of one layer give one and the same block."""
    from workers.checkpoint import load_stage_tensors
    from workers.moe import moe_block_from_weights

    path = moe_checkpoints["qwen3_moe"]
    config = ModelConfig.from_hf(path)
    tensors = load_stage_tensors(path, 1, 2, config.num_layers, False)
    prefix = "model.layers.1.mlp."
    per_expert = {n.removeprefix("model.layers.1."): t for n, t in tensors.items() if n.startswith(prefix)}

    def stacked(proj: str) -> torch.Tensor:
        return torch.stack([per_expert[f"mlp.experts.{e}.{proj}.weight"] for e in range(config.num_experts)])

    fused = {"mlp.gate.weight": per_expert["mlp.gate.weight"],
             "mlp.experts.gate_up_proj": torch.cat([stacked("gate_proj"), stacked("up_proj")], dim=1),
             "mlp.experts.down_proj": stacked("down_proj")}
    gguf_like = {"mlp.gate.weight": per_expert["mlp.gate.weight"],
                 **{f"mlp.experts.{p}.weight": stacked(p) for p in ("gate_proj", "up_proj", "down_proj")}}
    blocks = [moe_block_from_weights(config, dict(w)) for w in (per_expert, fused, gguf_like)]
    x = torch.randn(9, config.hidden_size, generator=torch.Generator().manual_seed(3))
    outputs = [block(x) for block in blocks]
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])
    leftover = dict(per_expert)
    moe_block_from_weights(config, leftover)
    assert leftover == {}  # every tensor of the MoE block is consumed
