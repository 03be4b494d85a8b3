"""Prefix caching in a ring of real Worker objects (one thread pumps them, real ZeroMQ): later
stages find the prefix the first stage reused by the hashes on the first hop; a stage that
evicted it sends `PrefixMiss` and the first stage prefills again, and the text does not change."""

from __future__ import annotations

import time
from pathlib import Path

import torch
import transformers
import zmq

from workers import codec
from workers import protocol as p
from workers.backend import SequenceChunk
from workers.worker import Worker, WorkerConfig

SHARED = [(7 * i) % 300 + 9 for i in range(40)]  # 2 full blocks of 16 + 8 tokens


def _pump(workers: list[Worker], done, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, "the ring did not finish"
        for worker in workers:
            if worker.pull.poll(1):
                worker.receive_all()
            if worker.pending and worker.backend is not None:
                worker.step()


def test_a_stage_that_evicted_the_prefix_makes_the_first_stage_prefill_again(llama_checkpoint: Path) -> None:
    num_layers = transformers.AutoConfig.from_pretrained(llama_checkpoint).num_hidden_layers
    model = transformers.AutoModelForCausalLM.from_pretrained(llama_checkpoint, dtype=torch.float32).eval()
    context = zmq.Context.instance()
    scheduler = context.socket(zmq.PULL)
    port = scheduler.bind_to_random_port("tcp://127.0.0.1")
    workers = [Worker(WorkerConfig(scheduler_address=f"tcp://127.0.0.1:{port}", token="t" * 32, use_curve=False)) for _ in range(3)]
    try:
        bounds = [round(i * num_layers / 3) for i in range(4)]
        for worker, start, end in zip(workers, bounds, bounds[1:]):
            worker.handle(p.AssignLayers(0, str(llama_checkpoint), start, end, "float32", 2**20, 1))
        route = tuple(worker.data_address for worker in workers)
        outputs: dict[str, list[p.TokenOutput]] = {}

        def run(request_id: str, prompt: list[int], new_tokens: int = 6) -> tuple[list[int], int]:
            sampling = p.SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
            workers[0].handle(p.StartRequest(request_id, tuple(prompt), p.RequestStart(route, f"tcp://127.0.0.1:{port}", sampling)))

            def done() -> bool:
                while scheduler.poll(0):
                    message = codec.decode(scheduler.recv_multipart())
                    assert not isinstance(message, p.RequestFailed), message
                    if isinstance(message, p.TokenOutputs):
                        for output in message.outputs:
                            outputs.setdefault(output.request_id, []).append(output)
                return len(outputs.get(request_id, ())) == new_tokens

            _pump(workers, done)
            for worker in workers:  # as the scheduler does when a request ends
                worker.handle(p.ReleaseRequests((request_id,)))
            ids = torch.tensor([prompt])
            with torch.no_grad():
                reference = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False)
            tokens = [o.token_id for o in outputs[request_id]]
            assert tokens == reference[0, len(prompt):].tolist()
            return tokens, outputs[request_id][0].num_cached_tokens

        assert run("a", SHARED + [1, 2])[1] == 0
        assert run("b", SHARED + [3, 4])[1] == 32  # every stage held the 2 shared blocks
        # the middle stage evicts everything it cached (a request that needs every block)
        cache = workers[1].backend.kv_cache
        cache.allocate([SequenceChunk("filler", 0, cache.free_tokens())])
        cache.free("filler")
        assert cache.cached_blocks() == 0 and workers[0].backend.kv_cache.cached_blocks() > 0
        assert run("c", SHARED + [5, 6])[1] == 0  # first stage reused 32, the middle none: again from 0
        assert run("d", SHARED + [7, 8])[1] == 32  # c cached the prefix again on the middle stage
        for worker in workers:
            assert worker.backend.kv_free_tokens() == worker.backend.kv_capacity_tokens()
    finally:
        for worker in workers:
            worker.close()
        scheduler.close(linger=0)
