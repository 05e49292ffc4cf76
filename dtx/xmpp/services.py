"""STUN and TURN services of the account's own server (XEP-0215).

After login, a device asks its server which external services it offers
(an iq get ``<services xmlns='urn:xmpp:extdisco:2'/>`` to the account's
domain) and gets typed, frozen records back: :class:`StunService` and
:class:`TurnService`, the latter with the short-lived TURN credentials the
server minted for it (TURN REST: ``expiry:user`` and
base64(HMAC-SHA1(secret, username)), as Prosody's ``mod_turn_external`` and
ejabberd's ``mod_stun_disco`` make them). A TURN service marked
``restricted`` that came without credentials gets them from a
``<credentials/>`` request, one per service (ejabberd answers only one at a
time); :func:`refresh_credentials` asks again before they expire.

``expires`` is an absolute time on the caller's clock (the event loop's,
``loop.time()``): the server's ``expires`` attribute (XEP-0082 DateTime) is
taken relative to this machine's wall clock when the answer arrives, so the
records plug into :class:`dtx.proto.turn.TurnClient` as they are. A skewed
wall clock moves it by the skew; the TURN server, which checks the expiry
in the username against its own clock, is the judge.

Decoding (:func:`decode_services`) is a pure function of the answer and
the two clocks. A malformed answer raises :class:`BadServicesError`; a
malformed STUN or TURN entry inside a good answer is left out and listed in
:attr:`ExternalServices.ignored` with the reason, so one bad line in a
server's configuration does not cost the others. Services of other types
(``ftp`` ...) are ignored too. Nothing here raises anything but the errors
of :class:`ServiceDiscoveryError`'s tree and (for a login problem) the
:class:`~dtx.errors.XmppError` they derive from.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import logging
import re
import socket
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from dtx.errors import IqError, RemoteProtocolError, XmppError
from dtx.xmpp.client import XmppClient

__all__ = [
    "EXTDISCO_NS",
    "MAX_SERVICES",
    "BadServicesError",
    "ExternalServices",
    "IgnoredService",
    "ServiceDiscoveryError",
    "ServicesNotOfferedError",
    "ServicesRefusedError",
    "StunService",
    "Transport",
    "TurnService",
    "decode_credentials",
    "decode_services",
    "discover_services",
    "encode_credentials_request",
    "encode_services_request",
    "refresh_credentials",
    "resolve_address",
]

logger = logging.getLogger(__name__)

EXTDISCO_NS = "urn:xmpp:extdisco:2"
MAX_SERVICES = 64
"""Service entries read from one answer; an answer with more is refused."""
_MAX_ATTRIBUTE_CHARS = 1024
_MAX_NAME_CHARS = 255

Transport = Literal["udp", "tcp"]
_DEFAULT_PORT = {False: 3478, True: 5349}  # RFC 8489 / RFC 8656, by TLS
_NOT_OFFERED = frozenset({"service-unavailable", "feature-not-implemented", "item-not-found"})
_DATETIME = re.compile(
    r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})", re.ASCII)
_HOST = re.compile(r"[A-Za-z0-9.:\[\]_-]{1,253}", re.ASCII)


# -- errors -------------------------------------------------------------------


class ServiceDiscoveryError(XmppError):
    """The server's external services could not be learnt."""


class ServicesNotOfferedError(ServiceDiscoveryError):
    """The server does not implement XEP-0215 (it answered
    ``service-unavailable``, ``feature-not-implemented`` or
    ``item-not-found``): it offers no STUN or TURN."""

    def __init__(self, message: str, condition: str) -> None:
        super().__init__(message)
        self.condition = condition


class ServicesRefusedError(ServiceDiscoveryError):
    """The server answered with another error (``forbidden``: this account
    may not use its services; ``bad-request`` ...)."""

    def __init__(self, message: str, condition: str) -> None:
        super().__init__(message)
        self.condition = condition


class BadServicesError(ServiceDiscoveryError, RemoteProtocolError):
    """The server's answer is not a XEP-0215 answer: no ``<services/>`` (or
    ``<credentials/>``) element, too many entries, or, for credentials,
    none for the service asked about."""


# -- records ------------------------------------------------------------------


@dataclass(frozen=True)
class StunService:
    """A STUN server (type ``stun``, or ``stuns`` with ``tls``)."""

    host: str
    port: int
    transport: Transport = "udp"
    tls: bool = False

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)


