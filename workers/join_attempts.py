"""Joining a scheduler without ever hanging: each registration is one attempt, watched; an attempt
that fails says why in one line, and the next comes after a capped backoff.

Parts:
- `backoff_s(attempt)`: the wait after failed attempt `attempt` (1, 2, 4, 8, then `MAX_BACKOFF_S`).
- `JoinAttempt`: one `Register` sent over a one-off socket with the token's join key, and a ZeroMQ
  monitor on that socket; `outcome(now_s)` reads the monitor and says whether the attempt failed
  and why: nothing listens there (refused), the host name does not resolve, no answer, the CURVE
  handshake refused (another cluster token), not a potluck scheduler, or reached but not admitted.
- `held_layers(assignment)`: the `Register` fields naming the layers a worker still holds, so a
  restarted scheduler can plan them where they are.
- `JoinAttempts`: one worker's attempts: `send(...)` starts one, `watch(admitted, now_s)` logs the
  failed one (one line: address, reason, next attempt) and says when to register again; a success
  after failures is logged once too.

What the monitor shows (pyzmq 27, measured on loopback): a refused connection gives CONNECT_RETRIED
with no CONNECTED; a host name that does not resolve gives CONNECT_RETRIED alone (so the name is
resolved here to tell the two apart); a scheduler with another token accepts the TCP connection and
fails the handshake (HANDSHAKE_FAILED_NO_DETAIL, then DISCONNECTED); the right one gives
HANDSHAKE_SUCCEEDED within milliseconds. A host that drops packets shows nothing for minutes: the
attempt gives up after `CONNECT_TIMEOUT_S`.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass

import zmq
from zmq.utils.monitor import recv_monitor_message

from workers import codec, curve
from workers import protocol as p

log = logging.getLogger("potluck.worker")

FIRST_BACKOFF_S = 1.0
MAX_BACKOFF_S = 10.0
CONNECT_TIMEOUT_S = 3.0  # no TCP connection or handshake by then: no answer
ADMIT_TIMEOUT_S = 20.0  # handshake done, registration sent: the scheduler admits within this (a busy one too)
HANDSHAKE_FAILED = zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH


def backoff_s(attempt: int) -> float:
    """The wait after failed attempt number `attempt` (from 1): doubling, capped."""
    return min(MAX_BACKOFF_S, FIRST_BACKOFF_S * 2 ** max(0, attempt - 1))


@dataclass(frozen=True)
class Outcome:
    failed: bool
    reason: str = ""


class JoinAttempt:
    """One registration on its own socket, watched until it is admitted or fails."""

    def __init__(self, context: zmq.Context, scheduler_address: str, join_keys: curve.KeyPair | None,
                 scheduler_key: str, message: p.Register, now_s: float) -> None:
        self.address = scheduler_address
        self.started_s = now_s
        self.events = 0  # every monitor event seen, or-ed
        self.handshake_s: float | None = None
        self.dropped = False  # the connection closed after the handshake
        self.sock = context.socket(zmq.PUSH)
        self.sock.setsockopt(zmq.LINGER, 0)
        if join_keys is not None:
            curve.make_client(self.sock, join_keys, scheduler_key)
        self.monitor = self.sock.get_monitor_socket()
        self.sock.connect(scheduler_address)
        self.sock.send_multipart(codec.encode(message), flags=zmq.NOBLOCK)  # queued until the handshake is done

    def outcome(self, now_s: float) -> Outcome:
        while self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)["event"]
            self.events |= event
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED and self.handshake_s is None:
                self.handshake_s = now_s
            elif event == zmq.EVENT_DISCONNECTED and self.handshake_s is not None:
                self.dropped = True
        if self.events & HANDSHAKE_FAILED:
            return Outcome(True, "the scheduler refused the CURVE handshake: it runs with another cluster token "
                                 f"(check --token / {curve.TOKEN_ENV})")
        if self.dropped:
            return Outcome(True, "the scheduler closed the connection before admitting this worker (stopping?)")
        if self.handshake_s is not None:
            if now_s - self.handshake_s > ADMIT_TIMEOUT_S:
                return Outcome(True, f"reached the scheduler, but it did not admit this worker in {ADMIT_TIMEOUT_S:.0f} s "
                                     "(its log says why)")
            return Outcome(False)
        if self.events & zmq.EVENT_DISCONNECTED:
            return Outcome(True, "the connection closed before the handshake: not a potluck scheduler port "
                                 "(the HTTP port? use the scheduler port `potluck serve` printed)")
        if self.events & zmq.EVENT_CONNECT_RETRIED and not self.events & zmq.EVENT_CONNECTED:
            return Outcome(True, _unreachable_reason(self.address))
        if now_s - self.started_s > CONNECT_TIMEOUT_S:
            what = "no potluck handshake" if self.events & zmq.EVENT_CONNECTED else "no answer"
            return Outcome(True, f"{what} in {CONNECT_TIMEOUT_S:.0f} s (host down, a firewall, or not a potluck scheduler?)")
        return Outcome(False)

    def close(self) -> None:
        self.sock.disable_monitor()
        self.monitor.close(linger=0)
        self.sock.close(linger=0)


class JoinAttempts:
    """A worker's registrations: at most one attempt open, the next after a backoff."""

    def __init__(self, scheduler_address: str) -> None:
        self.address = scheduler_address
        self.attempt: JoinAttempt | None = None
        self.failures = 0  # failed attempts since the last admission
        self.next_s = 0.0  # when the next attempt may start (after a failure)

    def send(self, context: zmq.Context, join_keys: curve.KeyPair | None, scheduler_key: str,
             message: p.Register, now_s: float) -> None:
        self.close()
        self.attempt = JoinAttempt(context, self.address, join_keys, scheduler_key, message, now_s)

    def watch(self, admitted: bool, now_s: float) -> bool:
        """Follow the open attempt; True when it is time to register again."""
        if admitted:
            if self.attempt is not None:
                self.close()
                if self.failures:
                    log.warning("joined the scheduler at %s after %d failed attempt(s)", self.address, self.failures)
                self.failures = 0
            return False
        if self.attempt is None:
            return now_s >= self.next_s
        outcome = self.attempt.outcome(now_s)
        if outcome.failed:
            self.failures += 1
            wait_s = backoff_s(self.failures)
            self.next_s = now_s + wait_s
            log.warning("cannot join the scheduler at %s (attempt %d): %s; next attempt in %.0f s",
                        self.address, self.failures, outcome.reason, wait_s)
            self.close()
        return False

    def close(self) -> None:
        if self.attempt is not None:
            self.attempt.close()
            self.attempt = None


def held_layers(assignment: p.AssignLayers | None) -> dict[str, str | int]:
    if assignment is None:
        return {}
    return {"loaded_model_dir": assignment.model_dir, "loaded_start_layer": assignment.start_layer,
            "loaded_end_layer": assignment.end_layer}


def _unreachable_reason(address: str) -> str:
    host, _, port = address.removeprefix("tcp://").rpartition(":")
    host = host.strip("[]")
    try:
        socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except (OSError, ValueError):
        return f"the host name {host!r} does not resolve"
    return "connection refused: nothing listens there (is `potluck serve` up, and is this its scheduler port?)"
