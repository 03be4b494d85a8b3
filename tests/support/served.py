"""`potluck serve` as a real subprocess on a free loopback port, stopped (with its workers) after use."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx
import psutil


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServedModel:
    """Runs `python -m api.cli serve --model DIR --local-workers N` until `stop()`."""

    def __init__(
        self, model_dir: Path, num_workers: int, extra_args: Sequence[str] = (), log_path: Path | None = None,
        python: str = sys.executable,  # another environment's interpreter (one with a backend package installed)
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [
            python, "-m", "api.cli", "--log-level", "WARNING", "serve",
            "--model", str(model_dir), "--local-workers", str(num_workers),
            "--host", "127.0.0.1", "--port", str(self.port), "--worker-threads", "1", *extra_args,
        ]  # fmt: skip
        self.log = open(log_path, "w") if log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)
        self.children: list[psutil.Process] = []

    def wait_ready(self, model: str, timeout_s: float = 90.0, headers: dict | None = None) -> None:
        deadline = time.monotonic() + timeout_s
        body = {"model": model, "prompt": [5, 6, 7], "max_tokens": 1}
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"potluck serve exited with {self.process.returncode}")
            try:
                response = httpx.post(f"{self.url}/v1/completions", json=body, timeout=30, headers=headers)
                if response.status_code == 200:
                    self.children = psutil.Process(self.process.pid).children(recursive=True)
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError("potluck serve did not become ready")

    def worker_pids(self) -> list[int]:
        return [child.pid for child in psutil.Process(self.process.pid).children(recursive=True) if child.is_running()]

    def stop(self) -> None:
        """Ctrl-C, as a user would; then make sure every process it started is gone."""
        children = self.children or psutil.Process(self.process.pid).children(recursive=True)
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        _, alive = psutil.wait_procs(children, timeout=10)
        for child in alive:
            child.kill()
        if self.log is not subprocess.DEVNULL:
            self.log.close()
        self.leftover = alive

    def __enter__(self) -> ServedModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
