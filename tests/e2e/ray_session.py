"""One `potluck serve --ray local` session, run by tests/e2e/test_ray_launcher.py inside a network
namespace that has only a loopback interface (Ray binds every interface it finds; there it finds
127.0.0.1 alone).

    python -m tests.e2e.ray_session MODEL_DIR PROMPT_IDS_JSON REFERENCE_IDS_JSON

Serves with two worker actors on the Ray node potluck starts, asks for a greedy completion, then
adds a second Ray node (`ray start --address=...`, as a second machine would), waits for potluck to
start two workers there and take them into a new plan, asks again, kills one worker process
(SIGKILL) and waits for its actor to start it again and the scheduler to take it back, asks a
third time, and stops everything.
Prints one JSON line: both completions (text, token log-probabilities), the reference token ids
detokenized by the server, the workers and plan epochs the cluster endpoint listed, and the
processes left alive after Ctrl-C and `ray stop` (there should be none).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

from tests.support.served import ServedModel

JOIN_TIMEOUT_S = 120.0
RAY_CLI = str(Path(sys.executable).with_name("ray"))  # the `ray` command of this Python's install


def complete(url: str, model: str, prompt_ids: list[int], max_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt_ids, "max_tokens": max_tokens, "temperature": 0, "logprobs": 1}
    choice = httpx.post(f"{url}/v1/completions", json=body, timeout=120).json()["choices"][0]
    return {"text": choice["text"], "token_logprobs": choice["logprobs"]["token_logprobs"]}


def workers(cluster: dict) -> list[dict]:
    return [{"id": w["id"], "address": w["address"], "state": w["state"], "layers": w["loaded_layers"]} for w in cluster["workers"]]


def gcs_address(log_path: Path) -> str:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        found = re.search(r"ray start --address=(\S+?)`", log_path.read_text())
        if found:
            return found.group(1)
        time.sleep(0.2)
    raise TimeoutError("potluck serve printed no Ray address")


def main() -> None:
    model_dir, prompt_ids, reference_ids = Path(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3])
    log_path = model_dir.parent / "ray-serve.log"
    served = ServedModel(model_dir, 0, ["--ray", "local", "--ray-workers-per-node", "2", "--no-profile"], log_path=log_path)
    result: dict = {}
    joined_raylets: list[psutil.Process] = []
    try:
        served.wait_ready(model_dir.name, timeout_s=180)
        model = model_dir.name
        result["before"] = complete(served.url, model, prompt_ids, len(reference_ids))
        detok = httpx.post(f"{served.url}/detokenize", json={"model": model, "tokens": reference_ids}, timeout=30)
        result["reference_text"] = detok.json()["prompt"]
        cluster = httpx.get(f"{served.url}/cluster", timeout=30).json()
        result["workers_before"], result["epoch_before"] = workers(cluster), cluster["epoch"]
        result["descendants"] = [p.name() for p in served.children if p.is_running()]

        address = gcs_address(log_path)
        known = {p.pid for p in psutil.process_iter()}
        start = [RAY_CLI, "start", "--address", address, "--num-cpus", "1", "--object-store-memory", str(100 * 2**20),
                 "--disable-usage-stats"]  # fmt: skip
        # the Ray that potluck started uses token authentication (its token is in ~/.ray/auth_token)
        started = subprocess.run(start, capture_output=True, text=True, timeout=60, env={**os.environ, "RAY_AUTH_MODE": "token"})
        if started.returncode:
            raise RuntimeError(f"ray start failed: {started.stdout[-1500:]} {started.stderr[-1500:]}")
        joined_raylets = [p for p in psutil.process_iter(["name"]) if p.pid not in known and p.info["name"] == "raylet"]
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        while True:
            cluster = httpx.get(f"{served.url}/cluster", timeout=30).json()
            now = workers(cluster)
            if len(now) == 4 and all(w["state"] == "ready" for w in now):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"the second Ray node's workers were not taken in: {now}")
            time.sleep(0.3)
        result["workers_after"], result["epoch_after"] = now, cluster["epoch"]
        result["after"] = complete(served.url, model, prompt_ids, len(reference_ids))

        # kill -9 one worker process: its actor starts it again, it registers under its id
        victim = next(w for w in cluster["workers"] if w["id"].endswith("-0"))
        os.kill(victim["pid"], signal.SIGKILL)
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        while True:
            cluster = httpx.get(f"{served.url}/cluster", timeout=30).json()
            back = {w["id"]: w for w in cluster["workers"]}
            if (victim["id"] in back and back[victim["id"]]["pid"] != victim["pid"]
                    and len(back) == 4 and all(w["state"] == "ready" for w in back.values())):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{victim['id']} did not come back: {workers(cluster)}")
            time.sleep(0.3)
        result["revived"] = {"id": victim["id"], "old_pid": victim["pid"], "new_pid": back[victim["id"]]["pid"]}
        result["after_revival"] = complete(served.url, model, prompt_ids, len(reference_ids))
    finally:
        served.stop()
        subprocess.run([RAY_CLI, "stop", "--force"], capture_output=True, timeout=60)
    _, alive = psutil.wait_procs(joined_raylets, timeout=10)
    result["leftover"] = [p.pid for p in served.leftover] + [p.pid for p in alive]
    result["alive_after_stop"] = [p.pid for p in served.children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
