"""The pin store: per device (full JID), the key that was accepted for it.

Checks are answered from memory and never wait for the disk: the store is
consulted inside the TLS handshake, on the event loop. A background thread
(one per store with a file) does all file I/O: it appends each batch of
changes, coalesced over ``PinStoreConfig.write_delay``, to a journal (one
JSON record per line, fsync'd), compacts the journal by an atomic rewrite
when it has grown well past the live pins, and watches the file so that
changes made by another process (``dtx pin forget``) take effect within
``reload_interval``. A torn last line (a crash in the middle of an append)
is ignored. The store is bounded: ``max_pins_per_account`` devices per
account and ``max_pins`` in all; docs/identity.md gives the policy and why.

The file format is :mod:`dtx.trust.pinfile`, the writer thread
:mod:`dtx.trust.pinjournal`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import weakref
from dataclasses import dataclass

from dtx.errors import JIDError, PinMismatchError, TrustError
from dtx.identity import PUBLIC_KEY_BYTES, fingerprint
from dtx.jid import JID
from dtx.logs import LogLimiter
from dtx.trust.pinfile import Change, bare_of
from dtx.trust.pinjournal import Counters, Journal, Table

__all__ = [
    "PinLimitError",
    "PinStore",
    "PinStoreConfig",
    "PinStoreStatistics",
]

logger = logging.getLogger(__name__)


def _jid(text: str | JID) -> JID:
    """Parse a JID given by a caller; a malformed one is a TrustError too."""
    if isinstance(text, JID):
        return text
    try:
        return JID.parse(text)
    except JIDError as exc:
        raise TrustError(f"cannot check keys for {text!r}: {exc}") from exc


class _Fingerprint:
    """A key's fingerprint, computed only if a log message is written."""

    __slots__ = ("key",)

    def __init__(self, key: bytes) -> None:
        self.key = key

    def __str__(self) -> str:
        return fingerprint(self.key)


class PinLimitError(TrustError):
    """A key needs a new pin and the pin store's bounds leave no room for it
    (``PinStoreConfig.max_pins_per_account`` or ``max_pins``)."""


@dataclass(frozen=True, kw_only=True)
class PinStoreConfig:
    """Bounds and timing of a :class:`PinStore` (seconds)."""

    max_pins_per_account: int = 256
    """Pins per account (bare JID). Past it, a new device of the account is
    accepted without a pin if its key is already pinned for another of its
    devices (no new information), and refused otherwise."""
    max_pins: int = 100_000
    """Pins in all. Past it, a key a source vouches for (a vCard) is
    accepted without a pin, and a key trusted on first use only is refused:
    no pin is ever evicted, so a flood of strangers cannot erase what the
    store remembers about the devices it has met."""
    write_delay: float = 0.1
    """Changes made within this long are written together, in one append
    and one fsync."""
    reload_interval: float = 1.0
    """How often the writer thread looks for changes other processes made
    to the file."""

    def __post_init__(self) -> None:
        if self.max_pins_per_account < 1 or self.max_pins < 1:
            raise TrustError("pin store bounds must be at least 1")
        if not (self.write_delay >= 0 and self.reload_interval > 0):
            raise TrustError("write_delay must be >= 0 and reload_interval > 0")


@dataclass(frozen=True)
class PinStoreStatistics:
    pins: int
    accounts: int
    pending: int
    """Changes made but not yet on disk."""
    writes: int
    """Appends and compactions done."""
    compactions: int
    records_skipped: int
    """Records ignored on reading: torn, malformed, or over the bounds."""
    accepted_unpinned: int
    """Keys accepted without a new pin because a bound was reached."""
    refused: int
    """Keys refused because a bound was reached (:class:`PinLimitError`)."""
    write_errors: int


# -- the store -------------------------------------------------------------------


