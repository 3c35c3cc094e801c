"""Process lifecycle for the background services: uvloop, signals set a flag, ordered stop."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Coroutine
from typing import Any

import uvloop

log = logging.getLogger("roomcast.runner")


def run_service(main: Callable[[asyncio.Event], Coroutine[Any, Any, None]]) -> None:
    """Run `main(stop)` on uvloop until it returns; SIGINT/SIGTERM only set `stop`."""

    async def _wrapped() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)

    uvloop.run(_wrapped())


def crash_on_failure(task: asyncio.Task[Any], stop: asyncio.Event) -> None:
    """A background task that dies is logged and stops the service, never swallowed."""

    def _done(t: asyncio.Task[Any]) -> None:
        if not t.cancelled() and t.exception() is not None:
            log.error("background task crashed", exc_info=t.exception(), extra={"task": t.get_name()})
            stop.set()

    task.add_done_callback(_done)
