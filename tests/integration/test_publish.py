"""The publish API (`POST /rooms/{room}/messages`) on a real cluster: a send without the socket,
idempotent by (sub, client_msg_id) across gateways, with the send's checks, budget and errors."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from shared.settings import Settings
from tests.faults.proxy import TcpProxy
from tests.integration.test_cli import roomcast
from tests.support import Cluster, Peer, token

ROOM = "pub.room"


@dataclass
class Answer:
    status_code: int
    headers: dict[str, str]
    text: str

    def json(self) -> Any:
        return json.loads(self.text)


def _post(url: str, headers: dict[str, str], content: bytes) -> Answer:
    req = urllib.request.Request(url, data=content, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=20) as r:
            return Answer(r.status, {k.lower(): v for k, v in r.headers.items()}, r.read().decode())
    except urllib.error.HTTPError as e:
        return Answer(e.code, {k.lower(): v for k, v in e.headers.items()}, e.read().decode())


async def post(base: str, tok: str | None, body: Any, room: str = ROOM, raw: bytes | None = None) -> Answer:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {tok}"} if tok else {})}
    content = raw if raw is not None else json.dumps(body).encode()
    return await asyncio.to_thread(_post, f"{base}/rooms/{room}/messages", headers, content)


async def test_a_publish_is_a_send_acknowledged_once_across_gateways(cluster: Cluster) -> None:
    s: Settings = cluster.settings
    svc = token(s, "deploy-bot")
    bob = await Peer.connect(cluster.url(1), token(s, "bob"))
    await bob.join(ROOM)
    first, again = await asyncio.gather(post(cluster.http(0), svc, {"client_msg_id": "k-1", "body": "deployed"}),
                                        post(cluster.http(1), svc, {"client_msg_id": "k-1", "body": "deployed"}))
    assert first.status_code == again.status_code == 200, (first.text, again.text)
    ack = first.json()
    assert again.json() == ack, "the same ack from either gateway"
    assert (ack["type"], ack["client_msg_id"], ack["room"]) == ("ack", "k-1", ROOM)
    later = await post(cluster.http(1), svc, {"client_msg_id": "k-1", "body": "deployed"})
    assert later.json() == ack and first.headers["cache-control"] == "no-store"
    msg = await bob.wait_for(lambda f: f["type"] == "message" and f["id"] == ack["id"])
    assert (msg["user"], msg["body"], msg["cursor"]) == ("deploy-bot", "deployed", ack["cursor"])
    await bob.send({"type": "ping"})
    await bob.wait_for(lambda f: f["type"] == "pong")
    assert [f["id"] for f in bob.messages(ROOM)] == [ack["id"]], "published once"

    async def refused(status: int, code: str, tok: str | None = svc, body: Any = None, **kw: Any) -> None:
        r = await post(cluster.http(0), tok, body, **kw)
        assert (r.status_code, r.json()["error"]) == (status, code), r.text
        assert r.json()["reason"]

    await refused(400, "bad_frame", raw=b"{not json")
    await refused(400, "bad_frame", body=["k", "b"])
    await refused(400, "bad_frame", body={"body": "no id"})
    await refused(400, "bad_frame", body={"client_msg_id": "k-2", "body": "  "})
    await refused(400, "bad_frame", body={"client_msg_id": "k-2", "body": 7})
    await refused(400, "bad_frame", body={"client_msg_id": "k-2", "body": "x"}, room="bad%20room!")
    await refused(413, "too_large", body={"client_msg_id": "k-2", "body": "x" * (s.max_body_chars + 1)})
    await refused(401, "unauthorized", tok=None, body={"client_msg_id": "k-2", "body": "x"})
    await refused(403, "forbidden", tok=token(s, "svc", rooms=["other"]), body={"client_msg_id": "k-2", "body": "x"})

    # the CLI: `roomcast post ROOM TEXT`, through the same API
    posted = await asyncio.to_thread(roomcast, s, "post", ROOM, "from the shell", "--url", cluster.http(0),
                                     "--user", "ops", "--client-msg-id", "cli-1")
    assert posted.returncode == 0, posted.stderr
    cli_ack = json.loads(posted.stdout)
    await bob.wait_for(lambda f: f["type"] == "message" and f["id"] == cli_ack["id"] and f["user"] == "ops")
    again = await asyncio.to_thread(roomcast, s, "post", ROOM, "from the shell", "--url", cluster.http(0),
                                    "--user", "ops", "--client-msg-id", "cli-1")
    assert json.loads(again.stdout) == cli_ack
    bad = await asyncio.to_thread(roomcast, s, "post", ROOM, "  ", "--url", cluster.http(0))
    assert bad.returncode == 1 and bad.stderr.startswith("400 ") and "bad_frame" in bad.stderr
    await bob.close()


async def test_a_publish_over_budget_is_429_and_without_redis_503(small_buffer: Settings, log_dir: Path) -> None:
    redis_at = urlsplit(small_buffer.redis_url)
    proxy = await TcpProxy(redis_at.hostname or "127.0.0.1", redis_at.port or 6379).start()
    settings = small_buffer.model_copy(update={"redis_url": f"redis://127.0.0.1:{proxy.port}{redis_at.path}",
                                               "send_burst": 2, "send_rate_per_s": 0.2})
    cluster = Cluster(settings, log_dir).start(gateways=1)
    try:
        svc = token(settings, "bot")
        answers = [await post(cluster.http(0), svc, {"client_msg_id": f"k-{i}", "body": "hi"}) for i in range(4)]
        assert [a.status_code for a in answers[:2]] == [200, 200], [a.text for a in answers]
        limited = [a for a in answers if a.status_code == 429]
        assert limited, [a.text for a in answers]
        assert limited[0].json()["error"] == "rate_limited" and int(limited[0].headers["retry-after"]) >= 1
        await proxy.cut()  # the dedupe store (and the budget) out of reach: nothing can be promised
        down = await post(cluster.http(0), token(settings, "another-bot"), {"client_msg_id": "k-9", "body": "hi"})
        assert (down.status_code, down.json()["error"]) == (503, "unavailable"), down.text
    finally:
        cluster.stop()
        await proxy.close()