class PinStore:
    """Keys pinned per device (full JID), kept in memory and in a file.

    ``path=None`` keeps pins in memory only. With a file, every check is
    answered from memory (no file I/O on the caller's thread); changes reach
    the file from a background thread within ``config.write_delay``, and
    :meth:`flush` waits for them. :meth:`close` (or leaving a ``with``
    block, or the store being dropped, or the interpreter exiting) writes
    what is pending. Changes other processes make to the file are picked up
    within ``config.reload_interval``, or at once with :meth:`reload`; a new
    PinStore on a file first flushes this process's other stores of it.

    Opening a file that cannot be read or parsed raises :class:`TrustError`
    rather than starting empty: losing pins silently would turn a key change
    into a first use. A torn or malformed record in a journal, and pins
    beyond the bounds, are skipped with a warning instead: the rest loads.
    """

    def __init__(self, path: str | os.PathLike[str] | None, *,
                 config: PinStoreConfig | None = None) -> None:
        self._path = None if path is None else os.fspath(path)
        self._config = config or PinStoreConfig()
        self._table = Table()
        self._cond = threading.Condition(threading.Lock())
        self._n = Counters()
        self._limiter = LogLimiter(logger)
        self._journal: Journal | None = None
        self._closed = False
        if self._path is not None:
            journal = Journal(self._path, self._table, self._cond, self._config, self._n)
            journal.open()
            self._journal = journal
            self._finalizer = weakref.finalize(self, journal.close)

    @property
    def path(self) -> str | None:
        return self._path

    @property
    def config(self) -> PinStoreConfig:
        return self._config

    def __enter__(self) -> PinStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- reading ----------------------------------------------------------------

    def get(self, full_jid: str | JID) -> bytes | None:
        """The key pinned for this device (exactly this JID), if any."""
        full = _jid(full_jid).full
        with self._cond:
            return self._table.get(full)

    def entries(self) -> dict[str, bytes]:
        """All pins, JID → key, sorted by JID."""
        with self._cond:
            accounts = dict(self._table.accounts)
        return dict(sorted(p for account in accounts.values() for p in account.items()))

    def statistics(self) -> PinStoreStatistics:
        with self._cond:
            return PinStoreStatistics(
                pins=self._table.count,
                accounts=len(self._table.accounts),
                pending=0 if self._journal is None else self._journal.pending,
                **dataclasses.asdict(self._n),
            )

    # -- changing ---------------------------------------------------------------

    def pin(self, full_jid: str | JID, key: bytes) -> None:
        """Pin ``key`` for this device, replacing any earlier pin. Raises
        :class:`PinLimitError` when the bounds leave no room for a new pin."""
        jid = _jid(full_jid)
        key = bytes(key)
        if len(key) != PUBLIC_KEY_BYTES:
            raise TrustError(f"cannot pin a {len(key)}-byte key; keys are {PUBLIC_KEY_BYTES} bytes")
        with self._cond:
            if self._table.get(jid.full) == key:
                return
            why = self._table.refusal(jid.full, self._config)
            if why is not None:
                raise PinLimitError(self._limit_message(why, jid.full, key))
            self._change(Change(jid.full, key))
        logger.info("pinned %s for %s", fingerprint(key), jid)

    def remember(self, full_jid: str | JID, key: bytes, *, first_use: bool) -> bool:
        """Pin a key just accepted for a device that has no pin; what the
        :class:`~dtx.trust.store.Verifier` calls. ``first_use``: the key is
        accepted only because of trust on first use (no source vouches).

        Returns True if the key is pinned, False if it is accepted without a
        new pin because a bound is reached and the pin would add nothing
        (the key is already pinned for another device of the account) or a
        source vouches for it. Raises :class:`PinLimitError` when the key
        must be refused for want of room, :class:`PinMismatchError` if a
        different key was pinned for the device meanwhile.
        """
        jid = _jid(full_jid)
        full, key = jid.full, bytes(key)
        if len(key) != PUBLIC_KEY_BYTES:
            raise TrustError(f"cannot pin a {len(key)}-byte key; keys are {PUBLIC_KEY_BYTES} bytes")
        with self._cond:
            table = self._table
            pinned = table.get(full)
            if pinned is not None:
                if pinned == key:
                    return True
                raise PinMismatchError(full, fingerprint(pinned), fingerprint(key))
            why = table.refusal(full, self._config)
            if why is None:
                self._change(Change(full, key))
                return True
            account = table.accounts.get(bare_of(full), {})
            if key in account.values() or (why == "store" and not first_use):
                self._n.accepted_unpinned += 1
                kept = True
            else:
                self._n.refused += 1
                kept = False
        bare = bare_of(full)
        if kept:
            self._limiter.warning(
                "unpinned", bare, "accepted %s for %s without a pin: %s", _Fingerprint(key), full,
                "the pin store is full" if why == "store" else "its account has all the pins it may")
            return False
        message = self._limit_message(why, full, key)
        self._limiter.warning("refused", bare, "%s", message)
        raise PinLimitError(message)

    def forget(self, jid_text: str | JID) -> int:
        """Remove pins: a full JID forgets that device, a bare JID forgets
        every device of the account. Returns how many were removed."""
        jid = _jid(jid_text)
        with self._cond:
            if self._journal is not None:
                self._journal.ensure_open()
            op = Change(jid.full, None)
            removed = self._table.apply(op)
            if removed and self._journal is not None:
                self._journal.submit(op)
        if removed:
            logger.info("forgot %d pin(s) for %s", removed, jid)
        return removed

    def _change(self, op: Change) -> None:
        """Apply and queue for the file (the caller holds the lock)."""
        if self._journal is not None:
            self._journal.submit(op)  # raises if closed, before any change
        self._table.apply(op)

    def _limit_message(self, why: str, full: str, key: bytes) -> str:
        config = self._config
        if why == "account":
            bare = bare_of(full)
            return (
                f"cannot pin {fingerprint(key)} for {full}: {bare} already has "
                f"{config.max_pins_per_account} pinned devices (the limit) and this key is "
                f"not one of theirs; forget old pins (dtx pin forget JID) to make room")
        return (
            f"cannot pin {fingerprint(key)} for {full}: the pin store holds "
            f"{config.max_pins} pins (the limit), and a key trusted on first use only "
            f"is refused rather than accepted unremembered; forget pins "
            f"(dtx pin forget JID) to make room")

    # -- the file ------------------------------------------------------------------

    def flush(self) -> None:
        """Wait until every change made so far is on disk (and changes other
        processes made are taken in). Raises :class:`TrustError` if the
        file cannot be written. Does file I/O (on the writer thread) and
        waits for it: not for the event loop."""
        if self._journal is not None:
            self._journal.flush()

    def reload(self) -> None:
        """Take in, now, what other processes wrote to the file (and write
        this store's pending changes): :meth:`flush` by another name."""
        self.flush()

    def close(self) -> None:
        """Write pending changes and stop the writer thread. Later changes
        raise :class:`TrustError`; reading still works."""
        if self._journal is not None and not self._closed:
            self._closed = True
            self._finalizer()
