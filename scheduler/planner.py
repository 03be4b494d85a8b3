"""Which worker holds which layers: the scheduler's side of placement.

Parts:
- `PlannerConfig`: context length and concurrency the KV reserve is sized for.
- `plan_layers`: ranges and pipelines for the registered workers.
- `kv_budget_bytes`: how much of a worker's memory its KV cache may take once its layers are in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from scheduler.cluster import LayerPlan, WorkerState
from scheduler.errors import NoCapacityError
from workers.protocol import ModelFacts

RUNTIME_OVERHEAD_BYTES = 256 * 2**20  # framework, activations, buffers beside weights and KV


@dataclass(frozen=True)
class PlannerConfig:
    max_model_len: int
    max_concurrent_sequences: int = 16
    time_limit_s: float = 5.0


def stage_weight_bytes(model: ModelFacts, start_layer: int, end_layer: int) -> int:
    weights = sum(model.layer_bytes[start_layer:end_layer])
    if start_layer == 0:
        weights += model.embedding_bytes
    if end_layer == model.num_layers:
        weights += model.lm_head_bytes
    return weights


def kv_budget_bytes(model: ModelFacts, worker: WorkerState, start_layer: int, end_layer: int, config: PlannerConfig) -> int:
    """Memory left after weights and overhead, capped at what the configured concurrency needs."""
    free_bytes = worker.memory_bytes - stage_weight_bytes(model, start_layer, end_layer) - RUNTIME_OVERHEAD_BYTES
    wanted = model.kv_bytes_per_token_per_layer * (end_layer - start_layer) * config.max_model_len * config.max_concurrent_sequences
    return max(0, min(int(free_bytes * 0.9), wanted))


def proportional_ranges(num_layers: int, weights: Sequence[float]) -> list[tuple[int, int]]:
    """Contiguous ranges with sizes proportional to `weights`, every part at least one layer."""
    if not weights or num_layers < len(weights):
        weights = list(weights)[:num_layers]
    total = float(sum(weights)) or 1.0
    bounds = [0]
    acc = 0.0
    for index, weight in enumerate(weights[:-1]):
        acc += weight
        ideal = round(num_layers * acc / total)
        low = bounds[-1] + 1
        high = num_layers - (len(weights) - 1 - index)
        bounds.append(min(max(ideal, low), high))
    bounds.append(num_layers)
    return list(zip(bounds[:-1], bounds[1:]))


def plan_layers(
    model: ModelFacts,
    workers: Sequence[WorkerState],
    config: PlannerConfig,
    epoch: int,
    current: Mapping[str, tuple[int, int]] | None = None,
) -> LayerPlan:
    """One pipeline over all workers, layers proportional to memory (stage order: registration)."""
    if not workers:
        raise NoCapacityError("no workers registered")
    ordered = sorted(workers, key=lambda w: (w.registered_at_s, w.worker_id))[: model.num_layers]
    ranges = proportional_ranges(model.num_layers, [w.memory_bytes for w in ordered])
    plan = {w.worker_id: r for w, r in zip(ordered, ranges)}
    short = {
        w.worker_id: stage_weight_bytes(model, *plan[w.worker_id]) + RUNTIME_OVERHEAD_BYTES - w.memory_bytes
        for w in ordered
        if stage_weight_bytes(model, *plan[w.worker_id]) + RUNTIME_OVERHEAD_BYTES > w.memory_bytes
    }
    if short:
        missing = sum(short.values())
        raise NoCapacityError(f"the model does not fit: {missing} bytes of memory are missing ({short})")
    return LayerPlan(epoch=epoch, ranges=plan, pipelines=(tuple(plan),))
