"""Property: every operation of the live app's OpenAPI document, fed hypothesis-generated path
parameters, query parameters and bodies (schema-shaped and arbitrary JSON), with and without the
API key, never answers 5xx; errors come in OpenAI's envelope; without the key, 401 unless public.

Parts:
- `from_schema(schema, doc)`: a hypothesis strategy for a JSON-schema fragment of the document
  (`$ref`, anyOf/oneOf/allOf, enum/const, objects, arrays, strings, numbers, booleans, null).
- `request_strategy(operation)`: one HTTP request for an operation.
- `test_no_operation_answers_5xx`: every operation in turn, against one shared live cluster.

Derandomized: the same examples every run. With random ones, CI once drew 30 bodies for
`/v1/completions` of which none was valid (the check that some reach the handler failed).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from live_cluster import LiveCluster, shared_cluster

from api.cluster_routes import PUBLIC_PATHS

pytestmark = pytest.mark.slow  # a live cluster, fuzzed

EXAMPLES_PER_OPERATION = 30
GENERATION_PATHS = {"/v1/completions", "/v1/chat/completions"}
json_scalars = st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)


@pytest.fixture(scope="module")
def live(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> LiveCluster:
    return shared_cluster(request.config, tmp_path_factory)


def from_schema(schema: dict[str, Any], doc: dict[str, Any], depth: int = 0,
                hints: dict[str, list[Any]] | None = None, valid: bool = False) -> st.SearchStrategy:
    """`hints`: real values for properties by name (the served model), mixed in with generated ones.
    `valid`: keep to the schema's bounds (so bodies reach the handlers); otherwise step past them."""
    hints = hints or {}
    if depth > 6:
        return json_scalars
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return from_schema(doc["components"]["schemas"][name], doc, depth + 1, hints, valid)
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return st.one_of([from_schema(s, doc, depth + 1, hints, valid) for s in schema[key]])
    if "allOf" in schema:
        return from_schema(schema["allOf"][0], doc, depth + 1, hints, valid)
    kind = schema.get("type")
    if kind == "object" or "properties" in schema:
        props = schema.get("properties", {})
        required = set(schema.get("required", ()))
        def prop(name: str, sub: dict[str, Any]) -> st.SearchStrategy:
            typed = from_schema(sub, doc, depth + 1, hints, valid)
            if name in hints:
                return st.sampled_from(hints[name]) if valid else st.sampled_from(hints[name]) | typed
            return typed

        fixed = {k: prop(k, v) for k, v in props.items() if k in required}
        optional = {k: prop(k, v) for k, v in props.items() if k not in required}
        return st.fixed_dictionaries(fixed, optional=optional)
    if kind == "array":
        items = schema.get("items", {})
        most = min(schema.get("maxItems", 3), 3) if valid else 3
        least = min(schema.get("minItems", 1 if valid else 0), most)
        return st.lists(from_schema(items, doc, depth + 1, hints, valid) if items else json_scalars, min_size=least, max_size=most)
    if kind == "string":
        return st.text(min_size=1 if valid else 0, max_size=12)
    if kind == "integer":
        low = schema.get("minimum", schema["exclusiveMinimum"] + 1 if "exclusiveMinimum" in schema else None)
        high = schema.get("maximum", schema["exclusiveMaximum"] - 1 if "exclusiveMaximum" in schema else None)
        if valid:
            low = 0 if low is None else low
            return st.integers(low, min(low + 3, high) if high is not None else low + 3)
        return st.integers(-5 if low is None else low - 1, 600 if high is None else high + 1) | st.integers()
    if kind == "number":
        if valid:
            return st.floats(schema.get("minimum", schema.get("exclusiveMinimum", -10.0)),
                             schema.get("maximum", schema.get("exclusiveMaximum", 10.0)),
                             exclude_min="exclusiveMinimum" in schema, exclude_max="exclusiveMaximum" in schema)
        return st.floats(allow_nan=False, allow_infinity=False, min_value=-10, max_value=10) | st.floats(allow_nan=False, allow_infinity=False)
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    return json_values


def operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(method.upper(), path, op) for path, ops in doc["paths"].items() for method, op in ops.items()]


