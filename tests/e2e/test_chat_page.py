"""Issue 6, end to end: the chat page in real headless Chromium (Debian's `chromium`, driven by
Playwright for Python; no browser download) against two gateway processes, the persister, the
broker, Redis and MariaDB.

1. Two pages on two different nodes join one room: a message typed in one shows in the other, and
   as acknowledged in the sender's page; bodies are shown as text, never as markup.
2. The gateway of page B is killed (SIGKILL) and started again on the same port; while it is down,
   page A sends three messages. Page B reconnects by itself, re-joins with its last cursor and shows
   the three missed messages exactly once, then live messages again.
3. A room with more messages than a page: scrolling to the top loads older pages, keeping the
   reader's place, down to the room's first message.
4. Through HAProxy (the production config, deploy/haproxy): the page, its dev token and its
   WebSocket all come from the load balancer's one address; its gateway is killed and the page
   resumes on the other one behind the same address, missing nothing.
5. Presence, typing and read state, two users on two nodes: each page's online list shows both,
   "bob is typing…" shows in alice's page while bob types, a read receipt "Seen by alice" shows
   under bob's last message, and an unread badge counts alice's messages in a room bob is not in,
   cleared when he opens it; bob leaving the room takes him off alice's online list.
6. Edit and delete, two users on two nodes: alice edits her message and deletes another from its
   buttons; both pages show the new body marked "edited" and a tombstone; a newcomer's history too.
7. Against a scripted fake gateway (frame-level control a real one does not give): an un-acked
   send survives a 4008 close and is resent with the same client_msg_id after the re-join with the
   last cursor, shown once; an `error` frame and a 1008 close show a clear banner.
Screenshots go to test-output/e2e/.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from roomcast_client import RoomcastClient
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from shared.auth import mint_token
from shared.settings import Settings
from tests.conftest import OUT, ROOT
from tests.support import Cluster, Lb
from tools.services import start_gateway

pytestmark = pytest.mark.timeout(120)

SHOTS = OUT / "e2e"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WAIT_MS = 15_000
APT_HINT = "apt-get update && apt-get install -y chromium"


def chromium_path() -> str:
    """Debian's Chromium; a missing browser is a failure with the install command, never a skip."""
    for candidate in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and Path(candidate).exists():
            return candidate
    pytest.fail(f"Chromium is not installed; this test needs Debian's package: {APT_HINT}", pytrace=False)


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        pytest.fail("Playwright for Python is not installed: pip install -e '.[test]' (no `playwright install`: "
                    f"the test drives the system Chromium from `{APT_HINT}`)", pytrace=False)
    executable = chromium_path()
    SHOTS.mkdir(parents=True, exist_ok=True)
    async with async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            await b.close()


@pytest.fixture
def dev(migrated: Settings) -> Settings:
    """Dev mode (the page's sign-in); a burst big enough to seed a room quickly."""
    return migrated.model_copy(update={"dev_mode": True, "send_burst": 1000})


@pytest.fixture
def cluster(dev: Settings, log_dir: Path) -> Iterator[Cluster]:
    c = Cluster(dev, log_dir).start()
    yield c
    c.stop()


