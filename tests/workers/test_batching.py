"""The batch policy of one step, as a pure function of the pending work, the requests and the time."""

import torch

from workers import protocol as p
from workers.batching import (
    MAX_PREFILL_TOKENS_PER_STEP,
    RING_MERGE_MAX_WAIT_S,
    RING_MERGE_WAIT_S,
    RING_RETURN_FACTOR,
    StageRequest,
    WorkItem,
    take_batch,
)

ROUTE = ("tcp://a:1", "tcp://b:2", "tcp://c:3")
START = p.RequestStart(ROUTE, "tcp://s:0", p.SamplingParams(max_new_tokens=8))


def prefill(request_id: str, tokens: int, now_s: float = 0.0) -> WorkItem:
    return WorkItem(request_id, 0, torch.zeros(tokens, dtype=torch.long), arrived_s=now_s)


def decode(request_id: str, position: int, now_s: float) -> WorkItem:
    return WorkItem(request_id, position, torch.zeros(1, dtype=torch.long), arrived_s=now_s)


def running(*ids: str, position: int = 8, due_s: float = 0.0) -> dict[str, StageRequest]:
    return {i: StageRequest(i, START, position=position, ring_deadline_s=due_s) for i in ids}


def test_prefills_fill_a_token_budget_and_a_lone_huge_prompt_still_runs() -> None:
    half = MAX_PREFILL_TOKENS_PER_STEP // 2
    pending = [prefill("a", half), prefill("b", half), prefill("c", 10)]
    batch, held = take_batch(pending, {}, is_first=True, num_stages_hint=1, now_s=0.0)
    assert [i.request_id for i in batch] == ["a", "b"] and held == 0.0
    huge = [prefill("h", 2 * MAX_PREFILL_TOKENS_PER_STEP)]
    assert take_batch(huge, {}, is_first=True, num_stages_hint=1, now_s=0.0)[0] == huge


def test_across_machines_the_first_stage_runs_one_microbatch_per_stage() -> None:
    requests = running(*"abcdef")
    pending = [decode(i, 8, 0.0) for i in "abcdef"]
    batch, held = take_batch(pending, requests, is_first=True, num_stages_hint=3, now_s=0.0)
    assert [i.request_id for i in batch] == ["a", "b"] and held == 0.0
    # later stages run whatever reaches them
    assert len(take_batch(pending, requests, is_first=False, num_stages_hint=3, now_s=0.0)[0]) == 6


def test_a_co_located_ring_holds_decodes_until_the_rest_is_due_back() -> None:
    requests = {**running("a", "b"), **running("c", due_s=5.0)}  # c is still in the ring, due at 5 s
    pending = [decode("a", 8, 4.0), decode("b", 8, 4.0), prefill("new", 6)]
    batch, held = take_batch(pending, requests, is_first=True, num_stages_hint=1, now_s=4.5)
    assert [i.request_id for i in batch] == ["new"] and held == 5.0  # the prefill runs meanwhile
    batch, held = take_batch(pending, requests, is_first=True, num_stages_hint=1, now_s=5.0)  # overdue
    assert [i.request_id for i in batch] == ["new", "a", "b"] and held == 0.0
    # never longer than RING_MERGE_MAX_WAIT_S after the oldest decode came back
    requests["c"].ring_deadline_s = 100.0
    batch, held = take_batch(pending, requests, is_first=True, num_stages_hint=1, now_s=4.5)
    assert held == 4.0 + RING_MERGE_MAX_WAIT_S
    assert len(take_batch(pending, requests, is_first=True, num_stages_hint=1, now_s=held)[0]) == 3


def test_no_hold_when_the_whole_ring_is_back_or_a_request_has_not_started() -> None:
    requests = {**running("a", "b", due_s=9.0), "fresh": StageRequest("fresh", START)}  # position 0
    pending = [decode("a", 8, 1.0), decode("b", 8, 1.0)]
    batch, held = take_batch(pending, requests, is_first=True, num_stages_hint=1, now_s=1.0)
    assert len(batch) == 2 and held == 0.0


def test_a_request_is_due_back_after_its_route_at_the_measured_step_time() -> None:
    state = StageRequest("a", START)
    state.left_stage(now_s=10.0, step_s=0.02)
    assert state.ring_deadline_s == 10.0 + RING_RETURN_FACTOR * 0.02 * len(ROUTE) + RING_MERGE_WAIT_S
