"""Block KV cache of one stage's layers, allocated from a memory budget, with prefix caching.

Parts:
- `BlockKVCache`: per layer a K pool and a V pool `[num_blocks, block_size, num_kv_heads,
  head_dim]` (`zeroed_pool`: on CPU resident only as written); per-request block tables and lengths; `blocks_needed` / `can_allocate` /
  `allocate` (all-or-nothing, raises `KVCacheFull` with nothing changed) / `free` /
  `free_tokens` / `capacity_tokens`.
- Prefix caching: `cache_prompt(request_id, block_hashes, num_prompt_tokens, want_tokens)` gives
  a new request the cached blocks of its longest cached prefix, allocates the rest of its prompt
  and publishes the hashes of its full prompt blocks (so a request later in the same batch shares
  them: every layer writes the batch's K/V before any attention reads them). Blocks are
  reference-counted; a block no request holds keeps its KV and its hash (evictable, LRU order)
  until a new block is needed and the free list is empty. `prefix_queries_tokens` /
  `prefix_hits_tokens` count prompt tokens asked for and found.
- `block_hashes(token_ids, block_size)`: the hash chain of a sequence's full blocks (block i's
  hash covers tokens [0, (i + 1) x block_size)).

Token t of a request lives in block `block_table[t // block_size]`, row `t % block_size`.
"""

from __future__ import annotations

import hashlib
import mmap
from array import array
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch

from workers.backend import KVCacheFull, SequenceChunk
from workers.kv_ledger import blocks_to_add, chunk_ends


