"""Discrete-event simulator of a potluck cluster, driving the real placement and routing code.

    python -m benchmarks.simulator [--devices 8 64] [--replan-devices 8 64 512] [--load 0.8]
                                   [--seed 0 [1 ...]] [--traces 1] [--json]

Parts:
- ``Policy`` / ``POLICIES``: ours (``scheduler.routing.choose_route``), ours without late binding,
  round-robin and least-loaded (the baselines in the same module), each a function of the load
  snapshot.
- ``simulate(cluster, placement, trace, policy)``: heapq event loop. Each placed device is a
  stage with continuous batching: a step runs every decode token that is ready (up to
  ``MAX_BATCH``) plus up to ``PREFILL_TOKENS_PER_STEP`` prompt tokens (chunked prefill, FIFO),
  and lasts ``layer_step_s`` x its layers (``sim_cluster.py``). Activations hop to the next stage
  after the link's latency + bytes / bandwidth; each new token goes back through the coordinator.
  A request reserves prompt + max_new KV tokens on every stage of its route until it finishes;
  if no route fits (or ours holds it: ``MAX_QUEUE_WAIT_S``) it waits in
  ``scheduler.admission.AdmissionQueue`` (FIFO), tried again whenever a request finishes or gets
  its first token: the same admission decision (``scheduler.admission.decide``) as the engine's.
- ``SimResult``: p50/p99 TTFT and end-to-end latency, output tokens/s.
- ``saturation_tokens_per_s``: output tokens/s of an overloaded run (the calibration of "load").
- ``replan_times``: wall time of the real ``solve_placement(current=...)`` after a join / a loss.
- ``run_size``: one cluster per seed, several traces on it; ``main``: the benchmark; prints the
  markdown of ``sim_report.py`` (ratios included) or JSON.
Not modelled: link contention, stragglers, preemption (KV is reserved up front instead).
"""
from __future__ import annotations

import argparse
import heapq
import json
import math
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Callable

from benchmarks.sim_cluster import (MAX_BATCH, PROFILE_CTX_TOKENS, SimCluster, SimRequest, TraceConfig,
                                    bursty_trace, kv_capacity_tokens, layer_step_s, make_cluster,
                                    PlanMix, mean_output_tokens, placement_problem, trace_mix, with_device,
                                    without_device)
from benchmarks.sim_report import markdown
from placement.flow import evaluate_placement
from placement.problem import SINK, SOURCE, Placement
from placement.solver import solve_placement
from scheduler.admission import AdmissionQueue
from scheduler.routing import (LoadSnapshot, RouteChoice, RouteRequest, StageLoad, choose_route,
                               disjoint_pipelines, least_loaded_route, round_robin_route)

if TYPE_CHECKING:
    from benchmarks.prefix_sim import PrefixCaches

PREFILL_TOKENS_PER_STEP = 512
EWMA_ALPHA = 0.2
Policy = Callable[[LoadSnapshot, RouteRequest, int], "RouteChoice | None"]
POLICIES: dict[str, Policy] = {
    "potluck": lambda snap, req, counter: choose_route(snap, req),
    # the same router without late binding (every request goes at once to its best path with room)
    "potluck-no-hold": lambda snap, req, counter: choose_route(snap, req, max_queue_wait_s=math.inf),
    "round-robin": round_robin_route,
    "least-loaded": lambda snap, req, counter: least_loaded_route(snap, req),
}


class _Stage:
    """Changing state of one stage."""

    def __init__(self, cluster: SimCluster, device_id: str, start: int, end: int) -> None:
        self.id, self.start, self.end, self.k = device_id, start, end, end - start
        self.kind = cluster.device(device_id).kind
        self.prefill: deque[list] = deque()     # [request, remaining prompt tokens]
        self.ready: list[_Req] = []
        self.busy = False
        self.running = 0
        self.kv_free = kv_capacity_tokens(cluster, cluster.device(device_id), start, end)
        self.queued_prefill = 0
        self.step_ewma_s = self.k * layer_step_s(self.kind, cluster.model, 1, PROFILE_CTX_TOKENS)
        m = cluster.model
        self.prefill_per_token_s = self.k * m.flops_per_token_per_layer / self.kind.flops_per_s
        self.step_per_request_s = self.k * PROFILE_CTX_TOKENS * m.kv_bytes_per_token_per_layer / self.kind.memory_bandwidth_bytes_per_s

    def load(self) -> StageLoad:
        return StageLoad(self.id, self.start, self.end, self.queued_prefill, self.running, self.kv_free,
                         self.step_ewma_s, self.prefill_per_token_s, True, self.step_per_request_s,
                         PREFILL_TOKENS_PER_STEP)


