"""The pure parts of presence, typing and read state: the typing throttle, merging read marks, and
how the client library tells its own user."""

from __future__ import annotations

import base64

import orjson
import pytest
from roomcast_client.client import _subject

from gateway import node
from gateway.node import TypingThrottle
from shared.reads import ReadMark, greatest


def test_typing_passes_once_per_user_and_room_per_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr(node.time, "monotonic", lambda: now[0])
    throttle = TypingThrottle(3.0)
    assert throttle.allow("ann", "lobby")
    assert not throttle.allow("ann", "lobby")
    assert throttle.allow("ann", "other") and throttle.allow("bob", "lobby")
    now[0] += 2.9
    assert not throttle.allow("ann", "lobby")
    now[0] += 0.2
    assert throttle.allow("ann", "lobby")
    now[0] += 10
    for i in range(5):  # old entries are let go as new ones come
        throttle.allow(f"u{i}", "lobby")
    assert len(throttle._last) <= 5 + 2


def test_read_marks_keep_the_greatest_per_user_and_room() -> None:
    marks = [ReadMark("ann", "a", 5), ReadMark("ann", "a", 3), ReadMark("ann", "b", 1), ReadMark("bob", "a", 9),
             ReadMark("ann", "a", 7)]
    assert sorted(greatest(marks), key=lambda m: (m.user, m.room)) == [
        ReadMark("ann", "a", 7), ReadMark("ann", "b", 1), ReadMark("bob", "a", 9)]
    mark = ReadMark("ann", "lobby", 42)
    assert ReadMark.from_value(mark.value()) == mark
    assert mark.key() != ReadMark("ann", "lobby2", 42).key() != ReadMark("ann2", "lobby", 42).key()
    with pytest.raises(ValueError):
        ReadMark.from_value(orjson.dumps({"user": "ann", "room": "a", "offset": "7"}))


def test_the_client_reads_its_user_from_the_token() -> None:
    claims = base64.urlsafe_b64encode(orjson.dumps({"sub": "ann", "rooms": ["*"]})).rstrip(b"=").decode()
    assert _subject(f"h.{claims}.s") == "ann"
    assert _subject("not a token") == "" and _subject("a.b!.c") == ""
