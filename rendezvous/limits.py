"""Token buckets, and bounded tables of them keyed by source.

A :class:`TokenBucket` holds only its tokens and the time it last
refilled; the rate and burst are arguments of :meth:`TokenBucket.take`, so
a registration carrying two buckets stays small. A :class:`BucketTable`
keeps one bucket per key (a source IP, a source address) for as long as
the key is among the ``max_entries`` most recently seen: a flood from many
sources costs bounded memory, and a forgotten source starts again with a
full bucket — no worse than a new one.

A bucket that has refilled to its burst is exactly what a new one would
be, so the table also forgets those (:meth:`BucketTable.forget_full`, and
whenever a new key comes in): a source that sent its HELLO and REGISTER
and is now registered (its messages charged to its registration) holds no
entry here a few seconds later. The least recently seen entries are
looked at first, so this costs O(1) amortised.

Sans-IO: time is an argument.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

__all__ = ["BucketTable", "TokenBucket"]


class TokenBucket:
    """A token bucket; starts full."""

    __slots__ = ("tokens", "stamp")

    def __init__(self, burst: float, now: float) -> None:
        self.tokens = burst
        self.stamp = now

    def full(self, now: float, rate: float, burst: float) -> bool:
        """Whether the bucket has refilled to ``burst`` at ``now`` (the very
        sum :meth:`take` would compute)."""
        return self.tokens + (now - self.stamp) * rate >= burst

    def take(self, amount: float, now: float, rate: float, burst: float) -> bool:
        """Refill at ``rate`` up to ``burst``, then take ``amount`` if there."""
        if now > self.stamp:
            self.tokens = min(burst, self.tokens + (now - self.stamp) * rate)
            self.stamp = now
        if self.tokens < amount:
            return False
        self.tokens -= amount
        return True


class BucketTable:
    """One :class:`TokenBucket` per key, least recently seen forgotten first."""

    def __init__(self, *, rate: float, burst: float, max_entries: int) -> None:
        self._rate = rate
        self._burst = burst
        self._max_entries = max_entries
        self._buckets: OrderedDict[Hashable, TokenBucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: Hashable, now: float, amount: float = 1.0) -> bool:
        """Charge ``amount`` to ``key``'s bucket; False when it has too little."""
        bucket = self._buckets.get(key)
        if bucket is None:
            self.forget_full(now)
            bucket = TokenBucket(self._burst, now)
            self._buckets[key] = bucket
            while len(self._buckets) > self._max_entries:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        return bucket.take(amount, now, self._rate, self._burst)

    def forget_full(self, now: float) -> None:
        """Drop the least recently seen buckets that are full again (each
        indistinguishable from the new bucket its key would get), up to
        the first one that is not."""
        buckets = self._buckets
        while buckets:
            bucket = next(iter(buckets.values()))
            if not bucket.full(now, self._rate, self._burst):
                return
            buckets.popitem(last=False)
