"""The scheduler's state as JSON, for `/cluster`, `/cluster/nodes/{id}`, `/cluster/requests`,
the dashboard and `potluck status`.

Parts:
- `worker_snapshot(worker)`: address, device, measured profile, layers, live load.
- `EngineView`: what the snapshots read of the engine (so this module never imports it).
- `cluster_snapshot(engine)`: model, plan (ranges, pipelines, predictions, bound, each usable
  pipeline's predicted seconds per token), every worker, the links the workers measured, the
  workers that failed to start and why.
- `requests_snapshot(states)`: requests in flight with their route and tokens so far.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sized
from typing import Any, Protocol

from scheduler.cluster import Cluster, WorkerState
from scheduler.link_table import LinkTable
from scheduler.load import load_snapshot
from scheduler.request_state import RequestState, WorkloadStats
from scheduler.routing import ring_token_time_s



class EngineView(Protocol):
    """What the snapshots read of the engine (scheduler/engine.py's `Engine` fits it)."""

    cluster: Cluster
    model_id: str
    max_model_len: int
    requests: Mapping[str, RequestState]
    admission: Sized
    workload: WorkloadStats
    link_table: LinkTable

    @property
    def config(self) -> Any: ...

    def workload_mix(self) -> tuple[float, float]: ...


def worker_state_name(worker: WorkerState) -> str:
    if worker.error:
        return "error"
    if worker.draining:
        return "draining"
    if worker.is_ready:
        return "ready"
    return "loading" if worker.assigned else "idle"


def worker_snapshot(worker: WorkerState) -> dict:
    heartbeat = worker.heartbeat
    return {
        "id": worker.worker_id,
        "address": worker.data_address,
        "device": worker.device,
        "backend": worker.backend,
        "pid": worker.pid,  # on its own machine
        "memory_bytes": worker.memory_bytes,
        "profile": worker.profile.to_json() if worker.profile is not None else {},
        "assigned_layers": list(worker.assigned) if worker.assigned else None,
        "loaded_layers": list(worker.loaded) if worker.loaded else None,
        "state": worker_state_name(worker),
        "error": worker.error,
        "weight_bytes": worker.weight_bytes,
        "kv_capacity_tokens": worker.kv_capacity_tokens,
        "kv_free_tokens": worker.kv_free_tokens,
        "in_flight_requests": worker.in_flight,
        "requests_routed": worker.requests_routed,
        "running_requests": heartbeat.running_requests if heartbeat else 0,
        "queued_items": heartbeat.queued_items if heartbeat else 0,
        "step_time_ewma_s": heartbeat.step_time_ewma_s if heartbeat else 0.0,
        "tokens_processed": heartbeat.tokens_processed if heartbeat else 0,
        "prefix_cache_queries_tokens": heartbeat.prefix_cache_queries_tokens if heartbeat else 0,
        "prefix_cache_hits_tokens": heartbeat.prefix_cache_hits_tokens if heartbeat else 0,
        "seconds_since_heartbeat": round(time.monotonic() - worker.last_seen_s, 3),
    }


def health_snapshot(engine: EngineView) -> dict:
    """`/health`: "ok" when every registered (and every expected local) worker serves on a usable
    route, else "degraded", with the count of serving workers."""
    serving = {worker_id for route in engine.cluster.usable_routes() for worker_id in route}
    expected = max(len(engine.cluster.workers), engine.config.local_workers, engine.config.min_workers)
    status = "ok" if serving and len(serving) >= expected else "degraded"
    return {"status": status, "serving_workers": len(serving), "registered_workers": len(engine.cluster.workers)}


def cluster_snapshot(engine: EngineView) -> dict:
    cluster = engine.cluster
    plan = cluster.plan
    model = engine.config.model
    mix_ratio, mix_kv_tokens = engine.workload_mix()
    routes = cluster.usable_routes()
    loads = load_snapshot(cluster, model, engine.link_table, measured_when_idle=True) if routes else None
    return {
        "model": {
            "id": engine.model_id,
            "type": model.model_type,
            "num_layers": model.num_layers,
            "dtype": model.dtype,
            "max_model_len": engine.max_model_len,
        },
        "epoch": cluster.epoch,
        "plan": None
        if plan is None
        else {
            "epoch": plan.epoch,
            "ranges": {wid: list(r) for wid, r in plan.ranges.items()},
            "pipelines": [list(route) for route in plan.pipelines],
            "usable_pipelines": [list(route) for route in routes],
            # one request alone on each usable pipeline: stages' steps + hops (scheduler/routing.py)
            "pipeline_token_latency_s": [ring_token_time_s(loads, route) for route in routes] if loads else [],
            "predicted_tokens_per_s": plan.predicted_tokens_per_s or None,  # None: not known
            "predicted_latency_s": plan.predicted_latency_s,
            "upper_bound_tokens_per_s": plan.upper_bound_tokens_per_s,
            "solve_time_s": plan.solve_time_s,
        },
        "workers": [worker_snapshot(cluster.workers[wid]) for wid in sorted(cluster.workers)],
        "links": engine.link_table.rows(),
        "failed_workers": [{"id": f.worker_id, "reason": f.reason, "at_unix_s": f.at_unix_s}
                           for f in sorted(cluster.failures.values(), key=lambda f: f.worker_id)],
        "running_requests": len({state.request.request_id for state in engine.requests.values()}),
        "waiting_requests": len(engine.admission),
        "tokens_generated": engine.workload.tokens_generated,
        # the workload mix the next plan is for (scheduler/planner.py)
        "prompt_tokens_per_output_token": mix_ratio,
        "kv_tokens_per_sequence": mix_kv_tokens,
    }


def requests_snapshot(states: Iterable[RequestState]) -> list[dict]:
    now = time.monotonic()
    return [
        {
            "id": state.request.request_id,
            "route": list(state.route),
            "prompt_tokens": len(state.request.prompt_token_ids),
            "generated_tokens": len(state.generated),
            "max_new_tokens": state.request.sampling.max_new_tokens,
            "restarts": state.attempt,
            "age_s": round(now - state.started_at_s, 3),
        }
        for state in states
    ]