class ChatPage:
    """One browser tab with the chat page, and what the test reads from it."""

    def __init__(self, page: Any, name: str) -> None:
        self.page, self.name = page, name
        self.errors: list[str] = []
        page.set_default_timeout(WAIT_MS)
        page.on("pageerror", lambda e: self.errors.append(f"{name}: {e}"))

    @classmethod
    async def open(cls, browser: Any, url: str, name: str) -> ChatPage:
        page = await browser.new_page(viewport={"width": 1000, "height": 720})
        await page.goto(url)
        return cls(page, name)

    async def sign_in_and_join(self, user: str, room: str) -> None:
        await self.page.fill("#name", user)
        await self.page.click("#signin button[type=submit]")
        await self.page.fill("#room", room)
        await self.page.click("#roomform button[type=submit]")
        await self.until("window.roomcast.st.joined", f"{self.name} joined {room}")

    async def say(self, text: str) -> None:
        await self.page.fill("#text", text)
        await self.page.press("#text", "Enter")

    async def bodies(self) -> list[str]:
        return list(await self.page.locator("#messages .body").all_text_contents())

    async def state_of(self, body: str) -> str | None:
        return await self.page.evaluate(
            "b => [...document.querySelectorAll('#messages li')].find(li => "
            "li.querySelector('.body').textContent === b)?.dataset.state ?? null", body)

    async def until(self, js: str, what: str, arg: Any = None, timeout_ms: int = WAIT_MS) -> None:
        try:
            await self.page.wait_for_function(js, arg=arg, timeout=timeout_ms)
        except Exception as e:
            raise AssertionError(f"{self.name}: {what} not reached within {timeout_ms} ms; "
                                 f"{await self.describe()}") from e

    async def shows(self, wanted: list[str], timeout_ms: int = WAIT_MS) -> None:
        await self.until("w => { const have = new Set([...document.querySelectorAll('#messages .body')]"
                         ".map(e => e.textContent)); return w.every(x => have.has(x)); }",
                         f"messages {wanted}", wanted, timeout_ms)

    async def describe(self) -> str:
        return str(await self.page.evaluate(
            "() => ({conn: document.getElementById('conn').textContent, "
            "banner: document.getElementById('banner').hidden ? null : document.getElementById('banner-text')"
            ".textContent, joined: window.roomcast?.st.joined, cursor: window.roomcast?.st.cursor, "
            "stats: window.roomcast?.stats, visibility: document.visibilityState, "
            "rooms: document.getElementById('rooms')?.textContent, readSent: window.roomcast?.st.readSent, "
            "bodies: [...document.querySelectorAll('#messages .body')]"
            ".map(e => e.textContent).slice(-12)})"))

    async def stats(self) -> dict[str, int]:
        return dict(await self.page.evaluate("() => window.roomcast.stats"))


async def test_two_nodes_live_messages_and_recovery_after_the_gateway_dies(
        browser: Any, cluster: Cluster, dev: Settings, log_dir: Path) -> None:
    room = "e2e-live"
    a = await ChatPage.open(browser, f"{cluster.http(0)}/", "page A")
    b = await ChatPage.open(browser, f"{cluster.http(0)}/?node={cluster.url(1)}", "page B")
    assert await a.page.text_content("#node") == cluster.url(0)
    assert await b.page.text_content("#node") == cluster.url(1), "?node= must pick the gateway"
    await a.sign_in_and_join("alice", room)
    await b.sign_in_and_join("bob", room)

    # 1. live, across nodes; acknowledged in the sender's page; bodies are text, not markup
    await a.say("hello from A")
    await b.shows(["hello from A"])
    await a.until("b => [...document.querySelectorAll('#messages li[data-state=acked] .body')]"
                  ".some(e => e.textContent === b)", "'hello from A' acknowledged", "hello from A")
    markup = '<img src=x onerror="window.pwned=1"> & <b>bold</b>'
    await b.say(markup)
    await a.shows([markup])
    assert await a.page.locator("#messages img, #messages b").count() == 0, "a body was rendered as HTML"
    assert await a.page.evaluate("() => window.pwned") is None
    assert (await a.bodies()).count("hello from A") == 1, "the sender's own message is shown twice"
    assert not await a.page.locator("#banner").is_visible(), await a.describe()
    await a.page.screenshot(path=str(SHOTS / "chat.png"))

    # 2. kill page B's gateway; A sends while B is away; the gateway comes back on the same port
    old = cluster.gateways[1]
    port = old.ports[0]
    old.kill()
    await b.until("document.getElementById('conn').dataset.state !== 'online'", "B noticing the dead connection")
    missed = ["missed 1", "missed 2", "missed 3"]
    for text in missed:
        await a.say(text)
    for text in missed:
        await a.until("b => [...document.querySelectorAll('#messages li[data-state=acked] .body')]"
                      ".some(e => e.textContent === b)", f"'{text}' acknowledged", text)
    assert not set(missed) & set(await b.bodies()), "B shows messages sent while its node was dead"
    cluster.gateways[1] = await asyncio.to_thread(
        start_gateway, dev, port, log_dir, f"{dev.redis_prefix}-gw{port}-restarted")

    await b.until("window.roomcast.st.joined", "B re-joined after its node restarted", timeout_ms=30_000)
    await b.shows(missed)
    stats = await b.stats()
    assert stats["reconnects"] >= 1
    assert stats["resumeFallbacks"] == 0, (
        f"B could not resume from its cursor and fell back to the newest history page: {await b.describe()}")
    assert await b.page.text_content("#conn") == "connected"
    assert not await b.page.locator("#banner").is_visible(), f"the reconnect warning stayed: {await b.describe()}"
    await a.say("after the restart")
    await b.shows(["after the restart"])
    await b.say("B is back")
    await a.shows(["B is back"])
    bodies = await b.bodies()
    for text in [*missed, "hello from A", "after the restart"]:
        assert bodies.count(text) == 1, f"{text!r} shown {bodies.count(text)} times in B: {bodies}"
    assert bodies == ["hello from A", markup, *missed, "after the restart", "B is back"], bodies
    assert await a.state_of("missed 3") == "acked"
    await a.page.screenshot(path=str(SHOTS / "chat.png"))
    await b.page.screenshot(path=str(SHOTS / "chat-reconnected.png"))
    assert not a.errors + b.errors, f"JavaScript errors: {a.errors + b.errors}"


