"""Issue 7: authorization, limits and hostile input, against a real gateway process.

One gateway (and the persister) with every limit set small, shared by the tests of this module;
each test uses its own user names, so per-user limits never meet.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import jwt
import orjson
import pytest
import redis.asyncio as aioredis
import websockets
from pydantic import SecretStr
from websockets.asyncio.client import connect
from websockets.typing import Origin

from gateway.limits import MAX_PENDING_REQUESTS
from shared.migrate import migrate
from shared.settings import Settings
from tests.support import Cluster, Peer, delete_keys, drop_database, eventually, isolated_settings, token

pytestmark = pytest.mark.timeout(60)

BODY_MAX, ROOMS_MAX, CONNS_MAX, RATE, BURST, HISTORY_MAX, FRAME_MAX = 100, 5, 3, 10.0, 20, 10, 4096
ORIGIN = "https://chat.example"


@pytest.fixture(scope="module")
async def hard(kafka_bootstrap: str, redis_url: str, mysql_server_dsn: str) -> AsyncIterator[Settings]:
    """Settings of this module (own topic, key prefix and database), every limit set small."""
    s = isolated_settings(
        kafka_bootstrap, redis_url, mysql_server_dsn,
        max_frame_bytes=FRAME_MAX, max_body_chars=BODY_MAX, max_rooms_per_conn=ROOMS_MAX,
        max_conns_per_user=CONNS_MAX, send_rate_per_s=RATE, send_burst=BURST, history_limit_max=HISTORY_MAX,
        allowed_origins=[ORIGIN],
    )
    await migrate(s.mysql_dsn)
    yield s
    await drop_database(s.mysql_dsn)
    r = aioredis.from_url(s.redis_url)
    await delete_keys(r, s.redis_prefix)
    await r.aclose()


@pytest.fixture(scope="module")
def gw(hard: Settings, log_dir: Path) -> Iterator[str]:
    """The gateway's ws:// base URL."""
    c = Cluster(hard, log_dir).start(gateways=1)
    yield c.url(0)
    c.stop()


async def reply(p: Peer, frame: dict[str, Any] | str, timeout: float = 10.0) -> dict[str, Any]:
    """Send a frame (dict or raw text) and return the first frame after it that is not a message."""
    n = len(p.frames)
    await (p.ws.send(frame) if isinstance(frame, str) else p.send(frame))
    return await p.wait_for(lambda f: f["type"] != "message", timeout, start=n)


async def error_of(p: Peer, frame: dict[str, Any] | str) -> tuple[str, Any]:
    f = await reply(p, frame)
    assert f["type"] == "error", f
    assert f["reason"], f
    return f["code"], f["ref"]


async def closed(p: Peer, timeout: float = 5.0) -> tuple[int | None, str | None]:
    await asyncio.wait_for(asyncio.shield(p._reader), timeout)
    return p.ws.close_code, p.ws.close_reason


async def refused_at_connect(url: str, tok: str) -> tuple[int | None, str | None]:
    """Connect, expect the server to close before sending anything: (close code, reason)."""
    async with connect(f"{url}/ws?v=1&token={tok}") as ws:
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)
        return ws.close_code, ws.close_reason


def b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(data)).rstrip(b"=").decode()


# --- authorization

async def test_rooms_claim_decides_where_a_user_may_join_send_and_read(gw: str, hard: Settings) -> None:
    p = await Peer.connect(gw, token(hard, "az-ann", rooms=["team-*", "lobby"]))
    for room in ("team-a", "team-", "team-x.y", "lobby"):
        assert (await p.join(room))["type"] == "joined", room
    for room in ("lobbyx", "lobb", "other", "tea", "Team-a"):  # exact names; prefixes only with '*'
        assert await error_of(p, {"type": "join", "room": room}) == ("forbidden", room)
    assert await error_of(p, {"type": "send", "room": "other", "client_msg_id": "s1", "body": "x"}) == \
        ("forbidden", "s1")
    assert await error_of(p, {"type": "history", "room": "other"}) == ("forbidden", "other")
    assert (await reply(p, {"type": "send", "room": "team-a", "client_msg_id": "s2", "body": "ok"}))["type"] == "ack"
    assert (await reply(p, {"type": "history", "room": "team-a"}))["type"] == "history"
    await p.close()

    nobody = await Peer.connect(gw, token(hard, "az-bob", rooms=[]))
    assert await error_of(nobody, {"type": "join", "room": "lobby"}) == ("forbidden", "lobby")
    await nobody.close()
    everyone = await Peer.connect(gw, token(hard, "az-cat", rooms=["*"]))
    assert (await everyone.join("anything"))["type"] == "joined"
    await everyone.close()


