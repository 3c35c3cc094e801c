"""The gateway's stop, in the order a load balancer needs.

uvicorn alone, on SIGTERM, closes its listener and every WebSocket (1012) at once. The clients
reconnect at once as well, and a load balancer that has not yet seen the gateway go (it learns it
from a health check every second or so) sends some of them back to it. So the first SIGTERM only
turns /readyz to 503 and keeps serving, listener open and clients untouched, for DRAIN_DELAY_S:
longer than the balancer needs to take the gateway out of rotation (HAProxy: inter x fall, see
deploy/haproxy). Then uvicorn's shutdown: stop listening, close every WebSocket with 1012 (its
clients resume on another gateway), wait up to DRAIN_GRACE_S, then the lifespan's (the producer
flushes). Kubernetes takes a terminating pod out of its endpoints by itself and the pod's preStop
sleep waits for the ingress to follow, so there the delay is 0.

SIGINT (Ctrl-C, or `roomcast up` stopping the whole cluster after closing its front door) and a
second SIGTERM skip the delay.
"""

from __future__ import annotations

import logging
import signal
import time
from types import FrameType

import uvicorn

log = logging.getLogger("roomcast.gateway.drain")


class Drain:
    """Whether the gateway has begun to stop: /readyz answers 503 from then on."""

    def __init__(self) -> None:
        self.since: float | None = None

    @property
    def started(self) -> bool:
        return self.since is not None

    def start(self) -> None:
        if self.since is None:
            self.since = time.monotonic()


class DrainingServer(uvicorn.Server):
    """uvicorn's server with the delay above between the first SIGTERM and its own shutdown."""

    def __init__(self, config: uvicorn.Config, drain: Drain, delay_s: float) -> None:
        super().__init__(config)
        self.drain = drain
        self.delay_s = delay_s
        self._told = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A signal handler: it only records (the main loop's tick acts on it).
        delay = sig == signal.SIGTERM and not self.drain.started and self.delay_s > 0
        self.drain.start()
        if not delay:
            super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self.drain.since is not None and not self.should_exit:
            if not self._told:
                self._told = True
                log.info("draining: /readyz answers 503; connections close in %.1fs", self.delay_s)
            if time.monotonic() - self.drain.since >= self.delay_s:
                log.info("closing %d connection(s) with 1012", len(self.server_state.connections))
                self.should_exit = True
        return await super().on_tick(counter)
