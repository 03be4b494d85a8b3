"""Worker processes started on this machine by `potluck serve --local-workers N`.

Parts:
- `LocalWorkers`: starts N `python -m workers` processes pointed at the scheduler, shares
  this machine's cores and memory among them, and stops every one of them (terminate, then kill).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class LocalWorkers:
    scheduler_address: str
    count: int
    device: str = "cpu"
    threads_per_worker: int | None = None
    memory_bytes_per_worker: int | None = None
    extra_args: Sequence[str] = ()
    id_prefix: str = "local"
    profile_model_dir: str | None = None  # measure the device (and one layer of this model) at join
    profile_seconds: float = 1.0
    processes: list[subprocess.Popen] = field(default_factory=list)

    def start(self) -> None:
        # Co-located stages run one after another on a batch (no microbatches: see LayerPlan), so
        # each may use every core; idle OpenMP threads sleep instead of spinning.
        threads = self.threads_per_worker or (os.cpu_count() or 1)
        env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
        memory = self.memory_bytes_per_worker
        if memory is None and self.device == "cpu":
            import psutil

            memory = int(psutil.virtual_memory().available * 0.8) // max(1, self.count)
        for index in range(self.count):
            command = [
                sys.executable, "-m", "workers",
                "--scheduler", self.scheduler_address,
                "--device", self.device,
                "--threads", str(threads),
                "--worker-id", f"{self.id_prefix}-{index}",
                "--parent-pid", str(os.getpid()),
                *self.extra_args,
            ]  # fmt: skip
            if memory:
                command += ["--memory-bytes", str(memory)]
            if self.profile_model_dir:
                command += ["--profile", "--profile-model", self.profile_model_dir, "--profile-seconds", str(self.profile_seconds)]
            self.processes.append(subprocess.Popen(command, start_new_session=True, env=env))

    def stop(self, timeout_s: float = 5.0) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes.clear()

    def __enter__(self) -> LocalWorkers:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
