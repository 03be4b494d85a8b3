"""Every field a worker computes with, checked before compute: one message must not break a stage.

Parts:
- limits: `MAX_ROUTE_STAGES`, `MAX_PROMPT_TOKENS`, `MAX_TOP_LOGPROBS`, `MAX_NEW_TOKENS`.
- `check_start(start, data_address)`: a request's route and sampling (ranges, finite numbers, this
  stage on the route); `check_sampling(sampling)` alone (the scheduler's check before routing),
  the agents' fields included (penalties, min-p, logit bias, grammar kind and size, prompt logprobs).
- `check_token_ids(token_ids, vocab_size)`: prompt / next-token ids within the vocabulary.
- `check_entries(entries)`: positions and row counts of an `Activations` (the tensor's shape is
  checked against them where it is decoded).
Each raises `ProtocolError` with a one-line reason; the worker drops the message (and tells the
scheduler when a request can no longer run), and stays up.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from workers import protocol as p

MAX_ROUTE_STAGES = 256
MAX_PROMPT_TOKENS = 1 << 20
MAX_NEW_TOKENS = 1 << 20
MAX_TOP_LOGPROBS = 20


def check_start(start: p.RequestStart, data_address: str) -> None:
    route = start.route
    if not 0 < len(route) <= MAX_ROUTE_STAGES or len(set(route)) != len(route):
        raise p.ProtocolError(f"a route of {len(route)} stages (1..{MAX_ROUTE_STAGES}, no stage twice)")
    if data_address not in route:
        raise p.ProtocolError(f"{data_address} is not on the route")
    if not start.scheduler_address.startswith("tcp://"):
        raise p.ProtocolError("the scheduler address must be tcp://HOST:PORT")
    if not 0 <= start.first_token_index <= MAX_NEW_TOKENS:
        raise p.ProtocolError(f"first_token_index {start.first_token_index} out of range")
    if len(start.block_hashes) > MAX_PROMPT_TOKENS:
        raise p.ProtocolError(f"{len(start.block_hashes)} prefix block hashes")
    check_sampling(start.sampling)


def check_sampling(sampling: p.SamplingParams) -> None:
    """Sampling values a stage can run (also checked by the scheduler before routing: a 400)."""
    if not 1 <= sampling.max_new_tokens <= MAX_NEW_TOKENS:
        raise p.ProtocolError(f"max_new_tokens {sampling.max_new_tokens} out of range 1..{MAX_NEW_TOKENS}")
    if not (math.isfinite(sampling.temperature) and 0.0 <= sampling.temperature <= 100.0):
        raise p.ProtocolError(f"temperature {sampling.temperature} out of range 0..100")
    if not (math.isfinite(sampling.top_p) and 0.0 < sampling.top_p <= 1.0):
        raise p.ProtocolError(f"top_p {sampling.top_p} out of range (0, 1]")
    if sampling.top_k < 0:
        raise p.ProtocolError(f"top_k {sampling.top_k} is negative")
    if sampling.seed is not None and not -(2**63) <= sampling.seed < 2**64:
        raise p.ProtocolError(f"seed {sampling.seed} out of the 64-bit range")
    if sampling.num_top_logprobs is not None and not 0 <= sampling.num_top_logprobs <= MAX_TOP_LOGPROBS:
        raise p.ProtocolError(f"num_top_logprobs {sampling.num_top_logprobs} out of range 0..{MAX_TOP_LOGPROBS}")
    if len(sampling.eos_token_ids) > 1024:
        raise p.ProtocolError("more than 1024 eos token ids")
    _check_agent_sampling(sampling)


MAX_GRAMMAR_CHARS = 1 << 20
MAX_LISTED_TOKENS = 1 << 16  # logit_bias entries, stop token ids
GRAMMAR_KINDS = ("", "json_schema", "json_object", "regex", "choice", "ebnf")  # workers/grammar.py


def _check_agent_sampling(sampling: p.SamplingParams) -> None:
    """The fields the agents work added (penalties, min-p, logit bias, grammar, prompt logprobs):
    OpenAI's / vLLM's ranges, as api/openai_schema.py accepts them."""
    if not all(math.isfinite(v) and -2.0 <= v <= 2.0 for v in (sampling.presence_penalty, sampling.frequency_penalty)):
        raise p.ProtocolError("presence / frequency penalty out of range -2..2")
    if not (math.isfinite(sampling.repetition_penalty) and 0.0 < sampling.repetition_penalty <= 10.0):
        raise p.ProtocolError(f"repetition_penalty {sampling.repetition_penalty} out of range (0, 10]")
    if not (math.isfinite(sampling.min_p) and 0.0 <= sampling.min_p <= 1.0):
        raise p.ProtocolError(f"min_p {sampling.min_p} out of range 0..1")
    if len(sampling.logit_bias) > MAX_LISTED_TOKENS or len(sampling.stop_token_ids) > MAX_LISTED_TOKENS:
        raise p.ProtocolError(f"more than {MAX_LISTED_TOKENS} logit_bias entries or stop token ids")
    if not all(math.isfinite(bias) and -100.0 <= bias <= 100.0 for _, bias in sampling.logit_bias):
        raise p.ProtocolError("a logit_bias value out of range -100..100")
    if not 0 <= sampling.min_tokens <= MAX_NEW_TOKENS:
        raise p.ProtocolError(f"min_tokens {sampling.min_tokens} out of range 0..{MAX_NEW_TOKENS}")
    if sampling.grammar_kind not in GRAMMAR_KINDS or len(sampling.grammar) > MAX_GRAMMAR_CHARS:
        raise p.ProtocolError(f"grammar of kind {sampling.grammar_kind[:40]!r} and {len(sampling.grammar)} characters")
    if sampling.prompt_logprobs is not None and not 0 <= sampling.prompt_logprobs <= MAX_TOP_LOGPROBS:
        raise p.ProtocolError(f"prompt_logprobs {sampling.prompt_logprobs} out of range 0..{MAX_TOP_LOGPROBS}")
    if len(sampling.prompt_token_ids) > MAX_PROMPT_TOKENS or len(sampling.output_token_ids) > MAX_NEW_TOKENS:
        raise p.ProtocolError("too many prompt or output token ids in the sampling parameters")


def check_token_ids(token_ids: Sequence[int], vocab_size: int) -> None:
    if not 0 < len(token_ids) <= MAX_PROMPT_TOKENS:
        raise p.ProtocolError(f"{len(token_ids)} token ids (1..{MAX_PROMPT_TOKENS})")
    low, high = min(token_ids), max(token_ids)
    if low < 0 or high >= vocab_size:
        raise p.ProtocolError(f"token id {low if low < 0 else high} outside the vocabulary (0..{vocab_size - 1})")


def check_entries(entries: Sequence[p.ActivationEntry]) -> None:
    if not entries:
        raise p.ProtocolError("activations without entries")
    seen: set[str] = set()
    for entry in entries:
        if entry.num_tokens < 1 or not 0 <= entry.start_position <= MAX_PROMPT_TOKENS + MAX_NEW_TOKENS:
            raise p.ProtocolError(f"entry {entry.request_id}: {entry.num_tokens} rows at position {entry.start_position}")
        if entry.request_id in seen:
            raise p.ProtocolError(f"request {entry.request_id} twice in one message")
        seen.add(entry.request_id)
