"""A worker slowed by the fault-injection knob is measured as slower, gets fewer layers and less traffic.

Throughput objective: the fast workers hold every layer between them and the slow one at most a
parallel copy of some of them, and routing sends it less traffic. (It may hold as many layers as a
fast worker, or more: when the fast worker after it has spare capacity, a copy of the first four
layers on the slow worker beside the fast one adds ~8% throughput, measured; the solver is right
to take it.) Latency objective: it only slows a pipeline down, so it gets no layers at all.

Three real worker processes profile themselves at join (workers/profiler.py, timing one layer of
the model); one runs with `--slowdown 8`, which slows its measured figures and every real step.
Memory is set so that no worker can hold the whole model: the solver must build pipelines.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import pytest

from api.local_workers import LocalWorkers
from scheduler.engine import Engine, EngineConfig
from scheduler.planner import RUNTIME_OVERHEAD_BYTES, plan_layers
from scheduler.request import GenerationRequest
from scheduler.tokenizer import Tokenizer
from tests.support.checkpoints import make_checkpoint
from workers.model_facts import read_model_facts
from workers.protocol import SamplingParams

pytestmark = pytest.mark.slow


def test_a_slowed_worker_is_measured_slower_and_gets_fewer_layers_and_less_traffic(tmp_path: Path) -> None:
    model_dir = make_checkpoint(tmp_path / "llama", "llama", num_hidden_layers=6, hidden_size=128, intermediate_size=512)
    facts = read_model_facts(model_dir)
    max_model_len, concurrency = 256, 16
    per_layer = max(facts.layer_bytes) + facts.kv_bytes_per_token_per_layer * max_model_len * concurrency
    memory = RUNTIME_OVERHEAD_BYTES + facts.embedding_bytes + facts.lm_head_bytes + 4 * per_layer  # 4 of 6 layers

    async def scenario() -> None:
        config = EngineConfig(
            str(model_dir), facts, "m", min_workers=3, max_model_len=max_model_len,
            max_concurrent_sequences=concurrency, placement="solver",
        )  # fmt: skip
        engine = Engine(config, Tokenizer.from_model_dir(model_dir))
        await engine.start()
        common = dict(threads_per_worker=1, memory_bytes_per_worker=memory, profile_model_dir=str(model_dir), profile_seconds=1.0)
        started = [
            LocalWorkers(engine.control_address, 1, id_prefix="fast", **common, token=engine.token),
            LocalWorkers(engine.control_address, 1, id_prefix="fleet", **common, token=engine.token),
            LocalWorkers(engine.control_address, 1, id_prefix="slow", extra_args=["--slowdown", "8"], **common, token=engine.token),
        ]
        try:
            # one at a time: each profiles itself at join, and on 2 cores profiles measured side by
            # side would measure each other
            for count, workers_of_one in enumerate(started, start=1):
                workers_of_one.start()
                for _ in range(600):
                    if len(engine.cluster.workers) >= count:
                        break
                    await asyncio.sleep(0.1)
            await engine.wait_ready(timeout_s=90)
            await asyncio.sleep(1.0)  # let every assigned worker finish loading
            workers = engine.cluster.workers
            assert set(workers) == {"fast-0", "fleet-0", "slow-0"}

            def decode_s(worker_id: str) -> float:
                rows = workers[worker_id].profile.layer_timings.decode_step_s
                return min(seconds for batch, _, seconds in rows if batch == 1)

            assert decode_s("slow-0") > 2 * max(decode_s("fast-0"), decode_s("fleet-0"))  # measured slower
            assert workers["slow-0"].profile.matmul_flops_per_s < min(workers[w].profile.matmul_flops_per_s for w in ("fast-0", "fleet-0"))
            plan = engine.cluster.plan
            assert plan is not None
            # throughput: the slow worker is never the only holder of a layer (it would be the
            # bottleneck); at most it holds a parallel copy of layers a fast worker serves
            held_by_fast = {layer for w in ("fast-0", "fleet-0") if w in plan.ranges for layer in range(*plan.ranges[w])}
            assert held_by_fast == set(range(facts.num_layers)), plan
            # for one user's latency (the homelab default of `--placement-objective latency`), a
            # device that only slows the pipeline down is left out: no layers at all
            latency_plan = plan_layers(facts, list(workers.values()), replace(engine.planner_config, objective="latency"), epoch=99)
            assert "slow-0" not in latency_plan.ranges, latency_plan
            assert sum(end - start for start, end in latency_plan.ranges.values()) == facts.num_layers

            sampling = SamplingParams(max_new_tokens=8, ignore_eos=True)

            async def one(index: int) -> None:
                async for _ in engine.generate(GenerationRequest(f"r{index}", (5, 6, 7, 8 + index % 5), sampling)):
                    pass

            await asyncio.gather(*(one(i) for i in range(12)))
            routed = {w: workers[w].requests_routed for w in workers}
            assert routed["slow-0"] < min(routed["fast-0"], routed["fleet-0"]), routed
        finally:
            for workers_of_one in started:
                workers_of_one.stop()
            await engine.stop(shutdown_workers=True)

    asyncio.run(scenario())
