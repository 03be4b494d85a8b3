"""Agents and evaluation clients against a real cluster (2 worker processes, random weights):
openai SDK tools and parse, langchain-openai, echo logprobs vs transformers, n / seed, structured
outputs, sampling options, CORS."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import torch
from pydantic import BaseModel, Field

from tests.e2e.agents_cluster import served_agents

pytestmark = pytest.mark.slow

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12},
                           "unit": {"type": "string", "enum": ["c", "f"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
MSGS = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, Path]]:
    with served_agents(tmp_path_factory.mktemp("agents")) as (served, model, path):
        yield served.url, model, path


@pytest.fixture()
def client(cluster: tuple[str, str, Path]) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{cluster[0]}/v1", api_key="none", max_retries=0, timeout=60)


def _valid_weather(arguments: str) -> dict:
    args = json.loads(arguments)
    assert set(args) == {"city", "unit"} and args["unit"] in ("c", "f") and len(args["city"]) <= 12
    return args


def test_openai_tools_round_trip(client: openai.OpenAI, cluster: tuple[str, str, Path]) -> None:
    model = cluster[1]
    for choice in ({"type": "function", "function": {"name": "get_weather"}}, "required"):
        first = client.chat.completions.create(model=model, messages=MSGS, tools=[WEATHER], tool_choice=choice,
                                               parallel_tool_calls=False, max_tokens=200, temperature=0)
        out = first.choices[0]
        assert out.finish_reason == "tool_calls", out
        call = out.message.tool_calls[0]
        assert call.type == "function" and call.function.name == "get_weather" and call.id
        _valid_weather(call.function.arguments)
    history = [*MSGS, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
               {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'}]
    answer = client.chat.completions.create(model=model, messages=history, tools=[WEATHER], max_tokens=8,
                                            temperature=0, tool_choice="none")
    assert answer.choices[0].message.tool_calls in (None, [])
    assert isinstance(answer.choices[0].message.content, str)
    # the history reached the template: the call's arguments and the tool result are in the prompt
    tokens = httpx.post(f"{cluster[0]}/tokenize", json={"messages": history, "add_generation_prompt": True}).json()
    assert answer.usage.prompt_tokens > tokens["count"] - 1 > 0


@pytest.mark.parametrize("choice", [{"type": "function", "function": {"name": "get_weather"}}, "required"])
def test_streamed_tool_call_deltas_reassemble(client: openai.OpenAI, cluster: tuple[str, str, Path], choice) -> None:
    kwargs = dict(model=cluster[1], messages=MSGS, tools=[WEATHER], tool_choice=choice, parallel_tool_calls=False,
                  max_tokens=200, temperature=0)
    whole = client.chat.completions.create(**kwargs).choices[0].message.tool_calls[0]
    calls: dict[int, dict] = {}
    finish = None
    deltas = 0
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for part in chunk.choices[0].delta.tool_calls or []:
            deltas += 1
            slot = calls.setdefault(part.index, {"id": None, "name": "", "arguments": ""})
            slot["id"] = slot["id"] or part.id
            slot["name"] += part.function.name or "" if part.function else ""
            slot["arguments"] += part.function.arguments or "" if part.function else ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and list(calls) == [0] and calls[0]["id"]
    assert calls[0]["name"] == whole.function.name
    assert json.loads(calls[0]["arguments"]) == json.loads(whole.function.arguments)
    if isinstance(choice, dict):
        assert deltas > 2  # a named call's arguments stream in pieces


class Answer(BaseModel):
    city: str = Field(max_length=12)
    population: int = Field(ge=0, le=99999)
    capital: bool


def test_parse_with_pydantic(client: openai.OpenAI, cluster: tuple[str, str, Path]) -> None:
    for seed in (1, 2, 3):
        result = client.chat.completions.parse(model=cluster[1], messages=MSGS, response_format=Answer,
                                               max_tokens=200, temperature=1.0, seed=seed)
        parsed = result.choices[0].message.parsed
        assert isinstance(parsed, Answer), result


def test_langchain_tools_and_structured_output(cluster: tuple[str, str, Path]) -> None:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=f"{cluster[0]}/v1", api_key="none", model=cluster[1], temperature=0, max_tokens=200,
                     max_retries=0)
    bound = llm.bind_tools([WEATHER], tool_choice="get_weather")
    message = bound.invoke("What is the weather in Paris?")
    assert message.tool_calls and message.tool_calls[0]["name"] == "get_weather"
    _valid_weather(json.dumps(message.tool_calls[0]["args"]))
    for method in ("json_schema", "function_calling"):
        structured = llm.with_structured_output(Answer, method=method)
        assert isinstance(structured.invoke("Describe Paris"), Answer), method


def _transformers_prompt_logprobs(path: Path, ids: list[int]) -> list[float]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return [logprobs[i - 1, ids[i]].item() for i in range(1, len(ids))]


def test_echo_logprobs_equal_transformers(cluster: tuple[str, str, Path]) -> None:
    url, model, path = cluster
    prompts = [[1, 40, 41, 42, 43, 44, 45, 46], [7, 8, 9, 100, 200, 300]]
    body = {"model": model, "prompt": prompts, "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0}
    data = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()
    assert [c["index"] for c in data["choices"]] == [0, 1]
    for prompt, choice in zip(prompts, data["choices"]):
        got = choice["logprobs"]["token_logprobs"]
        assert got[0] is None and len(got) == len(prompt) + 1
        want = _transformers_prompt_logprobs(path, prompt)
        assert max(abs(a - b) for a, b in zip(got[1:len(prompt)], want)) < 1e-4
    vllm = httpx.post(f"{url}/v1/completions", timeout=60, json={"model": model, "prompt": prompts[0], "max_tokens": 1,
                                                                 "prompt_logprobs": 0}).json()
    entries = vllm["choices"][0]["prompt_logprobs"]
    assert entries[0] is None
    want = _transformers_prompt_logprobs(path, prompts[0])
    for token_id, entry, expected in zip(prompts[0][1:], entries[1:], want):
        assert abs(entry[str(token_id)]["logprob"] - expected) < 1e-4


def test_n_choices_greedy_and_seeded(client: openai.OpenAI, cluster: tuple[str, str, Path]) -> None:
    model = cluster[1]
    greedy = client.completions.create(model=model, prompt="The quick", n=4, max_tokens=8, temperature=0)
    assert sorted(c.index for c in greedy.choices) == [0, 1, 2, 3]
    assert len({c.text for c in greedy.choices}) == 1
    runs = [client.completions.create(model=model, prompt="The quick", n=4, max_tokens=8, temperature=1, seed=7,
                                      extra_body={"ignore_eos": True}) for _ in range(2)]
    assert [c.text for c in runs[0].choices] == [c.text for c in runs[1].choices]
    assert len({c.text for c in runs[0].choices}) > 1  # the choices are sampled apart
    best = client.completions.create(model=model, prompt="The quick", n=2, best_of=4, max_tokens=4, temperature=1,
                                     seed=3, logprobs=0)
    assert len(best.choices) == 2


def test_structured_output_options(cluster: tuple[str, str, Path]) -> None:
    url, model = cluster[0], cluster[1]

    def chat(**extra) -> httpx.Response:
        return httpx.post(f"{url}/v1/chat/completions", timeout=60,
                          json={"model": model, "messages": MSGS, "max_tokens": 40, **extra})

    assert chat(guided_choice=["yes", "no"]).json()["choices"][0]["message"]["content"] in ("yes", "no")
    import re
    out = chat(guided_regex="[a-c]{2}[0-9]{3}").json()["choices"][0]["message"]["content"]
    assert re.fullmatch("[a-c]{2}[0-9]{3}", out)
    out = chat(structured_outputs={"choice": ["up", "down"]}).json()["choices"][0]["message"]["content"]
    assert out in ("up", "down")
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 9}},
              "required": ["n"], "additionalProperties": False}
    assert 1 <= json.loads(chat(guided_json=schema).json()["choices"][0]["message"]["content"])["n"] <= 9
    obj = chat(response_format={"type": "json_object"}, max_tokens=200, seed=1, temperature=1)
    if obj.json()["choices"][0]["finish_reason"] == "stop":
        assert isinstance(json.loads(obj.json()["choices"][0]["message"]["content"]), dict)
    for bad in ({"guided_regex": "[a-"}, {"guided_json": {"type": 5}},
                {"guided_choice": ["a"], "guided_regex": "a"},
                {"response_format": {"type": "xml"}}):
        response = chat(**bad)
        assert response.status_code == 400, (bad, response.text)
        assert "\n" not in response.json()["error"]["message"]


def test_sampling_options(cluster: tuple[str, str, Path]) -> None:
    url, model = cluster[0], cluster[1]

    def complete(**extra) -> dict:
        response = httpx.post(f"{url}/v1/completions", timeout=60,
                              json={"model": model, "prompt": [5, 6, 7], "max_tokens": 6, "temperature": 0, **extra})
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]

    base = complete(logprobs=0, ignore_eos=True)
    first_id = None
    forced = complete(logit_bias={"77": 100}, logprobs=0, ignore_eos=True)
    assert forced["logprobs"]["tokens"] == [forced["logprobs"]["tokens"][0]] * 6
    tokens = httpx.post(f"{url}/tokenize", json={"prompt": base["text"], "add_special_tokens": False}).json()["tokens"]
    first_id = tokens[0]
    stopped = complete(stop_token_ids=[first_id], logprobs=0)
    assert stopped["finish_reason"] == "stop" and len(stopped["logprobs"]["tokens"]) == 1  # kept, as vLLM does
    looping = complete(max_tokens=40, ignore_eos=True, logprobs=0)["logprobs"]["tokens"]
    assert len(set(looping)) < 30  # greedy on random weights repeats itself
    for penalty in ({"repetition_penalty": 3.0}, {"frequency_penalty": 2.0, "presence_penalty": 2.0}):
        penalised = complete(max_tokens=40, ignore_eos=True, logprobs=0, **penalty)["logprobs"]["tokens"]
        assert len(set(penalised)) > len(set(looping)), penalty
    assert complete(min_p=0.5, temperature=1, seed=1)["text"] is not None
    many_stops = complete(stop=[f"zz{i}" for i in range(40)], ignore_eos=True)
    assert many_stops["text"] == base["text"]
    longer = complete(min_tokens=6, max_tokens=6)
    assert longer["finish_reason"] == "length"
    bad = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": "x", "suffix": "y"})
    assert bad.status_code == 400 and "suffix" in bad.json()["error"]["message"]


def test_chat_template_options_and_cors(cluster: tuple[str, str, Path]) -> None:
    url, model = cluster[0], cluster[1]

    def prompt_tokens(**extra) -> int:
        body = {"model": model, "messages": [*MSGS, {"role": "assistant", "content": "It is"}], "max_tokens": 1, **extra}
        response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        return response.json()["usage"]["prompt_tokens"]

    plain = prompt_tokens(add_generation_prompt=False)
    continued = prompt_tokens(add_generation_prompt=False, continue_final_message=True)
    assert continued < plain  # the final message's end-of-turn is gone
    thinking = prompt_tokens(chat_template_kwargs={"enable_thinking": False})
    assert thinking > prompt_tokens()
    preflight = httpx.options(f"{url}/v1/chat/completions", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type,authorization"})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "https://app.example"
    other = httpx.options(f"{url}/v1/chat/completions", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in other.headers
