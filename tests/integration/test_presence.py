"""Presence, typing, read state and unread counts (issue 23), against two gateway processes, the
persister, Kafka, Redis and MariaDB."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from roomcast_client import RoomcastClient

from shared.settings import Settings
from tests.support import Cluster, Peer, delete_keys, eventually, partition_of, produce_messages, token
from tools.services import scrape

pytestmark = pytest.mark.timeout(90)

TTL_S = 2.0


@pytest.fixture
def signals_settings(small_buffer: Settings) -> Settings:
    return small_buffer.model_copy(update={"presence_ttl_s": TTL_S, "typing_interval_s": 1.0,
                                           "receipts_max_online": 2})


@pytest.fixture
def pcluster(signals_settings: Settings, log_dir: Path) -> Iterator[Cluster]:
    c = Cluster(signals_settings, log_dir).start()
    yield c
    c.stop()


def get_json(url: str, tok: str) -> Any:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {tok}"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return orjson.loads(r.read())


def events(peer: Peer, kind: str, **match: Any) -> list[dict[str, Any]]:
    return [f for f in peer.frames if f["type"] == kind and all(f.get(k) == v for k, v in match.items())]


async def ask(peer: Peer, frame: dict[str, Any], answer: str) -> dict[str, Any]:
    n = len(peer.frames)
    await peer.send(frame)
    return await peer.wait_for(lambda f: f["type"] in (answer, "error"), start=n)


async def send(peer: Peer, room: str, cmid: str, body: str = "hi") -> dict[str, Any]:
    return await ask(peer, {"type": "send", "room": room, "client_msg_id": cmid, "body": body}, "ack")


async def test_one_user_on_two_gateways_is_one_user_and_a_killed_gateway_takes_its_users_offline(
        pcluster: Cluster, signals_settings: Settings) -> None:
    s = signals_settings
    watcher = await Peer.connect(pcluster.url(1), token(s, "bob"))
    await watcher.send({"type": "join", "room": "lobby", "presence": True})
    await watcher.wait_for(lambda f: f["type"] == "joined")
    tabs = [await Peer.connect(pcluster.url(i), token(s, "alice")) for i in (0, 0, 1)]
    for tab in tabs:
        assert (await tab.join("lobby"))["type"] == "joined"
    await watcher.wait_for(lambda f: f["type"] == "presence_event" and f["user"] == "alice")
    answer = await ask(watcher, {"type": "presence", "room": "lobby"}, "presence")
    assert answer == {"type": "presence", "room": "lobby", "users": ["alice", "bob"], "count": 2}
    rest = await asyncio.to_thread(get_json, f"{pcluster.http(0)}/rooms/lobby/presence", token(s, "x"))
    assert rest == {"room": "lobby", "users": ["alice", "bob"], "count": 2}

    await tabs[2].close()  # alice's tab on the watcher's gateway: her two on the other keep her online
    await tabs[1].send({"type": "leave", "room": "lobby"})
    await tabs[1].wait_for(lambda f: f["type"] == "left")
    assert (await ask(watcher, {"type": "presence", "room": "lobby"}, "presence"))["count"] == 2

    killed = time.monotonic()
    pcluster.gateways[0].kill()  # alice's last connection dies with its gateway: nobody says goodbye
    off = await watcher.wait_for(lambda f: f["type"] == "presence_event" and f["state"] == "offline",
                                 timeout=TTL_S + 5)
    took = time.monotonic() - killed
    assert off == {"type": "presence_event", "room": "lobby", "user": "alice", "state": "offline"}
    assert took <= TTL_S + 1.0, took
    assert events(watcher, "presence_event", user="alice", state="online") != []
    assert len(events(watcher, "presence_event", user="alice")) == 2  # one online, one offline: one user
    assert (await ask(watcher, {"type": "presence", "room": "lobby"}, "presence"))["users"] == ["bob"]
    await watcher.close()


async def test_typing_is_throttled_per_user_and_room_and_never_stored(pcluster: Cluster, signals_settings: Settings
                                                                      ) -> None:
    s = signals_settings
    alice, alice2 = (await Peer.connect(pcluster.url(0), token(s, "alice")),
                     await Peer.connect(pcluster.url(1), token(s, "alice")))
    bob = await Peer.connect(pcluster.url(1), token(s, "bob"))
    for p in (alice, alice2, bob):
        await p.join("lobby")
    not_joined = await ask(alice, {"type": "typing", "room": "elsewhere"}, "error")
    assert not_joined["code"] == "not_joined"
    started = time.monotonic()
    for _ in range(10):
        await alice.send({"type": "typing", "room": "lobby"})
        await alice2.send({"type": "typing", "room": "lobby"})  # her other tab, on the other gateway
    first = await bob.wait_for(lambda f: f["type"] == "typing")
    assert first == {"type": "typing", "room": "lobby", "user": "alice"}
    # a barrier on the same room (so the same partition of the signals topic): bob's own typing
    await bob.send({"type": "typing", "room": "lobby"})
    await alice.wait_for(lambda f: f["type"] == "typing" and f["user"] == "bob")
    if time.monotonic() - started < s.typing_interval_s:
        assert len(events(bob, "typing")) == 1
    assert events(alice, "typing", user="alice") == [] and events(alice2, "typing", user="alice") == []
    await eventually(lambda: _later_typing(alice, bob), timeout=5, every=0.3, what="a typing after the interval")
    page = await ask(bob, {"type": "history", "room": "lobby"}, "history")
    assert page["messages"] == []
    for p in (alice, alice2, bob):
        await p.close()


async def _later_typing(alice: Peer, bob: Peer) -> bool:
    await alice.send({"type": "typing", "room": "lobby"})
    return len(events(bob, "typing", user="alice")) >= 2


async def test_a_read_mark_syncs_devices_and_survives_a_redis_wipe_and_a_gateway_kill(
        pcluster: Cluster, signals_settings: Settings, redis: aioredis.Redis) -> None:
    s = signals_settings
    alice = await Peer.connect(pcluster.url(0), token(s, "alice"))
    bob_phone, bob_laptop = (await Peer.connect(pcluster.url(0), token(s, "bob")),
                             await Peer.connect(pcluster.url(1), token(s, "bob")))
    joined = await bob_phone.join("lobby")
    assert joined["read_cursor"] is None and joined["unread"] == 0 and joined["unread_more"] is False
    acks = [await send(alice, "lobby", f"m{i}") for i in range(5)]
    await bob_phone.wait_for(lambda f: f["type"] == "message" and f["cursor"] == acks[-1]["cursor"])

    echo = await ask(bob_phone, {"type": "read", "room": "lobby", "cursor": acks[2]["cursor"]}, "read")
    assert echo == {"type": "read", "room": "lobby", "user": "bob", "cursor": acks[2]["cursor"]}
    sync = await bob_laptop.wait_for(lambda f: f["type"] == "read")  # not joined there: synced all the same
    assert sync == echo
    back = await ask(bob_phone, {"type": "read", "room": "lobby", "cursor": acks[1]["cursor"]}, "read")
    assert back["cursor"] == acks[2]["cursor"]  # only forward: the answer is the mark held
    past_end = f"{acks[0]['cursor'].split('-')[0]}-999999999"
    assert (await ask(bob_phone, {"type": "read", "room": "lobby", "cursor": past_end}, "read"))["code"] == "bad_cursor"

    pcluster.gateways[0].kill()
    await delete_keys(redis, s.redis_prefix)  # every key: messages, applied marks, read state, presence
    fresh = await Peer.connect(pcluster.url(1), token(s, "bob"))

    async def remembered() -> bool:
        j = await fresh.join("lobby")
        await ask(fresh, {"type": "leave", "room": "lobby"}, "left")
        return j.get("read_cursor") == acks[2]["cursor"] and j.get("unread") == 2

    await eventually(remembered, timeout=20, what="the read mark after the wipe")
    unread = await ask(fresh, {"type": "unread"}, "unread")
    assert unread == {"type": "unread", "rooms": [{"room": "lobby", "count": 2, "more": False,
                                                   "read_cursor": acks[2]["cursor"]}]}
    for p in (alice, bob_laptop, fresh):
        await p.close()


async def test_unread_counts_span_redis_and_mysql_and_stop_at_1000(pcluster: Cluster, signals_settings: Settings
                                                                   ) -> None:
    s = signals_settings  # BUFFER_CAP 20: all but the newest 20-odd messages are in MySQL
    alice, bob = (await Peer.connect(pcluster.url(0), token(s, "alice")),
                  await Peer.connect(pcluster.url(1), token(s, "bob")))
    first = await send(alice, "lobby", "first")
    await ask(bob, {"type": "read", "room": "lobby", "cursor": first["cursor"]}, "read")
    for i in range(60):
        await alice.send({"type": "send", "room": "lobby", "client_msg_id": f"a{i}", "body": f"m{i}"})
    await alice.wait_for(lambda f: f["type"] == "ack" and f["client_msg_id"] == "a59")
    for i in range(3):
        await send(bob, "lobby", f"b{i}")  # the user's own messages are never unread

    async def counted(n: int, more: bool = False) -> bool:
        got = await ask(bob, {"type": "unread"}, "unread")
        return got["rooms"][0]["count"] == n and got["rooms"][0]["more"] is more

    await eventually(lambda: counted(60), timeout=15, what="60 unread")
    joined = await bob.join("lobby")
    assert (joined["unread"], joined["read_cursor"]) == (60, first["cursor"])

    await produce_messages(s, partition_of(s, "lobby"), "lobby", 1000)  # (as alice, straight into the log)
    await eventually(lambda: counted(1000, more=True), timeout=30, what="1000+ unread")
    for p in (alice, bob):
        await p.close()


async def test_receipts_reach_the_room_only_while_few_are_online(pcluster: Cluster, signals_settings: Settings
                                                                ) -> None:
    s = signals_settings  # RECEIPTS_MAX_ONLINE 2
    alice, bob, bob2 = (await Peer.connect(pcluster.url(0), token(s, "alice")),
                        await Peer.connect(pcluster.url(1), token(s, "bob")),
                        await Peer.connect(pcluster.url(0), token(s, "bob")))
    for p in (alice, bob):
        await p.join("lobby")
    ack = await send(alice, "lobby", "m1")
    await ask(bob, {"type": "read", "room": "lobby", "cursor": ack["cursor"]}, "read")
    receipt = await alice.wait_for(lambda f: f["type"] == "read")
    assert receipt == {"type": "read", "room": "lobby", "user": "bob", "cursor": ack["cursor"]}

    carol = await Peer.connect(pcluster.url(0), token(s, "carol"))
    await carol.join("lobby")  # three online: past the bound
    await eventually(lambda: _online(bob, 3), timeout=10, what="three online")
    ack2 = await send(alice, "lobby", "m2")
    await ask(bob, {"type": "read", "room": "lobby", "cursor": ack2["cursor"]}, "read")
    await bob2.wait_for(lambda f: f["type"] == "read" and f["cursor"] == ack2["cursor"])  # own devices: always
    await carol.send({"type": "typing", "room": "lobby"})  # a later signal of the same room: the barrier
    await alice.wait_for(lambda f: f["type"] == "typing" and f["user"] == "carol")
    assert [f["cursor"] for f in events(alice, "read")] == [ack["cursor"]]
    for p in (alice, bob, bob2, carol):
        await p.close()


async def _online(peer: Peer, n: int) -> bool:
    return (await ask(peer, {"type": "presence", "room": "lobby"}, "presence"))["count"] == n


async def test_the_client_library_speaks_presence_typing_and_read_state(pcluster: Cluster, signals_settings: Settings
                                                                       ) -> None:
    s = signals_settings
    seen: dict[str, list[dict[str, Any]]] = {"presence": [], "typing": [], "read": []}

    def collect(kind: str) -> Callable[[dict[str, Any]], None]:
        return seen[kind].append

    async with RoomcastClient([pcluster.url(0)], token(s, "bob"), on_presence=collect("presence"),
                              on_typing=collect("typing"), on_read=collect("read")) as bob, \
            RoomcastClient([pcluster.url(1)], token(s, "alice")) as alice:
        assert (await bob.join("lobby", presence=True))["unread"] == 0
        await alice.join("lobby")
        alice_online = {"type": "presence_event", "room": "lobby", "user": "alice", "state": "online"}
        await eventually(lambda: _async(alice_online in seen["presence"]), timeout=10, what="alice online")
        assert (await bob.presence("lobby"))["users"] == ["alice", "bob"]
        assert alice.typing("lobby") is True and alice.typing("lobby") is False  # throttled in the client too
        await eventually(lambda: _async(len(seen["typing"]) == 1), timeout=10, what="alice typing")
        ack = await alice.send("lobby", "hello")
        mark = await bob.read("lobby", ack["cursor"])
        assert mark == {"type": "read", "room": "lobby", "user": "bob", "cursor": ack["cursor"]}
        assert (await bob.unread())["rooms"] == [{"room": "lobby", "count": 0, "more": False,
                                                  "read_cursor": ack["cursor"]}]
        await alice.send("lobby", "again")
        await eventually(lambda: _unread_is(bob, 1), timeout=10, what="one unread")
        await alice.leave("lobby")
        await eventually(lambda: _async(seen["presence"][-1] == {**alice_online, "state": "offline"}), timeout=10,
                         what="alice offline")


def typing_outcomes(url: str) -> float:
    """Typing frames a gateway has decided on: forwarded (a signal out), dropped by the throttle, or
    refused rate_limited (every rate_limited so far: the test sends nothing else meanwhile)."""
    m = scrape(url)
    return (m.get('roomcast_gateway_signals_out_total{kind="typing"}', 0)
            + m.get("roomcast_gateway_typing_dropped_total", 0)
            + m.get('roomcast_gateway_error_frames_total{code="rate_limited"}', 0))


async def _async(value: bool) -> bool:
    return value


async def _unread_is(client: RoomcastClient, n: int) -> bool:
    return bool((await client.unread())["rooms"][0]["count"] == n)


async def test_floods_of_typing_and_read_frames_are_rate_limited_like_sends(
        pcluster: Cluster, signals_settings: Settings) -> None:
    s = signals_settings  # SEND_BURST 1000, SEND_RATE_PER_S 50: the user's budget for sends, typing and reads
    flooder, bob = (await Peer.connect(pcluster.url(0), token(s, "flooder")),
                    await Peer.connect(pcluster.url(0), token(s, "bob")))
    await flooder.join("lobby")
    await bob.join("lobby")
    ack = await send(bob, "lobby", "target")
    started = time.monotonic()
    typings, reads = s.send_burst + 200, 300
    metrics = f"{pcluster.http(0)}/metrics"
    before = typing_outcomes(metrics)
    for _ in range(typings):
        await flooder.send({"type": "typing", "room": "lobby"})

    async def every_typing_decided() -> bool:  # forwarded, throttled or refused: each is counted
        return typing_outcomes(metrics) - before == typings

    await eventually(every_typing_decided, timeout=20, what="every typing frame decided")
    at = len(flooder.frames)
    for _ in range(reads):
        await flooder.send({"type": "read", "room": "lobby", "cursor": ack["cursor"]})
    await eventually(lambda: _async(len(flooder.frames) - at == reads), timeout=20, what="every read answered")
    span = time.monotonic() - started
    errors = [f for f in flooder.frames if f["type"] == "error"]
    assert errors and {f["code"] for f in errors} == {"rate_limited"}, {f["code"] for f in errors}
    assert all(f["retry_after_ms"] >= 1 for f in errors)
    taken = typings + reads - len(errors)
    assert taken <= s.send_burst + s.send_rate_per_s * span + 1, (taken, span)
    assert len(events(flooder, "read")) >= 1
    # the typing that got through is still one per interval for bob
    await bob.send({"type": "typing", "room": "lobby"})  # a later signal of the room: the barrier
    await flooder.wait_for(lambda f: f["type"] == "typing" and f["user"] == "bob")
    assert len(events(bob, "typing", user="flooder")) <= 1 + span / s.typing_interval_s
    assert (await send(bob, "lobby", "still fine"))["type"] == "ack"  # other users are not limited
    for p in (flooder, bob):
        await p.close()