class _Req:
    __slots__ = ("r", "route", "pos", "generated", "ctx", "first_s", "finish_s", "cached")

    def __init__(self, r: SimRequest) -> None:
        self.r, self.route, self.pos, self.generated, self.ctx = r, (), 0, 0, r.prompt_tokens
        self.cached = 0  # prompt tokens every stage of its route held in its prefix cache
        self.first_s = self.finish_s = math.nan


@dataclass(frozen=True)
class SimResult:
    policy: str
    devices: int
    requests: int
    completed: int
    rejected: int
    ttft_p50_s: float
    ttft_p99_s: float
    e2e_p50_s: float
    e2e_p99_s: float
    output_tokens_per_s: float
    saturated_tokens_per_s: float  # emitted from the first finish until the admission queue drained
    sim_wall_s: float


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return math.nan
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def simulate(cluster: SimCluster, placement: Placement, trace: tuple[SimRequest, ...], policy: str,
             pipelines: tuple[tuple[str, ...], ...] = (), prefix: PrefixCaches | None = None) -> SimResult:
    """Serve ``trace`` on the placed cluster, routing each request with ``POLICIES[policy]``;
    with ``prefix`` (benchmarks/prefix_sim.py), stages keep prompt prefixes and prefill the rest."""
    wall0 = time.perf_counter()
    model, L = cluster.model, cluster.model.num_layers
    stages = {d: _Stage(cluster, d, s, e) for d, (s, e) in sorted(placement.ranges.items()) if e > s}
    hop_lat: dict[tuple[str, str], float] = {}
    hop_bw: dict[tuple[str, str], float] = {}
    pairs = [(SOURCE, b) for b, s in stages.items() if s.start == 0]
    pairs += [(a, SINK) for a, s in stages.items() if s.end == L]
    pairs += [(a, b) for a, stage_a in stages.items() for b, stage_b in stages.items() if stage_a.end == stage_b.start]
    for a, b in pairs:
        hop_lat[(a, b)], hop_bw[(a, b)] = cluster.link(cluster.site_of(a), cluster.site_of(b))
    default_lat, default_bw = cluster.link(0, 1)
    route_fn = POLICIES[policy]
    act = model.activation_bytes_per_token
    queue: AdmissionQueue[int] = AdmissionQueue(max_waiting=10**9, retry_after_s=1.0)
    reqs = {r.request_id: _Req(r) for r in trace}
    events: list[tuple[float, int, int, object]] = []
    seq = 0
    counter = 0
    emitted: list[float] = []

    def push(t: float, kind: int, payload: object) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (t, seq, kind, payload))

    def route(q: _Req) -> RouteChoice | None:
        nonlocal counter
        snap = LoadSnapshot(tuple(s.load() for s in stages.values()), L, hop_lat, default_lat, hop_bw,
                            default_bw, act, pipelines)
        counter += 1
        cached = prefix.lookup(q.r) if prefix is not None else {}
        return route_fn(snap, RouteRequest(q.r.prompt_tokens, q.r.new_tokens, cached), counter)

    def start(q: _Req, choice: RouteChoice, now: float) -> None:
        q.route = tuple(stages[w] for w in choice.worker_ids)
        kv = q.r.prompt_tokens + q.r.new_tokens
        if prefix is not None:
            q.cached = prefix.start(q.r, {s.id: s.kv_free - kv for s in q.route})
        for s in q.route:
            s.running += 1
            s.kv_free -= kv
            s.queued_prefill += q.r.prompt_tokens - q.cached
        push(now + hop_lat.get((SOURCE, q.route[0].id), default_lat), 3, q)

    def try_admit(now: float) -> Callable[[int], bool]:
        def admit(rid: int) -> bool:
            choice = route(reqs[rid])
            if choice is None:
                return False
            start(reqs[rid], choice, now)
            return True
        return admit

    def kick(s: _Stage, now: float) -> None:
        if s.busy or not (s.ready or s.prefill):
            return
        batch, s.ready = s.ready[:MAX_BATCH], s.ready[MAX_BATCH:]
        budget, done, chunked = PREFILL_TOKENS_PER_STEP, [], 0
        while s.prefill and budget:
            item = s.prefill[0]
            take = min(item[1], budget)
            item[1] -= take
            budget -= take
            chunked += take
            if item[1] == 0:
                done.append(s.prefill.popleft()[0])
        s.queued_prefill -= chunked
        ctx = sum(q.ctx for q in batch)
        dur = s.k * layer_step_s(s.kind, model, len(batch), ctx, chunked)
        s.busy = True
        push(now + dur, 1, (s, batch, done, dur))

    def forward_prompt(s: _Stage, q: _Req, now: float) -> None:
        if q.pos == len(q.route) - 1:
            push(now + hop_lat.get((s.id, SINK), default_lat), 4, [q])
            return
        q.pos += 1
        key = (s.id, q.route[q.pos].id)
        push(now + hop_lat.get(key, default_lat) + (q.r.prompt_tokens - q.cached) * act / hop_bw.get(key, default_bw), 3, q)

    def forward_tokens(s: _Stage, batch: list[_Req], now: float) -> None:
        """One event per destination: every token of a step leaves at the same time."""
        groups: dict[_Stage, list[_Req]] = {}
        out = []
        for q in batch:
            if q.pos == len(q.route) - 1:
                out.append(q)
            else:
                q.pos += 1
                groups.setdefault(q.route[q.pos], []).append(q)
        if out:
            push(now + hop_lat.get((s.id, SINK), default_lat), 4, out)
        for nxt, group in groups.items():
            key = (s.id, nxt.id)
            push(now + hop_lat.get(key, default_lat) + act / hop_bw.get(key, default_bw), 2, (nxt, group))

    for r in trace:
        push(r.arrival_s, 0, reqs[r.request_id])
    rejected = 0
    first_finish_s, drained_s = math.inf, -math.inf
    while events:
        now, _, kind, payload = heapq.heappop(events)
        if kind == 0:  # arrival
            q = payload
            decision, choice = queue.poll(q.r.request_id, now, lambda: route(q))
            if decision.outcome == "admitted":
                start(q, choice, now)
            elif decision.outcome == "rejected":
                rejected += 1
        elif kind == 1:  # step done
            s, batch, done, dur = payload
            s.busy = False
            s.step_ewma_s += EWMA_ALPHA * (dur - s.step_ewma_s)
            forward_tokens(s, batch, now)
            for q in done:
                forward_prompt(s, q, now)
            kick(s, now)
        elif kind == 2:  # decode tokens' activations arrive at a stage
            s, group = payload
            s.ready.extend(group)
            kick(s, now)
        elif kind == 3:  # a prompt's activations arrive
            q = payload
            s = q.route[q.pos]
            s.prefill.append([q, q.r.prompt_tokens - q.cached])
            kick(s, now)
        else:  # tokens reach the coordinator
            back: dict[_Stage, list[_Req]] = {}
            for q in payload:
                q.generated += 1
                emitted.append(now)
                if q.generated == 1:
                    q.first_s = now
                    if len(queue):  # its prompt left every queue: a held request may go (as in the engine)
                        queue.release(try_admit(now))
                if q.generated >= q.r.new_tokens:
                    q.finish_s = now
                    kv = q.r.prompt_tokens + q.r.new_tokens
                    for s in q.route:
                        s.running -= 1
                        s.kv_free += kv
                    if len(queue):
                        queue.release(try_admit(now))
                        drained_s = now
                    first_finish_s = min(first_finish_s, now)
                else:
                    q.ctx += 1
                    q.pos = 0
                    back.setdefault(q.route[0], []).append(q)
            for first, group in back.items():
                push(now + hop_lat.get((SOURCE, first.id), default_lat), 2, (first, group))
    done_reqs = [q for q in reqs.values() if not math.isnan(q.finish_s)]
    ttft = [q.first_s - q.r.arrival_s for q in done_reqs]
    e2e = [q.finish_s - q.r.arrival_s for q in done_reqs]
    t_first = min(r.arrival_s for r in trace)
    makespan = max((q.finish_s for q in done_reqs), default=t_first) - t_first
    window = math.nan
    if drained_s > first_finish_s:
        window = sum(1 for t in emitted if first_finish_s <= t <= drained_s) / (drained_s - first_finish_s)
    return SimResult(policy, len(cluster.devices), len(trace), len(done_reqs), rejected,
                     _pct(ttft, 0.5), _pct(ttft, 0.99), _pct(e2e, 0.5), _pct(e2e, 0.99),
                     len(emitted) / max(1e-9, makespan), window, time.perf_counter() - wall0)


