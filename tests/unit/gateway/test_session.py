"""A session's outbound side: ordered, bounded, paced replays, frames held back while recovering."""

from __future__ import annotations

import asyncio

import pytest

from gateway.protocol import Close
from gateway.session import TOO_SLOW_REASON, Session
from gateway.wire import text_frame
from shared.auth import Identity

pytestmark = pytest.mark.timeout(10)


class FakeSocket:
    """Records what is written; `gate` cleared = the client does not read (each write blocks)."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.closed: tuple[int, str | None] | None = None
        self.gate = asyncio.Event()
        self.gate.set()

    async def send_text(self, data: str) -> None:
        await self.gate.wait()
        self.sent.append(data)

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        self.closed = (code, reason)


def session(queue_max: int = 10) -> tuple[Session, FakeSocket]:
    sock = FakeSocket()
    return Session(Identity("ann", ("*",), None), sock, queue_max), sock


async def until(check: object, timeout: float = 2.0) -> None:
    async with asyncio.timeout(timeout):
        while not check():  # type: ignore[operator]
            await asyncio.sleep(0.001)


async def test_frames_go_out_in_order_and_the_close_follows_them() -> None:
    s, sock = session()
    sender = asyncio.create_task(s.run_sender())
    for i in range(3):
        s.push(f"f{i}")
    await until(lambda: len(sock.sent) == 3)
    s.push("f3")  # pushed while the sender waits: it wakes up
    await until(lambda: len(sock.sent) == 4)
    s.close(Close.DRAINING, "bye")
    await asyncio.wait_for(sender, 1)
    assert sock.sent == ["f0", "f1", "f2", "f3"]
    assert sock.closed == (Close.DRAINING, "bye")
    s.push("late")
    assert s.queued == 0


async def test_a_client_that_does_not_read_is_closed_4008_when_its_queue_is_full() -> None:
    s, sock = session(queue_max=4)
    sock.gate.clear()
    sender = asyncio.create_task(s.run_sender())
    s.push("first")
    await asyncio.sleep(0.01)  # the sender took it and waits for the client
    assert s.queued == 0
    for i in range(4):
        s.push(f"f{i}")
    assert s.close_code is None and s.queued == 4
    s.push("one too many")
    assert (s.close_code, s.close_reason) == (Close.TOO_SLOW, TOO_SLOW_REASON)
    sock.gate.set()
    await asyncio.wait_for(sender, 1)
    assert sock.sent == ["first"], "what was queued behind the close is not sent"
    assert sock.closed == (Close.TOO_SLOW, TOO_SLOW_REASON)


async def test_the_bound_counts_frames_the_sender_took_but_did_not_write_yet() -> None:
    s, sock = session(queue_max=3)
    for i in range(3):
        s.push(f"f{i}")
    sock.gate.clear()
    sender = asyncio.create_task(s.run_sender())
    await asyncio.sleep(0.01)  # took all three, blocked writing the first
    assert s.queued == 2
    s.push("f3")
    assert s.close_code is None
    s.push("f4")
    assert s.close_code == Close.TOO_SLOW
    sock.gate.set()
    await asyncio.wait_for(sender, 1)


async def test_a_replay_is_paced_by_the_client_and_never_trips_the_bound() -> None:
    s, sock = session(queue_max=4)
    sock.gate.clear()
    sender = asyncio.create_task(s.run_sender())
    replay = asyncio.create_task(s.push_paced([f"r{i}" for i in range(50)]))
    await asyncio.sleep(0.02)
    assert not replay.done() and s.queued < 4  # it waits for the client
    sock.gate.set()
    await asyncio.wait_for(replay, 2)
    await until(lambda: len(sock.sent) == 50)
    assert sock.sent == [f"r{i}" for i in range(50)]
    assert s.close_code is None
    s.close(Close.NORMAL)
    await asyncio.wait_for(sender, 1)


async def test_two_replays_wait_together_and_a_close_releases_them() -> None:
    s, sock = session(queue_max=2)
    sock.gate.clear()
    sender = asyncio.create_task(s.run_sender())
    replays = [asyncio.create_task(s.push_paced([f"{k}{i}" for i in range(10)])) for k in "ab"]
    await asyncio.sleep(0.02)
    assert not any(r.done() for r in replays)
    s.close(Close.TOO_SLOW, TOO_SLOW_REASON)
    await asyncio.wait_for(asyncio.gather(*replays), 1)
    sock.gate.set()
    await asyncio.wait_for(sender, 1)
    assert sock.closed == (Close.TOO_SLOW, TOO_SLOW_REASON)


async def test_live_frames_are_held_back_while_their_room_recovers_then_follow_the_replay() -> None:
    s, sock = session()
    sender = asyncio.create_task(s.run_sender())
    s.recovering["r"] = []  # as recovery.resume does
    s.deliver("r", 10, "live10")
    s.deliver("other", 3, "other3")  # another room is live meanwhile
    s.deliver("r", 11, "live11")
    await s.push_paced(["old8", "old9"])
    for _, frame in s.recovering.pop("r", []):
        s.push(frame)
    s.deliver("r", 12, "live12")
    await until(lambda: len(sock.sent) == 6)
    assert sock.sent == ["other3", "old8", "old9", "live10", "live11", "live12"]
    s.close(Close.NORMAL)
    await asyncio.wait_for(sender, 1)


async def test_too_many_frames_held_back_close_the_session_4008() -> None:
    s, _ = session(queue_max=3)
    s.recovering["r"] = []
    for i in range(3):
        s.deliver("r", i, f"f{i}")
    assert s.close_code is None
    s.deliver("r", 3, "f3")
    assert s.close_code == Close.TOO_SLOW


async def test_a_client_resumed_ahead_of_this_node_gets_no_live_repeat() -> None:
    """Its last gateway fanned out up to 11 before it died; this one is at 10: the resume replays
    nothing, and 10 and 11, still to come live here, are repeats (the fault oracle saw them)."""
    s, sock = session()
    sender = asyncio.create_task(s.run_sender())
    s.recovering["r"] = []  # as recovery.resume does
    s.skip_through("r", 11)
    s.deliver("r", 10, "live10")
    for _, frame in s.recovering.pop("r", []):
        s.push(frame)
    for offset in (11, 12, 13):
        s.deliver("r", offset, f"live{offset}")
    s.deliver("other", 5, "other5")  # (other rooms as ever)
    await until(lambda: len(sock.sent) == 3)
    assert sock.sent == ["live12", "live13", "other5"]
    s.skip_through("r", 20)
    s.stop_recovering("r")  # left: its floor goes too
    s.deliver("r", 14, "live14")
    await until(lambda: len(sock.sent) == 4)
    s.close(Close.NORMAL)
    await asyncio.wait_for(sender, 1)


def test_leaving_a_recovering_room_forgets_its_held_frames() -> None:
    s, _ = session()
    s.recovering["r"] = [(1, "f1")]
    s.stop_recovering("r")
    s.stop_recovering("never-joined")
    assert s.recovering == {}
    s.deliver("r", 2, "f2")
    assert s.queued == 1


async def test_a_cancelled_sender_does_not_break_fan_out() -> None:
    s, _ = session()
    sender = asyncio.create_task(s.run_sender())
    await asyncio.sleep(0.01)  # waiting for frames
    sender.cancel()
    s.push("after the connection ended")  # (fan-out may still hold the session for a moment)
    s.close(Close.NORMAL)
    with pytest.raises(asyncio.CancelledError):
        await sender


async def test_writing_that_fails_closes_the_socket_so_the_connection_ends() -> None:
    s, sock = session()

    async def broken(data: str) -> None:
        raise RuntimeError("a bug")

    sock.send_text = broken  # type: ignore[method-assign]
    sender = asyncio.create_task(s.run_sender())
    s.push("f")
    with pytest.raises(RuntimeError):
        await asyncio.wait_for(sender, 1)
    assert sock.closed == (1011, "internal error") and s.close_code == 1011


class DirectWriter:
    """The connection's direct writer (gateway/wire.py): takes frames while `open`, else refuses."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.open = True

    def __call__(self, frame: bytes) -> bool:
        if self.open:
            self.frames.append(frame)
        return self.open


