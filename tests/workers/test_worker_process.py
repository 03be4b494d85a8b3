"""A live worker process drops malformed and stale messages, logs them, and keeps serving."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgpack
import pytest
import zmq

from api.local_workers import LocalWorkers
from scheduler.engine import Engine, EngineConfig
from scheduler.load import load_snapshot
from scheduler.request import GenerationRequest
from scheduler.tokenizer import Tokenizer
from tests.support.checkpoints import make_checkpoint
from workers import codec
from workers import protocol as p
from workers.batching import MAX_PREFILL_TOKENS_PER_STEP
from workers.model_facts import read_model_facts

pytestmark = pytest.mark.slow


def test_malformed_messages_are_dropped_and_the_worker_stays_up(tmp_path: Path) -> None:
    model_dir = make_checkpoint(tmp_path / "llama", "llama", num_hidden_layers=2)
    garbage = [
        [b"\xc1\xc1 not msgpack"],
        [msgpack.packb(["NoSuchKind", {}])],
        [msgpack.packb(["StartRequest", {"request_id": 5}])],
        [msgpack.packb(["Activations", {"entries": [{"request_id": "x", "start_position": 0, "num_tokens": 3}], "hidden": {"__tensor__": 0, "dtype": "float32", "shape": [3, 64]}}]), b"\x00" * 12],
        codec.encode(p.NextTokens((p.NextToken("unknown#0", 5, 9),))),  # stale: no such request
        codec.encode(p.ReleaseRequests(("never-started#0",))),
    ]

    async def scenario() -> None:
        engine = Engine(EngineConfig(str(model_dir), read_model_facts(model_dir), "m"), Tokenizer.from_model_dir(model_dir))
        await engine.start()
        workers = LocalWorkers(engine.control_address, 1, threads_per_worker=1, token=engine.token)
        workers.start()
        context = zmq.Context()
        push = context.socket(zmq.PUSH)
        try:
            await engine.wait_ready(timeout_s=60)
            # the router knows the worker's own chunked-prefill budget (it reports it at registration)
            (stage,) = load_snapshot(engine.cluster, engine.config.model).stages
            assert stage.prefill_tokens_per_step == MAX_PREFILL_TOKENS_PER_STEP
            request = GenerationRequest("r0", (5, 6, 7), p.SamplingParams(max_new_tokens=6, ignore_eos=True))
            before = [o.token_ids async for o in engine.generate(request)]
            push.connect(engine.cluster.workers["local-0"].data_address)
            for frames in garbage:
                push.send_multipart(frames)
            await asyncio.sleep(1.0)
            assert workers.processes[0].poll() is None  # still running
            assert "local-0" in engine.cluster.workers  # still heartbeating
            after = [o.token_ids async for o in engine.generate(GenerationRequest("r1", request.prompt_token_ids, request.sampling))]
            assert after == before
        finally:
            push.close(linger=0)
            context.term()
            workers.stop()
            await engine.stop(shutdown_workers=True)

    asyncio.run(scenario())