def baseline_pipelines(placement: Placement, num_layers: int) -> tuple[tuple[str, ...], ...]:
    """The pipelines the baselines cycle over: the placement's max-flow pipelines (its precomputed
    routes, largest flow first, duplicates dropped), or greedy disjoint chains if it has none."""
    out: list[tuple[str, ...]] = []
    for p in sorted(placement.pipelines, key=lambda p: -p.flow_tokens_per_s):
        ids = tuple(s.device_id for s in p.stages)
        if ids not in out:
            out.append(ids)
    if out:
        return tuple(out)
    stages = tuple(StageLoad(d, s, e, 0, 0, 0, 0.0, 0.0) for d, (s, e) in sorted(placement.ranges.items()) if e > s)
    return disjoint_pipelines(LoadSnapshot(stages, num_layers))


def default_time_limit_s(num_devices: int) -> float:
    return 5.0 if num_devices <= 12 else 20.0 if num_devices <= 128 else 10.0


def placement_from_ranges(cluster: SimCluster, ranges: dict[str, tuple[int, int]]) -> Placement:
    """A fixed placement, evaluated by the real max-flow code (for reproducible tests)."""
    value, latency, pipes = evaluate_placement(placement_problem(cluster), ranges)
    return Placement(dict(ranges), value, latency, value, pipes, 0.0, "feasible")


