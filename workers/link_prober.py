"""A worker's links to its peers: an echo responder they probe, and a thread that probes them.

Parts:
- `PROBE_PAYLOAD_BYTES`, `PROBE_ROUNDS`, `PROBE_REPEATS`: what one measurement sends; a link's
  figures are the best of `PROBE_ROUNDS` x `PROBE_REPEATS` samples (`probe_peer(best=True)`):
  least round trip, least sink time, since a loaded machine only ever adds time (by the median,
  a worker loading its layers while it probed measured 63 ms for a 40 ms round trip). The round
  trip also takes `RTT_ROUNDS` rounds of empty echoes `RTT_ROUND_GAP_S` apart (cheap), so that
  a burst of load on the machine does not cover every sample.
- `DRIFT_CHECK_INTERVAL_S`, `DRIFT_FRACTION`, `DRIFT_MIN_S`: how often the round trip to each
  measured peer is timed again (a few empty echoes), and by how much it must differ from the
  reported one for the link to be measured again and reported.
- `LinkProber`: `.echo_address` (reported in `Register`); `ask(peers)` queues the peers of a
  `ProbeLinks`; its daemon thread measures them and sends one `LinkReport` to the scheduler
  (a peer that does not answer is tried again once, then left out), then checks for drift
  every interval. `close()`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

import zmq

from workers import codec, curve
from workers import protocol as p
from workers.peer_probe import EchoResponder, probe_peer

log = logging.getLogger("potluck.worker")

PROBE_PAYLOAD_BYTES = 2 << 20
PROBE_ROUNDS = 2
PROBE_REPEATS = 5
PROBE_TIMEOUT_S = 10.0
DRIFT_CHECK_INTERVAL_S = 30.0
DRIFT_FRACTION = 0.5
DRIFT_MIN_S = 0.002
RETRY_AFTER_S = 1.0
RTT_ROUNDS = 6
RTT_ROUND_GAP_S = 0.25

Peer = tuple[str, str, str]  # (worker id, echo address, public key)


class LinkProber:
    def __init__(self, context: zmq.Context, keys: curve.KeyPair, worker_id: str, listen_host: str,
                 advertise_host: str, scheduler_address: str, scheduler_key: str, use_curve: bool,
                 timeout_s: float = PROBE_TIMEOUT_S) -> None:
        self.context = context
        self.keys = keys if use_curve else None
        self.worker_id = worker_id
        self.scheduler_address = scheduler_address
        self.scheduler_key = scheduler_key
        self.timeout_s = timeout_s  # a peer silent this long is not measured (tried once more)
        self.responder = EchoResponder(listen_host, advertise_host=advertise_host, context=context, keys=self.keys)
        self.requests: queue.Queue[tuple[Peer, ...] | None] = queue.Queue()
        self.measured: dict[str, tuple[Peer, float]] = {}  # worker id -> (peer, reported rtt_s)
        self.thread = threading.Thread(target=self._run, name="potluck-links", daemon=True)
        self.thread.start()

    @property
    def echo_address(self) -> str:
        return self.responder.address

    def ask(self, peers: tuple[Peer, ...]) -> None:
        self.requests.put(tuple(peers))

    def close(self) -> None:
        self.requests.put(None)
        self.thread.join(timeout=2.0)
        self.responder.close()

    def measure(self, peer: Peer) -> tuple[float, float] | None:
        """(least rtt_s, most bandwidth bytes/s) of `PROBE_ROUNDS` probes; None: no answer."""
        rounds = []
        for attempt in range(2):
            try:
                rounds = [self._probe(peer, PROBE_PAYLOAD_BYTES, PROBE_REPEATS) for _ in range(PROBE_ROUNDS)]
                for _ in range(RTT_ROUNDS):
                    time.sleep(RTT_ROUND_GAP_S)
                    rounds.append((self._probe(peer, 1, PROBE_REPEATS)[0], 0.0))
                break
            except (TimeoutError, zmq.ZMQError, RuntimeError) as exc:
                log.warning("probe of %s (%s) failed: %s", peer[0], peer[1], exc)
                time.sleep(RETRY_AFTER_S)  # its gate may not have admitted this worker's key yet
        if not rounds:
            return None
        return min(r[0] for r in rounds), max(r[1] for r in rounds)

    def _probe(self, peer: Peer, payload_bytes: int, repeats: int) -> tuple[float, float]:
        return probe_peer(peer[1], payload_bytes, repeats=repeats, timeout_s=self.timeout_s, context=self.context,
                          keys=self.keys, server_public_key=peer[2] if self.keys is not None else None, best=True)

    def _run(self) -> None:
        next_check_s = time.monotonic() + DRIFT_CHECK_INTERVAL_S
        while True:
            try:
                peers = self.requests.get(timeout=max(0.0, next_check_s - time.monotonic()))
            except queue.Empty:
                peers = self._drifted()
                next_check_s = time.monotonic() + DRIFT_CHECK_INTERVAL_S
            if peers is None:
                return
            links = []
            for peer in peers:
                if peer[0] == self.worker_id or (figures := self.measure(peer)) is None:
                    continue
                links.append((peer[0], *figures))
                self.measured[peer[0]] = (peer, figures[0])
            if links:
                self._report(tuple(links))

    def _drifted(self) -> tuple[Peer, ...]:
        """The measured peers whose round trip now differs from the reported one (gone ones are dropped)."""
        drifted = []
        for worker_id, (peer, rtt_s) in list(self.measured.items()):
            try:
                now_s = self._probe(peer, 1, 5)[0]
            except (TimeoutError, zmq.ZMQError, RuntimeError):
                self.measured.pop(worker_id, None)
                continue
            if abs(now_s - rtt_s) > max(DRIFT_FRACTION * rtt_s, DRIFT_MIN_S):
                log.info("link to %s drifted: rtt %.1f ms, was %.1f ms", worker_id, 1e3 * now_s, 1e3 * rtt_s)
                drifted.append(peer)
        return tuple(drifted)

    def _report(self, links: tuple[tuple[str, float, float], ...]) -> None:
        sock = self.context.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 2000)
        if self.keys is not None:
            curve.make_client(sock, self.keys, self.scheduler_key)
        sock.connect(self.scheduler_address)
        try:
            sock.send_multipart(codec.encode(p.LinkReport(self.worker_id, links)), flags=zmq.NOBLOCK)
        except zmq.Again:
            log.warning("the scheduler is not taking link reports")
        finally:
            sock.close()
