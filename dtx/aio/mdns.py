"""LAN discovery over mDNS / DNS-SD (RFC 6762, RFC 6763) with python-zeroconf.

A device announces itself as a ``_dtx._udp.local.`` service: the SRV record
carries the UDP port of its dtx socket, A records its IPv4 addresses, and the
TXT record (see :func:`txt_for`) its JID, key fingerprint and protocol
version. With a running XEP-0174 listener (:mod:`dtx.aio.linklocal`) it
also announces ``_presence._tcp.local.`` (:class:`PresenceAnnouncement`:
the listener's TCP port, ``txtvers=1`` first, status and XEP-0115 caps), so
that the XMPP clients people have on the LAN (Pidgin's Bonjour) list it and
can talk to it.

Discovery is not trust: anybody on the LAN can announce any JID with any
fingerprint. A :class:`LanRecord` only says where to knock; the session
handshake checks the key as on every other path, and :func:`select_records`
merely puts the records whose fingerprint is trusted first so that the
genuine device is tried before an impostor.

The pure parts (TXT codec, instance naming, record parsing and selection)
open no sockets; :class:`LanAdvertiser` and :class:`LanBrowser` are thin
asyncio drivers around zeroconf's ``AsyncZeroconf``, IPv4 only.

``python -m dtx.aio.mdns advertise|resolve|browse|lookup`` is a small command line
for people and for the namespace tests (one JSON object per line on stdout;
:mod:`dtx.aio.mdns_cli`).
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import logging
import re
import sys
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Generic, Protocol, Self, TypeAlias, TypeVar

from zeroconf import (
    BadTypeInNameException,
    InterfaceChoice,
    IPVersion,
    NonUniqueNameException,
    ServiceStateChange,
    Zeroconf,
)
from zeroconf import DNSOutgoing  # type: ignore[attr-defined]  # public, not in __all__
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from dtx.errors import (
    DecodeError,
    DiscoveryError,
    FingerprintError,
    JIDError,
)
from dtx.identity import FINGERPRINT_PREFIX, parse_fingerprint
from dtx.jid import JID, jid_matches
from dtx.aio.netif import local_ipv4_addresses
from dtx.proto.caps import Caps

__all__ = [
    "DEFAULT_RESOLVE_SETTLE",
    "PRESENCE_TYPE",
    "PROTOCOL_VERSION",
    "SERVICE_TYPE",
    "TXT_KEY_FINGERPRINT",
    "TXT_KEY_JID",
    "TXT_KEY_TXTVERS",
    "TXT_KEY_VERSION",
    "DeviceFound",
    "DeviceLost",
    "LanAdvertiser",
    "LanBrowser",
    "LanEvent",
    "LanRecord",
    "decode_txt",
    "encode_txt",
    "host_label",
    "instance_name",
    "jid_matches",
    "presence_instance_name",
    "presence_txt_for",
    "record_from_service_info",
    "select_records",
    "txt_for",
]

logger = logging.getLogger(__name__)

SERVICE_TYPE = "_dtx._udp.local."
PRESENCE_TYPE = "_presence._tcp.local."
PROTOCOL_VERSION = "1"
"""The dtx protocol version announced in ``v`` and required by :meth:`LanBrowser.resolve`."""

TXT_VERSION = "1"
"""Version of the TXT layout itself (``txtvers``, RFC 6763 section 6.7)."""

TXT_KEY_TXTVERS = "txtvers"
TXT_KEY_VERSION = "v"
TXT_KEY_JID = "jid"
TXT_KEY_FINGERPRINT = "fp"
_RESERVED_KEYS = frozenset({TXT_KEY_TXTVERS, TXT_KEY_VERSION, TXT_KEY_JID, TXT_KEY_FINGERPRINT})

MAX_TXT_STRING_BYTES = 255
"""One TXT string is a length byte and at most 255 bytes (RFC 6763 section 6.1)."""

MAX_LABEL_BYTES = 63
"""One DNS label, e.g. a service instance name (RFC 6763 section 4.1.1)."""

FINGERPRINT_PREFIX_CHARS = 8
"""Characters of the fingerprint digest in instance and host names (40 bits):
enough that two devices announcing the same JID get different names."""

DEFAULT_RESOLVE_SETTLE = 0.3
"""After the first matching answer, how long :meth:`LanBrowser.resolve` keeps
collecting: responders answer a shared (PTR) question after a random 20-120 ms
delay (RFC 6762 section 6), so the others arrive within this window."""

GOODBYE_SECONDS = 1.2
"""How long a changed TXT record waits after the goodbye of the old one:
an mDNS cache drops a record 1 s after its goodbye (RFC 6762 section
10.1), and avahi's service resolvers report a changed TXT only once the old
one is gone."""

_FLAGS_QR_RESPONSE = 0x8000
_FLAGS_AA = 0x0400

DEFAULT_INFO_TIMEOUT = 3.0
"""How long the browser waits for SRV/TXT/A of one announced instance."""

_UNSAFE = re.compile(r"[^a-z0-9-]+")
_HYPHENS = re.compile(r"-{2,}")  # also keeps "xn--"-like labels (RFC 5891) out


# -- TXT codec (RFC 6763 section 6) -------------------------------------------


def encode_txt(items: Mapping[str, str] | Iterable[tuple[str, str]]) -> bytes:
    """TXT RDATA for ``key=value`` pairs, in the given order.

    Raises :class:`DiscoveryError` for an empty key, a key that is not
    printable ASCII without ``=``, or a pair longer than 255 bytes.
    """
    pairs = items.items() if isinstance(items, Mapping) else items
    out = bytearray()
    for key, value in pairs:
        if not key or "=" in key or any(not " " <= ch <= "~" for ch in key):
            raise DiscoveryError(f"TXT key {key!r} is not printable ASCII without '='")
        entry = key.encode("ascii") + b"=" + value.encode("utf-8")
        if len(entry) > MAX_TXT_STRING_BYTES:
            raise DiscoveryError(
                f"TXT entry {key!r} is {len(entry)} bytes; the limit is {MAX_TXT_STRING_BYTES}")
        out.append(len(entry))
        out += entry
    return bytes(out)


def decode_txt(data: bytes) -> dict[str, bytes | None]:
    """The attributes of TXT RDATA: lower-cased key to value bytes, or None
    for a boolean attribute (a string without ``=``).

    As RFC 6763 section 6.4 says: the first occurrence of a key wins, and
    strings with an empty or non-ASCII key are ignored. A string running past
    the end of the data raises :class:`DecodeError`.
    """
    attributes: dict[str, bytes | None] = {}
    pos = 0
    while pos < len(data):
        length = data[pos]
        start = pos + 1
        end = start + length
        if end > len(data):
            raise DecodeError(f"TXT string of {length} bytes runs past the end at {pos}")
        pos = end
        raw_key, sep, value = data[start:end].partition(b"=")
        if not raw_key or any(not 0x20 <= b <= 0x7E for b in raw_key):
            continue
        key = raw_key.decode("ascii").lower()
        if key not in attributes:
            attributes[key] = value if sep else None
    return attributes


# -- names ------------------------------------------------------------------


def _canonical_fingerprint(text: str) -> str:
    """The fingerprint as dtx prints it; raises :class:`FingerprintError`."""
    digest = parse_fingerprint(text)
    b32 = base64.b32encode(digest).decode("ascii").rstrip("=").lower()
    return FINGERPRINT_PREFIX + "-".join(b32[i : i + 4] for i in range(0, len(b32), 4))


def _fingerprint_tag(fingerprint: str) -> str:
    digest = parse_fingerprint(fingerprint)
    return base64.b32encode(digest).decode("ascii").lower()[:FINGERPRINT_PREFIX_CHARS]


def _safe_label(text: str, tag: str) -> str:
    """``text`` reduced to lower-case letters, digits and single ``-``, cut so that
    ``<text>-<tag>`` fits one DNS label."""
    room = MAX_LABEL_BYTES - len(tag) - 1
    base = _HYPHENS.sub("-", _UNSAFE.sub("-", text.lower())).strip("-")[:room].strip("-")
    return f"{base or 'dtx'}-{tag}"


def instance_name(jid: str, fingerprint: str) -> str:
    """The DNS-SD instance label of a device: its JID with everything but
    ASCII letters, digits and ``-`` replaced by ``-``, then the first
    characters of its key fingerprint, at most 63 bytes.

    ``tv@example.org/living-room`` with key ``SHA256:abcd-efgh-...`` becomes
    ``tv-example-org-living-room-abcdefgh``. The fingerprint part keeps two
    devices apart when they announce the same JID (an impostor, a copied key
    file), so neither has to be renamed by mDNS probing. Raises
    :class:`JIDError` or :class:`FingerprintError`.
    """
    return _safe_label(JID.parse(jid).full, _fingerprint_tag(fingerprint))


def host_label(jid: str, fingerprint: str) -> str:
    """The host name label (``<label>.local.``) the device's A records use:
    ``dtx-`` and the instance name, cut to 63 bytes, letters-digits-hyphen."""
    return _safe_label("dtx-" + JID.parse(jid).full, _fingerprint_tag(fingerprint))


def presence_instance_name(jid: str, fingerprint: str) -> str:
    """The XEP-0174 instance name, ``user@machine`` as that XEP asks: the
    JID's local part (``dtx`` when there is none) at the host label."""
    parsed = JID.parse(jid)
    machine = host_label(jid, fingerprint)
    user = _HYPHENS.sub("-", _UNSAFE.sub("-", (parsed.local or "dtx").lower())).strip("-")
    user = user or "dtx"
    room = MAX_LABEL_BYTES - len(machine) - 1
    if room < 1:
        machine = machine[-(MAX_LABEL_BYTES - 4):]
        room = MAX_LABEL_BYTES - len(machine) - 1
    return f"{user[:room]}@{machine}"


