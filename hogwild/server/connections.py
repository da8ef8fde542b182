"""Bounding what slow, stalled or too many clients can hold: uvicorn's h11 protocol with two guards.

- **A request must arrive in time.** From the moment a connection opens (or its last response
  ends), a request has ``request_timeout_s`` to arrive whole, headers and body; a connection
  that sends nothing, half its headers or half its body by then is answered ``408`` (when it had
  begun a request and no response has started) and closed. The ASGI app never sees a request
  whose headers are incomplete, so this has to live in the protocol.
- **A cap on open connections.** A connection beyond ``max_connections`` is answered ``503`` with
  ``Retry-After`` at once and closed, before anything of it is read.

uvicorn's own ``timeout_keep_alive`` closes idle keep-alive connections between requests; the
headers' size is bounded by h11 (16 KiB), and the body's by ``security.BodyLimit``.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .responses import RETRY_AFTER_S, error_body

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConnectionLimits:
    """``request_timeout_s``: seconds a request may take to arrive whole; ``max_connections``:
    connections open at once; ``keep_alive_s``: how long an idle connection stays open."""

    request_timeout_s: float = 15.0
    max_connections: int = 256
    keep_alive_s: float = 5.0


def canned(status: int, reason: str, message: str, extra: str = "") -> bytes:
    """A complete HTTP/1.1 error response in OpenAI's shape that closes the connection."""
    body = json.dumps(error_body(message, "invalid_request_error" if status < 500 else "server_error"))
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n{extra}\r\n{body}").encode()


TOO_MANY = canned(503, "Service Unavailable", "too many open connections; retry later",
                  f"Retry-After: {RETRY_AFTER_S}\r\n")


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on each request's arrival and a cap on connections."""

    def __init__(self, *args, limits: ConnectionLimits, **kwargs):
        super().__init__(*args, **kwargs)
        self.limits = limits
        self.deadline = None  # asyncio.TimerHandle while a request is due
        self.begun = False  # bytes of the current request have arrived

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            log.warning("refused a connection: %d are open (the limit is %d)", len(self.connections) - 1,
                        self.limits.max_connections)
            transport.write(TOO_MANY)
            transport.close()
            return
        self._arm()

    def data_received(self, data: bytes) -> None:
        self.begun = True
        super().data_received(data)
        if self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):  # the request has arrived whole
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self.begun = False
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm()  # the next request is due (uvicorn's keep-alive timer may close it sooner)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self.deadline = self.loop.call_later(self.limits.request_timeout_s, self._timed_out)

    def _disarm(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def _timed_out(self) -> None:
        self.deadline = None
        if self.transport.is_closing() or self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):
            return
        if self.begun and (self.cycle is None or not self.cycle.response_started):
            self.transport.write(canned(408, "Request Timeout", f"the request did not arrive whole within "
                                                                 f"{self.limits.request_timeout_s:g} s"))
        log.info("closed a connection whose request did not arrive within %g s", self.limits.request_timeout_s)
        self.transport.close()


def protocol(limits: ConnectionLimits):
    """The ``http`` protocol factory of a ``uvicorn.Config`` that applies ``limits``."""
    return functools.partial(GuardedH11Protocol, limits=limits)
