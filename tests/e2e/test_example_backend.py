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
