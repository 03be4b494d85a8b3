"""Workers die, stall and join while real requests stream; no client sees a lost or doubled token.

The scheduler engine runs in the test's event loop; workers are real processes (api/local_workers)
talking ZeroMQ on loopback. Steps are slowed a little (the worker's fault-injection knob) so that
the faults land mid-generation.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from api.local_workers import LocalWorkers
from scheduler.engine import Engine, EngineConfig
from scheduler.request import GenerationRequest
from scheduler.tokenizer import Tokenizer
from tests.support.checkpoints import make_checkpoint
from workers.model_facts import read_model_facts
from workers.protocol import SamplingParams

pytestmark = pytest.mark.slow

PROMPTS = [tuple(range(3 + i, 3 + i + length)) for i, length in enumerate((3, 9, 5, 14, 2, 7, 11, 4))]
NEW_TOKENS = 40
SLOW_STEP = ["--step-delay-s", "0.01"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ft") / "llama", "llama", num_hidden_layers=6)


def make_engine(model_dir: Path, min_workers: int) -> Engine:
    config = EngineConfig(str(model_dir), read_model_facts(model_dir), "m", min_workers=min_workers, heartbeat_timeout_s=1.5)
    return Engine(config, Tokenizer.from_model_dir(model_dir))


async def generate(engine: Engine, index: int, prompt: tuple[int, ...]) -> tuple[tuple[int, ...], str]:
    sampling = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    tokens: list[int] = []
    text = ""
    async for output in engine.generate(GenerationRequest(f"req-{index}-{time.monotonic_ns()}", prompt, sampling)):
        tokens.extend(output.token_ids)
        text += output.text
    return tuple(tokens), text


async def all_ready(engine: Engine, count: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not (len(engine.cluster.workers) == count and all(w.is_ready for w in engine.cluster.workers.values())):
        assert time.monotonic() < deadline, {w.worker_id: (w.assigned, w.loaded) for w in engine.cluster.workers.values()}
        await asyncio.sleep(0.05)


async def wait_tokens(engine: Engine, count: int) -> None:
    while engine.workload.tokens_generated < count:
        await asyncio.sleep(0.01)


def test_kill_9_of_a_worker_mid_generation_loses_no_request(model_dir: Path) -> None:
    async def scenario() -> None:
        engine = make_engine(model_dir, 3)
        await engine.start()
        workers = LocalWorkers(engine.control_address, 3, threads_per_worker=1, extra_args=SLOW_STEP, token=engine.token)
        workers.start()
        try:
            await all_ready(engine, 3)
            undisturbed = [await generate(engine, i, prompt) for i, prompt in enumerate(PROMPTS)]
            epoch = engine.cluster.epoch
            start = engine.workload.tokens_generated
            tasks = [asyncio.create_task(generate(engine, i, prompt)) for i, prompt in enumerate(PROMPTS)]
            await wait_tokens(engine, start + 8 * 10)  # about 10 tokens into every stream
            middle = next(w for w in engine.cluster.workers.values() if w.loaded and 0 < w.loaded[0])
            os.kill(middle.pid, signal.SIGKILL)
            results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=90)
            assert results == undisturbed  # same tokens, same text: nothing lost or doubled
            assert middle.worker_id not in engine.cluster.workers
            assert engine.cluster.epoch > epoch  # re-planned over the survivors
            assert sorted(w.loaded for w in engine.cluster.workers.values())[0][0] == 0
        finally:
            workers.stop()
            await engine.stop(shutdown_workers=True)

    asyncio.run(scenario())


def test_a_worker_joining_mid_traffic_triggers_a_replan_while_requests_flow(model_dir: Path) -> None:
    async def scenario() -> None:
        engine = make_engine(model_dir, 2)
        await engine.start()
        first = LocalWorkers(engine.control_address, 2, threads_per_worker=1, extra_args=SLOW_STEP, token=engine.token)
        late = LocalWorkers(engine.control_address, 1, threads_per_worker=1, extra_args=SLOW_STEP, id_prefix="late", token=engine.token)
        first.start()
        try:
            await all_ready(engine, 2)
            undisturbed = [await generate(engine, i, prompt) for i, prompt in enumerate(PROMPTS)]
            late.start()
            deadline = time.monotonic() + 60
            while True:  # traffic keeps flowing, wave after wave, until one wave spans the re-plan
                epoch = engine.cluster.epoch
                tasks = [generate(engine, i, prompt) for i, prompt in enumerate(PROMPTS)]
                results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=90)
                assert results == undisturbed
                if engine.cluster.epoch > epoch:
                    break
                assert time.monotonic() < deadline, "the joining worker never triggered a re-plan"
            await all_ready(engine, 3)
            assert engine.cluster.plan is not None and "late-0" in engine.cluster.plan.ranges
            assert await generate(engine, 0, PROMPTS[0]) == undisturbed[0]  # served with the new plan
        finally:
            late.stop()
            first.stop()
            await engine.stop(shutdown_workers=True)

    asyncio.run(scenario())


def test_a_silent_worker_is_evicted_and_taken_in_again_when_it_returns(model_dir: Path) -> None:
    async def scenario() -> None:
        engine = make_engine(model_dir, 2)
        await engine.start()
        workers = LocalWorkers(engine.control_address, 2, threads_per_worker=1, token=engine.token)
        workers.start()
        try:
            await all_ready(engine, 2)
            expected = await generate(engine, 0, PROMPTS[1])
            victim = engine.cluster.workers["local-1"]
            os.kill(victim.pid, signal.SIGSTOP)  # alive but silent: its heartbeats stop
            try:
                deadline = time.monotonic() + 10
                while "local-1" in engine.cluster.workers:
                    assert time.monotonic() < deadline, "a silent worker was not evicted"
                    await asyncio.sleep(0.05)
                assert await generate(engine, 1, PROMPTS[1]) == expected  # the survivor holds it all
            finally:
                os.kill(victim.pid, signal.SIGCONT)
            await all_ready(engine, 2)  # it registered again and got layers
            assert engine.cluster.plan is not None and "local-1" in engine.cluster.plan.ranges
            assert await generate(engine, 2, PROMPTS[1]) == expected
        finally:
            workers.stop()
            await engine.stop(shutdown_workers=True)

    asyncio.run(scenario())
