"""`potluck join` adds a worker to a running `potluck serve`; `potluck demo` serves its own checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.support.checkpoints import make_checkpoint
from tests.support.served import ServedModel, free_port

pytestmark = pytest.mark.slow

JOIN_TOKEN = "ptk-test-join-token-0123456789"


def test_potluck_join_adds_a_worker_that_gets_layers(tmp_path: Path) -> None:
    model_dir = make_checkpoint(tmp_path / "llama", "llama", num_hidden_layers=4)
    scheduler_port = free_port()
    with ServedModel(model_dir, 1, ["--scheduler-port", str(scheduler_port), "--no-profile", "--token", JOIN_TOKEN], log_path=tmp_path / "serve.log") as served:
        served.wait_ready(model_dir.name)
        before = httpx.post(f"{served.url}/v1/completions", json={"prompt": "The quick brown fox", "max_tokens": 8, "temperature": 0}, timeout=60).json()
        join = subprocess.Popen(
            [sys.executable, "-m", "api.cli", "--log-level", "info", "join", "--scheduler", f"127.0.0.1:{scheduler_port}", "--host", "127.0.0.1", "--worker-id", "joined", "--no-profile", "--token", JOIN_TOKEN],
            stdout=open(tmp_path / "join.log", "w"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while True:
                cluster = httpx.get(f"{served.url}/cluster", timeout=10).json()
                workers = {w["id"]: w for w in cluster["workers"]}
                if "joined" in workers and workers["joined"]["state"] == "ready" and all(w["state"] == "ready" for w in workers.values()):
                    break
                assert time.monotonic() < deadline, cluster
                time.sleep(0.2)
            assert workers["joined"]["loaded_layers"] is not None
            after = httpx.post(f"{served.url}/v1/completions", json={"prompt": "The quick brown fox", "max_tokens": 8, "temperature": 0}, timeout=60).json()
            assert after["choices"][0]["text"] == before["choices"][0]["text"]  # same answer over the new plan
        finally:
            join.send_signal(signal.SIGINT)
            try:
                join.wait(timeout=20)  # the worker exits within its 10 s stop grace (workers/worker.py)
            except subprocess.TimeoutExpired:
                join.kill()
                raise AssertionError("potluck join did not stop on Ctrl-C:\n" + (tmp_path / "join.log").read_text()[-3000:])


def test_potluck_demo_builds_a_checkpoint_and_serves_it(tmp_path: Path) -> None:
    port = free_port()
    command = [sys.executable, "-m", "api.cli", "demo", "--random-weights", "--dir", str(tmp_path / "demo"), "--port", str(port), "--no-profile"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 120
        assert process.stdout is not None
        while not any("curl" in line for line in lines):
            assert time.monotonic() < deadline and process.poll() is None, "".join(lines)
            lines.append(process.stdout.readline())
        output = "".join(lines)
        assert f"http://127.0.0.1:{port}/v1" in output
        assert (tmp_path / "demo" / "model.safetensors").exists()
        body = {"model": "demo", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 8}
        response = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] >= 1
        assert len(httpx.get(f"http://127.0.0.1:{port}/cluster", timeout=10).json()["workers"]) == 3
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)
    assert process.returncode is not None


def test_a_request_with_no_worker_gets_a_clear_503_at_once(tmp_path: Path) -> None:
    model_dir = make_checkpoint(tmp_path / "llama", "llama", num_hidden_layers=2)
    with ServedModel(model_dir, 0, log_path=tmp_path / "serve.log") as served:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{served.url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.2)
        started = time.monotonic()
        response = httpx.post(f"{served.url}/v1/completions", json={"prompt": "hello", "max_tokens": 4}, timeout=30)
        assert time.monotonic() - started < 5  # never a hang
        assert response.status_code == 503
        assert "no worker has joined yet" in response.json()["error"]["message"]