def block_hashes(token_ids: Sequence[int], block_size: int) -> tuple[int, ...]:
    """Hash chain of the full blocks of `token_ids`: 64-bit BLAKE2b of (previous hash, block's ids)."""
    data = array("q", token_ids).tobytes()
    step = block_size * 8
    out: list[int] = []
    previous = b""
    for start in range(0, len(token_ids) // block_size * step, step):
        previous = hashlib.blake2b(previous + data[start : start + step], digest_size=8).digest()
        out.append(int.from_bytes(previous, "little") >> 1)  # 63 bits: a msgpack int64
    return tuple(out)


def zeroed_pool(shape: tuple[int, ...], dtype: torch.dtype, device: str | torch.device) -> torch.Tensor:
    """A zero-filled tensor. On CPU its memory is an anonymous mapping of its own (the OS's zero
    pages), so the pool takes resident memory only as tokens are written into it (torch.zeros
    writes every byte, so a reserved cache would be resident at once; calloc maps fresh pages only
    above malloc's mmap threshold, which glibc raises at run time, up to 32 MiB)."""
    if torch.device(device).type != "cpu" or 0 in shape:
        return torch.zeros(shape, dtype=dtype, device=device)
    num_bytes = dtype.itemsize
    for size in shape:
        num_bytes *= size
    pages = np.frombuffer(mmap.mmap(-1, num_bytes), dtype=np.uint8)  # the array keeps the mapping alive
    return torch.from_numpy(pages).view(dtype).view(shape)


class BlockKVCache:
    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        kv_budget_bytes: int,
        block_size_tokens: int = 16,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        if block_size_tokens < 1 or num_layers < 1:
            raise ValueError("block_size_tokens and num_layers must be >= 1")
        self.num_layers = num_layers
        self.block_size = block_size_tokens
        self.dtype = dtype
        block_bytes = 2 * num_layers * block_size_tokens * num_kv_heads * head_dim * dtype.itemsize
        self.num_blocks = max(0, kv_budget_bytes // block_bytes)
        shape = (self.num_blocks, block_size_tokens, num_kv_heads, head_dim)
        # Zeroed (not empty): padded gathers read unused rows, and 0 * NaN would poison softmax @ V.
        self.k_pools = [zeroed_pool(shape, dtype, device) for _ in range(num_layers)]
        self.v_pools = [zeroed_pool(shape, dtype, device) for _ in range(num_layers)]
        self._free_blocks: list[int] = list(range(self.num_blocks - 1, -1, -1))  # pop() -> 0 first
        self.block_tables: dict[str, list[int]] = {}
        self.lengths: dict[str, int] = {}  # tokens stored per request
        self._refs = [0] * self.num_blocks  # requests holding each block
        self._hash_of: dict[int, int] = {}  # block -> hash of its prefix (full blocks only)
        self._by_hash: dict[int, int] = {}  # hash -> block
        self._evictable: OrderedDict[int, None] = OrderedDict()  # held by nobody, hashed; LRU first
        self.prefix_queries_tokens = 0
        self.prefix_hits_tokens = 0

    @property
    def layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(K pool, V pool) per layer of the stage."""
        return list(zip(self.k_pools, self.v_pools))

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in (*self.k_pools, *self.v_pools))

    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def free_tokens(self) -> int:
        """Tokens that fit now: empty blocks plus cached blocks nobody holds (evicted on demand)."""
        return self._available_blocks() * self.block_size

    def cached_blocks(self) -> int:
        """Blocks that hold a hashed prefix (held by a request or evictable)."""
        return len(self._hash_of)

    def _available_blocks(self) -> int:
        return len(self._free_blocks) + len(self._evictable)

    def _take_block(self) -> int:
        if self._free_blocks:
            block = self._free_blocks.pop()
        else:  # evict the least recently used cached block
            block, _ = self._evictable.popitem(last=False)
            del self._by_hash[self._hash_of.pop(block)]
        self._refs[block] = 1
        return block

    def _drop_ref(self, block: int) -> None:
        self._refs[block] -= 1
        if self._refs[block] == 0:
            if block in self._hash_of:
                self._evictable[block] = None  # most recently used end
            else:
                self._free_blocks.append(block)

    def blocks_needed(self, chunks: Sequence[SequenceChunk]) -> int:
        """New blocks `allocate(chunks)` would take from the free list."""
        ends = chunk_ends(self.lengths, chunks)
        return blocks_to_add(ends, lambda r: len(self.block_tables.get(r, ())), self.block_size)

    def can_allocate(self, chunks: Sequence[SequenceChunk]) -> bool:
        return self.blocks_needed(chunks) <= self._available_blocks()

    def allocate(self, chunks: Sequence[SequenceChunk]) -> None:
        """Make room for the chunks' new tokens; raises KVCacheFull changing nothing."""
        ends = chunk_ends(self.lengths, chunks)
        needed = self.blocks_needed(chunks)
        if needed > self._available_blocks():
            raise KVCacheFull(
                f"need {needed} KV blocks of {self.block_size} tokens, {self._available_blocks()} free"
            )
        for request_id, end in ends.items():
            table = self.block_tables.setdefault(request_id, [])
            while len(table) * self.block_size < end:
                table.append(self._take_block())
            self.lengths[request_id] = max(end, self.lengths.get(request_id, 0))

    def cached_prefix_tokens(self, hashes: Sequence[int], num_prompt_tokens: int) -> int:
        """Tokens of the longest cached prefix a prompt could reuse (never its last token's block)."""
        usable = (num_prompt_tokens - 1) // self.block_size
        found = 0
        for h in hashes[:usable]:
            if h not in self._by_hash:
                break
            found += 1
        return found * self.block_size

    def cache_prompt(
        self, request_id: str, hashes: Sequence[int], num_prompt_tokens: int, want_tokens: int | None = None
    ) -> int:
        """Start a request that holds nothing yet: reuse the blocks of its longest cached prefix
        (at most `want_tokens` if given), allocate the rest of its prompt, publish its full prompt
        blocks' hashes. Returns the tokens reused (a multiple of the block size). Raises
        KVCacheFull with nothing changed when the rest does not fit."""
        if self.block_tables.get(request_id):
            raise ValueError(f"request {request_id!r} already holds KV blocks")
        hit_tokens = self.cached_prefix_tokens(hashes, num_prompt_tokens)
        if want_tokens is not None:
            hit_tokens = min(hit_tokens, want_tokens)
        hit_blocks = hit_tokens // self.block_size
        reused = [self._by_hash[h] for h in hashes[:hit_blocks]]
        reusing_evictable = sum(1 for b in reused if b in self._evictable)
        needed = -(-num_prompt_tokens // self.block_size) - hit_blocks
        if needed > self._available_blocks() - reusing_evictable:
            raise KVCacheFull(f"need {needed} KV blocks of {self.block_size} tokens, {self._available_blocks()} free")
        for block in reused:
            self._evictable.pop(block, None)
            self._refs[block] += 1
        table = reused + [self._take_block() for _ in range(needed)]
        self.block_tables[request_id] = table
        self.lengths[request_id] = hit_tokens
        for index in range(hit_blocks, min(len(hashes), num_prompt_tokens // self.block_size)):
            if hashes[index] not in self._by_hash:  # a twin computed elsewhere keeps its own
                self._by_hash[hashes[index]] = table[index]
                self._hash_of[table[index]] = hashes[index]
        self.prefix_queries_tokens += num_prompt_tokens
        self.prefix_hits_tokens += hit_tokens
        return hit_tokens

    def free(self, request_id: str) -> None:
        """Release the request's blocks (no-op for an unknown id): hashed ones stay cached."""
        table = self.block_tables.pop(request_id, None)
        self.lengths.pop(request_id, None)
        if table:
            for block in reversed(table):  # a chain's tail is evicted before its head
                self._drop_ref(block)
