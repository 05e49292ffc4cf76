"""Sans-IO STUN Binding responder of the rendezvous server.

:func:`answer_stun` takes one datagram, who sent it and which local
address received it, and returns a :class:`StunReply`: the response, the
local address to send it *from* (which differs from the receiving one when
a CHANGE-REQUEST is honoured) and the address to send it *to* (the sender,
or the sender's IP at its RESPONSE-PORT); or None when the datagram gets no
answer. :func:`answer_binding` is the same for a driver that always replies
to the sender: it returns ``(response, send_from)`` and refuses
RESPONSE-PORT with 420. The driver owns the sockets: one per local address
in :meth:`ServerAddresses.sockets`.

Served: Binding requests of RFC 8489 (XOR-MAPPED-ADDRESS, FINGERPRINT,
optional SOFTWARE), of RFC 5780 when the server has an alternate IP *and*
an alternate port (OTHER-ADDRESS, RESPONSE-ORIGIN, CHANGE-REQUEST), and of
classic RFC 3489 clients such as pystun3 (MAPPED-ADDRESS, SOURCE-ADDRESS,
CHANGED-ADDRESS, CHANGE-REQUEST; no FINGERPRINT, no SOFTWARE, because those
clients walk attributes without padding).

What is answered and what is dropped, with amplification in mind
(the rules hold for every request shape and are checked by tests):

* Never answered: anything that does not decode as STUN (including a bad
  FINGERPRINT), indications, responses, classic requests for other methods
  or carrying a CHANGE-REQUEST that cannot be honoured.
* Error responses, RFC 8489 requests only, sent back to the sender from
  the receiving address: 400 for a method other than Binding or a
  RESPONSE-PORT of 0; 420 with UNKNOWN-ATTRIBUTES for comprehension-required
  attributes this server does not understand (RESPONSE-PORT among them in
  :func:`answer_binding`); 420 listing CHANGE-REQUEST when a flag asks for
  an alternate IP or port that this server does not have (RFC 5780
  section 6.1).
* No response is ever more than ``AMPLIFICATION_FACTOR`` (3) times the size
  of the request. Mandatory content (the mapped address, the error code)
  always fits; optional attributes are added in priority order while they
  fit: OTHER-ADDRESS, RESPONSE-ORIGIN, FINGERPRINT, SOFTWARE. A FINGERPRINT
  is mandatory when the request had one. A bare 20-byte RFC 8489 request
  therefore gets XOR-MAPPED-ADDRESS plus the RFC 5780 pair but no
  FINGERPRINT; a client that wants everything sends a FINGERPRINT (as
  :func:`dtx.wire.stun.binding_request` does) or PADDING.
* RESPONSE-PORT (RFC 5780, :func:`answer_stun` only) sends a success
  response to the sender's own IP at another port: no more reach than a
  spoofed source address already has, and the 3x cap still holds; coturn's
  ``turnutils_stunclient`` needs it for its RFC 5780 run. PADDING is
  accepted and not echoed. RESPONSE-ADDRESS (RFC 3489), which would name
  any third party, is never honoured: a classic answer always goes back to
  the sender. Credential attributes (USERNAME, MESSAGE-INTEGRITY, ...)
  are accepted and ignored: this server has no STUN credentials, like any
  public STUN server.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import struct
import zlib
from dataclasses import dataclass

from dtx.errors import DecodeError
from dtx.wire.address import normalise_address
from dtx.wire.stun import (
    FINGERPRINT_XOR,
    MAGIC_COOKIE,
    Address,
    Attribute,
    AttrType,
    StunClass,
    StunMessage,
    StunMethod,
    address_attribute,
    decode_stun,
    encode_stun,
    error_code_attribute,
    is_stun,
    software_attribute,
    binding_request,
    unknown_attributes_attribute,
    xor_address_attribute,
)

__all__ = [
    "AMPLIFICATION_FACTOR",
    "BindingResponder",
    "ServerAddresses",
    "StunReply",
    "answer_binding",
    "answer_stun",
]

logger = logging.getLogger(__name__)

AMPLIFICATION_FACTOR = 3
_HEADER_BYTES = 20
_FINGERPRINT_BYTES = 8

# Comprehension-required attributes a Binding request may carry here.
_UNDERSTOOD = frozenset(
    {
        AttrType.CHANGE_REQUEST,
        AttrType.PADDING,
        # credentials: accepted and ignored (no STUN authentication here)
        AttrType.USERNAME,
        AttrType.MESSAGE_INTEGRITY,
        AttrType.MESSAGE_INTEGRITY_SHA256,
        AttrType.USERHASH,
        AttrType.REALM,
        AttrType.NONCE,
    }
)


@dataclass(frozen=True)
class ServerAddresses:
    """The server's transport addresses.

    ``primary`` is the main (IP, port). With both ``alt_ip`` and
    ``alt_port`` the server has the four addresses RFC 5780 needs; with only
    one of them it can honour just that half of a CHANGE-REQUEST and does
    not advertise OTHER-ADDRESS / CHANGED-ADDRESS.

    ``mapping_port`` is the port, on the primary IP, of the NAT mapping
    check (docs/protocol.md 7.7). With an ``alt_port`` it is that port (the
    one socket serves both); without, it is a socket of its own, where
    STUN is answered as on the primary.
    """

    primary: Address
    alt_ip: str | None = None
    alt_port: int | None = None
    mapping_port: int | None = None

    def __post_init__(self) -> None:
        port = self.mapping_port
        if port is None:
            return
        if port == self.primary[1] or not 1 <= port <= 0xFFFF:
            raise ValueError(f"mapping port {port}: not a port other than the primary's")
        if self.alt_port is not None and port != self.alt_port:
            raise ValueError(f"mapping port {port}: with an alternate port it is that one "
                             f"({self.alt_port})")

    @property
    def mapping(self) -> Address | None:
        """The local address of the mapping check, or None without one."""
        if self.mapping_port is None:
            return None
        return (self.primary[0], self.mapping_port)

    @property
    def rfc5780(self) -> bool:
        """Whether the server has an alternate IP and an alternate port."""
        return self.alt_ip is not None and self.alt_port is not None

    def sockets(self) -> tuple[Address, ...]:
        """Every local address the driver must bind (1 to 4), the
        primary first; a mapping port of its own comes last."""
        ips = [self.primary[0]] + ([self.alt_ip] if self.alt_ip is not None else [])
        ports = [self.primary[1]] + ([self.alt_port] if self.alt_port is not None else [])
        stun = tuple((ip, port) for ip in ips for port in ports)
        mapping = self.mapping
        return stun if mapping is None or mapping in stun else (*stun, mapping)

    def other_ip(self, ip: str) -> str | None:
        """The IP that is not ``ip``, or None without an alternate."""
        if self.alt_ip is None:
            return None
        return self.primary[0] if ip == self.alt_ip else self.alt_ip

    def other_port(self, port: int) -> int | None:
        """The port that is not ``port``, or None without an alternate."""
        if self.alt_port is None:
            return None
        return self.primary[1] if port == self.alt_port else self.alt_port

    def other_address(self, local: Address) -> Address | None:
        """OTHER-ADDRESS / CHANGED-ADDRESS for a request received on ``local``."""
        ip = self.other_ip(local[0])
        port = self.other_port(local[1])
        if ip is None or port is None:
            return None
        return (ip, port)


def _local_ip(local: Address, addresses: ServerAddresses) -> str:
    """The receiving IP; the primary one if the socket is bound to any."""
    host = normalise_address(local)[0]
    try:
        if ipaddress.ip_address(host).is_unspecified:
            return addresses.primary[0]
    except ValueError:
        pass
    return host


def _attr_bytes(attr: Attribute) -> int:
    return 4 + len(attr.value) + (-len(attr.value) % 4)


def _build(
    request: StunMessage,
    cls: StunClass,
    required: list[Attribute],
    optional: list[Attribute | None],
    *,
    budget: int,
    fingerprint_required: bool,
) -> bytes | None:
    """Encode a response within ``budget`` bytes, or None if it cannot fit.

    ``optional`` is in priority order; ``None`` in it marks where an
    optional FINGERPRINT ranks (classic messages never get one).
    """
    size = _HEADER_BYTES + sum(_attr_bytes(a) for a in required)
    use_fp = fingerprint_required and not request.classic
    if use_fp:
        size += _FINGERPRINT_BYTES
    if size > budget:
        return None
    chosen = list(required)
    for attr in optional:
        if attr is None:
            if not use_fp and not request.classic:
                if size + _FINGERPRINT_BYTES <= budget:
                    use_fp = True
                    size += _FINGERPRINT_BYTES
            continue
        if size + _attr_bytes(attr) <= budget:
            chosen.append(attr)
            size += _attr_bytes(attr)
    response = StunMessage(
        method=request.method,
        cls=cls,
        transaction_id=request.transaction_id,
        attributes=tuple(chosen),
        classic=request.classic,
    )
    return encode_stun(response, fingerprint=use_fp)


@dataclass(frozen=True)
class StunReply:
    """A response to send: its bytes, the local address to send it from,
    and where to (the sender, or its RESPONSE-PORT)."""

    data: bytes
    send_from: Address
    send_to: Address


def answer_stun(
    data: bytes,
    *,
    src: Address,
    local: Address,
    addresses: ServerAddresses,
    software: str | None = None,
) -> StunReply | None:
    """Answer one datagram received on ``local`` from ``src``.

    Returns the reply, ``send_from`` being one of ``addresses.sockets()``
    (or ``local``) and ``send_to`` the sender or, for an RFC 5780
    RESPONSE-PORT, the same IP at that port; or None when nothing is to be
    sent. Never raises on any input; see the module docs for the rules.
    """
    return _answer(data, src, local, addresses, software, allow_response_port=True)


def answer_binding(
    data: bytes,
    *,
    src: Address,
    local: Address,
    addresses: ServerAddresses,
    software: str | None = None,
) -> tuple[bytes, Address] | None:
    """Like :func:`answer_stun` for a driver that always replies to ``src``.

    Returns ``(response, send_from)``. Since the reply always goes back to
    the sender, RESPONSE-PORT is not offered here: such requests get 420.
    """
    reply = _answer(data, src, local, addresses, software, allow_response_port=False)
    if reply is None:
        return None
    return reply.data, reply.send_from


def _answer(
    data: bytes,
    src: Address,
    local: Address,
    addresses: ServerAddresses,
    software: str | None,
    *,
    allow_response_port: bool,
) -> StunReply | None:
    if not is_stun(data):
        return None
    try:
        request = decode_stun(data)
    except DecodeError as exc:
        logger.debug("dropping malformed STUN from %s: %s", src, exc)
        return None
    if request.cls != StunClass.REQUEST:
        logger.debug("dropping STUN %s from %s: not a request", request.cls.name, src)
        return None
    budget = AMPLIFICATION_FACTOR * len(data)
    here: Address = (_local_ip(local, addresses), local[1])
    mapped = normalise_address(src)
    if request.classic:
        out = _answer_classic(request, mapped, here, addresses, budget)
    else:
        out = _answer_modern(
            request, mapped, here, addresses, budget, software, allow_response_port
        )
    if out is None:
        return None
    response, send_from, success = out
    send_to = src
    port = request.response_port if allow_response_port and not request.classic else None
    if success and port:
        # RFC 5780 section 7.5: the same IP, another port; errors go to src
        send_to = (src[0], port)
    return StunReply(data=response, send_from=send_from, send_to=send_to)


def _answer_modern(
    request: StunMessage,
    mapped: Address,
    here: Address,
    addresses: ServerAddresses,
    budget: int,
    software: str | None,
    allow_response_port: bool,
) -> tuple[bytes, Address, bool] | None:
    fp_required = request.has_fingerprint
    soft = [software_attribute(software)] if software else []

    def error(
        code: int, reason: str, extra: list[Attribute]
    ) -> tuple[bytes, Address, bool] | None:
        required = [error_code_attribute(code, reason), *extra]
        out = _build(
            request,
            StunClass.ERROR,
            required,
            [None, *soft],
            budget=budget,
            fingerprint_required=fp_required,
        )
        if out is None:
            logger.debug("dropping %d answer to %s: over the amplification budget", code, mapped)
            return None
        logger.debug("answering %s with error %d", mapped, code)
        return out, here, False

    if request.method != StunMethod.BINDING:
        return error(400, "Bad Request", [])
    understood = _UNDERSTOOD | ({AttrType.RESPONSE_PORT} if allow_response_port else set())
    unknown: list[int] = []
    for attr in request.attributes:
        if attr.comprehension_required and attr.type not in understood:
            if attr.type not in unknown:
                unknown.append(attr.type)
    if unknown:
        return error(420, "Unknown Attribute", [unknown_attributes_attribute(tuple(unknown))])
    if request.response_port == 0:
        return error(400, "Bad Request", [])
    origin = _origin(request, here, addresses)
    if origin is None:
        return error(
            420,
            "Unknown Attribute",
            [unknown_attributes_attribute((AttrType.CHANGE_REQUEST,))],
        )
    required = [xor_address_attribute(mapped, request.transaction_id)]
    optional: list[Attribute | None] = []
    other = addresses.other_address(here)
    if other is not None:
        optional.append(address_attribute(AttrType.OTHER_ADDRESS, other))
        optional.append(address_attribute(AttrType.RESPONSE_ORIGIN, origin))
    optional.append(None)  # FINGERPRINT, when not required
    optional.extend(soft)
    out = _build(
        request,
        StunClass.SUCCESS,
        required,
        optional,
        budget=budget,
        fingerprint_required=fp_required,
    )
    if out is None:
        return None
    logger.debug("binding request from %s answered from %s", mapped, origin)
    return out, origin, True


def _origin(request: StunMessage, here: Address, addresses: ServerAddresses) -> Address | None:
    """Where to answer from, or None if a CHANGE-REQUEST cannot be honoured."""
    change = request.change_request
    ip, port = here
    if change is None:
        return here
    if change.change_ip:
        other_ip = addresses.other_ip(ip)
        if other_ip is None:
            return None
        ip = other_ip
    if change.change_port:
        other_port = addresses.other_port(port)
        if other_port is None:
            return None
        port = other_port
    return (ip, port)


def _answer_classic(
    request: StunMessage,
    mapped: Address,
    here: Address,
    addresses: ServerAddresses,
    budget: int,
) -> tuple[bytes, Address, bool] | None:
    if request.method != StunMethod.BINDING:
        logger.debug("dropping classic STUN method %d from %s", request.method, mapped)
        return None
    origin = _origin(request, here, addresses)
    if origin is None:
        logger.debug("dropping classic request from %s: cannot change address", mapped)
        return None
    required = [address_attribute(AttrType.MAPPED_ADDRESS, mapped)]
    optional: list[Attribute | None] = [address_attribute(AttrType.SOURCE_ADDRESS, origin)]
    other = addresses.other_address(here)
    if other is not None:
        optional.append(address_attribute(AttrType.CHANGED_ADDRESS, other))
    out = _build(
        request,
        StunClass.SUCCESS,
        required,
        optional,
        budget=budget,
        fingerprint_required=False,
    )
    if out is None:
        return None
    logger.debug("classic binding %s, sent from %s", mapped, origin)
    return out, origin, True


# -- the common requests, answered from precomputed parts ------------------------------

_BINDING_HEAD = b"\x00\x01"
_COOKIE = MAGIC_COOKIE.to_bytes(4, "big")
_FINGERPRINT_HEAD = struct.pack(">HH", AttrType.FINGERPRINT, 4)
_XOR_MAPPED_IPV4_HEAD = struct.pack(">HHBB", AttrType.XOR_MAPPED_ADDRESS, 8, 0, 1)
_COOKIE_HIGH = MAGIC_COOKIE >> 16
_SAMPLE_SRC: Address = ("192.0.2.1", 4242)
_BARE_BYTES = _HEADER_BYTES
_WITH_FINGERPRINT_BYTES = _HEADER_BYTES + _FINGERPRINT_BYTES


@dataclass(frozen=True, slots=True)
class _Template:
    """A success response but for its transaction id and mapped address:
    ``head`` (type and length), ``tail`` (what follows XOR-MAPPED-ADDRESS,
    FINGERPRINT aside), whether it ends in a FINGERPRINT, and where it
    goes out from."""

    head: bytes
    tail: bytes
    fingerprint: bool
    send_from: Address


class BindingResponder:
    """:func:`answer_stun` for one server, with its two commonest requests
    answered without decoding: an RFC 8489 Binding request with no
    attributes (20 bytes) or with only a FINGERPRINT (28 bytes, what
    :func:`~dtx.wire.stun.binding_request` sends), from an IPv4 sender.

    The answer to such a request differs from one sender to the next only
    in the transaction id, XOR-MAPPED-ADDRESS and FINGERPRINT; the rest
    (which optional attributes fit the amplification budget, the address
    to answer from) depends only on the request's size and the receiving
    address. The first time a (size, receiving address) pair is seen, the
    responder answers a sample request through :func:`answer_stun`, keeps
    the parts, and checks that building the same answer from them gives
    the same bytes (if not, that pair always takes the full path). So
    this answers exactly what :func:`answer_stun` does; anything else
    (IPv6, other attributes, a FINGERPRINT that does not match, classic
    requests) goes to :func:`answer_stun`.
    """

    __slots__ = ("_addresses", "_software", "_templates")

    def __init__(self, addresses: ServerAddresses, software: str | None = None) -> None:
        self._addresses = addresses
        self._software = software
        self._templates: dict[tuple[Address, int], _Template | None] = {}

    def answer(self, data: bytes, src: Address, local: Address) -> StunReply | None:
        """What :func:`answer_stun` answers for ``data``."""
        size = len(data)
        if (size == _WITH_FINGERPRINT_BYTES or size == _BARE_BYTES) \
                and data[:2] == _BINDING_HEAD and data[4:8] == _COOKIE and ":" not in src[0]:
            key = (local, size)
            template = self._templates.get(key, _MISSING)
            if template is _MISSING:
                template = self._templates[key] = self._template(local, size)
            if template is not None and self._plain(data, size):
                response = self._build(template, data, src)
                if response is not None:
                    return StunReply(response, template.send_from, src)
        return answer_stun(data, src=src, local=local, addresses=self._addresses,
                           software=self._software)

    @staticmethod
    def _plain(data: bytes, size: int) -> bool:
        """The length field is right and the only attribute, if any, is a
        FINGERPRINT that matches."""
        if size == _BARE_BYTES:
            return data[2:4] == b"\x00\x00"
        return (data[2:4] == b"\x00\x08" and data[20:24] == _FINGERPRINT_HEAD
                and int.from_bytes(data[24:28], "big")
                == zlib.crc32(data[:20]) ^ FINGERPRINT_XOR)

    @staticmethod
    def _build(template: _Template, data: bytes, src: Address) -> bytes | None:
        try:
            ip = socket.inet_aton(src[0])
        except OSError:
            return None
        mapped = (_XOR_MAPPED_IPV4_HEAD
                  + ((src[1] ^ _COOKIE_HIGH) & 0xFFFF).to_bytes(2, "big")
                  + (int.from_bytes(ip, "big") ^ MAGIC_COOKIE).to_bytes(4, "big"))
        response = template.head + data[4:20] + mapped + template.tail
        if template.fingerprint:
            response += _FINGERPRINT_HEAD + (
                zlib.crc32(response) ^ FINGERPRINT_XOR).to_bytes(4, "big")
        return response

    def _template(self, local: Address, size: int) -> _Template | None:
        tid = bytes(range(12))
        sample = binding_request(tid, fingerprint=size == _WITH_FINGERPRINT_BYTES)
        reply = answer_stun(sample, src=_SAMPLE_SRC, local=local, addresses=self._addresses,
                            software=self._software)
        if (len(sample) != size or reply is None or reply.send_to != _SAMPLE_SRC
                or reply.data[:2] != b"\x01\x01"
                or reply.data[20:24] != _XOR_MAPPED_IPV4_HEAD[:4]):
            return None
        fingerprint = reply.data[-8:-4] == _FINGERPRINT_HEAD
        end = len(reply.data) - (_FINGERPRINT_BYTES if fingerprint else 0)
        template = _Template(reply.data[:4], reply.data[32:end], fingerprint, reply.send_from)
        if self._build(template, sample, _SAMPLE_SRC) != reply.data:
            return None  # pragma: no cover - the full path answers instead
        return template


_MISSING = _Template(b"", b"", False, ("", 0))
"""A template not made yet (None: one that cannot be)."""
