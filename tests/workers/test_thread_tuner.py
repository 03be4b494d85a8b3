"""Decode steps' thread count, measured online (workers/thread_tuner.py), and that the choice
changes no result."""
from __future__ import annotations

import pytest
import torch

from workers.backend import SequenceChunk, StageConfig
from workers.thread_tuner import ThreadTuner
from workers.torch_backend import TorchStageBackend


def _settle(tuner: ThreadTuner, rows: int, seconds_by_threads: dict[int, float]) -> list[int]:
    """Runs steps until the tuner settles; returns the thread counts it tried."""
    tried = []
    while tuner.choice(rows) is None:
        threads = tuner.threads_for(rows)
        tried.append(threads)
        tuner.record(rows, threads, seconds_by_threads[threads])
    return tried


def test_alternates_then_keeps_the_faster():
    tuner = ThreadTuner(4, trials_per_choice=2)
    assert _settle(tuner, 1, {1: 0.010, 4: 0.030}) == [1, 4, 1, 4]
    assert tuner.choice(1) == 1 and tuner.threads_for(1) == 1
    # another row count is its own decision: there 4 threads win
    assert _settle(tuner, 16, {1: 0.050, 4: 0.020}) == [1, 4, 1, 4]
    assert tuner.threads_for(16) == 4 and tuner.threads_for(1) == 1
    assert tuner.threads_for(9) == 4  # 9-16 rows share one decision


def test_the_least_time_seen_decides():
    tuner = ThreadTuner(2, trials_per_choice=2)
    for threads, seconds in [(1, 0.5), (2, 0.2), (1, 0.1), (2, 0.3)]:  # one thread's best is 0.1
        assert tuner.threads_for(1) == threads
        tuner.record(1, threads, seconds)
    assert tuner.choice(1) == 1


def test_prefill_gets_every_thread_and_one_thread_has_nothing_to_choose():
    tuner = ThreadTuner(8)
    assert tuner.threads_for(17) == 8 and tuner.threads_for(1000) == 8
    tuner.record(1000, 1, 9.0)  # ignored
    assert tuner.choice(1000) == 8
    single = ThreadTuner(1)
    assert single.threads_for(1) == 1 and single.choice(1) is None
    with pytest.raises(ValueError):
        ThreadTuner(0)


def test_retimes_after_retune_steps():
    tuner = ThreadTuner(2, trials_per_choice=1, retune_steps=3)
    _settle(tuner, 1, {1: 0.01, 2: 0.02})
    for _ in range(3):
        assert tuner.threads_for(1) == 1
        tuner.record(1, 1, 0.01)
    assert tuner.choice(1) is None  # timing both again: the load may have changed
    assert _settle(tuner, 1, {1: 0.05, 2: 0.02}) == [1, 2]
    assert tuner.choice(1) == 2


def test_steps_on_either_thread_count_give_the_same_logits(llama_checkpoint):
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        tuned = TorchStageBackend(StageConfig(str(llama_checkpoint), 0, 4, kv_budget_bytes=2**20))
        assert tuned._threads is not None and tuned._threads.candidates == (1, 2)
        torch.set_num_threads(1)
        fixed = TorchStageBackend(StageConfig(str(llama_checkpoint), 0, 4, kv_budget_bytes=2**20))
        assert fixed._threads is None
        prompt = torch.arange(3, 23)
        outs = [b.forward([SequenceChunk("r", 0, 20)], prompt) for b in (tuned, fixed)]
        torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=0)
        used = set()
        for position in range(20, 28):  # the tuned one alternates 1 and 2 threads, then keeps one
            used.add(tuned._threads.threads_for(1))
            token = torch.tensor([position % 50])
            a, b = tuned.forward([SequenceChunk("r", position, 1)], token), fixed.forward([SequenceChunk("r", position, 1)], token)
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
        assert used == {1, 2} and tuned._threads.choice(1) in (1, 2)
    finally:
        torch.set_num_threads(previous)
