"""MLX stages through `potluck serve` and HTTP: GGUF files, and prompt logprobs (`echo`) on an MLX
last stage.

- F32 GGUF, torch -> mlx: greedy tokens and their logprobs, and echo's prompt logprobs, equal
  transformers' on the same weights (within 1e-4, as the torch pipelines are held to).
- Q8_0 GGUF, mlx -> mlx: the MLX stages compute in float32 on exactly the file's weights
  (workers/mlx_gguf.py), so greedy tokens and echo logprobs equal transformers loading the same
  GGUF (`gguf_file=`, dequantized to float32), within 1e-3.
"""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import pytest
import torch

from tests.e2e.test_serve_matches_transformers import complete
from tests.support.checkpoints import make_checkpoint
from tests.support.served import ServedModel

pytest.importorskip("mlx.core")
pytestmark = pytest.mark.slow
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gguf_checkpoints import write_gguf  # noqa: E402

PROMPT = [1, 40, 41, 42, 43, 44, 45, 46, 7, 300]


def _transformers(path: Path, prompt: list[int], new_tokens: int) -> tuple[list[int], list[float], list[float]]:
    """(greedy tokens, their logprobs, the prompt's logprobs) of transformers on a GGUF file."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False)
        logprobs = torch.log_softmax(model(out).logits[0].float(), -1)
    sequence = out[0].tolist()
    per_token = [logprobs[i - 1, sequence[i]].item() for i in range(1, len(sequence))]
    return sequence[len(prompt) :], per_token[len(prompt) - 1 :], per_token[: len(prompt) - 1]


def _check(url: str, model: str, path: Path, atol: float) -> None:
    tokens, token_logprobs, prompt_logprobs = _transformers(path, PROMPT, 8)
    result = complete(url, model, PROMPT, max_tokens=8)
    got = result["choices"][0]["logprobs"]["token_logprobs"]
    detok = httpx.post(f"{url}/detokenize", json={"model": model, "tokens": tokens}, timeout=30).json()["prompt"]
    assert result["choices"][0]["text"] == detok
    assert max(abs(a - b) for a, b in zip(got, token_logprobs)) < atol, (got, token_logprobs)
    body = {"model": model, "prompt": PROMPT, "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0}
    echoed = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"][0]["logprobs"]["token_logprobs"]
    assert echoed[0] is None and len(echoed) == len(PROMPT) + 1
    diff = max(abs(a - b) for a, b in zip(echoed[1 : len(PROMPT)], prompt_logprobs))
    assert diff < atol, f"echo logprobs off transformers' by {diff:.2e}"


def _backends(url: str) -> list[str]:
    workers = httpx.get(f"{url}/cluster", timeout=30).json()["workers"]
    return [w["backend"] for w in sorted(workers, key=lambda w: w["id"])]


@pytest.mark.parametrize(("quant", "backends", "atol"), [("F32", "torch,mlx", 1e-4), ("Q8_0", "mlx,mlx", 1e-3)])
def test_gguf_on_mlx_stages_through_serve(quant: str, backends: str, atol: float, tmp_path: Path) -> None:
    model_dir = make_checkpoint(tmp_path / "llama", "llama", num_hidden_layers=4)
    path = write_gguf(model_dir, tmp_path / f"tiny-{quant}.gguf", quant)
    with ServedModel(path, 2, ["--local-backends", backends, "--no-profile"], tmp_path / "serve.log") as served:
        served.wait_ready(path.stem)
        assert _backends(served.url) == backends.split(",")
        _check(served.url, path.stem, path, atol)
    assert not served.leftover
