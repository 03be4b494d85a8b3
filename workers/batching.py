"""What one worker step runs: the requests a stage holds, the work pending, and the batch policy.

Parts:
- `StageRequest`: what a stage knows of one request (route, position, sampling state).
- `WorkItem`: pending work for one request (a prompt chunk, a token, or hidden states).
- `take_batch(pending, requests, ...)`: prefills up to a token budget, plus a decode batch sized
  for the pipeline: one microbatch per stage across machines; on one machine (a co-located
  ring) the whole ring at once, held (bounded) until the requests still in the ring are back.
  A pure function of its arguments: the worker calls it each step with the clock's time.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from workers import protocol as p

MAX_PREFILL_TOKENS_PER_STEP = 4096
# A co-located ring runs one batch: the first stage holds its decodes until every request in the
# ring is back, so that groups that started apart (a prefill behind a few decodes) merge into one
# instead of running side by side on the same cores. It waits for a request no longer than
# RING_RETURN_FACTOR x (its last step here x stages on its route) + RING_MERGE_WAIT_S after it
# left (`ring_deadline_s`), and never more than RING_MERGE_MAX_WAIT_S in all.
RING_MERGE_WAIT_S = 0.1
RING_RETURN_FACTOR = 2.0
RING_MERGE_MAX_WAIT_S = 2.0


@dataclass
class StageRequest:
    request_id: str
    start: p.RequestStart
    next_address: str | None = None  # the stage after this one on the route (None: last stage)
    position: int = 0  # tokens in this stage's KV cache
    num_generated: int = 0  # tokens sampled so far in this run (last stage)
    ring_deadline_s: float = 0.0  # first stage: when its next token is overdue (monotonic)
    prompt: np.ndarray | None = None  # first stage: the prompt's token ids (a prefix miss prefills again)
    cached_tokens: int = 0  # prompt tokens reused from this stage's prefix cache

    def left_stage(self, now_s: float, step_s: float) -> None:
        """This stage ran a step for the request: when its next token is due back (first stage)."""
        self.ring_deadline_s = now_s + RING_RETURN_FACTOR * step_s * len(self.start.route) + RING_MERGE_WAIT_S


@dataclass
class WorkItem:
    request_id: str
    start_position: int
    inputs: np.ndarray  # token ids [n] (first stage) or hidden [n, hidden_size]
    forward_start: p.RequestStart | None = None  # meta to pass along (first hop only)
    arrived_s: float = field(default_factory=time.monotonic)
    # a prompt's first chunk at this stage: its cached prefix is looked up when it runs
    # (workers/worker.py); the first stage reuses at most `prefix_cap_tokens` (None: no cap),
    # a later stage exactly `start_position` (what the first stage reused)
    is_prompt_start: bool = False
    prefix_cap_tokens: int | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.inputs.shape[0])


def take_batch(
    pending: Sequence[WorkItem],
    requests: Mapping[str, StageRequest],
    *,
    is_first: bool,
    num_stages_hint: int,
    now_s: float,
) -> tuple[list[WorkItem], float]:
    """(the batch to run now, the time until which decodes are held; 0.0: not held)."""
    prefills: list[WorkItem] = []
    decodes: list[WorkItem] = []
    for item in pending:  # a prefill brings a prompt (or a request's first token) to this stage
        (prefills if item.num_tokens > 1 or item.start_position == 0 else decodes).append(item)
    batch: list[WorkItem] = []
    budget = MAX_PREFILL_TOKENS_PER_STEP
    for item in prefills:
        if batch and item.num_tokens > budget:
            break
        batch.append(item)
        budget -= item.num_tokens
    if is_first and decodes:
        if num_stages_hint > 1:  # one microbatch per stage keeps every stage busy
            decodes = decodes[: max(1, math.ceil(len(requests) / num_stages_hint))]
        else:  # one batch: wait (bounded) until every request in the ring is back
            back = {item.request_id for item in decodes}
            due_s = [s.ring_deadline_s for s in requests.values() if s.position > 0 and s.request_id not in back]
            oldest_s = min(item.arrived_s for item in decodes)
            hold_until_s = min(max(due_s), oldest_s + RING_MERGE_MAX_WAIT_S) if due_s else 0.0
            if now_s < hold_until_s:
                return batch, hold_until_s
    batch.extend(decodes)
    return batch, 0.0
