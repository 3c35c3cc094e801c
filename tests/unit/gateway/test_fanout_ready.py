"""/readyz's decision: a node that accepts clients but would not deliver to them is not ready."""

from __future__ import annotations

import time

from gateway.fanout import Fanout
from gateway.hub import Hub
from shared.settings import Settings


class FakeTail:  # the unit's edge: only what Fanout.ready reads
    def __init__(self, highwater: dict[int, int]) -> None:
        self.high = highwater
        self.answered: dict[int, float] = {p: time.time() * 1000 for p in highwater}  # last fetch answer

    def highwater(self, partition: int) -> int | None:
        return self.high.get(partition)

    def answered_ms(self, partition: int) -> float | None:
        return self.answered.get(partition)


def fanout(high: dict[int, int], positions: dict[int, int], **settings: object) -> Fanout:
    f = Fanout(Settings(ready_max_lag=100, ready_stall_s=5.0, **settings), Hub(), FakeTail(high))  # type: ignore[arg-type]
    f.partitions = list(high)
    f.positions = dict(positions)
    f.started = True
    f.started_ms = time.time() * 1000
    return f


def test_caught_up_is_ready() -> None:
    assert fanout({0: 10, 1: 5}, {0: 10, 1: 5}).ready() == (True, "ok")


def test_not_started_is_not_ready() -> None:
    f = fanout({0: 0}, {0: 0})
    f.started = False
    assert f.ready()[0] is False


def test_lag_beyond_the_setting_is_not_ready() -> None:
    ok, reason = fanout({0: 500}, {0: 10}).ready()
    assert not ok and "lag 490" in reason


def test_lagging_without_advancing_is_not_ready_but_lagging_while_advancing_is() -> None:
    f = fanout({0: 50}, {0: 10})
    assert f.ready()[0] is True
    f.last_advance = time.monotonic() - 10
    ok, reason = f.ready()
    assert not ok and "not advancing" in reason
    f.tail.high[0] = 10  # type: ignore[attr-defined]  # caught up: nothing to deliver, silence is fine
    assert f.ready()[0] is True


def test_a_stuck_loop_or_a_dead_consumer_is_not_ready() -> None:
    f = fanout({0: 10}, {0: 10})
    f.last_poll = time.monotonic() - 10
    assert f.ready() == (False, "fan-out loop stuck")
    f.last_poll = time.monotonic()
    f.failed = RuntimeError("boom")
    assert f.ready()[0] is False


def test_lag_is_reported_per_partition() -> None:
    assert fanout({0: 12, 1: 3, 2: 7}, {0: 10, 1: 3}).lag_by_partition() == {0: 2, 1: 0, 2: 7}


def test_a_broker_that_stopped_answering_fetches_is_not_ready_even_with_no_known_lag() -> None:
    f = fanout({0: 10, 1: 10}, {0: 10, 1: 10})
    f.tail.answered[1] = time.time() * 1000 - 8000  # type: ignore[attr-defined]  # cut off 8 s ago
    ok, reason = f.ready()
    assert not ok and "no fetch answered by the broker for 8s" in reason
    f.tail.answered[1] = time.time() * 1000  # type: ignore[attr-defined]  # it answers again
    assert f.ready() == (True, "ok")


def test_a_partition_never_answered_counts_from_the_start() -> None:
    f = fanout({0: 0}, {0: 0})
    del f.tail.answered[0]  # type: ignore[attr-defined]
    assert f.ready()[0] is True
    f.started_ms -= 6000
    assert f.ready()[0] is False
