"""Registration attempts say why they fail, in one line per attempt, and back off (real ZeroMQ
sockets on loopback; the attempt's clock is passed in, so the timeouts are deterministic)."""

from __future__ import annotations

import socket
import time

import pytest
import zmq

from scheduler.membership import Membership
from workers import curve
from workers import protocol as p
from workers.join_attempts import CONNECT_TIMEOUT_S, MAX_BACKOFF_S, JoinAttempt, JoinAttempts, backoff_s


def _register() -> p.Register:
    return p.Register(worker_id="w", data_address="tcp://127.0.0.1:1", memory_bytes=1, device="cpu")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _settle(attempt: JoinAttempt, until: str, timeout_s: float = 10.0) -> str:
    """Poll the attempt (its clock at its start, so no timeout fires) until it failed or `until` happened."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        outcome = attempt.outcome(attempt.started_s)
        if outcome.failed or (until == "handshake" and attempt.handshake_s is not None):
            return outcome.reason
        time.sleep(0.01)
    return ""


@pytest.fixture
def context() -> zmq.Context:
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def test_backoff_doubles_and_is_capped() -> None:
    assert [backoff_s(n) for n in range(1, 8)] == [1, 2, 4, 8, MAX_BACKOFF_S, MAX_BACKOFF_S, MAX_BACKOFF_S]


def test_nothing_listening_is_reported_as_refused(context: zmq.Context) -> None:
    token = curve.new_token()
    attempt = JoinAttempt(context, f"tcp://127.0.0.1:{_free_port()}", curve.join_keys(token),
                          curve.scheduler_keys(token).public_key, _register(), time.monotonic())
    try:
        assert "connection refused" in _settle(attempt, "failure")
    finally:
        attempt.close()


def test_a_host_name_that_does_not_resolve_is_named(context: zmq.Context) -> None:
    token = curve.new_token()
    attempt = JoinAttempt(context, "tcp://no-such-host.invalid:5555", curve.join_keys(token),
                          curve.scheduler_keys(token).public_key, _register(), time.monotonic())
    try:
        assert "'no-such-host.invalid' does not resolve" in _settle(attempt, "failure")
    finally:
        attempt.close()


def test_a_scheduler_with_another_token_is_a_clear_error(context: zmq.Context) -> None:
    membership = Membership(curve.new_token())
    membership.start(context)
    server = context.socket(zmq.PULL)
    membership.secure_server(server)
    port = server.bind_to_random_port("tcp://127.0.0.1")
    other = curve.new_token()
    attempt = JoinAttempt(context, f"tcp://127.0.0.1:{port}", curve.join_keys(other),
                          curve.scheduler_keys(other).public_key, _register(), time.monotonic())
    try:
        assert "another cluster token" in _settle(attempt, "failure")
    finally:
        attempt.close()
        server.close(linger=0)
        membership.stop()


def test_the_right_scheduler_gets_the_registration(context: zmq.Context) -> None:
    token = curve.new_token()
    membership = Membership(token)
    membership.start(context)
    server = context.socket(zmq.PULL)
    membership.secure_server(server)
    port = server.bind_to_random_port("tcp://127.0.0.1")
    attempt = JoinAttempt(context, f"tcp://127.0.0.1:{port}", curve.join_keys(token),
                          curve.scheduler_keys(token).public_key, _register(), time.monotonic())
    try:
        assert _settle(attempt, "handshake") == ""
        assert server.poll(5000)
        assert server.recv_multipart()  # the Register arrived
        assert not attempt.outcome(attempt.handshake_s + 1.0).failed  # waits for admission
        assert "did not admit" in attempt.outcome(attempt.handshake_s + 60.0).reason
    finally:
        attempt.close()
        server.close(linger=0)
        membership.stop()


def test_a_port_that_never_answers_times_out(context: zmq.Context) -> None:
    with socket.socket() as listener:  # takes TCP connections, never speaks ZeroMQ
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        token = curve.new_token()
        attempt = JoinAttempt(context, f"tcp://127.0.0.1:{listener.getsockname()[1]}", curve.join_keys(token),
                              curve.scheduler_keys(token).public_key, _register(), time.monotonic())
        try:
            assert not attempt.outcome(attempt.started_s).failed
            reason = attempt.outcome(attempt.started_s + CONNECT_TIMEOUT_S + 0.1).reason
            assert f"in {CONNECT_TIMEOUT_S:.0f} s" in reason
        finally:
            attempt.close()


def test_attempts_log_one_line_each_and_back_off(context: zmq.Context, caplog: pytest.LogCaptureFixture) -> None:
    token = curve.new_token()
    attempts = JoinAttempts(f"tcp://127.0.0.1:{_free_port()}")
    now_s = 1000.0
    try:
        for number in range(1, 5):
            assert attempts.watch(False, now_s)  # due: register
            attempts.send(context, curve.join_keys(token), curve.scheduler_keys(token).public_key, _register(), now_s)
            deadline = time.monotonic() + 10
            while attempts.attempt is not None and time.monotonic() < deadline:
                assert not attempts.watch(False, now_s)
                time.sleep(0.01)
            assert not attempts.watch(False, now_s + backoff_s(number) - 0.01)  # not before the backoff
            now_s += backoff_s(number)
        lines = [r.getMessage() for r in caplog.records if "cannot join" in r.getMessage()]
        assert [f"(attempt {n})" in line for n, line in enumerate(lines, 1)] == [True] * 4
        assert [line.rsplit("next attempt in ", 1)[1] for line in lines] == ["1 s", "2 s", "4 s", "8 s"]
    finally:
        attempts.close()
