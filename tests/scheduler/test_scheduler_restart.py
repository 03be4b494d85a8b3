"""A scheduler restarted with the same token takes its workers back: they see their key refused in
the CURVE handshake and register again (a real worker process, loopback)."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import pytest

from api.local_workers import LocalWorkers
from scheduler.engine import Engine, EngineConfig
from scheduler.request import GenerationRequest
from scheduler.tokenizer import Tokenizer
from tests.support.checkpoints import make_checkpoint
from workers import curve
from workers.model_facts import read_model_facts
from workers.protocol import SamplingParams

pytestmark = pytest.mark.slow


def test_workers_register_again_with_a_restarted_scheduler(tmp_path: Path) -> None:
    model_dir = make_checkpoint(tmp_path / "llama", "llama", num_hidden_layers=2)
    token = curve.new_token()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    def engine() -> Engine:
        config = EngineConfig(str(model_dir), read_model_facts(model_dir), "m", control_port=port, token=token, heartbeat_timeout_s=2.0)
        return Engine(config, Tokenizer.from_model_dir(model_dir))

    async def tokens(engine: Engine) -> list[int]:
        request = GenerationRequest(f"r{time.monotonic_ns()}", (5, 6, 7), SamplingParams(max_new_tokens=8, ignore_eos=True))
        return [t async for output in engine.generate(request) for t in output.token_ids]

    async def scenario() -> None:
        first = engine()
        await first.start()
        workers = LocalWorkers(first.control_address, 1, threads_per_worker=1, token=token)
        workers.start()
        try:
            await first.wait_ready(timeout_s=120)
            before = await tokens(first)
            await first.stop()  # the worker stays up (its parent, this process, lives on)
            second = engine()
            await second.start()
            try:
                await second.wait_ready(timeout_s=60)
                assert await tokens(second) == before
            finally:
                await second.stop(shutdown_workers=True)
        finally:
            workers.stop()

    asyncio.run(scenario())
