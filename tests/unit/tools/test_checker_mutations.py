"""The oracle against deliberately broken runs: a record of a run shaped like a fault test's (frames
each member got, stored copies in both stores, history paged back, every send's outcome) passes
the checker; each mutation a broken build could make (a duplicated delivery, a swapped pair, a
dropped ack, a changed body, a lost message, a replay of what a client had, a second id) is made at
every position it can be, and the check that must catch it fails with that kind, and only that."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import pytest

from tools.checker import Ack, Allow, Copy, Report, Unacked, check_delivery, check_sends, check_storage, offset

ROOMS = {"room-0": 0, "room-1": 1}  # room -> its partition
USERS = ("user-0", "user-1", "user-2")


@dataclass
class Run:
    acks: list[Ack] = field(default_factory=list)
    unacked: list[Unacked] = field(default_factory=list)
    frames: dict[str, dict[str, list[Copy]]] = field(default_factory=dict)  # member -> room -> as sent
    joined: dict[str, dict[str, str]] = field(default_factory=dict)  # member -> room -> join cursor
    stored: dict[str, list[Copy]] = field(default_factory=dict)  # room -> Redis copies, then MySQL's
    paged: dict[str, list[Copy]] = field(default_factory=dict)  # room -> history paged back, oldest first

    def delivery(self) -> Report:
        return check_delivery({"all": self.acks}, self.frames, self.joined, unacked=self.unacked)

    def storage(self) -> Report:
        return check_storage(self.acks, self.stored, self.unacked)

    def history(self) -> Report:
        return check_storage(self.acks, self.paged, self.unacked)


def copy_of(ack: Ack, source: str = "") -> Copy:
    return Copy(ack.id, ack.cursor, ack.user, ack.body, ack.ts, ack.client_msg_id, source)


def recorded_run() -> Run:
    """Three users send 12 messages into each of two rooms; the 6th of room-0 got no ack (given up)
    but reached the log. user-0 is in both rooms from the start; user-1 joined room-0 after its 4th
    message; user-2 is in room-1 and reconnected after its 5th message (the resume went on from its
    cursor). room-0's 9 oldest were moved to MySQL, the last 2 of those not yet trimmed from Redis."""
    run = Run()
    copies: dict[str, list[Copy]] = {}
    for room, partition in ROOMS.items():
        for o in range(100, 112):
            k = o - 100
            user = USERS[k % len(USERS)]
            ack = Ack(room, f"{room}-id{o}", f"{partition}-{o}", f"{user}-{room}-{k}", 1_700_000_000_000 + o, user,
                      f"{user}:{room}:{k}")
            if (room, k) == ("room-0", 5):
                run.unacked.append(Unacked(room, user, ack.client_msg_id, ack.body, "timeout"))
            else:
                run.acks.append(ack)
            copies.setdefault(room, []).append(copy_of(ack))
    run.joined = {"user-0": {"room-0": "0-99", "room-1": "1-99"}, "user-1": {"room-0": "0-103"},
                  "user-2": {"room-1": "1-99"}}
    for member, rooms in run.joined.items():
        run.frames[member] = {room: [c for c in copies[room] if offset(c.cursor) > offset(join)]
                              for room, join in rooms.items()}
    mysql = [replace(c, source="mysql") for c in copies["room-0"][:9]]
    redis0 = [replace(c, source="redis") for c in copies["room-0"][7:]]
    run.stored = {"room-0": redis0 + mysql, "room-1": [replace(c, source="redis") for c in copies["room-1"]]}
    run.paged = {room: [replace(c, source="history") for c in cs] for room, cs in copies.items()}
    return run


def only(report: Report, kind: str, n: int = 1) -> bool:
    """`report` holds `n` problems of `kind` and nothing else."""
    others = {k: v for k, v in vars(report).items() if k not in ("examples", kind) and v}
    return getattr(report, kind) == n and not others


# --- the mutations, each on one list of copies at position i (in place)
def duplicate(copies: list[Copy], i: int) -> None:
    copies.insert(i + 1, copies[i])


def duplicate_later(copies: list[Copy], i: int) -> None:
    copies.append(copies[i])  # (a resend after a reconnect repeating it)


def swap(copies: list[Copy], i: int) -> None:
    copies[i], copies[i + 1] = copies[i + 1], copies[i]


def drop(copies: list[Copy], i: int) -> None:
    del copies[i]


def change_body(copies: list[Copy], i: int) -> None:
    copies[i] = replace(copies[i], body=copies[i].body + "!")


def second_id(copies: list[Copy], i: int) -> None:
    """Published again under another id at a newer position (a claim lost, the resend stored anew)."""
    newest = max(offset(c.cursor) for c in copies)
    part = copies[i].cursor.partition("-")[0]
    copies.append(replace(copies[i], id=copies[i].id + "-again", cursor=f"{part}-{newest + 1}"))


Mutation = Callable[[list[Copy], int], None]
# mutation -> the kind the checks must report
EXPECTED: dict[str, tuple[Mutation, str]] = {
    "a duplicated delivery": (duplicate, "duplicated"),
    "a repeat after a reconnect": (duplicate_later, "duplicated"),
    "a swapped pair": (swap, "out_of_order"),
    "a changed body": (change_body, "changed"),
    "a second id": (second_id, "duplicated"),
    "a lost message": (drop, "lost"),
}


