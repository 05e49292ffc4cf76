"""NAT-PMP messages (RFC 6886), bytes <-> values.

A pure codec for the two operations a client needs: the external address
(opcode 0, RFC 6886 section 3.2) and a UDP or TCP port mapping (opcodes 1
and 2, section 3.3), which with a lifetime of 0 deletes the mapping
(section 3.4). Requests go to the gateway's port 5351; responses carry the
request's opcode plus 128, a 16-bit result code (section 3.5) and the
gateway's Seconds Since Start of Epoch (section 3.6).

:func:`encode_natpmp` writes any of the message values;
:func:`decode_natpmp_request` (the gateway's side) and
:func:`decode_natpmp_response` (the client's side) read them back and
raise :class:`NatPmpError`, and only that, for anything else: a datagram
shorter or longer than its opcode's fixed size, a version other than 0, a
request where a response was expected (or the reverse), an opcode this
codec does not know. Reserved fields are written as zero and ignored on
reading, as section 3.3 asks.

One short form exists: the 8-byte "Unsupported Version" answer of section
3.5 (version, opcode, result 1, epoch), which a NAT-PMP-only gateway sends
to a PCP request (RFC 6887 section 9). Its opcode is 128 per erratum 3618
and 0 in gateways that followed the original figure; both decode, as
:class:`UnsupportedVersionResponse`.

Result codes are :class:`NatPmpResult` where known; an unknown code decodes
as a plain int, which section 3.5 asks clients to treat as a fatal error
of the request.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from enum import IntEnum

from dtx.errors import DecodeError, LocalProtocolError

__all__ = [
    "ANNOUNCE_PORT",
    "NATPMP_VERSION",
    "RECOMMENDED_LIFETIME",
    "RESPONSE_BIT",
    "SERVER_PORT",
    "ExternalAddressRequest",
    "ExternalAddressResponse",
    "MapRequest",
    "MapResponse",
    "NatPmpError",
    "NatPmpMessage",
    "NatPmpOpcode",
    "NatPmpRequest",
    "NatPmpResponse",
    "NatPmpResult",
    "UnsupportedVersionResponse",
    "decode_natpmp_request",
    "decode_natpmp_response",
    "encode_natpmp",
]

NATPMP_VERSION = 0
SERVER_PORT = 5351
"""Where clients send requests (section 3.1); shared with PCP."""
ANNOUNCE_PORT = 5350
"""Where gateways multicast address announcements (section 3.2.1)."""
RESPONSE_BIT = 0x80
RECOMMENDED_LIFETIME = 7200
"""Section 3.3: the lifetime a client should ask for, in seconds."""

_EXTERNAL_REQUEST_BYTES = 2
_EXTERNAL_RESPONSE_BYTES = 12
_MAP_REQUEST_BYTES = 12
_MAP_RESPONSE_BYTES = 16
_SHORT_RESPONSE_BYTES = 8
_U16 = 0xFFFF
_U32 = 0xFFFFFFFF


class NatPmpError(DecodeError, ValueError):
    """Bytes that are not the NAT-PMP message expected.

    The one error the decoders raise. It is a :class:`~dtx.errors.DecodeError`
    like every dtx decoder's error, and a ``ValueError`` for callers that
    treat malformed input as a bad value.
    """


class NatPmpOpcode(IntEnum):
    """Request opcodes (section 3); a response carries ``opcode + 128``."""

    EXTERNAL_ADDRESS = 0
    MAP_UDP = 1
    MAP_TCP = 2


class NatPmpResult(IntEnum):
    """Result codes (section 3.5)."""

    SUCCESS = 0
    UNSUPPORTED_VERSION = 1
    NOT_AUTHORIZED = 2
    """Not Authorized/Refused: mapping disabled, or a static mapping."""
    NETWORK_FAILURE = 3
    """For example, the gateway has no external address yet."""
    OUT_OF_RESOURCES = 4
    UNSUPPORTED_OPCODE = 5


_MAP_OPCODES = frozenset({NatPmpOpcode.MAP_UDP, NatPmpOpcode.MAP_TCP})
_KNOWN_RESULTS = frozenset(int(r) for r in NatPmpResult)


def _check(name: str, value: int, top: int) -> None:
    if not 0 <= value <= top:
        raise LocalProtocolError(f"NAT-PMP {name} {value} out of range")


def _check_map_opcode(opcode: int) -> None:
    if opcode not in _MAP_OPCODES:
        raise LocalProtocolError(f"NAT-PMP map opcode must be 1 or 2, not {opcode}")


@dataclass(frozen=True)
class ExternalAddressRequest:
    """Section 3.2: what is the gateway's external IPv4 address?"""


