"""A resume's replay shown as it is now (shared.store.events.as_now), over random runs of messages,
edits and deletes: a client applying the frames in order ends with each message's final state, and
no deleted body is ever in a frame."""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import given
from hypothesis import strategies as st
from roomcast_client import apply

from shared.cursor import Position
from shared.message import Message
from shared.store.entry import DELETE, EDIT
from shared.store.events import as_now

# (0, _): a new message; (1, k): an edit of the k-th message so far; (2, k): its delete
ops = st.lists(st.tuples(st.integers(0, 2), st.integers(0, 30)), max_size=40)


def run(steps: list[tuple[int, int]]) -> tuple[list[Message], dict[str, dict[str, Any]]]:
    """The log of `steps` (as sent) and each message's final state (as history shows it)."""
    log: list[Message] = []
    final: dict[str, dict[str, Any]] = {}
    ids: list[str] = []
    for off, (op, k) in enumerate(steps):
        pos, ts = Position(0, off), 1000 + off
        if op == 0 or not ids:
            mid = f"m{off}"
            ids.append(mid)
            log.append(Message(mid, "r", "u", f"secret {off}", ts, f"c{off}", pos))
            final[mid] = {"id": mid, "body": f"secret {off}"}
            continue
        target = ids[k % len(ids)]
        kind = EDIT if op == 1 else DELETE
        log.append(Message(f"e{off}", "r", "u", f"secret edit {off}" if op == 1 else "", ts, f"c{off}", pos,
                           kind, target, int(target[1:])))
        if final[target].get("deleted"):
            continue
        final[target] = ({"id": target, "body": f"secret edit {off}", "edited_ts": ts} if op == 1
                         else {"id": target, "deleted": True})
    return log, final


def replayed(records: list[Message]) -> list[dict[str, Any]]:
    return [orjson.loads(m.frame()) for m in as_now(records)]


def view(state: dict[str, dict[str, Any]]) -> dict[str, tuple[Any, ...]]:
    return {k: (v.get("body"), v.get("edited_ts"), v.get("deleted", False)) for k, v in state.items()}


@given(ops)
def test_a_replay_from_the_log_applied_in_order_ends_as_history(steps: list[tuple[int, int]]) -> None:
    log, final = run(steps)
    frames = replayed(log)
    state: dict[str, dict[str, Any]] = {}
    for f in frames + frames:  # applying a frame twice changes nothing
        apply(state, f)
    assert view(state) == view(final)
    gone = {k for k, v in final.items() if v.get("deleted")}
    for f in frames:
        assert f["id"] not in gone or "body" not in f, f"a deleted body in a replayed frame: {f}"


@given(ops, st.integers(0, 40))
def test_a_replay_from_any_cursor_after_the_stored_state(steps: list[tuple[int, int]], cut: int) -> None:
    """Stored entries are current already; replaying the records after a cursor on top of what a
    client had before it ends the same."""
    log, final = run(steps)
    before, after = log[:cut], log[cut:]
    state: dict[str, dict[str, Any]] = {}
    for f in replayed(before):
        apply(state, f)
    stored_now = {m.id: m for m in as_now(log)}  # what the store holds: each record as it is now
    for f in replayed([stored_now.get(m.id, m) for m in after if m.id in stored_now]):
        apply(state, f)
    assert view(state) == view(final)
