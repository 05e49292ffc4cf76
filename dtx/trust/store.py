"""Which keys may speak for a JID: key sources and the verifier.

Sources say which keys an account's devices have (a folder of vCards, a
static mapping, and elsewhere a vCard fetched over XMPP). The pin store
(:mod:`dtx.trust.pins`) remembers, per device (full JID), the key seen last
time. :class:`Verifier` combines them; docs/identity.md states the rules and
why.
"""

from __future__ import annotations

import hmac
import logging
import os
import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol, runtime_checkable

from dtx.errors import (
    PinMismatchError,
    TrustError,
    UnknownPeerError,
    UntrustedKeyError,
    VCardError,
)
from dtx.identity import PUBLIC_KEY_BYTES, fingerprint
from dtx.jid import JID
from dtx.trust.pinfile import bare_of
from dtx.trust.pins import PinLimitError, PinStore, PinStoreConfig, _jid
from dtx.trust.vcard import MAX_VCARD_BYTES, extract_keys

__all__ = [
    "KeySource",
    "PinLimitError",
    "PinStore",
    "PinStoreConfig",
    "StaticKeys",
    "VCardDirectory",
    "Verifier",
]

logger = logging.getLogger(__name__)


@runtime_checkable
class KeySource(Protocol):
    """Something that knows which keys belong to an account's devices."""

    def keys_for(self, bare_jid: str) -> frozenset[bytes] | None:
        """The raw 32-byte keys of the account's devices; None when this
        source knows nothing about the account (as opposed to an empty
        set: the account is known and has no device keys)."""
        ...


class StaticKeys:
    """A fixed mapping from bare JID to keys, for tests and the API."""

    def __init__(self, mapping: Mapping[str, Iterable[bytes]]) -> None:
        table: dict[str, frozenset[bytes]] = {}
        for jid_text, keys in mapping.items():
            bare = _jid(jid_text).bare.full
            keyset = frozenset(bytes(k) for k in keys)
            for k in keyset:
                if len(k) != PUBLIC_KEY_BYTES:
                    raise TrustError(
                        f"key for {bare} is {len(k)} bytes, not {PUBLIC_KEY_BYTES}"
                    )
            table[bare] = table.get(bare, frozenset()) | keyset
        self._table = table

    def keys_for(self, bare_jid: str) -> frozenset[bytes] | None:
        keys = self._table.get(bare_jid)  # the Verifier passes normalised JIDs
        if keys is None:
            keys = self._table.get(_jid(bare_jid).bare.full)
        return keys


_STAMP = struct.Struct("<QQqq")


