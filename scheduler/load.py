"""The live load of the cluster as the router sees it.

Parts:
- `layer_costs_s(spec, layer_bytes)`: per-layer decode step time at batch 1, its growth per extra
  sequence, and prefill time per token, from the worker's `DeviceSpec` (scheduler/planner.py's
  `device_spec`, the same the planner places with: one prefill cost for both).
- `load_snapshot(cluster, model)`: a `routing.LoadSnapshot` of the usable stages: the
  scheduler's own KV reservations and queued prompt tokens (exact, updated per request,
  scheduler/request_state.py) plus the step time the worker reports in its heartbeats (EWMA,
  measured), and the chunked-prefill budget it reported at registration; with a `LinkTable`, the
  hop latencies (half the measured round trip) and bandwidths between workers.
"""

from __future__ import annotations

from placement.network import layer_step_time_s
from placement.problem import DeviceSpec, ModelSpec
from scheduler.cluster import Cluster, WorkerState
from scheduler.link_table import LinkTable
from scheduler.planner import device_spec, model_spec
from scheduler.routing import LoadSnapshot, StageLoad
from workers.protocol import ModelFacts

DEFAULT_PREFILL_TOKENS_PER_STEP = StageLoad.prefill_tokens_per_step  # a worker that did not report its budget
ROOFLINE_BATCH = 16  # the batch the per-sequence growth is read at when no batch was measured


def layer_costs_s(spec: DeviceSpec, layer_bytes: float, model: ModelSpec | None = None) -> tuple[float, float, float]:
    """(decode step s per layer at the smallest batch, extra s per layer per added sequence up to the
    largest batch, prefill s per token per layer: measured, else the roofline's compute time).
    With `model` an MoE model the roofline counts the experts a step reaches / a token uses."""
    batches = sorted(b for b, _ in spec.decode_layer_time_s or ()) or [1, ROOFLINE_BATCH]
    low, high = batches[0], batches[-1]
    step_s = layer_step_time_s(spec, layer_bytes, low, model)
    per_request_s = max(0.0, (layer_step_time_s(spec, layer_bytes, high, model) - step_s) / (high - low)) if high > low else 0.0
    prefill_s = spec.prefill_layer_time_per_token_s
    if prefill_s is None:
        share = model.compute_bytes_per_token_per_layer() / model.mean_layer_bytes if model is not None else 1.0
        prefill_s = layer_bytes * share / spec.flops_per_s if spec.flops_per_s else per_request_s
    return step_s, per_request_s, prefill_s


def stage_load(worker: WorkerState, model: ModelFacts, measured_when_idle: bool = False) -> StageLoad:
    assert worker.loaded is not None
    start, end = worker.loaded
    layers = end - start
    layer_bytes = sum(model.layer_bytes[start:end]) / max(1, layers)
    step_s, per_request_s, prefill_s = layer_costs_s(device_spec(worker, model), layer_bytes, model_spec(model))
    measured_s = worker.heartbeat.step_time_ewma_s if worker.heartbeat else 0.0
    return StageLoad(
        worker_id=worker.worker_id,
        start_layer=start,
        end_layer=end,
        queued_prefill_tokens=worker.queued_prefill_tokens,
        running_requests=worker.in_flight,
        kv_free_tokens=max(0, worker.kv_capacity_tokens - worker.reserved_kv_tokens),
        step_time_s=max(measured_s, step_s * layers) if worker.in_flight or measured_when_idle else step_s * layers,
        prefill_time_per_token_s=prefill_s * layers,
        step_time_per_request_s=per_request_s * layers,
        prefill_tokens_per_step=worker.prefill_tokens_per_step or DEFAULT_PREFILL_TOKENS_PER_STEP,
    )


def load_snapshot(cluster: Cluster, model: ModelFacts, links: LinkTable | None = None,
                  measured_when_idle: bool = False) -> LoadSnapshot:
    """Stages of the current plan that can take requests now (alive, loaded, not draining).
    `measured_when_idle`: an idle stage's step time is also its last measured one (predictions of
    the time per token; the router charges an idle stage its profile's)."""
    usable = {worker_id for route in cluster.usable_routes() for worker_id in route}
    stages = tuple(stage_load(cluster.workers[worker_id], model, measured_when_idle) for worker_id in sorted(usable))
    pipelines = tuple(cluster.usable_routes())
    return LoadSnapshot(
        stages=stages,
        num_layers=cluster.num_layers,
        activation_bytes_per_token=model.activation_bytes_per_token,
        pipelines=pipelines,
        hop_latency_s=links.hop_latency_s() if links is not None else {},
        hop_bandwidth_bytes_per_s=links.hop_bandwidth_bytes_per_s() if links is not None else {},
    )
