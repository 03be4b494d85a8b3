"""POST /v1/completions and /v1/chat/completions: requests in, GenerationRequests to the engine.

Parts:
- `build_openai_router(engine)`: the two routes, streamed (SSE) and not.
- `build_generation_request(...)`: ids + OpenAI options -> `GenerationRequest` (context checks,
  `max_new_tokens`, sampling, eos ids, logprobs).
- `EventStreamResponse`: an SSE response that watches for the client going away and then closes
  the event generator (and with it the engine's generator, which aborts the request).
- `sse(data)`: one `data: ...\\n\\n` event; a failure mid-stream is sent as `data: {"error": ...}`
  followed by `data: [DONE]`.
- `CompletionLogprobBuilder`, `chat_logprobs`: engine `TokenLogprob`s in each API's own shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from api.openai_schema import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatMessageOut,
    ChatTokenLogprob,
    ChatTopLogprob,
    CompletionChoice,
    CompletionChunk,
    CompletionChunkChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    Usage,
)
from api.contract import EngineLike, check_model, error_body, potluck_error_body
from scheduler.errors import InvalidRequestError, PotluckError, PromptTooLongError
from scheduler.request import GenerationOutput, GenerationRequest, TokenLogprob
from scheduler.tokenizer import Tokenizer
from workers.protocol import SamplingParams

log = logging.getLogger(__name__)
T = TypeVar("T")
_MIN_LOGPROB = -9999.0  # JSON has no -inf


def sse(data: str) -> bytes:
    return f"data: {data}\n\n".encode()


DONE = sse("[DONE]")


class ClientDisconnected(Exception):
    pass


class EventStreamResponse(Response):
    """Streams `events`; on client disconnect cancels them; always closes the generator."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes]) -> None:
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # no body: no Content-Length
        self.events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:

                async def stream() -> None:
                    await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
                    async for chunk in self.events:
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                while (await receive())["type"] != "http.disconnect":
                    pass
                group.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                aclose = getattr(self.events, "aclose", None)
                if aclose is not None:
                    await aclose()


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Run `work`; if the client goes away first, cancel it (the engine aborts the request)."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task  # let the engine's generator close before answering
    if task.cancelled():
        raise ClientDisconnected()
    return task.result()


def build_generation_request(
    engine: EngineLike,
    request_id: str,
    prompt_ids: Sequence[int],
    body: CompletionRequest | ChatCompletionRequest,
    max_tokens: int | None,
    num_top_logprobs: int | None,
) -> GenerationRequest:
    tok = engine.tokenizer
    n = len(prompt_ids)
    if n == 0:
        raise InvalidRequestError("the prompt is empty")
    vocab = tok.vocab_size
    bad = [i for i in prompt_ids if not 0 <= i < vocab]
    if bad:
        raise InvalidRequestError(f"prompt token ids out of range [0, {vocab}): {bad[:5]}")
    limit = engine.max_model_len
    if n >= limit or (max_tokens is not None and n + max_tokens > limit):
        asked = f" However, you requested {n + (max_tokens or 0)} tokens ({n} in the prompt, {max_tokens or 0} " \
                "in the completion)." if max_tokens is not None else f" However, the prompt has {n} tokens."
        exc = PromptTooLongError(f"This model's maximum context length is {limit} tokens.{asked} "
                                 "Please reduce the length of the prompt or of the completion.")
        exc.param = "messages" if isinstance(body, ChatCompletionRequest) else "prompt"  # type: ignore[attr-defined]
        raise exc
    top_k = body.top_k if body.top_k is not None and body.top_k > 0 else 0
    sampling = SamplingParams(
        max_new_tokens=max_tokens if max_tokens is not None else limit - n,
        temperature=1.0 if body.temperature is None else float(body.temperature),
        top_p=1.0 if body.top_p is None else float(body.top_p),
        top_k=min(top_k, vocab),
        seed=body.seed,
        eos_token_ids=tok.eos_token_ids,
        ignore_eos=body.ignore_eos,
        num_top_logprobs=num_top_logprobs,
    )
    return GenerationRequest(request_id, tuple(prompt_ids), sampling, body.stop_strings, body.skip_special_tokens)


