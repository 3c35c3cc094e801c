"""The Redis key schema.

Every key the persister touches for one Kafka partition carries the hash tag `{pN}`, so a batch's
script touches one Redis Cluster slot and stays valid when Redis grows into a cluster. Room names
reach keys only after validation (shared.validation), so they cannot smuggle a separator in.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from shared.partitioning import partition_of


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str
    partitions: int

    def partition(self, room: str) -> int:
        return partition_of(room, self.partitions)

    def tag(self, partition: int) -> str:
        return f"{self.prefix}:{{p{partition}}}"

    # per partition
    def applied(self, partition: int) -> str:
        """Highest Kafka offset of the partition applied to Redis (the persister's mark)."""
        return f"{self.tag(partition)}:applied"

    def seen(self, partition: int, ts_ms: int) -> str:
        """Message ids appended in one minute (by the message's own ts): drops producer-retry copies."""
        return f"{self.tag(partition)}:seen:{ts_ms // 60000}"

    def new_rooms(self, partition: int) -> str:
        """Rooms seen in Redis but not yet registered in MySQL's `rooms` table."""
        return f"{self.tag(partition)}:newrooms"

    def over_cap(self, partition: int) -> str:
        """Rooms whose list is longer than the buffer cap: the flush work list."""
        return f"{self.tag(partition)}:overcap"

    def archived_events(self, partition: int) -> str:
        """Edits and deletes of messages already in MySQL, stored entries oldest first: the work
        list of the persister's flush loop (shared.store.buffer APPLY_BATCH fills it)."""
        return f"{self.tag(partition)}:archevents"

    # per room
    def msgs(self, room: str) -> str:
        """The room's newest messages, oldest left, newest right."""
        return f"{self.tag(self.partition(room))}:room:{room}:msgs"

    def meta(self, room: str) -> str:
        """Hash: first_ts (oldest ts in the list), last_ts (newest), reg (registered in MySQL)."""
        return f"{self.tag(self.partition(room))}:room:{room}:meta"

    def sent(self, room: str, user: str, client_msg_id: str) -> str:
        """The ack of a send, so a resend of the same client_msg_id is acknowledged, not re-sent."""
        digest = _digest(f"{user}\0{client_msg_id}")
        return f"{self.tag(self.partition(room))}:sent:{room}:{digest}"

    # presence (gateway/presence.py) and read state (shared/reads.py)
    def online(self, room: str) -> str:
        """Sorted set: the room's online users, scored by when their presence lapses (ms)."""
        return f"{self.tag(self.partition(room))}:room:{room}:online"

    def online_names(self, room: str) -> str:
        """Sorted set: the same users, all scored 0, so they list in name order."""
        return f"{self.tag(self.partition(room))}:room:{room}:onames"

    def user_gateways(self, room: str, user: str) -> str:
        """Sorted set: the gateways holding a connection of `user` joined to `room`, scored by lapse."""
        return f"{self.tag(self.partition(room))}:room:{room}:ogw:{_digest(user)}"

    def typing(self, room: str, user: str) -> str:
        """Set for TYPING_INTERVAL_S after a typing signal of `user` in `room` was forwarded."""
        return f"{self.tag(self.partition(room))}:room:{room}:typing:{_digest(user)}"

    def reads(self, user: str) -> str:
        """Hash: room -> the user's read offset in it; field "" marks a hash loaded from MySQL.
        Tagged by the user's partition of the reads topic, like the partition's mark below."""
        return f"{self.tag(self.partition(user))}:reads:{_digest(user)}"

    def reads_applied(self, partition: int) -> str:
        """Highest offset of the reads topic's partition applied to Redis (the reads consumer's mark)."""
        return f"{self.tag(partition)}:readsapplied"


    # per user: the limits every gateway shares (gateway/quota.py)
    def gateways(self) -> str:
        """Sorted set: gateway id -> until when (Redis time, ms) the connections it counts hold."""
        return f"{self.prefix}:{{conns}}:gateways"

    def conns(self, user: str) -> str:
        """Hash: gateway id -> the user's connections there. In the slot of `gateways` (same hash
        tag), so one script reads both."""
        return f"{self.prefix}:{{conns}}:user:{_digest(user)}"

    def send_budget(self, user: str) -> str:
        """The user's send budget: when (Redis time, us) the bucket would next be empty (GCRA)."""
        return f"{self.prefix}:rate:{_digest(user)}"



def _digest(text: str) -> str:
    """User ids are any text up to 255 characters: keys carry a fixed-size digest of them."""
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()