async def test_bad_tokens_are_closed_1008_at_connect(gw: str, hard: Settings) -> None:
    secret = hard.jwt_secret.get_secret_value()
    now = int(time.time())
    good = {"sub": "tk-eve", "exp": now + 600, "rooms": ["*"]}
    other_secret = hard.model_copy(update={"jwt_secret": SecretStr("another-secret-of-sufficient-length-12345")})
    cases = {
        "expired": token(hard, "tk-eve", ttl_s=-5),
        "wrong signature": token(other_secret, "tk-eve"),
        "tampered payload": ".".join([token(hard, "tk-eve").split(".")[0], b64({**good, "sub": "root"}),
                                      token(hard, "tk-eve").split(".")[2]]),
        "alg none": f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(good)}.",
        "alg none, HS256 signature kept": ".".join(
            [b64({"alg": "none", "typ": "JWT"}), *jwt.encode(good, secret, algorithm="HS256").split(".")[1:]]),
        "HS512 with the right secret": jwt.encode(good, secret, algorithm="HS512"),
        "HS384 with the right secret": jwt.encode(good, secret, algorithm="HS384"),
        "no exp": jwt.encode({"sub": "tk-eve", "rooms": ["*"]}, secret, algorithm="HS256"),
        "no sub": jwt.encode({"exp": now + 600, "rooms": ["*"]}, secret, algorithm="HS256"),
        "no rooms claim": jwt.encode({"sub": "tk-eve", "exp": now + 600}, secret, algorithm="HS256"),
        "rooms not a list": jwt.encode({**good, "rooms": "*"}, secret, algorithm="HS256"),
        "sub a lone surrogate": jwt.encode({**good, "sub": "\ud800"}, secret, algorithm="HS256"),
        "sub not a string": jwt.encode({**good, "sub": 42}, secret, algorithm="HS256"),
        "not yet valid": jwt.encode({**good, "nbf": now + 600}, secret, algorithm="HS256"),
        "garbage": "not.a.jwt",
        "empty": "",
    }
    for what, tok in cases.items():
        code, reason = await refused_at_connect(gw, tok)
        assert code == 1008, what
        assert reason and reason.startswith("bad token"), (what, reason)


async def test_the_protocol_version_is_required(gw: str, hard: Settings) -> None:
    tok = token(hard, "pv-ike")
    for query, reason in [(f"v=2&token={tok}", "unsupported protocol version: this server speaks v=1"),
                          (f"v=&token={tok}", "unsupported protocol version: this server speaks v=1"),
                          (f"token={tok}",
                           "protocol version missing: connect with ?v=1 or the subprotocol roomcast.v1")]:
        async with connect(f"{gw}/ws?{query}") as ws:
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 5)
        assert (ws.close_code, ws.close_reason) == (1008, reason), query
    async with connect(f"{gw}/ws?token={tok}&v=1") as ws:
        await ws.send('{"type":"ping"}')
        assert orjson.loads(await asyncio.wait_for(ws.recv(), 5)) == {"type": "pong"}


async def test_a_token_expiring_during_a_connection_closes_it_1008_even_when_idle(gw: str, hard: Settings) -> None:
    tok = token(hard, "ex-fay", ttl_s=2)
    expires_at = jwt.decode(tok, options={"verify_signature": False})["exp"]
    p = await Peer.connect(gw, tok)
    assert (await p.join("lobby"))["type"] == "joined"
    code, reason = await closed(p, timeout=30)  # idle: nothing sent after the join
    assert (code, reason) == (1008, "token expired")
    # Not before the token expired; the hub's timer ticks each second, and a loaded machine may be
    # late by a few more: what matters is that it closes at all, idle.
    assert expires_at <= time.time() < expires_at + 10


