"""A scheduler restarted with the same token takes its workers back: they see their key refused in
the CURVE handshake and register again (real worker processes, loopback): an in-process engine
with a local worker, and `potluck serve` restarted under two `potluck join` processes."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import httpx
import pytest

from api.local_workers import LocalWorkers
from scheduler.engine import Engine, EngineConfig
from scheduler.request import GenerationRequest
from scheduler.tokenizer import Tokenizer
from tests.support.checkpoints import make_checkpoint
from tests.support.joiner import Joiner
from tests.support.served import ServedModel, free_port
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


def test_joined_workers_survive_a_restart_of_potluck_serve(tmp_path: Path) -> None:
    """The must-show of issue 18: `potluck serve` stopped with Ctrl-C and started again (same token,
    same scheduler port); two `potluck join` processes stay up, register again and serve."""
    model_dir = make_checkpoint(tmp_path / "llama", "llama", num_hidden_layers=2)
    token = curve.new_token()
    scheduler_port = free_port()
    args = ["--token", token, "--scheduler-port", str(scheduler_port), "--no-profile"]
    body = {"model": "llama", "prompt": [5, 6, 7], "max_tokens": 8, "temperature": 0}
    joiners = [Joiner(f"127.0.0.1:{scheduler_port}", wid, token) for wid in ("a", "b")]
    try:
        with ServedModel(model_dir, 0, args, log_path=tmp_path / "first.log") as first:
            _wait_for_workers(first.url, {"a", "b"}, timeout_s=180)
            first.wait_ready("llama")
            before = httpx.post(f"{first.url}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
        for joiner in joiners:  # the scheduler is gone; the joiners wait for it
            joiner.wait_for("lost the connection to the scheduler", timeout_s=30)
            assert joiner.process.poll() is None, "\n".join(joiner.lines)
        with ServedModel(model_dir, 0, args, log_path=tmp_path / "second.log") as second:
            up_s = _wait_for_http(second.url, timeout_s=180)  # the scheduler listens before HTTP does
            registered_s = _wait_for_workers(second.url, {"a", "b"}, timeout_s=60, ready=False)
            ready_s = _wait_for_workers(second.url, {"a", "b"}, timeout_s=60)
            after = httpx.post(f"{second.url}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
            kept = [line for joiner in joiners for line in joiner.matching("keeping layers")]
            print(f"\nafter the restart: both joiners registered {registered_s - up_s:.2f} s and serving "
                  f"{ready_s - up_s:.2f} s after the new scheduler's HTTP came up; {len(kept)} kept their layers")
            assert registered_s - up_s < 10.0  # the must-show's bound (reconnecting takes ~0.1 s)
            assert after == before
    finally:
        for joiner in joiners:
            joiner.stop()


def _wait_for_http(url: str, timeout_s: float) -> float:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            httpx.get(f"{url}/cluster", timeout=5)
            return time.monotonic()
        except httpx.HTTPError:
            time.sleep(0.05)
    raise TimeoutError(f"{url} never answered")


def _wait_for_workers(url: str, ids: set[str], timeout_s: float, ready: bool = True) -> float:
    """When every worker of `ids` is registered (and, with `ready`, serving its layers)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            workers = {w["id"]: w for w in httpx.get(f"{url}/cluster", timeout=5).json()["workers"]}
            if ids <= set(workers) and (not ready or all(workers[i]["state"] == "ready" for i in ids)):
                return time.monotonic()
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"workers {sorted(ids)} not {'ready' if ready else 'registered'} at {url}")
