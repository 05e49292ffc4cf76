"""Which keys may speak for a JID: key sources, the pin store, the verifier.

Sources say which keys an account's devices have (a folder of vCards, a
static mapping, and elsewhere a vCard fetched over XMPP). The pin store
remembers, per device (full JID), the key seen last time. :class:`Verifier`
combines them; docs/identity.md states the rules and why.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import os
import stat
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from dtx.errors import (
    JIDError,
    PinMismatchError,
    TrustError,
    UnknownPeerError,
    UntrustedKeyError,
    VCardError,
)
from dtx.identity import PUBLIC_KEY_BYTES, fingerprint
from dtx.jid import JID
from dtx.trust.vcard import MAX_VCARD_BYTES, extract_keys

__all__ = [
    "KeySource",
    "PinStore",
    "StaticKeys",
    "VCardDirectory",
    "Verifier",
]

logger = logging.getLogger(__name__)

_PIN_FILE_VERSION = 1
MAX_PIN_FILE_BYTES = 16 * 1024 * 1024


def _jid(text: str | JID) -> JID:
    """Parse a JID given by a caller; a malformed one is a TrustError too."""
    if isinstance(text, JID):
        return text
    try:
        return JID.parse(text)
    except JIDError as exc:
        raise TrustError(f"cannot check keys for {text!r}: {exc}") from exc


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
        table: dict[JID, frozenset[bytes]] = {}
        for jid_text, keys in mapping.items():
            bare = _jid(jid_text).bare
            keyset = frozenset(bytes(k) for k in keys)
            for k in keyset:
                if len(k) != PUBLIC_KEY_BYTES:
                    raise TrustError(
                        f"key for {bare} is {len(k)} bytes, not {PUBLIC_KEY_BYTES}"
                    )
            table[bare] = table.get(bare, frozenset()) | keyset
        self._table = table

    def keys_for(self, bare_jid: str) -> frozenset[bytes] | None:
        return self._table.get(_jid(bare_jid).bare)


@dataclass(frozen=True)
class _Cached:
    stamp: tuple[int, int, int, int]
    keys: frozenset[bytes]


def _stamp(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


class VCardDirectory:
    """A folder of vCards, one file per account named ``<bare JID>.xml``
    (lower case, as :class:`~dtx.jid.JID` normalises it).

    A missing file means the folder knows nothing about the account. A file
    is re-read when its inode, mtime or size changes. A file that cannot be
    read or parsed raises :class:`TrustError` (fail closed): a broken vCard
    must not quietly turn into "unknown", which trust on first use would
    accept.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._path = os.fspath(path)
        self._cache: dict[JID, _Cached] = {}

    @property
    def path(self) -> str:
        return self._path

    def file_for(self, bare_jid: str) -> str:
        """The file that holds this account's vCard."""
        return os.path.join(self._path, _jid(bare_jid).bare.full + ".xml")

    def keys_for(self, bare_jid: str) -> frozenset[bytes] | None:
        bare = _jid(bare_jid).bare
        name = os.path.join(self._path, bare.full + ".xml")
        try:
            st = os.stat(name)
        except FileNotFoundError:
            self._cache.pop(bare, None)
            return None
        except OSError as exc:
            raise TrustError(f"cannot read vCard {name}: {exc.strerror}") from exc
        cached = self._cache.get(bare)
        if cached is not None and cached.stamp == _stamp(st):
            return cached.keys
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
            keys = frozenset(extract_keys(data))
        except VCardError as exc:
            logger.warning("refusing vCard %s: %s", name, exc)
            raise TrustError(f"vCard {name} is unusable: {exc}") from exc
        self._cache[bare] = _Cached(_stamp(st), keys)
        logger.debug("read %d key(s) for %s from %s", len(keys), bare, name)
        return keys