async def test_through_the_load_balancer_the_page_knows_one_address_and_outlives_its_gateway(
        browser: Any, cluster: Cluster, tmp_path: Path) -> None:
    room = "e2e-lb"
    lb = Lb.start(cluster, tmp_path)
    try:
        a = await ChatPage.open(browser, f"{lb.http}/", "page A")
        await a.sign_in_and_join("alice", room)  # its token from /dev/token, through HAProxy
        [a_gateway] = [g for g in cluster.gateways if lb.server(g).current == 1]
        b = await ChatPage.open(browser, f"{lb.http}/", "page B")
        await b.sign_in_and_join("bob", room)
        [b_gateway] = [g for g in cluster.gateways if g is not a_gateway]
        assert lb.server(b_gateway).current == 1, "leastconn put B on the other gateway"
        for page in (a, b):
            assert await page.page.text_content("#node") == lb.url, "the page knows only HAProxy's address"
        await a.say("before")
        await b.shows(["before"])

        b_gateway.kill()
        missed = ["missed 1", "missed 2"]
        for text in missed:
            await a.say(text)
        await b.until("window.roomcast.st.joined && window.roomcast.stats.reconnects >= 1",
                      "B re-joined behind the same address", timeout_ms=30_000)
        await b.shows(missed)
        assert lb.server(a_gateway).current == 2, "B's new connection went to the live gateway"
        assert (await b.stats())["resumeFallbacks"] == 0, await b.describe()
        assert await b.page.text_content("#node") == lb.url
        await b.say("B is back")
        await a.shows(["B is back"])
        assert await b.bodies() == ["before", *missed, "B is back"], await b.bodies()
        await b.page.screenshot(path=str(SHOTS / "chat-through-haproxy.png"))
        assert not a.errors + b.errors, f"JavaScript errors: {a.errors + b.errors}"
    finally:
        lb.stop()


