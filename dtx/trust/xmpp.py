"""A key source fed by vCards fetched over XMPP, cached with a TTL.

:class:`~dtx.trust.store.KeySource` is synchronous (the session handshake
asks it inline), while fetching a vCard is a network round trip. So the
source answers :meth:`XmppKeySource.keys_for` from a cache, and the cache
is filled asynchronously:

- :meth:`XmppKeySource.refresh` (one account) and
  :meth:`XmppKeySource.prefetch` (several) fetch now and store the result;
- once :meth:`XmppKeySource.start` ran, a background task refetches every
  cached account a little before its entry expires (``refresh_ahead`` of
  the TTL), retries failed fetches every ``retry_interval``, fetches in the
  background any account ``keys_for`` was asked about and did not know,
  and drops accounts nobody asked about for ``forget_after``.

``keys_for`` answers None (unknown) for an account never fetched, one
whose vCard does not exist, and one whose entry is older than the TTL: a
failed refresh does not extend the old answer. So a key removed from the
vCard stops being trusted within one TTL: either a refresh saw the vCard
without it, or the entry expired. Note what "unknown" means to
:class:`~dtx.trust.store.Verifier`: the pin store (and trust on first use,
if enabled) decides. Where that is not wanted, prefetch the accounts and
leave trust on first use off.

What a vCard proves: that whoever controls the account on its XMPP server
(the user, or the server's operator) lists the key. See docs/xmpp.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from dtx.errors import DtxError, JIDError, TrustError
from dtx.jid import JID

__all__ = ["KeyFetcher", "XmppKeySource", "XmppKeySourceConfig"]

logger = logging.getLogger(__name__)


class KeyFetcher(Protocol):
    """Fetches an account's keys now; :class:`dtx.xmpp.client.XmppClient`
    is one."""

    async def fetch_keys(self, bare_jid: str) -> frozenset[bytes] | None: ...


@dataclass(frozen=True, kw_only=True)
class XmppKeySourceConfig:
    """Tunables, in seconds (``refresh_ahead`` is a fraction of ``ttl``)."""

    ttl: float = 300.0
    refresh_ahead: float = 0.2
    retry_interval: float = 15.0
    fetch_timeout: float = 15.0
    forget_after: float = 3600.0
    max_accounts: int = 10_000

    def __post_init__(self) -> None:
        if self.ttl <= 0 or not 0 <= self.refresh_ahead < 1:
            raise DtxError("ttl must be positive and refresh_ahead in [0, 1)")
        if self.retry_interval <= 0 or self.fetch_timeout <= 0 or self.max_accounts < 1:
            raise DtxError("retry_interval, fetch_timeout and max_accounts must be positive")


@dataclass(frozen=True)
class _Entry:
    keys: frozenset[bytes] | None
    fetched_at: float | None  # None: never fetched successfully
    failed_at: float | None
    used_at: float


def _bare(jid: str | JID) -> str:
    try:
        parsed = jid if isinstance(jid, JID) else JID.parse(jid)
    except JIDError as exc:
        raise TrustError(f"cannot look up keys for {jid!r}: {exc}") from exc
    return parsed.bare.full


class XmppKeySource:
    """Keys from XMPP vCards, cached; see the module docs for the model.

    ``clock`` gives the time in seconds (default :func:`time.monotonic`);
    tests pass their own to step past the TTL.
    """

    def __init__(
        self,
        fetcher: KeyFetcher,
        *,
        config: XmppKeySourceConfig | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._fetcher = fetcher
        self._config = config or XmppKeySourceConfig()
        self._clock = clock or time.monotonic
        self._entries: dict[str, _Entry] = {}
        self._wanted: set[str] = set()
        self._inflight: dict[str, asyncio.Task[frozenset[bytes] | None]] = {}
        self._updated: dict[str, asyncio.Event] = {}
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def config(self) -> XmppKeySourceConfig:
        return self._config

    # -- the synchronous KeySource side ---------------------------------------

    def keys_for(self, bare_jid: str) -> frozenset[bytes] | None:
        bare = _bare(bare_jid)
        now = self._clock()
        entry = self._entries.get(bare)
        if entry is None:
            if self._task is not None and len(self._wanted) < self._config.max_accounts:
                self._wanted.add(bare)
                self._wake()
            return None
        self._entries[bare] = _Entry(entry.keys, entry.fetched_at, entry.failed_at, now)
        if entry.fetched_at is None or now - entry.fetched_at >= self._config.ttl:
            return None
        return entry.keys

    def cached(self) -> dict[str, frozenset[bytes] | None]:
        """What :meth:`keys_for` would answer for each cached account."""
        return {bare: self.keys_for(bare) for bare in sorted(self._entries)}

    # -- fetching ---------------------------------------------------------------

    async def refresh(self, bare_jid: str | JID) -> frozenset[bytes] | None:
        """Fetch the account's keys now and cache them; returns them.
        A failed fetch raises (:class:`~dtx.errors.DtxError`, or
        :class:`TimeoutError` past ``fetch_timeout``) and leaves the old
        entry to expire. Concurrent refreshes of one account share a fetch."""
        bare = _bare(bare_jid)
        task = self._inflight.get(bare)
        if task is None:
            task = asyncio.ensure_future(self._fetch(bare))
            self._inflight[bare] = task
            task.add_done_callback(lambda _t: self._inflight.pop(bare, None))
        return await asyncio.shield(task)

    async def _fetch(self, bare: str) -> frozenset[bytes] | None:
        try:
            keys = await asyncio.wait_for(
                self._fetcher.fetch_keys(bare), self._config.fetch_timeout
            )
        except BaseException:
            now = self._clock()
            old = self._entries.get(bare)
            self._store(bare, _Entry(
                old.keys if old else None, old.fetched_at if old else None, now,
                old.used_at if old else now,
            ))
            raise
        now = self._clock()
        old = self._entries.get(bare)
        self._store(bare, _Entry(keys, now, None, old.used_at if old else now))
        self._wanted.discard(bare)
        if old is None or old.keys != keys:
            logger.info("vCard of %s lists %s", bare,
                        "no vCard" if keys is None else f"{len(keys)} device key(s)")
        event = self._updated.pop(bare, None)
        if event is not None:
            event.set()
        return keys

    def _store(self, bare: str, entry: _Entry) -> None:
        if bare not in self._entries and len(self._entries) >= self._config.max_accounts:
            oldest = min(self._entries, key=lambda b: self._entries[b].used_at)
            del self._entries[oldest]
        self._entries[bare] = entry
        self._wake()

    async def prefetch(self, jids: Iterable[str | JID]) -> dict[str, frozenset[bytes] | None]:
        """Refresh several accounts at once; failures are logged, not
        raised. Returns what each fetch gave (failed ones are left out)."""
        bares = sorted({_bare(j) for j in jids})
        results = await asyncio.gather(*(self.refresh(b) for b in bares), return_exceptions=True)
        out: dict[str, frozenset[bytes] | None] = {}
        for bare, result in zip(bares, results):
            if isinstance(result, BaseException):
                logger.warning("cannot fetch the vCard of %s: %s", bare, result or "timed out")
            else:
                out[bare] = result
        return out

    async def wait_updated(self, bare_jid: str | JID, *, timeout: float) -> frozenset[bytes] | None:
        """Wait for the next successful fetch of the account (by anyone);
        returns its keys. Raises :class:`TimeoutError` after ``timeout``."""
        bare = _bare(bare_jid)
        event = self._updated.setdefault(bare, asyncio.Event())
        await asyncio.wait_for(event.wait(), timeout)
        entry = self._entries.get(bare)
        return None if entry is None else entry.keys

    # -- the background refresher ------------------------------------------------

    def start(self) -> None:
        """Start refreshing in the background (in the running loop)."""
        if self._task is None:
            self._wakeup = asyncio.Event()
            self._task = asyncio.create_task(self._refresher(), name="dtx-xmpp-key-refresh")

    async def close(self) -> None:
        """Stop the background refresher and any fetch in flight."""
        tasks = [t for t in (self._task, *self._inflight.values()) if t is not None]
        self._task = None
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    def _due(self, now: float) -> tuple[list[str], float]:
        """Accounts to fetch now, and the seconds until the next is due."""
        cfg = self._config
        due: list[str] = sorted(self._wanted - set(self._entries))
        next_in = cfg.ttl
        for bare, entry in list(self._entries.items()):
            if now - entry.used_at > cfg.forget_after:
                del self._entries[bare]
                continue
            if entry.failed_at is not None and (
                entry.fetched_at is None or entry.failed_at > entry.fetched_at
            ):
                at = entry.failed_at + cfg.retry_interval
            elif entry.fetched_at is not None:
                at = entry.fetched_at + cfg.ttl * (1 - cfg.refresh_ahead)
            else:
                at = now
            if at <= now:
                due.append(bare)
            else:
                next_in = min(next_in, at - now)
        return due, next_in

    async def _refresher(self) -> None:
        wakeup = self._wakeup
        if wakeup is None:
            return
        while True:
            wakeup.clear()
            due, next_in = self._due(self._clock())
            if due:
                await self.prefetch(due)
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wakeup.wait(), max(next_in, 0.01))
