"""What `potluck serve` decides when local workers fail while starting (api/worker_watch.py), on the
scheduler's real `Cluster` fed the messages workers send; and how `potluck status` shows it.
The end-to-end case (a worker process that dies: serve exits 6) is in tests/api/test_cli.py."""

from __future__ import annotations

from api.status_command import format_cluster
from api.worker_watch import startup_verdict
from scheduler.cluster import Cluster, LayerPlan
from workers import protocol as p

IDS = ["local-0", "local-1"]


def _registered(cluster: Cluster, worker_id: str) -> None:
    cluster.register(p.Register(worker_id, f"tcp://127.0.0.1:{7000 + len(cluster.workers)}", 2**30, "cpu"))


def _loaded(cluster: Cluster, worker_id: str, layers: tuple[int, int], error: str | None = None) -> None:
    state = cluster.workers[worker_id]
    state.assigned, state.assigned_epoch = layers, cluster.epoch
    cluster.on_layers_ready(p.LayersReady(worker_id, cluster.epoch, *layers, kv_capacity_tokens=64, error=error))


def test_no_failure_waits_then_serves() -> None:
    cluster = Cluster(num_layers=4)
    assert startup_verdict(IDS, cluster).state == "waiting"
    for wid in IDS:
        _registered(cluster, wid)
    cluster.plan = LayerPlan(0, {"local-0": (0, 2), "local-1": (2, 4)}, (("local-0", "local-1"),))
    _loaded(cluster, "local-0", (0, 2))
    _loaded(cluster, "local-1", (2, 4))
    assert startup_verdict(IDS, cluster).state == "serving" and not startup_verdict(IDS, cluster).line


def test_every_local_worker_dead_fails_in_one_line_grouped_by_reason() -> None:
    cluster = Cluster(num_layers=4)
    for wid in IDS:
        cluster.record_failure(wid, "AssertionError: Torch not compiled with CUDA enabled")
    verdict = startup_verdict(IDS, cluster)
    assert verdict.state == "failed"
    assert verdict.line == "all 2 local workers failed to start: local-0, local-1: AssertionError: Torch not compiled with CUDA enabled"
    assert startup_verdict(IDS, cluster, others_expected=True).state == "waiting"  # Ray workers may still come


def test_one_dead_one_ready_serves_on_the_other_and_says_what_is_missing() -> None:
    cluster = Cluster(num_layers=4)
    cluster.record_failure("local-1", "exited with status 1")
    _registered(cluster, "local-0")
    assert startup_verdict(IDS, cluster).state == "waiting"  # local-0 has no layers yet
    cluster.plan = LayerPlan(1, {"local-0": (0, 4)}, (("local-0",),))
    _loaded(cluster, "local-0", (0, 4))
    verdict = startup_verdict(IDS, cluster)
    assert verdict.state == "serving" and verdict.failed_ids == ("local-1",)
    assert verdict.line == "serving without local-1: exited with status 1"


def test_a_load_error_counts_once_recorded_and_status_shows_it() -> None:
    cluster = Cluster(num_layers=4)
    for wid in IDS:
        _registered(cluster, wid)
    _loaded(cluster, "local-0", (0, 2))
    _loaded(cluster, "local-1", (2, 4), error="model.safetensors: incomplete metadata")
    assert cluster.workers["local-1"].error
    cluster.record_failure("local-1", "cannot load layers [2, 4]: model.safetensors: incomplete metadata")
    assert startup_verdict(IDS, cluster).state == "serving"  # the healthy one is ready: re-plan onto it
    snapshot = {"model": {"id": "m", "num_layers": 4}, "plan": None, "workers": [],
                "failed_workers": [{"id": f.worker_id, "reason": f.reason} for f in cluster.failures.values()]}
    assert "FAILED local-1: cannot load layers [2, 4]: model.safetensors: incomplete metadata" in format_cluster(snapshot)
    _registered(cluster, "local-1")  # the same id registering again clears its failure
    assert "local-1" not in cluster.failures
