"""Ctrl-C on a joined worker (a real `potluck join` process, loopback) deregisters it at once: the
scheduler gets its `Leave` and replays the requests it held, long before a heartbeat timeout could."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest

from api.startup import ExitCode
from scheduler.engine import Engine, EngineConfig
from scheduler.request import GenerationRequest
from scheduler.tokenizer import Tokenizer
from tests.support.checkpoints import make_checkpoint
from tests.support.joiner import Joiner
from workers import curve
from workers.model_facts import read_model_facts
from workers.protocol import SamplingParams

pytestmark = pytest.mark.slow

HEARTBEAT_TIMEOUT_S = 600.0  # far beyond the test: only a `Leave` can remove a worker this soon
NUM_STREAMS = 8
NEW_TOKENS = 32


def test_ctrl_c_on_a_joiner_moves_its_streams_without_a_stall(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model_dir = make_checkpoint(tmp_path / "llama", "llama", num_hidden_layers=2)
    token = curve.new_token()
    config = EngineConfig(str(model_dir), read_model_facts(model_dir), "m", token=token, heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S)
    engine = Engine(config, Tokenizer.from_model_dir(model_dir))
    caplog.set_level(logging.INFO, logger="potluck.scheduler")

    async def stream(index: int, stamps: list[float]) -> list[int]:
        request = GenerationRequest(f"s{index}-{time.monotonic_ns()}", (5 + index, 6, 7),
                                    SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))
        tokens = []
        async for output in engine.generate(request):
            tokens += output.token_ids
            stamps.append(time.monotonic())
        return tokens

    async def all_streams(stamps: list[list[float]]) -> list[list[int]]:
        return list(await asyncio.gather(*(stream(i, stamps[i]) for i in range(NUM_STREAMS))))

    async def scenario() -> None:
        await engine.start()
        # each step waits 20 ms, so the streams are still running when Ctrl-C comes
        joiners = {wid: Joiner(engine.control_address, wid, token, ["--step-delay-s", "0.02"]) for wid in ("a", "b")}
        try:
            deadline = time.monotonic() + 120
            while {w for route in engine.cluster.usable_routes() for w in route} != set(joiners):
                assert time.monotonic() < deadline, "the two joiners never both served"
                await asyncio.sleep(0.1)
            undisturbed = await all_streams([[] for _ in range(NUM_STREAMS)])
            stamps: list[list[float]] = [[] for _ in range(NUM_STREAMS)]
            running = asyncio.create_task(all_streams(stamps))
            while min(len(s) for s in stamps) < 4:  # every stream is under way
                await asyncio.sleep(0.01)
            holding = [w for state in engine.requests.values() for w in state.route]
            leaving = max(set(holding), key=holding.count)  # the joiner most streams pass through
            pipelines = engine.cluster.usable_routes()
            interrupted_s = time.monotonic()
            joiners[leaving].interrupt()
            while leaving in engine.cluster.workers:
                await asyncio.sleep(0.005)
            lost_s = time.monotonic()
            disturbed = await running
            returncode = joiners[leaving].process.wait(timeout=30)  # a second SIGINT would cut its clean-up short
            gaps = [max(b - a for a, b in zip(s, s[1:])) for s in stamps]
            print(f"\npipelines {pipelines}; Ctrl-C on {leaving!r}: the scheduler lost it after {1000 * (lost_s - interrupted_s):.0f} ms "
                  f"(heartbeat timeout {HEARTBEAT_TIMEOUT_S:.0f} s); longest gap between tokens per stream (ms): "
                  + " ".join(f"{1000 * gap:.0f}" for gap in gaps))
            assert disturbed == undisturbed  # all 8 finish with the undisturbed text
            assert returncode == ExitCode.INTERRUPTED
            left = [r.getMessage() for r in caplog.records if f"worker {leaving} lost" in r.getMessage()]
            assert left and "left (stopped by Ctrl-C or SIGTERM)" in left[0], left
            assert lost_s - interrupted_s < HEARTBEAT_TIMEOUT_S  # by the Leave, not the heartbeat monitor
            replays = [r.getMessage() for r in caplog.records if r.getMessage().startswith("replaying ")]
            assert replays, "no stream was replayed"
            assert joiners[leaving].matching("left the cluster")
        finally:
            for joiner in joiners.values():
                joiner.stop()
            await engine.stop()

    asyncio.run(scenario())
