"""OpenAI / vLLM request options -> the sampling message the last stage applies.

Parts:
- `structured_grammar(body)`: `response_format` (json_object, json_schema), vLLM's `guided_json`,
  `guided_regex`, `guided_choice`, `guided_grammar` and `structured_outputs` -> one grammar
  (kind, text) or None; more than one, or one that does not compile, is a 400.
- `sampling_params(engine, body, ...)`: every sampling option in `SamplingParams` (penalties,
  min_p, logit_bias, min_tokens, stop_token_ids, grammar, prompt logprobs), checked against the
  vocabulary.
- `choice_seed(seed, index)`: the seed of choice `index` of an n > 1 request (choice 0 keeps the
  request's seed, so n=1 and the first of n draw the same tokens).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from api.openai_schema import _Request
from scheduler.errors import InvalidRequestError
from workers.grammar import GrammarError, build_grammar
from workers.protocol import SamplingParams


def _schema_text(schema: Any, where: str) -> str:
    if isinstance(schema, str):
        return schema
    if isinstance(schema, dict):
        return json.dumps(schema)
    raise InvalidRequestError(f"{where} must be a JSON schema object")


def structured_grammar(body: _Request) -> tuple[str, str] | None:
    """The one grammar the request asks for, checked (InvalidRequestError when it does not compile)."""
    found: list[tuple[str, str, str]] = []  # (option, kind, text)
    fmt = body.response_format
    if fmt is not None:
        kind = fmt.get("type", "text")
        if kind == "json_object":
            found.append(("response_format", "json_object", ""))
        elif kind == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict) or "schema" not in spec:
                raise InvalidRequestError("response_format json_schema needs {'json_schema': {'name': ..., 'schema': {...}}}")
            found.append(("response_format", "json_schema", _schema_text(spec["schema"], "json_schema.schema")))
        elif kind != "text":
            raise InvalidRequestError(f"response_format type {kind!r} is not supported (text, json_object, json_schema)")
    if body.guided_json is not None:
        found.append(("guided_json", "json_schema", _schema_text(body.guided_json, "guided_json")))
    if body.guided_regex is not None:
        found.append(("guided_regex", "regex", body.guided_regex))
    if body.guided_choice is not None:
        found.append(("guided_choice", "choice", json.dumps(body.guided_choice)))
    if body.guided_grammar is not None:
        found.append(("guided_grammar", "ebnf", body.guided_grammar))
    so = body.structured_outputs
    if so is not None:
        options = [("structured_outputs.json", "json_schema", _schema_text(so.json_, "structured_outputs.json"))
                   if so.json_ is not None else None,
                   ("structured_outputs.regex", "regex", so.regex) if so.regex is not None else None,
                   ("structured_outputs.choice", "choice", json.dumps(so.choice)) if so.choice is not None else None,
                   ("structured_outputs.grammar", "ebnf", so.grammar) if so.grammar is not None else None,
                   ("structured_outputs.json_object", "json_object", "") if so.json_object else None]
        found.extend(o for o in options if o is not None)
    if not found:
        return None
    if len(found) > 1:
        raise InvalidRequestError(f"only one structured output option per request (got {', '.join(f[0] for f in found)})")
    option, kind, text = found[0]
    check_grammar(option, kind, text)
    return kind, text


def check_grammar(option: str, kind: str, text: str) -> None:
    try:
        build_grammar(kind, text)
    except (GrammarError, json.JSONDecodeError) as exc:
        raise InvalidRequestError(f"{option}: {exc}") from None


def choice_seed(seed: int | None, index: int) -> int | None:
    if seed is None or index == 0:
        return seed
    digest = hashlib.blake2b(f"{seed}/choice/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def sampling_params(
    body: _Request,
    *,
    vocab_size: int,
    eos_token_ids: tuple[int, ...],
    max_new_tokens: int,
    num_top_logprobs: int | None,
    seed: int | None,
    grammar: tuple[str, str] | None,
    prompt_ids: tuple[int, ...] = (),
    prompt_logprobs: int | None = None,
) -> SamplingParams:
    bias = []
    for key, value in (body.logit_bias or {}).items():
        token_id = int(key)
        if not 0 <= token_id < vocab_size:
            raise InvalidRequestError(f"logit_bias token id {token_id} is out of range [0, {vocab_size})")
        bias.append((token_id, float(value)))
    stop_ids = tuple(body.stop_token_ids or ())
    bad = [t for t in stop_ids if not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequestError(f"stop_token_ids out of range [0, {vocab_size}): {bad[:5]}")
    if body.min_tokens > max_new_tokens:
        raise InvalidRequestError(f"min_tokens ({body.min_tokens}) is more than max_tokens ({max_new_tokens})")
    top_k = body.top_k if body.top_k is not None and body.top_k > 0 else 0
    needs_prompt = prompt_logprobs is not None or body.repetition_penalty != 1.0
    return SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=1.0 if body.temperature is None else float(body.temperature),
        top_p=1.0 if body.top_p is None else float(body.top_p),
        top_k=min(top_k, vocab_size),
        seed=seed,
        eos_token_ids=eos_token_ids,
        ignore_eos=body.ignore_eos,
        num_top_logprobs=num_top_logprobs,
        presence_penalty=float(body.presence_penalty),
        frequency_penalty=float(body.frequency_penalty),
        repetition_penalty=float(body.repetition_penalty),
        min_p=float(body.min_p),
        logit_bias=tuple(bias),
        min_tokens=body.min_tokens,
        stop_token_ids=stop_ids,
        grammar_kind=grammar[0] if grammar else "",
        grammar=grammar[1] if grammar else "",
        prompt_logprobs=prompt_logprobs,
        prompt_token_ids=prompt_ids if needs_prompt else (),
    )