async def test_online_list_typing_receipts_and_unread_badges(browser: Any, cluster: Cluster) -> None:
    room, other = "e2e-signals", "e2e-elsewhere"
    a = await ChatPage.open(browser, f"{cluster.http(0)}/", "alice's page")
    b = await ChatPage.open(browser, f"{cluster.http(1)}/", "bob's page")
    await a.sign_in_and_join("alice", room)
    await b.sign_in_and_join("bob", room)
    for page in (a, b):
        await page.until("() => [...document.querySelectorAll('#online li')].map(e => e.textContent).join() "
                         "=== 'alice,bob'", "the online list showing alice and bob")

    await b.page.type("#text", "hel", delay=30)  # keystrokes: the page sends `typing`
    await a.until("() => document.getElementById('typing').textContent === 'bob is typing…'", "bob typing")
    await b.page.type("#text", "lo from bob")
    await b.page.press("#text", "Enter")
    await a.shows(["hello from bob"])
    await a.until("() => document.getElementById('typing').textContent === ''", "the typing line cleared")
    await b.until("() => !document.getElementById('receipts').hidden && "
                  "document.getElementById('receipts').textContent === 'Seen by alice'", "alice's read receipt")
    await b.page.screenshot(path=str(SHOTS / "chat-signals.png"))

    await b.page.fill("#room", other)  # bob moves to another room; alice writes where he was
    await b.page.click("#roomform button[type=submit]")
    await b.until("window.roomcast.st.joined", "bob in the other room")
    await a.until("() => [...document.querySelectorAll('#online li')].map(e => e.textContent).join() === 'alice'",
                  "bob off alice's online list")
    await a.say("one for bob")
    await a.say("two for bob")
    badge = f"#rooms li[data-room='{room}'] .badge"
    await b.until("s => document.querySelector(s)?.textContent === '2'", "an unread badge of 2", badge,
                  timeout_ms=25_000)
    await b.page.screenshot(path=str(SHOTS / "chat-unread.png"))
    await b.page.click(f"#rooms li[data-room='{room}'] button")
    await b.shows(["one for bob", "two for bob"])
    await b.until("s => document.querySelector(s) === null", "the badge cleared", badge)
    await a.until("() => document.getElementById('receipts').textContent === 'Seen by bob'", "bob's receipt")
    assert not a.errors + b.errors, f"JavaScript errors: {a.errors + b.errors}"


async def test_an_edit_and_a_delete_show_in_both_pages_and_in_history(browser: Any, cluster: Cluster) -> None:
    room = "e2e-edits"
    a = await ChatPage.open(browser, f"{cluster.http(0)}/", "alice's page")
    b = await ChatPage.open(browser, f"{cluster.http(1)}/", "bob's page")
    a.page.on("dialog", lambda d: asyncio.ensure_future(d.accept()))  # "Delete this message?"
    await a.sign_in_and_join("alice", room)
    await b.sign_in_and_join("bob", room)
    for text in ("typo heer", "to be taken back"):
        await a.say(text)
        await a.until("b => [...document.querySelectorAll('#messages li[data-state=acked] .body')]"
                      ".some(e => e.textContent === b)", f"'{text}' acknowledged", text)
    await b.say("bob's own")
    await b.shows(["typo heer", "to be taken back", "bob's own"])
    await a.shows(["bob's own"])
    assert await b.page.locator("#messages li:not(.mine) .act").count() == 0, "actions on others' messages"

    def li(text: str) -> str:
        return f"#messages li:has(.body:text-is('{text}'))"

    await a.page.click(f"{li('typo heer')} .act.edit")
    assert await a.page.input_value("#text") == "typo heer"
    await a.page.fill("#text", "typo here")
    await a.page.press("#text", "Enter")
    await a.page.click(f"{li('to be taken back')} .act.delete")
    edited_and_deleted = (
        "() => { const lis = [...document.querySelectorAll('#messages li')];"
        " const e = lis.find(l => l.querySelector('.body').textContent === 'typo here');"
        " return e?.querySelector('.edited').textContent === '(edited)'"
        " && lis.filter(l => l.dataset.deleted).length === 1"
        " && !lis.some(l => l.querySelector('.body').textContent === 'to be taken back'); }")
    for page in (a, b):
        await page.until(edited_and_deleted, "the edit and the delete shown")
    await b.page.screenshot(path=str(SHOTS / "chat-edits.png"))
    assert "typo heer" not in await b.bodies()

    c = await ChatPage.open(browser, f"{cluster.http(0)}/", "carol's page")  # a newcomer: history as it is now
    await c.sign_in_and_join("carol", room)
    await c.until(edited_and_deleted, "history showing the edit and the delete")
    assert (await c.bodies())[-1] == "bob's own"
    assert not a.errors + b.errors + c.errors, f"JavaScript errors: {a.errors + b.errors + c.errors}"


@pytest.fixture
def small_buffer(dev: Settings) -> Settings:
    """A small Redis list, so older pages come from MySQL (the history look-aside)."""
    return dev.model_copy(update={"buffer_cap": 40, "flush_chunk": 20})


