"""POST /v1/chat/completions: chat template (tools, template kwargs), structured output, tool calls out.

Parts:
- `chat_route(engine)`: the handler. The conversation is rendered with the model's template
  (`tools`, `chat_template_kwargs`, `add_generation_prompt`, `continue_final_message`); the
  grammar is the structured output's or the forced tool call's (api/openai_tools.py); the output
  becomes `content` or `tool_calls` (legacy `function_call`), `finish_reason` "tool_calls".
  Streamed: a named call's arguments stream as they are generated; a "required" call, or a call
  found in free output, comes whole at the end (content before it streams as it comes).
- `render_prompt(tok, body, plan)`: the prompt text.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from api.openai_options import check_grammar, structured_grammar
from api.openai_routes import build_generation_requests, chat_logprobs, pick_best, respond, sse, usage_of_runs
from api.openai_schema import (ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
                               ChatCompletionResponse, ChatDelta, ChatMessageOut, FunctionCallDelta, FunctionCallOut,
                               ToolCallDelta, ToolCallOut)
from api.openai_tools import (ParsedCall, ToolPlan, ToolStreamSplitter, parse_forced_calls, parse_tool_calls, plan_tools,
                              template_messages)
from api.contract import EngineLike, check_model
from scheduler.errors import InvalidRequestError
from scheduler.request import GenerationOutput
from scheduler.tokenizer import Tokenizer

_RESERVED = {"messages", "tools", "add_generation_prompt"}


def render_prompt(tok: Tokenizer, body: ChatCompletionRequest, plan: ToolPlan) -> str:
    kwargs = dict(body.chat_template_kwargs or {})
    clash = _RESERVED & set(kwargs)
    if clash:
        raise InvalidRequestError(f"chat_template_kwargs may not set {', '.join(sorted(clash))}")
    if plan.tools:
        kwargs["tools"] = plan.tools
    messages = template_messages(body.messages)
    text = tok.apply_chat_template(messages, body.add_generation_prompt, **kwargs)
    if body.continue_final_message:
        final = messages[-1].get("content")
        if not isinstance(final, str) or not final:
            raise InvalidRequestError("continue_final_message needs a final message with text content")
        at = text.rfind(final)
        if at < 0:
            raise InvalidRequestError("the chat template does not show the final message verbatim; cannot continue it")
        text = text[: at + len(final)]
    return text


def _calls_out(calls: list[ParsedCall]) -> list[ToolCallOut]:
    return [ToolCallOut(id=c.id, function=FunctionCallOut(name=c.name, arguments=c.arguments)) for c in calls]


def chat_route(engine: EngineLike) -> Callable[..., Any]:
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        check_model(engine, body.model)
        tok = engine.tokenizer
        plan = plan_tools(body, tok.chat_template)
        grammar = structured_grammar(body)
        if plan.forced:
            if grammar is not None:
                raise InvalidRequestError("a forced tool call (tool_choice required or named) and a structured "
                                          "output option cannot be combined")
            grammar = plan.grammar()
            check_grammar("tools", *grammar)
        # rendered and tokenised off the event loop: a long conversation must not stall every other stream
        prompt_ids = await asyncio.to_thread(lambda: tok.encode(render_prompt(tok, body, plan), add_special_tokens=False))
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        num_top = (body.top_logprobs or 0) if body.logprobs else None
        gen_requests = build_generation_requests(engine, rid, prompt_ids, body, body.max_new_tokens, num_top, grammar)
        created, model = int(time.time()), engine.model_id
        n_prompt = len(prompt_ids)
        eos = set(tok.eos_token_ids)

        def chunk(index: int, delta: ChatDelta, finish: str | None = None, lp: Any = None) -> bytes:
            choice = ChatChunkChoice(index=index, delta=delta, logprobs=lp, finish_reason=finish)
            return sse(ChatCompletionChunk(id=rid, created=created, model=model, choices=[choice]).model_dump_json())

        def finish_of(reason: str | None, calls: list[ParsedCall]) -> str | None:
            if calls and reason == "stop":
                return "function_call" if plan.legacy else "tool_calls"
            return reason

        def call_deltas(calls: list[ParsedCall], start: int = 0) -> list[ToolCallDelta]:
            return [ToolCallDelta(index=start + i, id=c.id, type="function",
                                  function=FunctionCallDelta(name=c.name, arguments=c.arguments))
                    for i, c in enumerate(calls)]

        async def events(steps: AsyncIterator[tuple[int, GenerationOutput]]) -> AsyncIterator[bytes]:
            started: set[int] = set()
            splitters: dict[int, ToolStreamSplitter] = {}
            texts: dict[int, str] = {}
            named_ids: dict[int, str] = {}
            seen: list[GenerationOutput] = []
            async for index, step in steps:
                seen.append(step)
                if index not in started:
                    started.add(index)
                    yield chunk(index, ChatDelta(role="assistant", content=""))
                lp = chat_logprobs(tok, step.logprobs, num_top) if num_top is not None else None
                finish = step.finish_reason
                if plan.named is not None:
                    if index not in named_ids:
                        named_ids[index] = ParsedCall(plan.named, "").id
                        first = ToolCallDelta(index=0, id=named_ids[index], type="function",
                                              function=FunctionCallDelta(name=plan.named, arguments=""))
                        yield chunk(index, ChatDelta(tool_calls=[first]))
                    if step.text:
                        yield chunk(index, ChatDelta(tool_calls=[ToolCallDelta(
                            index=0, function=FunctionCallDelta(arguments=step.text))]), None, lp)
                    if finish:
                        yield chunk(index, ChatDelta(), "tool_calls" if finish == "stop" else finish)
                    continue
                if plan.forced:  # required: the JSON array comes whole at the end
                    texts[index] = texts.get(index, "") + step.text
                    if finish:
                        calls = parse_forced_calls(texts[index], plan)
                        if calls:
                            yield chunk(index, ChatDelta(tool_calls=call_deltas(calls)), None, lp)
                        else:
                            yield chunk(index, ChatDelta(content=texts[index]), None, lp)
                        yield chunk(index, ChatDelta(), finish_of(finish, calls))
                    continue
                text = step.text
                calls: list[ParsedCall] = []
                if plan.parses:
                    splitter = splitters.setdefault(index, ToolStreamSplitter(plan.format))
                    text = splitter.feed(text)
                    if finish:
                        rest, calls = splitter.finish()
                        text += rest
                if text or lp is not None:
                    yield chunk(index, ChatDelta(content=text), None, lp)
                if calls:
                    yield chunk(index, ChatDelta(tool_calls=call_deltas(calls)))
                if finish:
                    yield chunk(index, ChatDelta(), finish_of(finish, calls))
            if body.include_usage:
                total = usage_of_runs(n_prompt, [seen])
                yield sse(ChatCompletionChunk(id=rid, created=created, model=model, choices=[], usage=total).model_dump_json())

        def whole(runs: list[list[GenerationOutput]]) -> ChatCompletionResponse:
            choices = []
            for index, steps in enumerate(pick_best(runs, body.n)):
                lp = chat_logprobs(tok, [x for s in steps for x in s.logprobs], num_top) if num_top is not None else None
                text = "".join(s.text for s in steps)
                reason = steps[-1].finish_reason if steps else "length"
                content: str | None = text
                calls: list[ParsedCall] = []
                if plan.forced:
                    calls = parse_forced_calls(text, plan)
                elif plan.parses:
                    raw = text
                    if plan.format == "mistral":  # its marker is a special token: decode it too
                        raw = tok.decode([t for s in steps for t in s.token_ids if t not in eos], skip_special_tokens=False)
                    parsed_content, calls = parse_tool_calls(raw, plan.format)
                    if calls:
                        content = parsed_content
                if calls:
                    content = content if not plan.forced else None
                message = ChatMessageOut(content=content)
                if calls and plan.legacy:
                    message.function_call = FunctionCallOut(name=calls[0].name, arguments=calls[0].arguments)
                elif calls:
                    message.tool_calls = _calls_out(calls)
                choices.append(ChatChoice(index=index, message=message, logprobs=lp, finish_reason=finish_of(reason, calls)))
            total = usage_of_runs(n_prompt, runs)
            return ChatCompletionResponse(id=rid, created=created, model=model, choices=choices, usage=total)

        return await respond(engine, request, gen_requests, body.stream, events, whole)

    return chat_completions