def texts(frames: list[bytes]) -> list[str]:
    return [f[2:].decode() for f in frames]  # (short unmasked text frames: a 2-byte header)


async def test_an_idle_sender_lets_frames_be_written_at_once_serialised_once() -> None:
    writer, sock = DirectWriter(), FakeSocket()
    s = Session(Identity("ann", ("*",), None), sock, 10, writer)
    sender = asyncio.create_task(s.run_sender())
    await asyncio.sleep(0)  # the sender is idle
    prepared = text_frame(b"shared")
    s.deliver("r", 1, "shared", prepared)
    s.push("reply")
    assert writer.frames[0] is prepared, "the node's serialised frame is written as it is"
    assert texts(writer.frames) == ["shared", "reply"]
    assert sock.sent == [] and s.queued == 0
    sender.cancel()


async def test_while_frames_wait_new_ones_queue_behind_them_in_order() -> None:
    writer, sock = DirectWriter(), FakeSocket()
    s = Session(Identity("ann", ("*",), None), sock, 10, writer)
    sender = asyncio.create_task(s.run_sender())
    await asyncio.sleep(0)
    writer.open = False  # the client stopped reading: the connection refuses direct writes
    sock.gate.clear()
    s.push("f0")  # refused: queued, and the sender waits for the client with it
    await asyncio.sleep(0.01)
    writer.open = True
    s.push("f1")  # must not overtake f0
    s.push("f2")
    assert writer.frames == []
    sock.gate.set()
    await until(lambda: sock.sent == ["f0", "f1", "f2"])
    await asyncio.sleep(0.01)  # the sender is idle again: direct writes resume
    s.push("f3")
    assert texts(writer.frames) == ["f3"]
    sender.cancel()
