"""workers/curve.py on real ZeroMQ sockets: who gets through the handshake, and who sent what."""

from __future__ import annotations

import time

import pytest
import zmq

from workers import curve
from workers.peer_probe import EchoResponder, probe_peer


@pytest.fixture
def gated() -> tuple[zmq.Context, curve.Gate, curve.KeyPair]:
    context = zmq.Context()
    gate = curve.Gate(context, "test")
    gate.start()
    yield context, gate, curve.KeyPair.generate()
    gate.stop()
    context.destroy(linger=0)


def _received(pull: zmq.Socket, timeout_s: float) -> list[tuple[bytes, str | None]]:
    got = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pull.poll(50):
            frame = pull.recv(copy=False)
            got.append((frame.bytes, curve.peer_key(frame)))
    return got


def test_tokens_and_keys() -> None:
    token = curve.new_token()
    assert curve.check_token(f"  {token} ") == token
    for bad in ("", None, "short", "x" * 15, "bad\x1btoken-0123456789"):
        with pytest.raises(ValueError):
            curve.check_token(bad)
    assert curve.scheduler_keys(token) == curve.scheduler_keys(token) != curve.scheduler_keys(curve.new_token())
    assert curve.join_keys(token).public_key != curve.scheduler_keys(token).public_key
    keys = curve.KeyPair.generate()
    assert curve.KeyPair.from_secret(keys.secret_key) == keys
    proof = curve.registration_proof(token, "w1", keys.public_key)
    assert curve.proof_is_valid(token, "w1", keys.public_key, proof)
    assert not curve.proof_is_valid(token, "w2", keys.public_key, proof)
    assert not curve.proof_is_valid(curve.new_token(), "w1", keys.public_key, proof)


def test_only_admitted_keys_get_through_and_each_message_names_its_sender(gated) -> None:
    context, gate, server = gated
    pull = context.socket(zmq.PULL)
    curve.make_server(pull, server)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    member, stranger = curve.KeyPair.generate(), curve.KeyPair.generate()
    gate.admit(member.public_key)
    senders = []
    for keys, label in ((None, b"null"), (stranger, b"stranger"), (member, b"member")):
        push = context.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        if keys is not None:
            curve.make_client(push, keys, server.public_key)
        push.connect(f"tcp://127.0.0.1:{port}")
        push.send(label)
        senders.append(push)
    assert _received(pull, 1.5) == [(b"member", member.public_key)]
    assert gate.refused_count >= 1  # the stranger (the NULL one fails before ZAP: mechanism mismatch)
    for push in senders:
        push.close()
    pull.close()


def test_a_curve_server_without_a_gate_refuses_everyone() -> None:
    context = zmq.Context()
    try:
        server, client = curve.KeyPair.generate(), curve.KeyPair.generate()
        pull = context.socket(zmq.PULL)
        curve.make_server(pull, server)
        port = pull.bind_to_random_port("tcp://127.0.0.1")
        push = context.socket(zmq.PUSH)
        curve.make_client(push, client, server.public_key)
        push.connect(f"tcp://127.0.0.1:{port}")
        push.send(b"hello")
        assert _received(pull, 1.0) == []
    finally:
        context.destroy(linger=0)


def test_peer_probe_over_curve(gated) -> None:
    context, gate, server = gated
    member, stranger = curve.KeyPair.generate(), curve.KeyPair.generate()
    gate.admit(member.public_key)
    with EchoResponder(context=context, keys=server) as echo:
        rtt_s, bandwidth = probe_peer(echo.address, 1 << 16, keys=member, server_public_key=server.public_key)
        assert rtt_s > 0 and bandwidth > 0
        with pytest.raises(TimeoutError):
            probe_peer(echo.address, 1024, timeout_s=0.5, keys=stranger, server_public_key=server.public_key)
