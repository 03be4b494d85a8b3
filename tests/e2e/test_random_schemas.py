"""200 random JSON schemas (hypothesis) against a real cluster with random weights: every response
parses and validates, because the last stage decodes under the schema's grammar (xgrammar).

The schemas are bounded (string lengths, integer ranges, array sizes, no free numbers), so every
valid value has a known longest text and `max_tokens` (4 byte-level tokens per character) always
leaves room to finish: a response cut by `max_tokens` would fail the test."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.e2e.agents_cluster import served_agents

pytestmark = pytest.mark.slow

SCHEMAS_PER_EXAMPLE = 8
EXAMPLES = 25  # 200 schemas

_names = st.text(alphabet="abcdefghij_", min_size=1, max_size=5)
_leaves = st.one_of(
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.integers(-50, 50).flatmap(lambda low: st.integers(low, low + 500).map(
        lambda high: {"type": "integer", "minimum": low, "maximum": high})),
    st.integers(0, 4).flatmap(lambda high: st.integers(0, high).map(
        lambda low: {"type": "string", "minLength": low, "maxLength": high})),
    st.lists(st.one_of(_names, st.integers(-9, 99)), min_size=1, max_size=4, unique=True).map(lambda v: {"enum": v}),
)


def _arrays(items: st.SearchStrategy) -> st.SearchStrategy:
    return st.tuples(items, st.integers(0, 2)).flatmap(lambda t: st.integers(0, t[1]).map(
        lambda low: {"type": "array", "items": t[0], "minItems": low, "maxItems": t[1]}))


def _objects(values: st.SearchStrategy) -> st.SearchStrategy:
    return st.dictionaries(_names, values, min_size=1, max_size=3).map(lambda props: {
        "type": "object", "properties": props, "required": sorted(props), "additionalProperties": False})


SCHEMAS = st.recursive(_leaves, lambda inner: st.one_of(_arrays(inner), _objects(inner)), max_leaves=5)


def longest_text(schema: dict[str, Any]) -> int:
    """Characters of the longest compact JSON value `schema` allows."""
    if "enum" in schema:
        return max(len(json.dumps(v)) for v in schema["enum"])
    kind = schema["type"]
    if kind == "boolean":
        return 5
    if kind == "null":
        return 4
    if kind == "integer":
        return max(len(str(schema["minimum"])), len(str(schema["maximum"])))
    if kind == "string":
        return 2 + schema["maxLength"]
    if kind == "array":
        return 2 + schema["maxItems"] * (longest_text(schema["items"]) + 2)
    return 2 + sum(len(name) + 4 + longest_text(value) + 2 for name, value in schema["properties"].items())


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    with served_agents(tmp_path_factory.mktemp("schemas")) as (served, model, _):
        yield served.url, model


def _ask(url: str, model: str, schema: dict[str, Any], seed: int) -> tuple[dict[str, Any], str, str]:
    body = {"model": model, "prompt": "JSON:", "max_tokens": 4 * longest_text(schema) + 2, "temperature": 1.0,
            "seed": seed, "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=600)  # a loaded 2-core machine
    assert response.status_code == 200, (schema, response.text)
    choice = response.json()["choices"][0]
    return schema, choice["text"], choice["finish_reason"]


def test_random_schemas_always_validate(cluster: tuple[str, str]) -> None:
    url, model = cluster
    seen: list[int] = []

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(st.lists(SCHEMAS, min_size=SCHEMAS_PER_EXAMPLE, max_size=SCHEMAS_PER_EXAMPLE), st.integers(0, 2**31))
    def check(schemas: list[dict[str, Any]], seed: int) -> None:
        with ThreadPoolExecutor(SCHEMAS_PER_EXAMPLE) as pool:
            results = list(pool.map(lambda i: _ask(url, model, schemas[i], seed + i), range(len(schemas))))
        for schema, text, finish in results:
            assert finish == "stop", (schema, text, finish)
            jsonschema.validate(json.loads(text), schema)
        seen.append(len(results))

    check()
    assert sum(seen) >= EXAMPLES * SCHEMAS_PER_EXAMPLE
