"""A request's whole life through `scheduler/request_state.py` alone: no sockets, no processes.

Each test drives one `RequestState` through its transitions (routed, token, stage lost, replayed,
finished, aborted) against real `WorkerState`s and checks the reservations every stage holds.
"""

from __future__ import annotations

import pytest

from scheduler.cluster import WorkerState
from scheduler.errors import GenerationFailedError
from scheduler.request import GenerationRequest
from scheduler.request_state import RequestState, WorkloadStats
from workers.protocol import SamplingParams, TokenOutput

PROMPT = (5, 6, 7, 8)
MAX_NEW = 12  # prompt + max new = one 16-token KV block: stages reserve whole blocks


def workers(*ids: str) -> dict[str, WorkerState]:
    return {w: WorkerState(w, f"tcp://127.0.0.1:{6000 + n}", 10**9, "cpu", {}, 0, 0.0, 0.0, kv_capacity_tokens=1000)
            for n, w in enumerate(ids)}


def new_state() -> RequestState:
    return RequestState(GenerationRequest("req", PROMPT, SamplingParams(max_new_tokens=MAX_NEW)), started_at_s=0.0)


def held(worker: WorkerState) -> tuple[int, int, int]:
    return worker.in_flight, worker.reserved_kv_tokens, worker.queued_prefill_tokens


def out(state: RequestState, index: int, token_id: int, finish_reason: str | None = None) -> TokenOutput:
    return TokenOutput(state.wire_id, index, token_id, finish_reason)


def test_routed_tokens_finished_reserve_and_free_every_stage() -> None:
    cluster = workers("A", "B")
    state = new_state()
    start = state.routed(("A", "B"), cluster, "tcp://127.0.0.1:5000")
    assert start.request_id == "req#0" and start.token_ids == PROMPT
    assert start.start.route == ("tcp://127.0.0.1:6000", "tcp://127.0.0.1:6001")
    assert start.start.first_token_index == 0 and start.start.sampling.max_new_tokens == MAX_NEW
    assert held(cluster["A"]) == held(cluster["B"]) == (1, len(PROMPT) + MAX_NEW, len(PROMPT))
    assert cluster["A"].requests_routed == 1

    first = state.token(out(state, 0, 42), cluster)
    assert first is not None and first.prompt_through and first.token_id == 42
    assert held(cluster["B"]) == (1, len(PROMPT) + MAX_NEW, 0)  # the prompt left every queue
    assert state.token(out(state, 0, 42), cluster) is None  # a duplicate
    assert state.token(out(state, 2, 44), cluster) is None  # out of order
    second = state.token(out(state, 1, 43), cluster)
    assert second is not None and not second.prompt_through
    assert state.generated == [42, 43]

    assert state.finished("stop", cluster) == ("A", "B")
    assert held(cluster["A"]) == held(cluster["B"]) == (0, 0, 0)
    assert state.is_done and not state.is_routed and state.error is None
    assert state.aborted(cluster) == ()  # the engine's cleanup after a finish frees nothing twice


def test_a_lost_stage_replays_from_the_tokens_already_accepted() -> None:
    cluster = workers("A", "B", "C")
    state = new_state()
    state.routed(("A", "B"), cluster, "ctl")
    for index, token in enumerate((42, 43)):
        assert state.token(out(state, index, token), cluster) is not None
    stale = out(state, 2, 99)  # sent by the attempt that is about to break
    del cluster["B"]  # the engine drops a lost worker from the cluster first
    assert state.stage_lost("worker B lost", cluster, max_restarts=8) == ("A",)
    assert held(cluster["A"]) == (0, 0, 0)
    assert not state.is_routed and state.lost_reason == "worker B lost" and state.error is None
    assert state.token(stale, cluster) is None  # nothing is accepted while unrouted
    assert state.stage_lost("again", cluster, max_restarts=8) == ()  # no attempt to end

    start = state.replayed(("A", "C"), cluster, "ctl")
    assert start.request_id == "req#1" and start.token_ids == PROMPT + (42, 43)
    assert start.start.first_token_index == 2 and start.start.sampling.max_new_tokens == MAX_NEW - 2
    replay_prompt = len(PROMPT) + 2
    assert held(cluster["C"]) == (1, replay_prompt + MAX_NEW - 2, replay_prompt)
    assert state.token(TokenOutput("req#0", 2, 99), cluster) is None  # the old attempt's token
    taken = state.token(out(state, 2, 44), cluster)
    assert taken is not None and taken.prompt_through and taken.index == 2
    assert state.generated == [42, 43, 44]
    assert state.finished("length", cluster) == ("A", "C")
    assert held(cluster["A"]) == held(cluster["C"]) == (0, 0, 0)


def test_a_request_fails_after_max_restarts_and_abort_frees_its_route() -> None:
    cluster = workers("A")
    state = new_state()
    with pytest.raises(RuntimeError):
        state.replayed(("A",), cluster, "ctl")  # nothing was lost yet
    for attempt in range(2):
        state.routed(("A",), cluster, "ctl")
        state.stage_lost(f"loss {attempt}", cluster, max_restarts=1)
    assert isinstance(state.error, GenerationFailedError) and "2 times; last: loss 1" in str(state.error)
    with pytest.raises(RuntimeError):
        state.routed(("A",), cluster, "ctl")  # a failed request goes nowhere
    assert held(cluster["A"]) == (0, 0, 0) and cluster["A"].requests_routed == 2

    other = new_state()
    other.routed(("A",), cluster, "ctl")
    assert other.aborted(cluster, ValueError("client went away")) == ("A",)
    assert held(cluster["A"]) == (0, 0, 0) and isinstance(other.error, ValueError)
    assert other.aborted(cluster) == ()


def test_workload_stats_give_the_mix_once_enough_requests_finished() -> None:
    stats = WorkloadStats()
    cluster = workers("A")
    for n in range(3):
        state = new_state()
        state.routed(("A",), cluster, "ctl")
        for index in range(MAX_NEW):
            state.token(out(state, index, 10 + index), cluster)
            stats.on_token()
        state.finished("length", cluster)
        stats.on_finished(state)
    assert (stats.tokens_generated, stats.finished_requests) == (3 * MAX_NEW, 3)
    assert stats.mix(2.5, min_requests=4) == (2.5, 0.0)
    assert stats.mix(2.5, min_requests=3) == pytest.approx((len(PROMPT) / MAX_NEW, len(PROMPT) + MAX_NEW))
