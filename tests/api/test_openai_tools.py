"""Tool-call formats (no server): parsing Hermes / Llama 3 / Mistral output, the stream splitter,
the forced-call grammar, and the history handed to templates."""

from __future__ import annotations

import json

from api.openai_schema import ChatCompletionRequest
from api.openai_tools import (ToolStreamSplitter, parse_forced_calls, parse_tool_calls, plan_tools, template_messages,
                              tool_format)
from workers.grammar import build_grammar

TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}}}


def test_format_from_template() -> None:
    assert tool_format("{% for t in tools %}<tool_call>{% endfor %}") == "hermes"
    assert tool_format("<|start_header_id|>ipython<|end_header_id|>") == "llama3_json"
    assert tool_format("[AVAILABLE_TOOLS] ... [TOOL_CALLS]") == "mistral"


def test_parse_each_format() -> None:
    content, calls = parse_tool_calls('Sure.<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>'
                                      '<tool_call>{"name": "g", "arguments": {}}</tool_call>', "hermes")
    assert content == "Sure." and [(c.name, json.loads(c.arguments)) for c in calls] == [("f", {"x": 1}), ("g", {})]
    content, calls = parse_tool_calls('<|python_tag|>{"name": "f", "parameters": {"x": 2}}', "llama3_json")
    assert content is None and calls[0].name == "f" and json.loads(calls[0].arguments) == {"x": 2}
    content, calls = parse_tool_calls('[TOOL_CALLS][{"name": "f", "arguments": {"x": 3}}]', "mistral")
    assert calls[0].name == "f" and json.loads(calls[0].arguments) == {"x": 3}
    assert parse_tool_calls("<tool_call>{not json</tool_call>", "hermes") == ("<tool_call>{not json</tool_call>", [])
    assert parse_tool_calls("plain words", "hermes") == ("plain words", [])
    assert len({c.id for c in calls}) == len(calls) and calls[0].id.startswith("call_")


def test_stream_splitter_releases_content_and_holds_calls() -> None:
    splitter = ToolStreamSplitter("hermes")
    pieces = ["Hel", "lo <to", "ol_call>{\"name\": \"f\", ", "\"arguments\": {}}</tool_call>"]
    released = "".join(splitter.feed(p) for p in pieces)
    rest, calls = splitter.finish()
    assert released + rest == "Hello " and [c.name for c in calls] == ["f"]
    plain = ToolStreamSplitter("hermes")
    text = "a <b> <tool c"
    assert "".join(plain.feed(ch) for ch in text) + plain.finish()[0] == text


def test_forced_grammar_and_parse() -> None:
    body = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}], "tools": [TOOL],
                                                 "tool_choice": "required", "parallel_tool_calls": False})
    plan = plan_tools(body, None)
    kind, text = plan.grammar()
    assert json.loads(text)["maxItems"] == 1
    build_grammar(kind, text)
    assert [c.name for c in parse_forced_calls('[{"name": "f", "arguments": {"x": 1}}]', plan)] == ["f"]
    named = plan_tools(ChatCompletionRequest.model_validate({
        "messages": [{"role": "user", "content": "x"}], "tools": [TOOL],
        "tool_choice": {"type": "function", "function": {"name": "f"}}}), None)
    assert named.grammar()[1] == json.dumps(TOOL["function"]["parameters"])
    assert parse_forced_calls('{"x": 5}', named)[0].arguments == '{"x": 5}'
    legacy = plan_tools(ChatCompletionRequest.model_validate({
        "messages": [{"role": "user", "content": "x"}], "functions": [TOOL["function"]], "function_call": {"name": "f"}}), None)
    assert legacy.legacy and legacy.named == "f"


def test_history_as_templates_expect() -> None:
    body = ChatCompletionRequest.model_validate({"messages": [
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "3"}]})
    assistant, tool = template_messages(body.messages)
    assert assistant["content"] is None and assistant["tool_calls"][0]["function"]["arguments"] == {"x": 1}
    assert tool == {"role": "tool", "content": "3", "tool_call_id": "call_1"}
