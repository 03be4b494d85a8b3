"""POST /v1/completions: one or several prompts, n / best_of choices each, echo with prompt logprobs.

Parts:
- `completions_route(engine)`: the handler. Choice `index` = prompt index x n + choice; `echo`
  puts the prompt before the completion (text and, with `logprobs`, each prompt token's logprob:
  None for the first, as OpenAI and lm-eval's `local-completions` expect); vLLM's
  `prompt_logprobs` comes as its own list. Streamed choices interleave as their tokens arrive.
- `echo_logprobs(tok, prompt_ids, entries, num_top)`: the prompt part of `logprobs`.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from api.openai_options import structured_grammar
from api.openai_routes import (CompletionLogprobBuilder, build_generation_requests, pick_best, respond, sse,
                               usage_of_runs, _lp)
from api.openai_schema import (CompletionChunk, CompletionChunkChoice, CompletionLogprobs, CompletionOutChoice,
                               CompletionRequest, CompletionResponse, PromptLogprobEntry, PromptTokensDetails, Usage)
from api.contract import EngineLike, check_model
from scheduler.request import GenerationOutput, GenerationRequest
from scheduler.tokenizer import Tokenizer

PromptEntries = Sequence[tuple[float, Sequence[tuple[int, float]]]]


def echo_logprobs(tok: Tokenizer, prompt_ids: Sequence[int], entries: PromptEntries, num_top: int) -> CompletionLogprobs:
    out = CompletionLogprobs()
    offset = 0
    for i, token_id in enumerate(prompt_ids):
        text = tok.token_text(token_id)
        out.tokens.append(text)
        out.text_offset.append(offset)
        offset += len(text)
        if i == 0 or i - 1 >= len(entries):
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        logprob, top = entries[i - 1]
        out.token_logprobs.append(_lp(logprob))
        alternatives = {tok.token_text(t): _lp(v) for t, v in top[:num_top]}
        alternatives.setdefault(text, _lp(logprob))
        out.top_logprobs.append(alternatives if num_top > 0 else None)
    return out


def _vllm_prompt_logprobs(tok: Tokenizer, prompt_ids: Sequence[int], entries: PromptEntries
                          ) -> list[dict[str, PromptLogprobEntry] | None]:
    out: list[dict[str, PromptLogprobEntry] | None] = [None]
    for token_id, (logprob, top) in zip(prompt_ids[1:], entries):
        item = {str(token_id): PromptLogprobEntry(logprob=_lp(logprob), decoded_token=tok.token_text(token_id))}
        for rank, (t, v) in enumerate(top, start=1):
            item.setdefault(str(t), PromptLogprobEntry(logprob=_lp(v), rank=rank, decoded_token=tok.token_text(t)))
        out.append(item)
    return out


def _join(a: CompletionLogprobs, b: CompletionLogprobs) -> CompletionLogprobs:
    shift = (a.text_offset[-1] + len(a.tokens[-1])) if a.tokens else 0
    return CompletionLogprobs(tokens=a.tokens + b.tokens, token_logprobs=a.token_logprobs + b.token_logprobs,
                              top_logprobs=a.top_logprobs + b.top_logprobs,
                              text_offset=a.text_offset + [o + shift for o in b.text_offset])


def completions_route(engine: EngineLike) -> Callable[..., Any]:
    async def completions(body: CompletionRequest, request: Request) -> Response:
        check_model(engine, body.model)
        tok = engine.tokenizer
        rid = f"cmpl-{uuid.uuid4().hex}"
        grammar = structured_grammar(body)
        wants_prompt_lp = (body.echo and body.logprobs is not None) or body.prompt_logprobs is not None
        prompt_k = max(body.logprobs or 0, body.prompt_logprobs or 0) if wants_prompt_lp else None
        prompts: list[list[int]] = []
        texts: list[str] = []
        gen_requests: list[GenerationRequest] = []
        for i, prompt in enumerate(body.prompts):
            # tokenised off the event loop: a long prompt must not stall every other stream
            ids = await asyncio.to_thread(tok.encode, prompt) if isinstance(prompt, str) else list(prompt)
            prompts.append(ids)
            texts.append(prompt if isinstance(prompt, str) else tok.decode(ids))
            gen_requests += build_generation_requests(engine, rid if len(body.prompts) == 1 else f"{rid}-{i}", ids, body, body.max_tokens, body.logprobs,
                                                      grammar, prompt_k)
        per_prompt = body.best_of or body.n
        created, model = int(time.time()), engine.model_id
        num_top = body.logprobs or 0

        def prompt_of(sub: int) -> int:
            return sub // per_prompt

        def prompt_part(p: int, entries: PromptEntries) -> CompletionLogprobs | None:
            return echo_logprobs(tok, prompts[p], entries, num_top) if body.echo and body.logprobs is not None else None

        async def events(steps: AsyncIterator[tuple[int, GenerationOutput]]) -> AsyncIterator[bytes]:
            builders: dict[int, CompletionLogprobBuilder] = {}
            echoed: set[int] = set()
            seen: dict[int, list[GenerationOutput]] = {}
            async for sub, step in steps:
                seen.setdefault(sub, []).append(step)
                p = prompt_of(sub)
                text, lp = step.text, None
                if body.logprobs is not None:
                    lp = builders.setdefault(sub, CompletionLogprobBuilder(tok, num_top)).build(step.logprobs)
                if body.echo and sub not in echoed:
                    echoed.add(sub)
                    text = texts[p] + text
                    part = prompt_part(p, step.prompt_logprobs)
                    if part is not None and lp is not None:
                        lp = _join(part, lp)
                if not (text or step.logprobs or step.finish_reason):
                    continue
                choice = CompletionChunkChoice(index=sub, text=text, logprobs=lp, finish_reason=step.finish_reason)
                yield sse(CompletionChunk(id=rid, created=created, model=model, choices=[choice]).model_dump_json())
            if body.include_usage:
                total = _usage_sum([usage_of_runs(len(prompts[p]), [seen.get(sub, []) for sub in range(p * per_prompt, (p + 1) * per_prompt)])
                                    for p in range(len(prompts))])
                yield sse(CompletionChunk(id=rid, created=created, model=model, choices=[], usage=total).model_dump_json())

        def whole(runs: list[list[GenerationOutput]]) -> CompletionResponse:
            choices, usages = [], []
            for p in range(len(prompts)):
                all_runs = runs[p * per_prompt:(p + 1) * per_prompt]
                group = pick_best(all_runs, body.n)
                for j, steps in enumerate(group):
                    lp = None
                    if body.logprobs is not None:
                        lp = CompletionLogprobBuilder(tok, num_top).build([x for s in steps for x in s.logprobs])
                    entries = next((s.prompt_logprobs for r in all_runs for s in r if s.prompt_logprobs), ())
                    text = "".join(s.text for s in steps)
                    if body.echo:
                        text = texts[p] + text
                        part = prompt_part(p, entries)
                        if part is not None and lp is not None:
                            lp = _join(part, lp)
                    choice = CompletionOutChoice(
                        index=p * body.n + j, text=text, logprobs=lp,
                        finish_reason=steps[-1].finish_reason if steps else "length",
                        prompt_logprobs=_vllm_prompt_logprobs(tok, prompts[p], entries)
                        if body.prompt_logprobs is not None and j == 0 else None)
                    choices.append(choice)
                usages.append(usage_of_runs(len(prompts[p]), all_runs))
            return CompletionResponse(id=rid, created=created, model=model, choices=choices, usage=_usage_sum(usages))

        return await respond(engine, request, gen_requests, body.stream, events, whole)

    return completions


def _usage_sum(usages: list[Usage]) -> Usage:
    """OpenAI counts each prompt once and every choice's completion tokens."""
    prompt = sum(u.prompt_tokens for u in usages)
    completion = sum(u.completion_tokens for u in usages)
    cached = sum(u.prompt_tokens_details.cached_tokens for u in usages if u.prompt_tokens_details is not None)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))
