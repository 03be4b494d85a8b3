"""Late binding in the real engine: a request whose path would queue its prompt waits in the
admission queue and goes once the queue drains; none is lost, each answers as it would alone.

`max_queue_wait_s=0` makes every prompt queued behind another one wait for it, so with 8
concurrent requests on one real worker process most of them pass through the admission queue.
"""

from __future__ import annotations

import asyncio
import math
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


def test_held_requests_wait_for_the_queue_and_answer_as_alone(tmp_path: Path) -> None:
    model_dir = make_checkpoint(tmp_path / "llama", "llama", num_hidden_layers=2)

    async def run(max_queue_wait_s: float) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]], int]:
        config = EngineConfig(str(model_dir), read_model_facts(model_dir), "m", max_queue_wait_s=max_queue_wait_s)
        engine = Engine(config, Tokenizer.from_model_dir(model_dir))
        await engine.start()
        workers = LocalWorkers(engine.control_address, 1, threads_per_worker=1, extra_args=["--step-delay-s", "0.02"], token=engine.token)
        workers.start()
        most_waiting = 0

        async def generate(index: int, prompt: tuple[int, ...]) -> tuple[int, ...]:
            sampling = SamplingParams(max_new_tokens=12, ignore_eos=True)
            tokens: list[int] = []
            async for output in engine.generate(GenerationRequest(f"r{index}-{time.monotonic_ns()}", prompt, sampling)):
                tokens.extend(output.token_ids)
            return tuple(tokens)

        async def watch() -> None:
            nonlocal most_waiting
            while True:
                most_waiting = max(most_waiting, len(engine.admission))
                await asyncio.sleep(0.002)

        try:
            await engine.wait_ready(timeout_s=60)
            alone = [await generate(i, prompt) for i, prompt in enumerate(PROMPTS)]
            watcher = asyncio.create_task(watch())
            together = await asyncio.wait_for(asyncio.gather(*(generate(i, p) for i, p in enumerate(PROMPTS))), timeout=60)
            watcher.cancel()
            assert len(engine.admission) == 0 and not engine.requests
            # the workload mix placement plans for: counted over finished requests, used from 32 on
            assert engine.workload.finished_requests == 16 and engine.workload.finished_output_tokens == 16 * 12
            assert engine.workload.finished_prompt_tokens == 2 * sum(len(p) for p in PROMPTS)
            assert engine.workload_mix() == (config.prompt_tokens_per_output_token, 0.0)
            engine.workload.finished_requests = 32   # as if 32 had finished with the same totals
            prompt_total = 2 * sum(len(p) for p in PROMPTS)
            assert engine.workload_mix() == pytest.approx((prompt_total / (16 * 12), (prompt_total + 16 * 12) / 32))
            return alone, list(together), most_waiting
        finally:
            workers.stop()
            await engine.stop(shutdown_workers=True)

    alone, together, most_waiting = asyncio.run(run(0.0))
    assert together == alone
    assert most_waiting >= 4  # most of the 8 were held, not sent on at once
    alone_off, together_off, most_waiting_off = asyncio.run(run(math.inf))
    assert together_off == alone_off == alone
    assert most_waiting_off == 0  # the hold off: every request goes at once
