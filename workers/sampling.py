"""Choosing the next token from the last stage's logits.

Parts:
- `SampledToken`: token id, its logprob and the top logprobs (when asked for).
- `sample(logits, params, token_indices)`: greedy (temperature 0, one vectorised argmax for the
  batch) or temperature / top-k / top-p sampling. With a `seed`, the draw for generated-token
  index i uses a generator seeded from (seed, i) alone, so re-running a request from any index
  (fault recovery) reproduces the same tokens whatever else shares the batch.
- `generator_seed(seed, index)`: that 64-bit seed.
- `adjust_logits(row, params, output_counts, seen_ids, num_generated)`: logit_bias, repetition /
  presence / frequency penalties and min_tokens, in place on one row (before the grammar mask).
- `prompt_logprobs(logits, next_ids, num_top)`: each prompt token's logprob given what precedes it.

min_p drops tokens whose probability (after temperature) is below min_p x the best one's.
Logprobs are log_softmax of the raw (untempered, unfiltered) logits, computed only for rows whose
`num_top_logprobs` is not None; `top_logprobs` holds that many (token, logprob) pairs, best first.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from workers.protocol import SamplingParams


@dataclass(frozen=True)
class SampledToken:
    token_id: int
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()


def generator_seed(seed: int, index: int) -> int:
    """A 63-bit seed that depends only on (seed, token index)."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _filtered_probs(row: torch.Tensor, params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
    """(candidate token ids, their probabilities) after temperature, top-k and top-p."""
    scaled = row / params.temperature  # [V]
    vocab = scaled.shape[0]
    if 0 < params.top_k < vocab:
        values, ids = torch.topk(scaled, params.top_k)  # sorted, best first
    elif params.top_p < 1.0:
        values, ids = torch.sort(scaled, descending=True)
    else:
        values, ids = scaled, torch.arange(vocab)
    probs = torch.softmax(values, dim=-1)
    if params.min_p > 0.0:
        probs = probs * (probs >= params.min_p * probs.max())
        probs = probs / probs.sum()
    if params.top_p < 1.0:
        before = torch.cumsum(probs, dim=-1) - probs  # mass of strictly better tokens
        keep = before < params.top_p  # the best token is always kept
        probs = probs * keep
        probs = probs / probs.sum()
    return ids, probs


def adjust_logits(row: torch.Tensor, params: SamplingParams, output_counts: Mapping[int, int],
                  seen_ids: torch.Tensor | None, num_generated: int) -> None:
    """logit_bias, penalties and min_tokens on one float32 row [V], in place.

    output_counts: token id -> times generated so far; seen_ids: prompt + output ids for the
    repetition penalty (None when it is off); num_generated: tokens generated so far."""
    vocab = row.shape[0]
    for token_id, bias in params.logit_bias:
        if 0 <= token_id < vocab:
            row[token_id] += bias
    if params.repetition_penalty != 1.0 and seen_ids is not None and seen_ids.numel():
        values = row[seen_ids]
        row[seen_ids] = torch.where(values > 0, values / params.repetition_penalty, values * params.repetition_penalty)
    if (params.presence_penalty or params.frequency_penalty) and output_counts:
        ids = torch.tensor(list(output_counts), dtype=torch.int64)
        counts = torch.tensor(list(output_counts.values()), dtype=row.dtype)
        row[ids] -= params.frequency_penalty * counts + params.presence_penalty
    if num_generated < params.min_tokens:
        banned = [t for t in (*params.eos_token_ids, *params.stop_token_ids) if 0 <= t < vocab]
        if banned:
            row[torch.tensor(banned)] = float("-inf")


def prompt_logprobs(logits: torch.Tensor, next_ids: Sequence[int], num_top: int
                    ) -> tuple[tuple[float, tuple[tuple[int, float], ...]], ...]:
    """logits [N, V] at prompt positions 0..N-1; next_ids: the N prompt tokens at 1..N. Returns
    each one's (logprob, top `num_top` (id, logprob) pairs)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, torch.tensor(list(next_ids), dtype=torch.int64)[:, None]).squeeze(1).tolist()
    tops: list[tuple[tuple[int, float], ...]] = [()] * len(chosen)
    if num_top > 0:
        values, ids = torch.topk(logprobs, min(num_top, logprobs.shape[1]), dim=-1)
        tops = [tuple(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    return tuple(zip(chosen, tops))


def sample(
    logits: torch.Tensor, params: Sequence[SamplingParams], token_indices: Sequence[int],
    processed: torch.Tensor | None = None,
) -> list[SampledToken]:
    """logits: float32 [B, V]; params / token_indices: one per row. Returns one SampledToken per row.

    processed: the logits after `adjust_logits` and grammar masks, which choose the token
    (logprobs stay those of the raw `logits`); None: the raw logits choose."""
    if logits.shape[0] != len(params) or len(params) != len(token_indices):
        raise ValueError(f"{logits.shape[0]} logit rows, {len(params)} params, {len(token_indices)} indices")
    logits = logits.detach().float().cpu()
    chooser = logits if processed is None else processed
    token_ids = chooser.argmax(dim=-1).tolist()  # greedy for every row; sampled rows overwrite
    for row, (p, index) in enumerate(zip(params, token_indices)):
        if p.temperature <= 0.0:
            continue
        ids, probs = _filtered_probs(chooser[row], p)
        generator = None
        if p.seed is not None:
            generator = torch.Generator().manual_seed(generator_seed(p.seed, index))
        # Exponential-race draw: argmax(p / E), E ~ Exp(1), picks i with probability p_i.
        noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
        token_ids[row] = int(ids[torch.argmax(probs / noise)])

    want = [row for row, p in enumerate(params) if p.num_top_logprobs is not None]
    results = [SampledToken(token_id) for token_id in token_ids]
    if want:
        rows = torch.tensor(want)
        logprobs = torch.log_softmax(logits[rows], dim=-1)  # [len(want), V]
        chosen = logprobs.gather(1, torch.tensor([[token_ids[r]] for r in want])).squeeze(1).tolist()
        max_top = max(params[r].num_top_logprobs or 0 for r in want)
        top_values, top_ids = (
            torch.topk(logprobs, min(max_top, logprobs.shape[1]), dim=-1) if max_top else (None, None)
        )
        for i, row in enumerate(want):
            n = params[row].num_top_logprobs or 0
            top: tuple[tuple[int, float], ...] = ()
            if n:
                top = tuple(zip(top_ids[i, :n].tolist(), top_values[i, :n].tolist()))
            results[row] = SampledToken(token_ids[row], chosen[i], top)
    return results
