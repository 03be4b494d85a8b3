"""Joiners without the model receive exactly their layers; a joiner that cannot load never stops serving.

Real processes on 127.0.0.1: `potluck serve` with no local worker, workers joined with
`python -m api.cli join`. A fetching joiner runs in an empty working directory with
`--fetch-layers` (it never opens the model path) and its own `--layer-cache`; what it received is
read from its log line `fetched layers [s, e): received N pieces, B bytes (T tensor bytes ...)`.
Placement is the one-host pipeline (layers proportional to `--memory-bytes`, stages in id order),
so each plan here is known in advance.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.gguf_checkpoints import write_gguf
from tests.support.checkpoints import make_checkpoint
from tests.support.served import ServedModel, free_port
from workers.checkpoint import layer_parameter_bytes
from workers.gguf_file import open_gguf

pytestmark = pytest.mark.slow

TOKEN = "ptk-test-delivery-token-0123456789"
REPO = Path(__file__).resolve().parents[2]
GIB = 2**30
FETCHED = re.compile(r"fetched layers \[(\d+), (\d+)\): received (\d+) pieces, (\d+) bytes \((\d+) tensor bytes "
                     r"of the stage's (\d+)\), (\d+) from the cache, (\d+) corrupt")


class Joiner:
    """`potluck join` as a subprocess in its own (empty) working directory, logging at INFO."""

    def __init__(self, tmp_path: Path, port: int, worker_id: str, memory_bytes: int, *extra: str) -> None:
        box = tmp_path / f"box-{worker_id}"
        box.mkdir(exist_ok=True)
        self.log_path = box / "join.log"
        command = [sys.executable, "-m", "api.cli", "--log-level", "info", "join", "--scheduler", f"127.0.0.1:{port}",
                   "--host", "127.0.0.1", "--worker-id", worker_id, "--no-profile", "--threads", "1",
                   "--memory-bytes", str(memory_bytes), *extra]
        env = {**os.environ, "PYTHONPATH": str(REPO), "POTLUCK_TOKEN": TOKEN}
        self.log = open(self.log_path, "a")
        self.process = subprocess.Popen(command, cwd=box, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def fetches(self) -> list[tuple[int, ...]]:
        return [tuple(int(x) for x in m.groups()) for m in FETCHED.finditer(self.log_path.read_text())]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


def _cluster(url: str) -> dict[str, dict]:
    return {w["id"]: w for w in httpx.get(f"{url}/cluster", timeout=10).json()["workers"]}


def _wait_for(url: str, ready: dict[str, tuple[int, int]], timeout_s: float = 90.0) -> dict[str, dict]:
    """Until exactly these workers serve these layers (others may be registered, holding none)."""
    deadline = time.monotonic() + timeout_s
    while True:
        workers = _cluster(url)
        if all(w in workers and workers[w]["state"] == "ready" and tuple(workers[w]["loaded_layers"] or ()) == r
               for w, r in ready.items()):
            return workers
        assert time.monotonic() < deadline, workers
        time.sleep(0.2)


def _complete(url: str, model: str) -> str:
    body = {"model": model, "prompt": [5, 6, 7, 8], "max_tokens": 4, "temperature": 0}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def _serve(model: Path, tmp_path: Path) -> tuple[ServedModel, int]:
    port = free_port()
    args = ["--scheduler-port", str(port), "--no-profile", "--token", TOKEN, "--heartbeat-timeout-s", "2",
            "--max-model-len", "128"]
    return ServedModel(model, 0, args, log_path=tmp_path / "serve.log"), port


def test_joiners_receive_only_their_layers_and_a_replan_fetches_only_what_moved(tmp_path: Path) -> None:
    model = make_checkpoint(tmp_path / "llama", "llama", num_hidden_layers=8, hidden_size=128, intermediate_size=384)
    sizes = layer_parameter_bytes(model)
    served, port = _serve(model, tmp_path)
    joiners: list[Joiner] = []
    with served:
        try:
            joiners.append(Joiner(tmp_path, port, "a-full", 1 * GIB))
            served.wait_ready(model.name)
            expected = _complete(served.url, model.name)
            joiners.append(Joiner(tmp_path, port, "b-mid", 2 * GIB))  # has the model path: loads it
            _wait_for(served.url, {"a-full": (0, 3), "b-mid": (3, 8)})
            cache = tmp_path / "cache-c"
            fetcher = Joiner(tmp_path, port, "c-fetch", 1 * GIB, "--fetch-layers", "--layer-cache", str(cache))
            joiners.append(fetcher)
            _wait_for(served.url, {"a-full": (0, 2), "b-mid": (2, 6), "c-fetch": (6, 8)})
            assert _complete(served.url, model.name) == expected
            (start, end, pieces, received, tensor, stage, cached, corrupt) = fetcher.fetches()[0]  # the prefetch
            assert (start, end, cached, corrupt) == (6, 8, 0, 0)
            layers_bytes = sizes.stage_bytes(6, 8)  # layers 6, 7, the final norm and the LM head
            assert tensor == stage == layers_bytes
            assert layers_bytes <= received <= 1.05 * layers_bytes  # the rest: headers, config, tokenizer
            assert received < 0.5 * sum(sizes.layer_bytes)

            joiners[1].stop()  # b-mid leaves: a-full [0, 4), c-fetch [4, 8): layers 4 and 5 move to c-fetch
            _wait_for(served.url, {"a-full": (0, 4), "c-fetch": (4, 8)})
            assert _complete(served.url, model.name) == expected
            second = next(f for f in fetcher.fetches() if f[:2] == (4, 8))
            assert second[4] == sizes.layer_bytes[4] + sizes.layer_bytes[5]  # only the two layers that moved
            assert second[6] > 0 and second[7] == 0  # the rest came from the cache
        finally:
            for joiner in reversed(joiners):
                joiner.stop()


def test_a_corrupt_cached_piece_is_found_and_fetched_again_gguf(tmp_path: Path) -> None:
    source = make_checkpoint(tmp_path / "llama", "llama", num_hidden_layers=4, hidden_size=128, intermediate_size=384)
    gguf_path = write_gguf(source, tmp_path / "tiny-q8_0.gguf", "Q8_0")
    sizes = open_gguf(str(gguf_path.resolve())).layer_sizes()
    served, port = _serve(gguf_path, tmp_path)
    joiners: list[Joiner] = []
    cache = tmp_path / "cache-b"
    with served:
        try:
            joiners.append(Joiner(tmp_path, port, "a-full", 1 * GIB))
            served.wait_ready(gguf_path.stem)
            expected = _complete(served.url, gguf_path.stem)
            fetcher = Joiner(tmp_path, port, "b-fetch", 1 * GIB, "--fetch-layers", "--layer-cache", str(cache))
            joiners.append(fetcher)
            _wait_for(served.url, {"a-full": (0, 2), "b-fetch": (2, 4)})
            assert _complete(served.url, gguf_path.stem) == expected
            (start, end, pieces, received, tensor, stage, cached, corrupt) = fetcher.fetches()[0]
            assert (start, end) == (2, 4) and tensor == stage == sizes.stage_bytes(2, 4)  # quantized bytes as stored
            assert stage <= received <= 1.05 * stage
            fetcher.stop()
            _wait_for(served.url, {"a-full": (0, 4)})

            blob = max((cache / "blobs").iterdir(), key=lambda p: p.stat().st_size)  # a tensor piece
            data = bytearray(blob.read_bytes())
            data[len(data) // 2] ^= 0xFF
            blob.write_bytes(bytes(data))
            before = len(fetcher.fetches())
            again = Joiner(tmp_path, port, "b-fetch", 1 * GIB, "--fetch-layers", "--layer-cache", str(cache))
            joiners.append(again)
            _wait_for(served.url, {"a-full": (0, 2), "b-fetch": (2, 4)})
            assert _complete(served.url, gguf_path.stem) == expected
            second = again.fetches()[before]
            assert second[7] == 1  # found corrupt on disk
            assert second[2] == 1 and second[4] == len(data)  # that one piece fetched again, nothing else
        finally:
            for joiner in reversed(joiners):
                joiner.stop()


def test_a_joiner_that_cannot_load_never_stops_the_cluster_serving(tmp_path: Path) -> None:
    model = make_checkpoint(tmp_path / "llama", "llama", num_hidden_layers=4)
    served, port = _serve(model, tmp_path)
    joiners: list[Joiner] = []
    statuses: list[int] = []
    stop = threading.Event()

    def load() -> None:  # requests throughout: before, while and after the broken joiner comes
        body = {"model": model.name, "prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0}
        while not stop.is_set():
            statuses.append(httpx.post(f"{served.url}/v1/completions", json=body, timeout=120).status_code)

    with served:
        try:
            joiners.append(Joiner(tmp_path, port, "a-full", 1 * GIB))
            served.wait_ready(model.name)
            thread = threading.Thread(target=load)
            thread.start()
            time.sleep(1.0)
            blocker = tmp_path / "not-a-directory"
            blocker.write_text("the cache cannot live under a file\n")
            joiners.append(Joiner(tmp_path, port, "b-broken", 1 * GIB, "--fetch-layers", "--layer-cache", str(blocker / "cache")))
            deadline = time.monotonic() + 60
            while (w := _cluster(served.url)).get("b-broken", {}).get("state") != "error":
                assert time.monotonic() < deadline, w
                time.sleep(0.2)
            workers = _wait_for(served.url, {"a-full": (0, 4)})
            assert "not-a-directory" in workers["b-broken"]["error"] and workers["b-broken"]["loaded_layers"] is None
            time.sleep(1.0)
            stop.set()
            thread.join(timeout=120)
            assert len(statuses) >= 3 and set(statuses) == {200}, statuses
            # the plan that would have used b-broken was held while it fetched, then dropped: a-full
            # was never reassigned, so no request had to start again on another route
            metrics = httpx.get(f"{served.url}/metrics", timeout=10).text
            restarts = [line for line in metrics.splitlines() if line.startswith("potluck:request_restarts_total")]
            assert all(float(line.rsplit(" ", 1)[1]) == 0 for line in restarts), restarts
            assert "b-broken cannot fetch layers" in (tmp_path / "serve.log").read_text()  # the reason, logged
        finally:
            stop.set()
            for joiner in reversed(joiners):
                joiner.stop()
