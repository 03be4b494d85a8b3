"""The cluster's load over the last minutes, for the dashboard's plots.

Parts:
- `LoadSample`: one point: time, tokens/s generated since the previous point, mean time to first
  token of the requests that got theirs in that interval (None: none did), KV cache used (share of
  the ready workers' capacity).
- `LoadHistory`: a ring of samples (`SAMPLE_S` apart, `WINDOW_S` long); `sample(engine, now)`
  reads the engine's counters and its TTFT histogram; `to_json()`.
- `run_sampler(engine, history)`: the task `potluck serve` runs beside the server.
- `load_history_router(history)`: `GET /cluster/history` (under /cluster: the API key applies).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter

SAMPLE_S = 2.0
WINDOW_S = 600.0


@dataclass(frozen=True)
class LoadSample:
    at_unix_s: float
    tokens_per_s: float
    ttft_s: float | None
    kv_used: float  # 0..1


def _histogram_sum_count(histogram: Any) -> tuple[float, float]:
    total = count = 0.0
    for metric in histogram.collect():
        for sample in metric.samples:
            if sample.name.endswith("_sum"):
                total += sample.value
            elif sample.name.endswith("_count"):
                count += sample.value
    return total, count


@dataclass
class LoadHistory:
    samples: deque[LoadSample] = field(default_factory=lambda: deque(maxlen=int(WINDOW_S / SAMPLE_S)))
    _last: tuple[float, int, float, float] | None = None  # (monotonic s, tokens generated, TTFT sum, TTFT count)

    def sample(self, engine: Any, now_s: float | None = None) -> LoadSample | None:
        now_s = time.monotonic() if now_s is None else now_s
        ttft_sum, ttft_count = _histogram_sum_count(engine.metrics.ttft)
        generated = int(engine.workload.tokens_generated)
        last, self._last = self._last, (now_s, generated, ttft_sum, ttft_count)
        if last is None or now_s <= last[0]:
            return None
        ready = [w for w in engine.cluster.workers.values() if w.kv_capacity_tokens > 0]
        capacity = sum(w.kv_capacity_tokens for w in ready)
        used = sum(w.kv_capacity_tokens - w.kv_free_tokens for w in ready)
        new_first_tokens = ttft_count - last[3]
        point = LoadSample(
            at_unix_s=time.time(),
            tokens_per_s=max(0, generated - last[1]) / (now_s - last[0]),
            ttft_s=(ttft_sum - last[2]) / new_first_tokens if new_first_tokens > 0 else None,
            kv_used=min(1.0, max(0.0, used / capacity)) if capacity else 0.0,
        )
        self.samples.append(point)
        return point

    def to_json(self) -> dict[str, Any]:
        return {"sample_s": SAMPLE_S, "window_s": WINDOW_S,
                "samples": [[s.at_unix_s, s.tokens_per_s, s.ttft_s, s.kv_used] for s in self.samples],
                "columns": ["at_unix_s", "tokens_per_s", "ttft_s", "kv_used"]}


async def run_sampler(engine: Any, history: LoadHistory, every_s: float = SAMPLE_S) -> None:
    while True:
        history.sample(engine)
        await asyncio.sleep(every_s)


def load_history_router(history: LoadHistory) -> APIRouter:
    router = APIRouter(tags=["cluster"])

    @router.get("/cluster/history", summary="Tokens/s, time to first token and KV use over the last minutes")
    async def get_history() -> dict[str, Any]:
        return history.to_json()

    return router
