"""Routing decision, baselines, admission queue, and a small run of the simulator."""
from __future__ import annotations

import math
import random

import pytest

from scheduler.admission import AdmissionQueue
from scheduler.routing import (LoadSnapshot, RouteRequest, StageLoad, all_paths, choose_route,
                               disjoint_pipelines, least_loaded_route, path_times_s, round_robin_route,
                               route_score_s)


def stage(wid: str, s: int, e: int, *, queued: int = 0, running: int = 0, kv: int = 10_000,
          step: float = 0.01, prefill: float = 1e-4, alive: bool = True) -> StageLoad:
    return StageLoad(wid, s, e, queued, running, kv, step, prefill, alive, 0.0005, 256)


def four(**over: dict) -> LoadSnapshot:
    """A[0,4) B[0,4) C[4,8) D[4,8): four paths; ``over`` patches single stages."""
    base = {"A": stage("A", 0, 4), "B": stage("B", 0, 4), "C": stage("C", 4, 8), "D": stage("D", 4, 8)}
    for wid, kw in over.items():
        old = base[wid]
        base[wid] = stage(wid, old.start_layer, old.end_layer, **kw)
    return LoadSnapshot(tuple(base.values()), 8, pipelines=(("A", "C"), ("B", "D")))


def random_snapshot(rng: random.Random) -> LoadSnapshot:
    L = rng.randint(1, 6)
    stages = []
    for x in range(rng.randint(1, 9)):
        s = rng.randrange(L)
        e = rng.randint(s + 1, L)
        stages.append(StageLoad(f"w{x}", s, e, rng.choice([0, 0, 100, 3000]), rng.randint(0, 20),
                                rng.choice([50, 500, 5000, 50_000]), rng.uniform(0.005, 0.1),
                                rng.uniform(1e-5, 1e-3), rng.random() > 0.1, rng.uniform(0, 0.002),
                                rng.choice([64, 512, 2048])))
    ids = ["source", "sink"] + [st.worker_id for st in stages]
    lat = {(a, b): rng.uniform(0.0, 0.05) for a in ids for b in ids if a != b and rng.random() < 0.5}
    bw = {(a, b): rng.uniform(1e8, 1e10) for a in ids for b in ids if a != b and rng.random() < 0.5}
    return LoadSnapshot(tuple(stages), L, lat, rng.uniform(0.0, 0.02), bw, rng.choice([1e9, math.inf]),
                        rng.choice([0, 8192]))


@pytest.mark.parametrize("w", [None, 0.0, 1.0, 3.0])
def test_choose_route_is_the_least_score_of_all_paths(w: float | None) -> None:
    """Brute force over every path: the DP finds the least TTFT + w x decode time (the default
    weight, pure TTFT, the finish time, and a weight above 1)."""
    rng = random.Random(7)
    found = 0
    kw = {} if w is None else {"decode_weight": w}
    hold = {"max_queue_wait_s": math.inf}  # the least score; the hold is tested below
    for _ in range(400):
        snap = random_snapshot(rng)
        req = RouteRequest(rng.randint(1, 2000), rng.randint(1, 300))
        paths = list(all_paths(snap, req))
        choice = choose_route(snap, req, **kw, **hold)
        if not paths:
            assert choice is None
            continue
        found += 1
        best = min(route_score_s(*path_times_s(snap, p, req), **kw) for p in paths)
        assert choice is not None and choice.worker_ids in paths
        assert route_score_s(choice.predicted_ttft_s, choice.predicted_finish_s, **kw) == pytest.approx(
            best, rel=1e-9, abs=1e-12)
        assert choice.predicted_ttft_s <= choice.predicted_finish_s + 1e-12
    assert found > 150  # the random instances do exercise the search


def test_first_token_outweighs_decode_time() -> None:
    """C has ~2.8 s of queued prompts but decodes 50 ms/token faster than D: over 199 later tokens
    that is ~10 s, so the least finish time (weight 1) waits behind C's queue while the default
    weight (a TTFT second = 10 decode seconds) takes D and its first token ~2.7 s sooner."""
    req = RouteRequest(200, 200)
    snap = four(C={"queued": 20_000}, D={"step": 0.06})
    finish = choose_route(snap, req, decode_weight=1.0)
    default = choose_route(snap, req)
    assert finish is not None and finish.worker_ids[1] == "C"
    assert default is not None and default.worker_ids[1] == "D"
    assert default.predicted_ttft_s < finish.predicted_ttft_s - 2.5
    assert default.predicted_finish_s > finish.predicted_finish_s
    with pytest.raises(ValueError):
        choose_route(snap, req, decode_weight=-0.1)


