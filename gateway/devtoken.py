"""`GET /dev/token?user=NAME`: a token for the chat page's sign-in, in dev/local mode only.

Anyone who can reach this route can be anyone, so `create_app` registers it only when
`settings.dev_mode` is on; otherwise the path is not routed at all (404, like any unknown path).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from shared.auth import mint_token
from shared.settings import Settings

MAX_USER_CHARS = 64
# Control, format (e.g. bidi overrides, zero-width), surrogate; line and paragraph separators.
_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
_NO_STORE = {"Cache-Control": "no-store"}


def user_problem(user: str | None) -> str | None:
    """Why `user` is not an acceptable name, or None when it is."""
    if user is None or user == "":
        return "user: a name is required"
    if len(user) > MAX_USER_CHARS:
        return f"user: at most {MAX_USER_CHARS} characters"
    if user.strip() == "":
        return "user: a name cannot be only spaces"
    if any(unicodedata.category(ch) in _REFUSED_CATEGORIES for ch in user):
        return "user: control characters are not allowed"
    return None


def dev_token(settings: Settings) -> Callable[[Request], Awaitable[Response]]:
    """The route handler, bound to `settings` (its secret and token lifetime)."""

    async def endpoint(request: Request) -> Response:
        user = request.query_params.get("user")
        problem = user_problem(user)
        if problem is not None or user is None:
            return JSONResponse({"error": "bad_request", "reason": problem}, status_code=400, headers=_NO_STORE)
        return JSONResponse({"token": mint_token(settings, user)}, headers=_NO_STORE)

    return endpoint
