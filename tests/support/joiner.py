"""`potluck join` as a real subprocess (`python -m api.cli join`), its output kept line by line.

Parts:
- `Joiner(scheduler, worker_id, token, extra_args)`: starts the process; `lines` fills from its
  stdout + stderr on a thread; `wait_for(text, timeout_s)` waits for a line holding `text`;
  `interrupt()` is Ctrl-C (SIGINT); `stop()` ends it (SIGINT, then kill) and is safe to repeat.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence


class Joiner:
    def __init__(self, scheduler: str, worker_id: str, token: str, extra_args: Sequence[str] = ()) -> None:
        command = [
            sys.executable, "-m", "api.cli", "--log-level", "info", "join", "--scheduler", scheduler.removeprefix("tcp://"),
            "--host", "127.0.0.1", "--worker-id", worker_id, "--no-profile", "--threads", "1", *extra_args,
        ]  # fmt: skip
        env = {**os.environ, "POTLUCK_TOKEN": token, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def matching(self, text: str) -> list[str]:
        return [line for line in list(self.lines) if text in line]

    def wait_for(self, text: str, timeout_s: float, count: int = 1) -> list[str]:
        deadline = time.monotonic() + timeout_s
        while len(found := self.matching(text)) < count:
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise AssertionError(f"no line with {text!r} (x{count}) in:\n" + "\n".join(self.lines))
            time.sleep(0.05)
        return found

    def interrupt(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)

    def stop(self, timeout_s: float = 20.0) -> int:
        self.interrupt()
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.reader.join(timeout=5)
        return self.process.returncode
