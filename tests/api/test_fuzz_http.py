"""Property: whatever body hypothesis sends to the two POST endpoints, the server never answers 500."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from conftest import API_KEY
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.slow  # a real server, fuzzed

json_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)


def maybe(key: str, values: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(st.just({}), values.map(lambda v: {key: v}), json_values.map(lambda v: {key: v}))


def body_strategy(chat: bool) -> st.SearchStrategy:
    content = st.text(max_size=30) | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=10)}), max_size=2)
    messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool", "x"]),
                                               "content": content}), min_size=0, max_size=3)
    prompt = st.text(max_size=40) | st.lists(st.integers(-5, 600), max_size=8) | st.lists(st.text(max_size=10), max_size=2)
    parts = [
        maybe("messages", messages) if chat else maybe("prompt", prompt),
        maybe("model", st.sampled_from(["tiny-llama", "other"])),
        maybe("max_tokens", st.integers(-2, 6)), maybe("temperature", st.floats(-1, 3)),
        maybe("top_p", st.floats(-0.5, 1.5)), maybe("top_k", st.integers(-2, 1000)), maybe("seed", st.integers()),
        maybe("stop", st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=5)),
        maybe("stream", st.booleans()), maybe("stream_options", st.fixed_dictionaries({"include_usage": st.booleans()})),
        maybe("n", st.integers(0, 3)), maybe("presence_penalty", st.floats(-2, 2)),
        maybe("logprobs", st.booleans() if chat else st.integers(-1, 22)), maybe("top_logprobs", st.integers(-1, 22)),
        maybe("ignore_eos", st.booleans()), maybe("extra_unknown", json_values),
    ]
    return st.tuples(*parts).map(lambda ds: {k: v for d in ds for k, v in d.items()}) | json_values


@pytest.fixture(scope="module")
def http(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30) as client:
        yield client


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_never_a_500(http: httpx.Client, path: str, data: st.DataObject) -> None:
    body = data.draw(body_strategy(chat=path.endswith("chat/completions")))
    if isinstance(body, dict) and body.get("stream") is not True:
        body.setdefault("max_tokens", 3)
    resp = http.post(path, json=body)
    assert resp.status_code in (200, 400, 404), (resp.status_code, resp.text)
    if resp.status_code != 200:
        assert set(resp.json()["error"]) == {"message", "type", "param", "code"}
    elif resp.headers["content-type"].startswith("text/event-stream"):
        assert resp.text.endswith("data: [DONE]\n\n") and '"error"' not in resp.text
    else:
        assert resp.json()["usage"]["total_tokens"] >= 1
