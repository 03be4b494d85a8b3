"""`kill -9` of an MLX worker while 8 streams run through a torch + MLX pipeline: nothing is lost.

Real worker processes (api/local_workers.py, one backend each), the scheduler engine in the test's
event loop; the requests are replayed onto the re-planned pipeline, which still mixes backends.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from api.local_workers import LocalWorkers
from tests.support.checkpoints import make_checkpoint
from tests.scheduler.test_fault_tolerance import PROMPTS, SLOW_STEP, all_ready, generate, make_engine, wait_tokens

pytest.importorskip("mlx.core")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("mixed-ft") / "llama", "llama", num_hidden_layers=6)


def test_kill_9_of_the_mlx_worker_mid_generation_loses_no_request(model_dir: Path) -> None:
    async def scenario() -> None:
        engine = make_engine(model_dir, 3)
        await engine.start()
        backends = ("torch", "mlx", "mlx")
        workers = LocalWorkers(engine.control_address, 3, threads_per_worker=1, extra_args=SLOW_STEP, backends=backends, token=engine.token)
        workers.start()
        try:
            await all_ready(engine, 3)
            by_id = engine.cluster.workers
            assert [by_id[f"local-{i}"].backend for i in range(3)] == list(backends)
            undisturbed = [await generate(engine, i, prompt) for i, prompt in enumerate(PROMPTS)]
            epoch = engine.cluster.epoch
            start = engine.workload.tokens_generated
            tasks = [asyncio.create_task(generate(engine, i, prompt)) for i, prompt in enumerate(PROMPTS)]
            await wait_tokens(engine, start + 8 * 10)  # about 10 tokens into every stream
            victim = by_id["local-1"]  # the middle stage, on MLX
            assert victim.loaded and 0 < victim.loaded[0]
            os.kill(victim.pid, signal.SIGKILL)
            results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=120)
            assert results == undisturbed  # same tokens, same text: nothing lost or doubled
            assert "local-1" not in engine.cluster.workers
            assert engine.cluster.epoch > epoch
            survivors = sorted(engine.cluster.workers.values(), key=lambda w: w.loaded)
            assert [w.backend for w in survivors] == ["torch", "mlx"]  # still a mixed pipeline
            assert survivors[0].loaded[0] == 0 and survivors[-1].loaded[1] == 6
        finally:
            workers.stop()
            await engine.stop(shutdown_workers=True)

    asyncio.run(scenario())
