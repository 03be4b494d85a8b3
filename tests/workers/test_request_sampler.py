"""The last stage's per-request sampling state: grammar-constrained tokens, replay after recovery,
logit_bias, penalties, min_tokens and prompt logprobs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from workers.protocol import SamplingParams
from workers.request_sampler import StageSampler
from workers.sampling import adjust_logits, prompt_logprobs

SCHEMA = json.dumps({"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                                      "b": {"type": "boolean"}},
                     "required": ["a", "b"], "additionalProperties": False})


@pytest.fixture(scope="module")
def model_dir(checkpoint_factory) -> Path:
    return checkpoint_factory("llama", num_hidden_layers=1, seed=5)


def _run(sampler: StageSampler, rid: str, params: SamplingParams, steps: int, start: int = 0) -> list[int]:
    gen = torch.Generator().manual_seed(0)
    rows = [torch.randn(1, 384, generator=gen) * 4 for _ in range(steps + start)]
    out = []
    for i in range(start, start + steps):
        token, _ = sampler.sample([rid], [params], [i], rows[i], [1])[0]
        out.append(token.token_id)
        if token.token_id in params.eos_token_ids:
            break
    return out


def test_grammar_output_parses_and_replays_after_recovery(model_dir: Path) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    params = SamplingParams(60, temperature=1.0, seed=3, eos_token_ids=(2,), grammar_kind="json_schema", grammar=SCHEMA)
    full = _run(StageSampler(str(model_dir), 384), "r", params, 60)
    assert full[-1] == 2
    value = json.loads(tok.decode(full[:-1]))
    assert set(value) == {"a", "b"} and 0 <= value["a"] <= 99
    # a resumed run (another worker) replays the first 4 tokens and continues identically
    resumed = SamplingParams(60, temperature=1.0, seed=3, eos_token_ids=(2,), grammar_kind="json_schema", grammar=SCHEMA,
                             output_token_ids=tuple(full[:4]))
    assert _run(StageSampler(str(model_dir), 384), "r2", resumed, 60, start=4) == full[4:]


def test_adjustments() -> None:
    row = torch.zeros(10)
    adjust_logits(row, SamplingParams(5, logit_bias=((3, 5.0),), min_tokens=2, eos_token_ids=(9,)), {}, None, 0)
    assert row[3] == 5.0 and row[9] == float("-inf")
    row = torch.tensor([2.0, -2.0, 1.0])
    adjust_logits(row, SamplingParams(5, repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25),
                  {2: 2}, torch.tensor([0, 1]), 3)
    assert row.tolist() == [1.0, -4.0, 1.0 - 1.0 - 0.25]
    logits = torch.randn(4, 10)
    entries = prompt_logprobs(logits, [1, 2, 3, 4], 2)
    expected = torch.log_softmax(logits, -1)
    assert [e[0] for e in entries] == pytest.approx([expected[i, t].item() for i, t in enumerate([1, 2, 3, 4])])
    assert entries[0][1][0][0] == int(expected[0].argmax())
