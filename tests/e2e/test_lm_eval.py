"""lm-eval's `local-completions` runs a local JSON loglikelihood task against a real cluster; its
per-choice loglikelihoods equal transformers' on the same fp32 checkpoint within 1e-4."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.e2e.agents_cluster import served_agents

pytestmark = pytest.mark.slow

ROWS = [
    {"question": "The quick brown fox", "choices": [" jumps", " sleeps over", " runs"], "answer": 0},
    {"question": "Paris is the capital of", "choices": [" France", " the world"], "answer": 0},
    {"question": "Numbers too: 0 1 2", "choices": [" 3", " 4 5", " 42"], "answer": 0},
]
TASK = """task: potluck_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: ""
metric_list:
  - metric: acc
"""


def _transformers_loglikelihood(model, tok, context: str, continuation: str) -> float:
    ctx = tok.encode(context, add_special_tokens=False)
    cont = tok.encode(continuation, add_special_tokens=False)
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    return sum(logprobs[len(ctx) + i - 1, t].item() for i, t in enumerate(cont))


def test_lm_eval_local_completions_matches_transformers(tmp_path: Path) -> None:
    import lm_eval
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = tmp_path / "tiny.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "potluck_tiny_mc.yaml").write_text(TASK.format(data=data))
    with served_agents(tmp_path) as (served, model, path):
        results = lm_eval.simple_evaluate(
            model="local-completions",
            model_args={"model": model, "base_url": f"{served.url}/v1/completions", "tokenizer": str(path),
                        "tokenizer_backend": "huggingface", "num_concurrent": 1, "max_retries": 1, "batch_size": 2},
            tasks=["potluck_tiny_mc"], task_manager=TaskManager(include_path=str(tasks)), log_samples=True,
        )
    samples = results["samples"]["potluck_tiny_mc"]
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    assert len(samples) == len(ROWS)
    for sample in samples:
        row = sample["doc"]
        got = [resp[0][0] for resp in sample["resps"]]
        want = [_transformers_loglikelihood(reference, tok, row["question"], c) for c in row["choices"]]
        assert len(got) == len(want)
        assert max(abs(a - b) for a, b in zip(got, want)) < 1e-4, (got, want)
