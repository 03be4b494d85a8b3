"""Per-request routing: a pure function of a load snapshot picks a path through the stages.

Parts:
- ``StageLoad``: one stage (a worker holding layers ``[start_layer, end_layer)``) and its load.
- ``LoadSnapshot``: all stages, the layer count, hop latencies / bandwidths between workers (the
  coordinator is ``"source"`` before the first stage and ``"sink"`` after the last) and the
  precomputed pipelines the baselines cycle over.
- ``RouteRequest``, ``RouteChoice``: the request's size; the chosen worker ids with predictions.
- ``stage_time_s(stage, request)``, ``edge_time_s(...)``, ``path_times_s(...)``: the cost model.
- ``choose_route(snapshot, request)``: least predicted TTFT + ``DECODE_WEIGHT`` x decode time, by a
  shortest path over the stages (DP in layer order, no path enumeration), never through a KV-full
  or dead stage; ``None`` when no path fits, or when the best one would queue the prompt for more
  than ``MAX_QUEUE_WAIT_S`` (the caller holds the request in ``scheduler/admission.py`` and asks
  again as load changes). ``route_score_s`` is that score for one path's predictions;
  ``queue_wait_s`` the part of a path's TTFT spent behind prompts already queued.
- ``round_robin_route``, ``least_loaded_route``: the baselines, same inputs, fixed pipelines.
- ``ring_token_time_s(snapshot, path)``: predicted seconds per generated token of one request
  alone on ``path``: every stage's step, every hop's latency + activations, and the hop from
  the last stage back to the first that closes the ring (its next token).
- ``all_paths``: brute-force enumeration, for tests and small clusters only.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Iterator, Mapping

from placement.problem import SINK, SOURCE


@dataclass(frozen=True)
class StageLoad:
    """One stage's load as the scheduler sees it.

    ``queued_prefill_tokens``: prompt tokens routed here and not yet prefilled here (including
    those still upstream). ``step_time_s``: recent (EWMA) step time of the stage's layers under its
    current batch; ``step_time_per_request_s``: how much one more sequence adds to it.
    ``prefill_time_per_token_s``: prefill time of one token through the stage's layers.
    ``prefill_tokens_per_step``: the stage's chunked-prefill budget per step.
    """

    worker_id: str
    start_layer: int
    end_layer: int
    queued_prefill_tokens: int
    running_requests: int
    kv_free_tokens: int
    step_time_s: float
    prefill_time_per_token_s: float
    alive: bool = True
    step_time_per_request_s: float = 0.0
    prefill_tokens_per_step: int = 2048


@dataclass(frozen=True)
class LoadSnapshot:
    """Hop maps are keyed ``(src, dst)`` worker ids (or ``"source"`` / ``"sink"``); a missing pair
    costs the defaults. Bandwidth only matters where ``activation_bytes_per_token`` > 0."""

    stages: tuple[StageLoad, ...]
    num_layers: int
    hop_latency_s: Mapping[tuple[str, str], float] = field(default_factory=dict)
    default_hop_latency_s: float = 0.001
    hop_bandwidth_bytes_per_s: Mapping[tuple[str, str], float] = field(default_factory=dict)
    default_hop_bandwidth_bytes_per_s: float = math.inf
    activation_bytes_per_token: int = 0
    pipelines: tuple[tuple[str, ...], ...] = ()


KV_BLOCK_TOKENS = 16  # workers' KV block (workers/backend.py StageConfig.kv_block_size_tokens)


def kv_block_tokens(num_tokens: int, block_tokens: int = KV_BLOCK_TOKENS) -> int:
    """`num_tokens` rounded up to whole KV blocks: what a worker allocates for them. Reserving
    less let a burst of short requests past a stage's KV (up to 15 tokens a request too few) and
    running requests failed with "KV cache is full" and restarted."""
    return -(-num_tokens // block_tokens) * block_tokens


@dataclass(frozen=True)
class RouteRequest:
    num_prompt_tokens: int
    max_new_tokens: int
    # prompt tokens each stage holds in its prefix cache (scheduler/prefix_index.py): not prefilled there
    cached_tokens: Mapping[str, int] = field(default_factory=dict)
    kv_block_tokens: int = 1  # stages allocate KV in blocks of this many tokens

    @property
    def kv_tokens(self) -> int:
        """KV a stage must have free: prompt + max new tokens, in whole blocks."""
        return kv_block_tokens(self.num_prompt_tokens + self.max_new_tokens, self.kv_block_tokens)

    def prefill_tokens(self, worker_id: str) -> int:
        """Prompt tokens the stage computes (those its prefix cache does not hold)."""
        return self.num_prompt_tokens - min(self.num_prompt_tokens - 1, self.cached_tokens.get(worker_id, 0))


@dataclass(frozen=True)
class RouteChoice:
    worker_ids: tuple[str, ...]
    predicted_ttft_s: float
    predicted_finish_s: float
    predicted_queue_wait_s: float = 0.0  # `queue_wait_s`: behind prompts queued before this one


def eligible(stage: StageLoad, request: RouteRequest) -> bool:
    return stage.alive and stage.end_layer > stage.start_layer and stage.kv_free_tokens >= request.kv_tokens


def stage_time_s(stage: StageLoad, request: RouteRequest) -> tuple[float, float]:
    """(seconds this stage adds before the first token, seconds it adds to every later token).

    Before the first token: the queued prompt tokens and ours are prefilled in chunks of
    ``prefill_tokens_per_step``, each chunk riding along one step of the running batch.
    Later tokens: one step under the batch with this request in it."""
    step_s = stage.step_time_s + stage.step_time_per_request_s
    tokens = stage.queued_prefill_tokens + request.prefill_tokens(stage.worker_id)
    steps = math.ceil(tokens / max(1, stage.prefill_tokens_per_step))
    return tokens * stage.prefill_time_per_token_s + steps * stage.step_time_s, step_s


def edge_time_s(snapshot: LoadSnapshot, src: str, dst: str, request: RouteRequest) -> tuple[float, float]:
    """(seconds before the first token, seconds per later token) of one hop. Only hops between
    workers carry activations; the coordinator's hops carry token ids (latency only)."""
    latency_s = snapshot.hop_latency_s.get((src, dst), snapshot.default_hop_latency_s)
    if src == SOURCE or dst == SINK or not snapshot.activation_bytes_per_token:
        return latency_s, latency_s
    bw = snapshot.hop_bandwidth_bytes_per_s.get((src, dst), snapshot.default_hop_bandwidth_bytes_per_s)
    per_token_s = snapshot.activation_bytes_per_token / bw
    return latency_s + request.prefill_tokens(src) * per_token_s, latency_s + per_token_s


