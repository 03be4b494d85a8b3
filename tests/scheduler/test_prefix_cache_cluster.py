"""Prefix caching across real worker processes: shared prefixes prefilled once per stage, the
same greedy text with and without the cache, and a worker loss that still gives the undisturbed
text. The engine runs in the test's event loop; workers are real processes on loopback.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from dataclasses import replace
from pathlib import Path

import pytest

from api.local_workers import LocalWorkers
from scheduler.engine import Engine, EngineConfig
from scheduler.request import GenerationRequest
from scheduler.tokenizer import Tokenizer
from tests.support.checkpoints import make_checkpoint
from workers.model_facts import read_model_facts
from workers.protocol import SamplingParams

SHARED = tuple((11 * i) % 300 + 20 for i in range(64))  # 4 KV blocks of 16 tokens
PROMPTS = [SHARED + (5 + i, 40 + i, 7, 9 + i) for i in range(8)]  # the 5th block differs


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("prefix") / "llama", "llama", num_hidden_layers=6)


def make_engine(model_dir: Path, num_workers: int, **overrides) -> Engine:
    config = EngineConfig(str(model_dir), read_model_facts(model_dir), "m", min_workers=num_workers, heartbeat_timeout_s=1.5)
    return Engine(replace(config, **overrides), Tokenizer.from_model_dir(model_dir))


async def generate(engine: Engine, name: str, prompt: tuple[int, ...], new_tokens: int,
                   seed: int | None = None) -> tuple[tuple[int, ...], int]:
    """(tokens: greedy, or sampled with `seed`; prompt tokens the cache held)."""
    sampling = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    if seed is not None:
        sampling = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True, temperature=0.9, seed=seed)
    tokens: list[int] = []
    cached = 0
    async for output in engine.generate(GenerationRequest(f"{name}-{time.monotonic_ns()}", prompt, sampling)):
        tokens.extend(output.token_ids)
        cached = output.num_cached_tokens
    return tuple(tokens), cached


async def all_ready(engine: Engine, count: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not (len(engine.cluster.workers) == count and all(w.is_ready for w in engine.cluster.workers.values())):
        assert time.monotonic() < deadline, "workers did not load their layers"
        await asyncio.sleep(0.05)


async def stage_counts(engine: Engine, queried_tokens: int, timeout_s: float = 10) -> dict[tuple[int, int], tuple[int, int]]:
    """Each stage's (queries, hits) in tokens, once every heartbeat reports `queried_tokens`."""
    deadline = time.monotonic() + timeout_s
    while True:
        counts = {w.loaded: (w.heartbeat.prefix_cache_queries_tokens, w.heartbeat.prefix_cache_hits_tokens)
                  for w in engine.cluster.workers.values() if w.heartbeat is not None and w.loaded}
        if counts and all(q == queried_tokens for q, _ in counts.values()) or time.monotonic() > deadline:
            return counts
        await asyncio.sleep(0.1)


async def run_concurrently(num_workers: int, model_dir: Path, **overrides) -> tuple[list, dict]:
    engine = make_engine(model_dir, num_workers, **overrides)
    await engine.start()
    workers = LocalWorkers(engine.control_address, num_workers, threads_per_worker=1, token=engine.token)
    workers.start()
    try:
        await all_ready(engine, num_workers)
        results = await asyncio.wait_for(
            asyncio.gather(*(generate(engine, f"r{i}", prompt, 6, seed=i if i % 2 else None)
                             for i, prompt in enumerate(PROMPTS))), timeout=120
        )
        return results, await stage_counts(engine, sum(map(len, PROMPTS)))
    finally:
        workers.stop()
        await engine.stop(shutdown_workers=True)


@pytest.mark.parametrize("num_workers", [1, 3])
def test_a_prefix_shared_by_8_concurrent_requests_is_prefilled_once_per_stage(model_dir: Path, num_workers: int) -> None:
    cached, counts = asyncio.run(run_concurrently(num_workers, model_dir))
    plain, plain_counts = asyncio.run(run_concurrently(num_workers, model_dir, prefix_caching=False))
    # the same text, greedy (even requests) and sampled with a seed (odd ones)
    assert [tokens for tokens, _ in cached] == [tokens for tokens, _ in plain]
    assert len(counts) == num_workers
    for queries, hits in counts.values():  # the first request prefilled the 64 shared tokens, 7 reused them
        assert (queries, hits) == (8 * 68, 7 * 64)
    assert sorted(n for _, n in cached) == [0] + [64] * 7  # usage.prompt_tokens_details.cached_tokens
    assert all(hits == 0 for _, hits in plain_counts.values())
    assert all(n == 0 for _, n in plain)


@pytest.mark.slow
def test_a_worker_loss_with_cached_prefixes_gives_the_undisturbed_text(model_dir: Path) -> None:
    async def scenario() -> None:
        engine = make_engine(model_dir, 3)
        await engine.start()
        workers = LocalWorkers(engine.control_address, 3, threads_per_worker=1, extra_args=["--step-delay-s", "0.01"], token=engine.token)
        workers.start()
        try:
            await all_ready(engine, 3)
            undisturbed = [await generate(engine, f"u{i}", prompt, 40) for i, prompt in enumerate(PROMPTS)]
            assert [n for _, n in undisturbed] == [0] + [64] * 7
            start = engine.workload.tokens_generated
            tasks = [asyncio.create_task(generate(engine, f"d{i}", p, 40)) for i, p in enumerate(PROMPTS)]
            while engine.workload.tokens_generated < start + 8 * 10:  # about 10 tokens into every stream
                await asyncio.sleep(0.01)
            middle = next(w for w in engine.cluster.workers.values() if w.loaded and 0 < w.loaded[0])
            os.kill(middle.pid, signal.SIGKILL)
            results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=120)
            assert [tokens for tokens, _ in results] == [tokens for tokens, _ in undisturbed]
            assert middle.worker_id not in engine.cluster.workers
        finally:
            workers.stop()
            await engine.stop(shutdown_workers=True)

    asyncio.run(scenario())
