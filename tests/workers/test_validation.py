"""workers/validation.py on the sampling fields main's agents work added: each out-of-range value is
refused with a one-line ProtocolError, and the values the HTTP API accepts pass."""

from __future__ import annotations

import dataclasses

import pytest

from workers import protocol as p
from workers.validation import check_sampling, check_start

GOOD = p.SamplingParams(max_new_tokens=8, presence_penalty=2.0, frequency_penalty=-2.0, repetition_penalty=10.0,
                        min_p=1.0, logit_bias=((5, -100.0), (6, 100.0)), min_tokens=3, stop_token_ids=(1,),
                        grammar_kind="json_schema", grammar='{"type": "object"}', prompt_logprobs=20)


def test_the_ranges_the_api_accepts_pass() -> None:
    check_sampling(GOOD)
    check_start(p.RequestStart(("tcp://127.0.0.1:1",), "tcp://127.0.0.1:2", GOOD, block_hashes=(1, 2)), "tcp://127.0.0.1:1")


@pytest.mark.parametrize("change", [
    {"presence_penalty": 2.5}, {"frequency_penalty": float("nan")}, {"repetition_penalty": 0.0},
    {"repetition_penalty": float("inf")}, {"min_p": -0.1}, {"logit_bias": ((5, 101.0),)},
    {"logit_bias": ((5, float("nan")),)}, {"min_tokens": -1}, {"grammar_kind": "python"},
    {"grammar": "x" * ((1 << 20) + 1)}, {"prompt_logprobs": 21}, {"stop_token_ids": tuple(range((1 << 16) + 1))},
])  # fmt: skip
def test_out_of_range_agent_fields_are_refused_in_one_line(change: dict) -> None:
    with pytest.raises(p.ProtocolError) as caught:
        check_sampling(dataclasses.replace(GOOD, **change))
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 200