async def test_scrolling_back_loads_older_history_and_keeps_the_place(
        browser: Any, small_buffer: Settings, log_dir: Path) -> None:
    room = "e2e-history"
    cluster = Cluster(small_buffer, log_dir).start()
    try:
        seeded = [f"seed {i:03d}" for i in range(130)]
        async with RoomcastClient(cluster.url(0), mint_token(small_buffer, "seeder")) as client:
            await client.join(room)
            acks = await asyncio.gather(*(client.send_nowait(room, text) for text in seeded))
            last = acks[-1]["id"]
            for _ in range(100):  # until the persister has applied the newest one
                page = await client.history(room, limit=1)
                if page["messages"] and page["messages"][-1]["id"] == last:
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("the persister did not apply the seeded messages")

        b = await ChatPage.open(browser, f"{cluster.http(1)}/", "page B")
        await b.sign_in_and_join("bob", room)
        await b.until("document.querySelectorAll('#messages .body').length === 50", "the newest page of 50")
        assert await b.bodies() == seeded[80:]
        assert await b.page.locator("#older").is_visible()

        async def scroll_to_top_and_wait_for(count: int) -> None:
            await b.page.locator("#scroller").evaluate("e => { e.scrollTop = 0; }")
            await b.until(f"document.querySelectorAll('#messages .body').length === {count} "
                          "&& !window.roomcast.st.loading", f"{count} messages after scrolling back")

        await scroll_to_top_and_wait_for(100)
        assert await b.bodies() == seeded[30:]
        # the reader's place is kept: the message that was on top is still in view, not pushed away
        in_view = await b.page.evaluate(
            "b => { const s = document.getElementById('scroller').getBoundingClientRect(); "
            "const li = [...document.querySelectorAll('#messages .body')].find(e => e.textContent === b);"
            "const r = li.getBoundingClientRect(); return r.bottom > s.top && r.top < s.bottom; }", "seed 080")
        assert in_view, "loading older messages lost the scroll position"
        assert await b.page.locator("#scroller").evaluate("e => e.scrollTop") > 0

        await scroll_to_top_and_wait_for(130)
        assert await b.bodies() == seeded
        await b.until("window.roomcast.st.next === null", "the start of the room")
        assert (await b.page.text_content("#older") or "").strip() == "Start of the room"
        assert (await b.stats())["duplicates"] == 0
        await b.page.locator("#scroller").evaluate("e => { e.scrollTop = 0; }")
        await b.page.screenshot(path=str(SHOTS / "chat-history.png"))
        assert not b.errors, f"JavaScript errors: {b.errors}"
    finally:
        cluster.stop()


STATIC = ROOT / "gateway" / "static"
TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}


def msg(user: str, body: str, off: int, cmid: str = "") -> str:
    return json.dumps({"type": "message", "room": "r", "id": f"id-{off}", "user": user, "body": body,
                       "ts": 1_700_000_000_000 + off, "cursor": f"0-{off}", "cmid": cmid})