def request_strategy(method: str, path: str, op: dict[str, Any], doc: dict[str, Any], real: dict[str, list[str]]) -> st.SearchStrategy:
    params = op.get("parameters", [])
    path_values: dict[str, st.SearchStrategy] = {}
    query_values: dict[str, st.SearchStrategy] = {}
    for param in params:
        typed = from_schema(param.get("schema", {}), doc)
        if param["in"] == "path":
            # Real ids hit the handlers' success paths; never drain a real worker of the shared cluster.
            known = [] if path.endswith("/drain") else real.get(param["name"], [])
            path_values[param["name"]] = (st.sampled_from(known) | typed) if known else typed
        elif param["in"] == "query":
            query_values[param["name"]] = typed | json_scalars.map(str)
    body: st.SearchStrategy = st.none()
    if "requestBody" in op:
        schema = op["requestBody"]["content"].get("application/json", {}).get("schema", {})
        hints = {"model": real["model_id"]}
        valid = from_schema(schema, doc, hints=hints, valid=True)
        # half the bodies keep to the schema, so that some of 30 reach the handlers' success paths
        body = st.one_of(valid, valid, from_schema(schema, doc, hints=hints), json_values)
    return st.fixed_dictionaries({
        "path": st.fixed_dictionaries(path_values),
        "query": st.fixed_dictionaries({}, optional=query_values),
        "body": body,
        "auth": st.integers(0, 3).map(lambda x: x > 0 or path in PUBLIC_PATHS),  # 3 in 4 with the key
    })  # fmt: skip


def bounded(body: Any, path: str) -> Any:
    """Keep generations short (this is about status codes, not long outputs)."""
    if isinstance(body, dict) and path in GENERATION_PATHS:
        for key in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(key), int) and body[key] > 4:
                body[key] = 4
        if "max_tokens" not in body and "max_completion_tokens" not in body:
            body["max_tokens"] = 3
        if isinstance(body.get("n"), int) and body["n"] > 2:
            body["n"] = 2
    return body


def test_no_operation_answers_5xx(live: LiveCluster) -> None:
    doc = live.http.get("/openapi.json").json()
    ops = operations(doc)
    names = {(m, p) for m, p, _ in ops}
    assert {("GET", "/cluster"), ("GET", "/cluster/nodes/{node_id}"), ("POST", "/cluster/nodes/{node_id}/drain"),
            ("POST", "/cluster/replan"), ("GET", "/cluster/requests"), ("GET", "/metrics"),
            ("POST", "/v1/completions"), ("POST", "/v1/chat/completions")} <= names, names
    cluster = live.cluster()
    real = {"node_id": [w["id"] for w in cluster["workers"]], "model_id": [live.model]}
    statuses: dict[tuple[str, str], set[int]] = {}
    refusals: dict[tuple[str, str], list[str]] = {}  # 4xx messages of requests with the key
    anonymous = httpx.Client(base_url=live.url, timeout=60)
    try:
        for method, path, op in ops:
            @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            @given(req=request_strategy(method, path, op, doc, real))
            def check(req: dict[str, Any]) -> None:
                url = path
                for name, raw in req["path"].items():
                    url = url.replace("{" + name + "}", quote(str(raw), safe="") or "%20")
                client = live.http if req["auth"] else anonymous
                kwargs: dict[str, Any] = {"params": {k: str(v) for k, v in req["query"].items()}}
                if "requestBody" in op:
                    kwargs["json"] = bounded(req["body"], path)
                response = client.request(method, url, **kwargs)
                statuses.setdefault((method, path), set()).add(response.status_code)
                assert response.status_code < 500, (method, url, kwargs, response.status_code, response.text[:500])
                if not req["auth"] and path not in PUBLIC_PATHS:
                    assert response.status_code == 401, (method, url, response.status_code)
                if response.status_code >= 400:
                    assert set(response.json()["error"]) == {"message", "type", "param", "code"}, response.text
                    if req["auth"]:
                        refusals.setdefault((method, path), []).append(response.json()["error"]["message"][:120])

            check()
    finally:
        anonymous.close()
    assert all(statuses.get((m, p)) for m, p in names), "an operation was never exercised"
    # The generator reached the handlers, not only the validators: successes on the main operations.
    for op in [("GET", "/cluster/nodes/{node_id}"), ("POST", "/v1/completions"), ("POST", "/tokenize")]:
        assert 200 in statuses[op], (op, statuses[op], refusals.get(op))
    # And the cluster still serves afterwards.
    assert live.complete("after the fuzz", 3)["usage"]["completion_tokens"] == 3
