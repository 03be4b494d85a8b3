"""A worker's heartbeats: liveness and load, sent to the scheduler from a thread of their own, so
that long loads or steps never look like death.

Parts:
- `HEARTBEAT_INTERVAL_S`: how often.
- `heartbeat_loop(worker)`: sends a `Heartbeat` (requests held, queued work, KV free/capacity, step
  time, tokens processed, prefix-cache counts) every interval while `worker.running`, once the scheduler admitted the
  worker's key; stops the worker when its parent process (local workers) is gone; when the
  scheduler refuses the key in the CURVE handshake (a scheduler restarted with the same token),
  has the worker register again; says when the connection to the scheduler is lost (it stopped:
  the worker stays up, and registers again with the scheduler that comes back).
- `Beating`: what it reads of the worker (so this module never imports workers/worker.py).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Protocol

import zmq
from zmq.utils.monitor import recv_monitor_message

from workers import codec, curve
from workers import protocol as p

log = logging.getLogger("potluck.worker")

HEARTBEAT_INTERVAL_S = 0.5
MAX_REPORTED_REQUESTS = 4096  # request ids a heartbeat lists (the scheduler releases ghosts)


HANDSHAKE_FAILED = zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL


class Beating(Protocol):
    """What the heartbeat reads of a worker (workers/worker.py's `Worker` fits it)."""

    context: zmq.Context
    config: Any  # scheduler_address, parent_pid
    running: bool
    backend: Any  # kv_free_tokens(), kv_capacity_tokens(); None while no layers are loaded
    worker_id: str
    epoch: int
    requests: dict
    pending: Any
    step_time_ewma_s: float
    tokens_processed: int
    data_address: str
    members: Any  # keys (workers/peers.py)
    admitted: Any  # threading.Event: the scheduler admitted this worker's key
    registered_at_s: float


def heartbeat_loop(worker: Beating) -> None:
    sock = monitor = None
    try:
        while worker.running:
            if worker.config.parent_pid and not _alive(worker.config.parent_pid):
                log.info("parent %d is gone; stopping", worker.config.parent_pid)
                worker.running = False
                return
            if not worker.admitted.is_set():  # its key is not a member yet: the scheduler would refuse it
                time.sleep(0.05)
                continue
            if sock is None:  # connected once admitted: a refused handshake is not retried by ZeroMQ
                sock, monitor = _connect(worker)
            if monitor is not None and _handshake_failed(monitor, worker.config.scheduler_address):
                # a scheduler that does not know this key (restarted with the same token): join again
                log.warning("the scheduler refused this worker's key (restarted?); registering again")
                worker.admitted.clear()
                worker.registered_at_s = 0.0  # the worker's loop registers at once
                _close(sock, monitor)
                sock = monitor = None
                continue
            try:
                sock.send_multipart(codec.encode(_heartbeat(worker)), flags=zmq.NOBLOCK)
            except zmq.Again:
                pass
            time.sleep(HEARTBEAT_INTERVAL_S)
    finally:
        if sock is not None:
            _close(sock, monitor)


def _heartbeat(worker: Beating) -> p.Heartbeat:
    backend = worker.backend
    queries_tokens, hits_tokens = backend.prefix_cache_counts() if backend else (0, 0)
    return p.Heartbeat(
        worker_id=worker.worker_id,
        epoch=worker.epoch,
        running_requests=len(worker.requests),
        queued_items=len(worker.pending),
        kv_free_tokens=backend.kv_free_tokens() if backend else 0,
        kv_capacity_tokens=backend.kv_capacity_tokens() if backend else 0,
        step_time_ewma_s=worker.step_time_ewma_s,
        tokens_processed=worker.tokens_processed,
        data_address=worker.data_address,
        prefix_cache_queries_tokens=queries_tokens,
        prefix_cache_hits_tokens=hits_tokens,
        request_ids=tuple(list(worker.requests)[:MAX_REPORTED_REQUESTS]),
    )


def _connect(worker: Beating) -> tuple[zmq.Socket, zmq.Socket | None]:
    sock = worker.context.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    monitor = None
    if worker.config.use_curve:
        curve.make_client(sock, worker.members.keys, worker.members.scheduler_key)
        monitor = sock.get_monitor_socket(HANDSHAKE_FAILED | zmq.EVENT_DISCONNECTED)
    sock.connect(worker.config.scheduler_address)
    return sock, monitor


def _handshake_failed(monitor: zmq.Socket, scheduler_address: str = "") -> bool:
    failed = disconnected = False
    while monitor.poll(0):
        event = recv_monitor_message(monitor)
        failed |= bool(event["event"] & HANDSHAKE_FAILED)
        disconnected |= event["event"] == zmq.EVENT_DISCONNECTED
    if disconnected and not failed:  # stopped or restarting: ZeroMQ reconnects by itself
        log.warning("lost the connection to the scheduler at %s; keeping the layers, registering again "
                    "when it is back", scheduler_address)
    return failed


def _close(sock: zmq.Socket, monitor: zmq.Socket | None) -> None:
    if monitor is not None:
        sock.disable_monitor()
        monitor.close(linger=0)
    sock.close(linger=0)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