def test_never_routes_through_a_kv_full_or_dead_stage_and_none_when_all_full() -> None:
    req = RouteRequest(1000, 200)
    choice = choose_route(four(A={"kv": 1199}, B={"step": 0.05}), req)  # A is the only short of KV
    assert choice is not None and choice.worker_ids[0] == "B"
    choice = choose_route(four(A={"alive": False}, B={"step": 0.05}), req)
    assert choice is not None and choice.worker_ids[0] == "B"
    assert choose_route(four(C={"kv": 10}, D={"kv": 1100}), req) is None
    assert choose_route(four(A={"kv": 1200}, C={"kv": 1200}), req) is not None  # exactly enough
    for fn in (lambda s: round_robin_route(s, req, 0), lambda s: least_loaded_route(s, req)):
        assert fn(four(A={"kv": 10}, B={"kv": 10})) is None


def test_holds_a_request_whose_best_path_would_queue_it_too_long() -> None:
    """Late binding: C is the only last stage with KV left and 20 s of prompts queued (20k tokens
    x 1 ms): the request waits (None) instead of joining that queue; it goes once the queue is
    within the bound, or at once to a path with room and no queue, however slow."""
    req = RouteRequest(200, 100)
    slow = {"prefill": 1e-3, "step": 0.2}
    full_d = {"kv": 10}
    assert choose_route(four(C={"queued": 20_000, **slow}, D=full_d), req) is None
    assert choose_route(four(C={"queued": 20_000, **slow}, D=full_d), req, max_queue_wait_s=math.inf) is not None
    choice = choose_route(four(C={"queued": 2_000, **slow}, D=full_d), req)
    assert choice is not None and choice.worker_ids[1] == "C"
    assert 1.0 < choice.predicted_queue_wait_s < 4.0
    choice = choose_route(four(C=slow, D=full_d), req)
    assert choice is not None and choice.worker_ids[1] == "C" and choice.predicted_queue_wait_s == 0.0
    with pytest.raises(ValueError):
        choose_route(four(), req, max_queue_wait_s=-1.0)


def test_crosses_replicas_where_boundaries_line_up() -> None:
    snap = four(B={"step": 0.05}, C={"step": 0.05})  # fast: A then D, which no fixed pipeline has
    assert len(list(all_paths(snap))) == 4
    choice = choose_route(snap, RouteRequest(100, 50))
    assert choice is not None and choice.worker_ids == ("A", "D")
    assert ("A", "D") not in snap.pipelines


def test_avoids_a_queued_stage_and_a_slow_hop() -> None:
    req = RouteRequest(500, 20)
    assert choose_route(four(C={"queued": 50_000}), req).worker_ids[1] == "D"
    slow_hops = LoadSnapshot(four().stages, 8, {("A", "C"): 1.0, ("B", "C"): 1.0, ("A", "D"): 1.0})
    assert choose_route(slow_hops, req).worker_ids == ("B", "D")
    # a longer queue is still worth it when the other path decodes much more slowly
    long_req = RouteRequest(100, 2000)
    assert choose_route(four(C={"queued": 2000}, D={"step": 0.05}), long_req).worker_ids[1] == "C"


def test_dp_handles_many_replicas_quickly() -> None:
    rng = random.Random(1)
    stages = tuple(stage(f"w{c}-{x}", 8 * c, 8 * c + 8, queued=rng.randint(0, 5000), step=rng.uniform(0.01, 0.05))
                   for c in range(8) for x in range(64))
    snap = LoadSnapshot(stages, 64)
    choice = choose_route(snap, RouteRequest(300, 100))
    assert choice is not None and len(choice.worker_ids) == 8
    # per column the cheapest stage wins (uniform hops): compare with the column-wise optimum
    req = RouteRequest(300, 100)
    best = tuple(min((s for s in stages if s.start_layer == 8 * c),
                     key=lambda s: route_score_s(*path_times_s(LoadSnapshot((s,), 64), (s.worker_id,), req))).worker_id
                 for c in range(8))
    assert choice.worker_ids == best


def test_round_robin_cycles_and_least_loaded_picks_the_lightest_busiest_stage() -> None:
    req = RouteRequest(10, 10)
    snap = four()
    assert [round_robin_route(snap, req, c).worker_ids for c in range(4)] == [("A", "C"), ("B", "D")] * 2
    assert round_robin_route(four(C={"kv": 5}), req, 0).worker_ids == ("B", "D")  # skips the full one
    assert round_robin_route(four(C={"queued": 10**6}), req, 0).worker_ids == ("A", "C")  # load-blind
    assert least_loaded_route(four(A={"running": 3}, D={"running": 5}), req).worker_ids == ("A", "C")
    bare = LoadSnapshot(four().stages, 8)
    assert disjoint_pipelines(bare) == (("A", "C"), ("B", "D"))


def test_admission_queue_is_fifo_and_bounded() -> None:
    q: AdmissionQueue[int] = AdmissionQueue(max_waiting=2, retry_after_s=3.0, max_wait_s=10.0)
    assert q.offer(1, 0.0, has_route=True).outcome == "admitted"
    assert q.offer(2, 0.0, has_route=False).outcome == "queued"
    d = q.offer(3, 1.0, has_route=True)  # a route exists but 2 waits: no overtaking
    assert (d.outcome, d.position) == ("queued", 1)
    d = q.offer(4, 1.0, has_route=False)
    assert (d.outcome, d.retry_after_s) == ("rejected", 3.0)
    assert q.release(lambda r: r != 2) == []  # head cannot go: nobody behind it goes either
    assert q.release(lambda r: True) == [2, 3] and len(q) == 0
    q.offer(5, 20.0, False)
    q.offer(6, 25.0, False)
    assert q.expire(31.0) == [5] and q.waiting() == (6,)
    assert q.remove(6) and not q.remove(6)
    assert (q.admitted, q.rejected) == (3, 2)


