"""Partition bookkeeping: for each partition this persister owns, the applied mark it believes
Redis holds. Redis's mark is the truth; whenever the stored mark is not the expected one (Redis lost
data, or another persister moved it) the partition is read again from mark + 1 (a rewind)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator


class Partitions:
    def __init__(self) -> None:
        self.marks: dict[int, int | None] = {}  # owned partition -> expected applied mark (None: none yet)

    def __contains__(self, partition: object) -> bool:
        return partition in self.marks

    def __iter__(self) -> Iterator[int]:
        return iter(list(self.marks))

    def __len__(self) -> int:
        return len(self.marks)

    def take(self, partition: int, mark: int | None) -> None:
        self.marks[partition] = mark

    def drop(self, partitions: Iterable[int]) -> None:
        for p in partitions:
            self.marks.pop(p, None)

    def expected(self, partition: int) -> int | None:
        return self.marks.get(partition)

    def moved(self, partition: int, stored: int | None) -> bool:
        """The stored mark of an owned partition is not the one expected: rewind to it."""
        return partition in self.marks and self.marks[partition] != stored

    def applied(self, partition: int, mark: int | None) -> bool:
        """Note a batch's new mark; False when the partition was revoked meanwhile (nothing to note)."""
        if partition not in self.marks:
            return False
        self.marks[partition] = mark
        return True

    def skipped(self, partition: int, first_offset: int) -> int:
        """Records between the mark and a fetch's first offset: offsets of our topic are dense, so
        only retention (the persister behind for longer than the topic keeps records) skips some."""
        mark = self.marks.get(partition)
        return 0 if mark is None else max(0, first_offset - mark - 1)

    def lag(self, partition: int, high_water: int) -> int:
        mark = self.marks.get(partition)
        return max(0, high_water - (-1 if mark is None else mark) - 1)


def resume_offset(mark: int | None) -> int | None:
    """Where to read a partition from: just after its applied mark, or from the log's start (None)."""
    return None if mark is None else mark + 1