# -- TXT contents -------------------------------------------------------------


def txt_for(identity_jid: str, fingerprint: str, *,
            extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The ``_dtx._udp`` TXT attributes of a device, in announcement order.

    Keys: ``txtvers`` (layout of this record, ``1``), ``v`` (dtx protocol
    version), ``jid`` (the device's JID, normalised), ``fp`` (its key
    fingerprint, as dtx prints it), then ``extra`` (which may not reuse those
    names). Raises :class:`JIDError`, :class:`FingerprintError`, or
    :class:`DiscoveryError` for a reserved key in ``extra`` or an entry that
    does not fit 255 bytes.
    """
    txt = {
        TXT_KEY_TXTVERS: TXT_VERSION,
        TXT_KEY_VERSION: PROTOCOL_VERSION,
        TXT_KEY_JID: JID.parse(identity_jid).full,
        TXT_KEY_FINGERPRINT: _canonical_fingerprint(fingerprint),
    }
    for key, value in (extra or {}).items():
        if key.lower() in _RESERVED_KEYS:
            raise DiscoveryError(f"TXT key {key!r} is reserved for dtx")
        txt[key] = value
    encode_txt(txt)  # size and key checks
    return txt


PRESENCE_STATUSES = ("avail", "away", "dnd")
"""The values of the XEP-0174 ``status`` key."""


def presence_txt_for(jid: str, port: int, *, nick: str | None = None, status: str = "avail",
                     msg: str | None = None, caps: Caps | None = None) -> dict[str, str]:
    """XEP-0174 presence TXT attributes, in announcement order: ``txtvers=1``
    first (the XEP says it SHOULD be), ``port.p2pj`` (the TCP port of the
    XEP-0174 listener, the same as the SRV record's), ``status``, ``msg``
    (if any), ``jid`` (the bare JID: the account), ``nick`` (the resource
    unless given), then the XEP-0115 ``node``, ``hash`` and ``ver`` of what
    the device answers in disco#info (:func:`dtx.proto.caps.caps_for`).
    Raises :class:`DiscoveryError` for another status or an entry longer
    than 255 bytes."""
    if status not in PRESENCE_STATUSES:
        raise DiscoveryError(f"status {status!r} is not one of {', '.join(PRESENCE_STATUSES)}")
    parsed = JID.parse(jid)
    txt = {"txtvers": "1", "port.p2pj": str(port), "status": status}
    if msg:
        txt["msg"] = msg
    txt["jid"] = parsed.bare.full
    txt["nick"] = nick if nick is not None else (parsed.resource or parsed.bare.full)
    if caps is not None:
        txt.update(node=caps.node, hash=caps.hash, ver=caps.ver)
    encode_txt(txt)
    return txt


@dataclass(frozen=True, kw_only=True)
class PresenceAnnouncement:
    """What a device says in its XEP-0174 ``_presence._tcp`` record.

    ``port`` is the TCP port of its *running* XEP-0174 listener
    (:class:`dtx.aio.linklocal.LinkLocal`): the record promises a plain XML
    stream there, so it is published only while one serves it."""

    port: int
    nick: str | None = None
    status: str = "avail"
    msg: str | None = None
    caps: Caps | None = None

    def txt(self, jid: str) -> dict[str, str]:
        """The TXT attributes (:func:`presence_txt_for`)."""
        return presence_txt_for(jid, self.port, nick=self.nick, status=self.status,
                                msg=self.msg, caps=self.caps)


# -- records ------------------------------------------------------------------


@dataclass(frozen=True)
class LanRecord:
    """A dtx device seen on the LAN: what its TXT record claims (not yet
    verified: the session handshake checks the key) and where it listens."""

    jid: str
    fingerprint: str
    version: str
    addresses: tuple[tuple[str, int], ...]
    instance: str

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (addresses as ``[host, port]`` lists)."""
        return {"jid": self.jid, "fingerprint": self.fingerprint, "version": self.version,
                "addresses": [list(a) for a in self.addresses], "instance": self.instance}


@dataclass(frozen=True)
class DeviceFound:
    """A device was announced on the LAN, or changed its announcement."""

    record: LanRecord


@dataclass(frozen=True)
class DeviceLost:
    """A device said goodbye (or its records expired)."""

    record: LanRecord


LanEvent: TypeAlias = DeviceFound | DeviceLost


class ServiceInfoLike(Protocol):
    """What :func:`record_from_service_info` reads of a zeroconf ServiceInfo."""

    @property
    def name(self) -> str: ...
    @property
    def port(self) -> int | None: ...
    @property
    def text(self) -> bytes | None: ...

    def parsed_addresses(self, version: IPVersion = ...) -> list[str]: ...


def _text(attributes: Mapping[str, bytes | None], key: str) -> str:
    value = attributes.get(key)
    if value is None:
        raise DecodeError(f"TXT has no {key}=value")
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DecodeError(f"TXT {key} is not UTF-8") from exc


def record_from_service_info(info: ServiceInfoLike) -> LanRecord | None:
    """The :class:`LanRecord` a resolved ``_dtx._udp`` service describes, or
    None (logged at DEBUG) when its TXT is malformed (no or bad ``jid``,
    ``fp`` or ``v``), its port is missing, or it has no IPv4 address."""
    name = info.name
    instance = name[: -len(SERVICE_TYPE) - 1] if name.endswith("." + SERVICE_TYPE) else name
    try:
        attributes = decode_txt(info.text or b"")
        jid = JID.parse(_text(attributes, TXT_KEY_JID)).full
        fingerprint = _canonical_fingerprint(_text(attributes, TXT_KEY_FINGERPRINT))
        version = _text(attributes, TXT_KEY_VERSION)
    except (DecodeError, JIDError, FingerprintError) as exc:
        logger.debug("ignoring %s: %s", name, exc)
        return None
    port = info.port
    if port is None or not 0 < port < 65536:
        logger.debug("ignoring %s: no usable port (%r)", name, port)
        return None
    hosts = info.parsed_addresses(IPVersion.V4Only)
    if not hosts:
        logger.debug("ignoring %s: no IPv4 address", name)
        return None
    return LanRecord(jid=jid, fingerprint=fingerprint, version=version,
                     addresses=tuple((host, port) for host in hosts), instance=instance)


def select_records(records: Iterable[LanRecord], jid: str | JID, *,
                   trusted: Iterable[str] = (),
                   version: str | None = PROTOCOL_VERSION) -> list[LanRecord]:
    """The records answering ``jid`` (see :func:`jid_matches`) that speak
    ``version`` (None: any), those whose fingerprint is in ``trusted`` first,
    then by instance name, so that the genuine device is tried before any
    impostor announcing the same JID. Pure; a malformed trusted fingerprint
    raises :class:`FingerprintError`."""
    wanted = jid if isinstance(jid, JID) else JID.parse(jid)
    trusted_set = {parse_fingerprint(fp) for fp in trusted}
    chosen = [r for r in records
              if jid_matches(wanted, r.jid) and (version is None or r.version == version)]
    return sorted(chosen, key=lambda r: (parse_fingerprint(r.fingerprint) not in trusted_set,
                                         r.instance))


# -- asyncio drivers ------------------------------------------------------------


Interfaces: TypeAlias = InterfaceChoice | Sequence[str]
"""Where zeroconf binds: ``InterfaceChoice.All`` or IPv4 interface addresses."""


def _zeroconf_interfaces(interfaces: Interfaces) -> InterfaceChoice | list[str | int]:
    if isinstance(interfaces, InterfaceChoice):
        return interfaces
    return [str(i) for i in interfaces]


class LanAdvertiser:
    """Announces one device on the LAN while the context is open.

    ``addresses`` defaults to the interface addresses given in
    ``interfaces``, or every non-loopback IPv4 address of the host when
    ``interfaces`` is ``InterfaceChoice.All``. Pass ``zeroconf`` to share one
    :class:`AsyncZeroconf` (one set of sockets) with a :class:`LanBrowser`;
    otherwise the advertiser owns one and closes it on exit.
    """

    def __init__(self, jid: str, fingerprint: str, port: int, *,
                 addresses: Sequence[str] | None = None,
                 presence: PresenceAnnouncement | None = None,
                 interfaces: Interfaces = InterfaceChoice.All,
                 zeroconf: AsyncZeroconf | None = None,
                 extra_txt: Mapping[str, str] | None = None) -> None:
        if not 0 < port < 65536:
            raise DiscoveryError(f"port {port} is not a UDP port")
        if presence is not None and not 0 < presence.port < 65536:
            raise DiscoveryError(f"port {presence.port} is not a TCP port")
        self.jid = JID.parse(jid).full
        self.fingerprint = _canonical_fingerprint(fingerprint)
        self.port = port
        self.txt = txt_for(self.jid, self.fingerprint, extra=extra_txt)
        self.instance = instance_name(self.jid, self.fingerprint)
        self.server = host_label(self.jid, self.fingerprint) + ".local."
        self.presence = presence
        self.presence_instance = presence_instance_name(self.jid, self.fingerprint)
        self.presence_txt = presence.txt(self.jid) if presence is not None else None
        self._addresses = list(addresses) if addresses is not None else None
        self._interfaces = interfaces
        self._zc = zeroconf
        self._owns_zc = zeroconf is None
        self._infos: list[AsyncServiceInfo] = []
        self._update_lock = asyncio.Lock()
        self.addresses: list[str] = []

    def _pick_addresses(self) -> list[str]:
        if self._addresses is not None:
            chosen = self._addresses
        elif not isinstance(self._interfaces, InterfaceChoice):
            chosen = list(self._interfaces)
        else:
            chosen = local_ipv4_addresses(include_link_local=True)
        v4 = [a for a in chosen if ipaddress.ip_address(a).version == 4]
        if not v4:
            raise DiscoveryError(f"no IPv4 address to announce for {self.jid}")
        return v4

    async def __aenter__(self) -> LanAdvertiser:
        self.addresses = self._pick_addresses()
        if self._zc is None:
            self._zc = AsyncZeroconf(interfaces=_zeroconf_interfaces(self._interfaces),
                                     ip_version=IPVersion.V4Only)
        infos = [AsyncServiceInfo(SERVICE_TYPE, f"{self.instance}.{SERVICE_TYPE}",
                                  port=self.port, properties=encode_txt(self.txt),
                                  server=self.server, parsed_addresses=self.addresses)]
        if self.presence is not None:
            infos.append(self._presence_info(self.presence))
        zc = self._zc
        try:
            # Probing (RFC 6762 section 8.1, about a second) happens here, for
            # both names at once; the announcements then run on by themselves.
            results = await asyncio.gather(
                *(zc.async_register_service(info) for info in infos), return_exceptions=True)
        except BaseException:
            await self._close()
            raise
        self._infos = [info for info, r in zip(infos, results) if not isinstance(r, BaseException)]
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            await self._close()
            if isinstance(failures[0], (NonUniqueNameException, BadTypeInNameException)):
                raise DiscoveryError(
                    f"cannot announce {self.instance}: {failures[0]!r}") from failures[0]
            raise failures[0]
        logger.info("announcing %s (%s) at %s port %d", self.jid, self.instance,
                    ", ".join(self.addresses), self.port)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self._close()

    def _presence_info(self, presence: PresenceAnnouncement) -> AsyncServiceInfo:
        return AsyncServiceInfo(PRESENCE_TYPE, f"{self.presence_instance}.{PRESENCE_TYPE}",
                                port=presence.port, properties=encode_txt(presence.txt(self.jid)),
                                server=self.server, parsed_addresses=self.addresses)

    async def update_presence(self, presence: PresenceAnnouncement) -> None:
        """Announce a changed ``status``, ``msg`` or ``nick``: a goodbye of
        the old TXT record, then, :data:`GOODBYE_SECONDS` later, the new one
        (RFC 6762 sections 8.4 and 10.1). Raises :class:`DiscoveryError` if
        this advertiser announces no presence, or for another port."""
        async with self._update_lock:
            old, zc = self.presence, self._zc
            if old is None or zc is None:
                raise DiscoveryError("this advertiser announces no XEP-0174 presence")
            if presence.port != old.port:
                raise DiscoveryError("the XEP-0174 port cannot change while announced")
            txt = presence.txt(self.jid)  # checks before anything is sent
            if txt == self.presence_txt:
                self.presence = presence
                return
            info = self._presence_info(presence)
            # The goodbye twice, a quarter of the wait apart: one lost
            # multicast packet would leave browsers with the old record
            # (they report a changed TXT only once the old one is gone).
            for _ in range(2):
                for previous in self._infos:
                    if previous.type == PRESENCE_TYPE:
                        out = DNSOutgoing(_FLAGS_QR_RESPONSE | _FLAGS_AA)
                        out.add_answer_at_time(previous.dns_text(override_ttl=0), 0)
                        zc.zeroconf.async_send(out)
                await asyncio.sleep(GOODBYE_SECONDS / 4)
            await asyncio.sleep(GOODBYE_SECONDS * 3 / 4)
            await zc.async_update_service(info)
            self._infos = [i for i in self._infos if i.type != PRESENCE_TYPE] + [info]
            self.presence, self.presence_txt = presence, txt
            logger.info("XEP-0174 presence of %s now %s", self.jid, presence.status)

    async def _close(self) -> None:
        zc, self._zc = self._zc, None
        if zc is None:
            return
        infos, self._infos = self._infos, []
        if self._owns_zc:
            await zc.async_close()  # sends goodbyes for everything registered
            return
        for info in infos:
            goodbye = await zc.async_unregister_service(info)
            await goodbye


R = TypeVar("R")


class ServiceBrowser(Generic[R]):
    """A live table of the instances of one DNS-SD service type on the LAN.

    Browses ``service_type`` while the context is open; each announced
    instance is resolved (SRV, TXT, A) and turned into a record by
    ``parse`` (None: malformed, ignored). :class:`LanBrowser` keeps
    ``_dtx._udp``; ``dtx.aio.presence.PresenceBrowser`` ``_presence._tcp``.
    """

    def __init__(self, service_type: str, parse: Callable[[AsyncServiceInfo], R | None], *,
                 interfaces: Interfaces = InterfaceChoice.All,
                 zeroconf: AsyncZeroconf | None = None,
                 info_timeout: float = DEFAULT_INFO_TIMEOUT) -> None:
        self.service_type = service_type
        self._parse = parse
        self._interfaces = interfaces
        self._zc = zeroconf
        self._owns_zc = zeroconf is None
        self._info_timeout = info_timeout
        self._records: dict[str, R] = {}
        self._changed = asyncio.Condition()
        self._tasks: set[asyncio.Task[None]] = set()
        self._generation: dict[str, int] = {}
        self._browser: AsyncServiceBrowser | None = None

    async def __aenter__(self) -> Self:
        if self._zc is None:
            self._zc = AsyncZeroconf(interfaces=_zeroconf_interfaces(self._interfaces),
                                     ip_version=IPVersion.V4Only)
        self._browser = AsyncServiceBrowser(self._zc.zeroconf, self.service_type,
                                            handlers=[self._on_change])
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        browser, self._browser = self._browser, None
        if browser is not None:
            await browser.async_cancel()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        zc, self._zc = self._zc, None
        if zc is not None and self._owns_zc:
            await zc.async_close()

    def records(self) -> list[R]:
        """Every record currently known, by instance name."""
        return [self._records[k] for k in sorted(self._records)]

    def _on_change(self, zeroconf: Zeroconf, service_type: str, name: str,
                   state_change: ServiceStateChange) -> None:
        """zeroconf's browser callback (runs on the event loop)."""
        key = name.lower()
        # A newer change of the same instance makes older fetches moot.
        self._generation[key] = self._generation.get(key, 0) + 1
        if state_change is ServiceStateChange.Removed:
            self._spawn(self.update(name, None))
        else:
            self._spawn(self._fetch(name, self._generation[key]))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _fetch(self, name: str, generation: int) -> None:
        zc = self._zc
        if zc is None:
            return
        info = AsyncServiceInfo(self.service_type, name)
        if not await info.async_request(zc.zeroconf, self._info_timeout * 1000):
            logger.debug("no SRV/TXT/A for %s within %.1f s", name, self._info_timeout)
            return
        if self._generation.get(name.lower()) != generation:
            return
        await self.update(name, self._parse(info))

    async def update(self, name: str, record: R | None) -> None:
        """Put one instance's record in the table (None: remove it), report
        it (:meth:`_changed_record`) and wake waiters. The zeroconf callbacks
        call it; tests may feed it directly."""
        key = name.lower()
        old = self._records.get(key)
        if record is None:
            if old is None:
                return
            del self._records[key]
        else:
            if old == record:
                return
            self._records[key] = record
        self._changed_record(name, old, record)
        async with self._changed:
            self._changed.notify_all()

    def _changed_record(self, name: str, old: R | None, new: R | None) -> None:
        """Called for each change of the table (a subclass reports it)."""

    async def wait_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait up to ``timeout`` for ``predicate()`` to hold after a change
        of the table (or at once); returns whether it held."""
        try:
            async with asyncio.timeout(max(timeout, 0.0)):
                async with self._changed:
                    await self._changed.wait_for(predicate)
        except TimeoutError:
            return predicate()
        return True


class LanBrowser(ServiceBrowser[LanRecord]):
    """A live table of the dtx devices announced on the LAN.

    Browses ``_dtx._udp.local.`` while the context is open; each announced
    instance is resolved (SRV, TXT, A) and parsed by
    :func:`record_from_service_info`, malformed ones are ignored.
    """

    def __init__(self, *, interfaces: Interfaces = InterfaceChoice.All,
                 zeroconf: AsyncZeroconf | None = None,
                 info_timeout: float = DEFAULT_INFO_TIMEOUT,
                 on_event: Callable[[LanEvent], None] | None = None) -> None:
        super().__init__(SERVICE_TYPE, record_from_service_info, interfaces=interfaces,
                         zeroconf=zeroconf, info_timeout=info_timeout)
        self._on_event = on_event

    def _changed_record(self, name: str, old: LanRecord | None,
                        new: LanRecord | None) -> None:
        if new is None:
            if old is None:
                return
            logger.info("LAN device gone: %s", name)
            event: LanEvent = DeviceLost(old)
        else:
            logger.info("LAN device: %s %s at %s", new.jid, new.fingerprint, new.addresses)
            event = DeviceFound(new)
        if self._on_event is not None:
            self._on_event(event)

    async def wait_records(self, jid: str, *, count: int = 1, timeout: float,
                           trusted: Iterable[str] = ()) -> list[LanRecord]:
        """The matching records (see :func:`select_records`) once there are
        at least ``count`` of them, or whatever there is after ``timeout``."""
        query = JID.parse(jid)
        trusted = list(trusted)

        def current() -> list[LanRecord]:
            return select_records(self._records.values(), query, trusted=trusted)

        await self.wait_until(lambda: len(current()) >= count, timeout)
        return current()

    async def resolve(self, jid: str, *, timeout: float,
                      settle: float = DEFAULT_RESOLVE_SETTLE,
                      trusted: Iterable[str] = ()) -> list[LanRecord]:
        """The devices announcing ``jid`` (a full JID: that device; a bare
        JID: every device of the account), trusted fingerprints first.

        Waits up to ``timeout`` for a first answer, then up to ``settle``
        more for others answering the same question. An empty list means
        nobody announced it in time.
        """
        trusted = list(trusted)
        loop = asyncio.get_running_loop()
        found = await self.wait_records(jid, timeout=timeout, trusted=trusted)
        if not found:
            return found
        end = loop.time() + settle
        for _ in range(64):  # bounded: each turn needs one more record
            remaining = end - loop.time()
            if remaining <= 0:
                break
            more = await self.wait_records(jid, count=len(found) + 1, timeout=remaining,
                                           trusted=trusted)
            if len(more) <= len(found):
                found = more
                break
            found = more
        return found


if __name__ == "__main__":
    # ``python -m dtx.aio.mdns``: the command line is dtx.aio.mdns_cli, which
    # imports this module (as dtx.aio.mdns, not as this __main__); loaded by
    # name so that the drivers' import graph stays acyclic.
    import importlib

    sys.exit(importlib.import_module("dtx.aio.mdns_cli").main())