# --- Origin

async def test_origin_is_checked_at_the_handshake(gw: str, hard: Settings) -> None:
    url = f"{gw}/ws?v=1&token={token(hard, 'or-gus')}"
    for origin in (ORIGIN, ORIGIN.upper(), None):  # no Origin: not a browser, the token decides
        async with connect(url, origin=Origin(origin) if origin else None) as ws:
            await ws.send('{"type":"ping"}')
            assert orjson.loads(await asyncio.wait_for(ws.recv(), 5)) == {"type": "pong"}
    for origin in ("https://evil.example", "https://chat.example.evil.example", "null", "http://chat.example"):
        with pytest.raises(websockets.InvalidStatus) as info:
            async with connect(url, origin=Origin(origin)):
                pass
        assert info.value.response.status_code == 403, origin


# --- frame-level limits

async def test_a_frame_over_the_size_limit_closes_1009(gw: str, hard: Settings) -> None:
    tok = token(hard, "fr-hal")
    p = await Peer.connect(gw, tok)
    exact = orjson.dumps({"type": "ping", "pad": ""})
    at_limit = orjson.dumps({"type": "ping", "pad": "x" * (FRAME_MAX - len(exact))}).decode()
    assert len(at_limit.encode()) == FRAME_MAX
    assert await reply(p, at_limit) == {"type": "pong"}  # extra fields are ignored
    await p.ws.send("x" * (FRAME_MAX + 1))
    assert (await closed(p))[0] == 1009
    # A message in small fragments is held to the limit as a whole.
    p = await Peer.connect(gw, tok)
    await p.ws.send(["{" * 1000 for _ in range(5)])
    assert (await closed(p))[0] == 1009


async def test_invalid_utf8_text_closes_1007_and_binary_frames_get_bad_frame(gw: str, hard: Settings) -> None:
    tok = token(hard, "fr-ida")
    p = await Peer.connect(gw, tok)
    for data in (b'{"type":"ping"}', b"\xff\xfe\x00garbage", b""):
        n = len(p.frames)
        await p.ws.send(data)  # bytes: a binary frame
        f = await p.wait_for(lambda f: True, start=n)
        assert (f["type"], f["code"]) == ("error", "bad_frame")
    assert await reply(p, {"type": "ping"}) == {"type": "pong"}
    await p.ws.send(b'{"type":"ping","x":"\xc3\x28"}', text=True)  # a text frame that is not UTF-8
    assert (await closed(p))[0] == 1007


