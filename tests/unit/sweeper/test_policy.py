"""The sweeper's per-room decision, from metadata only."""

from __future__ import annotations

from typing import Literal

from hypothesis import given
from hypothesis import strategies as st

from sweeper.policy import Action, Meta, decide, parse_meta

DAY_S = 24 * 3600
NOW = 1_800_000_000_000
RET = 7 * DAY_S
CUTOFF = NOW - RET * 1000


def test_message_policy_moves_when_the_oldest_entry_is_past_retention() -> None:
    assert decide(Meta(CUTOFF - 1, NOW), NOW, RET, "message").action is Action.MOVE_OLD
    assert decide(Meta(CUTOFF, NOW), NOW, RET, "message").action is Action.NOTHING
    assert decide(Meta(NOW - 1000, NOW), NOW, RET, "message").action is Action.NOTHING
    d = decide(Meta(CUTOFF - 1, NOW), NOW, RET, "message")
    assert d.cutoff_ms == CUTOFF


def test_list_policy_moves_only_idle_rooms_whole() -> None:
    assert decide(Meta(CUTOFF - 10, CUTOFF - 1), NOW, RET, "list").action is Action.MOVE_ALL
    assert decide(Meta(CUTOFF - 10, CUTOFF), NOW, RET, "list").action is Action.NOTHING  # active: keeps old too
    assert decide(Meta(CUTOFF - 10, None), NOW, RET, "list").action is Action.NOTHING


def test_empty_list_needs_nothing_under_both_policies() -> None:
    for policy in ("message", "list"):
        assert decide(Meta(None, CUTOFF - 5), NOW, RET, policy).action is Action.NOTHING
        assert decide(Meta(None, None), NOW, RET, policy).action is Action.NOTHING


def test_parse_meta() -> None:
    assert parse_meta(b"12", b"34") == Meta(12, 34)
    assert parse_meta(None, b"34") == Meta(None, 34)
    assert parse_meta(b"x", None) == Meta(None, None)


@given(st.one_of(st.none(), st.integers(0, 2 * NOW)), st.one_of(st.none(), st.integers(0, 2 * NOW)),
       st.sampled_from(["message", "list"]))
def test_moves_only_what_is_past_retention(first_ts: int | None, last_ts: int | None,
                                           policy: Literal["message", "list"]) -> None:
    d = decide(Meta(first_ts, last_ts), NOW, RET, policy)
    if d.action is Action.MOVE_OLD:
        assert policy == "message" and first_ts is not None and first_ts < CUTOFF
    elif d.action is Action.MOVE_ALL:
        assert policy == "list" and first_ts is not None and last_ts is not None and last_ts < CUTOFF
    else:
        assert first_ts is None or (first_ts >= CUTOFF if policy == "message" else (last_ts or CUTOFF) >= CUTOFF)
