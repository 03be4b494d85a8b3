"""The last stage's outputs after sampling: where each message goes and when a request ends."""

from __future__ import annotations

from workers import protocol as p
from workers.batching import StageRequest
from workers.ring_close import close_ring
from workers.sampling import SampledToken


def _state(request_id: str, first_stage: str, max_new_tokens: int, ignore_eos: bool = False) -> StageRequest:
    sampling = p.SamplingParams(max_new_tokens=max_new_tokens, eos_token_ids=(2,), ignore_eos=ignore_eos)
    start = p.RequestStart((first_stage, "tcp://last"), "tcp://scheduler", sampling)
    return StageRequest(request_id, start, None, position=10)


def test_tokens_go_to_the_scheduler_and_next_inputs_to_each_first_stage() -> None:
    states = [_state("a", "tcp://first-0", 5), _state("b", "tcp://first-1", 5), _state("c", "tcp://first-0", 5)]
    ring = close_ring(states, [0, 3, 1], [SampledToken(7), SampledToken(8, -0.5), SampledToken(9)], "w-last")
    assert ring.next_tokens == {
        "tcp://first-0": p.NextTokens((p.NextToken("a", 7, 10), p.NextToken("c", 9, 10))),
        "tcp://first-1": p.NextTokens((p.NextToken("b", 8, 10),)),
    }
    (outputs,) = ring.token_outputs.values()
    assert outputs.worker_id == "w-last"
    assert [(o.request_id, o.index, o.token_id, o.logprob) for o in outputs.outputs] == [
        ("a", 0, 7, None), ("b", 3, 8, -0.5), ("c", 1, 9, None)
    ]  # fmt: skip
    assert ring.finished == ()
    assert [s.num_generated for s in states] == [1, 1, 1]


def test_a_request_ends_on_eos_unless_ignored_and_at_max_new_tokens() -> None:
    eos, ignored, full = _state("eos", "tcp://f", 9), _state("ignored", "tcp://f", 9, ignore_eos=True), _state("full", "tcp://f", 1)
    ring = close_ring([eos, ignored, full], [0, 0, 0], [SampledToken(2), SampledToken(2), SampledToken(5)], "w")
    reasons = {o.request_id: o.finish_reason for o in ring.token_outputs["tcp://scheduler"].outputs}
    assert reasons == {"eos": "stop", "ignored": None, "full": "length"}
    assert ring.finished == ("eos", "full")
    finished_flags = {t.request_id: t.finished for t in ring.next_tokens["tcp://f"].tokens}
    assert finished_flags == {"eos": True, "ignored": False, "full": True}