async def test_hostile_json_gets_a_clear_bad_frame(gw: str, hard: Settings) -> None:
    p = await Peer.connect(gw, token(hard, "fr-jon"))
    await p.join("lobby")
    cases: list[tuple[str, str, str | None]] = [
        ('{"type":"send","room":"lobby","client_msg_id":"k1","body":"\\ud800"}', "bad_frame", None),  # lone surrogate
        ('{"type":"send","room":"lobby","client_msg_id":"k2","body":"\\udc00x"}', "bad_frame", None),
        ('{"type":"send","room":"lobby","client_msg_id":"k3","body":"a\\ud83d"}', "bad_frame", None),
        ('{"type":"history","room":"lobby","limit":1e400}', "bad_frame", None),  # infinity
        ('{"type":"history","room":"lobby","limit":NaN}', "bad_frame", None),
        ('{"type":"history","room":"lobby","limit":1.5}', "bad_frame", "lobby"),
        ('{"type":"history","room":"lobby","limit":true}', "bad_frame", "lobby"),
        ('{"type":"history","room":"lobby","limit":"5"}', "bad_frame", "lobby"),
        ('{"type":"history","room":"lobby","limit":0}', "bad_frame", "lobby"),
        ('{"type":"history","room":"lobby","limit":-1}', "bad_frame", "lobby"),
        ('{"type":"history","room":"lobby","limit":1' + "0" * 40 + "}", "bad_frame", "lobby"),  # a float past 2**64
        ('{"type":"history","room":"lobby","before":"\u00b2-1"}', "bad_cursor", "lobby"),  # isdigit, not a digit
        ('{"type":"history","room":"lobby","before":"' + "9" * 65 + '"}', "bad_cursor", "lobby"),
        ('{"type":"join","room":"lobby","cursor":"\u0663-\u0661"}', "bad_cursor", "lobby"),
        ('{"type":"send","room":"lobby","client_msg_id":"k4","body":' + "[" * 2000 + "]" * 2000 + "}", "bad_frame",
         None),  # deeper than orjson's limit
        ('{"type":"send","room":"lobby","client_msg_id":"k5","body":' + "[" * 500 + "]" * 500 + "}", "bad_frame",
         "k5"),  # nested but not a string
        ('{"type":"send","room":"lobby","client_msg_id":"k6","body":{"$gt":""}}', "bad_frame", "k6"),
        ('{"type":"send","room":"lobby","client_msg_id":7,"body":"x"}', "bad_frame", None),
        ('{"type":"send","room":"lobby","client_msg_id":"","body":"x"}', "bad_frame", ""),
        ('{"type":"send","room":"lobby","client_msg_id":"' + "k" * 129 + '","body":"x"}', "bad_frame", None),
        ('{"type":["send"],"room":"lobby"}', "unknown_type", "lobby"),
        ('{"type":"SEND","room":"lobby"}', "unknown_type", "lobby"),
        ('\ufeff{"type":"ping"}', "bad_frame", None),  # a BOM
        ('{"type":"ping"', "bad_frame", None),
        ("null", "bad_frame", None),
        ("", "bad_frame", None),
    ]
    for raw, code, ref in cases:
        assert await error_of(p, raw) == (code, ref), raw[:80]
    # Duplicate keys: the last one wins (as everywhere in this server: it is the only parser).
    ack = await reply(p, '{"type":"send","room":"other","room":"lobby","client_msg_id":"dup","body":"a","body":"b"}')
    assert ack["type"] == "ack" and ack["room"] == "lobby"
    msg = await p.wait_for(lambda f: f["type"] == "message" and f["id"] == ack["id"])
    assert msg["body"] == "b"
    # Huge integers that still fit: capped, not an error.
    h = await reply(p, '{"type":"history","room":"lobby","limit":18446744073709551615}')
    assert h["type"] == "history"
    assert await reply(p, {"type": "ping"}) == {"type": "pong"}
    await p.close()


# --- limits with an error frame

async def test_a_body_over_the_limit_is_too_large(gw: str, hard: Settings) -> None:
    p = await Peer.connect(gw, token(hard, "li-kim"))
    assert await error_of(p, {"type": "send", "room": "lobby", "client_msg_id": "big", "body": "x" * (BODY_MAX + 1)}
                          ) == ("too_large", "big")
    # The limit counts characters, not bytes: as many 4-byte emoji fit.
    ok = await reply(p, {"type": "send", "room": "lobby", "client_msg_id": "emoji", "body": "😀" * BODY_MAX})
    assert ok["type"] == "ack"
    await p.close()


async def test_an_empty_or_blank_body_is_a_bad_frame_and_never_delivered(gw: str, hard: Settings) -> None:
    p = await Peer.connect(gw, token(hard, "bl-ned"))
    await p.join("blank")
    for i, body in enumerate(["", " ", "\t\r\n ", "\u3000\u2028\u00a0"]):  # (ideographic, line sep, nbsp)
        f = await reply(p, {"type": "send", "room": "blank", "client_msg_id": f"b{i}", "body": body})
        assert (f["type"], f["code"], f["ref"], f["reason"]) == ("error", "bad_frame", f"b{i}",
                                                                "body: empty or only whitespace"), body
    ok = await reply(p, {"type": "send", "room": "blank", "client_msg_id": "text", "body": " x "})
    assert ok["type"] == "ack"
    await p.wait_for(lambda f: f["type"] == "message" and f["id"] == ok["id"])
    assert [m["body"] for m in p.messages("blank")] == [" x "], "nothing blank was published"
    await p.close()


