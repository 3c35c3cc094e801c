"""`GET /dev/token`: only in dev mode, validates the name, mints a token the gateway accepts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import orjson
import pytest
from starlette.applications import Starlette
from starlette.routing import Route
from starlette.types import ASGIApp, Message

from gateway.app import create_app
from gateway.devtoken import dev_token, user_problem
from shared.auth import verify_token
from shared.settings import Settings

SETTINGS = Settings(dev_mode=True, jwt_secret="unit-test-secret-of-at-least-32-bytes", token_ttl_s=600)


@dataclass
class Reply:
    status_code: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


class Client:
    """Calls an ASGI app in-process with one HTTP request (Starlette's TestClient needs httpx2,
    which is not a dependency); the app's lifespan is never run."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def get(self, path: str, params: dict[str, str] | None = None) -> Reply:
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
                 "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "",
                 "query_string": urlencode(params or {}).encode(), "headers": [(b"host", b"test")],
                 "client": ("127.0.0.1", 1), "server": ("test", 80)}
        sent: list[Message] = []

        async def receive() -> Message:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: Message) -> None:
            sent.append(message)

        await self.app(scope, receive, send)
        start = next(m for m in sent if m["type"] == "http.response.start")
        body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
        headers = {k.decode().lower(): v.decode() for k, v in start.get("headers", [])}
        return Reply(start["status"], headers, body)


@pytest.fixture
def client() -> Client:
    return Client(Starlette(routes=[Route("/dev/token", dev_token(SETTINGS))]))  # the handler alone


async def test_a_valid_name_gets_a_token_for_that_user(client: Client) -> None:
    r = await client.get("/dev/token", params={"user": "alice"})
    assert r.status_code == 200
    assert r.headers["cache-control"] == "no-store"
    identity = verify_token(SETTINGS, r.json()["token"])
    assert identity.user == "alice"
    assert identity.may_access("any-room")


@pytest.mark.parametrize("user", ["Zoë Ünal", "a", "x" * 64, "bob the builder", "名前", "o'brien <b>"])
async def test_names_with_spaces_and_unicode_are_accepted(client: Client, user: str) -> None:
    r = await client.get("/dev/token", params={"user": user})
    assert r.status_code == 200, r.text
    assert verify_token(SETTINGS, r.json()["token"]).user == user


@pytest.mark.parametrize("query", [{}, {"user": ""}, {"user": "x" * 65}, {"user": "   "}, {"user": "a\nb"},
                                   {"user": "tab\there"}, {"user": "nul\x00"}, {"user": "del\x7f"},
                                   {"user": "rtl\u202eoverride"}, {"user": "line\u2028sep"}])
async def test_bad_names_are_refused_with_400_and_a_reason(client: Client, query: dict[str, str]) -> None:
    r = await client.get("/dev/token", params=query)
    assert r.status_code == 400
    body = r.json()
    assert body["error"] == "bad_request"
    assert body["reason"].startswith("user:")
    assert "token" not in body


def test_user_problem_is_none_exactly_for_good_names() -> None:
    assert user_problem("alice") is None
    assert user_problem(None) == "user: a name is required"
    assert user_problem("x" * 65) == "user: at most 64 characters"


def _paths(settings: Settings) -> set[str]:
    return {getattr(r, "path", "") for r in create_app(settings).routes}


def test_the_route_exists_only_in_dev_mode() -> None:
    """create_app builds its routes without running the lifespan (nothing connects here)."""
    assert "/dev/token" in _paths(SETTINGS)
    assert "/dev/token" not in _paths(SETTINGS.model_copy(update={"dev_mode": False}))
    assert "/dev/token" not in _paths(Settings())  # the default is off


async def test_without_dev_mode_the_path_is_not_found() -> None:
    client = Client(create_app(SETTINGS.model_copy(update={"dev_mode": False})))  # lifespan not run
    r = await client.get("/dev/token", params={"user": "alice"})
    assert r.status_code == 404