@dataclass(frozen=True)
class TurnService:
    """A TURN server (type ``turn``, or ``turns`` with ``tls``) and the
    credentials this account may use on it until ``expires`` (the caller's
    clock; None: the server named no expiry)."""

    host: str
    port: int
    transport: Transport
    username: str
    password: str = field(repr=False)
    expires: float | None
    tls: bool = False
    restricted: bool = False
    """The server marks the credentials as minted for this account (they
    are renewed with :func:`refresh_credentials`)."""

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def kind(self) -> str:
        return "turns" if self.tls else "turn"


@dataclass(frozen=True)
class IgnoredService:
    """A service entry left out, and why."""

    kind: str
    host: str
    reason: str


@dataclass(frozen=True)
class ExternalServices:
    """What the server offers, in the order it listed them."""

    stun: tuple[StunService, ...] = ()
    turn: tuple[TurnService, ...] = ()
    ignored: tuple[IgnoredService, ...] = ()

    def first_turn(self, transport: Transport = "udp", *, tls: bool = False) -> TurnService | None:
        """The first TURN service over ``transport`` (plain or TLS)."""
        for service in self.turn:
            if service.transport == transport and service.tls == tls:
                return service
        return None

    def first_stun(self, transport: Transport = "udp", *, tls: bool = False) -> StunService | None:
        """The first STUN service over ``transport`` (plain or TLS)."""
        for service in self.stun:
            if service.transport == transport and service.tls == tls:
                return service
        return None


# -- codec --------------------------------------------------------------------


def encode_services_request() -> ET.Element:
    """The payload of the iq get that asks for every service."""
    return ET.Element(f"{{{EXTDISCO_NS}}}services")


def encode_credentials_request(service: TurnService) -> ET.Element:
    """The payload of the iq get that asks for credentials for ``service``
    (type, host and port identify it, XEP-0215 section 3.3)."""
    credentials = ET.Element(f"{{{EXTDISCO_NS}}}credentials")
    ET.SubElement(credentials, f"{{{EXTDISCO_NS}}}service",
                  {"type": service.kind, "host": service.host, "port": str(service.port)})
    return credentials


class _Bad(Exception):
    """One entry is unusable (internal: becomes an IgnoredService)."""


def _wall_to_clock(text: str, now: float, wall: float) -> float:
    if not _DATETIME.fullmatch(text):
        raise _Bad(f"expires {text!r} is not a XEP-0082 DateTime")
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise _Bad(f"expires {text!r} is not a valid date") from None
    return now + (when.timestamp() - wall)


def _flag(value: str | None, name: str) -> bool:
    if value is None or value in ("0", "false"):
        return False
    if value in ("1", "true"):
        return True
    raise _Bad(f"{name} {value!r} is not a boolean")


@dataclass(frozen=True)
class _Entry:
    kind: str
    host: str
    port: int
    transport: Transport
    tls: bool
    restricted: bool
    username: str | None
    password: str | None
    expires: str | None


def _entry(elem: ET.Element) -> _Entry:
    attrs = elem.attrib
    for name, value in attrs.items():
        if len(value) > _MAX_ATTRIBUTE_CHARS:
            raise _Bad(f"{name} is longer than {_MAX_ATTRIBUTE_CHARS} characters")
    kind = attrs.get("type", "")
    tls = kind.endswith("s")
    host = attrs.get("host", "")
    if not _HOST.fullmatch(host):
        raise _Bad(f"host {host!r} is missing or not a host name or address")
    port_text = attrs.get("port")
    if port_text is None:
        port = _DEFAULT_PORT[tls]
    elif port_text.isascii() and port_text.isdigit() and 0 < int(port_text) < 65536:
        port = int(port_text)
    else:
        raise _Bad(f"port {port_text!r} is not a port number")
    transport_text = attrs.get("transport", "tcp" if tls else "udp")
    if transport_text == "udp":
        transport: Transport = "udp"
    elif transport_text == "tcp":
        transport = "tcp"
    else:
        raise _Bad(f"transport {transport_text!r} is neither udp nor tcp")
    return _Entry(kind, host, port, transport, tls, _flag(attrs.get("restricted"), "restricted"),
                  attrs.get("username") or None, attrs.get("password") or None,
                  attrs.get("expires"))


