"""A worker's heartbeats: liveness and load, sent to the scheduler from a thread of their own, so
that long loads or steps never look like death.

Parts:
- `HEARTBEAT_INTERVAL_S`: how often.
- `Beating`: what it reads of the worker (so this module never imports workers/worker.py).
- `heartbeat_loop(worker)`: sends a `Heartbeat` (requests, queued work, KV free/capacity, step time,
  tokens processed) every interval while `worker.running`; stops the worker when its parent
  process (local workers) is gone.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Protocol

import zmq

from workers import codec
from workers import protocol as p

log = logging.getLogger("potluck.worker")

HEARTBEAT_INTERVAL_S = 0.5


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


def heartbeat_loop(worker: Beating) -> None:
    sock = worker.context.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(worker.config.scheduler_address)
    try:
        while worker.running:
            if worker.config.parent_pid and not _alive(worker.config.parent_pid):
                log.info("parent %d is gone; stopping", worker.config.parent_pid)
                worker.running = False
                return
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
