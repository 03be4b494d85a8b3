"""Which worker holds which layers: the scheduler's side of placement.

Parts:
- `PlannerConfig`: context length and concurrency the KV reserve is sized for; the workload's
  prompt tokens per output token that placement balances prefill and decode for.
- `device_spec`: a registered worker (its measured profile) as a placement `DeviceSpec`.
- `pipeline_plan`: one chain over co-located workers (they share a machine's compute), with its
  predicted tokens/s (`chain_tokens_per_s`: the stages' times per token add up).
- `plan_layers`: ranges and pipelines for the registered workers, solved by `placement/` over
  the links the workers measured (scheduler/link_table.py); a plan that keeps consecutive
  stages off the slow links is taken whenever it keeps `SLOW_LINK_KEEP_FRACTION` of the
  throughput of the best plan that uses them.
- `default_kv_tokens` / `kv_budget_bytes`: the KV a stage holds: by default max_model_len x
  max_concurrent_sequences tokens (`--kv-tokens` raises it), capped by the memory its layers leave.
- `assignment`: the `AssignLayers` message that gives a worker its range of a plan.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from placement.problem import DeviceSpec, InfeasiblePlacementError, ModelSpec, Placement, PlacementProblem
from placement.solver import solve_placement
from scheduler.cluster import LayerPlan, WorkerState
from scheduler.errors import NoCapacityError
from scheduler.link_table import LinkTable
from workers.device_profile import DeviceProfile, device_spec as profile_device_spec
from workers.protocol import AssignLayers, ModelFacts

RUNTIME_OVERHEAD_BYTES = 256 * 2**20  # framework, activations, buffers beside weights and KV
# Used only for a worker that registered without a measured profile (`--no-profile`).
DEFAULT_FLOPS_PER_S = 1e11
DEFAULT_BANDWIDTH_BYTES_PER_S = 2e10
# Prompt tokens per generated token assumed until the engine has served MIN_MIX_REQUESTS requests
# (chat traffic: prompts of a few hundred tokens with history, answers of about a hundred).
DEFAULT_PROMPT_TOKENS_PER_OUTPUT_TOKEN = 4.0
MIN_MIX_REQUESTS = 32
SLOW_LINK_KEEP_FRACTION = 0.9


@dataclass(frozen=True)
class PlannerConfig:
    max_model_len: int
    max_concurrent_sequences: int = 16
    time_limit_s: float = 2.0
    objective: str = "throughput"  # or "latency": one user's per-token latency
    # "solver": placement/ decides; "pipeline": one chain, layers proportional to memory;
    # "auto": "pipeline" when every worker is on one host (they share its compute), else "solver".
    placement: str = "auto"
    # the workload's prompt tokens per generated token: every output token also costs this many
    # prompt tokens of prefill on each stage (the engine passes what it has served, once it has)
    prompt_tokens_per_output_token: float = DEFAULT_PROMPT_TOKENS_PER_OUTPUT_TOKEN
    # KV tokens a running sequence holds: caps each stage's batch by the memory its weights leave
    # (0: no cap; the engine passes the mean prompt + output of what it has served)
    kv_tokens_per_sequence: float = 0.0
    # KV tokens each stage holds (`--kv-tokens`); None: the default, `default_kv_tokens`
    kv_tokens: int | None = None

    @property
    def stage_kv_tokens(self) -> int:
        """KV tokens each stage's cache is sized for (still capped by the memory its weights leave)."""
        return self.kv_tokens if self.kv_tokens is not None else default_kv_tokens(self.max_model_len, self.max_concurrent_sequences)


def default_kv_tokens(max_model_len: int, max_concurrent_sequences: int) -> int:
    """The default KV budget in tokens: what the configured context and concurrency need, every
    sequence at full length (max_model_len x max_concurrent_sequences), not what memory is free."""
    return max_model_len * max_concurrent_sequences


def stage_weight_bytes(model: ModelFacts, start_layer: int, end_layer: int) -> int:
    weights = sum(model.layer_bytes[start_layer:end_layer])
    if start_layer == 0:
        weights += model.embedding_bytes
    if end_layer == model.num_layers:
        weights += model.lm_head_bytes
    return weights