def _turn(entry: _Entry, now: float, wall: float) -> TurnService:
    """The TURN service of an entry that has credentials."""
    if entry.username is None or entry.password is None:
        raise _Bad("no username or password")
    expires = None if entry.expires is None else _wall_to_clock(entry.expires, now, wall)
    return TurnService(entry.host, entry.port, entry.transport, entry.username, entry.password,
                       expires, entry.tls, entry.restricted)


def _entries(answer: ET.Element, names: Sequence[str]) -> list[ET.Element]:
    """The ``<service/>`` children of the answer's payload, whose name is
    one of ``names``; raises :class:`BadServicesError`."""
    payload = None
    for name in names:
        payload = answer.find(f"{{{EXTDISCO_NS}}}{name}")
        if payload is not None:
            break
    if payload is None:
        raise BadServicesError(
            f"the answer holds no <{names[0]} xmlns='{EXTDISCO_NS}'/> element")
    services = payload.findall(f"{{{EXTDISCO_NS}}}service")
    if len(services) > MAX_SERVICES:
        raise BadServicesError(f"the answer lists {len(services)} services "
                               f"(at most {MAX_SERVICES} are read)")
    return services


_Item = StunService | TurnService | IgnoredService


def _decode(answer: ET.Element, now: float, wall: float) -> list[_Item]:
    """Each entry of a services answer, in order: a record, an ignored
    entry, or, for a restricted TURN service without credentials, a
    :class:`TurnService` with empty credentials (to be asked for)."""
    items: list[_Item] = []
    for elem in _entries(answer, ("services",)):
        # (as named in IgnoredService and the log: bounded)
        kind = elem.get("type", "")[:_MAX_NAME_CHARS]
        host = elem.get("host", "")[:_MAX_NAME_CHARS]
        if kind not in ("stun", "stuns", "turn", "turns"):
            items.append(IgnoredService(kind, host, "not a STUN or TURN service"))
            continue
        try:
            entry = _entry(elem)
            if kind.startswith("stun"):
                items.append(StunService(entry.host, entry.port, entry.transport, entry.tls))
            elif entry.restricted and (entry.username is None or entry.password is None):
                items.append(TurnService(entry.host, entry.port, entry.transport, "", "", None,
                                         entry.tls, True))
            elif entry.username is None or entry.password is None:
                raise _Bad("no username or password, and not restricted")
            else:
                items.append(_turn(entry, now, wall))
        except _Bad as exc:
            items.append(IgnoredService(kind, host, str(exc)))
    return items


def _collect(items: Sequence[_Item]) -> ExternalServices:
    stun = tuple(i for i in items if isinstance(i, StunService))
    turn = tuple(i for i in items if isinstance(i, TurnService) and i.username)
    ignored = [i for i in items if isinstance(i, IgnoredService)]
    ignored += [IgnoredService(i.kind, i.host, "restricted, and no credentials were asked for")
                for i in items if isinstance(i, TurnService) and not i.username]
    return ExternalServices(stun, turn, tuple(ignored))


def decode_services(answer: ET.Element, *, now: float, wall: float) -> ExternalServices:
    """The services of an iq result to :func:`encode_services_request`.

    ``now`` is the caller's clock and ``wall`` the wall clock
    (``time.time()``) at the same instant; ``expires`` is converted from
    the one to the other. A restricted TURN service without credentials is
    listed in ``ignored`` (:func:`discover_services` asks for them).
    Raises :class:`BadServicesError` only.
    """
    return _collect(_decode(answer, now, wall))


def decode_credentials(answer: ET.Element, service: TurnService, *, now: float,
                       wall: float) -> TurnService:
    """``service`` with the credentials of an iq result to
    :func:`encode_credentials_request`. The answer's payload may be
    ``<credentials/>`` (XEP-0215, Prosody) or ``<services/>`` (ejabberd);
    its entry for the same type, host and port counts. Raises
    :class:`BadServicesError` only."""
    problems: list[str] = []
    for elem in _entries(answer, ("credentials", "services")):
        if elem.get("type") != service.kind or elem.get("host") != service.host:
            continue
        try:
            entry = _entry(elem)
            if entry.port != service.port:
                continue
            fresh = _turn(entry, now, wall)
        except _Bad as exc:
            problems.append(str(exc))
            continue
        return replace(service, username=fresh.username, password=fresh.password,
                       expires=fresh.expires)
    detail = f" ({'; '.join(problems)})" if problems else ""
    raise BadServicesError(
        f"the answer holds no credentials for {service.kind}:{service.host}:{service.port}{detail}")