def place(cluster: SimCluster, time_limit_s: float, current: dict[str, tuple[int, int]] | None = None,
          mix: PlanMix = PlanMix()) -> tuple[Placement, float]:
    """The real solver on the cluster's problem; (placement, wall seconds of ``solve_placement``)."""
    problem = placement_problem(cluster, mix)
    t0 = time.perf_counter()
    placement = solve_placement(problem, time_limit_s=time_limit_s, current=current)
    wall_s = time.perf_counter() - t0
    if not placement.pipelines:
        raise RuntimeError(f"solve_placement found no pipeline for {len(cluster.devices)} devices "
                           f"in {time_limit_s} s: {placement.notes}")
    return placement, wall_s


def saturation_tokens_per_s(cluster: SimCluster, placement: Placement, cfg: TraceConfig, seed: int,
                            policy: str = "potluck") -> float:
    """Output tokens/s of the cluster kept full: every request of a trace arrives at once, and the
    rate is measured from the first finish until the admission queue has drained."""
    probe = bursty_trace(1.0, cfg, seed + 1, bursty=False)
    mean_kv = sum(r.prompt_tokens + r.new_tokens for r in probe) / len(probe)
    # requests the cluster can hold at once: each holds KV in exactly one stage covering each
    # layer, so at most what the stages covering its tightest layer hold (counting only the first
    # layer's, a first stage with few layers on a big-memory box let 435k requests in at 64 devices)
    kv = {d: kv_capacity_tokens(cluster, cluster.device(d), s, e) for d, (s, e) in placement.ranges.items() if e > s}
    fits = min(sum(kv[d] for d, (s, e) in placement.ranges.items() if s <= x < e)
               for x in range(cluster.model.num_layers)) / mean_kv
    cfg = TraceConfig(**{**asdict(cfg), "num_requests": max(cfg.num_requests, int(1.3 * fits))})
    trace = tuple(SimRequest(r.request_id, 0.0, r.prompt_tokens, r.new_tokens)
                  for r in bursty_trace(1.0, cfg, seed + 1, bursty=False))
    res = simulate(cluster, placement, trace, policy, baseline_pipelines(placement, cluster.model.num_layers))
    if math.isnan(res.saturated_tokens_per_s):
        raise RuntimeError("the saturation run never filled the cluster: use more requests")
    return res.saturated_tokens_per_s


def replan_times(num_devices: int, seed: int, time_limit_s: float,
                 base: tuple[SimCluster, Placement] | None = None, mix: PlanMix = PlanMix()) -> dict[str, float]:
    """Wall time of ``solve_placement(current=previous ranges)`` after one device joins and after
    the device holding the most layers is lost."""
    cluster, before = base if base else (make_cluster(num_devices, seed), place(make_cluster(num_devices, seed),
                                                                                  time_limit_s, None, mix)[0])
    joined, join_s = place(with_device(cluster, seed), time_limit_s, dict(before.ranges), mix)
    victim = max(before.ranges, key=lambda d: (before.ranges[d][1] - before.ranges[d][0], d))
    left = {d: r for d, r in before.ranges.items() if d != victim}
    lost, loss_s = place(without_device(cluster, victim), time_limit_s, left, mix)
    return {"devices": num_devices, "time_limit_s": time_limit_s, "join_s": join_s, "loss_s": loss_s,
            "tokens_per_s_before": before.throughput_tokens_per_s,
            "tokens_per_s_after_join": joined.throughput_tokens_per_s, "moved_layers_join": joined.moved_layers,
            "tokens_per_s_after_loss": lost.throughput_tokens_per_s, "moved_layers_loss": lost.moved_layers}