class PinStore:
    """Keys pinned per device (full JID), persisted as JSON.

    ``path=None`` keeps pins in memory. The file is written atomically
    (temporary file in the same folder, then ``os.replace``) with mode
    0600, and re-read when it changes on disk, so ``dtx pin forget`` run
    beside a live process takes effect. A file that cannot be parsed raises
    :class:`TrustError` rather than being treated as empty: losing pins
    silently would turn a key change into a first use.
    """

    def __init__(self, path: str | os.PathLike[str] | None) -> None:
        self._path = None if path is None else os.fspath(path)
        self._pins: dict[str, bytes] = {}
        self._stamp: tuple[int, int, int, int] | None = None
        self._refresh()

    @property
    def path(self) -> str | None:
        return self._path

    # -- reading ------------------------------------------------------------

    def _refresh(self) -> None:
        if self._path is None:
            return
        try:
            st = os.stat(self._path)
        except FileNotFoundError:
            if self._stamp is not None:
                self._pins = {}
                self._stamp = None
            return
        except OSError as exc:
            raise TrustError(f"cannot read pin store {self._path}: {exc.strerror}") from exc
        if _stamp(st) == self._stamp:
            return
        try:
            with open(self._path, "rb") as f:
                st = os.fstat(f.fileno())
                data = f.read(MAX_PIN_FILE_BYTES + 1)
        except OSError as exc:
            raise TrustError(f"cannot read pin store {self._path}: {exc.strerror}") from exc
        self._pins = self._decode(data)
        self._stamp = _stamp(st)

    def _decode(self, data: bytes) -> dict[str, bytes]:
        where = f"pin store {self._path}"
        if len(data) > MAX_PIN_FILE_BYTES:
            raise TrustError(f"{where} is larger than {MAX_PIN_FILE_BYTES} bytes")
        try:
            doc = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise TrustError(f"{where} is not valid JSON: {exc}") from exc
        if not isinstance(doc, dict) or doc.get("version") != _PIN_FILE_VERSION:
            raise TrustError(f"{where}: expected an object with \"version\": {_PIN_FILE_VERSION}")
        pins_doc = doc.get("pins")
        if not isinstance(pins_doc, dict):
            raise TrustError(f"{where}: \"pins\" is not an object")
        pins: dict[str, bytes] = {}
        for jid_text, entry in pins_doc.items():
            key_text = entry.get("key") if isinstance(entry, dict) else None
            if not isinstance(key_text, str):
                raise TrustError(f"{where}: entry for {jid_text!r} has no \"key\" string")
            try:
                jid = JID.parse(jid_text)
                key = base64.b64decode(key_text, validate=True)
            except (JIDError, binascii.Error, ValueError) as exc:
                raise TrustError(f"{where}: bad entry for {jid_text!r}: {exc}") from exc
            if len(key) != PUBLIC_KEY_BYTES:
                raise TrustError(f"{where}: key for {jid_text!r} is not {PUBLIC_KEY_BYTES} bytes")
            pins[jid.full] = key
        return pins

    def get(self, full_jid: str) -> bytes | None:
        """The key pinned for this device (exactly this JID), if any."""
        self._refresh()
        return self._pins.get(_jid(full_jid).full)

    def entries(self) -> dict[str, bytes]:
        """All pins, JID → key, sorted by JID."""
        self._refresh()
        return dict(sorted(self._pins.items()))

    # -- writing ------------------------------------------------------------

    def pin(self, full_jid: str, key: bytes) -> None:
        """Pin ``key`` for this device, replacing any earlier pin."""
        jid = _jid(full_jid)
        if len(key) != PUBLIC_KEY_BYTES:
            raise TrustError(f"cannot pin a {len(key)}-byte key; keys are {PUBLIC_KEY_BYTES} bytes")
        self._refresh()
        self._pins[jid.full] = bytes(key)
        self._persist()
        logger.info("pinned %s for %s", fingerprint(key), jid)

    def forget(self, jid_text: str) -> int:
        """Remove pins: a full JID forgets that device, a bare JID forgets
        every device of the account. Returns how many were removed."""
        jid = _jid(jid_text)
        self._refresh()
        if jid.is_bare:
            doomed = [j for j in self._pins if JID.parse(j).bare == jid]
        else:
            doomed = [jid.full] if jid.full in self._pins else []
        for j in doomed:
            del self._pins[j]
        if doomed:
            self._persist()
            logger.info("forgot %d pin(s) for %s", len(doomed), jid)
        return len(doomed)

    def _persist(self) -> None:
        if self._path is None:
            return
        doc = {
            "version": _PIN_FILE_VERSION,
            "pins": {
                j: {"key": base64.b64encode(k).decode("ascii"), "fingerprint": fingerprint(k)}
                for j, k in sorted(self._pins.items())
            },
        }
        data = (json.dumps(doc, indent=2) + "\n").encode("utf-8")
        directory = os.path.dirname(os.path.abspath(self._path))
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            fd, tmp = tempfile.mkstemp(
                dir=directory, prefix=f".{os.path.basename(self._path)}.", suffix=".tmp"
            )
        except OSError as exc:
            raise TrustError(f"cannot write pin store {self._path}: {exc.strerror}") from exc
        try:
            with os.fdopen(fd, "wb") as f:
                if os.name == "posix":
                    os.fchmod(f.fileno(), stat.S_IRUSR | stat.S_IWUSR)
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._path)
            self._stamp = _stamp(os.stat(self._path))
        except OSError as exc:
            _unlink_quietly(tmp)
            raise TrustError(f"cannot write pin store {self._path}: {exc.strerror}") from exc
        except BaseException:
            _unlink_quietly(tmp)
            raise


def _unlink_quietly(name: str) -> None:
    try:
        os.unlink(name)
    except OSError:
        pass


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

    def trusted_keys(self, jid: str) -> frozenset[bytes] | None:
        """Union of the sources' keys for the account; None if no source
        knows it. Source errors (an unreadable vCard) propagate."""
        bare = _jid(jid).bare.full
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

        An accepted key is pinned for the JID (and persisted).
        """
        device = _jid(jid)
        presented = bytes(key)
        pinned = self._pins.get(device.full)
        if pinned is not None and not hmac.compare_digest(pinned, presented):
            raise PinMismatchError(device.full, fingerprint(pinned), fingerprint(presented))
        trusted = self.trusted_keys(device.full)
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
        if pinned is None:
            self._pins.pin(device.full, presented)
        logger.info("accepted %s for %s (%s)", fingerprint(presented), device, how)