@dataclass(frozen=True)
class ExternalAddressResponse:
    """Section 3.2: the gateway's external address.

    ``external_address`` means nothing unless ``result`` is SUCCESS (the
    gateway sets it to 0.0.0.0 when it has none, section 3.2).
    """

    result: int
    epoch: int
    external_address: ipaddress.IPv4Address

    def __post_init__(self) -> None:
        _check("result", self.result, _U16)
        _check("epoch", self.epoch, _U32)


@dataclass(frozen=True)
class MapRequest:
    """Section 3.3: map ``internal_port`` for ``lifetime`` seconds.

    A lifetime of 0 deletes the mapping (section 3.4; the suggested port
    must then be 0); with an internal port of 0 as well, it deletes every
    mapping of this client for the protocol.
    """

    opcode: NatPmpOpcode
    internal_port: int
    suggested_external_port: int
    lifetime: int

    def __post_init__(self) -> None:
        _check_map_opcode(self.opcode)
        _check("internal port", self.internal_port, _U16)
        _check("suggested external port", self.suggested_external_port, _U16)
        _check("lifetime", self.lifetime, _U32)

    @property
    def is_delete(self) -> bool:
        return self.lifetime == 0


@dataclass(frozen=True)
class MapResponse:
    """Section 3.3: the mapping as granted (ports and lifetime 0 on failure)."""

    opcode: NatPmpOpcode
    result: int
    epoch: int
    internal_port: int
    external_port: int
    lifetime: int

    def __post_init__(self) -> None:
        _check_map_opcode(self.opcode)
        _check("result", self.result, _U16)
        _check("epoch", self.epoch, _U32)
        _check("internal port", self.internal_port, _U16)
        _check("external port", self.external_port, _U16)
        _check("lifetime", self.lifetime, _U32)


@dataclass(frozen=True)
class UnsupportedVersionResponse:
    """Section 3.5: the 8-byte answer to a request whose version is not 0.

    ``opcode`` is 128 (erratum 3618) or 0 (gateways that followed the
    original figure).
    """

    epoch: int
    opcode: int = RESPONSE_BIT

    def __post_init__(self) -> None:
        _check("epoch", self.epoch, _U32)
        if self.opcode not in (0, RESPONSE_BIT):
            raise LocalProtocolError(f"Unsupported Version opcode {self.opcode}, not 0 or 128")

    @property
    def result(self) -> int:
        return NatPmpResult.UNSUPPORTED_VERSION


NatPmpRequest = ExternalAddressRequest | MapRequest
NatPmpResponse = ExternalAddressResponse | MapResponse | UnsupportedVersionResponse
NatPmpMessage = NatPmpRequest | NatPmpResponse


