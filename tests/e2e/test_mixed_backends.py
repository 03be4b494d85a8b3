"""`potluck serve --local-backends ...`: pipelines that mix torch and MLX stages answer like transformers.

Real processes throughout: `python -m api.cli serve` with one worker process per named backend,
HTTP requests, hidden states crossing between torch and MLX stages over ZeroMQ.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import httpx
import pytest

from tests.support.checkpoints import make_checkpoint
from tests.support.served import ServedModel
from tests.e2e.test_serve_matches_transformers import PROMPTS, complete, reference, stream_text, tokenize

pytest.importorskip("mlx.core")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mixed")
    return {
        "llama": make_checkpoint(root / "llama", "llama", num_hidden_layers=6),
        "qwen3": make_checkpoint(root / "qwen3", "qwen3", num_hidden_layers=4, head_dim=32),
    }


@cache
def _reference_tokens(model_dir: Path, prompt_ids: tuple[int, ...]) -> list[int]:
    return reference(model_dir, list(prompt_ids), max_new_tokens=12)[0]


def _workers(url: str) -> list[dict]:
    return sorted(httpx.get(f"{url}/cluster", timeout=30).json()["workers"], key=lambda w: w["id"])


@pytest.mark.parametrize(
    ("family", "backends"),
    # per family every hop kind and both ends on MLX: torch->mlx and mlx->torch (torch,mlx,torch),
    # mlx->mlx with MLX's embedding and LM head (mlx,mlx); MLX first then torch runs in the
    # eight-stream test below (mlx,torch,mlx), so "mlx,torch" asserted nothing new
    [
        ("llama", "torch,mlx,torch"),
        ("llama", "mlx,mlx"),
        ("qwen3", "torch,mlx,torch"),
        ("qwen3", "mlx,mlx"),
    ],
)
def test_mixed_pipeline_gives_transformers_greedy_tokens(
    checkpoints: dict[str, Path], family: str, backends: str, tmp_path: Path
) -> None:
    model_dir = checkpoints[family]
    names = backends.split(",")
    with ServedModel(model_dir, len(names), ["--local-backends", backends, "--no-profile"], tmp_path / "serve.log") as served:
        served.wait_ready(model_dir.name)
        workers = _workers(served.url)
        # the pipeline runs in worker-id order: stage i on backend names[i], each reporting it
        assert [w["backend"] for w in workers] == names
        assert [w["loaded_layers"][0] for w in workers] == sorted(w["loaded_layers"][0] for w in workers)
        for text in PROMPTS[:2]:
            prompt_ids = tokenize(served.url, model_dir.name, text)
            tokens = _reference_tokens(model_dir, tuple(prompt_ids))
            result = complete(served.url, model_dir.name, prompt_ids, max_tokens=12)
            detok = httpx.post(f"{served.url}/detokenize", json={"model": model_dir.name, "tokens": tokens}, timeout=30)
            assert result["usage"]["completion_tokens"] == len(tokens)
            assert result["choices"][0]["text"] == detok.json()["prompt"]
    assert not served.leftover, "a worker outlived potluck serve"


def test_eight_concurrent_streams_in_a_mixed_pipeline_equal_their_single_runs(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    model_dir = checkpoints["llama"]
    with ServedModel(model_dir, 3, ["--local-backends", "mlx,torch,mlx"], tmp_path / "serve.log") as served:
        served.wait_ready(model_dir.name)
        workers = _workers(served.url)
        assert [w["backend"] for w in workers] == ["mlx", "torch", "mlx"]
        assert workers[0]["profile"]["backend"] == "mlx"  # measured by MLX
        # the MLX workers profiled themselves through their backend: a layer timed, memory seen
        assert workers[0]["profile"]["name"].startswith("mlx ")
        assert workers[0]["profile"]["layer_timings"]["decode_step_s"]
        assert workers[0]["profile"]["memory_bytes"] > 0
        alone = [stream_text(served.url, model_dir.name, prompt, 16) for prompt in PROMPTS]
        with ThreadPoolExecutor(max_workers=8) as pool:
            together = list(pool.map(lambda prompt: stream_text(served.url, model_dir.name, prompt, 16), PROMPTS))
    assert together == alone
    assert all(finish in ("stop", "length") for _, finish in together)
    assert not served.leftover
