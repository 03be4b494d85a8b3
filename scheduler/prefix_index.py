"""Which stages hold which prompt prefixes, as far as the scheduler knows: it sent them there.

Parts:
- `prompt_hashes(token_ids, block_size)`: the hash chain of a prompt's full KV blocks (block i's
  hash stands for tokens [0, (i + 1) x block_size)). The index is the scheduler's own (Python's
  tuple hash, fast); workers key their caches with workers/kv_cache.py's chain.
- `PrefixIndex`: per stage, the block hashes of the prompts routed through it, least recently
  used first, at most as many as the stage's KV holds (what the worker itself could keep:
  bounded memory, and it forgets in the order the worker evicts). `record` after routing a
  prompt; `lookup` the tokens each stage is believed to hold of a prompt (whole blocks, never
  the block of the last prompt token, which a worker always computes); `forget` a stage that
  was lost or reloaded its layers.

The routing score (scheduler/routing.py) takes `lookup`'s answer: a stage holding a prefix
prefills only the rest, so a conversation stays on the pipeline holding its history unless its
load costs more than the prefill saved. It is a belief, not a lease: a worker may have evicted
blocks (under memory pressure), and then it prefills them again; nothing breaks.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterable, Mapping, Sequence

from scheduler.routing import KV_BLOCK_TOKENS as BLOCK_SIZE_TOKENS
DEFAULT_CAPACITY_BLOCKS = 1 << 16  # a stage whose KV capacity is not known yet


def prompt_hashes(token_ids: Sequence[int], block_size: int = BLOCK_SIZE_TOKENS) -> tuple[int, ...]:
    out: list[int] = []
    previous = 0
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        previous = hash((previous, tuple(token_ids[start : start + block_size])))
        out.append(previous)
    return tuple(out)


class PrefixIndex:
    def __init__(self, block_size: int = BLOCK_SIZE_TOKENS) -> None:
        self.block_size = block_size
        self._stages: dict[str, OrderedDict[Hashable, None]] = {}

    def __len__(self) -> int:
        """Block hashes held over all stages (the index's memory)."""
        return sum(len(blocks) for blocks in self._stages.values())

    def record(self, capacity_blocks: Mapping[str, int], hashes: Sequence[Hashable]) -> None:
        """A prompt with these block hashes was routed through these stages (stage -> its KV blocks)."""
        for stage_id, capacity in capacity_blocks.items():
            blocks = self._stages.setdefault(stage_id, OrderedDict())
            for h in hashes:
                blocks[h] = None
                blocks.move_to_end(h)
            while len(blocks) > max(0, capacity or DEFAULT_CAPACITY_BLOCKS):
                blocks.popitem(last=False)

    def cached_tokens(self, stage_id: str, hashes: Sequence[Hashable], num_prompt_tokens: int) -> int:
        blocks = self._stages.get(stage_id)
        if not blocks:
            return 0
        found = 0
        for h in hashes[: (num_prompt_tokens - 1) // self.block_size]:
            if h not in blocks:
                break
            found += 1
        return found * self.block_size

    def lookup(self, hashes: Sequence[Hashable], num_prompt_tokens: int, stage_ids: Iterable[str] | None = None) -> dict[str, int]:
        """Tokens of the prompt each stage is believed to hold (stages holding none left out)."""
        out = {}
        for stage_id in self._stages if stage_ids is None else stage_ids:
            tokens = self.cached_tokens(stage_id, hashes, num_prompt_tokens)
            if tokens:
                out[stage_id] = tokens
        return out

    def forget(self, stage_id: str) -> None:
        self._stages.pop(stage_id, None)