def encode_natpmp(msg: NatPmpMessage) -> bytes:
    """The datagram carrying ``msg``; reserved fields are zero."""
    if isinstance(msg, ExternalAddressRequest):
        return bytes((NATPMP_VERSION, NatPmpOpcode.EXTERNAL_ADDRESS))
    if isinstance(msg, MapRequest):
        return struct.pack("!BBHHHI", NATPMP_VERSION, msg.opcode, 0, msg.internal_port,
                           msg.suggested_external_port, msg.lifetime)
    if isinstance(msg, ExternalAddressResponse):
        return struct.pack("!BBHI", NATPMP_VERSION, RESPONSE_BIT | NatPmpOpcode.EXTERNAL_ADDRESS,
                           msg.result, msg.epoch) + msg.external_address.packed
    if isinstance(msg, MapResponse):
        return struct.pack("!BBHIHHI", NATPMP_VERSION, RESPONSE_BIT | msg.opcode, msg.result,
                           msg.epoch, msg.internal_port, msg.external_port, msg.lifetime)
    return struct.pack("!BBHI", NATPMP_VERSION, msg.opcode, NatPmpResult.UNSUPPORTED_VERSION,
                       msg.epoch)


def _header(data: bytes, what: str) -> int:
    """Check the version; return the opcode byte."""
    if len(data) < 2:
        raise NatPmpError(f"NAT-PMP {what} of {len(data)} bytes, shorter than 2")
    if data[0] != NATPMP_VERSION:
        raise NatPmpError(f"version {data[0]}, not NAT-PMP's {NATPMP_VERSION}")
    return data[1]


def _length(data: bytes, want: int, what: str) -> None:
    if len(data) != want:
        raise NatPmpError(f"NAT-PMP {what} of {len(data)} bytes, not {want}")


def _result(value: int) -> int:
    return NatPmpResult(value) if value in _KNOWN_RESULTS else value


def decode_natpmp_request(data: bytes) -> NatPmpRequest:
    """Decode a request (the gateway's side); raise NatPmpError if it is not one."""
    data = bytes(data)
    opcode = _header(data, "request")
    if opcode & RESPONSE_BIT:
        raise NatPmpError(f"opcode {opcode} is a response, not a request")
    if opcode == NatPmpOpcode.EXTERNAL_ADDRESS:
        _length(data, _EXTERNAL_REQUEST_BYTES, "external address request")
        return ExternalAddressRequest()
    if opcode not in _MAP_OPCODES:
        raise NatPmpError(f"unknown NAT-PMP opcode {opcode}")
    _length(data, _MAP_REQUEST_BYTES, "map request")
    _, _, _, internal, suggested, lifetime = struct.unpack("!BBHHHI", data)
    return MapRequest(NatPmpOpcode(opcode), internal, suggested, lifetime)


def decode_natpmp_response(data: bytes) -> NatPmpResponse:
    """Decode a response (the client's side); raise NatPmpError if it is not one.

    Sizes are exact: 12 bytes for the external address, 16 for a mapping,
    8 for the Unsupported Version answer (opcode 128, or 0).
    """
    data = bytes(data)
    opcode = _header(data, "response")
    if len(data) == _SHORT_RESPONSE_BYTES and opcode in (0, RESPONSE_BIT):
        _, _, result, epoch = struct.unpack("!BBHI", data)
        if result == NatPmpResult.UNSUPPORTED_VERSION:
            return UnsupportedVersionResponse(epoch, opcode)
    if not opcode & RESPONSE_BIT:
        raise NatPmpError(f"opcode {opcode} is a request, not a response")
    op = opcode & 0x7F
    if op == NatPmpOpcode.EXTERNAL_ADDRESS:
        _length(data, _EXTERNAL_RESPONSE_BYTES, "external address response")
        _, _, result, epoch = struct.unpack_from("!BBHI", data)
        return ExternalAddressResponse(_result(result), epoch, ipaddress.IPv4Address(data[8:12]))
    if op not in _MAP_OPCODES:
        raise NatPmpError(f"unknown NAT-PMP response opcode {opcode}")
    _length(data, _MAP_RESPONSE_BYTES, "map response")
    _, _, result, epoch, internal, external, lifetime = struct.unpack("!BBHIHHI", data)
    return MapResponse(NatPmpOpcode(op), _result(result), epoch, internal, external, lifetime)
