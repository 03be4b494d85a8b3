"""Workers on the nodes of a Ray cluster: `potluck serve --model DIR --ray ADDRESS`.

Ray (an existing engine) does what it is good at here: it knows the machines of the cluster and
their GPUs, and it starts and stops processes on them. potluck's own scheduler does the rest
(profiles, placement, routing, recovery), exactly as for `potluck join`.

Parts:
- `RayWorkers`: connects to a Ray cluster (`auto`: the one this machine joined with `ray start`;
  `ray://HOST:PORT` or `HOST:PORT`; `local`: a one-machine Ray started here, its workers on
  127.0.0.1, for trying it out), and on every alive node starts worker actors: one per GPU (the
  actor holds it, so Ray sets `CUDA_VISIBLE_DEVICES`; `workers_per_node` share the node's GPUs),
  or `workers_per_node` (default one) on a node without GPUs. `sync()` starts workers on nodes
  that joined since (the scheduler re-plans when they register) and `revive()` restarts worker
  processes that ended while their node lives (they register again under their id); a watcher
  thread calls both every `poll_s`. `stop()` stops every worker and the Ray instance it started,
  never a cluster it only connected to.
- `WorkerActor`: a Ray actor that owns one `python -m workers` process on its node, listening on
  the node's address; the process exits when the actor is gone (`--parent-pid`), and the actor
  starts it again when it ends on its own (`restart_if_exited`).
- `scheduler_host(mode)`: the address workers on other nodes reach this scheduler at.
- `check_reachable(address)`: a clear error at once for a Ray address nobody answers at
  (`ray.init` would retry it forever).

Every node must hold the model directory at the same path and have potluck installed (as vLLM
on Ray asks too). Ray is an optional dependency: `pip install 'potluck[ray]'`.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from api.local_workers import cpu_memory_share_bytes, stop_processes, worker_command, worker_environment

log = logging.getLogger("potluck.ray")

LOCAL = "local"
CONNECT_TIMEOUT_S = 5.0  # ray.init retries an address that does not answer forever: check it first
RAY_ADDRESS_FILE = "/tmp/ray/ray_current_cluster"  # where `ray start` leaves the address (ray.init docs)
ACTOR_STOP_TIMEOUT_S = 10.0
LOCAL_OBJECT_STORE_BYTES = 100 * 2**20  # potluck passes nothing through Ray's object store


def _ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise ValueError("--ray needs Ray on every node: pip install 'potluck[ray]'") from exc
    return ray


class WorkerActor:
    """One worker process on the actor's node (decorated with `ray.remote` when started)."""

    def __init__(self, command: Sequence[str], cpu_workers_on_node: int, device: str | None, token: str = "") -> None:
        self.token = token  # the cluster token, in the worker's environment (not its argv)
        command = [*command, "--parent-pid", str(os.getpid())]
        if "--memory-bytes" not in command and _runs_on_cpu(device):  # CPU workers on a node share its memory
            command += ["--memory-bytes", str(cpu_memory_share_bytes(cpu_workers_on_node))]
        self.command = command
        self.process = self._spawn()

    def _spawn(self) -> subprocess.Popen:
        # Ray sets CUDA_VISIBLE_DEVICES for an actor holding a GPU: the worker inherits it
        return subprocess.Popen(self.command, env=worker_environment(os.environ, self.token), start_new_session=True)

    def restart_if_exited(self) -> int | None:
        """Start the worker again if its process ended (crashed, killed); returns its exit code."""
        code = self.process.poll()
        if code is not None:
            self.process = self._spawn()
        return code

    def pid(self) -> int:
        return self.process.pid

    def stop(self, timeout_s: float = 5.0) -> int | None:
        stop_processes([self.process], timeout_s)
        return self.process.returncode


def _runs_on_cpu(device: str | None) -> bool:
    """Whether the worker will run on the CPU (its default device is cuda, then mps, then cpu)."""
    if device is not None:
        return device == "cpu"
    return not os.environ.get("CUDA_VISIBLE_DEVICES") and sys.platform != "darwin"


