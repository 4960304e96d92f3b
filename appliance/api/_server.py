"""The API's HTTP server: uvicorn, with the read deadlines and the caps it lacks (issue 12,
finding 11).

Threat. A client that sends its request line, its headers or its body slowly, or never, holds a
socket, a protocol object and up to 64 KiB of buffered body (with the kernel's buffers, about
254 KiB were measured) for as long as it likes: uvicorn closes idle keep-alive connections but
has no deadline for reading a request and no cap on connections, so 1,500 half-sent requests
stayed open for good.

Enforcement, where every byte of every connection passes (the HTTP protocol object), because
uvicorn has no setting for it and a reverse proxy is one more service to run and harden:

- Header deadline: the request line and the headers must be complete `header_seconds` after
  the connection was made, or, on a kept-alive connection, after the first byte of the next
  request. Otherwise the connection is closed, before the app ever sees the request.
- Body deadline: the body must be complete `body_seconds` + `BODY_GRACE_SECONDS` after the
  headers, or the connection is closed. The app reads the body under `body_seconds` itself
  (`_requests.read_body`) and answers `408 body_timeout` first, so an honest slow client learns
  why; the protocol's deadline also covers a body the app never reads.
- Concurrency: a request whose headers arrive while `limit_concurrency` requests are in
  progress (the app works on them or still reads their body) is answered `503 over_capacity`
  (problem+json, with Retry-After). This is uvicorn's `--limit-concurrency` counted on requests
  only: uvicorn's own counts idle and half-sent connections as well, so slow clients at the
  limit would lock every honest client out; here a client still sending its headers costs no
  request slot, only a connection, and is gone at its deadline.
- Connections: beyond `max_connections` open at once, a new connection is closed as soon as it
  is accepted, before anything is read, so sockets and their buffers stay bounded whatever the
  rate of new connections (about 50 KiB of the API's memory each was measured, plus the
  kernel's socket buffers).

Between requests, uvicorn's own keep-alive timeout (5 s) still closes idle connections.

Over TLS (issue 15) the protocol object only sees a connection once its handshake is done, so
the handshake gets a deadline of its own, the header deadline (`handshake_bounded_loop`):
asyncio's default would let a client that never finishes it hold the socket for 60 s. The
connection cap counts connections from the end of their handshake.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import uvloop
from uvicorn.protocols.http.flow_control import service_unavailable
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ..settings import Settings
from ._problems import problem

log = logging.getLogger("appliance.api.server")

#: How much longer than the app the protocol waits for a body, so that the app's 408 goes first.
BODY_GRACE_SECONDS = 5.0


@dataclass(frozen=True)
class ReadLimits:
    """How long a request may take to arrive, and how many connections may be open."""

    header_seconds: float
    body_seconds: float
    limit_concurrency: int
    max_connections: int

    @classmethod
    def from_settings(cls, settings: Settings) -> ReadLimits:
        return cls(
            settings.api_header_timeout_seconds,
            settings.api_body_timeout_seconds,
            settings.api_limit_concurrency,
            settings.api_max_connections,
        )


class DeadlineHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header and a body deadline, a limit on requests in
    progress and a cap on connections."""

    limits: ClassVar[ReadLimits]
    _deadline: asyncio.TimerHandle | None = None
    _phase: str | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            log.warning("connection refused: %d open connections", len(self.connections) - 1)
            transport.close()
            return
        self._arm("headers", self.limits.header_seconds)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._phase is None:  # The first byte of a next request on a kept-alive connection.
            self._arm("headers", self.limits.header_seconds)

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._arm("body", self.limits.body_seconds + BODY_GRACE_SECONDS)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        if app is service_unavailable or len(self.tasks) >= self.limits.limit_concurrency:
            app = _over_capacity
        super()._start_asgi_task(cycle, app)

    def _arm(self, phase: str, seconds: float) -> None:
        self._disarm()
        self._phase = phase
        self._deadline = self.loop.call_later(seconds, self._expired, phase)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline, self._phase = None, None

    def _expired(self, phase: str) -> None:
        self._deadline, self._phase = None, None
        if not self.transport.is_closing():
            log.info("connection closed: its request %s did not arrive in time", phase)
            self.transport.close()


async def _over_capacity(scope: Any, receive: Any, send: Any) -> None:
    response = problem(
        503,
        code="over_capacity",
        title="Service unavailable",
        detail="too many requests in progress; retry shortly",
        headers={"Retry-After": "1", "Connection": "close"},
    )
    await response(scope, receive, send)


def protocol(limits: ReadLimits) -> type[DeadlineHttpProtocol]:
    """The protocol class uvicorn instantiates per connection, bound to `limits`."""
    return type("BoundDeadlineHttpProtocol", (DeadlineHttpProtocol,), {"limits": limits})


def handshake_bounded_loop(handshake_seconds: float) -> Callable[[], asyncio.AbstractEventLoop]:
    """A loop factory (uvicorn's loop, uvloop) whose TLS servers close a connection whose
    handshake is not complete `handshake_seconds` after it was accepted."""

    class HandshakeBoundedLoop(uvloop.Loop):
        async def create_server(self, *args: Any, **kwargs: Any) -> Any:
            if kwargs.get("ssl") is not None:
                kwargs.setdefault("ssl_handshake_timeout", handshake_seconds)
            return await super().create_server(*args, **kwargs)

    return HandshakeBoundedLoop
