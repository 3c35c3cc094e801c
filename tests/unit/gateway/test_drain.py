"""The drain's order on signals: SIGTERM turns readiness off and waits DRAIN_DELAY_S before
uvicorn's own shutdown; SIGINT, a second SIGTERM, or no delay go straight to it."""

from __future__ import annotations

import signal
import time

import uvicorn

from gateway.drain import Drain, DrainingServer


async def app(scope: object, receive: object, send: object) -> None:  # never called: no server runs
    raise AssertionError


def server(delay_s: float) -> DrainingServer:
    return DrainingServer(uvicorn.Config(app), Drain(), delay_s)


async def test_sigterm_turns_readiness_off_and_waits_the_delay_before_shutting_down() -> None:
    s = server(5.0)
    s.handle_exit(signal.SIGTERM, None)
    assert s.drain.started and not s.should_exit
    assert await s.on_tick(1) is False, "still serving, listener open and clients untouched"
    assert s.drain.since is not None
    s.drain.since -= 5.0
    assert await s.on_tick(2) is True and s.should_exit


async def test_a_second_sigterm_or_sigint_does_not_wait() -> None:
    s = server(5.0)
    s.handle_exit(signal.SIGTERM, None)
    s.handle_exit(signal.SIGTERM, None)
    assert s.should_exit
    s = server(5.0)
    s.handle_exit(signal.SIGINT, None)
    assert s.drain.started and s.should_exit


async def test_without_a_delay_sigterm_is_uvicorns_shutdown_at_once() -> None:
    s = server(0.0)
    s.handle_exit(signal.SIGTERM, None)
    assert s.drain.started and s.should_exit


def test_the_drain_starts_once() -> None:
    drain = Drain()
    assert not drain.started
    drain.start()
    first = drain.since
    time.sleep(0.01)
    drain.start()
    assert drain.since == first
