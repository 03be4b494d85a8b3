"""Prefix caching in the block KV cache and through chained stages.

The cache: blocks shared by reference, kept after a request ends, evicted least recently used
only when a block is needed. Through 1-3 chained TorchStageBackends (each stage reusing exactly
what the first stage reused, as workers/prompt_start.py does): greedy tokens identical and
logits equal (to float32 rounding) with and without the cache, llama and qwen3; bfloat16 to its
rounding; eviction under memory pressure still serves correct text.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from workers.backend import KVCacheFull, SequenceChunk, StageConfig
from workers.kv_cache import BlockKVCache, block_hashes
from workers.torch_backend import TorchStageBackend

BLOCK = 4


def _cache(num_blocks: int) -> BlockKVCache:
    block_bytes = 2 * 1 * BLOCK * 1 * 8 * 4  # K+V, 1 layer, 1 kv head, head_dim 8, float32
    return BlockKVCache(1, 1, 8, num_blocks * block_bytes, BLOCK, torch.float32)


def test_hash_chain_covers_the_whole_prefix() -> None:
    a = block_hashes(list(range(12)), BLOCK)
    assert len(a) == 3 and block_hashes(list(range(13)), BLOCK) == a
    b = block_hashes([99] + list(range(1, 12)), BLOCK)  # first token differs: every hash differs
    assert not set(a) & set(b)
    assert block_hashes(list(range(8)) + [0, 0, 0, 0], BLOCK)[:2] == a[:2]


def test_a_shared_prefix_is_reused_and_the_last_prompt_block_always_computed() -> None:
    cache = _cache(8)
    prompt = list(range(10))  # blocks [0-3], [4-7] full; [8, 9] partial
    hashes = block_hashes(prompt, BLOCK)
    assert cache.cache_prompt("a", hashes, len(prompt)) == 0
    assert cache.cached_blocks() == 2 and len(cache.block_tables["a"]) == 3
    # a twin in the same batch already shares a's published blocks (computed in that same step)
    assert cache.cache_prompt("b", hashes, len(prompt)) == 8
    assert cache.block_tables["b"][:2] == cache.block_tables["a"][:2]
    assert cache.block_tables["b"][2] != cache.block_tables["a"][2]
    # a prompt of exactly two blocks reuses only the first: the last token's block is computed
    assert cache.cache_prompt("c", hashes[:2], 8) == 4
    assert cache.cache_prompt("d", hashes, len(prompt), want_tokens=4) == 4  # capped
    assert (cache.prefix_queries_tokens, cache.prefix_hits_tokens) == (38, 16)


def test_blocks_outlive_their_request_and_are_evicted_lru_only_when_needed() -> None:
    cache = _cache(4)
    first, second = list(range(9)), list(range(100, 109))
    cache.cache_prompt("a", block_hashes(first, BLOCK), 9)
    cache.free("a")
    assert cache.free_tokens() == 16  # cached blocks count as free: taken back on demand
    assert cache.cached_blocks() == 2
    cache.cache_prompt("b", block_hashes(second, BLOCK), 9)  # 3 blocks: 2 empty + a's LRU one
    cache.free("b")
    assert cache.cached_prefix_tokens(block_hashes(first, BLOCK), 9) == 4  # a's tail went first
    assert cache.cached_prefix_tokens(block_hashes(second, BLOCK), 9) == 8
    assert cache.cache_prompt("c", block_hashes(second, BLOCK), 9) == 8
    with pytest.raises(KVCacheFull):
        cache.cache_prompt("d", block_hashes(list(range(200, 216)), BLOCK), 16)  # 4 blocks, 2 left
    assert "d" not in cache.block_tables and cache.free_tokens() == 4  # nothing changed
    cache.free("c")
    assert cache.free_tokens() == 16 and sorted(cache._refs) == [0, 0, 0, 0]


def _splits(num_layers: int, num_stages: int) -> list[tuple[int, int]]:
    bounds = [round(i * num_layers / num_stages) for i in range(num_stages + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def _chain(model_dir: Path, num_stages: int, **kwargs) -> list[TorchStageBackend]:
    num_layers = transformers.AutoConfig.from_pretrained(model_dir).num_hidden_layers
    kwargs.setdefault("kv_budget_bytes", 4 * 2**20)
    return [TorchStageBackend(StageConfig(str(model_dir), s, e, **kwargs)) for s, e in _splits(num_layers, num_stages)]


def _generate(chain: list[TorchStageBackend], request_id: str, prompt: list[int], steps: int) -> tuple[list[int], list[torch.Tensor], int]:
    """Greedy tokens, logits of each step and the prompt tokens reused, as workers run them."""
    hashes = block_hashes(prompt, chain[0].config.kv_block_size_tokens)
    reused = chain[0].cache_prompt(request_id, hashes, len(prompt))
    for backend in chain[1:]:
        assert backend.cached_prefix_tokens(hashes, len(prompt)) >= reused
        assert backend.cache_prompt(request_id, hashes, len(prompt), reused) == reused
    x = torch.tensor(prompt[reused:])
    chunk = SequenceChunk(request_id, reused, len(prompt) - reused)
    tokens, logits = [], []
    for step in range(steps + 1):
        for backend in chain:
            x = backend.forward([chunk], x)
        logits.append(x[0])
        tokens.append(int(x[0].argmax()))
        chunk = SequenceChunk(request_id, len(prompt) + step, 1)
        x = torch.tensor(tokens[-1:])
    return tokens, logits, reused


@pytest.mark.parametrize("num_stages", [1, 2, 3])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_greedy_tokens_and_logits_are_the_same_with_and_without_the_cache(tiny_checkpoints, family, num_stages, dtype):
    path = tiny_checkpoints[family]
    history = [(7 * i + 3) % 300 + 10 for i in range(45)]
    turns = [history, history + [41, 42, 43, 44, 45, 46, 47], history[:30] + [5, 6, 7]]
    cached = _chain(path, num_stages, dtype=dtype)
    plain = _chain(path, num_stages, dtype=dtype, prefix_caching=False)
    atol = 1e-4 if dtype == "float32" else 0.1
    reused_all = []
    for index, prompt in enumerate(turns):
        tokens, logits, reused = _generate(cached, f"c{index}", prompt, 5)
        ref_tokens, ref_logits, ref_reused = _generate(plain, f"p{index}", prompt, 5)
        assert ref_reused == 0
        if dtype == "bfloat16":  # bf16 rounding differs with the GEMM's row count (as chunked
            # prefill's does): the prompt's logits agree to bf16 precision, then near-ties may flip
            tokens, ref_tokens, logits, ref_logits = tokens[:1], ref_tokens[:1], logits[:1], ref_logits[:1]
        assert tokens == ref_tokens
        for got, want in zip(logits, ref_logits):
            torch.testing.assert_close(got, want, atol=atol, rtol=0)
        reused_all.append(reused)
        for backend in cached:
            backend.free(f"c{index}")
    assert reused_all == [0, 32, 16]  # whole 16-token blocks of the shared prefix, never the last
    for backend in cached:
        assert backend.prefix_cache_counts() == (sum(map(len, turns)), 48)
        assert backend.kv_free_tokens() == backend.kv_capacity_tokens()


def test_eviction_under_memory_pressure_keeps_serving_correctly(tiny_checkpoints):
    path = tiny_checkpoints["llama"]
    block_bytes = 2 * 2 * 16 * 2 * 16 * 4  # K+V, 2 layers a stage, block 16, 2 kv heads, head_dim 16
    cached = _chain(path, 2, kv_budget_bytes=8 * block_bytes)  # 8 blocks = 128 tokens a stage
    plain = _chain(path, 2, prefix_caching=False)
    prefixes = [[(13 * i + k) % 350 + 5 for k in range(40)] for i in range(4)]
    reused_total = 0
    for round_ in range(3):
        for i, prefix in enumerate(prefixes):
            prompt = prefix + [round_ + 1, i + 1]
            tokens, _, reused = _generate(cached, f"c{round_}-{i}", prompt, 4)
            assert tokens == _generate(plain, f"p{round_}-{i}", prompt, 4)[0]
            reused_total += reused
            for backend in cached + plain:
                backend.free(f"c{round_}-{i}")
                backend.free(f"p{round_}-{i}")
    # 4 prefixes of 2 cached blocks (+ 1 a running request) do not all fit in 8 blocks: evicted
    # blocks are computed again (a cache that kept everything would reuse 2 x 4 x 32 tokens)
    assert reused_total < 2 * 4 * 32
    for backend in cached:
        assert backend.kv_cache.cached_blocks() <= 8
        assert backend.kv_free_tokens() == backend.kv_capacity_tokens()
    # two prefixes fit: the second round reuses both
    for i in range(2):
        for round_ in range(2):
            _, _, reused = _generate(cached, f"d{round_}-{i}", prefixes[i] + [9, round_], 2)
            if round_ == 1:
                assert reused == 32
            for backend in cached:
                backend.free(f"d{round_}-{i}")
