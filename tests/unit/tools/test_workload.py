"""The simulator's traffic (pure): exact daily volumes, the curve, active rooms, repeatable reads."""

from __future__ import annotations

import math

import pytest

from shared.cursor import Position, parse_cursor
from shared.message import Message
from tools.simulate.workload import DAY_S, PEAK_HOUR, RoomSpec, Traffic, Workload

START_MS = 1_767_571_200_000


def play(w: Workload, rooms: list[RoomSpec] | None = None) -> tuple[Traffic, list[Message], list[list[object]]]:
    """Every tick of the workload, offsets given per room in order; returns the sends and the reads."""
    t = Traffic(w, START_MS, retention_s=DAY_S, page=5, specs=rooms)
    offsets: dict[str, int] = {}
    sent, reads = [], []
    for i in range(w.days * DAY_S // w.tick_s):
        t0, t1 = START_MS + i * w.tick_s * 1000, START_MS + (i + 1) * w.tick_s * 1000
        tick = []
        for m in t.sends(t0, t1):
            offsets[m.room] = offsets.get(m.room, -1) + 1
            tick.append(Message(m.id, m.room, m.user, m.body, m.ts, m.client_msg_id, Position(0, offsets[m.room])))
        t.record(tick)
        sent += tick
        reads.append([(r.room, r.before, r.depth) for r in t.reads(t1, len(tick))])
    return t, sent, reads


@pytest.mark.parametrize("tick_s", [60, 600, 3600])
def test_each_day_sends_exactly_its_volume_within_the_ticks(tick_s: int) -> None:
    w = Workload(users=7, msgs_per_user_day=13, rooms=5, short_lived=0, days=3, tick_s=tick_s)
    t, sent, reads = play(w)
    assert len(sent) == t.sent == 3 * 7 * 13
    for day in range(3):
        assert sum(START_MS + day * DAY_S * 1000 <= m.ts < START_MS + (day + 1) * DAY_S * 1000 for m in sent) == 91
    assert [m.ts for m in sent] == sorted(m.ts for m in sent)
    assert all(w.body_min <= len(m.body) <= w.body_max and len(m.client_msg_id) == 32 for m in sent)
    assert sum(len(r) for r in reads) == t.asked == len(sent)  # one read per message


def test_the_daily_curve_peaks_at_the_peak_hour_and_averages_to_the_volume() -> None:
    w = Workload(users=400, msgs_per_user_day=100, peak_ratio=1.8)
    rates = [w.rate(h * 3600) for h in range(24)]
    assert max(rates) == pytest.approx(w.rate(PEAK_HOUR * 3600)) == pytest.approx(1.8 * 40_000 / DAY_S)
    assert min(rates) == pytest.approx(0.2 * 40_000 / DAY_S)
    assert sum(w.rate(s) for s in range(0, DAY_S, 60)) * 60 == pytest.approx(40_000)


def test_a_room_gets_messages_only_while_it_is_active() -> None:
    rooms = [RoomSpec("always", 1.0, 0, math.inf), RoomSpec("later", 5.0, DAY_S, 1.5 * DAY_S)]
    _, sent, _ = play(Workload(users=20, msgs_per_user_day=20, days=2, tick_s=300), rooms)
    later = [m.ts for m in sent if m.room == "later"]
    assert later and all(START_MS + DAY_S * 1000 <= ts < START_MS + 1.5 * DAY_S * 1000 for ts in later)
    assert {m.room for m in sent} == {"always", "later"}


def test_the_same_seed_gives_the_same_traffic_and_reads_point_into_the_rooms() -> None:
    w = Workload(users=10, msgs_per_user_day=50, rooms=20, days=2, tick_s=600, seed=11)
    _, a, reads_a = play(w)
    _, b, reads_b = play(w)
    assert [(m.room, m.user, m.body, m.ts, m.client_msg_id) for m in a] == \
           [(m.room, m.user, m.body, m.ts, m.client_msg_id) for m in b]
    assert reads_a == reads_b
    depths = {d for tick in reads_a for (_, _, d) in tick}
    assert depths == {"newest", "recent", "deep"}
    counts = {room: sum(m.room == room for m in a) for room in {m.room for m in a}}
    for tick in reads_a:
        for room, before, depth in tick:
            assert room in counts
            if depth == "newest":
                assert before is None
            elif before is not None:  # a page ending inside the room's messages, never before its first page
                pos = parse_cursor(before)
                assert pos is not None and 5 <= pos.offset < counts[room]


def test_a_workload_refuses_impossible_parameters() -> None:
    with pytest.raises(ValueError):
        Workload(tick_s=7)  # does not divide a day
    with pytest.raises(ValueError):
        Workload(peak_ratio=2.5)
    with pytest.raises(ValueError):
        Workload(newest_share=0.9, deep_share=0.2)
