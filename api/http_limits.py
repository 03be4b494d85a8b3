"""Bounds on the HTTP server: what one client (or many) may hold of it.

Parts:
- `HttpLimits`: connection limit, header / body / idle timeouts, request-size limit (frozen config).
- `bounded_protocol(limits)`: a uvicorn h11 protocol class that refuses connections past the limit
  (closed at once, counted) and closes a connection that has not sent a whole request head within
  the header timeout (slow or idle connections cannot pile up and use every file descriptor).
- `BodyLimitMiddleware`: a request body larger than the limit gets a clear 413 (by Content-Length
  before any byte is read, or counted while reading); a body that stalls past the body timeout
  gets a 408; the app gets the body whole.
- `uvicorn_options(limits)`: the matching uvicorn.Config keywords (idle keep-alive timeout,
  header size limit).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from api.server import error_response
from workers.log_throttle import LogThrottle

log = logging.getLogger("potluck.api")
_throttle = LogThrottle()


@dataclass(frozen=True)
class HttpLimits:
    max_connections: int = 1024
    max_request_bytes: int = 8 * 2**20
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    idle_timeout_s: float = 5.0
    max_header_bytes: int = 64 * 2**10


def uvicorn_options(limits: HttpLimits) -> dict[str, Any]:
    return {
        "http": bounded_protocol(limits),
        "timeout_keep_alive": max(1, int(limits.idle_timeout_s)),
        "h11_max_incomplete_event_size": limits.max_header_bytes,
    }


def bounded_protocol(limits: HttpLimits) -> type[H11Protocol]:
    class BoundedH11Protocol(H11Protocol):
        refused_connections = 0  # over the whole server (class of this server only)

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > limits.max_connections:
                BoundedH11Protocol.refused_connections += 1
                _throttle.warning(log, "connections", "refused a connection: %d open (the limit)", limits.max_connections)
                transport.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                transport.close()
                return
            self._arm_header_timer()

        def _arm_header_timer(self) -> None:
            cycle = self.cycle
            self._header_timer = self.loop.call_later(limits.header_timeout_s, self._on_header_timer, cycle)

        def _on_header_timer(self, cycle_then: Any) -> None:
            if self.transport.is_closing():
                return
            busy = self.cycle is not None and not self.cycle.response_complete
            if self.cycle is cycle_then and not busy:  # no request head came in a whole period
                _throttle.warning(log, "header timeout", "closed a connection that sent no request within %.0f s", limits.header_timeout_s)
                self.transport.close()
                return
            self._arm_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            timer = getattr(self, "_header_timer", None)
            if timer is not None:
                timer.cancel()
            super().connection_lost(exc)

    return BoundedH11Protocol


class BodyLimitMiddleware:
    """Pure ASGI: 413 past `max_request_bytes`, 408 when the body stalls past `body_timeout_s`."""

    def __init__(self, app: ASGIApp, limits: HttpLimits) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limits.max_request_bytes
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            await self._refuse(scope, receive, send, int(declared) if declared.isdigit() else None)
            return
        # the body is read here, bounded in size and time, then handed on whole (it is at most
        # `max_request_bytes`): past the limit a 413, stalled a 408, before the app sees anything
        chunks: list[bytes] = []
        received = 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), timeout=self.limits.body_timeout_s)
            except TimeoutError:
                _throttle.warning(log, "body timeout", "a request body stalled for %.0f s: 408", self.limits.body_timeout_s)
                response = error_response(408, f"the request body did not arrive within {self.limits.body_timeout_s:.0f} s",
                                          "invalid_request_error", None, "request_timeout", headers={"Connection": "close"})
                await response(scope, receive, send)
                return
            if message["type"] != "http.request":
                return  # the client went away
            body = message.get("body", b"")
            received += len(body)
            if received > limit:
                await self._refuse(scope, receive, send, None)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        whole = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": whole, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, size: int | None) -> None:
        limit = self.limits.max_request_bytes
        _throttle.warning(log, "413", "refused a request body over %d bytes: 413", limit)
        what = f"{size} bytes" if size is not None else "larger than that"
        response = error_response(413, f"the request body is {what}; this server takes at most {limit} bytes",
                                  "invalid_request_error", None, "request_too_large", headers={"Connection": "close"})
        await response(scope, receive, send)
