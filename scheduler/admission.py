"""Admission queue: requests that find every path KV-full (or, with late binding, every path
queued past ``scheduler.routing.MAX_QUEUE_WAIT_S``) wait here, first in first out.

Parts:
- ``Outcome``: ``"admitted"`` (route it now), ``"queued"`` (told it waits, at ``position``),
  ``"rejected"`` (HTTP 429 with ``Retry-After: retry_after_s``).
- ``AdmissionDecision``: the outcome, the queue position and the Retry-After for a rejection.
- ``DEFAULT_MAX_WAITING``, ``DEFAULT_ROUTE_WAIT_S``: the engine's and CLI's defaults.
- ``AdmissionQueue``: the policy's changing state. ``offer`` decides for a new request;
  ``release`` pops, in FIFO order, the waiting requests that can now be routed (stops at the
  first that cannot: no overtaking, so a large request is not starved by small ones);
  ``expire`` drops the ones that waited past ``max_wait_s`` (they get a 429 too).

Policy: a request is admitted at once only when it has a route *and* nobody is waiting (FIFO);
otherwise it waits if fewer than ``max_waiting`` do, else it is rejected.
"""
from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

T = TypeVar("T", bound=Hashable)
# Defaults that queue a burst instead of refusing it (as vLLM does): 1024 may wait, each up to
# 300 s (`--max-waiting-requests`, `--max-queue-wait-s`); a request runs only once its route's
# KV holds its prompt + max new tokens, so the queue, not the workers, absorbs a burst.
DEFAULT_MAX_WAITING = 1024
DEFAULT_ROUTE_WAIT_S = 300.0
Outcome = Literal["admitted", "queued", "rejected"]


@dataclass(frozen=True)
class AdmissionDecision:
    outcome: Outcome
    position: int = 0  # 0-based place in the queue when queued
    retry_after_s: float | None = None  # set when rejected


class AdmissionQueue(Generic[T]):
    def __init__(self, max_waiting: int, retry_after_s: float, max_wait_s: float = math.inf) -> None:
        if max_waiting < 0 or retry_after_s < 0 or max_wait_s <= 0:
            raise ValueError("max_waiting and retry_after_s must be >= 0, max_wait_s > 0")
        self.max_waiting = max_waiting
        self.retry_after_s = retry_after_s
        self.max_wait_s = max_wait_s
        self._waiting: deque[tuple[T, float]] = deque()
        self.admitted = 0
        self.rejected = 0

    def __len__(self) -> int:
        return len(self._waiting)

    def __contains__(self, item: object) -> bool:
        return any(x == item for x, _ in self._waiting)

    def waiting(self) -> tuple[T, ...]:
        return tuple(x for x, _ in self._waiting)

    def offer(self, item: T, now_s: float, has_route: bool) -> AdmissionDecision:
        """Decide for a newly arrived request; ``has_route``: routing found a path for it now."""
        if has_route and not self._waiting:
            self.admitted += 1
            return AdmissionDecision("admitted")
        if len(self._waiting) >= self.max_waiting:
            self.rejected += 1
            return AdmissionDecision("rejected", retry_after_s=self.retry_after_s)
        self._waiting.append((item, now_s))
        return AdmissionDecision("queued", position=len(self._waiting) - 1)

    def release(self, can_admit: Callable[[T], bool]) -> list[T]:
        """Pop waiting requests from the head while ``can_admit(head)`` (which should route and
        reserve it); returns them in arrival order."""
        out = []
        while self._waiting and can_admit(self._waiting[0][0]):
            out.append(self._waiting.popleft()[0])
        self.admitted += len(out)
        return out

    def expire(self, now_s: float) -> list[T]:
        """Drop (and return) the requests that have waited longer than ``max_wait_s``."""
        out = [x for x, t in self._waiting if now_s - t > self.max_wait_s]
        if out:
            self._waiting = deque((x, t) for x, t in self._waiting if now_s - t <= self.max_wait_s)
            self.rejected += len(out)
        return out

    def remove(self, item: T) -> bool:
        """Forget a waiting request (client went away); True if it was waiting."""
        for x, entry in enumerate(self._waiting):
            if entry[0] == item:
                del self._waiting[x]
                return True
        return False
