"""Round-trip time and bandwidth between workers, over a real ZeroMQ socket.

Parts:
- Every probe socket takes CURVE keys (workers/curve.py) like the rest of the cluster's sockets.
- `EchoResponder`: a REP socket on a free port served by a daemon thread; a worker runs one so
  that peers can probe it. `.address` is what peers connect to. Requests are multipart:
  `[b"echo", ...]` is answered with the same frames; `[b"sink", payload]` with `[b"ok", size]`.
- `probe_peer(echo_address, payload_bytes) -> (rtt_s, bandwidth_bytes_per_s)`: median round trip
  of an empty echo, and payload bytes over (time of a sink request less the round trip); with
  `best=True` the least of each instead (a loaded machine only adds time to a sample).
  Raises `TimeoutError` when the peer does not answer within `timeout_s`.
- `measure_peers(addresses) -> (rtt_s by address, bandwidth by address)`: unreachable peers are
  left out (and logged).

`slowdown` (> 1) is the fault-injection knob also used by workers/profiler.py: each timed round
trip really stalls for (slowdown - 1) x its own duration inside the timed region.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections.abc import Iterable

import zmq

from workers.curve import KeyPair, make_client, make_server

log = logging.getLogger(__name__)


def stall_until(deadline_s: float) -> None:
    """Wait until `time.perf_counter()` reaches `deadline_s` (sleep, then spin the last 0.2 ms)."""
    remaining = deadline_s - time.perf_counter()
    if remaining > 0.0002:
        time.sleep(remaining - 0.0002)
    while time.perf_counter() < deadline_s:
        pass


class EchoResponder:
    """REP echo on `tcp://{host}:{free port}`; `advertise_host` is the host peers should dial."""

    def __init__(self, host: str = "127.0.0.1", *, advertise_host: str | None = None,
                 context: zmq.Context | None = None, keys: KeyPair | None = None) -> None:
        self._context = context or zmq.Context.instance()
        self._keys = keys  # CURVE server keys (the context's Gate admits the probing members)
        self._host = host
        self._advertise = advertise_host or (host if host not in ("0.0.0.0", "*") else "127.0.0.1")
        self._stop = threading.Event()
        self._bound = threading.Event()
        self._port = 0
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._serve, name="potluck-echo", daemon=True)
        self._thread.start()
        if not self._bound.wait(5.0) or self._error is not None:
            raise RuntimeError(f"echo responder could not bind on {host}: {self._error}")

    @property
    def address(self) -> str:
        return f"tcp://{self._advertise}:{self._port}"

    def _serve(self) -> None:
        sock = self._context.socket(zmq.REP)
        sock.setsockopt(zmq.LINGER, 0)
        if self._keys is not None:
            make_server(sock, self._keys)
        try:
            self._port = sock.bind_to_random_port(f"tcp://{self._host}")
        except zmq.ZMQError as exc:
            self._error = exc
            sock.close()
            self._bound.set()
            return
        self._bound.set()
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                if not poller.poll(50):
                    continue
                frames = sock.recv_multipart(copy=False)
                kind = frames[0].bytes if frames else b""
                if kind == b"echo":
                    sock.send_multipart(frames, copy=False)
                elif kind == b"sink":
                    size = sum(len(f.buffer) for f in frames[1:])
                    sock.send_multipart([b"ok", str(size).encode()])
                else:
                    sock.send_multipart([b"?"])
        finally:
            sock.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)

    def __enter__(self) -> EchoResponder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _round_trip_s(sock: zmq.Socket, frames: list[bytes], slowdown: float) -> float:
    start = time.perf_counter()
    sock.send_multipart(frames, copy=len(frames[-1]) < 65536)
    reply = sock.recv_multipart()
    took = time.perf_counter() - start
    if not reply or reply[0] not in (b"echo", b"ok"):
        raise RuntimeError(f"unexpected echo reply {reply[:1]!r}")
    if slowdown > 1.0:
        stall_until(start + took * slowdown)
        took = time.perf_counter() - start
    return took


def probe_peer(echo_address: str, payload_bytes: int = 1 << 20, *, repeats: int = 5,
               timeout_s: float = 2.0, slowdown: float = 1.0,
               context: zmq.Context | None = None, keys: KeyPair | None = None,
               server_public_key: str | None = None, best: bool = False) -> tuple[float, float]:
    """(median round-trip seconds, bandwidth bytes/s) to the `EchoResponder` at `echo_address`
    (over CURVE with `keys` when given: the responder's public key is `server_public_key`);
    `best`: from the least round trip and the least sink time of the `repeats`."""
    if payload_bytes < 1 or repeats < 1:
        raise ValueError("payload_bytes and repeats must be >= 1")
    ctx = context or zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, int(timeout_s * 1000))
    sock.setsockopt(zmq.SNDTIMEO, int(timeout_s * 1000))
    if keys is not None and server_public_key is not None:
        make_client(sock, keys, server_public_key)
    try:
        sock.connect(echo_address)
        payload = bytes(payload_bytes)
        _round_trip_s(sock, [b"echo", b""], 1.0)  # warm-up: connection set up
        _round_trip_s(sock, [b"sink", payload], 1.0)
        pick = min if best else statistics.median
        rtt_s = pick(_round_trip_s(sock, [b"echo", b""], slowdown) for _ in range(repeats))
        sink_s = pick(_round_trip_s(sock, [b"sink", payload], slowdown) for _ in range(repeats))
    except zmq.Again as exc:
        raise TimeoutError(f"peer {echo_address} did not answer within {timeout_s} s") from exc
    finally:
        sock.close()
    transfer_s = max(sink_s - rtt_s, sink_s * 0.01, 1e-9)
    return rtt_s, payload_bytes / transfer_s


def measure_peers(addresses: Iterable[str], payload_bytes: int = 1 << 20, *, timeout_s: float = 2.0,
                  slowdown: float = 1.0) -> tuple[dict[str, float], dict[str, float]]:
    """Probe each echo address; returns (rtt_s, bandwidth_bytes_per_s) keyed by address."""
    rtt: dict[str, float] = {}
    bandwidth: dict[str, float] = {}
    for address in addresses:
        try:
            rtt[address], bandwidth[address] = probe_peer(address, payload_bytes, timeout_s=timeout_s,
                                                          slowdown=slowdown)
        except (TimeoutError, zmq.ZMQError, RuntimeError) as exc:
            log.warning("peer probe of %s failed: %s", address, exc)
    return rtt, bandwidth
