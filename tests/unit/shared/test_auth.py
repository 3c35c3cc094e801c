"""Token checks that need no process: the rooms claim's size, audience and issuer (the gateway
answers each refusal 1008: tests/integration/test_security.py); token times: valid from `nbf` (if
any) until `exp`, whatever `iat` says (the issuer's clock may be ahead of the gateway's:
tests/faults/test_clock_skew.py)."""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest
from pydantic import SecretStr

from shared.auth import AuthError, mint_token, verify_token
from shared.settings import Settings

SECRET = "unit-test-secret-of-a-sufficient-length-0123456789"


def settings(**kw: Any) -> Settings:
    return Settings(jwt_secret=SecretStr(SECRET), **kw)


def signed(**claims: Any) -> str:
    return jwt.encode({"sub": "ann", "exp": int(time.time()) + 600, "rooms": ["*"], **claims}, SECRET,
                      algorithm="HS256")


def test_a_rooms_claim_of_more_than_a_thousand_entries_is_refused_by_default() -> None:
    s = settings()
    assert len(verify_token(s, signed(rooms=[f"r{i}" for i in range(1000)])).rooms) == 1000
    with pytest.raises(AuthError, match=r"^rooms claim has more than 1000 entries$"):
        verify_token(s, signed(rooms=[f"r{i}" for i in range(1001)]))
    with pytest.raises(AuthError, match="more than 3 entries"):
        verify_token(settings(token_max_rooms=3), signed(rooms=["a", "b", "c", "d"]))


def test_without_an_audience_set_a_token_naming_one_is_refused_and_no_issuer_is_checked() -> None:
    s = settings()
    assert verify_token(s, signed(iss="anyone")).user == "ann"
    with pytest.raises(AuthError, match="audience"):
        verify_token(s, signed(aud="another-service"))


@pytest.mark.parametrize("claims,ok", [
    ({"aud": "chat", "iss": "https://idp"}, True),
    ({"aud": ["other", "chat"], "iss": "https://idp"}, True),
    ({"aud": "other", "iss": "https://idp"}, False),
    ({"iss": "https://idp"}, False),
    ({"aud": "chat"}, False),
    ({"aud": "chat", "iss": "https://idp.evil"}, False),
])
def test_audience_and_issuer_when_set(claims: dict[str, Any], ok: bool) -> None:
    s = settings(jwt_audience="chat", jwt_issuer="https://idp")
    if ok:
        assert verify_token(s, signed(**claims)).user == "ann"
    else:
        with pytest.raises(AuthError):
            verify_token(s, signed(**claims))


def test_minted_tokens_carry_the_audience_and_issuer_set() -> None:
    s = settings(jwt_audience="chat", jwt_issuer="https://idp")
    claims = jwt.decode(mint_token(s, "bo"), SECRET, algorithms=["HS256"], audience="chat")
    assert (claims["aud"], claims["iss"]) == ("chat", "https://idp")
    assert "aud" not in jwt.decode(mint_token(settings(), "bo"), SECRET, algorithms=["HS256"])
    assert verify_token(s, mint_token(s, "bo")).user == "bo"


def test_a_token_issued_by_a_clock_ahead_of_ours_is_accepted() -> None:
    now = int(time.time())
    assert verify_token(settings(), signed(iat=now + 30, exp=now + 600)).user == "ann"


@pytest.mark.parametrize("times", [{"exp": -5}, {"exp": 600, "nbf": 600}])
def test_an_expired_or_not_yet_valid_token_is_refused(times: dict[str, int]) -> None:
    now = int(time.time())
    with pytest.raises(AuthError):
        verify_token(settings(), signed(**{k: now + v for k, v in times.items()}))