# -- over XMPP --------------------------------------------------------------------


def _clocks() -> tuple[float, float]:
    """The loop's clock and the wall clock at one instant: the wall clock
    read between two readings of the loop's, paired with their midpoint
    (a busy machine may run something else between two readings)."""
    loop = asyncio.get_running_loop()
    t1 = loop.time()
    wall = time.time()
    return (t1 + loop.time()) / 2, wall


async def _ask(client: XmppClient, payload: ET.Element, domain: str, what: str) -> ET.Element:
    try:
        return await client.iq_get(payload, domain)
    except IqError as exc:
        message = f"{domain} answered {what} with {exc.condition or 'an error'}"
        if exc.condition in _NOT_OFFERED:
            raise ServicesNotOfferedError(message + ": no external services (XEP-0215)",
                                          exc.condition) from None
        raise ServicesRefusedError(message, exc.condition) from None
    except XmppError as exc:
        raise ServiceDiscoveryError(f"{what} to {domain}: {exc}") from None


async def refresh_credentials(client: XmppClient, service: TurnService, *,
                              domain: str | None = None) -> TurnService:
    """Fresh credentials for ``service``, from a ``<credentials/>`` request
    to ``domain`` (the account's own by default): pass the result's
    username, password and ``expires`` to
    :meth:`~dtx.proto.turn.TurnClient.update_credentials`."""
    where = domain or client.jid.domain
    answer = await _ask(client, encode_credentials_request(service), where,
                        "a credentials request")
    now, wall = _clocks()
    return decode_credentials(answer, service, now=now, wall=wall)


async def discover_services(client: XmppClient, *, domain: str | None = None,
                            ) -> ExternalServices:
    """The STUN and TURN services the account's server (or ``domain``)
    offers, with TURN credentials, in the order the server listed them.
    Restricted TURN services that came without credentials get them by a
    ``<credentials/>`` request each; one whose request fails is listed in
    ``ignored``.

    Raises :class:`ServicesNotOfferedError` (no XEP-0215 on the server),
    :class:`ServicesRefusedError`, :class:`BadServicesError` or, for no
    answer in time or no connection, :class:`ServiceDiscoveryError`."""
    where = domain or client.jid.domain
    answer = await _ask(client, encode_services_request(), where, "a services request")
    now, wall = _clocks()
    items = _decode(answer, now, wall)
    pending = [(n, i) for n, i in enumerate(items) if isinstance(i, TurnService) and not i.username]
    outcomes = await asyncio.gather(
        *(refresh_credentials(client, service, domain=where) for _, service in pending),
        return_exceptions=True)
    for (n, service), outcome in zip(pending, outcomes):
        if isinstance(outcome, TurnService):
            items[n] = outcome
        elif isinstance(outcome, (ServicesRefusedError, ServicesNotOfferedError,
                                  BadServicesError)):
            items[n] = IgnoredService(service.kind, service.host,
                                      f"credentials request failed: {outcome}")
        elif isinstance(outcome, BaseException):
            raise outcome
    found = _collect(items)
    for item in found.ignored:
        logger.warning("%s: %s service %s ignored: %s", where, item.kind, item.host, item.reason)
    logger.info("%s offers %d STUN and %d TURN services", where, len(found.stun),
                len(found.turn))
    return found


async def resolve_address(service: StunService | TurnService, *,
                          family: int = socket.AF_INET) -> tuple[str, int]:
    """Where to send to reach ``service`` from a socket of ``family``: its
    host as it is when that is an address, else the first address the
    system's resolver gives for the name (servers often name themselves:
    Prosody's ``turn_external_host`` defaults to the XMPP domain). Raises
    :class:`ServiceDiscoveryError` when there is none."""
    try:
        ip = ipaddress.ip_address(service.host.strip("[]"))
    except ValueError:
        pass
    else:
        if (ip.version == 6) != (family == socket.AF_INET6):
            raise ServiceDiscoveryError(f"{service.host} is not an address of the socket's family")
        return (str(ip), service.port)
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(service.host, service.port, family=family,
                                       type=socket.SOCK_DGRAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise ServiceDiscoveryError(f"cannot resolve {service.host}: {exc}") from None
    for _, _, _, _, sockaddr in infos:
        return (str(sockaddr[0]), service.port)
    raise ServiceDiscoveryError(f"no address for {service.host}")