def check_reachable(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Raise ValueError unless the Ray cluster at `address` (HOST:PORT, ray://HOST:PORT, or auto:
    $RAY_ADDRESS or the cluster `ray start` joined this machine to) accepts a TCP connection."""
    target = address
    if address == "auto":
        target = os.environ.get("RAY_ADDRESS", "")
        if not target and os.path.exists(RAY_ADDRESS_FILE):
            with open(RAY_ADDRESS_FILE) as file:
                target = file.read().strip()
        if not target:
            return  # Ray looks for a running cluster itself, and says so at once if there is none
    host, sep, port = target.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--ray takes local, auto, HOST:PORT or ray://HOST:PORT, got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ValueError(f"no Ray cluster answers at {target} ({exc}); start one with `ray start --head`, "
                         "or use --ray local") from exc


def scheduler_host(mode: str) -> str:
    """127.0.0.1 for a local Ray; otherwise this machine's address as Ray knows it."""
    if mode == LOCAL:
        return "127.0.0.1"
    return _ray().util.get_node_ip_address()


@dataclass
class RayWorkers:
    address: str  # "local", "auto", "ray://HOST:PORT" or "HOST:PORT"
    scheduler_address: str = ""  # set before start()
    workers_per_node: int | None = None  # default: one per GPU, else one
    device: str | None = None  # default: the node's best device
    threads_per_worker: int | None = None
    profile_model_dir: str | None = None
    profile_seconds: float = 1.0
    extra_args: Sequence[str] = ()
    poll_s: float = 5.0
    token: str = field(default="", repr=False)  # the cluster token (set before start())
    actors: dict[str, Any] = field(default_factory=dict)  # worker id -> actor handle
    started_nodes: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        if self.workers_per_node is not None and self.workers_per_node < 1:
            raise ValueError(f"--ray-workers-per-node must be >= 1, got {self.workers_per_node}")
        self._started_ray = False
        self.gcs_address = ""  # HOST:PORT of the Ray cluster, once connected
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._watcher: threading.Thread | None = None

    # ------------------------------------------------------------------------- connect
    def connect(self) -> None:
        ray = _ray()
        if ray.is_initialized():
            return
        if self.address == LOCAL:
            ray.init(include_dashboard=False, object_store_memory=LOCAL_OBJECT_STORE_BYTES, log_to_driver=True)
            self._started_ray = True
        else:
            check_reachable(self.address)
            try:
                ray.init(address=self.address, log_to_driver=True)
            except ConnectionError as exc:
                raise ValueError(f"could not connect to Ray ({self.address}): {exc}") from exc
        self.gcs_address = ray.get_runtime_context().gcs_address
        log.info("connected to Ray (%s): %d alive node(s)", self.address, len(self.alive_nodes()))

    def alive_nodes(self) -> list[dict]:
        return [node for node in _ray().nodes() if node.get("Alive")]

    def planned_workers(self, nodes: Sequence[dict] | None = None) -> int:
        """How many workers `sync()` would start on `nodes` (default: every alive node)."""
        return sum(len(self._slots(node)) for node in (self.alive_nodes() if nodes is None else nodes))

    def _slots(self, node: dict) -> list[float]:
        """GPUs each worker on `node` holds: one per GPU (or the GPUs shared by `workers_per_node`),
        or none on a node without GPUs (or when the workers are told to use another device)."""
        gpus = int(node.get("Resources", {}).get("GPU", 0))
        if gpus and (self.device is None or self.device.startswith("cuda")):
            count = self.workers_per_node or gpus
            return [min(1.0, gpus / count)] * count
        return [0.0] * (self.workers_per_node or 1)

    # ------------------------------------------------------------------------- start / watch
    def start(self) -> None:
        if not self.scheduler_address:
            raise ValueError("RayWorkers needs the scheduler's address before start()")
        self.connect()
        self.sync()
        self._watcher = threading.Thread(target=self._watch, name="ray-nodes", daemon=True)
        self._watcher.start()

    def sync(self) -> list[str]:
        """Start workers on alive nodes that have none yet; returns the new worker ids."""
        ray = _ray()
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        remote_actor = ray.remote(WorkerActor)
        new: list[str] = []
        with self._lock:
            for node in self.alive_nodes():
                node_id = node["NodeID"]
                if node_id in self.started_nodes or self._stop.is_set():
                    continue
                slots = self._slots(node)
                host = "127.0.0.1" if self.address == LOCAL else node.get("NodeManagerAddress") or None
                for index, gpus in enumerate(slots):
                    worker_id = f"ray-{node_id[:8]}-{index}"
                    command = worker_command(
                        self.scheduler_address,
                        worker_id,
                        parent_pid=None,  # the actor adds its own pid
                        device=self.device or ("cuda" if gpus else None),
                        threads=self.threads_per_worker,
                        host=host,
                        profile_model_dir=self.profile_model_dir,
                        profile_seconds=self.profile_seconds,
                        extra_args=self.extra_args,
                    )
                    strategy = NodeAffinitySchedulingStrategy(node_id, soft=False)
                    self.actors[worker_id] = remote_actor.options(
                        num_cpus=0, num_gpus=gpus, scheduling_strategy=strategy
                    ).remote(command, len(slots), self.device, self.token)
                    new.append(worker_id)
                self.started_nodes.add(node_id)
                log.info("started %d worker(s) on Ray node %s (%s)", len(slots), node_id[:8], host)
        return new

    def revive(self, timeout_s: float = ACTOR_STOP_TIMEOUT_S) -> list[str]:
        """Restart worker processes that ended while their actor lives (the worker registers again
        under its id and is taken back in); forget actors that are gone with their node. Returns
        the restarted worker ids."""
        ray = _ray()
        with self._lock:
            actors = dict(self.actors)
        restarted = []
        for worker_id, actor in actors.items():
            if self._stop.is_set():
                break
            try:
                code = ray.get(actor.restart_if_exited.remote(), timeout=timeout_s)
            except ray.exceptions.RayActorError:  # its node is gone; a node that returns is a new one
                with self._lock:
                    self.actors.pop(worker_id, None)
                log.warning("Ray worker %s is gone with its node", worker_id)
                continue
            except ray.exceptions.GetTimeoutError:
                continue
            if code is not None:
                restarted.append(worker_id)
                log.warning("worker %s exited with %s; started it again", worker_id, code)
        return restarted

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.sync()
                self.revive()
            except Exception:  # Ray unreachable for a moment: try again next round
                log.exception("could not watch the Ray cluster")

    # ------------------------------------------------------------------------- stop
    def stop(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=self.poll_s + ACTOR_STOP_TIMEOUT_S)
        ray = _ray()
        if not ray.is_initialized():
            return
        with self._lock:
            actors = list(self.actors.values())
            self.actors.clear()
        try:
            ray.get([a.stop.remote() for a in actors], timeout=ACTOR_STOP_TIMEOUT_S)
        except Exception:  # an actor (or its node) is gone already: its worker exits with it
            log.warning("some Ray workers did not answer the stop; killing their actors")
        for actor in actors:
            ray.kill(actor)
        if self._started_ray:
            ray.shutdown()
