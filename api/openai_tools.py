"""Tool calling: which tools the template sees, what grammar forces a call, and the model's output as calls.

Parts:
- `ToolPlan`: one request's tools (as the chat template gets them), the format its output is
  parsed in, and the grammar that forces a call (`tool_choice` "required" or a named function).
  `plan_tools(body, chat_template)` builds it (legacy `functions` / `function_call` included).
- `tool_format(chat_template)`: hermes (Qwen / Hermes `<tool_call>{json}</tool_call>`),
  llama3_json (Llama 3.x `{"name": ..., "parameters": ...}`, after an optional `<|python_tag|>`)
  or mistral (`[TOOL_CALLS][{...}]`), chosen from the chat template's text.
- `ParsedCall`, `parse_tool_calls(text, fmt)`: free output -> (content, calls);
  `parse_forced_calls(text, plan)`: the output of a forced call (plain JSON) -> calls.
- `ToolStreamSplitter`: a streamed free output split into content deltas and, at the end, calls.
- `template_messages(messages)`: history as templates expect it: `content: None` kept,
  `tool_calls` / `tool_call_id` kept, each call's JSON arguments as a mapping.

A forced call is constrained to plain JSON, whatever the family: a named function's output is
its arguments object; "required" is a JSON array of {"name", "arguments"} (at most one item when
`parallel_tool_calls` is false). The grammar follows each function's parameter schema, so even
a random-weight model returns arguments that validate.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from api.openai_schema import ChatCompletionRequest, ChatMessage, FunctionCallIn, ToolCallIn
from scheduler.errors import InvalidRequestError

_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
_ANY_OBJECT: dict[str, Any] = {"type": "object"}


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # JSON text
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")


@dataclass(frozen=True)
class ToolPlan:
    tools: list[dict[str, Any]]  # {"type": "function", "function": {...}} as templates take them
    format: str
    choice: str  # "none" | "auto" | "required" | "named"
    named: str | None = None  # the function a named choice forces
    legacy: bool = False  # the request used `functions`: answer with `function_call`
    parallel: bool = True

    @property
    def parses(self) -> bool:
        return bool(self.tools) and self.choice != "none"

    @property
    def forced(self) -> bool:
        return self.choice in ("required", "named")

    def grammar(self) -> tuple[str, str]:
        """(kind, text) of the grammar that forces the call."""
        schemas = {t["function"]["name"]: t["function"].get("parameters") or _ANY_OBJECT for t in self.tools}
        if self.named is not None:
            return "json_schema", json.dumps(schemas[self.named])
        items = [{"type": "object", "properties": {"name": {"const": name}, "arguments": schema},
                  "required": ["name", "arguments"], "additionalProperties": False}
                 for name, schema in schemas.items()]
        array: dict[str, Any] = {"type": "array", "minItems": 1, "items": items[0] if len(items) == 1 else {"anyOf": items}}
        if not self.parallel:
            array["maxItems"] = 1
        return "json_schema", json.dumps(array)


def tool_format(chat_template: str | None) -> str:
    template = chat_template or ""
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if "<tool_call>" in template:
        return "hermes"
    if "<|python_tag|>" in template or "ipython" in template:
        return "llama3_json"
    return "hermes"


def plan_tools(body: ChatCompletionRequest, chat_template: str | None) -> ToolPlan:
    legacy = bool(body.functions)
    if legacy:
        tools = [{"type": "function", "function": f.model_dump(exclude_none=True)} for f in body.functions or []]
        choice_in: Any = body.function_call
    else:
        tools = [t.model_dump(exclude_none=True) for t in body.tools or []]
        choice_in = body.tool_choice
    names = [t["function"]["name"] for t in tools]
    if len(set(names)) != len(names):
        raise InvalidRequestError("tool names must be unique")
    named = None
    if isinstance(choice_in, dict):
        function = choice_in.get("function") if "function" in choice_in else choice_in
        named = function.get("name") if isinstance(function, dict) else None
        if named not in names:
            raise InvalidRequestError(f"tool_choice names {named!r}, which is not among the tools ({', '.join(names) or 'none'})")
        choice = "named"
    else:
        choice = choice_in or ("auto" if tools else "none")
    if choice in ("required", "auto") and not tools:
        raise InvalidRequestError(f"tool_choice {choice!r} needs tools")
    return ToolPlan(tools, tool_format(chat_template), choice, named, legacy, body.parallel_tool_calls)


def _arguments_text(arguments: Any) -> str:
    return arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


def _call(obj: Any, arguments_key: str = "arguments") -> ParsedCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    arguments = obj.get(arguments_key, obj.get("parameters", obj.get("arguments", {})))
    return ParsedCall(obj["name"], _arguments_text(arguments))


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, ValueError):
        return None


def parse_tool_calls(text: str, fmt: str) -> tuple[str | None, list[ParsedCall]]:
    """Free model output -> (content before the calls, or None when empty; the calls). Text that
    does not parse stays content, with no calls."""
    calls: list[ParsedCall] = []
    if fmt == "hermes" and "<tool_call>" in text:
        content = text[: text.index("<tool_call>")]
        for match in _HERMES.finditer(text):
            call = _call(_loads(match.group(1)))
            if call is None:
                return text, []
            calls.append(call)
    elif fmt == "mistral" and "[TOOL_CALLS]" in text:
        content, rest = text.split("[TOOL_CALLS]", 1)
        parsed = _loads(rest.strip())
        items = parsed if isinstance(parsed, list) else [parsed]
        calls = [c for c in (_call(item) for item in items) if c is not None]
        if len(calls) != len(items):
            return text, []
    elif fmt == "llama3_json" and text.lstrip().startswith(("{", "<|python_tag|>")):
        body = text.lstrip().removeprefix("<|python_tag|>").strip()
        content = ""
        for part in body.split(";"):
            call = _call(_loads(part.strip()), "parameters")
            if call is None:
                return text, []
            calls.append(call)
    else:
        return text, []
    return (content.strip() or None), calls


def parse_forced_calls(text: str, plan: ToolPlan) -> list[ParsedCall]:
    """The output of a forced call (constrained to JSON) -> its calls; [] when cut short."""
    parsed = _loads(text)
    if plan.named is not None:
        return [ParsedCall(plan.named, text.strip())] if isinstance(parsed, dict) else []
    if not isinstance(parsed, list):
        return []
    return [c for c in (_call(item) for item in parsed) if c is not None]


def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as chat templates expect them (transformers' conventions)."""
    out = []
    for message in messages:
        item: dict[str, Any] = {"role": message.role, "content": None}
        if message.content is not None:
            item["content"] = message.content if isinstance(message.content, str) else [
                p.model_dump() for p in message.content]
        if message.name is not None:
            item["name"] = message.name
        calls = list(message.tool_calls or [])
        if message.function_call is not None:  # legacy: one call
            calls.append(_legacy_call(message.function_call))
        if calls:
            item["tool_calls"] = [{
                "id": call.id or f"call_{i}", "type": "function",
                "function": {"name": call.function.name, "arguments": _as_mapping(call.function.arguments)},
            } for i, call in enumerate(calls)]
        if message.tool_call_id is not None:
            item["tool_call_id"] = message.tool_call_id
        if message.role == "function":  # legacy function result: a tool message to templates
            item["role"] = "tool"
        out.append(item)
    return out