# A second before the first token counts as much as 10 s of later decoding: with 1.0 (least finish
# time) the router queued prompts behind the fast decoders during bursts (docs/performance-notes.md).
DECODE_WEIGHT = 0.1

# Late binding: a request whose best path would keep its prompt queued for longer than this (at
# the path's longest stage queue: ``queue_wait_s``) waits in the admission queue instead (first in,
# first out) and takes the first path that frees up. Without it, a path that is the only one with
# free KV gets flooded (docs/performance-notes.md). ``math.inf`` turns it off.
MAX_QUEUE_WAIT_S = 4.0


def route_score_s(predicted_ttft_s: float, predicted_finish_s: float, decode_weight: float = DECODE_WEIGHT) -> float:
    """What ``choose_route`` minimises: TTFT + ``decode_weight`` x (finish - TTFT)."""
    return predicted_ttft_s + decode_weight * (predicted_finish_s - predicted_ttft_s)


def _finish_s(first_s: float, later_s: float, request: RouteRequest) -> float:
    return first_s + max(0, request.max_new_tokens - 1) * later_s


def path_times_s(snapshot: LoadSnapshot, path: tuple[str, ...], request: RouteRequest) -> tuple[float, float]:
    """(predicted TTFT, predicted finish) of a path of worker ids, both from now."""
    by_id = {s.worker_id: s for s in snapshot.stages}
    first_s = later_s = 0.0
    for src, dst in zip((SOURCE,) + path, path + (SINK,)):
        a, b = edge_time_s(snapshot, src, dst, request)
        first_s, later_s = first_s + a, later_s + b
    for wid in path:
        a, b = stage_time_s(by_id[wid], request)
        first_s, later_s = first_s + a, later_s + b
    return first_s, _finish_s(first_s, later_s, request)


def ring_token_time_s(snapshot: LoadSnapshot, path: tuple[str, ...]) -> float:
    by_id = {s.worker_id: s for s in snapshot.stages}
    total_s = sum(by_id[w].step_time_s + by_id[w].step_time_per_request_s for w in path)
    for src, dst in zip(path, path[1:]):
        total_s += snapshot.hop_latency_s.get((src, dst), snapshot.default_hop_latency_s)
        if snapshot.activation_bytes_per_token:
            total_s += snapshot.activation_bytes_per_token / snapshot.hop_bandwidth_bytes_per_s.get(
                (src, dst), snapshot.default_hop_bandwidth_bytes_per_s)
    if len(path) > 1:  # the last stage's next token goes back to the first (a few bytes)
        total_s += snapshot.hop_latency_s.get((path[-1], path[0]), snapshot.default_hop_latency_s)
    return total_s


