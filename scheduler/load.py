"""The live load of the cluster as the router sees it.

Parts:
- `layer_costs_s(profile)`: per-layer decode step time, its growth per extra sequence, and prefill
  time per token, from a worker's measured profile (workers/profiler.py's JSON).
- `load_snapshot(cluster, activation_bytes_per_token)`: a `routing.LoadSnapshot` of the usable
  stages: the scheduler's own KV reservations and queued prompt tokens (exact, updated per
  request) plus the step time the worker reports in its heartbeats (EWMA, measured), and the
  chunked-prefill budget it reported at registration.
"""

from __future__ import annotations

from scheduler.cluster import Cluster, WorkerState
from scheduler.routing import LoadSnapshot, StageLoad

FALLBACK_LAYER_STEP_S = 1e-3  # a worker that registered without a profile and has not run yet
DEFAULT_PREFILL_TOKENS_PER_STEP = StageLoad.prefill_tokens_per_step  # a worker that did not report its budget


def layer_costs_s(profile: dict) -> tuple[float, float, float]:
    """(decode step s per layer at batch 1, extra s per layer per added sequence, prefill s per token per layer)."""
    timings = (profile or {}).get("layer_timings") or {}
    decode = timings.get("decode_step_s") or []
    prefill = timings.get("prefill_s_per_token") or []
    if not decode:
        return FALLBACK_LAYER_STEP_S, FALLBACK_LAYER_STEP_S / 16, FALLBACK_LAYER_STEP_S / 16
    shortest = min(ctx for _, ctx, _ in decode)
    by_batch = sorted((batch, seconds) for batch, ctx, seconds in decode if ctx == shortest)
    step_s = by_batch[0][1]
    (b0, t0), (b1, t1) = by_batch[0], by_batch[-1]
    per_request_s = max(0.0, (t1 - t0) / (b1 - b0)) if b1 > b0 else 0.0
    prefill_s = min((seconds for _, seconds in prefill), default=per_request_s)
    return step_s, per_request_s, prefill_s


def stage_load(worker: WorkerState) -> StageLoad:
    assert worker.loaded is not None
    start, end = worker.loaded
    layers = end - start
    step_s, per_request_s, prefill_s = layer_costs_s(worker.profile)
    measured_s = worker.heartbeat.step_time_ewma_s if worker.heartbeat else 0.0
    return StageLoad(
        worker_id=worker.worker_id,
        start_layer=start,
        end_layer=end,
        queued_prefill_tokens=worker.queued_prefill_tokens,
        running_requests=worker.in_flight,
        kv_free_tokens=max(0, worker.kv_capacity_tokens - worker.reserved_kv_tokens),
        step_time_s=max(measured_s, step_s * layers) if worker.in_flight else step_s * layers,
        prefill_time_per_token_s=prefill_s * layers,
        step_time_per_request_s=per_request_s * layers,
        prefill_tokens_per_step=worker.prefill_tokens_per_step or DEFAULT_PREFILL_TOKENS_PER_STEP,
    )


def load_snapshot(cluster: Cluster, activation_bytes_per_token: int) -> LoadSnapshot:
    """Stages of the current plan that can take requests now (alive, loaded, not draining)."""
    usable = {worker_id for route in cluster.usable_routes() for worker_id in route}
    stages = tuple(stage_load(cluster.workers[worker_id]) for worker_id in sorted(usable))
    pipelines = tuple(cluster.usable_routes())
    return LoadSnapshot(
        stages=stages,
        num_layers=cluster.num_layers,
        activation_bytes_per_token=activation_bytes_per_token,
        pipelines=pipelines,
    )