def kv_budget_bytes(model: ModelFacts, worker: WorkerState, start_layer: int, end_layer: int, config: PlannerConfig) -> int:
    """The KV of `config.stage_kv_tokens` tokens for layers [start_layer, end_layer) (by default what
    the configured context and concurrency need), capped at 90% of the memory left after weights
    and overhead."""
    free_bytes = worker.memory_bytes - stage_weight_bytes(model, start_layer, end_layer) - RUNTIME_OVERHEAD_BYTES
    wanted = model.kv_bytes_per_token_per_layer * (end_layer - start_layer) * config.stage_kv_tokens
    return max(0, min(int(free_bytes * 0.9), wanted))


def assignment(model_dir: str, dtype: str, model: ModelFacts, worker: WorkerState, layers: tuple[int, int],
               plan: LayerPlan, config: PlannerConfig, prefix_caching: bool = True) -> AssignLayers:
    """Load `layers` ([start_layer, end_layer)) of `plan`; the stage count hints at microbatching
    (co-located stages share one machine's bandwidth, so they do not split batches)."""
    stages = 1 if plan.co_located else max((len(r) for r in plan.pipelines if worker.worker_id in r), default=1)
    return AssignLayers(epoch=plan.epoch, model_dir=model_dir, start_layer=layers[0], end_layer=layers[1], dtype=dtype,
                        kv_budget_bytes=kv_budget_bytes(model, worker, *layers, config), num_stages_hint=stages,
                        prefix_caching=prefix_caching)


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


def host_of(worker: WorkerState) -> str:
    return worker.data_address.removeprefix("tcp://").rpartition(":")[0]


def pipeline_plan(model: ModelFacts, workers: Sequence[WorkerState], epoch: int) -> LayerPlan:
    """One chain over all workers (stage order: worker id), layers proportional to memory."""
    ordered = sorted(workers, key=lambda w: w.worker_id)[: model.num_layers]
    ranges = proportional_ranges(model.num_layers, [w.memory_bytes for w in ordered])
    plan = {w.worker_id: r for w, r in zip(ordered, ranges)}
    short = {
        w.worker_id: need - w.memory_bytes
        for w in ordered
        if (need := stage_weight_bytes(model, *plan[w.worker_id]) + RUNTIME_OVERHEAD_BYTES) > w.memory_bytes
    }
    if short:
        raise NoCapacityError(f"the model does not fit: {sum(short.values())} bytes of memory are missing ({short})")
    co_located = len({host_of(w) for w in ordered}) == 1
    return LayerPlan(epoch=epoch, ranges=plan, pipelines=(tuple(plan),), co_located=co_located,
                     predicted_tokens_per_s=chain_tokens_per_s(model, ordered, plan) if co_located else 0.0)


def chain_tokens_per_s(model: ModelFacts, workers: Sequence[WorkerState], ranges: Mapping[str, tuple[int, int]]) -> float:
    """Predicted throughput of one chain of stages that share a machine: they run one after the
    other, so their times per token add up (each stage's from its profile, as the solver rates
    it); 0.0 when a stage cannot be rated."""
    from placement.network import build_network

    try:
        net = build_network(PlacementProblem(model_spec(model), tuple(device_spec(w, model) for w in workers)))
    except (InfeasiblePlacementError, ValueError):
        return 0.0
    seconds_per_token = 0.0
    for index, worker in enumerate(workers):
        start, end = ranges[worker.worker_id]
        capacities = net.cap[net.ids.index(worker.worker_id)] if index < net.n else []
        if end - start > len(capacities) or capacities[end - start - 1] <= 0:
            return 0.0
        seconds_per_token += 1.0 / capacities[end - start - 1]
    return 1.0 / seconds_per_token if seconds_per_token > 0 else 0.0


def model_spec(model: ModelFacts) -> ModelSpec:
    return ModelSpec(
        num_layers=model.num_layers,
        layer_bytes=tuple(model.layer_bytes),
        embedding_bytes=model.embedding_bytes,
        lm_head_bytes=model.lm_head_bytes,
        kv_bytes_per_token_per_layer=model.kv_bytes_per_token_per_layer,
        activation_bytes_per_token=model.activation_bytes_per_token,
        expert_bytes=tuple(model.expert_bytes),
        num_experts=model.num_experts,
        experts_per_token=model.experts_per_token,
    )


