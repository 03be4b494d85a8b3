"""The example out-of-tree backend (examples/numpy_backend) installs with pip, registers through the
`potluck.backends` entry point, passes the conformance suite and serves a stage of a pipeline.

CI installs the package (.ci/run); elsewhere it is installed into a temporary virtual environment
that sees this machine's packages, so nothing outside the test changes.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.support.checkpoints import make_checkpoint
from tests.support.served import ServedModel
from tests.e2e.test_serve_matches_transformers import complete, reference, tokenize
from workers.backend_plugins import discover
from workers.conformance_checks import CHECKS

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def python(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An interpreter that has the example package installed."""
    if "numpy" in discover():
        return sys.executable
    venv = tmp_path_factory.mktemp("numpy-backend") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    interpreter = str(venv / "bin" / "python")
    subprocess.run([interpreter, "-m", "pip", "install", "-q", "--no-deps", str(REPO / "examples" / "numpy_backend")], check=True)
    return interpreter


def test_the_example_backend_is_listed_and_passes_the_conformance_suite(python: str, tmp_path: Path) -> None:
    listed = subprocess.run([python, "-m", "api.cli", "backends"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0 and any(line.startswith("numpy ") for line in listed.stdout.splitlines()), listed.stdout
    suite = subprocess.run([python, "-m", "workers.conformance", "numpy", "--dir", str(tmp_path)], cwd=REPO,
                           capture_output=True, text=True, timeout=600)  # fmt: skip
    assert suite.returncode == 0, suite.stdout + suite.stderr
    assert f"numpy: {len(CHECKS)}/{len(CHECKS)} checks passed" in suite.stdout


def test_the_example_backend_serves_a_stage(python: str, tmp_path: Path) -> None:
    model_dir = make_checkpoint(tmp_path / "llama", "llama", num_hidden_layers=4)
    with ServedModel(model_dir, 2, ["--local-backends", "torch,numpy", "--no-profile"], tmp_path / "serve.log", python=python) as served:
        served.wait_ready(model_dir.name)
        workers = sorted(httpx.get(f"{served.url}/cluster", timeout=30).json()["workers"], key=lambda w: w["id"])
        assert [w["backend"] for w in workers] == ["torch", "numpy"]
        prompt_ids = tokenize(served.url, model_dir.name, "Pack my box")
        tokens, _ = reference(model_dir, prompt_ids, max_new_tokens=10)
        result = complete(served.url, model_dir.name, prompt_ids, max_tokens=10)
        detok = httpx.post(f"{served.url}/detokenize", json={"model": model_dir.name, "tokens": tokens}, timeout=30)
        assert result["choices"][0]["text"] == detok.json()["prompt"]
    assert not served.leftover


def test_a_backend_that_refuses_gguf_is_left_out_of_the_plan(python: str, tmp_path: Path) -> None:
    """The numpy backend claims safetensors only: serving a GGUF, its worker registers, is reported
    refused with a one-line reason, and the torch worker alone serves (no load is tried there)."""
    sys.path.insert(0, str(REPO / "tests"))
    from gguf_checkpoints import write_gguf

    model_dir = make_checkpoint(tmp_path / "llama", "llama", num_hidden_layers=4)
    path = write_gguf(model_dir, tmp_path / "tiny.gguf", "F32")
    with ServedModel(path, 2, ["--local-backends", "torch,numpy", "--no-profile"], tmp_path / "serve.log", python=python) as served:
        served.wait_ready(path.stem)
        cluster = httpx.get(f"{served.url}/cluster", timeout=30).json()
        workers = sorted(cluster["workers"], key=lambda w: w["id"])
        assert [(w["backend"], w["state"]) for w in workers] == [("torch", "ready"), ("numpy", "refused")]
        assert workers[1]["refused"] == "backend numpy does not read gguf weights (it reads safetensors)"
        assert workers[1]["assigned_layers"] is None and workers[1]["error"] is None
        assert list(cluster["plan"]["ranges"]) == [workers[0]["id"]]
        assert httpx.get(f"{served.url}/health", timeout=30).json()["status"] == "ok"
        tokens, _ = reference(model_dir, [5, 17, 42, 9], max_new_tokens=8)
        result = complete(served.url, path.stem, [5, 17, 42, 9], max_tokens=8)
        detok = httpx.post(f"{served.url}/detokenize", json={"model": path.stem, "tokens": tokens}, timeout=30)
        assert result["choices"][0]["text"] == detok.json()["prompt"]
    assert not served.leftover
    assert "left out of the plan: backend numpy does not read gguf weights" in (tmp_path / "serve.log").read_text()
