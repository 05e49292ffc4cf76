"""XEP-0174 ``_presence._tcp`` records seen on the LAN: who announces a
plain (unauthenticated) XMPP stream, where, and with which claims.

:func:`presence_record_from_service_info` is pure (it reads a resolved
zeroconf ``ServiceInfo``); :class:`PresenceBrowser` keeps a live table, in
the manner of :class:`dtx.aio.mdns.LanBrowser`. A record is a claim by
whoever announced it, like every mDNS record: :func:`twin_of` is how dtx
sees that a XEP-0174 peer is also a dtx device, whose ``_dtx._udp`` path
(authenticated) it then uses instead.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from zeroconf import InterfaceChoice, IPVersion
from zeroconf.asyncio import AsyncZeroconf

from dtx.aio.mdns import (
    DEFAULT_INFO_TIMEOUT,
    PRESENCE_TYPE,
    Interfaces,
    LanRecord,
    ServiceBrowser,
    ServiceInfoLike,
    decode_txt,
)
from dtx.errors import DecodeError, JIDError
from dtx.identity import parse_fingerprint
from dtx.jid import JID

__all__ = ["PresenceBrowser", "PresenceRecord", "presence_record_from_service_info", "twin_of"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PresenceRecord:
    """A ``_presence._tcp`` instance: its name (``user@machine``), where its
    XEP-0174 listener is (the SRV port on each A address) and the TXT keys
    dtx reads. ``jid`` is the ``jid`` key (an account, claimed) or None."""

    instance: str
    addresses: tuple[tuple[str, int], ...]
    jid: str | None = None
    nick: str | None = None
    status: str | None = None
    node: str | None = None
    hash: str | None = None
    ver: str | None = None

    def names(self) -> set[str]:
        """The names it answers to, case-folded: the instance, its ``jid``."""
        return {n.casefold() for n in (self.instance, self.jid) if n}


def _value(attributes: dict[str, bytes | None], key: str) -> str | None:
    raw = attributes.get(key)
    if raw is None:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def presence_record_from_service_info(info: ServiceInfoLike) -> PresenceRecord | None:
    """The :class:`PresenceRecord` of a resolved ``_presence._tcp`` service,
    or None (logged at DEBUG) without a port or an IPv4 address, or with a
    TXT that does not decode. Keys that are missing or not UTF-8 are None;
    a ``jid`` that is not a JID is ignored."""
    name = info.name
    suffix = "." + PRESENCE_TYPE
    instance = name[: -len(suffix)] if name.endswith(suffix) else name
    try:
        attributes = decode_txt(info.text or b"")
    except DecodeError as exc:
        logger.debug("ignoring %s: %s", name, exc)
        return None
    port = info.port
    hosts = info.parsed_addresses(IPVersion.V4Only)
    if port is None or not 0 < port < 65536 or not hosts:
        logger.debug("ignoring %s: no port or no IPv4 address", name)
        return None
    jid = _value(attributes, "jid")
    if jid is not None:
        try:
            jid = JID.parse(jid.split(" ")[0]).full  # may list several: the first
        except JIDError:
            jid = None
    return PresenceRecord(instance=instance, addresses=tuple((h, port) for h in hosts), jid=jid,
                          nick=_value(attributes, "nick"), status=_value(attributes, "status"),
                          node=_value(attributes, "node"), hash=_value(attributes, "hash"),
                          ver=_value(attributes, "ver"))


def twin_of(presence: PresenceRecord, devices: Iterable[LanRecord],
            trusted: Iterable[str]) -> LanRecord | None:
    """The dtx device (``_dtx._udp`` record) with a trusted fingerprint that
    the same peer announces: its JID is the presence's ``jid`` (or the name
    asked for), on one of the same addresses. None when there is none:
    then only the XEP-0174 stream is left."""
    wanted = {parse_fingerprint(fp) for fp in trusted}
    hosts = {host for host, _ in presence.addresses}
    for record in devices:
        if parse_fingerprint(record.fingerprint) not in wanted:
            continue
        bare = JID.parse(record.jid).bare.full.casefold()
        if bare in presence.names() and hosts & {h for h, _ in record.addresses}:
            return record
    return None


class PresenceBrowser(ServiceBrowser[PresenceRecord]):
    """A live table of the ``_presence._tcp`` instances on the LAN."""

    def __init__(self, *, interfaces: Interfaces = InterfaceChoice.All,
                 zeroconf: AsyncZeroconf | None = None,
                 info_timeout: float = DEFAULT_INFO_TIMEOUT) -> None:
        super().__init__(PRESENCE_TYPE, presence_record_from_service_info,
                         interfaces=interfaces, zeroconf=zeroconf, info_timeout=info_timeout)

    def find(self, name: str) -> PresenceRecord | None:
        """The record of instance ``name`` (any case), else the first one
        whose ``jid`` is ``name``."""
        folded = name.casefold()
        records = self.records()
        for record in records:
            if record.instance.casefold() == folded:
                return record
        for record in records:
            if record.jid is not None and record.jid.casefold() == folded:
                return record
        return None

    async def wait_for(self, name: str, *, timeout: float) -> PresenceRecord | None:
        """:meth:`find`, waiting up to ``timeout`` for the record to appear."""
        await self.wait_until(lambda: self.find(name) is not None, timeout)
        return self.find(name)
