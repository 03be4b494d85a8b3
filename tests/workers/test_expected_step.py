"""The fast path of a running ring: a stage makes its next decode step ready while it waits, runs it
when exactly the awaited message comes, and takes the general path for anything else."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import numpy as np
import torch
import transformers
import zmq

from workers import codec
from workers import protocol as p
from workers.backend import SequenceChunk, StageConfig
from workers.expected_step import expect_next
from workers.tensor_frames import tensor_to_payload
from workers.torch_backend import TorchStageBackend
from workers.worker import Worker, WorkerConfig


def _frames(message: p.Message) -> list[zmq.Frame]:
    return [zmq.Frame(bytes(memoryview(f))) for f in codec.encode(message)]


def _backend(model_dir: Path, start: int, end: int) -> TorchStageBackend:
    return TorchStageBackend(StageConfig(str(model_dir), start, end, "float32", kv_budget_bytes=2**20))


def test_a_middle_stage_takes_exactly_the_awaited_activations(llama_checkpoint: Path) -> None:
    backend = _backend(llama_checkpoint, 1, 3)
    hidden = torch.randn(3, backend.hidden_size)
    backend.forward([SequenceChunk("a", 0, 3)], hidden)  # a prompt of 3 tokens is cached
    expected = expect_next(backend, {"a": 3}, ["tcp://127.0.0.1:9"])
    assert expected is not None and expected.chunks == (SequenceChunk("a", 3, 1),)

    row = torch.randn(1, backend.hidden_size)
    awaited = p.Activations((p.ActivationEntry("a", 3, 1),), tensor_to_payload(row))
    inputs = expected.inputs(_frames(awaited))
    assert inputs is not None and np.array_equal(inputs, row.numpy())
    # and it sends on what the next stage awaits: the same entries, its own output's shape and dtype
    assert expected.send_address == "tcp://127.0.0.1:9"
    assert expected.send_header == codec.encode(awaited)[0]

    others = [
        p.Activations((p.ActivationEntry("a", 4, 1),), tensor_to_payload(row)),  # another position
        p.Activations((p.ActivationEntry("b", 3, 1),), tensor_to_payload(row)),  # another request
        p.Activations((p.ActivationEntry("a", 3, 1),), tensor_to_payload(row.half())),  # another dtype
        p.Activations((p.ActivationEntry("a", 3, 2),), tensor_to_payload(torch.randn(2, backend.hidden_size))),
        p.NextTokens((p.NextToken("a", 5, 3),)),
        p.ReleaseRequests(("a",)),
    ]
    for message in others:
        assert expected.inputs(_frames(message)) is None
    truncated = _frames(awaited)
    truncated[1] = zmq.Frame(bytes(memoryview(truncated[1]))[:-4])
    assert expected.inputs(truncated) is None


def test_a_first_stage_takes_the_awaited_next_tokens_only(llama_checkpoint: Path) -> None:
    backend = _backend(llama_checkpoint, 0, 2)
    backend.forward([SequenceChunk("a", 0, 2), SequenceChunk("b", 0, 3)], torch.tensor([5, 6, 7, 8, 9]))
    expected = expect_next(backend, {"a": 2, "b": 3}, ["tcp://127.0.0.1:9", "tcp://127.0.0.1:9"])
    assert expected is not None and expected.inputs_header is None
    awaited = p.NextTokens((p.NextToken("a", 11, 2), p.NextToken("b", 12, 3)))
    inputs = expected.inputs(_frames(awaited))
    assert inputs is not None and inputs.tolist() == [11, 12]
    for tokens in [
        (p.NextToken("a", 11, 2),),  # only part of the ring is back
        (p.NextToken("b", 12, 3), p.NextToken("a", 11, 2)),  # another order
        (p.NextToken("a", 11, 2), p.NextToken("b", 12, 3, finished=True)),  # b ended
        (p.NextToken("a", 11, 2), p.NextToken("b", 12, 4)),  # another position
        (p.NextToken("a", 11, 2), p.NextToken("b", backend.vocab_size, 3)),  # outside the vocabulary
    ]:
        assert expected.inputs(_frames(p.NextTokens(tokens))) is None


def test_a_prepared_step_gives_the_same_outputs_and_a_free_makes_it_stale(llama_checkpoint: Path) -> None:
    plain, fast = _backend(llama_checkpoint, 0, 4), _backend(llama_checkpoint, 0, 4)
    prompt = torch.arange(3, 20)  # 17 tokens: a second KV block
    for backend in (plain, fast):
        backend.forward([SequenceChunk("a", 0, len(prompt))], prompt)
    for position in range(len(prompt), len(prompt) + 18):  # on into a third block
        chunks = [SequenceChunk("a", position, 1)]
        prepared = fast.prepare(chunks)
        assert prepared is not None
        token = torch.tensor([position % 50 + 3])
        assert torch.equal(fast.forward(chunks, token, prepared), plain.forward(chunks, token))
    # freed and started again, "a" sits in other blocks: a step prepared before must not be used
    stale = fast.prepare([SequenceChunk("a", 2 * len(prompt), 1)])
    for backend in (plain, fast):
        backend.free("a")
        backend.forward([SequenceChunk("c", 0, 40)], torch.arange(3, 43))  # takes the freed blocks
        backend.forward([SequenceChunk("a", 0, 2 * len(prompt))], torch.cat([prompt, prompt]))
    chunks = [SequenceChunk("a", 2 * len(prompt), 1)]
    token = torch.tensor([7])
    assert torch.equal(fast.forward(chunks, token, stale), plain.forward(chunks, token))
    assert fast.kv_free_tokens() == plain.kv_free_tokens()


def _pump(workers: list[Worker], done, timeout_s: float = 60.0) -> None:
    """Each worker's loop, one turn at a time, in this thread: receive what came, step."""
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError("the ring did not finish")
        for worker in workers:
            if worker.pull.poll(1):
                worker.receive_all()
            if worker.pending and worker.backend is not None:
                worker.step()


