"""The gateway ASGI app: routes, and the lifespan that builds and tears down the node."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket

from gateway import metrics
from gateway.apidocs import bundled_json
from gateway.devtoken import dev_token
from gateway.drain import Drain
from gateway.endpoint import ws_endpoint
from gateway.fanout import Fanout
from gateway.history import HistoryReader
from gateway.hub import Hub
from gateway.node import Node, TypingThrottle
from gateway.presence import Presence
from gateway.publisher import Publisher
from gateway.quota import Quota
from gateway.readstate import ReadState
from gateway.rest import publish, room_messages, room_presence
from gateway.signals import Signals, new_signal_producer
from gateway.tail import new_tail
from shared.kafka import new_consumer, new_producer, wait_for_topic
from shared.keys import Keys
from shared.mysql import create_pool
from shared.redisconn import connect
from shared.settings import Settings

log = logging.getLogger("roomcast.gateway")
STATIC = Path(__file__).parent / "static"


def create_app(settings: Settings, drain: Drain | None = None) -> Starlette:
    """The app; `drain` is shared with the server that stops it (gateway.drain)."""
    drain = drain or Drain()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Node]]:
        await wait_for_topic(settings)
        redis = connect(settings, timeout_s=5, connect_timeout_s=3)
        mysql = await create_pool(settings.mysql_dsn, settings.mysql_pool_max)
        producer = new_producer(settings)
        await producer.start()
        hub = Hub()
        fanout = Fanout(settings, hub, new_tail(settings))
        await fanout.start()
        keys = Keys(settings.redis_prefix, settings.kafka_partitions)
        signals = Signals(settings, hub, new_signal_producer(settings), new_consumer(settings))
        await signals.start()
        presence = Presence(settings, keys, redis, hub, signals)
        presence.start()
        node = Node(settings, keys, hub, fanout, producer, Publisher(settings, producer, redis), redis, mysql,
                    HistoryReader(settings, keys, redis, mysql), signals, presence,
                    ReadState(settings, keys, redis, mysql, producer, signals, presence),
                    Quota(settings, keys, redis), TypingThrottle(settings.typing_interval_s), drain=drain)
        fan_task = asyncio.create_task(fanout.run(), name="fanout")
        fan_task.add_done_callback(lambda t: _fanout_died(t, fanout))
        sig_task = asyncio.create_task(signals.run(), name="signals")
        sig_task.add_done_callback(_signals_died)
        renew_task = asyncio.create_task(node.quota.renew_forever(node.users), name="quota-renewal")
        renew_task.add_done_callback(_renewal_died)
        log.info("gateway ready", extra={"port": settings.port})
        try:
            yield {"node": node}
        finally:
            drain.start()
            await presence.close()  # this node's users leave the rooms (before Redis closes)
            for task in (fan_task, sig_task, renew_task):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await signals.stop()
            await node.quota.retire()
            await producer.stop()  # flushes what is still buffered
            await node.publisher.close()  # acks gathered for Redis, before its client closes
            await fanout.stop()
            mysql.close()
            await mysql.wait_closed()
            await redis.aclose()
            log.info("gateway stopped")

    routes = [
        WebSocketRoute("/ws", ws_endpoint),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        *([Route("/metrics", metrics_endpoint)] if settings.metrics_public else []),
        Route("/rooms/{room}/messages", room_messages, methods=["GET"]),
        Route("/rooms/{room}/messages", publish, methods=["POST"]),
        Route("/rooms/{room}/presence", room_presence),
        Route("/openapi.json", json_document(bundled_json("openapi.yaml"))),
        Route("/asyncapi.json", json_document(bundled_json("asyncapi.yaml"))),
        *([Route("/dev/token", dev_token(settings))] if settings.dev_mode else []),
    ]
    if (STATIC / "index.html").exists():
        routes.append(Mount("/", StaticFiles(directory=STATIC, html=True), name="static"))
    middleware = []
    if settings.metrics_port:
        middleware.append(Middleware(MetricsPort, port=settings.metrics_port))
    return Starlette(routes=routes, middleware=middleware, lifespan=lifespan)


class WebSocketFirst:
    """The gateway's ASGI entry: a connection to `/ws` on the public port goes straight to its
    endpoint, everything else through the app's middleware and router (the `/ws` route there is the
    same endpoint). Each of those layers is a coroutine frame an idle connection would keep for its
    whole life: about 3 KB per connection."""

    def __init__(self, app: ASGIApp, metrics_port: int | None) -> None:
        self.app = app
        self.metrics_port = metrics_port

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] == "websocket" and scope["path"] == "/ws"
                and (self.metrics_port is None or (scope.get("server") or (None, None))[1] != self.metrics_port)):
            await ws_endpoint(WebSocket(scope, receive, send))
        else:
            await self.app(scope, receive, send)


class MetricsPort:
    """What comes in on the metrics port (METRICS_PORT, beside the public one) sees /metrics and
    nothing else; the public port serves /metrics only when METRICS_PUBLIC is true."""

    def __init__(self, app: ASGIApp, port: int) -> None:
        self.app = app
        self.port = port
        self.metrics = Starlette(routes=[Route("/metrics", metrics_endpoint)])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        server = scope.get("server")
        if scope["type"] != "lifespan" and server is not None and server[1] == self.port:
            await self.metrics(scope, receive, send)
        else:
            await self.app(scope, receive, send)


def _renewal_died(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.critical("the renewal of this node's connection counts crashed", exc_info=task.exception())


def _fanout_died(task: asyncio.Task[None], fanout: Fanout) -> None:
    if not task.cancelled() and task.exception() is not None:
        fanout.failed = task.exception()
        log.critical("fan-out consumer crashed; this node is not ready", exc_info=task.exception())


def _signals_died(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.critical("signals consumer crashed; presence, typing and receipts stop here", exc_info=task.exception())


def json_document(body: bytes) -> Callable[[Request], Awaitable[Response]]:
    """A route handler answering with one fixed JSON document (the API's specs)."""

    async def endpoint(request: Request) -> Response:
        return Response(body, media_type="application/json")

    return endpoint


async def healthz(request: Request) -> Response:
    return PlainTextResponse("ok")


async def readyz(request: Request) -> Response:
    node: Node = request.state.node
    if node.drain.started:
        return JSONResponse({"ready": False, "reason": "draining"}, status_code=503)
    ok, reason = node.fanout.ready()
    if ok and (trouble := node.publisher.broker_trouble()):
        ok, reason = False, trouble
    return JSONResponse({"ready": ok, "reason": reason, "lag": node.fanout.lag()}, status_code=200 if ok else 503)


async def metrics_endpoint(request: Request) -> Response:
    node: Node = request.state.node
    for partition, lag in node.fanout.lag_by_partition().items():
        metrics.FANOUT_LAG.labels(str(partition)).set(lag)
    metrics.FANOUT_QUEUE.set(sum(s.queued for s in node.hub.sessions))
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
