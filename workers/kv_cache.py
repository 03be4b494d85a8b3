"""Block KV cache of one stage's layers, allocated from a memory budget.

Parts:
- `BlockKVCache`: per layer a K pool and a V pool `[num_blocks, block_size, num_kv_heads,
  head_dim]`; per-request block tables and lengths; `blocks_needed` / `can_allocate` /
  `allocate` (all-or-nothing, raises `KVCacheFull` with nothing changed) / `free` /
  `free_tokens` / `capacity_tokens`.

Token t of a request lives in block `block_table[t // block_size]`, row `t % block_size`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from workers.backend import KVCacheFull, SequenceChunk


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
        self.k_pools = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v_pools = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self._free_blocks: list[int] = list(range(self.num_blocks - 1, -1, -1))  # pop() -> 0 first
        self.block_tables: dict[str, list[int]] = {}
        self.lengths: dict[str, int] = {}  # tokens stored per request

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
        return len(self._free_blocks) * self.block_size

    def _new_lengths(self, chunks: Sequence[SequenceChunk]) -> dict[str, int]:
        ends: dict[str, int] = {}
        for chunk in chunks:
            have = self.lengths.get(chunk.request_id, 0)
            if chunk.start_position > have or chunk.start_position < 0 or chunk.num_tokens < 1:
                raise ValueError(
                    f"request {chunk.request_id!r}: chunk starts at {chunk.start_position} with "
                    f"{chunk.num_tokens} tokens but {have} tokens are cached"
                )
            end = chunk.start_position + chunk.num_tokens
            ends[chunk.request_id] = max(ends.get(chunk.request_id, 0), end)
        return ends

    def blocks_needed(self, chunks: Sequence[SequenceChunk]) -> int:
        """New blocks `allocate(chunks)` would take from the free list."""
        needed = 0
        for request_id, end in self._new_lengths(chunks).items():
            have = len(self.block_tables.get(request_id, ()))
            needed += max(0, -(-end // self.block_size) - have)
        return needed

    def can_allocate(self, chunks: Sequence[SequenceChunk]) -> bool:
        return self.blocks_needed(chunks) <= len(self._free_blocks)

    def allocate(self, chunks: Sequence[SequenceChunk]) -> None:
        """Make room for the chunks' new tokens; raises KVCacheFull changing nothing."""
        ends = self._new_lengths(chunks)
        needed = self.blocks_needed(chunks)
        if needed > len(self._free_blocks):
            raise KVCacheFull(
                f"need {needed} KV blocks of {self.block_size} tokens, {len(self._free_blocks)} free"
            )
        for request_id, end in ends.items():
            table = self.block_tables.setdefault(request_id, [])
            while len(table) * self.block_size < end:
                table.append(self._free_blocks.pop())
            self.lengths[request_id] = end

    def free(self, request_id: str) -> None:
        """Return the request's blocks to the free list (no-op for an unknown id)."""
        table = self.block_tables.pop(request_id, None)
        self.lengths.pop(request_id, None)
        if table:
            self._free_blocks.extend(reversed(table))
