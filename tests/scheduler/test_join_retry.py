"""`potluck join` before its scheduler is up (real processes, loopback): one line per failed
attempt, backing off, and it joins and serves once the scheduler appears; another cluster token
is a clear line too."""

from __future__ import annotations

import asyncio
import re
import socket
import time
from pathlib import Path

import pytest

from scheduler.engine import Engine, EngineConfig
from scheduler.request import GenerationRequest
from scheduler.tokenizer import Tokenizer
from tests.support.checkpoints import make_checkpoint
from tests.support.joiner import Joiner
from workers import curve
from workers.model_facts import read_model_facts
from workers.protocol import SamplingParams

pytestmark = pytest.mark.slow

ATTEMPT_LINE = re.compile(r"cannot join the scheduler at (\S+) \(attempt (\d+)\): (.*); next attempt in (\d+) s")


def test_join_retries_with_backoff_then_joins_when_the_scheduler_appears(tmp_path: Path) -> None:
    model_dir = make_checkpoint(tmp_path / "llama", "llama", num_hidden_layers=2)
    token = curve.new_token()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    joiner = Joiner(address, "early", token)
    wrong = None
    engine = Engine(EngineConfig(str(model_dir), read_model_facts(model_dir), "m", control_port=port, token=token),
                    Tokenizer.from_model_dir(model_dir))

    async def scenario() -> None:
        nonlocal wrong
        try:
            joiner.wait_for("cannot join the scheduler", timeout_s=120, count=3)
            await engine.start()
            started_s = time.monotonic()
            await engine.wait_ready(timeout_s=120)
            print(f"\njoined and ready {time.monotonic() - started_s:.1f} s after the scheduler started")
            request = GenerationRequest("r", (5, 6, 7), SamplingParams(max_new_tokens=4, ignore_eos=True))
            assert len([t async for output in engine.generate(request) for t in output.token_ids]) == 4
            joined = joiner.wait_for("joined the scheduler at", timeout_s=30)
            attempts = [ATTEMPT_LINE.search(line) for line in joiner.matching("cannot join the scheduler")]
            print("\n".join(joiner.matching("cannot join the scheduler")) + "\n" + joined[0])
            assert all(attempts)
            numbers = [int(m.group(2)) for m in attempts]
            assert numbers == list(range(1, len(numbers) + 1))  # one line per attempt, no flood
            assert [int(m.group(4)) for m in attempts][:4] == [1, 2, 4, 8][: len(attempts)]
            assert {m.group(1) for m in attempts} == {address}
            assert all("connection refused" in m.group(3) for m in attempts)
            assert f"after {len(numbers)} failed attempt(s)" in joined[0]
            # a joiner with another cluster token is told so, in one line per attempt
            wrong = Joiner(address, "wrong", curve.new_token())
            line = wrong.wait_for("cannot join the scheduler", timeout_s=120)[0]
            print(line)
            assert "another cluster token" in line and address in line
            assert "wrong" not in engine.cluster.workers
        finally:
            joiner.stop()
            if wrong is not None:
                wrong.stop()
            await engine.stop()

    asyncio.run(scenario())