async def test_rooms_per_connection_are_limited(gw: str, hard: Settings) -> None:
    p = await Peer.connect(gw, token(hard, "li-lou"))
    for i in range(ROOMS_MAX):
        assert (await p.join(f"r{i}"))["type"] == "joined"
    assert await error_of(p, {"type": "join", "room": "one-too-many"}) == ("limit_exceeded", "one-too-many")
    assert (await p.join("r0"))["type"] == "joined"  # joining again is no new room
    assert (await reply(p, {"type": "leave", "room": "r0"})) == {"type": "left", "room": "r0"}
    assert await error_of(p, {"type": "leave", "room": "r0"}) == ("not_joined", "r0")
    assert (await p.join("one-too-many"))["type"] == "joined"
    await p.close()
    other = await Peer.connect(gw, token(hard, "li-lou"))  # per connection, not per user
    assert (await other.join("r9"))["type"] == "joined"
    await other.close()


async def test_connections_per_user_are_limited(gw: str, hard: Settings) -> None:
    tok = token(hard, "li-max")
    # Opened all at once: the count is taken before the handshake completes, so no race lets more in.
    attempts = await asyncio.gather(*(Peer.connect(gw, tok) for _ in range(CONNS_MAX + 3)))

    async def three_refused() -> bool:
        return sum(p._reader.done() for p in attempts) >= 3

    await eventually(three_refused, 10, what="3 connections refused")
    # A refused connection is closed before it reads a frame: one that answers a ping stays open.
    answered = await asyncio.gather(*(reply(p, {"type": "ping"}) for p in attempts if not p._reader.done()),
                                    return_exceptions=True)
    assert answered == [{"type": "pong"}] * CONNS_MAX, answered
    open_ = [p for p in attempts if not p._reader.done()]
    refused = [p for p in attempts if p._reader.done()]
    assert len(open_) == CONNS_MAX
    for p in refused:
        assert (p.ws.close_code, p.ws.close_reason) == (1013, "too many connections for this user")
    other = await Peer.connect(gw, token(hard, "li-ned"))  # another user is not affected
    assert await reply(other, {"type": "ping"}) == {"type": "pong"}
    await open_[0].close()

    async def one_more() -> bool:
        p = await Peer.connect(gw, tok)
        try:
            await reply(p, {"type": "ping"})  # (a refused connection is closed before it reads a frame)
        except (AssertionError, websockets.ConnectionClosed):
            return False
        open_.append(p)
        return True

    await eventually(one_more, 5, every=0.1, what="a freed connection slot")
    for p in [*open_[1:], other]:
        await p.close()


async def test_sends_are_rate_limited_per_user_with_a_retry_hint(gw: str, hard: Settings) -> None:
    p = await Peer.connect(gw, token(hard, "rl-ora"))
    t0 = time.monotonic()
    for i in range(BURST + 10):
        await p.send({"type": "send", "room": "lobby", "client_msg_id": f"m{i}", "body": str(i)})

    async def answered() -> bool:
        return len([f for f in p.frames if f["type"] in ("ack", "error")]) >= BURST + 10

    await eventually(answered, 10, what="every send answered")
    limited = [f for f in p.frames if f["type"] == "error"]
    assert {f["code"] for f in limited} == {"rate_limited"}
    assert BURST <= len(p.acks()) <= BURST + RATE * (time.monotonic() - t0) + 1  # the burst, and the refill
    assert all(f["ref"].startswith("m") and 1 <= f["retry_after_ms"] <= 1000 / RATE + 1 for f in limited)
    await asyncio.sleep(limited[-1]["retry_after_ms"] / 1000)
    again = await reply(p, {"type": "send", "room": "lobby", "client_msg_id": "later", "body": "x"})
    assert again["type"] == "ack", "the hint was enough"
    await p.close()


