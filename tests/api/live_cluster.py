"""One real `potluck serve` cluster (2 worker processes, API key on) shared by the cluster, metrics,
dashboard and fuzz tests of a session.

Parts:
- `LiveCluster`: the served process, its URL, model name, key and an authorised httpx client.
- `start_cluster(root, num_workers, num_layers)`: builds a tiny Llama checkpoint and serves it.
- `shared_cluster(config, tmp_path_factory)`: the session's one cluster, started on first use and
  stopped (with its workers) when the session ends.
- `sse_events(lines)`: JSON payloads of an SSE stream's `data:` lines, up to `[DONE]`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.checkpoints import make_checkpoint
from tests.support.served import ServedModel

API_KEY = "sk-live-cluster"
NUM_LAYERS = 6
MAX_POSITIONS = 2048  # room for long streams that stay in flight while a test watches them


@dataclass
class LiveCluster:
    served: ServedModel
    model: str
    num_layers: int
    log_path: Path
    api_key: str = API_KEY
    http: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        self.http = httpx.Client(base_url=self.url, headers=self.headers, timeout=60)

    @property
    def url(self) -> str:
        return self.served.url

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def cluster(self) -> dict[str, Any]:
        response = self.http.get("/cluster")
        response.raise_for_status()
        return response.json()

    def complete(self, prompt: str, max_tokens: int, **extra: Any) -> dict[str, Any]:
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, **extra}
        response = self.http.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        return response.json()

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout_s: float = 30.0) -> dict[str, Any]:
        """Poll /cluster until `predicate(snapshot)` holds; return that snapshot."""
        deadline = time.monotonic() + timeout_s
        snapshot = self.cluster()
        while not predicate(snapshot):
            if time.monotonic() > deadline:
                raise AssertionError(f"the cluster never reached the expected state; last snapshot: {snapshot}")
            time.sleep(0.1)
            snapshot = self.cluster()
        return snapshot

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text()[-3000:]
        except OSError:
            return ""

    def stop(self) -> None:
        self.http.close()
        self.served.stop()


def start_cluster(root: Path, num_workers: int, num_layers: int = NUM_LAYERS) -> LiveCluster:
    model_dir = make_checkpoint(root / "tiny-llama", "llama", num_hidden_layers=num_layers,
                                max_position_embeddings=MAX_POSITIONS)
    log_path = root / "serve.log"
    served = ServedModel(model_dir, num_workers, extra_args=["--api-key", API_KEY], log_path=log_path)
    live = LiveCluster(served, model_dir.name, num_layers, log_path)
    try:
        served.wait_ready(live.model, headers=live.headers)
        live.wait_for(lambda c: len(c["workers"]) == num_workers and all(w["state"] == "ready" for w in c["workers"]))
    except BaseException:
        tail = live.log_tail()
        live.stop()
        raise RuntimeError(f"the live cluster did not start; its log ends with:\n{tail}") from None
    return live


_shared: list[LiveCluster] = []


def shared_cluster(config: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> LiveCluster:
    if not _shared:
        live = start_cluster(tmp_path_factory.mktemp("live-cluster"), num_workers=2)
        _shared.append(live)

        def stop() -> None:
            _shared.remove(live)
            live.stop()

        config.add_cleanup(stop)
    return _shared[0]


def sse_events(lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    for line in lines:
        if not line.startswith("data: "):
            continue
        payload = line[len("data: "):]
        if payload == "[DONE]":
            return
        yield json.loads(payload)