def test_simulator_ours_beats_round_robin_on_p99_ttft() -> None:
    from benchmarks.sim_cluster import TraceConfig, bursty_trace, make_cluster
    from benchmarks.simulator import baseline_pipelines, placement_from_ranges, simulate

    cluster = make_cluster(8, 0)
    ids = [d.device_id for d in cluster.devices]
    # the ranges solve_placement returns for this cluster (fixed here: the solver is time-limited)
    ranges = {d: ((0, 15) if x in (3, 4, 5, 7) else (15, 48)) for x, d in enumerate(ids)}
    placement = placement_from_ranges(cluster, ranges)
    assert placement.throughput_tokens_per_s > 0 and placement.pipelines
    pipes = baseline_pipelines(placement, cluster.model.num_layers)
    assert {w for p in pipes for w in p} == set(ids) and len(pipes) == len(set(pipes))  # all devices used
    trace = bursty_trace(18.0, TraceConfig(num_requests=600), seed=3)
    res = {name: simulate(cluster, placement, trace, name, pipes) for name in ("potluck", "round-robin")}
    for r in res.values():
        assert r.completed == 600 and r.rejected == 0
        assert 0 < r.ttft_p50_s <= r.ttft_p99_s <= r.e2e_p99_s
    assert res["potluck"].ttft_p99_s <= res["round-robin"].ttft_p99_s
    again = simulate(cluster, placement, trace, "potluck", pipes)
    assert again.ttft_p99_s == res["potluck"].ttft_p99_s  # deterministic


def test_simulator_late_binding_keeps_a_kv_rich_cpu_stage_from_taking_every_request() -> None:
    """A cluster (seed 6) whose last column is two RTX 4090s with little KV room and a CPU with a
    lot: without the hold, bursts that fill the GPUs' KV send every request to the CPU (predicted
    TTFT in the hundreds of seconds); with it they wait for a GPU and the tail stays short."""
    from benchmarks.sim_cluster import TraceConfig, bursty_trace, make_cluster, mean_output_tokens
    from benchmarks.simulator import baseline_pipelines, placement_from_ranges, simulate

    cluster = make_cluster(8, 6)
    cols = {"EPYC-CPU-256G": (31, 48), "A100-80G": (13, 31), "L40S-48G": (0, 13), "RTX4090-24G": (31, 48),
            "T4-16G": (0, 13), "L4-24G": (13, 31)}  # what solve_placement returned for it
    placement = placement_from_ranges(cluster, {d.device_id: cols[d.kind.name] for d in cluster.devices})
    pipes = baseline_pipelines(placement, cluster.model.num_layers)
    cfg = TraceConfig()  # 3000 requests: the flood builds up over several bursts
    trace = bursty_trace(0.8 * 2048 / mean_output_tokens(cfg), cfg, seed=6)
    held, flooded = (simulate(cluster, placement, trace, name, pipes) for name in ("potluck", "potluck-no-hold"))
    assert held.completed == flooded.completed == 3000
    assert held.ttft_p99_s * 5 < flooded.ttft_p99_s, (held, flooded)
    assert held.output_tokens_per_s > 1.3 * flooded.output_tokens_per_s


def test_simulator_places_with_the_real_solver() -> None:
    from benchmarks.sim_cluster import make_cluster
    from benchmarks.simulator import place

    cluster = make_cluster(4, 1)
    placement, wall_s = place(cluster, 1.0)
    assert wall_s < 10
    for p in placement.pipelines:
        assert p.stages[0].start_layer == 0 and p.stages[-1].end_layer == cluster.model.num_layers
        assert all(a.end_layer == b.start_layer for a, b in zip(p.stages, p.stages[1:]))


def test_simulator_report_aggregates_traces_per_cluster(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks.sim_report import geo_mean, ratios
    from benchmarks.simulator import main

    assert geo_mean([0.25, 1.0]) == pytest.approx(0.5) and math.isnan(geo_mean([]))
    runs = [{"potluck": {"x": 1.0}, "round-robin": {"x": 4.0}}, {"potluck": {"x": 3.0}, "round-robin": {"x": 3.0}}]
    assert ratios(runs, "round-robin", "x") == [0.25, 1.0]
    main(["--devices", "4", "--replan-devices", "--seed", "1", "--traces", "2", "--requests", "150"])
    out = capsys.readouterr().out
    assert "| 4 | 1 | round-robin | 2 |" in out and "| 4 | 1 | potluck-no-hold |" in out
    with pytest.raises(SystemExit):
        main(["--devices", "4", "--replan-devices", "--traces", "0"])
