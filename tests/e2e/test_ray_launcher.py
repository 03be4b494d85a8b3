"""`potluck serve --ray local`: workers started as Ray actors answer exactly like transformers; a
Ray node that joins later gets workers, which the scheduler takes into a new plan; a worker killed
with SIGKILL is started again by its actor and taken back; Ctrl-C leaves no process behind (Ray's
included).

Ray binds every network interface it finds, so the session runs in a network namespace of its own
that has only a loopback interface (`unshare --map-root-user --net`: needs no root where user
namespaces are allowed)."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.checkpoints import make_checkpoint
from tests.e2e.test_serve_matches_transformers import reference

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_ray_actors_serve_the_model_like_transformers_and_stop_with_serve(tmp_path: Path) -> None:
    assert shutil.which("unshare"), "the Ray test needs util-linux's unshare (a loopback-only network namespace)"
    model_dir = make_checkpoint(tmp_path / "llama", "llama", num_hidden_layers=4)
    prompt_ids = [5, 17, 42, 8, 99, 23]
    tokens, logprobs = reference(model_dir, prompt_ids, max_new_tokens=10)
    script = (
        "ip link set lo up && exec " + " ".join([sys.executable, "-m", "tests.e2e.ray_session", str(model_dir),
                                                 f"'{json.dumps(prompt_ids)}'", f"'{json.dumps(tokens)}'"])
    )  # fmt: skip
    done = subprocess.run(["unshare", "--map-root-user", "--net", "sh", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=280)
    log = (tmp_path / "ray-serve.log").read_text() if (tmp_path / "ray-serve.log").exists() else ""
    assert done.returncode == 0, done.stderr[-3000:] + log[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    before, after = result["workers_before"], result["workers_after"]
    assert sorted(w["id"].rsplit("-", 1)[1] for w in before) == ["0", "1"]
    assert all(w["id"].startswith("ray-") and w["state"] == "ready" for w in before + after), after
    assert all(w["address"].startswith("tcp://127.0.0.1:") for w in before + after), after
    assert sorted(tuple(w["layers"]) for w in before) == [(0, 2), (2, 4)]  # the model split over both actors
    new_node = {w["id"].rsplit("-", 1)[0] for w in after} - {w["id"].rsplit("-", 1)[0] for w in before}
    assert len(new_node) == 1 and len(after) == 4, after  # two workers on the node that joined
    assert result["epoch_after"] > result["epoch_before"]  # re-planned with them
    assert result["revived"]["new_pid"] != result["revived"]["old_pid"]  # killed, started again, taken back
    for answer in (result["before"], result["after"], result["after_revival"]):
        assert answer["text"] == result["reference_text"]
        assert len(answer["token_logprobs"]) == len(logprobs)
        assert all(math.isclose(a, b, abs_tol=1e-4) for a, b in zip(answer["token_logprobs"], logprobs))
    assert any(name in ("raylet", "gcs_server") for name in result["descendants"]), result["descendants"]
    assert not result["leftover"] and not result["alive_after_stop"], result


@pytest.mark.slow  # a `potluck serve` subprocess importing Ray
def test_an_unreachable_ray_cluster_fails_at_once_with_a_clear_error(tmp_path: Path) -> None:
    model_dir = make_checkpoint(tmp_path / "llama", "llama", num_hidden_layers=2)
    command = [sys.executable, "-m", "api.cli", "serve", "--model", str(model_dir), "--port", "1", "--ray", "127.0.0.1:1"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)  # ray.init alone would retry forever
    assert done.returncode == 2, done.stderr[-2000:]
    assert "no Ray cluster answers at 127.0.0.1:1" in done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ray", "nonsense"], "--ray takes local, auto, HOST:PORT or ray://HOST:PORT"),
        (["--local-workers", "-1"], "--local-workers must be >= 0, got -1"),
        (["--late-binding-s", "-1"], "--late-binding-s must be >= 0 (inf: off), got -1.0"),
        (["--max-queue-wait-s", "0"], "--max-queue-wait-s must be > 0 (seconds a request may wait for room), got 0.0"),
        (["--max-waiting-requests", "-1"], "--max-waiting-requests must be >= 0, got -1"),
    ],
)
def test_bad_serve_arguments_fail_at_once_with_a_clear_error(tmp_path: Path, args: list[str], message: str,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """`api.cli.main` in this process (a subprocess per case spent its time importing torch): the
    same exit code and one line on stderr, before any worker or server starts."""
    from api.cli import main

    model_dir = make_checkpoint(tmp_path / "llama", "llama", num_hidden_layers=2)
    sigterm, level = signal.getsignal(signal.SIGTERM), os.environ.get("POTLUCK_LOG_LEVEL")
    try:
        code = main(["serve", "--model", str(model_dir), "--port", "1", *args])
    finally:  # main() sets both for a process of its own
        signal.signal(signal.SIGTERM, sigterm)
        if level is None:
            os.environ.pop("POTLUCK_LOG_LEVEL", None)
        else:
            os.environ["POTLUCK_LOG_LEVEL"] = level
    assert code == 2, capsys.readouterr().err[-2000:]
    assert message in capsys.readouterr().err
