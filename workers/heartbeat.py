"""A worker's heartbeats: liveness and load, sent to the scheduler from a thread of their own, so
that long loads or steps never look like death.

Parts:
- `HEARTBEAT_INTERVAL_S`: how often.
- `heartbeat_loop(worker)`: sends a `Heartbeat` (requests, queued work, KV free/capacity, step time,
  tokens processed) every interval while `worker.running`; stops the worker when its parent
  process (local workers) is gone.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING

import zmq

from workers import codec, curve
from workers import protocol as p

if TYPE_CHECKING:
    from workers.worker import Worker

log = logging.getLogger("potluck.worker")

HEARTBEAT_INTERVAL_S = 0.5
MAX_REPORTED_REQUESTS = 4096  # request ids a heartbeat lists (the scheduler releases ghosts)


def heartbeat_loop(worker: Worker) -> None:
    sock = worker.context.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    while worker.running and not worker.admitted.wait(0.1):
        if worker.config.parent_pid and not _alive(worker.config.parent_pid):
            break
    if worker.config.use_curve:  # connected once admitted: a refused handshake is not retried by ZeroMQ
        curve.make_client(sock, worker.keys, worker.scheduler_key)
    sock.connect(worker.config.scheduler_address)
    try:
        while worker.running:
            if worker.config.parent_pid and not _alive(worker.config.parent_pid):
                log.info("parent %d is gone; stopping", worker.config.parent_pid)
                worker.running = False
                return
            if not worker.admitted.is_set():  # its key is not a member yet: the scheduler would refuse it
                time.sleep(0.05)
                continue
            backend = worker.backend
            message = p.Heartbeat(
                worker_id=worker.worker_id,
                epoch=worker.epoch,
                running_requests=len(worker.requests),
                queued_items=len(worker.pending),
                kv_free_tokens=backend.kv_free_tokens() if backend else 0,
                kv_capacity_tokens=backend.kv_capacity_tokens() if backend else 0,
                step_time_ewma_s=worker.step_time_ewma_s,
                tokens_processed=worker.tokens_processed,
                data_address=worker.data_address,
                request_ids=tuple(list(worker.requests)[:MAX_REPORTED_REQUESTS]),
            )
            try:
                sock.send_multipart(codec.encode(message), flags=zmq.NOBLOCK)
            except zmq.Again:
                pass
            time.sleep(HEARTBEAT_INTERVAL_S)
    finally:
        sock.close(linger=0)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