async def test_the_rate_limit_is_not_escaped_by_more_connections_or_by_reconnecting(gw: str, hard: Settings) -> None:
    tok = token(hard, "rl-pat")
    peers = [await Peer.connect(gw, tok) for _ in range(CONNS_MAX)]
    t0 = time.monotonic()
    for i in range(BURST):
        for k, p in enumerate(peers):
            await p.send({"type": "send", "room": "lobby", "client_msg_id": f"c{k}-{i}", "body": "x"})

    async def answered() -> bool:
        return sum(len([f for f in p.frames if f["type"] in ("ack", "error")]) for p in peers) >= BURST * CONNS_MAX

    await eventually(answered, 10, what="every send answered")
    acked = sum(len(p.acks()) for p in peers)
    assert acked <= BURST + RATE * (time.monotonic() - t0) + 1, "one bucket per user, shared by its connections"
    for p in peers:
        await p.close()
    emptied = time.monotonic()  # (at the latest)
    # Reconnecting at once finds the same bucket, refilled only by the time that passed: not a fresh one.
    p = await Peer.connect(gw, tok)
    for i in range(BURST):
        await p.send({"type": "send", "room": "lobby", "client_msg_id": f"again{i}", "body": "x"})

    async def all_answered() -> bool:
        return len([f for f in p.frames if f["type"] in ("ack", "error")]) >= BURST

    await eventually(all_answered, 10, what="every send answered")
    assert len(p.acks()) <= RATE * (time.monotonic() - emptied) + 1
    assert len(p.acks()) < BURST, "a fresh bucket would have taken them all"
    await p.close()


async def test_requests_in_progress_per_connection_are_bounded(gw: str, hard: Settings) -> None:
    p = await Peer.connect(gw, token(hard, "rl-quin"))
    n = MAX_PENDING_REQUESTS * 4
    for i in range(n):
        await p.send({"type": "history", "room": f"h{i % 7}"})

    async def answered() -> bool:
        return len([f for f in p.frames if f["type"] in ("history", "error")]) >= n

    await eventually(answered, 10, what="every history request answered")
    errors = [f for f in p.frames if f["type"] == "error"]
    assert errors, "the bound was reached"  # (all but the first 32 when nothing finishes meanwhile)
    assert len([f for f in p.frames if f["type"] == "history"]) >= MAX_PENDING_REQUESTS
    assert all(f["code"] == "rate_limited" and f["ref"].startswith("h") and f["retry_after_ms"] for f in errors)
    assert await reply(p, {"type": "ping"}) == {"type": "pong"}
    await p.close()


async def test_history_limit_is_capped(gw: str, hard: Settings) -> None:
    p = await Peer.connect(gw, token(hard, "li-rex"))
    await p.join("capped")
    for i in range(HISTORY_MAX + 5):
        await p.send({"type": "send", "room": "capped", "client_msg_id": f"h{i}", "body": f"h{i}"})
    await p.wait_for(lambda f: f["type"] == "message" and f["body"] == f"h{HISTORY_MAX + 4}")

    async def acked() -> bool:  # (an ack may come after its message: it would be taken for the page)
        return len(p.acks()) == HISTORY_MAX + 5

    await eventually(acked, 10, what="every send acked")

    async def stored() -> bool:
        page = await reply(p, {"type": "history", "room": "capped", "limit": 1})
        return bool(page["messages"]) and page["messages"][0]["body"] == f"h{HISTORY_MAX + 4}"

    await eventually(stored, 15, what="persisted")
    for limit in (HISTORY_MAX + 1, 1000, 2**63):
        page = await reply(p, {"type": "history", "room": "capped", "limit": limit})
        assert len(page["messages"]) == HISTORY_MAX and page["next"]
    await p.close()


@pytest.mark.parametrize("room,ok", [
    ("", False), ("a" * 65, False), ("a" * 64, True), ("two words", False), ("..", False), (".", False),
    ("a..b", True), (".hidden", True), ("café", False), ("lobby\n", False), ("a:b", False), ("{p0}", False),
    ("x*", False), ("UPPER_lower-0.9", True),
])
async def test_room_names(gw: str, hard: Settings, room: str, ok: bool) -> None:
    p = await Peer.connect(gw, token(hard, "rn-sam"))
    if ok:
        assert (await reply(p, {"type": "join", "room": room}))["type"] == "joined"
        assert (await reply(p, {"type": "send", "room": room, "client_msg_id": "n", "body": "x"}))["type"] == "ack"
    else:
        assert await error_of(p, {"type": "join", "room": room}) == ("bad_frame", room)
        assert await error_of(p, {"type": "send", "room": room, "client_msg_id": "n", "body": "x"}) == \
            ("bad_frame", "n")
        assert await error_of(p, {"type": "history", "room": room}) == ("bad_frame", room)
    await p.close()