@pytest.mark.parametrize("num_stages", [2, 3])
def test_a_ring_of_workers_runs_its_decode_steps_on_the_fast_path(llama_checkpoint: Path, num_stages: int) -> None:
    num_layers = transformers.AutoConfig.from_pretrained(llama_checkpoint).num_hidden_layers
    new_tokens = 12
    prompt = [5, 17, 42, 8, 99, 23]
    model = transformers.AutoModelForCausalLM.from_pretrained(llama_checkpoint, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        reference = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False)
    reference_tokens = reference[0, len(prompt) :].tolist()

    context = zmq.Context.instance()
    scheduler = context.socket(zmq.PULL)
    port = scheduler.bind_to_random_port("tcp://127.0.0.1")
    workers = [Worker(WorkerConfig(scheduler_address=f"tcp://127.0.0.1:{port}", token="t" * 32, use_curve=False)) for _ in range(num_stages)]
    try:
        bounds = [round(i * num_layers / num_stages) for i in range(num_stages + 1)]
        for worker, start, end in zip(workers, bounds, bounds[1:]):
            worker.handle(p.AssignLayers(0, str(llama_checkpoint), start, end, "float32", 2**20, 1))
        route = tuple(worker.data_address for worker in workers)
        sampling = p.SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
        start = p.RequestStart(route, f"tcp://127.0.0.1:{port}", sampling)
        workers[0].handle(p.StartRequest("r", tuple(prompt), start))
        tokens: list[int] = []

        def done() -> bool:
            while scheduler.poll(0):
                message = codec.decode(scheduler.recv_multipart())
                if isinstance(message, p.TokenOutputs):
                    tokens.extend(output.token_id for output in message.outputs)
            return len(tokens) == new_tokens

        _pump(workers, done)
        assert tokens == reference_tokens
        # every decode step after the first ran on the fast path, on every stage
        for worker in workers:
            assert worker.expected_steps_run >= new_tokens - 2
        # the first stage ran one step more than the ring finished: it let the request go
        _pump(workers, lambda: not workers[0].requests, timeout_s=10)
        assert workers[0].expected is None
    finally:
        for worker in workers:
            worker.close()
        scheduler.close(linger=0)
