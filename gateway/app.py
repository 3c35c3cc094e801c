"""The gateway ASGI app: routes, and the lifespan that builds and tears down the node."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import redis.asyncio as aioredis
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway import metrics
from gateway.devtoken import dev_token
from gateway.endpoint import ws_endpoint
from gateway.fanout import Fanout
from gateway.history import HistoryReader
from gateway.hub import Hub
from gateway.node import Node
from gateway.publisher import Publisher
from gateway.quota import Quota
from gateway.rest import room_messages
from shared.kafka import new_consumer, new_producer, wait_for_topic
from shared.keys import Keys
from shared.mysql import create_pool
from shared.settings import Settings

log = logging.getLogger("roomcast.gateway")
STATIC = Path(__file__).parent / "static"


def create_app(settings: Settings) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Node]]:
        await wait_for_topic(settings)
        redis = aioredis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=3)
        mysql = await create_pool(settings.mysql_dsn, settings.mysql_pool_max)
        producer = new_producer(settings)
        await producer.start()
        hub = Hub()
        fanout = Fanout(settings, hub, new_consumer(settings))
        await fanout.start()
        keys = Keys(settings.redis_prefix, settings.kafka_partitions)
        node = Node(settings, keys, hub, fanout, producer, Publisher(settings, producer, redis), redis, mysql,
                    HistoryReader(settings, keys, redis, mysql), Quota(settings, keys, redis))
        fan_task = asyncio.create_task(fanout.run(), name="fanout")
        fan_task.add_done_callback(lambda t: _fanout_died(t, fanout))
        renew_task = asyncio.create_task(node.quota.renew_forever(node.users), name="quota-renewal")
        renew_task.add_done_callback(_renewal_died)
        log.info("gateway ready", extra={"port": settings.port})
        try:
            yield {"node": node}
        finally:
            node.draining = True
            fan_task.cancel()
            renew_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await fan_task
            with contextlib.suppress(asyncio.CancelledError):
                await renew_task
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
        Route("/rooms/{room}/messages", room_messages),
        *([Route("/dev/token", dev_token(settings))] if settings.dev_mode else []),
    ]
    if (STATIC / "index.html").exists():
        routes.append(Mount("/", StaticFiles(directory=STATIC, html=True), name="static"))
    middleware = []
    if settings.metrics_port:
        middleware.append(Middleware(MetricsPort, port=settings.metrics_port))
    return Starlette(routes=routes, middleware=middleware, lifespan=lifespan)


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


async def healthz(request: Request) -> Response:
    return PlainTextResponse("ok")


async def readyz(request: Request) -> Response:
    node: Node = request.state.node
    if node.draining:
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
