"""The scheduler's PUSH sockets to its workers: assignments, request starts, releases go out here.

Parts: `WorkerLinks` -- `connect(worker_id, address, public_key)` when a worker registers,
`send(worker_id, message)` (never blocks: a worker not taking messages is logged),
`send_once(address, message, worker_id)` to a worker no longer registered (a `Reregister`),
`close(worker_id)` when it is lost, `close_all(linger_ms)` and `term()` when the scheduler stops.
Every socket is CURVE-secured through scheduler/membership.py.
"""

from __future__ import annotations

import logging

import zmq

from scheduler.membership import Membership
from workers import codec, protocol as p

log = logging.getLogger("potluck.scheduler")


class WorkerLinks:
    def __init__(self, membership: Membership) -> None:
        self.membership = membership
        self.context = zmq.Context()
        self.sockets: dict[str, zmq.Socket] = {}

    def connect(self, worker_id: str, address: str, public_key: str) -> None:
        sock = self.context.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 0)
        self.membership.secure_client(sock, public_key)
        sock.connect(address)
        self.sockets[worker_id] = sock

    def send(self, worker_id: str, message: p.Message) -> None:
        if (sock := self.sockets.get(worker_id)) is None:
            return
        try:
            sock.send_multipart(codec.encode(message), flags=zmq.NOBLOCK)
        except zmq.Again:
            log.warning("worker %s is not taking messages", worker_id)

    def send_once(self, address: str, message: p.Message, worker_id: str) -> None:
        if self.membership.use_curve and not self.membership.key_of.get(worker_id):
            return
        sock = self.context.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 1000)
        self.membership.secure_client(sock, self.membership.key_of.get(worker_id, ""))
        sock.connect(address)
        try:
            sock.send_multipart(codec.encode(message), flags=zmq.NOBLOCK)
        except zmq.Again:
            pass
        sock.close()

    def close(self, worker_id: str) -> None:
        if (sock := self.sockets.pop(worker_id, None)) is not None:
            sock.close(linger=0)

    def close_all(self, linger_ms: int) -> None:
        for sock in self.sockets.values():
            sock.close(linger=linger_ms)
        self.sockets.clear()

    def term(self) -> None:
        self.context.term()
