"""A prompt's first chunk at a stage, as a batch is about to run: prefix caching's decision.

Parts:
- `PromptStarts`: the items to run now, the prefix misses (a later stage holds less of the
  prefix than the first stage reused) and the prompts that can never fit.
- `start_prompts(batch, requests, backend)`: in batch order, each prompt start asks the backend
  for its cached prefix (`StageBackend.cache_prompt`): the first stage reuses what it holds and
  starts the prompt's forward there (the block with the last prompt token is always computed:
  its hidden state is needed); a later stage must hold exactly what the first stage reused (its
  hashes ride on the first hop, `RequestStart.block_hashes`), else the first stage is told
  (`PrefixMiss`) and prefills again reusing at most what this stage holds, so a miss never
  repeats more often than blocks were evicted. A prompt that does not fit yet stays pending
  with every prompt behind it (first in, first out).

Each start allocates its request's blocks and publishes its full prompt blocks before the batch
runs: a later prompt of the same batch sharing the prefix reuses them, since every layer writes
the batch's K/V before attention reads any (workers/stage_model.py), so N concurrent requests
with one prefix prefill it once per stage.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from workers.backend import KVCacheFull, StageBackend
from workers.batching import StageRequest, WorkItem


@dataclass
class PromptStarts:
    run: list[WorkItem] = field(default_factory=list)
    misses: list[tuple[WorkItem, int]] = field(default_factory=list)  # (item, tokens this stage holds)
    never_fit: list[WorkItem] = field(default_factory=list)


def start_prompts(
    batch: Sequence[WorkItem], requests: Mapping[str, StageRequest], backend: StageBackend
) -> PromptStarts:
    out = PromptStarts()
    blocked = False
    for item in batch:
        if not item.is_prompt_start:
            out.run.append(item)
            continue
        if blocked:
            continue  # stays pending
        state = requests[item.request_id]
        hashes = state.start.block_hashes
        num_prompt_tokens = item.start_position + item.num_tokens
        want = item.prefix_cap_tokens if backend.is_first else item.start_position
        if backend.is_first and state.start.sampling.prompt_logprobs is not None:
            want = 0  # prompt logprobs need every prompt row's logits: nothing reused
        if not backend.is_first and want:
            held = backend.cached_prefix_tokens(hashes, num_prompt_tokens)
            if held < want:
                out.misses.append((item, held))
                continue
        try:
            reused = backend.cache_prompt(item.request_id, hashes, num_prompt_tokens, want)
        except KVCacheFull:
            blocked = True
            if len(requests) <= 1:  # alone and still too long: it never will fit
                out.never_fit.append(item)
            continue
        item.is_prompt_start = False
        if backend.is_first and reused:
            item.inputs = item.inputs[reused:]
            item.start_position = reused
        state.position = item.start_position
        state.cached_tokens = item.start_position
        out.run.append(item)
    return out