def _stamp(st: os.stat_result) -> bytes:
    """A file's identity and version: device, inode, mtime (ns) and size."""
    return _STAMP.pack(st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


class VCardDirectory:
    """A folder of vCards, one file per account named ``<bare JID>.xml``
    (lower case, as :class:`~dtx.jid.JID` normalises it).

    A missing file means the folder knows nothing about the account. A file
    is re-read when its inode, mtime or size changes. A file that cannot be
    read or parsed raises :class:`TrustError` (fail closed): a broken vCard
    must not quietly turn into "unknown", which trust on first use would
    accept.

    What was read is cached per account as one bytes value, the file's
    stamp and then its keys (each :data:`PUBLIC_KEY_BYTES`), keyed by the
    bare JID as a string: a rendezvous server with a folder of 10,000
    accounts holds one entry for each (about 220 bytes; a frozenset of the
    keys and a JID object took about as much each).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._path = os.fspath(path)
        self._cache: dict[str, bytes] = {}

    @property
    def path(self) -> str:
        return self._path

    def file_for(self, bare_jid: str) -> str:
        """The file that holds this account's vCard."""
        return os.path.join(self._path, _jid(bare_jid).bare.full + ".xml")

    def keys_for(self, bare_jid: str) -> frozenset[bytes] | None:
        bare = _jid(bare_jid).bare.full
        name = os.path.join(self._path, bare + ".xml")
        try:
            st = os.stat(name)
        except FileNotFoundError:
            self._cache.pop(bare, None)
            return None
        except OSError as exc:
            raise TrustError(f"cannot read vCard {name}: {exc.strerror}") from exc
        cached = self._cache.get(bare)
        if cached is not None and cached[: _STAMP.size] == _stamp(st):
            return frozenset(cached[i : i + PUBLIC_KEY_BYTES]
                             for i in range(_STAMP.size, len(cached), PUBLIC_KEY_BYTES))
        try:
            with open(name, "rb") as f:
                st = os.fstat(f.fileno())
                data = f.read(MAX_VCARD_BYTES + 1)
        except FileNotFoundError:
            self._cache.pop(bare, None)
            return None
        except OSError as exc:
            raise TrustError(f"cannot read vCard {name}: {exc.strerror}") from exc
        try:
            found = extract_keys(data)  # each PUBLIC_KEY_BYTES long
        except VCardError as exc:
            logger.warning("refusing vCard %s: %s", name, exc)
            raise TrustError(f"vCard {name} is unusable: {exc}") from exc
        keys = frozenset(found)
        self._cache[bare] = _stamp(st) + b"".join(found)
        logger.debug("read %d key(s) for %s from %s", len(keys), bare, name)
        return keys


class Verifier:
    """Decides whether a key may speak for a JID; see :meth:`verify`."""

    def __init__(
        self,
        sources: Sequence[KeySource],
        pins: PinStore,
        *,
        trust_on_first_use: bool = False,
    ) -> None:
        self._sources = tuple(sources)
        self._pins = pins
        self._tofu = trust_on_first_use

    @property
    def pins(self) -> PinStore:
        return self._pins

    def trusted_keys(self, jid: str | JID) -> frozenset[bytes] | None:
        """Union of the sources' keys for the account; None if no source
        knows it. Source errors (an unreadable vCard) propagate."""
        bare = bare_of(_jid(jid).full)
        known: frozenset[bytes] | None = None
        for source in self._sources:
            keys = source.keys_for(bare)
            if keys is not None:
                known = keys if known is None else known | keys
        return known

    def verify(self, jid: str, key: bytes) -> None:
        """Accept ``key`` for ``jid`` (the full JID the peer authenticated
        as, possibly bare) or raise a :class:`TrustError`:

        1. If a pin exists for that JID, the key must equal it, else
           :class:`PinMismatchError` (even if a source now lists the new
           key; the way out is ``dtx pin forget JID``).
        2. If some source knows the account, the key must be among the
           union of their keys, else :class:`UntrustedKeyError`. This holds
           for pinned keys too: removing a key from the vCard revokes it.
        3. If no source knows the account: accepted only with
           ``trust_on_first_use`` (and no pin), else
           :class:`UnknownPeerError`.

        An accepted key without a pin is pinned for the JID, in memory at
        once and on disk within the store's write delay; past the store's
        bounds it is accepted without a pin or refused with
        :class:`~dtx.trust.pins.PinLimitError` (:meth:`PinStore.remember`).
        No file I/O happens here: this runs inside the TLS handshake.
        """
        device = _jid(jid)
        presented = bytes(key)
        pinned = self._pins.get(device)
        if pinned is not None and not hmac.compare_digest(pinned, presented):
            raise PinMismatchError(device.full, fingerprint(pinned), fingerprint(presented))
        trusted = self.trusted_keys(device)
        if trusted is not None:
            if len(presented) != PUBLIC_KEY_BYTES or presented not in trusted:
                raise UntrustedKeyError(
                    device.full,
                    fingerprint(presented),
                    sorted(fingerprint(k) for k in trusted),
                )
            how = "listed by a key source"
        elif pinned is not None:
            how = "pinned"
        elif self._tofu:
            if len(presented) != PUBLIC_KEY_BYTES:
                raise UntrustedKeyError(device.full, fingerprint(presented), [])
            how = "trusted on first use"
        else:
            raise UnknownPeerError(
                f"no trusted key is known for {device.full} (key {fingerprint(presented)}): "
                f"add the account's vCard to the vCard folder, or pin the key"
            )
        if pinned is None and not self._pins.remember(
                device, presented, first_use=trusted is None):
            how += "; not pinned, a pin store bound is reached"
        if logger.isEnabledFor(logging.INFO):
            logger.info("accepted %s for %s (%s)", fingerprint(presented), device, how)