async def start_generation(engine: EngineLike, request: GenerationRequest) -> tuple[GenerationOutput | None,
                                                                                   AsyncIterator[GenerationOutput]]:
    """Call the engine and wait for the first output, so errors before it become plain HTTP errors."""
    outputs = engine.generate(request)
    try:
        return await outputs.__anext__(), outputs
    except StopAsyncIteration:
        return None, outputs
    except BaseException:
        aclose = getattr(outputs, "aclose", None)
        if aclose is not None:
            await aclose()
        raise


async def collect(first: GenerationOutput | None, outputs: AsyncIterator[GenerationOutput]) -> list[GenerationOutput]:
    steps = [first] if first is not None else []
    try:
        if first is not None and first.finish_reason is None:
            async for output in outputs:
                steps.append(output)
                if output.finish_reason is not None:
                    break
    finally:
        aclose = getattr(outputs, "aclose", None)
        if aclose is not None:
            await aclose()
    return steps


def usage(num_prompt: int, steps: Sequence[GenerationOutput]) -> Usage:
    generated = max((s.num_generated_tokens for s in steps), default=0) or sum(len(s.token_ids) for s in steps)
    return Usage(prompt_tokens=num_prompt, completion_tokens=generated, total_tokens=num_prompt + generated)


def _lp(value: float) -> float:
    return value if value > _MIN_LOGPROB else _MIN_LOGPROB


class CompletionLogprobBuilder:
    """/v1/completions logprobs: tokens, token_logprobs, top_logprobs, text_offset (from 0)."""

    def __init__(self, tok: Tokenizer, num_top: int) -> None:
        self.tok, self.num_top, self.offset = tok, num_top, 0

    def build(self, logprobs: Sequence[TokenLogprob]) -> CompletionLogprobs:
        out = CompletionLogprobs()
        for lp in logprobs:
            text = self.tok.token_text(lp.token_id)
            out.tokens.append(text)
            out.token_logprobs.append(_lp(lp.logprob))
            top = {self.tok.token_text(t): _lp(v) for t, v in lp.top_logprobs[: self.num_top]}
            out.top_logprobs.append(top if self.num_top > 0 else None)
            out.text_offset.append(self.offset)
            self.offset += len(text)
        return out


def chat_logprobs(tok: Tokenizer, logprobs: Sequence[TokenLogprob], num_top: int) -> ChatLogprobs:
    def top(token_id: int, value: float) -> ChatTopLogprob:
        return ChatTopLogprob(token=tok.token_text(token_id), logprob=_lp(value), bytes=list(tok.token_bytes(token_id)))

    content = []
    for lp in logprobs:
        first = top(lp.token_id, lp.logprob)
        alternatives = [top(t, v) for t, v in lp.top_logprobs[:num_top]]
        content.append(ChatTokenLogprob(**first.model_dump(), top_logprobs=alternatives))
    return ChatLogprobs(content=content)


async def guarded_events(events: AsyncIterator[bytes], outputs: AsyncIterator[GenerationOutput]) -> AsyncIterator[bytes]:
    """Mid-stream failures become an SSE error event; the engine's generator is always closed."""
    try:
        async for event in events:
            yield event
    except PotluckError as exc:
        yield sse(json.dumps(potluck_error_body(exc)))
    except Exception:  # noqa: BLE001 - the client still gets an error event
        log.exception("generation failed mid-stream")
        yield sse(json.dumps(error_body("internal server error", "server_error")))
    finally:
        aclose = getattr(outputs, "aclose", None)
        if aclose is not None:
            with anyio.CancelScope(shield=True):
                await aclose()
    yield DONE


async def following(first: GenerationOutput | None, outputs: AsyncIterator[GenerationOutput]) -> AsyncIterator[GenerationOutput]:
    if first is None:
        return
    yield first
    if first.finish_reason is not None:
        return
    async for output in outputs:
        yield output
        if output.finish_reason is not None:
            return


