"""Request validation and response shapes of api/openai_schema.py (no server)."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from api.openai_schema import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    CompletionRequest,
    Usage,
)


def test_completion_prompt_forms() -> None:
    assert CompletionRequest.model_validate({"prompt": "hi"}).prompt == "hi"
    assert CompletionRequest.model_validate({"prompt": [1, 2]}).prompt == [1, 2]
    assert CompletionRequest.model_validate({"prompt": ["hi"]}).prompts == ["hi"]
    assert CompletionRequest.model_validate({"prompt": [[3, 4]]}).prompts == [[3, 4]]
    assert CompletionRequest.model_validate({"prompt": ["a", "b"]}).prompts == ["a", "b"]  # one choice each
    assert CompletionRequest.model_validate({"prompt": [[1], [2]]}).prompts == [[1], [2]]
    assert CompletionRequest.model_validate({"prompt": [1, 2]}).prompts == [[1, 2]]
    for bad in ([], None, 5, [1.5], [[]]):
        with pytest.raises(ValidationError):
            CompletionRequest.model_validate({"prompt": bad})


@pytest.mark.parametrize("field, value", [
    ("n", 65), ("n", 0), ("temperature", 2.5), ("temperature", -0.1), ("top_p", 0), ("top_p", 1.5),
    ("max_tokens", 0), ("max_tokens", -1), ("stop", [str(i) for i in range(65)]), ("logprobs", 21),
    ("presence_penalty", 2.5), ("frequency_penalty", -3), ("logit_bias", {"x": 5}), ("logit_bias", {"1": 101}),
    ("best_of", 0), ("suffix", "x"), ("stream_options", {"include_usage": True}), ("seed", 2**64),
    ("min_p", 1.5), ("repetition_penalty", 0), ("min_tokens", -1), ("use_beam_search", True),
    ("include_stop_str_in_output", True), ("allowed_token_ids", [1]), ("guided_whitespace_pattern", " "),
])
def test_completion_rejects(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as info:
        CompletionRequest.model_validate({"prompt": "hi", field: value})
    assert field in str(info.value)


def test_neutral_and_unknown_fields_are_accepted() -> None:
    req = CompletionRequest.model_validate({
        "prompt": "hi", "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}, "echo": False,
        "best_of": 1, "n": 1, "some_future_field": {"x": 1}, "stop": "", "user": "u",
    })
    assert req.stop_strings == () and not req.include_usage
    assert CompletionRequest.model_validate({"prompt": "hi", "stop": ["a", "", "b"]}).stop_strings == ("a", "b")
    assert CompletionRequest.model_validate({"prompt": "x", "stream": True,
                                             "stream_options": {"include_usage": True}}).include_usage


def test_chat_request() -> None:
    req = ChatCompletionRequest.model_validate({
        "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}],
        "max_tokens": 5, "max_completion_tokens": 7, "logprobs": True, "top_logprobs": 3,
    })
    assert req.max_new_tokens == 7
    assert ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}],
                                                 "max_tokens": 5}).max_new_tokens == 5
    bad_bodies = [
        {"messages": []},
        {"messages": [{"role": "wizard", "content": "x"}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}]},
        {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
        {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 21, "logprobs": True},
        {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
        {"messages": [{"role": "user", "content": "x"}], "tool_choice": "sometimes"},
        {"messages": [{"role": "user", "content": "x"}], "continue_final_message": True},
    ]
    for body in bad_bodies:
        with pytest.raises(ValidationError):
            ChatCompletionRequest.model_validate(body)


def test_chunk_shapes() -> None:
    role = ChatCompletionChunk(id="c", created=1, model="m", choices=[ChatChunkChoice(delta=ChatDelta(role="assistant", content=""))])
    data = json.loads(role.model_dump_json())
    assert data["object"] == "chat.completion.chunk"
    assert data["choices"][0] == {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}
    end = ChatCompletionChunk(id="c", created=1, model="m", choices=[ChatChunkChoice(delta=ChatDelta(), finish_reason="stop")])
    assert json.loads(end.model_dump_json())["choices"][0]["delta"] == {}
    usage = ChatCompletionChunk(id="c", created=1, model="m", choices=[], usage=Usage(prompt_tokens=2, completion_tokens=3, total_tokens=5))
    assert json.loads(usage.model_dump_json())["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5,
                                                            "prompt_tokens_details": None}