def run_size(num_devices: int, load: float, seed: int, cfg: TraceConfig, traces: int = 1,
             mix: PlanMix | None = None) -> dict:
    """One cluster (``seed``) and its placement, saturation measured once, then ``traces`` bursty
    traces (trace seeds ``seed + 100 k``) at ``load`` x saturation, every policy on each. The
    placement is solved for the traces' mix (None) or the given one."""
    cluster = make_cluster(num_devices, seed)
    placement, solve_s = place(cluster, default_time_limit_s(num_devices), mix=mix or trace_mix(cfg))
    pipes = baseline_pipelines(placement, cluster.model.num_layers)
    sat = saturation_tokens_per_s(cluster, placement, cfg, seed)
    rate = load * sat / mean_output_tokens(cfg)
    runs = []
    for k in range(traces):
        trace = bursty_trace(rate, cfg, seed + 100 * k)
        runs.append({name: asdict(simulate(cluster, placement, trace, name, pipes)) for name in POLICIES})
    return {"devices": num_devices, "seed": seed, "solve_s": solve_s,
            "placement_tokens_per_s": placement.throughput_tokens_per_s,
            "stages": sum(1 for s, e in placement.ranges.values() if e > s), "baseline_pipelines": len(pipes),
            "saturation_tokens_per_s": sat, "arrival_rate_per_s": rate, "runs": runs,
            "_cluster": cluster, "_placement": placement}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", type=int, nargs="*", default=[8, 64], help="cluster sizes to simulate")
    ap.add_argument("--replan-devices", type=int, nargs="*", default=[8, 64, 512])
    ap.add_argument("--load", type=float, default=0.8, help="fraction of the measured saturation")
    ap.add_argument("--requests", type=int, default=TraceConfig.num_requests,
                    help="requests in each trace (the saturation run uses more if the KV holds more)")
    ap.add_argument("--seed", type=int, nargs="+", default=[0], help="clusters to simulate (one placement each)")
    ap.add_argument("--traces", type=int, default=1, help="bursty traces per cluster (trace seeds seed + 100 k)")
    ap.add_argument("--prompt-tokens-per-output-token", type=float, default=None,
                    help="workload mix the placement is solved for (default: the traces' mean prompt / mean "
                         "output tokens; 0: decode throughput only)")
    ap.add_argument("--kv-tokens-per-sequence", type=float, default=None,
                    help="KV tokens per running sequence that cap a stage's batch in placement (default: the "
                         "traces' mean prompt + output tokens; 0: no cap)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.traces < 1 or args.requests < 1 or not 0 < args.load:
        ap.error("--traces and --requests must be >= 1 and --load > 0")
    cfg = TraceConfig(num_requests=args.requests)
    t0 = time.perf_counter()
    own = trace_mix(cfg)
    mix = PlanMix(own.prompt_tokens_per_output_token if args.prompt_tokens_per_output_token is None
                  else args.prompt_tokens_per_output_token,
                  own.kv_tokens_per_sequence if args.kv_tokens_per_sequence is None else args.kv_tokens_per_sequence)
    if not (0 <= mix.prompt_tokens_per_output_token < math.inf and 0 <= mix.kv_tokens_per_sequence < math.inf):
        ap.error("--prompt-tokens-per-output-token and --kv-tokens-per-sequence must be finite and >= 0")
    sizes = [run_size(n, args.load, seed, cfg, args.traces, mix) for n in args.devices for seed in args.seed]
    replans = []
    for n in args.replan_devices:
        base = next(((s["_cluster"], s["_placement"]) for s in sizes if s["devices"] == n), None)
        replans.append(replan_times(n, args.seed[0], default_time_limit_s(n), base, mix))
    for s in sizes:
        del s["_cluster"], s["_placement"]
    if args.json:
        print(json.dumps({"load": args.load, "seeds": args.seed, "traces": args.traces, "sizes": sizes, "replans": replans}, indent=1))
    else:
        print(markdown(sizes, replans, args.load))
        print(f"\n(total wall time {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