def queue_wait_s(snapshot: LoadSnapshot, path: tuple[str, ...], request: RouteRequest) -> float:
    """Seconds the prompt waits behind the prompts already queued on ``path``: the longest of its
    stages' waits (the stages work through the queue at the same time, one prompt behind another;
    ``path_times_s`` adds them up, which is right for one prompt alone and too much here)."""
    by_id = {s.worker_id: s for s in snapshot.stages}
    return max((stage_time_s(by_id[w], request)[0] - stage_time_s(replace(by_id[w], queued_prefill_tokens=0), request)[0]
                for w in path), default=0.0)


def choose_route(snapshot: LoadSnapshot, request: RouteRequest,
                 decode_weight: float = DECODE_WEIGHT, max_queue_wait_s: float = MAX_QUEUE_WAIT_S) -> RouteChoice | None:
    """The path with the least ``route_score_s`` (predicted TTFT + ``decode_weight`` x predicted
    decode time), or ``None`` when every path is KV-full or the best path's ``queue_wait_s``
    exceeds ``max_queue_wait_s`` (late binding: the caller holds the request and asks again when
    load changes). ``decode_weight=1`` is the least predicted finish time, ``0`` the least
    predicted TTFT.

    Design note. The score of a path is
        sum over stages  [ (Q_s + P) * prefill_s + ceil((Q_s + P) / chunk_s) * step_s ]   (TTFT part)
      + sum over hops    [ latency + P * activation_bytes / bandwidth ]                    (TTFT part)
      + w * (N - 1) * ( sum over stages (step_s + step_per_request_s)
                        + sum over hops (latency + activation_bytes / bandwidth) )          (decode)
    with P prompt tokens (less those stage s holds in its prefix cache: ``cached_tokens``, so a
    conversation stays where its history is unless load outweighs the prefill saved), N new
    tokens, Q_s the prompt tokens already queued at stage s. Every
    term belongs to one stage or one hop, so the score is a path length in the DAG whose nodes
    are stages and whose arcs join a stage ending at boundary b to one starting at b (any replica),
    plus source -> stages starting at 0 and stages ending at L -> sink. Stages are relaxed in
    order of start layer; at each boundary the predecessors are scanned cheapest first and the
    scan stops once no remaining one can beat the best (hop costs are bounded below), so a
    boundary with many replicas stays cheap. Stages with fewer free KV tokens than P + N, or
    dead, are left out. Ties are broken deterministically (by worker id).
    """
    if not decode_weight >= 0:
        raise ValueError(f"decode_weight must be >= 0, got {decode_weight}")
    if not max_queue_wait_s >= 0:
        raise ValueError(f"max_queue_wait_s must be >= 0, got {max_queue_wait_s}")
    L = snapshot.num_layers
    per = {
        s.worker_id: s for s in snapshot.stages
        if eligible(s, request) and 0 <= s.start_layer and s.end_layer <= L
    }
    if not per:
        return None
    n_later = decode_weight * max(0, request.max_new_tokens - 1)

    def weight(pair: tuple[float, float]) -> float:
        return pair[0] + n_later * pair[1]

    lat_floor = min([snapshot.default_hop_latency_s, *snapshot.hop_latency_s.values()])
    bw_ceiling = max([snapshot.default_hop_bandwidth_bytes_per_s, *snapshot.hop_bandwidth_bytes_per_s.values()])
    act_floor_s = snapshot.activation_bytes_per_token / bw_ceiling if snapshot.activation_bytes_per_token else 0.0
    fewest_prefill = request.num_prompt_tokens - min(request.num_prompt_tokens - 1, max(request.cached_tokens.values(), default=0))
    edge_floor = max(0.0, weight((lat_floor + fewest_prefill * act_floor_s, lat_floor + act_floor_s)))

    by_start: dict[int, list[StageLoad]] = defaultdict(list)
    for s in per.values():
        by_start[s.start_layer].append(s)
    best: dict[str, float] = {}
    parent: dict[str, str] = {}
    ending: dict[int, list[tuple[float, str]]] = defaultdict(list)  # boundary -> (cost so far, id)
    for b in sorted(by_start):
        preds = sorted(ending.get(b, ())) if b else []
        for s in sorted(by_start[b], key=lambda x: x.worker_id):
            own = weight(stage_time_s(s, request))
            if b == 0:
                cost, via = weight(edge_time_s(snapshot, SOURCE, s.worker_id, request)), SOURCE
            else:
                cost, via = math.inf, ""
                for c_p, p in preds:
                    if c_p + edge_floor >= cost:
                        break
                    c = c_p + weight(edge_time_s(snapshot, p, s.worker_id, request))
                    if c < cost:
                        cost, via = c, p
                if not via:
                    continue
            best[s.worker_id] = cost + own
            parent[s.worker_id] = via
            ending[s.end_layer].append((cost + own, s.worker_id))
    finals = [(c + weight(edge_time_s(snapshot, wid, SINK, request)), wid) for c, wid in ending.get(L, ())]
    if not finals:
        return None
    total, last = min(finals)
    path = [last]
    while parent[path[-1]] != SOURCE:
        path.append(parent[path[-1]])
    route = tuple(reversed(path))
    choice = _choice(snapshot, route, request)
    return None if choice.predicted_queue_wait_s > max_queue_wait_s else choice


