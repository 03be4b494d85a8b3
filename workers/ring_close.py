"""What the last stage of a pipeline sends once it has sampled: the ring closes.

Parts:
- `RingClose`: the messages of one step, by address: each request's `NextToken` to its first
  stage (the next decode step's input, or "finished": free it), each `TokenOutput` to the
  scheduler that streams it, and the requests that finished here.
- `close_ring(states, indices, sampled, worker_id)`: builds it; a request finishes on one of its
  eos ids (unless `ignore_eos`), one of its `stop_token_ids` or at `max_new_tokens`. Pure apart from counting each request's
  generated tokens (`StageRequest.num_generated`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from workers import protocol as p
from workers.batching import StageRequest
from workers.request_sampler import PromptLogprobs
from workers.sampling import SampledToken


@dataclass(frozen=True)
class RingClose:
    next_tokens: dict[str, p.NextTokens]  # first-stage data address -> its requests' next inputs
    token_outputs: dict[str, p.TokenOutputs]  # scheduler address -> tokens to stream
    finished: tuple[str, ...]  # request ids that ended at this step


def close_ring(
    states: Sequence[StageRequest], indices: Sequence[int],
    sampled: Sequence[SampledToken | tuple[SampledToken, PromptLogprobs]], worker_id: str
) -> RingClose:
    """`states` (positions already advanced past this step), each request's output index and token
    (or (token, prompt logprobs), sent with it)."""
    outputs: dict[str, list[p.TokenOutput]] = {}
    next_tokens: dict[str, list[p.NextToken]] = {}
    finished: list[str] = []
    for state, index, item in zip(states, indices, sampled):
        token, prompt_part = item if isinstance(item, tuple) else (item, ())
        sampling = state.start.sampling
        state.num_generated += 1
        reason = None
        if (token.token_id in sampling.eos_token_ids and not sampling.ignore_eos) or token.token_id in sampling.stop_token_ids:
            reason = "stop"
        elif state.num_generated >= sampling.max_new_tokens:
            reason = "length"
        outputs.setdefault(state.start.scheduler_address, []).append(
            p.TokenOutput(state.request_id, index, token.token_id, reason, token.logprob, token.top_logprobs, prompt_part,
                          num_cached_tokens=state.cached_tokens if state.num_generated == 1 else 0)
        )
        next_tokens.setdefault(state.start.route[0], []).append(
            p.NextToken(state.request_id, token.token_id, state.position, finished=reason is not None)
        )
        if reason is not None:
            finished.append(state.request_id)
    return RingClose(
        {address: p.NextTokens(tuple(items)) for address, items in next_tokens.items()},
        {address: p.TokenOutputs(worker_id, tuple(items)) for address, items in outputs.items()},
        tuple(finished),
    )
