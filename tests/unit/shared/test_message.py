"""What a Kafka record must be to be a roomcast message: anything else is skipped by every reader."""

from __future__ import annotations

from dataclasses import replace

import orjson
import pytest

from shared.cursor import Position
from shared.message import Message

GOOD = {"id": "01M8YPFN1Q6RDJ8FE9ZP536S6F", "room": "lobby", "user": "alice", "body": "hi", "ts": 1796326544439,
        "cmid": "a-1"}


def test_a_message_as_a_gateway_writes_it() -> None:
    msg = Message("01M8YPFN1Q6RDJ8FE9ZP536S6F", "lobby", "alice", "hi", 1796326544439, "a-1")
    assert Message.from_kafka(msg.kafka_value(), 3, 9) == replace(msg, position=Position(3, 9))
    assert Message.from_kafka(orjson.dumps(GOOD), 3, 9) == replace(msg, position=Position(3, 9))
    without_cmid = {k: v for k, v in GOOD.items() if k != "cmid"}
    assert Message.from_kafka(orjson.dumps(without_cmid), 0, 0).client_msg_id == ""


@pytest.mark.parametrize("value", [
    b"\xff\xfe garbage", b"", b"null", b"[1, 2, 3]", b'"lobby"', b"42",
    orjson.dumps({k: v for k, v in GOOD.items() if k != "body"}),  # a field missing
    orjson.dumps({**GOOD, "id": 5}), orjson.dumps({**GOOD, "body": {"$gt": ""}}), orjson.dumps({**GOOD, "user": None}),
    orjson.dumps({**GOOD, "ts": "soon"}), orjson.dumps({**GOOD, "ts": 1.5}), orjson.dumps({**GOOD, "ts": True}),
    orjson.dumps({**GOOD, "cmid": 7}),
    orjson.dumps({**GOOD, "room": "two words"}), orjson.dumps({**GOOD, "room": "x" * 65}),
    orjson.dumps({**GOOD, "room": "{p0}"}), orjson.dumps({**GOOD, "room": ".."}),
])
def test_anything_else_is_not_a_message(value: bytes) -> None:
    with pytest.raises((ValueError, KeyError, TypeError)):
        Message.from_kafka(value, 0, 0)
