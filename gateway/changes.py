"""Edits and deletes: checked against the message as stored, then published like a send (the same
claim, so a resend gets the first ack; the same ack once Kafka has the event).

Only the author edits; the author or a moderator of the room (the token's `mod` claim) deletes. The
author is the stored message's: the room's Redis list (newest first), else MySQL by id. A message
acknowledged a moment ago may not be stored yet (the persister applies it just after): when the
store has not got it, the gateway waits (bounded, RECOVERY_WAIT_S) until the persister has applied
what the log held then, and looks again; only then is the answer `not_found` (`unavailable` when
the persister does not catch up in time). A deleted message is not found. A resend is answered
from its claim before any lookup, so it gets the first ack even after its delete.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable

from aiokafka.errors import KafkaError

from gateway.node import Node
from gateway.protocol import Delete, Edit
from gateway.recovery import PersisterBehind, wait_applied
from shared.auth import Identity
from shared.errors import Forbidden, NotFound, Unavailable
from shared.message import Message
from shared.store.entry import DELETE, EDIT

MESSAGE_ID = re.compile(r"[0-9A-HJKMNP-TV-Z]{26}")  # a ULID (shared.message.new_message_id)


async def change(node: Node, identity: Identity, f: Edit | Delete) -> Awaitable[bytes]:
    """Publish the edit or delete `f` (or find its first ack); an awaitable of the ack, as
    Publisher.send. Raises NotFound, Forbidden or Unavailable."""
    user, body = identity.user, f.body if isinstance(f, Edit) else ""
    if await node.publisher.claimed(user, f.room, f.client_msg_id):
        return node.publisher.first_ack(user, f.room, f.client_msg_id)
    target = await find(node, f.room, f.id) if MESSAGE_ID.fullmatch(f.id) else None
    if target is None or target.deleted:
        raise NotFound(f"no message {f.id} in room {f.room}"[:120])
    if isinstance(f, Edit) and target.user != user:
        raise Forbidden("only its author edits a message")
    if isinstance(f, Delete) and target.user != user and not identity.may_moderate(f.room):
        raise Forbidden("only its author or a moderator of the room deletes a message")
    return await node.publisher.send(user, f.room, f.client_msg_id, body, (EDIT if isinstance(f, Edit) else DELETE,
                                                                           target))


async def find(node: Node, room: str, msg_id: str) -> Message | None:
    """The message `msg_id` of `room` as stored now, waiting for the persister when it is not."""
    found = await lookup(node, room, msg_id)
    if found is not None:
        return found
    partition = node.keys.partition(room)
    try:
        end = await node.fanout.broker_end(partition)
        await wait_applied(node, partition, end - 1)
    except KafkaError as e:
        raise Unavailable("the log is unreachable") from e
    except PersisterBehind as e:
        raise Unavailable("recent messages are not stored yet; try again") from e
    return await lookup(node, room, msg_id)


async def lookup(node: Node, room: str, msg_id: str) -> Message | None:
    """Redis first, then MySQL: a mover inserts into MySQL before it trims the list, so a message
    that leaves the list between the two reads is found in MySQL."""
    return await node.buffer.find(room, msg_id) or await node.archive.find(room, msg_id)
