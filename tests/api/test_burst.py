"""A burst of 256 concurrent requests against `potluck serve` at its default limits: every one is
queued rather than refused (no HTTP 429), none is restarted (a request runs only once its route's
KV holds its prompt + max new tokens, in whole blocks), and all complete."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.checkpoints import make_checkpoint
from tests.support.served import ServedModel

pytestmark = pytest.mark.slow

NUM_REQUESTS = 256
MAX_TOKENS = 4


def restarts(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return sum(s.value for f in text_string_to_metric_families(text) if f.name == "potluck:request_restarts"
               for s in f.samples if s.name.endswith("_total"))


def test_a_burst_of_256_requests_is_queued_not_refused_and_none_restarts(tmp_path: Path) -> None:
    # short context: the KV (sized for 16 full-length sequences) holds ~160 of these at once
    model_dir = make_checkpoint(tmp_path / "llama", "llama", num_hidden_layers=4, max_position_embeddings=256)
    with ServedModel(model_dir, 2) as served:
        served.wait_ready(model_dir.name)

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=served.url, timeout=600) as client:
                bodies = [{"model": model_dir.name, "prompt": f"request {i}: " + "the quick brown fox " * (2 + i % 5),
                           "max_tokens": MAX_TOKENS, "ignore_eos": True} for i in range(NUM_REQUESTS)]
                return await asyncio.gather(*(client.post("/v1/completions", json=body) for body in bodies))

        responses = asyncio.run(burst())
        statuses = [r.status_code for r in responses]
        assert statuses.count(429) == 0 and statuses == [200] * NUM_REQUESTS, [r.text for r in responses if r.status_code != 200][:3]
        assert all(r.json()["usage"]["completion_tokens"] == MAX_TOKENS for r in responses)
        assert restarts(served.url) == 0
        cluster = httpx.get(f"{served.url}/cluster", timeout=30).json()
        reserved = sum(-(-(r.json()["usage"]["prompt_tokens"] + MAX_TOKENS) // 16) * 16 for r in responses)
        assert reserved > max(w["kv_capacity_tokens"] for w in cluster["workers"])  # they could not all run at once