def _legacy_call(function_call: FunctionCallIn) -> ToolCallIn:
    return ToolCallIn(function=function_call)


def _as_mapping(arguments: str | dict[str, Any]) -> Any:
    if isinstance(arguments, dict):
        return arguments
    parsed = _loads(arguments) if arguments else {}
    return parsed if isinstance(parsed, dict) else arguments


_MARKERS = {"hermes": "<tool_call>", "mistral": "[TOOL_CALLS]", "llama3_json": "<|python_tag|>"}


class ToolStreamSplitter:
    """Streamed free output with tools: content is released as it comes until a call may begin
    (the format's marker, or a leading `{` for llama3_json); from there the text is held and
    parsed into calls at the end (`finish`)."""

    def __init__(self, fmt: str) -> None:
        self.fmt, self.marker = fmt, _MARKERS[fmt]
        self.seen = ""  # all text so far
        self.released = 0  # characters of `seen` released as content
        self.holding = False  # a call began: hold the rest

    def feed(self, text: str) -> str:
        self.seen += text
        if self.holding:
            return ""
        if self.fmt == "llama3_json" and self.seen.lstrip().startswith("{"):
            self.holding = True
            return ""
        at = self.seen.find(self.marker, self.released)
        if at >= 0:
            self.holding = True
            out, self.released = self.seen[self.released:at], at
            return out
        hold = next((k for k in range(min(len(self.marker) - 1, len(self.seen) - self.released), 0, -1)
                     if self.marker.startswith(self.seen[len(self.seen) - k:])), 0)
        end = len(self.seen) - hold
        out, self.released = self.seen[self.released:end], end
        return out

    def finish(self) -> tuple[str, list[ParsedCall]]:
        """(content not released yet, the calls)."""
        rest = self.seen[self.released:]
        if not self.holding:
            return rest, []
        content, calls = parse_tool_calls(rest, self.fmt)
        return (content or "", calls) if calls else (rest, [])
