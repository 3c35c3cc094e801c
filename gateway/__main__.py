"""`roomcast-gateway`: one gateway node on uvicorn (uvloop, websockets-sansio)."""

from __future__ import annotations

import sys

import uvicorn
from uvicorn.main import STARTUP_FAILURE

from gateway.app import WebSocketFirst, create_app
from gateway.drain import Drain, DrainingServer
from gateway.listener import http_protocol, listening_sockets
from gateway.wire import PreparedFramesProtocol
from shared.logging import setup_logging
from shared.settings import Settings


def main() -> None:
    settings = Settings()
    setup_logging("gateway", settings.name, settings.log_level, settings.log_json)
    if problem := settings.unsafe_secret():
        raise SystemExit(f"roomcast-gateway: refusing to start: {problem}")
    drain = Drain()
    config = uvicorn.Config(
        WebSocketFirst(create_app(settings, drain), settings.metrics_port),
        loop="uvloop",
        http=http_protocol(settings),  # httptools, with a deadline on each request's head
        ws=PreparedFramesProtocol,  # websockets-sansio, plus writing a prepared frame at once
        ws_max_size=settings.max_frame_bytes,
        ws_ping_interval=settings.ping_interval_s,
        ws_ping_timeout=settings.ping_interval_s,
        ws_per_message_deflate=False,  # compression costs CPU and ~64 KB per connection
        lifespan="on",
        timeout_graceful_shutdown=int(settings.drain_grace_s) or None,
        log_config=None,
        access_log=False,
        server_header=False,
    )
    server = DrainingServer(config, drain, settings.drain_delay_s)
    server.run(sockets=listening_sockets(settings))
    if not server.started:
        sys.exit(STARTUP_FAILURE)  # as uvicorn.run does when the lifespan's startup failed


if __name__ == "__main__":
    main()
