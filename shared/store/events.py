"""Edits and deletes over a run of a room's records: what a resume replays.

A resume replays every record after the client's cursor in position order, messages and events
alike, each message shown as it is now. Stored entries are current already (the persister applies
events where the messages are); records read straight from the log are as they were sent, so the
events of the run are applied to the messages of the run here too (applying one twice changes
nothing). An edit of a message deleted since is left out: a deleted body never comes back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from shared.message import Message
from shared.store.entry import DELETE, EDIT


def as_now(records: Sequence[Message]) -> list[Message]:
    """`records` (oldest first) with the run's edits and deletes applied to its messages, and
    the edits of deleted messages left out."""
    deleted = {m.target for m in records if m.kind == DELETE} | {m.id for m in records if m.deleted and not m.is_event}
    last_edit: dict[str, Message] = {}
    for m in records:
        if m.kind == EDIT and not m.deleted:
            last_edit[m.target] = m
    out = []
    for m in records:
        if m.kind == EDIT and (m.deleted or m.target in deleted):
            continue
        if not m.is_event:
            edit = last_edit.get(m.id)
            if m.id in deleted:
                m = dataclasses.replace(m, user="", body="", client_msg_id="", edited_ts=None, deleted=True)
            elif edit is not None and edit.position is not None and edit.position.offset > m.rev:
                m = dataclasses.replace(m, body=edit.body, edited_ts=edit.ts, rev=edit.position.offset)
        out.append(m)
    return out
