"""Admission: whether a request goes now, waits (first in, first out) or is turned away.

Requests that find every path KV-full (or, with late binding, every path queued past
``scheduler.routing.MAX_QUEUE_WAIT_S``) wait in the admission queue.

Parts:
- ``AdmissionLimits``: the policy's settings (frozen): how many may wait, how long, and the
  Retry-After a rejected client is told.
- ``Outcome``: ``"admitted"`` (route it now), ``"queued"`` (it waits, at ``position``),
  ``"rejected"`` (HTTP 429 with ``Retry-After: retry_after_s``).
- ``AdmissionDecision``: the outcome, the queue position, the Retry-After and why it was rejected
  (``"full"``: ``max_waiting`` already wait; ``"expired"``: it waited past ``max_wait_s``).
- ``is_turn(position, num_waiting)``: whether a request may be routed now (FIFO: only the head of
  the queue, or anyone while nobody waits). Callers route only then, so a routing policy with
  state (round-robin's counter) sees the same calls whichever caller decides.
- ``decide(limits, position, num_waiting, has_route, waited_s)``: THE admission decision, pure.
  The engine (``scheduler/engine.py``) and the simulator (``benchmarks/simulator.py``) both
  reach it through ``AdmissionQueue``.
- ``DEFAULT_MAX_WAITING``, ``DEFAULT_ROUTE_WAIT_S``: the engine's and CLI's defaults.
- ``AdmissionQueue``: the waiting requests (the policy's changing state). ``poll`` decides for a
  request, new or waiting, and applies the decision; ``offer`` is ``poll`` for a new arrival whose
  route is already known; ``release`` pops, in FIFO order, the waiting requests that can now be
  routed (stops at the first that cannot: no overtaking, so a large request is not starved by
  small ones); ``expire`` drops the ones that waited past ``max_wait_s``.

Policy: a request is admitted when it has a route *and* it is its turn; otherwise a waiting
request waits until ``max_wait_s`` and a new one waits if fewer than ``max_waiting`` do, else it is
rejected.
"""
from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

T = TypeVar("T", bound=Hashable)
R = TypeVar("R")
# Defaults that queue a burst instead of refusing it (as vLLM does): 1024 may wait, each up to
# 300 s (`--max-waiting-requests`, `--max-queue-wait-s`); a request runs only once its route's
# KV holds its prompt + max new tokens, so the queue, not the workers, absorbs a burst.
DEFAULT_MAX_WAITING = 1024
DEFAULT_ROUTE_WAIT_S = 300.0
Outcome = Literal["admitted", "queued", "rejected"]


@dataclass(frozen=True)
class AdmissionLimits:
    max_waiting: int  # requests that may wait at once; the next one is rejected
    retry_after_s: float  # the Retry-After a rejected client is told
    max_wait_s: float = math.inf  # a request waiting longer is rejected

    def __post_init__(self) -> None:
        if self.max_waiting < 0 or self.retry_after_s < 0 or self.max_wait_s <= 0:
            raise ValueError("max_waiting and retry_after_s must be >= 0, max_wait_s > 0")


@dataclass(frozen=True)
class AdmissionDecision:
    outcome: Outcome
    position: int = 0  # 0-based place in the queue when queued
    retry_after_s: float | None = None  # set when rejected
    reason: Literal["", "full", "expired"] = ""  # why it was rejected


def is_turn(position: int | None, num_waiting: int) -> bool:
    """Whether a request at ``position`` (None: not waiting) may be routed now."""
    return position == 0 or (position is None and num_waiting == 0)


def decide(limits: AdmissionLimits, position: int | None, num_waiting: int, has_route: bool,
           waited_s: float = 0.0) -> AdmissionDecision:
    """Admit, queue or reject one request. ``position``: its place in the queue (None: it is not
    waiting); ``num_waiting``: how many wait; ``has_route``: routing found a path for it now
    (asked only when ``is_turn``); ``waited_s``: how long it has waited."""
    if has_route and is_turn(position, num_waiting):
        return AdmissionDecision("admitted")
    if position is None and num_waiting >= limits.max_waiting:
        return AdmissionDecision("rejected", retry_after_s=limits.retry_after_s, reason="full")
    if waited_s > limits.max_wait_s:
        return AdmissionDecision("rejected", retry_after_s=limits.retry_after_s, reason="expired")
    return AdmissionDecision("queued", position=num_waiting if position is None else position)


class AdmissionQueue(Generic[T]):
    def __init__(self, max_waiting: int, retry_after_s: float, max_wait_s: float = math.inf) -> None:
        self.limits = AdmissionLimits(max_waiting, retry_after_s, max_wait_s)
        self._waiting: deque[tuple[T, float]] = deque()  # (request, waiting since, s)
        self.admitted = 0
        self.rejected = 0

    def __len__(self) -> int:
        return len(self._waiting)

    def __contains__(self, item: object) -> bool:
        return self.position(item) is not None

    def waiting(self) -> tuple[T, ...]:
        return tuple(x for x, _ in self._waiting)

    def position(self, item: object) -> int | None:
        return next((n for n, (x, _) in enumerate(self._waiting) if x == item), None)

    def poll(self, item: T, now_s: float, route: Callable[[], R | None],
             since_s: float | None = None) -> tuple[AdmissionDecision, R | None]:
        """Decide for ``item`` (new, or waiting) and apply it: admitted or rejected leave the queue,
        a new queued one joins it (waiting since ``since_s``, default ``now_s``). ``route()`` is
        called only when it is ``item``'s turn; returns the decision and the route it found."""
        position = self.position(item)
        found = route() if is_turn(position, len(self._waiting)) else None
        waited_s = now_s - (self._waiting[position][1] if position is not None else since_s if since_s is not None else now_s)
        decision = decide(self.limits, position, len(self._waiting), found is not None, waited_s)
        if decision.outcome == "queued":
            if position is None:
                self._waiting.append((item, now_s if since_s is None else since_s))
            return decision, None
        if position is not None:
            del self._waiting[position]
        if decision.outcome == "admitted":
            self.admitted += 1
        else:
            self.rejected += 1
        return decision, found

    def offer(self, item: T, now_s: float, has_route: bool) -> AdmissionDecision:
        """Decide for a newly arrived request; ``has_route``: routing found a path for it now."""
        return self.poll(item, now_s, lambda: True if has_route else None)[0]

    def release(self, can_admit: Callable[[T], bool]) -> list[T]:
        """Pop waiting requests from the head while ``can_admit(head)`` (which should route and
        reserve it); returns them in arrival order."""
        out = []
        while self._waiting:
            head = self._waiting[0][0]
            if decide(self.limits, 0, len(self._waiting), can_admit(head)).outcome != "admitted":
                break
            out.append(self._waiting.popleft()[0])
        self.admitted += len(out)
        return out

    def expire(self, now_s: float) -> list[T]:
        """Drop (and return) the requests that have waited longer than ``max_wait_s``."""
        kept, out = deque(), []
        for n, (x, since_s) in enumerate(self._waiting):
            if decide(self.limits, n, len(self._waiting), False, now_s - since_s).outcome == "rejected":
                out.append(x)
            else:
                kept.append((x, since_s))
        self._waiting = kept
        self.rejected += len(out)
        return out

    def remove(self, item: T) -> bool:
        """Forget a waiting request (client went away); True if it was waiting."""
        position = self.position(item)
        if position is not None:
            del self._waiting[position]
        return position is not None