def build_openai_router(engine: EngineLike) -> APIRouter:
    router = APIRouter()

    async def respond(request: Request, gen_request: GenerationRequest, stream: bool,
                      make_events: Callable[[AsyncIterator[GenerationOutput]], AsyncIterator[bytes]],
                      make_body: Callable[[list[GenerationOutput]], Any]) -> Response:
        if stream:
            first, outputs = await start_generation(engine, gen_request)
            return EventStreamResponse(guarded_events(make_events(following(first, outputs)), outputs))

        async def run() -> list[GenerationOutput]:  # one task from start to end (queueing included)
            return await collect(*await start_generation(engine, gen_request))

        try:
            steps = await unless_disconnected(request, run())
        except ClientDisconnected:
            return Response(status_code=499)
        return JSONResponse(make_body(steps).model_dump())

    @router.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        check_model(engine, body.model)
        tok = engine.tokenizer
        # tokenised off the event loop: a long prompt must not stall every other stream
        prompt_ids = await asyncio.to_thread(tok.encode, body.prompt) if isinstance(body.prompt, str) else list(body.prompt)  # type: ignore[arg-type]
        rid = f"cmpl-{uuid.uuid4().hex}"
        gen_request = build_generation_request(engine, rid, prompt_ids, body, body.max_tokens, body.logprobs)
        created, model = int(time.time()), engine.model_id
        num_top = body.logprobs or 0
        n_prompt = len(prompt_ids)

        async def events(steps: AsyncIterator[GenerationOutput]) -> AsyncIterator[bytes]:
            builder, seen = CompletionLogprobBuilder(tok, num_top), []
            async for step in steps:
                seen.append(step)
                if not (step.text or step.logprobs or step.finish_reason):
                    continue
                lp = builder.build(step.logprobs) if body.logprobs is not None else None
                choice = CompletionChunkChoice(text=step.text, logprobs=lp, finish_reason=step.finish_reason)
                yield sse(CompletionChunk(id=rid, created=created, model=model, choices=[choice]).model_dump_json())
            if body.include_usage:
                chunk = CompletionChunk(id=rid, created=created, model=model, choices=[], usage=usage(n_prompt, seen))
                yield sse(chunk.model_dump_json())

        def whole(steps: list[GenerationOutput]) -> CompletionResponse:
            lp = None
            if body.logprobs is not None:
                lp = CompletionLogprobBuilder(tok, num_top).build([x for s in steps for x in s.logprobs])
            choice = CompletionChoice(text="".join(s.text for s in steps), logprobs=lp,
                                      finish_reason=steps[-1].finish_reason if steps else "length")
            return CompletionResponse(id=rid, created=created, model=model, choices=[choice], usage=usage(n_prompt, steps))

        return await respond(request, gen_request, body.stream, events, whole)

    @router.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        check_model(engine, body.model)
        tok = engine.tokenizer
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        prompt_ids = await asyncio.to_thread(
            lambda: tok.encode(tok.apply_chat_template(messages, body.add_generation_prompt), add_special_tokens=False))
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        num_top = (body.top_logprobs or 0) if body.logprobs else None
        gen_request = build_generation_request(engine, rid, prompt_ids, body, body.max_new_tokens, num_top)
        created, model = int(time.time()), engine.model_id
        n_prompt = len(prompt_ids)

        async def events(steps: AsyncIterator[GenerationOutput]) -> AsyncIterator[bytes]:
            role = ChatChunkChoice(delta=ChatDelta(role="assistant", content=""))
            yield sse(ChatCompletionChunk(id=rid, created=created, model=model, choices=[role]).model_dump_json())
            seen = []
            async for step in steps:
                seen.append(step)
                if not (step.text or step.logprobs or step.finish_reason):
                    continue
                lp = chat_logprobs(tok, step.logprobs, num_top) if num_top is not None else None
                delta = ChatDelta(content=step.text) if step.text or not step.finish_reason else ChatDelta()
                choice = ChatChunkChoice(delta=delta, logprobs=lp, finish_reason=step.finish_reason)
                yield sse(ChatCompletionChunk(id=rid, created=created, model=model, choices=[choice]).model_dump_json())
            if body.include_usage:
                chunk = ChatCompletionChunk(id=rid, created=created, model=model, choices=[], usage=usage(n_prompt, seen))
                yield sse(chunk.model_dump_json())

        def whole(steps: list[GenerationOutput]) -> ChatCompletionResponse:
            lp = chat_logprobs(tok, [x for s in steps for x in s.logprobs], num_top) if num_top is not None else None
            message = ChatMessageOut(content="".join(s.text for s in steps))
            choice = ChatChoice(message=message, logprobs=lp, finish_reason=steps[-1].finish_reason if steps else "length")
            return ChatCompletionResponse(id=rid, created=created, model=model, choices=[choice],
                                          usage=usage(n_prompt, steps))

        return await respond(request, gen_request, body.stream, events, whole)

    return router
