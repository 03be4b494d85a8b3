"""What /v1/completions and /v1/chat/completions share: requests in, GenerationRequests to the engine.

Parts:
- `build_openai_router(engine)`: the two routes (api/openai_completions.py, api/openai_chat.py).
- `check_prompt(...)`, `build_generation_requests(...)`: ids + OpenAI options -> one
  `GenerationRequest` per choice (context checks, `max_new_tokens`, api/openai_options.py
  sampling, a seed per choice); `pick_best` keeps best_of's n best.
- `respond(...)`, `merged(...)`: every choice run at once; streamed, their outputs interleave
  as they come (each tagged with its choice), else the whole body at the end.
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
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from api.openai_schema import (
    ChatCompletionRequest,
    ChatLogprobs,
    ChatTokenLogprob,
    ChatTopLogprob,
    CompletionLogprobs,
    CompletionRequest,
    PromptTokensDetails,
    Usage,
)
from api.contract import EngineLike, error_body, potluck_error_body
from scheduler.errors import InvalidRequestError, PotluckError, PromptTooLongError
from scheduler.request import GenerationOutput, GenerationRequest, TokenLogprob
from scheduler.tokenizer import Tokenizer
from api.openai_options import choice_seed, sampling_params

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


def check_prompt(engine: EngineLike, prompt_ids: Sequence[int], max_tokens: int | None, param: str) -> None:
    """Token ids in the vocabulary, prompt + completion within the context (400 otherwise)."""
    n = len(prompt_ids)
    if n == 0:
        raise InvalidRequestError("the prompt is empty")
    vocab = engine.tokenizer.vocab_size
    bad = [i for i in prompt_ids if not 0 <= i < vocab]
    if bad:
        raise InvalidRequestError(f"prompt token ids out of range [0, {vocab}): {bad[:5]}")
    limit = engine.max_model_len
    if n >= limit or (max_tokens is not None and n + max_tokens > limit):
        asked = f" However, you requested {n + (max_tokens or 0)} tokens ({n} in the prompt, {max_tokens or 0} " \
                "in the completion)." if max_tokens is not None else f" However, the prompt has {n} tokens."
        exc = PromptTooLongError(f"This model's maximum context length is {limit} tokens.{asked} "
                                 "Please reduce the length of the prompt or of the completion.")
        exc.param = param  # type: ignore[attr-defined]
        raise exc


def build_generation_requests(
    engine: EngineLike,
    request_id: str,
    prompt_ids: Sequence[int],
    body: CompletionRequest | ChatCompletionRequest,
    max_tokens: int | None,
    num_top_logprobs: int | None,
    grammar: tuple[str, str] | None = None,
    prompt_logprobs: int | None = None,
) -> list[GenerationRequest]:
    """One GenerationRequest per sampled choice (`best_of`, else `n`): each runs on its own
    (its prompt prefilled once per choice), with its own seed (`choice_seed`)."""
    param = "messages" if isinstance(body, ChatCompletionRequest) else "prompt"
    check_prompt(engine, prompt_ids, max_tokens, param)
    tok = engine.tokenizer
    count = body.best_of or body.n
    if count > body.n and num_top_logprobs is None:
        num_top_logprobs = 0  # best_of ranks choices by their summed logprobs
    out = []
    for index in range(count):
        sampling = sampling_params(
            body, vocab_size=tok.vocab_size, eos_token_ids=tok.eos_token_ids,
            max_new_tokens=max_tokens if max_tokens is not None else engine.max_model_len - len(prompt_ids),
            num_top_logprobs=num_top_logprobs, seed=choice_seed(body.seed, index), grammar=grammar,
            prompt_ids=tuple(prompt_ids), prompt_logprobs=prompt_logprobs,
        )  # fmt: skip
        rid = request_id if count == 1 else f"{request_id}-{index}"
        out.append(GenerationRequest(rid, tuple(prompt_ids), sampling, body.stop_strings, body.skip_special_tokens))
    return out


def pick_best(runs: list[list[GenerationOutput]], n: int) -> list[list[GenerationOutput]]:
    """The n runs with the highest summed token logprob (best_of), in their original order."""
    if len(runs) <= n:
        return runs
    score = [sum(lp.logprob for s in run for lp in s.logprobs) for run in runs]
    best = sorted(sorted(range(len(runs)), key=lambda i: -score[i])[:n])
    return [runs[i] for i in best]


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
    cached = max((s.num_cached_tokens for s in steps), default=0)
    return Usage(prompt_tokens=num_prompt, completion_tokens=generated, total_tokens=num_prompt + generated,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


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


class _AllOutputs:
    """Closes the engine generators of every choice (what `guarded_events` closes at the end)."""

    def __init__(self, outputs: list[AsyncIterator[GenerationOutput]]) -> None:
        self.outputs = outputs

    async def aclose(self) -> None:
        for outputs in self.outputs:
            aclose = getattr(outputs, "aclose", None)
            if aclose is not None:
                await aclose()


async def merged(starts: list[tuple[GenerationOutput | None, AsyncIterator[GenerationOutput]]]
                 ) -> AsyncIterator[tuple[int, GenerationOutput]]:
    """(choice index, output) of every choice as they come."""
    if len(starts) == 1:
        async for output in following(*starts[0]):
            yield 0, output
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, first: GenerationOutput | None, outputs: AsyncIterator[GenerationOutput]) -> None:
        try:
            async for output in following(first, outputs):
                await queue.put((index, output))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer
            await queue.put((index, exc))
        finally:
            await queue.put((index, None))

    tasks = [asyncio.ensure_future(pump(i, first, outputs)) for i, (first, outputs) in enumerate(starts)]
    try:
        done = 0
        while done < len(tasks):
            index, item = await queue.get()
            if item is None:
                done += 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()


async def respond(engine: EngineLike, request: Request, gen_requests: list[GenerationRequest], stream: bool,
                  make_events: Callable[[AsyncIterator[tuple[int, GenerationOutput]]], AsyncIterator[bytes]],
                  make_body: Callable[[list[list[GenerationOutput]]], Any]) -> Response:
    """Run every choice; stream their events, or answer with the whole body."""
    if stream:
        starts = []
        try:
            for gen_request in gen_requests:
                starts.append(await start_generation(engine, gen_request))
        except BaseException:
            await _AllOutputs([o for _, o in starts]).aclose()
            raise
        closer = _AllOutputs([o for _, o in starts])
        return EventStreamResponse(guarded_events(make_events(merged(starts)), closer))  # type: ignore[arg-type]

    async def run_one(gen_request: GenerationRequest) -> list[GenerationOutput]:
        return await collect(*await start_generation(engine, gen_request))

    async def run() -> list[list[GenerationOutput]]:  # one task from start to end (queueing included)
        return list(await asyncio.gather(*(run_one(r) for r in gen_requests)))

    try:
        runs = await unless_disconnected(request, run())
    except ClientDisconnected:
        return Response(status_code=499)
    return JSONResponse(make_body(runs).model_dump())


def build_openai_router(engine: EngineLike) -> APIRouter:
    from api.openai_chat import chat_route  # they use this module's helpers
    from api.openai_completions import completions_route

    router = APIRouter()
    router.add_api_route("/v1/completions", completions_route(engine), methods=["POST"])
    router.add_api_route("/v1/chat/completions", chat_route(engine), methods=["POST"])
    return router
