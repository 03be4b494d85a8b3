"""`potluck serve` on an MoE checkpoint answers exactly like transformers.

Qwen3-MoE over 3 worker processes: the first stage holds the dense layer 0 and MoE layer 1, the
others MoE layers. (Mixtral and Qwen2-MoE are checked at 1-3 stages in tests/workers/test_moe.py;
one served family keeps this slow test to ~1.5 minutes.)"""

from __future__ import annotations

import math
from pathlib import Path

import httpx
import pytest

from tests.support.checkpoints import make_checkpoint
from tests.support.served import ServedModel
from tests.e2e.test_serve_matches_transformers import PROMPTS, complete, reference, tokenize

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(("family", "num_workers"), [("qwen3_moe", 3)])
def test_moe_greedy_tokens_and_logprobs_match_transformers(family: str, num_workers: int, tmp_path: Path) -> None:
    model_dir = make_checkpoint(tmp_path / family, family, num_hidden_layers=4, seed=11)
    with ServedModel(model_dir, num_workers, log_path=tmp_path / "serve.log") as served:
        served.wait_ready(model_dir.name)
        assert len(served.worker_pids()) == num_workers
        for text in PROMPTS[:2]:
            prompt_ids = tokenize(served.url, model_dir.name, text)
            tokens, logprobs = reference(model_dir, prompt_ids, max_new_tokens=12)
            result = complete(served.url, model_dir.name, prompt_ids, max_tokens=12)
            ours = result["choices"][0]["logprobs"]["token_logprobs"]
            assert result["usage"]["completion_tokens"] == len(tokens)
            detok = httpx.post(f"{served.url}/detokenize", json={"model": model_dir.name, "tokens": tokens}, timeout=30).json()
            assert result["choices"][0]["text"] == detok["prompt"]
            assert len(ours) == len(logprobs)
            for a, b in zip(ours, logprobs):
                assert math.isclose(a, b, abs_tol=1e-4), (ours, logprobs)
    assert not served.leftover, "a worker outlived potluck serve"
