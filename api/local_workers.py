"""Worker processes started on this machine by `potluck serve --local-workers N`.

Parts:
- `LocalWorkers`: starts N `python -m workers` processes pointed at the scheduler (the cluster token
  in their environment, whatever their backend: `--local-backends torch,mlx,torch` gives each its
  own), shares this machine's cores and memory among them, starts again one that died
  (`restart_exited`), and stops every one of them (terminate, then kill).
  Their stderr passes through this process's; `exited()` lists those that ended, each with its
  exit status and last stderr line (a worker that fails says why in one line, workers/__main__.py).
- `worker_environment(base, token)`: their environment (a bounded OpenMP spin, `OMP_SPIN_COUNT`; the
  cluster token as `POTLUCK_TOKEN`, never on the command line).
- `worker_command(...)`: the `python -m workers` command line (also what api/ray_launcher.py runs);
  `cpu_memory_share_bytes(count)`: the memory each of `count` CPU workers on one machine gets;
  `stop_processes(...)`: terminate, then kill what is left.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO

from workers.curve import TOKEN_ENV, WORKER_KEY_ENV, KeyPair


# OpenMP threads that finish a parallel region spin this many rounds before they sleep. Within a
# step that covers the gaps between GEMMs (a decode layer's small ops, the sampling between two
# steps); after a step it keeps the core awake through the hop to the next co-located stage, whose
# OpenMP thread then wakes on a running core instead of a halted virtual CPU, and it ends before
# that stage's layers need the core. Sleeping at once (OMP_WAIT_POLICY=PASSIVE) costs a wake-up per
# GEMM; libgomp's default spins far longer. Measurements: docs/performance-notes.md.
OMP_SPIN_COUNT = 20000


def worker_environment(base: Mapping[str, str], token: str = "") -> dict[str, str]:
    """The environment local workers run with: `base` plus a bounded OpenMP spin, unless `base`
    already sets a wait policy or spin count, and the cluster token (workers/curve.py)."""
    env = dict(base)
    if token:
        env[TOKEN_ENV] = token
    if "OMP_WAIT_POLICY" not in env:
        env.setdefault("GOMP_SPINCOUNT", str(OMP_SPIN_COUNT))
    return env


def worker_command(
    scheduler_address: str,
    worker_id: str,
    *,
    parent_pid: int | None,
    device: str | None = None,
    backend: str | None = None,
    threads: int | None = None,
    memory_bytes: int | None = None,
    host: str | None = None,
    profile_model_dir: str | None = None,
    profile_seconds: float = 1.0,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """`python -m workers ...`; an option left None is the worker's own default (from its machine)."""
    command = [sys.executable, "-m", "workers", "--scheduler", scheduler_address, "--worker-id", worker_id]
    if parent_pid:  # the worker stops when this process is gone
        command += ["--parent-pid", str(parent_pid)]
    if backend:
        command += ["--backend", backend]
    if device:
        command += ["--device", device]
    if threads:
        command += ["--threads", str(threads)]
    if memory_bytes:
        command += ["--memory-bytes", str(memory_bytes)]
    if host:
        command += ["--host", host, "--advertise-host", host]
    if profile_model_dir:
        command += ["--profile", "--profile-model", profile_model_dir, "--profile-seconds", str(profile_seconds)]
    return [*command, *extra_args]


