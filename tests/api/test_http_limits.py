"""The HTTP server is bounded: a connection flood, a huge prompt, a stalled body, SIGTERM, /health.

One real `potluck serve` (2 local workers) with small limits: at most 40 connections, 1 MiB bodies,
2 s to send a request head. Streams run while the attack does; their output must equal the
undisturbed run.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from tests.support.checkpoints import make_checkpoint
from tests.support.served import ServedModel

pytestmark = pytest.mark.slow

MAX_CONNECTIONS = 40
MAX_BODY_BYTES = 1 << 20
HEADER_TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServedModel, str]]:
    root = tmp_path_factory.mktemp("http-limits")
    model_dir = make_checkpoint(root / "llama", "llama", num_hidden_layers=4, max_position_embeddings=4096)
    args = ["--max-connections", str(MAX_CONNECTIONS), "--max-request-bytes", str(MAX_BODY_BYTES),
            "--http-header-timeout-s", str(HEADER_TIMEOUT_S), "--http-body-timeout-s", "2", "--no-profile"]
    server = ServedModel(model_dir, 2, args, log_path=root / "serve.log")
    try:
        server.wait_ready(model_dir.name, timeout_s=180)
        yield server, model_dir.name
    finally:
        server.stop()


def complete(served: tuple[ServedModel, str], prompt: str, max_tokens: int = 160) -> str:
    server, model = served
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.7, "seed": 3, "ignore_eos": True}
    response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def run_during(served: tuple[ServedModel, str], attack) -> list[str]:
    """Three completions in threads, `attack()` once all three are running; their texts."""
    texts: list[str] = [""] * 3

    def one(index: int) -> None:
        texts[index] = complete(served, f"prompt number {index} says")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60  # the attack comes once the three stream
    while httpx.get(f"{served[0].url}/cluster", timeout=10).json()["running_requests"] < 3:
        if not any(thread.is_alive() for thread in threads):
            break  # a fast machine finished them first: the attack still must not change them
        assert time.monotonic() < deadline
        time.sleep(0.02)
    attack()
    for thread in threads:
        thread.join(timeout=180)
    return texts


@pytest.fixture(scope="module")
def undisturbed(served: tuple[ServedModel, str]) -> list[str]:
    return run_during(served, lambda: None)


def test_health_reports_the_serving_workers(served: tuple[ServedModel, str]) -> None:
    body = httpx.get(f"{served[0].url}/health", timeout=10).json()
    assert body == {"status": "ok", "serving_workers": 2, "registered_workers": 2}


def test_a_connection_flood_is_bounded_and_idle_connections_are_closed(served: tuple[ServedModel, str], undisturbed: list[str]) -> None:
    server, _ = served
    sockets: list[socket.socket] = []

    def flood() -> None:
        for _ in range(300):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # a request head never finished
            sockets.append(sock)

    try:
        assert run_during(served, flood) == undisturbed
        serve_process = psutil.Process(server.process.pid)
        held = [c for c in serve_process.net_connections(kind="tcp") if c.laddr.port == server.port and c.status == "ESTABLISHED"]
        assert len(held) <= MAX_CONNECTIONS + 5  # the rest were closed at once
        # the ones let in are closed once they sent no whole request head within the timeout
        deadline = time.monotonic() + 4 * HEADER_TIMEOUT_S + 5
        closed = 0
        for sock in sockets:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                data = sock.recv(4096)
            except ConnectionResetError:
                data = b""
            except TimeoutError:
                continue  # still open: counted as not closed
            closed += data == b"" or data.startswith(b"HTTP/1.1 503")
        assert closed == len(sockets)
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    finally:
        for sock in sockets:
            sock.close()


def test_a_huge_prompt_gets_a_clear_413_and_others_stream_on(served: tuple[ServedModel, str], undisturbed: list[str]) -> None:
    server, model = served
    responses: list[httpx.Response] = []

    def huge() -> None:
        body = {"model": model, "prompt": "x" * (16 << 20), "max_tokens": 1}
        responses.append(httpx.post(f"{server.url}/v1/completions", json=body, timeout=60))

    assert run_during(served, huge) == undisturbed
    (response,) = responses
    assert response.status_code == 413
    assert "at most 1048576 bytes" in response.json()["error"]["message"]


def test_a_prompt_under_the_limit_is_tokenised_without_stalling_other_streams(served: tuple[ServedModel, str], undisturbed: list[str]) -> None:
    server, model = served

    def long_prompt() -> None:
        body = {"model": model, "prompt": "hello world " * 80000, "max_tokens": 1}  # ~0.9 MiB of text
        response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)
        assert response.status_code == 400  # longer than the context: a clear error, after tokenising

    assert run_during(served, long_prompt) == undisturbed


def test_a_stalled_body_gets_408(served: tuple[ServedModel, str]) -> None:
    server, _ = served
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
        reply = sock.recv(4096)
    assert reply.startswith(b"HTTP/1.1 408"), reply[:100]


def test_sigterm_stops_serve_and_its_workers(tmp_path: Path) -> None:
    model_dir = make_checkpoint(tmp_path / "llama", "llama", num_hidden_layers=2)
    server = ServedModel(model_dir, 1, ["--no-profile"], log_path=tmp_path / "serve.log")
    try:
        server.wait_ready(model_dir.name, timeout_s=180)
        children = psutil.Process(server.process.pid).children(recursive=True)
        assert children
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=30) is not None
        _, alive = psutil.wait_procs(children, timeout=15)
        assert not alive, "workers left running after SIGTERM"
    finally:
        server.stop()