def _choice(snapshot: LoadSnapshot, route: tuple[str, ...], request: RouteRequest) -> RouteChoice:
    ttft_s, finish_s = path_times_s(snapshot, route, request)
    return RouteChoice(route, ttft_s, finish_s, queue_wait_s(snapshot, route, request))


def disjoint_pipelines(snapshot: LoadSnapshot) -> tuple[tuple[str, ...], ...]:
    """Pipelines with no shared stage, built greedily (longest stages first), for snapshots that
    carry none: what a load-blind balancer would fix once."""
    free = sorted((s for s in snapshot.stages if s.end_layer > s.start_layer),
                  key=lambda s: (s.start_layer, s.start_layer - s.end_layer, s.worker_id))
    used: set[str] = set()
    out = []
    for head in [s for s in free if s.start_layer == 0]:
        chain, end = [head], head.end_layer
        while end < snapshot.num_layers:
            nxt = next((s for s in free if s.start_layer == end and s.worker_id not in used
                        and s not in chain), None)
            if nxt is None:
                break
            chain.append(nxt)
            end = nxt.end_layer
        if end == snapshot.num_layers and head.worker_id not in used:
            used.update(s.worker_id for s in chain)
            out.append(tuple(s.worker_id for s in chain))
    return tuple(out)


def _pipelines(snapshot: LoadSnapshot) -> tuple[tuple[str, ...], ...]:
    return snapshot.pipelines or disjoint_pipelines(snapshot)


def _pipeline_ok(by_id: Mapping[str, StageLoad], pipe: tuple[str, ...], request: RouteRequest) -> bool:
    return all(w in by_id and eligible(by_id[w], request) for w in pipe)


def round_robin_route(snapshot: LoadSnapshot, request: RouteRequest, counter: int) -> RouteChoice | None:
    """Baseline (Parallax-like): pipeline ``counter mod n`` of the precomputed pipelines, load
    ignored; only a pipeline with a dead or KV-full stage is skipped (to the next one)."""
    pipes = _pipelines(snapshot)
    by_id = {s.worker_id: s for s in snapshot.stages}
    for x in range(len(pipes)):
        pipe = pipes[(counter + x) % len(pipes)]
        if _pipeline_ok(by_id, pipe, request):
            return _choice(snapshot, pipe, request)
    return None


def least_loaded_route(snapshot: LoadSnapshot, request: RouteRequest) -> RouteChoice | None:
    """Baseline: the precomputed pipeline whose busiest stage runs the fewest requests."""
    by_id = {s.worker_id: s for s in snapshot.stages}
    ok = [p for p in _pipelines(snapshot) if _pipeline_ok(by_id, p, request)]
    if not ok:
        return None
    pipe = min(ok, key=lambda p: max(by_id[w].running_requests for w in p))
    return _choice(snapshot, pipe, request)


def all_paths(snapshot: LoadSnapshot, request: RouteRequest | None = None) -> Iterator[tuple[str, ...]]:
    """Every chain from layer 0 to L (eligible stages only when ``request`` is given)."""
    starts: dict[int, list[StageLoad]] = defaultdict(list)
    for s in snapshot.stages:
        if s.end_layer > s.start_layer and (request is None or eligible(s, request)):
            starts[s.start_layer].append(s)

    def walk(b: int, acc: tuple[str, ...]) -> Iterator[tuple[str, ...]]:
        if b == snapshot.num_layers:
            yield acc
            return
        for s in starts.get(b, ()):
            yield from walk(s.end_layer, acc + (s.worker_id,))

    yield from walk(0, ())
