"""Sampling: greedy, seeded reproducibility per token index, top-k / top-p, logprobs."""

from __future__ import annotations

import torch

from workers.protocol import SamplingParams
from workers.sampling import sample


def _logits(rows: int = 4, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax_without_logprobs():
    logits = _logits()
    out = sample(logits, [SamplingParams(8)] * 4, [0, 1, 2, 3])
    assert [s.token_id for s in out] == logits.argmax(-1).tolist()
    assert all(s.logprob is None and s.top_logprobs == () for s in out)


def test_seeded_draws_depend_only_on_seed_and_index():
    logits = _logits(rows=1, vocab=1000)
    p = SamplingParams(8, temperature=1.5, seed=1234)
    run = [sample(logits, [p], [i])[0].token_id for i in range(30)]
    again = [sample(logits, [p], [i])[0].token_id for i in range(10, 30)]
    assert run[10:] == again  # re-run from index 10 reproduces the same tokens
    assert len(set(run)) > 5  # and the draws do vary with the index
    other = [sample(logits, [SamplingParams(8, temperature=1.5, seed=99)], [i])[0].token_id for i in range(30)]
    assert other != run
    # The batch a row shares does not matter.
    batch = torch.cat([_logits(rows=3, vocab=1000, seed=7), logits])
    params = [SamplingParams(8, temperature=1.0, seed=5), SamplingParams(8), SamplingParams(8, temperature=0.7), p]
    assert sample(batch, params, [0, 0, 0, 17])[3].token_id == run[17]


def test_top_k_and_top_p_restrict_candidates():
    logits = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    top_k = SamplingParams(8, temperature=10.0, top_k=2, seed=1)
    assert {sample(logits, [top_k], [i])[0].token_id for i in range(200)} == {0, 1}
    probs = torch.softmax(logits[0], -1)  # [0.64, 0.24, 0.09, ...]: top_p 0.8 keeps two tokens
    assert probs[0] < 0.8 < probs[0] + probs[1]
    top_p = SamplingParams(8, temperature=1.0, top_p=0.8, seed=2)
    assert {sample(logits, [top_p], [i])[0].token_id for i in range(200)} == {0, 1}
    tiny_p = SamplingParams(8, temperature=1.0, top_p=0.01, seed=3)
    assert {sample(logits, [tiny_p], [i])[0].token_id for i in range(20)} == {0}


def test_sampling_frequencies_follow_softmax():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    p = SamplingParams(8, temperature=1.0, seed=11)
    counts = torch.bincount(torch.tensor([sample(logits, [p], [i])[0].token_id for i in range(3000)]), minlength=3)
    torch.testing.assert_close(counts / 3000.0, torch.tensor([0.5, 0.3, 0.2]), atol=0.04, rtol=0)


def test_logprobs_match_log_softmax():
    logits = _logits(rows=3, vocab=40)
    params = [
        SamplingParams(8, num_top_logprobs=5),
        SamplingParams(8, temperature=0.8, seed=3, num_top_logprobs=0),
        SamplingParams(8),
    ]
    out = sample(logits, params, [0, 4, 2])
    ref = torch.log_softmax(logits, dim=-1)
    assert abs(out[0].logprob - ref[0, out[0].token_id].item()) < 1e-6
    values, ids = torch.topk(ref[0], 5)
    assert [t for t, _ in out[0].top_logprobs] == ids.tolist()
    assert [v for _, v in out[0].top_logprobs] == sorted((v for _, v in out[0].top_logprobs), reverse=True)
    torch.testing.assert_close(torch.tensor([v for _, v in out[0].top_logprobs]), values)
    assert out[0].top_logprobs[0][0] == out[0].token_id  # greedy picks the best
    assert out[1].top_logprobs == () and abs(out[1].logprob - ref[1, out[1].token_id].item()) < 1e-6
    assert out[2].logprob is None
