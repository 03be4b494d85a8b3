"""The dashboard page in headless Chromium against a live cluster: every device and its layer range.

Parts: the rendered DOM (after the page's JS has fetched /cluster) lists every worker with its
range, drawn as a bar at the right place along the model's layers; a screenshot is saved to the
test's tmp dir; without the API key the page asks for it instead of drawing.
Chromium is Debian's `chromium` package (CI installs it); without it these tests fail, not skip.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from live_cluster import LiveCluster, shared_cluster

pytestmark = pytest.mark.slow  # a live cluster and headless Chromium


@pytest.fixture(scope="module")
def live(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> LiveCluster:
    return shared_cluster(request.config, tmp_path_factory)


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.fail("headless Chromium is needed for the dashboard test: `apt-get install -y chromium` (CI's .ci/run does)")
    command = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
               f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=5000", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def js_number(x: float) -> str:
    """How JavaScript prints a number: 50 not 50.0, else the shortest round-trip digits (as repr)."""
    return str(int(x)) if x.is_integer() else repr(x)


def test_dashboard_shows_every_device_and_its_layer_range(live: LiveCluster, tmp_path: Path) -> None:
    cluster = live.cluster()
    url = f"{live.url}/dashboard#key={live.api_key}"
    dom = chromium(tmp_path, "--dump-dom", url).stdout
    drawn = {m["id"]: (int(m["start"]), int(m["end"]))
             for m in re.finditer(r'<div class="device" data-worker="(?P<id>[^"$]+)" data-start="(?P<start>\d+)" '
                                  r'data-end="(?P<end>\d+)">', dom)}
    expected = {w["id"]: tuple(w["loaded_layers"]) for w in cluster["workers"]}
    assert drawn == expected, dom[-3000:]
    num_layers = cluster["model"]["num_layers"]
    for start, end in expected.values():
        # The bar sits at start/L and spans (end-start)/L of the track, labelled with the range.
        left, width = js_number(100 * start / num_layers), js_number(100 * (end - start) / num_layers)
        bar = re.search(rf'<div class="range" style="left:{left}%;width:{width}%;'
                        rf'background:[^"]+"><span class="range-text">\[{start}, {end}\)</span>', dom)
        assert bar is not None, (start, end)
    assert f'<span id="model">{live.model}</span>' in dom
    for route in cluster["plan"]["pipelines"]:
        for wid in route:
            assert re.search(rf'<span class="chip"[^>]*>{re.escape(wid)} \[', dom), wid
    assert '<div id="error"></div>' in dom  # no fetch failed

    shot = tmp_path / "dashboard.png"
    chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,800", url)
    assert shot.is_file() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 20_000, shot.stat().st_size  # a drawn page, not a blank one


def test_dashboard_without_the_key_asks_for_it(live: LiveCluster, tmp_path: Path) -> None:
    dom = chromium(tmp_path, "--dump-dom", f"{live.url}/dashboard").stdout
    assert "this server needs an API key" in dom
    assert 'id="keyform" style="display: flex;"' in dom
    assert '<div id="devices"></div>' in dom  # nothing drawn without the key


def test_dashboard_plots_tokens_per_s_ttft_and_kv_over_the_last_minutes(live: LiveCluster, tmp_path: Path) -> None:
    import time

    live.complete("plot this", 8)
    deadline = time.monotonic() + 60
    while True:  # a sample (every 2 s) that saw the request's first token
        history = live.http.get("/cluster/history").json()
        if any(row[2] is not None for row in history["samples"]):
            break
        assert time.monotonic() < deadline, history
        time.sleep(0.5)
    assert history["columns"] == ["at_unix_s", "tokens_per_s", "ttft_s", "kv_used"]
    assert any(row[1] > 0 for row in history["samples"]) and all(0 <= row[3] <= 1 for row in history["samples"])
    dom = chromium(tmp_path, "--dump-dom", f"{live.url}/dashboard#key={live.api_key}").stdout
    charts = {m["series"]: int(m["points"]) for m in re.finditer(r'<div class="chart" data-series="(?P<series>[^"]+)" data-points="(?P<points>\d+)">', dom)}
    assert set(charts) == {"tokens/s", "time to first token", "KV cache used"}, dom[-3000:]
    assert charts["tokens/s"] >= 2 and charts["KV cache used"] >= 2 and charts["time to first token"] >= 1, charts
    lines = re.findall(r'<polyline points="([^"]*)"', dom.split("<script>")[0])  # not the page's own JS
    assert len(lines) == 3 and all(len(points.split()) >= 1 for points in lines), lines
    predicted = live.cluster()["plan"]["predicted_tokens_per_s"]
    assert predicted and predicted > 0  # one machine's pipeline: its stages' times add up
    assert re.search(rf'<b id="predicted-tps">{predicted:.1f}</b>', dom), dom[:3000]
