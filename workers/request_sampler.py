"""The last stage's per-request sampling state: penalties' token counts, grammar matchers, prompt logprobs.

Parts:
- `StageSampler`: what the worker calls on the last stage. `wants_all_logits(params, start, n)`
  says whether a prefill chunk needs logits at every row (prompt logprobs);
  `sample(request_ids, params, indices, logits, chunk_rows)` adjusts the logits of the requests
  that need it (workers/sampling.py `adjust_logits`, workers/grammar.py masks), samples, advances
  each grammar, and returns the tokens with each request's prompt logprobs (once, with its first
  token); `forget(request_id)` when the request leaves the stage.
- `_RequestState`: one request: generated-token counts, prompt + output ids (repetition penalty),
  its `RequestGrammar`, the prompt logprobs gathered so far.

A request resumed after a worker loss brings the tokens it had generated
(`SamplingParams.output_token_ids`): counts and the grammar are replayed through them, so the
resumed run constrains and penalises exactly as the first one would have.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from workers.grammar import GrammarCompiler, RequestGrammar
from workers.protocol import SamplingParams
from workers.sampling import SampledToken, adjust_logits, prompt_logprobs, sample

PromptLogprobs = tuple[tuple[float, tuple[tuple[int, float], ...]], ...]


def _needs_state(params: SamplingParams) -> bool:
    return bool(params.grammar_kind or params.logit_bias or params.presence_penalty or params.frequency_penalty
                or params.repetition_penalty != 1.0 or params.min_tokens)


@dataclass
class _RequestState:
    params: SamplingParams
    counts: Counter = field(default_factory=Counter)
    seen: list[int] = field(default_factory=list)  # prompt + output (repetition penalty)
    grammar: RequestGrammar | None = None
    prompt_logprobs: list = field(default_factory=list)
    prompt_logprobs_sent: bool = False


class StageSampler:
    def __init__(self, model_dir: str, vocab_size: int) -> None:
        self.model_dir = model_dir
        self.vocab_size = vocab_size
        self._compilers: dict[tuple[int, ...], GrammarCompiler] = {}  # by stop token ids
        self._states: dict[str, _RequestState] = {}

    def wants_all_logits(self, params: SamplingParams, start_position: int, num_tokens: int) -> bool:
        return params.prompt_logprobs is not None and num_tokens > 1 and start_position < len(params.prompt_token_ids)

    def forget(self, request_id: str) -> None:
        self._states.pop(request_id, None)

    def _state(self, request_id: str, params: SamplingParams) -> _RequestState:
        state = self._states.get(request_id)
        if state is None:
            state = _RequestState(params)
            state.counts.update(params.output_token_ids)
            if params.repetition_penalty != 1.0:
                state.seen = [*params.prompt_token_ids, *params.output_token_ids]
            if params.grammar_kind:
                stops = tuple(dict.fromkeys((*params.eos_token_ids, *params.stop_token_ids)))
                compiler = self._compilers.get(stops)
                if compiler is None:
                    compiler = self._compilers[stops] = GrammarCompiler(self.model_dir, self.vocab_size, stops)
                compiled = compiler.compile(params.grammar_kind, params.grammar)
                state.grammar = RequestGrammar(compiled, self.vocab_size, stops, params.output_token_ids)
            self._states[request_id] = state
        return state

    def sample(self, request_ids: Sequence[str], params: Sequence[SamplingParams], indices: Sequence[int],
               logits: torch.Tensor, chunk_rows: Sequence[int]) -> list[tuple[SampledToken, PromptLogprobs]]:
        """logits: [sum(chunk_rows), V]: each request's rows (several for a prompt whose logprobs
        are asked for, its last row predicting the next token). Returns (token, prompt logprobs)."""
        logits = logits.detach().float().cpu()
        last_rows = []
        row = 0
        for i, (rid, p, rows) in enumerate(zip(request_ids, params, chunk_rows)):
            if rows > 1:  # logits of a prompt chunk: position j predicts prompt token j + 1
                state = self._state(rid, p)
                start = len(state.prompt_logprobs) + 1
                next_ids = p.prompt_token_ids[start:start + rows - 1]
                part = prompt_logprobs(logits[row:row + len(next_ids)], next_ids, p.prompt_logprobs or 0)
                state.prompt_logprobs.extend(part)
            row += rows
            last_rows.append(row - 1)
        picked = logits if len(last_rows) == logits.shape[0] else logits[torch.tensor(last_rows)]
        processed = None
        for i, (rid, p) in enumerate(zip(request_ids, params)):
            if not _needs_state(p):
                continue
            state = self._state(rid, p)
            if processed is None:
                processed = picked.clone()
            seen = torch.tensor(state.seen, dtype=torch.int64) if state.seen else None
            adjust_logits(processed[i], p, state.counts, seen, sum(state.counts.values()))
            if state.grammar is not None:
                state.grammar.mask(processed[i])
        tokens = sample(picked, params, indices, processed)
        results = []
        for i, (rid, p, token) in enumerate(zip(request_ids, params, tokens)):
            state = self._states.get(rid)
            prompt_part: PromptLogprobs = ()
            if state is not None:
                state.counts[token.token_id] += 1
                if state.seen or p.repetition_penalty != 1.0:
                    state.seen.append(token.token_id)
                if state.grammar is not None:
                    state.grammar.accept(token.token_id)
                if p.prompt_logprobs is not None and not state.prompt_logprobs_sent:
                    prompt_part, state.prompt_logprobs_sent = tuple(state.prompt_logprobs), True
                    state.prompt_logprobs = []
            results.append((token, prompt_part))
        return results