async def test_unacked_send_is_resent_after_a_4008_and_errors_show_a_banner(browser: Any) -> None:
    received: list[list[dict[str, Any]]] = []  # frames from the page, per connection
    release = asyncio.Event()

    offers: list[tuple[str, str | None, str | None]] = []  # per connection: path, offered, selected

    async def gateway(ws: ServerConnection) -> None:
        got: list[dict[str, Any]] = []
        received.append(got)
        assert ws.request is not None
        offers.append((ws.request.path, ws.request.headers.get("Sec-WebSocket-Protocol"), ws.subprotocol))

        async def recv() -> dict[str, Any]:
            while True:  # (what the page asks about presence and read state gets no answer here)
                frame = json.loads(await ws.recv())
                if frame["type"] not in ("presence", "unread", "read", "typing"):
                    got.append(frame)
                    return frame

        if len(received) == 1:
            await recv()  # join, no cursor
            await ws.send(json.dumps({"type": "joined", "room": "r", "cursor": "0-9"}))
            await recv()  # history
            await ws.send(json.dumps({"type": "history", "room": "r", "next": None,
                                      "messages": [json.loads(msg("carol", "old 8", 8)),
                                                   json.loads(msg("carol", "old 9", 9))]}))
            await recv()  # the page's send: left without an ack
            await ws.send(msg("carol", "live 10", 10))
            await ws.close(4008, "too slow; resume with your last cursor")
        elif len(received) == 2:
            await recv()  # join with the last cursor
            await ws.send(json.dumps({"type": "joined", "room": "r", "cursor": "0-11", "recovered": True}))
            await ws.send(msg("dave", "replayed 11", 11))
            send = await recv()  # the resend
            cmid = send.get("client_msg_id", "")
            await ws.send(msg("alice", send.get("body", ""), 12, cmid))  # fan-out of the page's own message
            await ws.send(json.dumps({"type": "ack", "client_msg_id": cmid, "id": "id-12", "room": "r",
                                      "cursor": "0-12", "ts": 1_700_000_000_012}))
            await ws.send(json.dumps({"type": "error", "code": "forbidden", "reason": "no access to room x",
                                      "ref": None}))
            await release.wait()
            await ws.close(1008, "bad token: expired")
        else:
            await ws.close(1008, "bad token: expired")

    tokens: list[str] = []

    def http(connection: ServerConnection, request: Request) -> Response | None:
        """Plain HTTP on the fake's port: the page's files and /dev/token (like a gateway in dev mode)."""
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return None
        path = urlsplit(request.path).path
        status, ctype, body = 404, "text/plain", b"not found"
        if path == "/dev/token":
            tokens.append(request.path)
            status, ctype, body = 200, "application/json", json.dumps({"token": f"token-{len(tokens)}"}).encode()
        elif (f := STATIC / ("index.html" if path == "/" else path.lstrip("/"))).is_file() and f.suffix in TYPES:
            status, ctype, body = 200, TYPES[f.suffix], f.read_bytes()
        headers = Headers([("Content-Type", ctype), ("Content-Length", str(len(body))), ("Cache-Control", "no-store")])
        return Response(status, "OK" if status == 200 else "Not Found", headers, body)

    async with serve(gateway, "127.0.0.1", 0, process_request=http,
                     subprotocols=[Subprotocol("roomcast.v1")]) as server:
        port = server.sockets[0].getsockname()[1]
        page = await browser.new_page()
        await page.goto(f"http://127.0.0.1:{port}/")
        p = ChatPage(page, "page")
        await p.sign_in_and_join("alice", "r")
        await p.shows(["old 8", "old 9"])
        await p.say("please resend me")
        await p.until("window.roomcast.st.joined && window.roomcast.stats.reconnects === 1", "a re-join after 4008")
        await p.until("document.querySelector('#messages li[data-state=acked]') !== null", "the resend acknowledged")
        await p.until("document.getElementById('banner-text').textContent.includes('forbidden')", "the error banner")
        assert await page.locator("#banner").is_visible()
        assert await p.bodies() == ["old 8", "old 9", "live 10", "replayed 11", "please resend me"]
        first, second = received[0], received[1]
        assert first[0] == {"type": "join", "room": "r", "presence": True}
        assert first[1] == {"type": "history", "room": "r", "limit": 50}
        assert second[0] == {"type": "join", "room": "r", "cursor": "0-10", "presence": True}, \
            "re-join must carry the last cursor"
        assert first[2]["type"] == second[1]["type"] == "send"
        assert first[2]["client_msg_id"] == second[1]["client_msg_id"], "a resend must keep its client_msg_id"
        assert await p.state_of("please resend me") == "acked"

        release.set()  # 1008: one fresh token is tried, then the page gives up and says so
        await p.until("document.getElementById('conn').dataset.state === 'offline'", "giving up after 1008 twice")
        assert "refused the sign-in" in (await page.text_content("#banner-text") or "")
        assert await page.locator("#signin").is_visible(), "the page must offer to sign in again"
        assert len(tokens) == 2
        # Each token went in the Sec-WebSocket-Protocol header (a fresh one after the first 1008),
        # never in the URL; the page accepted the subprotocol the server selected.
        assert offers[:2] == [("/ws?v=1", "roomcast.v1, bearer.token-1", "roomcast.v1")] * 2
        assert offers[-1] == ("/ws?v=1", "roomcast.v1, bearer.token-2", "roomcast.v1")
        await page.screenshot(path=str(SHOTS / "chat-errors.png"))
        assert not p.errors, f"JavaScript errors: {p.errors}"
        await page.close()
