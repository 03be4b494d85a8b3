"""Attacks on a live cluster, each refused or contained: the clients' outputs stay identical.

One scheduler engine runs in a thread of the test process (its own event loop); its two workers are
real processes (api/local_workers) speaking CurveZMQ on loopback. The attacker is the test: raw
ZeroMQ sockets sending the project's own messages, as an outsider (no key, a wrong token), as a
token holder (the join key, the scheduler's derived key), and as a member (a worker's own key, which
the test knows because LocalWorkers hands each worker its key).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

from api.local_workers import LocalWorkers
from scheduler.engine import Engine, EngineConfig
from scheduler.request import GenerationRequest
from scheduler.snapshots import health_snapshot
from scheduler.tokenizer import Tokenizer
from tests.support.checkpoints import make_checkpoint
from tests.support.loopback_capture import CaptureUnavailable, LoopbackCapture, tcp_streams, zmtp_mechanism
from workers import codec, curve
from workers import protocol as p
from workers.model_facts import read_model_facts

pytestmark = pytest.mark.slow

PROMPTS = [tuple(range(3 + i, 3 + i + length)) for i, length in enumerate((3, 9, 5, 14))]
NEW_TOKENS = 24


class LiveEngine:
    """The engine on an event loop of its own thread, 2 local worker processes, helpers to call in."""

    def __init__(self, model_dir: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        config = EngineConfig(str(model_dir), read_model_facts(model_dir), "m", min_workers=2, heartbeat_timeout_s=3.0,
                              placement="pipeline")
        self.engine = Engine(config, Tokenizer.from_model_dir(model_dir))
        self.call(self.engine.start())
        self.workers = LocalWorkers(self.engine.control_address, 2, threads_per_worker=1, token=self.engine.token,
                                    extra_args=["--step-delay-s", "0.01"])
        self.workers.start()
        self.context = zmq.Context()

    def call(self, coroutine: Any, timeout_s: float = 180.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout_s)

    def on_loop(self, function: Callable[[], Any]) -> Any:
        async def run() -> Any:
            return function()

        return self.call(run())

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 180
        while not self.on_loop(lambda: len(self.engine.cluster.workers) == 2 and bool(self.engine.cluster.usable_routes())):
            assert time.monotonic() < deadline, "the cluster never became ready"
            time.sleep(0.1)

    async def _generate(self, index: int, prompt: tuple[int, ...]) -> tuple[int, ...]:
        sampling = p.SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True, seed=index, temperature=0.8)
        request = GenerationRequest(f"req-{index}-{time.monotonic_ns()}", prompt, sampling)
        return tuple([t async for output in self.engine.generate(request) for t in output.token_ids])

    def generate_all(self, during: Callable[[], None] | None = None) -> list[tuple[int, ...]]:
        """Every prompt at once; `during` runs (in the test thread) once the first tokens flow."""

        async def run() -> list[tuple[int, ...]]:
            return list(await asyncio.gather(*(self._generate(i, prompt) for i, prompt in enumerate(PROMPTS))))

        future = asyncio.run_coroutine_threadsafe(run(), self.loop)
        if during is not None:
            deadline = time.monotonic() + 60
            while self.engine.workload.tokens_generated == 0 or not self.engine.requests:
                assert time.monotonic() < deadline and not future.done()
                time.sleep(0.005)
            during()
        return future.result(180)

    # ------------------------------------------------------------------------- the attacker's sockets
    def worker(self, index: int) -> Any:
        return self.on_loop(lambda: self.engine.cluster.workers[f"local-{index}"])

    def push(self, address: str, keys: curve.KeyPair | None, server_key: str | None) -> zmq.Socket:
        sock = self.context.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 500)
        if keys is not None and server_key is not None:
            curve.make_client(sock, keys, server_key)
        sock.connect(address)
        return sock

    def send(self, address: str, messages: list[list[Any]], keys: curve.KeyPair | None, server_key: str | None) -> None:
        sock = self.push(address, keys, server_key)
        for frames in messages:
            sock.send_multipart(frames)
        time.sleep(0.5)
        sock.close()

    def to_scheduler(self, messages: list[p.Message], keys: curve.KeyPair | None) -> None:
        self.send(self.engine.control_address, [codec.encode(m) for m in messages], keys, self.engine.membership.keys.public_key)

    def to_worker(self, index: int, messages: list[list[Any]], keys: curve.KeyPair | None) -> None:
        self.send(self.worker(index).data_address, messages, keys, self.workers.keys[index].public_key)

    def alive(self) -> bool:
        return all(process.poll() is None for process in self.workers.processes)

    def stop(self) -> None:
        self.workers.stop()
        self.call(self.engine.stop(shutdown_workers=True))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.context.destroy(linger=0)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveEngine]:
    root = tmp_path_factory.mktemp("attacks")
    model_dir = make_checkpoint(root / "llama", "llama", num_hidden_layers=4)
    capture = LoopbackCapture(root / "loopback.pcap")
    try:  # loopback traffic from before the first connection (CI runs as root)
        capture.start()
        capture_error = ""
    except CaptureUnavailable as exc:
        capture_error = str(exc)
    live = LiveEngine(model_dir)
    live.capture, live.capture_error = capture, capture_error
    try:
        live.wait_ready()
        yield live
    finally:
        capture.stop()
        live.stop()


@pytest.fixture(scope="module")
def undisturbed(live: LiveEngine) -> list[tuple[int, ...]]:
    return live.generate_all()


def test_loopback_traffic_between_potluck_processes_is_curve_only(live: LiveEngine, undisturbed: list) -> None:
    if live.capture_error:
        pytest.skip(f"no loopback capture: {live.capture_error}")
    ports = {int(live.engine.control_address.rsplit(":", 1)[1])}
    ports |= {int(live.worker(i).data_address.rsplit(":", 1)[1]) for i in range(2)}
    streams = {key: data for key, data in tcp_streams(live.capture.stop()).items() if ports & set(key)}
    # scheduler -> 2 workers, 2 workers -> scheduler (register, heartbeats, outputs), stage to stage
    assert len(streams) >= 10, sorted(streams)
    mechanisms = {key: zmtp_mechanism(data) for key, data in streams.items()}
    assert set(mechanisms.values()) == {"CURVE"}, mechanisms
    for data in streams.values():  # and nothing of the protocol in clear text
        for word in (b"TokenOutputs", b"Register", b"StartRequest", b"Activations", b"Heartbeat", live.engine.token.encode()):
            assert word not in data


def test_a_rogue_worker_with_a_wrong_token_or_no_key_never_joins(live: LiveEngine, undisturbed: list) -> None:
    refused_before = live.engine.membership.gate.refused_count
    rogue = subprocess.Popen(
        [sys.executable, "-m", "workers", "--scheduler", live.engine.control_address, "--worker-id", "aaa-rogue",
         "--memory-bytes", str(64 << 30), "--threads", "1", "--no-profile"],
        env={**os.environ, curve.TOKEN_ENV: "ptk-not-the-cluster-token-at-all"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        null_register = p.Register("aab-rogue", "tcp://127.0.0.1:9", 64 << 30, "cpu")
        live.to_scheduler([null_register], keys=None)  # the NULL mechanism: no key at all
        stranger = curve.KeyPair.generate()  # CURVE, but a key the gate does not know
        live.to_scheduler([p.Register("aac-rogue", "tcp://127.0.0.1:9", 64 << 30, "cpu", public_key=stranger.public_key)], stranger)
        outputs = live.generate_all()
        assert outputs == undisturbed
        time.sleep(1.0)
        assert set(live.on_loop(lambda: list(live.engine.cluster.workers))) == {"local-0", "local-1"}
        assert set(w["id"] for w in live.on_loop(live.engine.cluster_snapshot)["workers"]) == {"local-0", "local-1"}
        assert live.engine.membership.gate.refused_count > refused_before  # refused in the handshake
    finally:
        rogue.kill()
        rogue.wait()


def test_an_impostor_cannot_take_over_a_registered_worker_id(live: LiveEngine, undisturbed: list) -> None:
    token = live.engine.token
    impostor = curve.KeyPair.generate()
    bound = live.engine.membership.key_of["local-0"]
    register = p.Register("local-0", "tcp://127.0.0.1:9", 64 << 30, "cpu", public_key=impostor.public_key,
                          proof=curve.registration_proof(token, "local-0", impostor.public_key))
    forged_proof = p.Register("zzz-new", "tcp://127.0.0.1:9", 64 << 30, "cpu", public_key=impostor.public_key, proof="00" * 32)

    def attack() -> None:
        live.to_scheduler([register, forged_proof], curve.join_keys(token))

    assert live.generate_all(during=attack) == undisturbed
    assert live.engine.membership.key_of["local-0"] == bound
    assert live.worker(0).data_address != "tcp://127.0.0.1:9"
    assert "zzz-new" not in live.on_loop(lambda: list(live.engine.cluster.workers))


def test_forged_token_outputs_and_heartbeats_are_refused(live: LiveEngine, undisturbed: list) -> None:
    member = live.workers.keys[0]  # stage 0's own key: a member, but not the last stage of any route
    refused_before = live.engine.membership.refused_messages
    def attack() -> None:
        wire_ids = live.on_loop(lambda: list(live.engine.requests))
        forged = [p.TokenOutputs(worker, tuple(p.TokenOutput(w, i, 7) for w in wire_ids for i in range(NEW_TOKENS)))
                  for worker in ("local-0", "local-1")]
        spoofed_heartbeats = [p.Heartbeat("local-1", 0, 0, 0, 0, 0, 9.9, 0)] * 50
        live.to_scheduler(forged + spoofed_heartbeats + [p.LayersReady("local-1", 99, 0, 1, error="spoofed")], member)
        live.to_scheduler(forged, curve.KeyPair.generate())  # and from a stranger

    assert live.generate_all(during=attack) == undisturbed
    assert live.engine.membership.refused_messages >= refused_before + 53  # read, checked, refused
    assert live.on_loop(lambda: all(w.is_ready for w in live.engine.cluster.workers.values()))


def test_killer_frames_from_a_member_or_the_scheduler_key_do_not_crash_a_worker(live: LiveEngine, undisturbed: list) -> None:
    scheduler = curve.scheduler_keys(live.engine.token)  # a token holder can speak as the scheduler
    member = live.workers.keys[0]
    first, last = live.worker(0).data_address, live.worker(1).data_address
    start = p.RequestStart((first, last), live.engine.control_address, p.SamplingParams(max_new_tokens=4))
    bad = lambda **changes: p.RequestStart(start.route, start.scheduler_address, p.SamplingParams(**{"max_new_tokens": 4, **changes}))  # noqa: E731
    killers = [
        codec.encode(p.StartRequest("k1", (5, 400000), start)),  # outside the vocabulary
        codec.encode(p.StartRequest("k2", (-3, 5), start)),
        codec.encode(p.StartRequest("k3", (5, 6), bad(num_top_logprobs=-1))),
        codec.encode(p.StartRequest("k4", (5, 6), bad(top_p=float("nan")))),
        codec.encode(p.StartRequest("k5", (5, 6), bad(max_new_tokens=0))),
        codec.encode(p.StartRequest("k6", (), start)),
        codec.encode(p.StartRequest("k7", (5, 6), p.RequestStart(("tcp://127.0.0.1:9",), start.scheduler_address, start.sampling))),
        [b"\xc1\xc1 not msgpack"],
        [msgpack.packb(["StartRequest", {"request_id": 5}])],
        codec.encode(p.AssignLayers(0, "/no/such/model", 0, 2)),  # a bad assignment: the old layers stay
    ]
    member_frames = [
        codec.encode(p.UnloadLayers(99)),
        codec.encode(p.AssignLayers(99, "/no/such/model", 0, 4)),
        codec.encode(p.StartRequest("m1", (5, 6), start)),
        codec.encode(p.Shutdown("spoofed")),
    ]
    activations = p.Activations((p.ActivationEntry("x", 0, 3, start),), p.TensorPayload("int64", (3, 64), bytes(3 * 64 * 8)))
    wrong_rows = p.Activations((p.ActivationEntry("y", 0, 2, start),), p.TensorPayload("float32", (3, 64), bytes(3 * 64 * 4)))

    def attack() -> None:
        live.to_worker(0, killers, scheduler)
        live.to_worker(0, member_frames, member)
        live.to_worker(1, member_frames + [codec.encode(activations), codec.encode(wrong_rows)], member)
        live.to_worker(1, [codec.encode(p.NextTokens((p.NextToken("z", 10**9, 0),)))], member)

    assert live.generate_all(during=attack) == undisturbed
    assert live.alive()
    assert live.generate_all() == undisturbed  # and still serving the same placement


def test_ghost_requests_sent_straight_to_stage_0_are_released(live: LiveEngine, undisturbed: list) -> None:
    scheduler = curve.scheduler_keys(live.engine.token)
    first, last = live.worker(0).data_address, live.worker(1).data_address
    start = p.RequestStart((first, last), live.engine.control_address, p.SamplingParams(max_new_tokens=1000, ignore_eos=True))
    ghosts = [codec.encode(p.StartRequest(f"ghost-{i}", tuple(range(5, 200)), start)) for i in range(30)]
    live.to_worker(0, ghosts, scheduler)
    deadline = time.monotonic() + 10  # released within seconds, on every stage
    while True:
        held = live.on_loop(lambda: [w.heartbeat.running_requests for w in live.engine.cluster.workers.values() if w.heartbeat])
        if held and not any(held):
            break
        assert time.monotonic() < deadline, held
        time.sleep(0.2)
    assert live.generate_all() == undisturbed


def test_a_killed_local_worker_is_started_again_and_rejoins(live: LiveEngine, undisturbed: list) -> None:
    old_pid = live.workers.processes[1].pid
    live.workers.processes[1].kill()
    live.workers.processes[1].wait()
    deadline = time.monotonic() + 30  # lost after the heartbeat timeout: /health says degraded
    while (health := live.on_loop(lambda: health_snapshot(live.engine)))["registered_workers"] != 1:
        assert time.monotonic() < deadline, health
        time.sleep(0.1)
    assert health["status"] == "degraded" and health["serving_workers"] <= 1
    assert live.workers.restart_exited() == [1]
    assert live.workers.processes[1].pid != old_pid
    deadline = time.monotonic() + 120
    def rejoined() -> bool:
        worker = live.engine.cluster.workers.get("local-1")
        return worker is not None and worker.pid != old_pid and worker.is_ready and len(live.engine.cluster.usable_routes()) == 1

    while not live.on_loop(rejoined):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert live.generate_all() == undisturbed
    assert live.on_loop(lambda: health_snapshot(live.engine)) == {"status": "ok", "serving_workers": 2, "registered_workers": 2}


def test_a_client_request_a_worker_would_refuse_is_a_clear_400_and_a_full_range_seed_runs(live: LiveEngine) -> None:
    from scheduler.errors import InvalidRequestError

    async def run(prompt: tuple[int, ...], **sampling: Any) -> tuple[int, ...]:
        params = p.SamplingParams(max_new_tokens=4, ignore_eos=True, **sampling)
        request = GenerationRequest(f"client-{time.monotonic_ns()}", prompt, params)
        return tuple([t async for output in live.engine.generate(request) for t in output.token_ids])

    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        live.call(run((5, 10**6)))
    with pytest.raises(InvalidRequestError, match="num_top_logprobs"):
        live.call(run((5, 6), num_top_logprobs=-1))
    assert len(live.call(run((5, 6), seed=-(2**63), temperature=1.0))) == 4  # OpenAI's seed range: served
