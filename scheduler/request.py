"""What the API hands the scheduler, and what the scheduler streams back.

Parts:
- `GenerationRequest`: a tokenised prompt with its sampling parameters and stop strings;
  `within_context(max_model_len)` checks the prompt and caps `max_new_tokens` to the context.
- `TokenLogprob`: one generated token with its log-probability and the top alternatives.
- `GenerationOutput`: one streamed step: new text, new tokens, and the finish reason at the end.
- `resumed_sampling(sampling, generated)`: the sampling of a run that resumes after `generated`
  tokens (recovery): fewer new tokens, those tokens for the last stage to replay (grammar,
  penalties), no prompt logprobs again.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from scheduler.errors import PromptTooLongError
from workers.protocol import SamplingParams


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams  # max_new_tokens, temperature, top_p, top_k, seed, eos ids, logprobs
    stop: tuple[str, ...] = ()  # generation ends before the first occurrence of any of these
    skip_special_tokens: bool = True

    def within_context(self, max_model_len: int) -> GenerationRequest:
        """This request with `max_new_tokens` capped to the context left after the prompt (at
        least 1); PromptTooLongError for an empty prompt or one that fills the context."""
        num_prompt = len(self.prompt_token_ids)
        if num_prompt == 0:
            raise PromptTooLongError("the prompt is empty")
        if num_prompt >= max_model_len:
            raise PromptTooLongError(f"the prompt has {num_prompt} tokens; this model's context is {max_model_len} tokens")
        max_new = max(1, min(self.sampling.max_new_tokens, max_model_len - num_prompt))
        return replace(self, sampling=replace(self.sampling, max_new_tokens=max_new))


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top_logprobs: tuple[tuple[int, float], ...] = ()  # (token id, logprob), best first


@dataclass(frozen=True)
class GenerationOutput:
    """One streamed step. Concatenating every `text` gives the completion (stop string excluded)."""

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token in token_ids, when requested
    finish_reason: str | None = None  # None while running; "stop" or "length" at the end
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0  # so far, including this step
    # with the first token when asked for: (logprob, top (id, logprob)...) of prompt tokens 1..N-1
    prompt_logprobs: tuple[tuple[float, tuple[tuple[int, float], ...]], ...] = ()

    num_cached_tokens: int = 0  # prompt tokens whose KV the prefix cache held (known from the first token)


def resumed_sampling(sampling: SamplingParams, generated: tuple[int, ...]) -> SamplingParams:
    """`sampling` for a run that starts after `generated` (its prompt is the prompt + them)."""
    if not generated:
        return sampling
    return replace(sampling, max_new_tokens=sampling.max_new_tokens - len(generated), output_token_ids=generated,
                   prompt_logprobs=None, min_tokens=max(0, sampling.min_tokens - len(generated)))
