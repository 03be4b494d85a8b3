"""The cluster as the scheduler sees it: registered workers, their layers, their live load.

Parts:
- `WorkerState`: one registered worker: address, memory, measured profile, assigned and loaded
  layer range, last heartbeat.
- `LayerPlan`: the ranges the planner chose and the pipelines (routes) they form.
- `Cluster`: the registry. Pure state, no sockets: the engine feeds it messages and asks it which
  routes are usable now.
- `WorkerFailure`: a worker that failed to start or to load its layers, and why (kept in
  `Cluster.failures` until a worker of that id registers again; `/cluster` and `potluck status`
  list them).

A route is usable while every worker on it is alive and has *loaded* the range the plan gave it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from workers import protocol as p


@dataclass
class WorkerState:
    worker_id: str
    data_address: str
    memory_bytes: int
    device: str
    profile: p.DeviceProfile | None  # measured at join (None: --no-profile); parsed once, by the codec
    pid: int
    registered_at_s: float
    last_seen_s: float
    assigned: tuple[int, int] | None = None  # range sent in the latest AssignLayers
    loaded: tuple[int, int] | None = None  # range the worker reported ready
    assigned_epoch: int = -1
    heartbeat: p.Heartbeat | None = None
    kv_capacity_tokens: int = 0
    weight_bytes: int = 0
    in_flight: int = 0  # requests the scheduler routed through this worker, not finished
    reserved_kv_tokens: int = 0  # prompt + max new tokens of those requests (never beyond capacity)
    queued_prefill_tokens: int = 0  # prompt tokens routed here whose first token has not come back
    requests_routed: int = 0  # since registration
    draining: bool = False
    error: str | None = None
    prefill_tokens_per_step: int = 0  # the worker's chunked-prefill budget (0: not reported)
    backend: str = "torch"  # what runs its layers (Register.backend); placement sees one more device
    echo_address: str = ""  # where peers measure their links to it (Register.echo_address)

    @property
    def is_ready(self) -> bool:
        return self.loaded is not None and self.loaded == self.assigned

    @property
    def kv_free_tokens(self) -> int:
        return self.heartbeat.kv_free_tokens if self.heartbeat else self.kv_capacity_tokens


@dataclass(frozen=True)
class WorkerFailure:
    worker_id: str
    reason: str  # one line
    at_unix_s: float


@dataclass(frozen=True)
class LayerPlan:
    epoch: int
    ranges: dict[str, tuple[int, int]]  # worker id -> [start_layer, end_layer)
    pipelines: tuple[tuple[str, ...], ...]  # worker ids in stage order, each covering [0, L)
    predicted_tokens_per_s: float = 0.0
    predicted_latency_s: float = 0.0
    upper_bound_tokens_per_s: float = 0.0
    solve_time_s: float = 0.0
    # Stages that share one machine share its memory bandwidth: splitting a batch into
    # microbatches would stream every stage's weights once per microbatch, so they do not.
    co_located: bool = False


@dataclass
class Cluster:
    num_layers: int
    workers: dict[str, WorkerState] = field(default_factory=dict)
    plan: LayerPlan | None = None
    epoch: int = 0
    failures: dict[str, WorkerFailure] = field(default_factory=dict)

    def record_failure(self, worker_id: str, reason: str) -> WorkerFailure:
        failure = WorkerFailure(worker_id, reason, time.time())
        self.failures[worker_id] = failure
        return failure

    def register(self, message: p.Register, now_s: float | None = None) -> WorkerState:
        now_s = time.monotonic() if now_s is None else now_s
        state = WorkerState(
            worker_id=message.worker_id,
            data_address=message.data_address,
            memory_bytes=message.memory_bytes,
            device=message.device,
            profile=message.profile,
            pid=message.pid,
            prefill_tokens_per_step=message.prefill_tokens_per_step,
            backend=message.backend,
            echo_address=message.echo_address,
            registered_at_s=now_s,
            last_seen_s=now_s,
        )
        self.workers[message.worker_id] = state
        self.failures.pop(message.worker_id, None)
        return state

    def remove(self, worker_id: str) -> WorkerState | None:
        return self.workers.pop(worker_id, None)

    def on_heartbeat(self, message: p.Heartbeat, now_s: float | None = None) -> None:
        state = self.workers.get(message.worker_id)
        if state is not None:
            state.heartbeat = message
            state.last_seen_s = time.monotonic() if now_s is None else now_s

    def on_layers_ready(self, message: p.LayersReady) -> WorkerState | None:
        state = self.workers.get(message.worker_id)
        if state is None or message.epoch != state.assigned_epoch:
            return None  # an answer to an assignment that was superseded
        state.last_seen_s = time.monotonic()
        if message.error:
            state.error = message.error
            state.loaded = None
            return state
        state.error = None
        state.loaded = (message.start_layer, message.end_layer)
        state.kv_capacity_tokens = message.kv_capacity_tokens
        state.weight_bytes = message.weight_bytes
        return state

    def stale_workers(self, timeout_s: float, now_s: float | None = None) -> list[str]:
        now_s = time.monotonic() if now_s is None else now_s
        return [wid for wid, state in self.workers.items() if now_s - state.last_seen_s > timeout_s]

    def usable_routes(self) -> list[tuple[str, ...]]:
        """Pipelines of the current plan whose workers are all alive, loaded and not draining."""
        if self.plan is None:
            return []
        routes = []
        for route in self.plan.pipelines:
            states = [self.workers.get(wid) for wid in route]
            if all(s is not None and s.is_ready and not s.draining for s in states):
                routes.append(route)
        return routes

    def is_loading(self) -> bool:
        """Whether some worker was given layers it has not reported ready yet."""
        return any(s.assigned is not None and not s.is_ready and s.error is None for s in self.workers.values())

    def assign(self, worker: WorkerState, layers: tuple[int, int] | None, epoch: int) -> bool:
        """Record that `worker` was given `layers` (None: none) in plan `epoch`; whether it held some."""
        held = worker.assigned is not None
        worker.assigned, worker.loaded, worker.assigned_epoch = layers, None, epoch
        return held

    def drained_workers(self) -> list[WorkerState]:
        """Draining workers with no request left that still hold layers (a re-plan unloads them)."""
        return [w for w in self.workers.values() if w.draining and w.in_flight == 0 and w.assigned is not None]

    def expecting_routes(self, local_workers: int) -> bool:
        """Whether a route may appear soon without anyone acting: layers loading, a drain under
        way, or fewer than `local_workers` (started with the scheduler) registered yet."""
        return (
            self.is_loading()
            or len(self.workers) < local_workers
            or any(w.draining and w.assigned is not None for w in self.workers.values())
        )
