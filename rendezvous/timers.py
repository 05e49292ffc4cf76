"""The core's one timer: a heap of (deadline, what) entries.

Entries are never removed when what they name goes away (a registration
that unregisters, an introduction that is accepted); the core ignores
them when they come due, and :meth:`TimerHeap.compact` drops them in bulk
when they outnumber the live objects, so the heap stays proportional to
the tables.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from enum import IntEnum

__all__ = ["TimerHeap", "TimerKind"]

TimerKey = bytes | int


class TimerKind(IntEnum):
    REGISTRATION = 0
    """Key: a registration id; its expiry."""
    INTRODUCTION = 1
    """Key: an introduction id; a retransmission, held frames, its timeout."""
    VERIFICATION = 2
    """Key: a verification token; the key lookup's timeout."""


class TimerHeap:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, TimerKind, TimerKey]] = []
        self._seq = 0

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, deadline: float, kind: TimerKind, key: TimerKey) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (deadline, self._seq, kind, key))

    def next_deadline(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: float) -> tuple[TimerKind, TimerKey] | None:
        """The earliest entry due at ``now``, removed; None when none is."""
        if not self._heap or self._heap[0][0] > now:
            return None
        _, _, kind, key = heapq.heappop(self._heap)
        return kind, key

    def compact(self, alive: Callable[[TimerKind, TimerKey], bool]) -> None:
        """Drop the entries whose object is gone."""
        kept = [entry for entry in self._heap if alive(entry[2], entry[3])]
        heapq.heapify(kept)
        self._heap = kept
