"""A connection's inbound side, against a fake socket and a fake publisher: sends in order with
concurrent acks, errors that refer to their request, bounded work, and how a connection ends."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest

from gateway import endpoint
from gateway.endpoint import Connection
from gateway.hub import Hub
from gateway.limits import MAX_PENDING_REQUESTS, MAX_QUEUED_SENDS
from gateway.node import Node
from gateway.protocol import Close
from gateway.quota import UserState
from shared.auth import Identity
from shared.errors import Unavailable
from shared.keys import Keys
from shared.settings import Settings

pytestmark = pytest.mark.timeout(10)


class FakeWebSocket:
    """What the client sends goes in `inbox`; what the server writes is parsed into `out`. Closing
    queues the disconnect, as uvicorn does."""

    def __init__(self) -> None:
        self.scope: dict[str, Any] = {"type": "websocket", "extensions": {}}  # (no direct writer)
        self.inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.out: list[dict[str, Any]] = []
        self.closed: tuple[int, str | None] | None = None

    async def receive(self) -> dict[str, Any]:
        return await self.inbox.get()

    async def send_text(self, data: str) -> None:
        self.out.append(orjson.loads(data))

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        self.closed = (code, reason)
        self.inbox.put_nowait({"type": "websocket.disconnect", "code": code})

    def client_sends(self, frame: dict[str, Any] | bytes) -> None:
        if isinstance(frame, bytes):
            self.inbox.put_nowait({"type": "websocket.receive", "bytes": frame})
        else:
            self.inbox.put_nowait({"type": "websocket.receive", "text": orjson.dumps(frame).decode()})

    def client_leaves(self) -> None:
        self.inbox.put_nowait({"type": "websocket.disconnect", "code": 1000})

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [f for f in self.out if f["type"] == kind]


class FakePublisher:
    """`send` claims (awaits `claim_s` of its client_msg_id), 'produces' and returns the ack: a
    future the test resolves, or (`coroutines`) a coroutine as the real publisher returns."""

    def __init__(self) -> None:
        self.produced: list[str] = []
        self.acks: dict[str, asyncio.Future[bytes]] = {}
        self.claim_s: dict[str, float] = {}
        self.refuse: set[str] = set()
        self.coroutines = False
        self.claims = asyncio.Event()  # cleared: every claim waits
        self.claims.set()

    async def send(self, user: str, room: str, client_msg_id: str, body: str) -> Awaitable[bytes]:
        await self.claims.wait()
        await asyncio.sleep(self.claim_s.get(client_msg_id, 0))
        if client_msg_id in self.refuse:
            raise Unavailable("dedupe store unavailable")
        self.produced.append(client_msg_id)
        fut = self.acks[client_msg_id] = asyncio.get_running_loop().create_future()
        if not self.coroutines:
            return fut

        async def ack() -> bytes:
            return await fut

        return ack()

    def ack(self, client_msg_id: str) -> None:
        self.acks[client_msg_id].set_result(orjson.dumps({"type": "ack", "client_msg_id": client_msg_id}))


class FakeFanout:
    def position(self, partition: int) -> int:
        return 7


class FakeReads:
    async def room_state(self, user: str, room: str) -> dict[str, Any]:
        return {}


class UnlimitedQuota:
    """Every send may go (the shared limits are tested against Redis: tests/integration)."""

    def admit(self, user: str, state: UserState) -> float | None:
        return 0.0

    async def take_send(self, user: str, state: UserState) -> float:
        return 0.0

    def forgo(self, state: UserState, waiting: int) -> None:
        pass


def make_node(**settings: Any) -> Node:
    s = Settings(**settings)
    return Node(s, Keys("t", 4), Hub(), FakeFanout(), None, FakePublisher(), None, None, None,  # type: ignore[arg-type]
                None, None, FakeReads(), UnlimitedQuota())  # type: ignore[arg-type]


class Client:
    def __init__(self, node: Node, expires_at: float | None = None) -> None:
        self.node = node
        self.ws = FakeWebSocket()
        self.conn = Connection(node, self.ws, Identity("ann", ("*",), expires_at), UserState())  # type: ignore[arg-type]
        self.task = asyncio.create_task(self.conn.serve())

    @property
    def publisher(self) -> FakePublisher:
        return self.node.publisher  # type: ignore[return-value]

    def send(self, cid: str, room: str = "r") -> None:
        self.ws.client_sends({"type": "send", "room": room, "client_msg_id": cid, "body": cid})

    async def until(self, check: Callable[[], bool], timeout: float = 2.0) -> None:
        async with asyncio.timeout(timeout):
            while not check():
                await asyncio.sleep(0.001)

    async def leave(self) -> None:
        self.ws.client_leaves()
        await asyncio.wait_for(self.task, 2)


async def test_sends_reach_the_producer_in_the_clients_order_and_acks_come_as_they_are_ready() -> None:
    c = Client(make_node())
    c.publisher.claim_s["a"] = 0.05  # the first claim is the slowest: the others still wait for it
    for cid in "abc":
        c.send(cid)
    await c.until(lambda: len(c.publisher.acks) == 3)
    assert c.publisher.produced == ["a", "b", "c"]
    for cid in "cab":  # Kafka acknowledges in any order: each ack goes out when it is there
        c.publisher.ack(cid)
        await c.until(lambda: len(c.ws.of_type("ack")) == "cab".index(cid) + 1)  # noqa: B023
    assert [f["client_msg_id"] for f in c.ws.of_type("ack")] == ["c", "a", "b"]
    await c.leave()


async def test_acks_given_as_coroutines_are_answered_too() -> None:
    c = Client(make_node())
    c.publisher.coroutines = True
    c.send("a")
    c.send("b")
    await c.until(lambda: len(c.publisher.acks) == 2)
    c.publisher.ack("b")
    c.publisher.ack("a")
    await c.until(lambda: len(c.ws.of_type("ack")) == 2)
    await c.leave()


async def test_an_unavailable_broker_answers_that_send_with_an_error_and_later_sends_go_on() -> None:
    c = Client(make_node())
    c.publisher.refuse.add("claim-fails")
    c.send("claim-fails")
    c.send("ack-fails")
    c.send("bug")
    c.send("fine")
    await c.until(lambda: len(c.publisher.acks) == 3)
    c.publisher.acks["ack-fails"].set_exception(Unavailable("broker unavailable: KafkaTimeoutError"))
    c.publisher.acks["bug"].set_exception(RuntimeError("a bug"))
    c.publisher.ack("fine")
    await c.until(lambda: len(c.ws.out) == 4)
    errors = {f["ref"]: f for f in c.ws.of_type("error")}
    assert errors["claim-fails"]["code"] == errors["ack-fails"]["code"] == errors["bug"]["code"] == "unavailable"
    assert errors["ack-fails"]["reason"] == "broker unavailable: KafkaTimeoutError"
    assert errors["bug"]["reason"] == "internal error"
    assert [f["client_msg_id"] for f in c.ws.of_type("ack")] == ["fine"]
    await c.leave()


async def test_sends_queued_for_the_producer_are_bounded() -> None:
    c = Client(make_node())
    c.publisher.claims.clear()  # the producer takes nothing for now
    for i in range(MAX_QUEUED_SENDS + 2):  # one in the worker's hands, the queue full, one too many
        c.send(f"s{i}")
    await c.until(lambda: len(c.ws.of_type("error")) == 1)
    error = c.ws.of_type("error")[0]
    assert (error["code"], error["ref"]) == ("rate_limited", f"s{MAX_QUEUED_SENDS + 1}")
    c.publisher.claims.set()
    await c.until(lambda: len(c.publisher.acks) == MAX_QUEUED_SENDS + 1)
    assert c.publisher.produced == [f"s{i}" for i in range(MAX_QUEUED_SENDS + 1)]
    await c.leave()


async def test_requests_in_progress_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    release = asyncio.Event()

    async def slow_history(*args: object) -> str:
        await release.wait()
        return '{"type":"history"}'

    monkeypatch.setattr(endpoint, "history_frame", slow_history)
    c = Client(make_node())
    for i in range(MAX_PENDING_REQUESTS + 3):
        c.ws.client_sends({"type": "history", "room": f"h{i}"})
    await c.until(lambda: len(c.ws.out) == 3)
    assert {f["code"] for f in c.ws.out} == {"rate_limited"}
    release.set()
    await c.until(lambda: len(c.ws.of_type("history")) == MAX_PENDING_REQUESTS)
    c.ws.client_sends({"type": "history", "room": "again"})
    await c.until(lambda: len(c.ws.of_type("history")) == MAX_PENDING_REQUESTS + 1)
    await c.leave()


async def test_a_crashed_handler_is_answered_unavailable_and_the_connection_stays(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def broken_leave(self: Connection, frame: object) -> None:
        raise RuntimeError("a bug")

    def broken_position(self: FakeFanout, partition: int) -> int:
        raise RuntimeError("another bug")

    monkeypatch.setattr(Connection, "on_leave", broken_leave)
    monkeypatch.setattr(FakeFanout, "position", broken_position)
    c = Client(make_node())
    c.ws.client_sends({"type": "leave", "room": "r"})
    c.ws.client_sends({"type": "join", "room": "r"})  # (joins run in a task of their own)
    c.ws.client_sends(b"binary")
    c.ws.client_sends({"type": "ping"})
    await c.until(lambda: len(c.ws.out) == 4)
    errors = c.ws.of_type("error")
    assert [(f["code"], f["reason"], f["ref"]) for f in errors] == [
        ("unavailable", "internal error", None), ("bad_frame", errors[1]["reason"], None),
        ("unavailable", "internal error", "r")]
    assert c.ws.out[2] == {"type": "pong"}
    assert caplog.text.count("frame handler crashed") == 2
    await c.leave()


async def test_a_join_subscribes_and_the_end_of_the_connection_unsubscribes() -> None:
    node = make_node()
    c = Client(node)
    c.ws.client_sends({"type": "join", "room": "r"})
    await c.until(lambda: len(c.ws.out) == 1)
    assert c.ws.out[0] == {"type": "joined", "room": "r", "cursor": f"{node.keys.partition('r')}-6"}
    assert node.hub.publish("r", 7, '{"type":"message"}') == 1
    await c.until(lambda: len(c.ws.out) == 2)
    await c.leave()
    assert not node.hub.has_room("r") and not node.hub.sessions
    assert c.ws.closed is None, "the client left: nothing to close"


async def test_a_slow_client_is_closed_4008_and_the_connection_ends() -> None:
    node = make_node(send_queue_max=5)
    c = Client(node)
    c.ws.client_sends({"type": "join", "room": "r"})
    await c.until(lambda: len(c.ws.out) == 1)
    c.conn.session.close(Close.TOO_SLOW, "too slow; resume with your last cursor")
    await asyncio.wait_for(c.task, 2)
    assert c.ws.closed == (4008, "too slow; resume with your last cursor")
    assert not node.hub.sessions


async def test_a_frame_after_the_token_expired_closes_1008(monkeypatch: pytest.MonkeyPatch) -> None:
    c = Client(make_node(), expires_at=time.time() + 3600)
    c.ws.client_sends({"type": "ping"})
    await c.until(lambda: len(c.ws.out) == 1)
    monkeypatch.setattr(endpoint.time, "time", lambda: time.monotonic() + 10**10)
    c.ws.client_sends({"type": "ping"})
    await asyncio.wait_for(c.task, 2)
    assert c.ws.closed == (1008, "token expired")
    assert len(c.ws.out) == 1


async def test_pending_requests_and_sends_end_with_the_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    async def never(*args: object) -> str:
        await asyncio.Event().wait()
        return ""

    monkeypatch.setattr(endpoint, "history_frame", never)
    c = Client(make_node())
    c.ws.client_sends({"type": "history", "room": "r"})
    c.send("a")
    await c.until(lambda: len(c.publisher.acks) == 1)
    c.publisher.claims.clear()
    c.send("b")  # waits for its claim
    await asyncio.sleep(0.01)
    await c.leave()
    await asyncio.sleep(0.01)
    assert c.publisher.acks["a"].cancelled()
    assert c.ws.out == []