def stop_processes(processes: Sequence[subprocess.Popen], timeout_s: float) -> None:
    """SIGTERM to every running one, then wait for each; one still running after `timeout_s` is killed."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def cpu_memory_share_bytes(count: int) -> int:
    """What one of `count` CPU workers on this machine may use: 80% of the available memory, split."""
    import psutil

    return int(psutil.virtual_memory().available * 0.8) // max(1, count)


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
    token: str = field(default="", repr=False)  # the cluster token, given in the environment (not argv)
    backends: Sequence[str] = ()  # one backend name per worker (empty: the worker's default); sets count
    processes: list[subprocess.Popen] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    last_lines: dict[str, str] = field(default_factory=dict)  # worker id -> its last stderr line
    readers: dict[str, threading.Thread] = field(default_factory=dict)
    commands: list[tuple[list[str], dict[str, str]]] = field(default_factory=list, repr=False)
    keys: list[KeyPair] = field(default_factory=list, repr=False)  # each worker's CURVE key pair

    def start(self) -> None:
        # Co-located stages run one after another on a batch (no microbatches: see LayerPlan), so
        # each may use every core; idle OpenMP threads sleep after a bounded spin (OMP_SPIN_COUNT).
        threads = self.threads_per_worker or (os.cpu_count() or 1)
        env = worker_environment(os.environ, self.token)
        memory = self.memory_bytes_per_worker
        if memory is None and self.device == "cpu":
            memory = cpu_memory_share_bytes(self.count)
        if self.backends:
            self.count = len(self.backends)
        for index in range(self.count):
            keys = KeyPair.generate()  # kept across restarts: a restarted worker is the same member
            self.keys.append(keys)
            backend = self.backends[index] if self.backends else None
            command = worker_command(
                self.scheduler_address,
                f"{self.id_prefix}-{index}",
                parent_pid=os.getpid(),
                # another backend picks its own device (mlx: gpu on a Mac); --device is torch's
                device=self.device if backend in (None, "torch") else None,
                backend=backend,
                threads=threads,
                memory_bytes=memory,
                profile_model_dir=self.profile_model_dir,
                profile_seconds=self.profile_seconds,
                extra_args=self.extra_args,
            )
            worker_id = f"{self.id_prefix}-{index}"
            worker_env = {**env, WORKER_KEY_ENV: keys.secret_key}
            self.commands.append((command, worker_env))
            self.ids.append(worker_id)
            self.processes.append(self._spawn(worker_id, command, worker_env))

    def _spawn(self, worker_id: str, command: list[str], env: dict[str, str]) -> subprocess.Popen:
        process = subprocess.Popen(command, start_new_session=True, env=env, stderr=subprocess.PIPE)
        assert process.stderr is not None
        reader = threading.Thread(target=self._pass_stderr, args=(worker_id, process.stderr), daemon=True)
        reader.start()
        self.readers[worker_id] = reader
        return process

    def restart_exited(self) -> list[int]:
        """Start again every worker whose process ended (crashed, killed): it registers again under
        its id with its key. Returns their indices."""
        restarted = []
        for index, process in enumerate(self.processes):
            if process.poll() is not None:
                command, env = self.commands[index]
                self.readers[self.ids[index]].join(timeout=1.0)  # its last words first
                self.processes[index] = self._spawn(self.ids[index], command, env)
                restarted.append(index)
        return restarted

    def _pass_stderr(self, worker_id: str, stream: IO[bytes]) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode(errors="replace").rstrip()
            if line.strip():
                self.last_lines[worker_id] = line.strip()
            try:
                sys.stderr.write(line + "\n")
                sys.stderr.flush()
            except (OSError, ValueError):  # our stderr is gone: keep draining the pipe
                pass
        stream.close()

    def exited(self) -> dict[str, tuple[int, str]]:
        """Worker id -> (exit status, its last stderr line or "") of each process that ended."""
        ended = {wid: code for wid, process in zip(self.ids, self.processes) if (code := process.poll()) is not None}
        for wid in ended:  # its last words may still be in the pipe
            self.readers[wid].join(timeout=1.0)
        return {wid: (code, self.last_lines.get(wid, "")) for wid, code in ended.items()}

    def stop(self, timeout_s: float = 5.0) -> None:
        stop_processes(self.processes, timeout_s)
        self.processes.clear()
        self.commands.clear()
        self.keys.clear()
        self.ids.clear()

    def __enter__(self) -> LocalWorkers:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
