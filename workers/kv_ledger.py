"""KV block accounting without storage, for backends that keep their own K/V arrays (MLX, numpy).

Parts:
- `KVBlockLedger`: a budget of blocks of `block_size` tokens; per-request token counts and blocks;
  `can_allocate` / `allocate` (all-or-nothing: raises `KVCacheFull` with nothing changed; ValueError
  for a chunk that starts past what is cached) / `free` / `free_tokens` / `capacity_tokens`.
  The same rules as the torch backend's `BlockKVCache` (workers/kv_cache.py), so every backend
  reports capacity the same way and the conformance suite can hold them to it.
- `chunk_ends(lengths, chunks)`, `blocks_to_add(ends, held, block_size)`: the block arithmetic both
  share: each request's length after a batch of chunks (ValueError for a chunk that starts past
  what is cached), and the new blocks those lengths take.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from workers.backend import KVCacheFull, SequenceChunk


def chunk_ends(lengths: Mapping[str, int], chunks: Sequence[SequenceChunk]) -> dict[str, int]:
    """Each chunk's request's token count once the chunks are stored (``lengths``: cached now)."""
    ends: dict[str, int] = {}
    for chunk in chunks:
        have = lengths.get(chunk.request_id, 0)
        if chunk.start_position > have or chunk.start_position < 0 or chunk.num_tokens < 1:
            raise ValueError(
                f"request {chunk.request_id!r}: chunk starts at {chunk.start_position} with "
                f"{chunk.num_tokens} tokens but {have} tokens are cached"
            )
        ends[chunk.request_id] = max(ends.get(chunk.request_id, 0), chunk.start_position + chunk.num_tokens)
    return ends


def blocks_to_add(ends: Mapping[str, int], held: Callable[[str], int], block_size: int) -> int:
    """New blocks of ``block_size`` tokens for requests to reach ``ends`` (``held(id)``: blocks held now)."""
    return sum(max(0, -(-end // block_size) - held(request_id)) for request_id, end in ends.items())


class KVBlockLedger:
    def __init__(self, kv_budget_bytes: int, bytes_per_token: int, block_size_tokens: int = 16) -> None:
        if block_size_tokens < 1 or bytes_per_token < 1:
            raise ValueError("block_size_tokens and bytes_per_token must be >= 1")
        self.block_size = block_size_tokens
        self.num_blocks = max(0, kv_budget_bytes // (bytes_per_token * block_size_tokens))
        self.free_blocks = self.num_blocks
        self.blocks: dict[str, int] = {}  # blocks held per request
        self.lengths: dict[str, int] = {}  # tokens stored per request

    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def free_tokens(self) -> int:
        return self.free_blocks * self.block_size

    def blocks_needed(self, chunks: Sequence[SequenceChunk]) -> int:
        return blocks_to_add(chunk_ends(self.lengths, chunks), lambda r: self.blocks.get(r, 0), self.block_size)

    def can_allocate(self, chunks: Sequence[SequenceChunk]) -> bool:
        return self.blocks_needed(chunks) <= self.free_blocks

    def allocate(self, chunks: Sequence[SequenceChunk]) -> None:
        """Room for the chunks' new tokens; KVCacheFull (nothing changed) when short."""
        ends = chunk_ends(self.lengths, chunks)
        needed = self.blocks_needed(chunks)
        if needed > self.free_blocks:
            raise KVCacheFull(f"need {needed} KV blocks of {self.block_size} tokens, {self.free_blocks} free")
        self.free_blocks -= needed
        for request_id, end in ends.items():
            self.blocks[request_id] = max(self.blocks.get(request_id, 0), -(-end // self.block_size))
            self.lengths[request_id] = end

    def free(self, request_id: str) -> None:
        self.free_blocks += self.blocks.pop(request_id, 0)
        self.lengths.pop(request_id, None)
