"""The /cluster endpoints and `potluck status` against a live `potluck serve` with real workers.

Parts: listing and contiguous ranges; the API key (required on /cluster*, not on /health,
/metrics, /dashboard); one node and unknown nodes; an in-flight stream seen in /cluster/requests
with its route and a growing token count (and gone once the client hangs up); replan; drain on a
cluster of its own; `potluck status` (table, missing key, unreachable server).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from live_cluster import LiveCluster, shared_cluster, sse_events, start_cluster

from tests.support.served import free_port

pytestmark = pytest.mark.slow  # a live cluster of worker processes

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def live(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> LiveCluster:
    return shared_cluster(request.config, tmp_path_factory)


def assert_envelope(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def test_cluster_lists_every_worker_with_contiguous_ranges(live: LiveCluster) -> None:
    cluster = live.cluster()
    assert cluster["model"]["id"] == live.model and cluster["model"]["num_layers"] == live.num_layers
    workers = {w["id"]: w for w in cluster["workers"]}
    assert len(workers) == 2
    plan = cluster["plan"]
    assert set(plan["ranges"]) == set(workers)
    for route in plan["pipelines"]:
        bounds = [tuple(plan["ranges"][wid]) for wid in route]
        assert bounds[0][0] == 0 and bounds[-1][1] == live.num_layers
        assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(bounds, bounds[1:])), bounds
    assert plan["usable_pipelines"] == plan["pipelines"]
    for wid, worker in workers.items():
        assert worker["state"] == "ready" and worker["device"] == "cpu" and worker["memory_bytes"] > 0
        assert worker["assigned_layers"] == worker["loaded_layers"] == plan["ranges"][wid]
        assert isinstance(worker["profile"], dict)
        assert worker["kv_capacity_tokens"] > 0 and 0 <= worker["kv_free_tokens"] <= worker["kv_capacity_tokens"]
    # the workload mix the next plan is for: the default until 32 requests have finished, then theirs
    assert cluster["prompt_tokens_per_output_token"] > 0 and cluster["kv_tokens_per_sequence"] >= 0


def test_cluster_endpoints_need_the_key_metrics_and_dashboard_do_not(live: LiveCluster) -> None:
    with httpx.Client(base_url=live.url, timeout=30) as anonymous:
        for method, path in [("GET", "/cluster"), ("GET", "/cluster/requests"), ("GET", "/cluster/nodes/x"),
                             ("POST", "/cluster/nodes/x/drain"), ("POST", "/cluster/replan")]:
            error = assert_envelope(anonymous.request(method, path), 401)
            assert error["code"] == "invalid_api_key", (method, path)
        wrong = anonymous.get("/cluster", headers={"Authorization": "Bearer nope"})
        assert assert_envelope(wrong, 401)["message"] == "Incorrect API key provided."
        assert anonymous.get("/health").status_code == 200
        metrics = anonymous.get("/metrics")
        assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
        page = anonymous.get("/dashboard")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")


def test_one_node_and_unknown_nodes(live: LiveCluster) -> None:
    worker = live.cluster()["workers"][0]
    node = live.http.get(f"/cluster/nodes/{worker['id']}")
    assert node.status_code == 200
    assert {k: node.json()[k] for k in ("id", "device", "assigned_layers", "state")} == \
        {k: worker[k] for k in ("id", "device", "assigned_layers", "state")}
    assert assert_envelope(live.http.get("/cluster/nodes/no-such-worker"), 404)["code"] == "node_not_found"
    assert assert_envelope(live.http.post("/cluster/nodes/no-such-worker/drain"), 404)["param"] == "node_id"
    assert_envelope(live.http.get("/cluster/nodes/" + "x" * 300), 400)
    assert_envelope(live.http.post(f"/cluster/nodes/{worker['id']}/drain", params={"force": "maybe"}), 400)


def test_requests_show_a_stream_in_flight_with_its_route_and_growing_tokens(live: LiveCluster) -> None:
    pipeline = live.cluster()["plan"]["pipelines"][0]
    body = {"model": live.model, "prompt": "watch me", "max_tokens": 1500, "ignore_eos": True, "stream": True}
    seen: list[int] = []
    with live.http.stream("POST", "/v1/completions", json=body) as stream:
        lines = stream.iter_lines()
        request_id = next(sse_events(lines))["id"]
        for _ in range(50):
            entries = [r for r in live.http.get("/cluster/requests").json()["data"] if r["id"] == request_id]
            assert len(entries) == 1, entries
            entry = entries[0]
            assert entry["route"] == pipeline and entry["max_new_tokens"] == 1500 and entry["prompt_tokens"] > 0
            seen.append(entry["generated_tokens"])
            if len(set(seen)) >= 3:
                break
            for _ in range(20):  # read on, so the server's generator moves on
                next(lines)
        assert len(set(seen)) >= 3 and seen == sorted(seen), seen
    # The client hung up: the request is aborted and leaves the list.
    deadline = time.monotonic() + 10
    while any(r["id"] == request_id for r in live.http.get("/cluster/requests").json()["data"]):
        assert time.monotonic() < deadline, "the aborted request is still listed"
        time.sleep(0.05)


def test_replan_answers_and_keeps_serving(live: LiveCluster) -> None:
    before = live.cluster()
    response = live.http.post("/cluster/replan")
    assert response.status_code == 200, response.text
    assert response.json()["epoch"] > before["epoch"]
    assert sorted(response.json()["plan"]["ranges"]) == sorted(w["id"] for w in before["workers"])
    live.wait_for(lambda c: c["plan"]["usable_pipelines"] and all(w["state"] == "ready" for w in c["workers"]))
    assert live.complete("still here", 5)["usage"]["completion_tokens"] == 5


def test_drain_finishes_in_flight_work_then_releases_the_layers(tmp_path: Path) -> None:
    live = start_cluster(tmp_path, num_workers=2, num_layers=4)
    try:
        pipeline = live.cluster()["plan"]["pipelines"][0]
        drained, kept = pipeline[-1], pipeline[0]
        body = {"model": live.model, "prompt": "in flight", "max_tokens": 300, "ignore_eos": True, "stream": True}
        with live.http.stream("POST", "/v1/completions", json=body) as stream:
            events = sse_events(stream.iter_lines())
            first = next(events)
            response = live.http.post(f"/cluster/nodes/{drained}/drain")
            assert response.status_code == 202, response.text
            assert response.json()["node"]["state"] == "draining"
            assert live.http.get(f"/cluster/nodes/{drained}").json()["state"] == "draining"
            rest = list(events)
        text = first["choices"][0]["text"] + "".join(e["choices"][0]["text"] for e in rest)
        assert rest[-1]["choices"][0]["finish_reason"] == "length" and text, "the in-flight request did not finish"
        cluster = live.wait_for(lambda c: drained not in c["plan"]["ranges"] and c["plan"]["usable_pipelines"], 60)
        assert cluster["plan"]["ranges"] == {kept: [0, 4]} and cluster["plan"]["pipelines"] == [[kept]]
        node = live.http.get(f"/cluster/nodes/{drained}").json()
        assert node["assigned_layers"] is None and node["state"] == "draining"
        for _ in range(3):
            assert live.complete("after the drain", 4)["usage"]["completion_tokens"] == 4
        error = assert_envelope(live.http.post(f"/cluster/nodes/{kept}/drain"), 409)
        assert "no worker" in error["message"]
    finally:
        live.stop()


def run_status(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "api.cli", "status", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={k: v for k, v in os.environ.items() if k != "POTLUCK_API_KEY"})


def test_status_prints_the_cluster_as_a_table(live: LiveCluster) -> None:
    cluster = live.cluster()
    done = run_status("--url", live.url, "--api-key", live.api_key)
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line for line in done.stdout.splitlines() if line.strip()}
    for worker in cluster["workers"]:
        start, end = worker["assigned_layers"]
        row = rows[worker["id"]]
        assert f"[{start}, {end})" in row and "ready" in row and "cpu" in row
    assert f"model {live.model}" in done.stdout and "pipeline 0:" in done.stdout
    printed = run_status("--url", f"{live.url}/v1/", "--api-key", live.api_key)  # the URL `serve` prints
    assert printed.returncode == 0 and printed.stdout == done.stdout, printed.stderr
    no_key = run_status("--url", live.url)
    assert no_key.returncode == 7 and "API key" in no_key.stderr
    nobody = run_status("--url", f"http://127.0.0.1:{free_port()}", "--api-key", "x")
    assert nobody.returncode == 7 and "cannot reach" in nobody.stderr and not nobody.stdout


def test_status_devices_json_is_a_devices_file_plan_takes(live: LiveCluster, tmp_path: Path) -> None:
    done = run_status("--url", live.url, "--api-key", live.api_key, "--devices-json")
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    from placement.io import devices_from_json

    devices, _ = devices_from_json(document)
    workers = {w["id"]: w for w in live.cluster()["workers"]}
    assert {d.device_id for d in devices} == set(workers)
    for device in devices:
        assert device.memory_bytes == workers[device.device_id]["memory_bytes"]
        assert device.flops_per_s and device.memory_bandwidth_bytes_per_s
