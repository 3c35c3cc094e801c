"""How the gateway listens: uvicorn's HTTP protocol with a deadline on each request's head, and
the metrics port beside the public one (one server, one event loop).

uvicorn has no deadline for a request that never completes: a connection that sends nothing, or
a header line now and then (slowloris), would hold its socket and memory for ever. Here the head
of every request (the handshake of a WebSocket) must be complete within AUTH_TIMEOUT_S of its
first byte (of the connection's start for the first); past it the connection is closed. (uvicorn's
`limit_concurrency` does not fit: it answers plain HTTP 503 once the connections, WebSockets
included, pass the limit, so a node full of chat clients would fail its probes, while upgrades are
never refused.)
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from shared.settings import Settings


class HeadDeadlineProtocol(HttpToolsProtocol):
    head_timeout_s = 5.0  # (a subclass per process sets it: see http_protocol)
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.head_timeout_s, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.close()


def http_protocol(settings: Settings) -> type[HeadDeadlineProtocol]:
    return type("HeadDeadlineProtocol", (HeadDeadlineProtocol,), {"head_timeout_s": settings.auth_timeout_s})


def listening_sockets(settings: Settings) -> list[socket.socket]:
    """The public port, and the metrics port when there is one (the app tells them apart by the
    port a request came in on). Bound, not listening: uvicorn listens once the lifespan is up, so
    until then a connection is refused, not left waiting."""
    out = []
    for port in (settings.port, settings.metrics_port):
        if port:
            sock = socket.socket(socket.AF_INET6 if ":" in settings.host else socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((settings.host, port))
            out.append(sock)
    return out
