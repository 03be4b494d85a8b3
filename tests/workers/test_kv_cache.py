"""Block KV cache: budget sizing, allocation, free, and all-or-nothing KVCacheFull."""

from __future__ import annotations

import os

import pytest
import torch

from workers.backend import KVCacheFull, SequenceChunk, StageConfig
from workers.kv_cache import BlockKVCache
from workers.torch_backend import TorchStageBackend


def _cache(num_blocks: int = 4, block: int = 4) -> BlockKVCache:
    block_bytes = 2 * 2 * block * 2 * 8 * 4  # K+V, 2 layers, 2 kv heads, head_dim 8, float32
    return BlockKVCache(2, 2, 8, num_blocks * block_bytes + block_bytes - 1, block, torch.float32)


def test_budget_sizing_and_layout():
    cache = _cache()
    assert cache.num_blocks == 4 and cache.capacity_tokens() == 16 == cache.free_tokens()
    assert cache.k_pools[0].shape == (4, 4, 2, 8) and len(cache.layers) == 2
    assert cache.nbytes <= 5 * 2 * 2 * 4 * 2 * 8 * 4


def test_allocate_grow_and_free():
    cache = _cache()
    cache.allocate([SequenceChunk("a", 0, 5), SequenceChunk("b", 0, 1)])
    assert len(cache.block_tables["a"]) == 2 and len(cache.block_tables["b"]) == 1
    assert cache.free_tokens() == 4
    cache.allocate([SequenceChunk("a", 5, 1), SequenceChunk("b", 1, 1)])  # fits the open blocks
    assert cache.free_tokens() == 4 and cache.lengths == {"a": 6, "b": 2}
    assert len(set(cache.block_tables["a"]) | set(cache.block_tables["b"])) == 3
    cache.free("a")
    assert cache.free_tokens() == 12 and "a" not in cache.block_tables
    cache.free("a")  # unknown id: no-op
    cache.free("b")
    assert cache.free_tokens() == cache.capacity_tokens()


def test_full_raises_without_side_effects():
    cache = _cache()
    cache.allocate([SequenceChunk("a", 0, 8)])
    before = (dict(cache.lengths), {k: list(v) for k, v in cache.block_tables.items()}, cache.free_tokens())
    chunks = [SequenceChunk("b", 0, 4), SequenceChunk("c", 0, 5)]  # 3 blocks, only 2 free
    assert not cache.can_allocate(chunks)
    with pytest.raises(KVCacheFull):
        cache.allocate(chunks)
    assert (dict(cache.lengths), {k: list(v) for k, v in cache.block_tables.items()}, cache.free_tokens()) == before
    assert cache.can_allocate(chunks[:1])


def test_gap_in_positions_is_rejected():
    cache = _cache()
    with pytest.raises(ValueError):
        cache.allocate([SequenceChunk("a", 3, 1)])


def test_backend_kv_full_changes_nothing(llama_checkpoint):
    budget = 2 * 4 * 2 * 16 * 4 * 16 * 3  # K+V, 4 layers, 2 kv heads, hd 16, float32, 16-token blocks: 3 blocks
    backend = TorchStageBackend(StageConfig(str(llama_checkpoint), 0, 4, kv_budget_bytes=budget))
    assert backend.kv_capacity_tokens() == 48
    first = backend.forward([SequenceChunk("a", 0, 20)], torch.arange(20))
    assert backend.kv_free_tokens() == 16
    too_big = [SequenceChunk("a", 20, 1), SequenceChunk("b", 0, 17)]
    assert not backend.can_allocate(too_big)
    with pytest.raises(KVCacheFull):
        backend.forward(too_big, torch.arange(18))
    assert backend.kv_free_tokens() == 16
    # The cached sequence is intact: re-running its last token reproduces the same logits.
    again = backend.forward([SequenceChunk("a", 19, 1)], torch.tensor([19]))
    torch.testing.assert_close(again[0], first[0], atol=1e-5, rtol=0)
    backend.free("a")
    assert backend.kv_free_tokens() == 48


def _resident_bytes() -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmRSS from /proc (Linux)")
def test_reserved_pool_is_resident_only_as_written():
    budget = 256 * 2**20
    before = _resident_bytes()
    cache = BlockKVCache(num_layers=4, num_kv_heads=2, head_dim=64, kv_budget_bytes=budget, block_size_tokens=16)
    assert cache.nbytes > 0.99 * budget
    assert _resident_bytes() - before < 32 * 2**20  # reserved, not touched
    assert all(float(p.abs().max()) == 0.0 for p in cache.k_pools[:1])  # reads zeros (and touches one pool)
    for pool in (*cache.k_pools, *cache.v_pools):
        pool.fill_(1.0)
    assert _resident_bytes() - before > 0.9 * budget  # written pages become resident


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_pool_dtype_shape_and_zeros(dtype):
    cache = BlockKVCache(num_layers=2, num_kv_heads=2, head_dim=8, kv_budget_bytes=4096, block_size_tokens=4, dtype=dtype)
    for pool in (*cache.k_pools, *cache.v_pools):
        assert pool.dtype == dtype and pool.shape == (cache.num_blocks, 4, 2, 8) and pool.is_contiguous()
        assert not pool.any()
    empty = BlockKVCache(num_layers=1, num_kv_heads=2, head_dim=8, kv_budget_bytes=0)
    assert empty.k_pools[0].shape[0] == 0
