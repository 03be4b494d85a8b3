"""Choosing the next token from the last stage's logits.

Parts:
- `SampledToken`: token id, its logprob and the top logprobs (when asked for).
- `sample(logits, params, token_indices)`: greedy (temperature 0, one vectorised argmax for the
  batch) or temperature / top-k / top-p sampling. With a `seed`, the draw for generated-token
  index i uses a generator seeded from (seed, i) alone, so re-running a request from any index
  (fault recovery) reproduces the same tokens whatever else shares the batch.
- `generator_seed(seed, index)`: that 64-bit seed.

Logprobs are log_softmax of the raw (untempered, unfiltered) logits, computed only for rows whose
`num_top_logprobs` is not None; `top_logprobs` holds that many (token, logprob) pairs, best first.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
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
        return torch.arange(vocab), torch.softmax(scaled, dim=-1)
    probs = torch.softmax(values, dim=-1)
    if params.top_p < 1.0:
        before = torch.cumsum(probs, dim=-1) - probs  # mass of strictly better tokens
        keep = before < params.top_p  # the best token is always kept
        probs = probs * keep
        probs = probs / probs.sum()
    return ids, probs


def sample(
    logits: torch.Tensor, params: Sequence[SamplingParams], token_indices: Sequence[int]
) -> list[SampledToken]:
    """logits: float32 [B, V]; params / token_indices: one per row. Returns one SampledToken per row."""
    if logits.shape[0] != len(params) or len(params) != len(token_indices):
        raise ValueError(f"{logits.shape[0]} logit rows, {len(params)} params, {len(token_indices)} indices")
    logits = logits.detach().float().cpu()
    token_ids = logits.argmax(dim=-1).tolist()  # greedy for every row; sampled rows overwrite
    for row, (p, index) in enumerate(zip(params, token_indices)):
        if p.temperature <= 0.0:
            continue
        ids, probs = _filtered_probs(logits[row], p)
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
