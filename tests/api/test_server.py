"""The HTTP layer for real: uvicorn on loopback, the official openai client, TinyEngine behind it."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
from conftest import API_KEY
from engine_fixture import TinyEngine

from scheduler.errors import OverloadedError

MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "héllo wörld 日本語 🙂"}]
AUTH = {"Authorization": f"Bearer {API_KEY}"}
pytestmark = pytest.mark.usefixtures("reset_faults")


def post(base_url: str, path: str, body: object, timeout: float = 30) -> httpx.Response:
    return httpx.post(f"{base_url}{path}", json=body, headers=AUTH, timeout=timeout)


def assert_error(resp: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code
    if param is not None:
        assert err["param"] == param
    return err


def sse_events(resp: httpx.Response) -> list[str]:
    raw = resp.text
    assert raw.endswith("data: [DONE]\n\n")
    events = raw.split("\n\n")[:-1]
    assert all(e.startswith("data: ") for e in events)
    return [e[len("data: "):] for e in events]


def test_models_health_version(client: openai.OpenAI, base_url: str, engine: TinyEngine) -> None:
    assert [m.id for m in client.models.list().data] == [engine.model_id]
    assert client.models.retrieve(engine.model_id).id == engine.model_id
    assert httpx.get(f"{base_url}/health").json() == {"status": "ok"}  # open without a key
    assert httpx.get(f"{base_url}/version", headers=AUTH).json()["version"]


def test_streamed_chat_equals_non_streamed_and_usage(client: openai.OpenAI, base_url: str, engine: TinyEngine) -> None:
    whole = client.chat.completions.create(model=engine.model_id, messages=MSGS, max_tokens=24, temperature=0)
    assert whole.object == "chat.completion" and whole.id.startswith("chatcmpl-")
    choice = whole.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    chunks = list(client.chat.completions.create(model=engine.model_id, messages=MSGS, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [choice.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])
    prompt_ids = post(base_url, "/tokenize", {"messages": MSGS}).json()["tokens"]
    assert whole.usage.prompt_tokens == len(prompt_ids) == len(engine.started[-1].prompt_token_ids)
    assert whole.usage.completion_tokens >= 1 and whole.usage.total_tokens == len(prompt_ids) + whole.usage.completion_tokens
    assert whole.usage.completion_tokens == 24 if choice.finish_reason == "length" else whole.usage.completion_tokens < 24


def test_completions_prompt_forms_stop_and_seed(client: openai.OpenAI, engine: TinyEngine) -> None:
    text = "Once upon a time"
    ids = engine.tokenizer.encode(text)
    outs = [client.completions.create(model=engine.model_id, prompt=p, max_tokens=16, temperature=0)
            for p in (text, ids, [text])]
    assert len({o.choices[0].text for o in outs}) == 1
    first = outs[0]
    assert first.object == "text_completion" and first.id.startswith("cmpl-")
    assert first.usage.prompt_tokens == len(ids) and first.usage.completion_tokens == 16
    assert first.choices[0].finish_reason == "length"
    full = first.choices[0].text
    stop = full[5:8]
    stopped = client.completions.create(model=engine.model_id, prompt=text, max_tokens=16, temperature=0, stop=[stop])
    assert stopped.choices[0].text == full[: full.index(stop)] and stopped.choices[0].finish_reason == "stop"
    seeded = [client.completions.create(model=engine.model_id, prompt=text, max_tokens=12, temperature=1.0, seed=7,
                                        top_p=0.9, extra_body={"top_k": 50}).choices[0].text for _ in range(2)]
    assert seeded[0] == seeded[1]
    assert engine.started[-1].sampling.seed == 7 and engine.started[-1].sampling.top_k == 50
    assert engine.started[-1].sampling.eos_token_ids == engine.tokenizer.eos_token_ids


def test_default_max_tokens_fills_the_context(base_url: str, engine: TinyEngine) -> None:
    resp = post(base_url, "/v1/completions", {"prompt": "hi", "temperature": 0, "ignore_eos": True, "stream": True})
    assert resp.status_code == 200
    n_prompt = len(engine.tokenizer.encode("hi"))
    assert engine.started[-1].sampling.max_new_tokens == engine.max_model_len - n_prompt


def test_logprobs_shapes(client: openai.OpenAI, engine: TinyEngine) -> None:
    chat = client.chat.completions.create(model=engine.model_id, messages=MSGS, max_tokens=6, temperature=0,
                                          logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3 and isinstance(entry.bytes, list)
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-5)  # greedy: the best one
    comp = client.completions.create(model=engine.model_id, prompt="Once", max_tokens=5, temperature=0, logprobs=2)
    lp = comp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert all(len(t) == 2 for t in lp.top_logprobs) and lp.text_offset[0] == 0
    assert "".join(lp.tokens) == comp.choices[0].text
    plain = client.completions.create(model=engine.model_id, prompt="Once", max_tokens=2, temperature=0)
    assert plain.choices[0].logprobs is None
    streamed = list(client.chat.completions.create(model=engine.model_id, messages=MSGS, max_tokens=4, temperature=0,
                                                   logprobs=True, stream=True))
    assert sum(len(c.choices[0].logprobs.content) for c in streamed if c.choices and c.choices[0].logprobs) == 4


def test_sse_wire_format(base_url: str) -> None:
    with httpx.stream("POST", f"{base_url}/v1/completions", headers=AUTH, timeout=30,
                      json={"prompt": "Once", "max_tokens": 5, "temperature": 0, "stream": True,
                            "stream_options": {"include_usage": True}}) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        resp.read()
    events = sse_events(resp)
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("body, status, param", [
    ({"n": 100}, 400, "n"), ({"temperature": 5}, 400, "temperature"), ({"max_tokens": -1}, 400, "max_tokens"),
    ({"top_p": 0}, 400, "top_p"), ({"stop": [str(i) for i in range(65)]}, 400, "stop"),
    ({"presence_penalty": 5}, 400, None), ({"logprobs": 21}, 400, "logprobs"),
    ({"model": "gpt-17"}, 404, "model"), ({"max_tokens": 10_000}, 400, "prompt"), ({"prompt": [10**9]}, 400, None),
])
def test_completion_errors(base_url: str, body: dict, status: int, param: str | None) -> None:
    err = assert_error(post(base_url, "/v1/completions", {"prompt": "hi", **body}), status, param=param)
    if status == 404:
        assert err["code"] == "model_not_found"
    if body.get("max_tokens") == 10_000:
        assert err["code"] == "context_length_exceeded"


def test_errors_through_the_openai_client(client: openai.OpenAI, engine: TinyEngine, base_url: str) -> None:
    with pytest.raises(openai.NotFoundError) as nf:
        client.chat.completions.create(model="nope", messages=MSGS)
    assert nf.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=engine.model_id, messages=MSGS, n=65)
    with pytest.raises(openai.BadRequestError, match="context length"):
        client.chat.completions.create(model=engine.model_id, messages=[{"role": "user", "content": "x " * 400}])
    bad = httpx.post(f"{base_url}/v1/chat/completions", content=b'{"messages": [', headers={**AUTH, "content-type": "application/json"})
    assert "JSON" in assert_error(bad, 400)["message"]
    assert_error(post(base_url, "/v1/chat/completions", {"messages": []}), 400, param="messages")
    for path, body in (("/v1/completions", b'{"prompt": "a\\ud800b"}'), ("/tokenize", b'{"prompt": "\\udfff"}'),
                       ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x\\ud800"}]}')):
        lone_surrogate = httpx.post(f"{base_url}{path}", content=body, headers={**AUTH, "content-type": "application/json"})
        assert "not valid Unicode" in assert_error(lone_surrogate, 400)["message"]
    assert_error(post(base_url, "/v1/chat/completions", {"messages": MSGS, "top_logprobs": 2}), 400)
    assert_error(post(base_url, "/v1/nothing-here", {}), 404)


def test_api_key(base_url: str, engine: TinyEngine) -> None:
    body = {"prompt": "hi", "max_tokens": 1}
    assert_error(httpx.post(f"{base_url}/v1/completions", json=body), 401, code="invalid_api_key")
    assert_error(httpx.post(f"{base_url}/v1/completions", json=body, headers={"Authorization": "Bearer wrong"}), 401)
    assert_error(httpx.get(f"{base_url}/v1/models"), 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{base_url}/v1", api_key="wrong", max_retries=0).models.list()
    assert post(base_url, "/v1/completions", body).status_code == 200


def test_overloaded_before_first_token_is_429(base_url: str, engine: TinyEngine) -> None:
    engine.reject_with = OverloadedError("queue full", retry_after_s=2.5)
    resp = post(base_url, "/v1/chat/completions", {"messages": MSGS, "stream": True})
    assert_error(resp, 429, param=None)["type"] == "rate_limit_error"
    assert resp.headers["retry-after"] == "3"


def test_failure_mid_stream_is_an_sse_error_event(base_url: str, engine: TinyEngine) -> None:
    engine.fail_after_tokens = 3
    resp = post(base_url, "/v1/chat/completions", {"messages": MSGS, "stream": True, "max_tokens": 20,
                                                   "temperature": 0, "ignore_eos": True})
    assert resp.status_code == 200
    events = sse_events(resp)
    error = json.loads(events[-2])["error"]
    assert error["type"] == "server_error" and "went away" in error["message"]
    assert "error" not in json.loads(events[-3])
    rid = json.loads(events[0])["id"]
    assert rid in engine.aborted
    resp = post(base_url, "/v1/chat/completions", {"messages": MSGS, "max_tokens": 20, "ignore_eos": True})
    assert_error(resp, 500)


def test_client_disconnect_aborts_the_request(base_url: str, engine: TinyEngine) -> None:
    engine.step_delay_s = 0.02
    with httpx.stream("POST", f"{base_url}/v1/completions", headers=AUTH, timeout=30,
                      json={"prompt": "Once", "max_tokens": 200, "ignore_eos": True, "stream": True}) as resp:
        first = next(resp.iter_lines())
    rid = json.loads(first[len("data: "):])["id"]
    deadline = time.monotonic() + 5
    while rid not in engine.aborted and time.monotonic() < deadline:
        time.sleep(0.02)
    assert rid in engine.aborted and rid not in engine.finished


def test_unexpected_engine_error_is_a_500_envelope(base_url: str, engine: TinyEngine) -> None:
    engine.reject_with = RuntimeError("boom")
    err = assert_error(post(base_url, "/v1/completions", {"prompt": "hi"}), 500)
    assert err["type"] == "server_error" and "boom" not in err["message"]


def test_client_disconnect_aborts_a_non_streamed_request(base_url: str, engine: TinyEngine) -> None:
    engine.step_delay_s = 0.02
    before = len(engine.started)
    with pytest.raises(httpx.ReadTimeout):
        post(base_url, "/v1/completions", {"prompt": "Once", "max_tokens": 200, "ignore_eos": True}, timeout=0.5)
    rid = engine.started[before].request_id
    deadline = time.monotonic() + 5
    while rid not in engine.aborted and time.monotonic() < deadline:
        time.sleep(0.02)
    assert rid in engine.aborted and rid not in engine.finished


def test_tokenize_and_detokenize(base_url: str, engine: TinyEngine) -> None:
    text = "héllo wörld 日本語 🙂"
    out = post(base_url, "/tokenize", {"prompt": text, "return_token_strs": True}).json()
    assert out["tokens"] == engine.tokenizer.encode(text) and out["count"] == len(out["tokens"])
    assert out["max_model_len"] == engine.max_model_len and len(out["token_strs"]) == out["count"]
    assert post(base_url, "/detokenize", {"tokens": out["tokens"]}).json() == {"prompt": text}
    chat = post(base_url, "/tokenize", {"messages": MSGS}).json()["tokens"]
    expected = engine.tokenizer.encode(engine.tokenizer.apply_chat_template(MSGS), add_special_tokens=False)
    assert chat == expected
    assert_error(post(base_url, "/tokenize", {"model": "other", "prompt": "x"}), 404)
    assert_error(post(base_url, "/tokenize", {}), 400)
    assert_error(post(base_url, "/detokenize", {"tokens": [-1]}), 400)