def device_spec(worker: WorkerState, model: ModelFacts) -> DeviceSpec:
    """A worker as the solver and the router see it, by the one conversion of a profile
    (`workers.device_profile.device_spec`): its measured per-layer decode step times at the
    shortest context timed and its prefill time per token (the longest prompt timed) when its
    profile timed a layer, else the roofline from its measured FLOP/s and memory bandwidth (the
    defaults for a worker that registered without a profile). The FLOP rate is scaled for the
    model's dtype; memory is what the worker offered less the runtime's overhead."""
    memory_bytes = max(0, worker.memory_bytes - RUNTIME_OVERHEAD_BYTES)
    profile = worker.profile or DeviceProfile(worker.device, worker.device, worker.device, memory_bytes,
                                              DEFAULT_FLOPS_PER_S, "float16", DEFAULT_BANDWIDTH_BYTES_PER_S, 0.0, 0.0)
    itemsize = model.activation_bytes_per_token // model.hidden_size
    return profile_device_spec(profile, worker.worker_id, context_len=0, weight_itemsize_bytes=itemsize,
                               memory_bytes=memory_bytes, kind=worker.device)


def _off_slow_links(problem: PlacementProblem, placement: Placement, slow: set[tuple[str, str]],
                    config: PlannerConfig, current: Mapping[str, tuple[int, int]] | None) -> Placement:
    """The plan without the `slow` links when it keeps `SLOW_LINK_KEEP_FRACTION` of `placement`'s
    throughput (or `placement` already avoids them), else `placement`."""
    crossing = any(tuple(sorted((a.device_id, b.device_id))) in slow
                   for pipeline in placement.pipelines for a, b in zip(pipeline.stages, pipeline.stages[1:]))
    if not crossing:
        return placement
    kept = tuple(l for l in problem.links if tuple(sorted((l.src, l.dst))) not in slow)
    try:
        avoiding = solve_placement(replace(problem, links=kept), time_limit_s=config.time_limit_s,
                                   current=dict(current or {}) or None)
    except InfeasiblePlacementError:
        return placement
    if not avoiding.pipelines:
        return placement
    keep = avoiding.throughput_tokens_per_s >= SLOW_LINK_KEEP_FRACTION * placement.throughput_tokens_per_s
    if config.objective == "latency":
        keep = avoiding.latency_s <= placement.latency_s / SLOW_LINK_KEEP_FRACTION
    return avoiding if keep else placement


def plan_layers(
    model: ModelFacts,
    workers: Sequence[WorkerState],
    config: PlannerConfig,
    epoch: int,
    current: Mapping[str, tuple[int, int]] | None = None,
    links: LinkTable | None = None,
) -> LayerPlan:
    """Solve placement for the workers (placement/solver.py) over their measured `links`; re-plans
    keep `current` ranges unless moving layers buys real throughput. The KV reserve shrinks to one
    full-length sequence before the plan is declared impossible. With slow links measured, the
    problem is solved again without them (no stage hands its activations over one) and that plan
    wins when it keeps `SLOW_LINK_KEEP_FRACTION` of the throughput."""
    if not workers:
        raise NoCapacityError("no workers registered")
    if config.placement == "pipeline" or (config.placement == "auto" and len({host_of(w) for w in workers}) == 1):
        return pipeline_plan(model, workers, epoch)
    devices = tuple(device_spec(w, model) for w in sorted(workers, key=lambda w: w.worker_id))
    ids = [d.device_id for d in devices]
    link_specs = links.link_specs(ids) if links is not None else ()
    slow = links.slow_pairs(ids) if links is not None else set()
    reserves = (config.max_model_len * config.max_concurrent_sequences, config.max_model_len)
    placement: Placement | None = None
    for reserve in reserves:
        problem = PlacementProblem(model_spec(model), devices, kv_reserve_tokens=reserve, objective=config.objective,
                                   prompt_tokens_per_output_token=config.prompt_tokens_per_output_token,
                                   kv_tokens_per_sequence=config.kv_tokens_per_sequence, links=link_specs)
        try:
            placement = solve_placement(problem, time_limit_s=config.time_limit_s, current=dict(current or {}) or None)
            if slow:
                placement = _off_slow_links(problem, placement, slow, config, current)
            break
        except InfeasiblePlacementError as exc:
            error = exc
    if placement is None:
        raise NoCapacityError(f"the model does not fit on the registered workers: {error}")
    pipelines = tuple(tuple(stage.device_id for stage in pipeline.stages) for pipeline in placement.pipelines)
    used = {worker_id for pipeline in pipelines for worker_id in pipeline}
    return LayerPlan(
        epoch=epoch,
        ranges={wid: r for wid, r in placement.ranges.items() if wid in used},
        pipelines=pipelines,
        predicted_tokens_per_s=placement.throughput_tokens_per_s,
        predicted_latency_s=placement.latency_s,
        upper_bound_tokens_per_s=placement.upper_bound_tokens_per_s,
        solve_time_s=placement.solve_time_s,
    )