def test_the_recorded_run_passes_every_check() -> None:
    run = recorded_run()
    assert run.delivery().ok, run.delivery()
    assert run.storage().ok, run.storage()
    assert run.history().ok, run.history()
    assert check_sends([], [], [], Allow()) == []


def positions(copies: list[Copy], mutation: Mutation) -> range:
    return range(len(copies) - 1) if mutation is swap else range(len(copies))


@pytest.mark.parametrize("name", EXPECTED)
def test_delivery_catches_each_mutation_of_the_frames_a_member_got(name: str) -> None:
    mutation, kind = EXPECTED[name]
    tried = 0
    for member, rooms in recorded_run().frames.items():
        for room, frames in rooms.items():
            for i in positions(frames, mutation):
                run = recorded_run()
                target = run.frames[member][room][i]
                mutation(run.frames[member][room], i)
                report = run.delivery()
                tried += 1
                if mutation is drop and any(u.client_msg_id == target.cmid for u in run.unacked):
                    assert report.ok, f"{name} of a send without an ack (never owed) at {member}/{room}[{i}]"
                else:
                    assert only(report, kind), f"{name} at {member}/{room}[{i}]: {report}"
    assert tried >= 30


def pairs_in_one_store(copies: list[Copy]) -> list[int]:
    """Positions i where i and i + 1 are copies of one store (order is per store)."""
    return [i for i in range(len(copies) - 1) if copies[i].source == copies[i + 1].source]


@pytest.mark.parametrize("name", EXPECTED)
@pytest.mark.parametrize("where", ["storage", "history"])
def test_storage_and_history_catch_each_mutation_of_the_stored_copies(name: str, where: str) -> None:
    mutation, kind = EXPECTED[name]
    tried = 0
    for room, copies in getattr(recorded_run(), "stored" if where == "storage" else "paged").items():
        for i in (pairs_in_one_store(copies) if mutation is swap else positions(copies, mutation)):
            run = recorded_run()
            held = run.stored if where == "storage" else run.paged
            target = held[room][i]
            mutation(held[room], i)
            report = run.storage() if where == "storage" else run.history()
            tried += 1
            in_both = sum(c.id == target.id for c in copies) > 1  # (moved to MySQL, not yet trimmed)
            unacked = any(u.client_msg_id == target.cmid for u in run.unacked)
            if mutation is drop and (in_both or unacked):
                assert report.ok, f"{name} of a copy still held elsewhere, or never owed: {room}[{i}]"
            else:
                assert only(report, kind), f"{name} at {where} {room}[{i}]: {report}"
    assert tried >= 20


def test_a_dropped_ack_is_caught_by_the_send_outcomes_not_by_delivery() -> None:
    """The server delivered and stored a message but its ack never came: the send ends given up.
    Delivery and storage allow that (no ack: it may show up once); the send's outcome does not."""
    for i in range(len(recorded_run().acks)):
        run = recorded_run()
        ack = run.acks.pop(i)
        run.unacked.append(Unacked(ack.room, ack.user, ack.client_msg_id, ack.body, "timeout"))
        assert run.delivery().ok and run.storage().ok and run.history().ok
        mine = [u for u in run.unacked if u.client_msg_id != "user-2-room-0-5"]  # (the record's own is allowed)
        [problem] = check_sends(mine, [], [], Allow())
        assert problem.startswith("1 sends without an ack, 0 allowed")
        assert check_sends(mine, [], [], Allow(unacked=1)) == []


def test_refusals_beyond_the_allowance_or_outside_the_fault_window_fail() -> None:
    window = [(100.0, 110.0)]
    assert check_sends([], [101.0, 124.0], window, Allow(refusals=2)) == []  # (15 s grace after the end)
    assert check_sends([], [101.0, 102.0, 103.0], window, Allow(refusals=2)) == ["3 refusals, 2 allowed"]
    assert check_sends([], [99.0, 126.0], window, Allow(refusals=2)) == ["2 refusals outside the fault's window"]


def test_edited_and_deleted_copies_are_held_to_what_edits_and_deletes_keep() -> None:
    """An edited copy has another body (the final-state oracle judges it) but its send's user, ts,
    cursor and client_msg_id; a tombstone (no body, user or ts) only its position. Anything else
    they change is caught."""
    tombstone = Copy.from_frame({"type": "message", "id": "room-0-id104", "cursor": "0-104", "deleted": True})
    assert tombstone.deleted and tombstone.state is None
    for where in ("frames", "stored", "paged"):
        run = recorded_run()
        held = run.frames["user-0"] if where == "frames" else getattr(run, where)
        i = next(i for i, c in enumerate(held["room-0"]) if c.id == "room-0-id104")
        edited = replace(held["room-0"][i], body="edited", edited=True)
        assert edited.state == ("edited", True)
        for copy, changed in [(edited, False), (replace(tombstone, source=edited.source), False),
                              (replace(edited, user="user-2"), True), (replace(edited, ts=1), True),
                              (replace(tombstone, cursor="0-999", source=edited.source), True)]:
            held["room-0"][i] = copy
            report = run.delivery() if where == "frames" else run.storage() if where == "stored" else run.history()
            # (a moved tombstone is out of order too)
            assert report.changed == 1 if changed else report.ok, f"{copy} in {where}: {report}"
