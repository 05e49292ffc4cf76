"""PCP messages (RFC 6887), bytes <-> values.

A pure codec for the Port Control Protocol's common request and response
headers (RFC 6887 sections 7.1 and 7.2), its options (section 7.3), and
the two opcodes a port-mapping client needs: MAP (section 11.1), with its
96-bit mapping nonce, and ANNOUNCE (section 14.1), which has no
opcode-specific data and asks a server whether it is there at all. PEER
(section 12) is not modelled: it decodes as an unsupported opcode.

Addresses are ``ipaddress`` values. PCP carries every address in 128 bits,
IPv4 ones as IPv4-mapped IPv6 (``::ffff:a.b.c.d``, section 5): encoding
maps an :class:`~ipaddress.IPv4Address`, decoding unmaps one, so
``::ffff:0.0.0.0`` (section 11.1's "no preference" for IPv4) reads back
as ``0.0.0.0`` and ``::`` as ``::``.

Framing (section 7): a message is at least the 24-byte header, at most
1100 bytes, a multiple of 4; the opcode-specific data has its opcode's
fixed size; options follow, each a code, a reserved byte, a 16-bit length
and data zero-padded to 4 bytes (the length counts the data only), and
they fill the rest exactly. A response with a result other than SUCCESS
may be the bare header (a server that cannot read a request has nothing
to copy back). Reserved fields are written as zero and ignored on reading.

Options (section 7.3) are kept as raw :class:`PcpOption` values in wire
order, so a decoded message re-encodes to the same bytes. THIRD_PARTY,
PREFER_FAILURE and FILTER have a fixed size, checked in both directions.
Unknown options are where the RFC makes requests and responses differ:
in a *request*, an unknown optional-to-process option (code 128 and up)
is carried and not acted on, while an unknown mandatory-to-process one
(below 128) makes the request undecodable (the server answers
UNSUPP_OPTION); a *response*'s unknown options are carried whatever their
code, because section 7.3 has clients ignore options they do not
understand, mandatory ones included.

The decoders raise :class:`PcpError`, and only that; its ``result`` is the
code a server would answer the bytes with (MALFORMED_REQUEST,
UNSUPP_VERSION, UNSUPP_OPCODE, UNSUPP_OPTION or MALFORMED_OPTION).

PCP shares port 5351 with NAT-PMP (RFC 6886), whose version is 0: a
NAT-PMP-only gateway answers a PCP request with its own 8-byte
"Unsupported Version" response (RFC 6887 section 9, RFC 6886 section
3.5). :func:`classify_answer` tells from a datagram's first four bytes
which protocol an answer on the client's port is, and whether it is that
refusal.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from enum import Enum, IntEnum

from dtx.errors import DecodeError, LocalProtocolError
from .natpmp import NATPMP_VERSION, NatPmpResult

__all__ = [
    "HEADER_BYTES",
    "MAP_BYTES",
    "MAX_MESSAGE_BYTES",
    "NONCE_BYTES",
    "PCP_VERSION",
    "AnswerKind",
    "IPAddress",
    "PcpError",
    "PcpMap",
    "PcpOpcode",
    "PcpOption",
    "PcpOptionCode",
    "PcpRequest",
    "PcpResponse",
    "PcpResult",
    "announce_request",
    "classify_answer",
    "decode_pcp_request",
    "decode_pcp_response",
    "encode_pcp",
    "filter_option",
    "prefer_failure_option",
    "third_party_option",
    "unspecified_address",
]

PCP_VERSION = 2
HEADER_BYTES = 24
MAP_BYTES = 36
MAX_MESSAGE_BYTES = 1100
NONCE_BYTES = 12
_RESPONSE_BIT = 0x80
_OPTION_HEADER_BYTES = 4
_FIRST_OPTIONAL_CODE = 128
_THIRD_PARTY_BYTES = 16
_FILTER_BYTES = 20
_U16 = 0xFFFF
_U32 = 0xFFFFFFFF

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class PcpResult(IntEnum):
    """Result codes (section 7.4)."""

    SUCCESS = 0
    UNSUPP_VERSION = 1
    NOT_AUTHORIZED = 2
    MALFORMED_REQUEST = 3
    UNSUPP_OPCODE = 4
    UNSUPP_OPTION = 5
    MALFORMED_OPTION = 6
    NETWORK_FAILURE = 7
    NO_RESOURCES = 8
    UNSUPP_PROTOCOL = 9
    USER_EX_QUOTA = 10
    CANNOT_PROVIDE_EXTERNAL = 11
    ADDRESS_MISMATCH = 12
    EXCESSIVE_REMOTE_PEERS = 13


class PcpError(DecodeError, ValueError):
    """Bytes that are not the PCP message expected.

    The one error the decoders raise (a :class:`~dtx.errors.DecodeError`,
    and a ``ValueError``). ``result`` is the code a PCP server would answer
    such a request with.
    """

    def __init__(self, message: str, result: PcpResult = PcpResult.MALFORMED_REQUEST) -> None:
        super().__init__(message)
        self.result = result


class PcpOpcode(IntEnum):
    """Opcodes (section 19.2); a response has the R bit (0x80) set as well."""

    ANNOUNCE = 0
    MAP = 1
    PEER = 2


class PcpOptionCode(IntEnum):
    """Options defined by RFC 6887 (section 13); all mandatory-to-process."""

    THIRD_PARTY = 1
    PREFER_FAILURE = 2
    FILTER = 3


class AnswerKind(Enum):
    """What :func:`classify_answer` found on the client's port."""

    NATPMP = "nat-pmp"
    """Version 0: a NAT-PMP response."""
    PCP = "pcp"
    """Version 2 with the R bit: a PCP response."""
    PCP_UNSUPPORTED = "pcp-unsupported"
    """Version 0 with result 1 (Unsupported Version): a NAT-PMP-only
    gateway's answer to a PCP request. A NAT-PMP client sends only version
    0, which no gateway refuses that way."""
    UNKNOWN = "unknown"


_OPCODE_DATA_BYTES = {PcpOpcode.ANNOUNCE: 0, PcpOpcode.MAP: MAP_BYTES}
_KNOWN_RESULTS = frozenset(int(r) for r in PcpResult)
_KNOWN_OPTIONS = frozenset(int(o) for o in PcpOptionCode)
_OPTION_BYTES = {
    PcpOptionCode.THIRD_PARTY: _THIRD_PARTY_BYTES,
    PcpOptionCode.PREFER_FAILURE: 0,
    PcpOptionCode.FILTER: _FILTER_BYTES,
}
_ONCE_ONLY = frozenset({PcpOptionCode.THIRD_PARTY, PcpOptionCode.PREFER_FAILURE})
_MAPPED_PREFIX = ipaddress.IPv6Address("::ffff:0:0").packed[:12]


def _check(name: str, value: int, top: int) -> None:
    if not 0 <= value <= top:
        raise LocalProtocolError(f"PCP {name} {value} out of range")


def _pack_address(addr: IPAddress) -> bytes:
    if isinstance(addr, ipaddress.IPv4Address):
        return _MAPPED_PREFIX + addr.packed
    return addr.packed


def _unpack_address(raw: bytes) -> IPAddress:
    if raw[:12] == _MAPPED_PREFIX:
        return ipaddress.IPv4Address(raw[12:])
    return ipaddress.IPv6Address(raw)


def unspecified_address(family_of: IPAddress) -> IPAddress:
    """Section 11.1's "no preference" address of ``family_of``'s family."""
    if isinstance(family_of, ipaddress.IPv4Address):
        return ipaddress.IPv4Address(0)
    return ipaddress.IPv6Address(0)


@dataclass(frozen=True)
class PcpOption:
    """One option as on the wire: its code and its unpadded data."""

    code: int
    data: bytes = b""

    def __post_init__(self) -> None:
        _check("option code", self.code, 0xFF)
        if len(self.data) > MAX_MESSAGE_BYTES - HEADER_BYTES - _OPTION_HEADER_BYTES:
            raise LocalProtocolError("PCP option data longer than a message can carry")

    @property
    def mandatory(self) -> bool:
        """Mandatory-to-process (codes 0..127, section 7.3)."""
        return self.code < _FIRST_OPTIONAL_CODE


@dataclass(frozen=True)
class PcpMap:
    """The MAP opcode's data (section 11.1): in a request, the suggested
    external port and address; in a response, the assigned ones.

    ``protocol`` is an IANA protocol number (17 UDP, 6 TCP; 0 all, with
    internal port 0). ``nonce`` is the 12 random bytes that tie responses,
    renewals and the delete to the mapping (section 11.2).
    """

    nonce: bytes
    protocol: int
    internal_port: int
    external_port: int
    external_address: IPAddress

    def __post_init__(self) -> None:
        if len(self.nonce) != NONCE_BYTES:
            raise LocalProtocolError(f"PCP nonce must be {NONCE_BYTES} bytes, not {len(self.nonce)}")
        _check("protocol", self.protocol, 0xFF)
        _check("internal port", self.internal_port, _U16)
        _check("external port", self.external_port, _U16)


def _check_body(opcode: int, body: PcpMap | None, *, bare_ok: bool) -> None:
    if opcode not in _OPCODE_DATA_BYTES:
        raise LocalProtocolError(f"PCP opcode {opcode} is not modelled (ANNOUNCE and MAP are)")
    if opcode == PcpOpcode.MAP and body is None and not bare_ok:
        raise LocalProtocolError("a MAP message needs its MAP data")
    if opcode == PcpOpcode.ANNOUNCE and body is not None:
        raise LocalProtocolError("ANNOUNCE carries no MAP data")


@dataclass(frozen=True)
class PcpRequest:
    """A request (section 7.1). ``client_address`` is the source address
    the client sends from; ``lifetime`` the requested lifetime in seconds
    (0 deletes a mapping, and is what ANNOUNCE sends)."""

    opcode: PcpOpcode
    lifetime: int
    client_address: IPAddress
    map: PcpMap | None = None
    options: tuple[PcpOption, ...] = ()

    def __post_init__(self) -> None:
        _check("lifetime", self.lifetime, _U32)
        _check_body(self.opcode, self.map, bare_ok=False)


@dataclass(frozen=True)
class PcpResponse:
    """A response (section 7.2). ``result`` is a :class:`PcpResult` where
    known; ``lifetime`` is the granted one on success and, on an error,
    how long the error is expected to last (section 7.4). ``map`` may be
    None in an error response that is the bare header."""

    opcode: PcpOpcode
    result: int
    lifetime: int
    epoch: int
    map: PcpMap | None = None
    options: tuple[PcpOption, ...] = ()

    def __post_init__(self) -> None:
        _check("result", self.result, 0xFF)
        _check("lifetime", self.lifetime, _U32)
        _check("epoch", self.epoch, _U32)
        _check_body(self.opcode, self.map, bare_ok=self.result != PcpResult.SUCCESS)


def third_party_option(address: IPAddress) -> PcpOption:
    """THIRD_PARTY (section 13.1): the request is for this internal host."""
    return PcpOption(PcpOptionCode.THIRD_PARTY, _pack_address(address))


def prefer_failure_option() -> PcpOption:
    """PREFER_FAILURE (section 13.2): fail rather than assign another port."""
    return PcpOption(PcpOptionCode.PREFER_FAILURE)


def filter_option(prefix_length: int, peer_port: int, peer_address: IPAddress) -> PcpOption:
    """FILTER (section 13.3): only this remote prefix (and port; 0 = any)."""
    _check("filter prefix length", prefix_length, 128)
    _check("filter peer port", peer_port, _U16)
    return PcpOption(PcpOptionCode.FILTER,
                     struct.pack("!BBH", 0, prefix_length, peer_port) + _pack_address(peer_address))


def announce_request(client_address: IPAddress) -> PcpRequest:
    """An ANNOUNCE request (lifetime 0): is a PCP server there?"""
    return PcpRequest(PcpOpcode.ANNOUNCE, 0, client_address)


# -- encoding -------------------------------------------------------------------


def _pack_map(body: PcpMap) -> bytes:
    return (body.nonce + struct.pack("!B3xHH", body.protocol, body.internal_port,
                                     body.external_port)
            + _pack_address(body.external_address))


def _pack_options(options: tuple[PcpOption, ...]) -> bytes:
    out = bytearray()
    for opt in options:
        out += struct.pack("!BxH", opt.code, len(opt.data)) + opt.data + bytes(-len(opt.data) % 4)
    return bytes(out)


def encode_pcp(msg: PcpRequest | PcpResponse) -> bytes:
    """The datagram carrying ``msg``; reserved fields and padding are zero."""
    if isinstance(msg, PcpRequest):
        head = struct.pack("!BBHI", PCP_VERSION, msg.opcode, 0, msg.lifetime) \
            + _pack_address(msg.client_address)
    else:
        head = struct.pack("!BBxBII12x", PCP_VERSION, _RESPONSE_BIT | msg.opcode, msg.result,
                           msg.lifetime, msg.epoch)
    out = head + (b"" if msg.map is None else _pack_map(msg.map)) + _pack_options(msg.options)
    if len(out) > MAX_MESSAGE_BYTES:
        raise LocalProtocolError(f"PCP message of {len(out)} bytes, more than {MAX_MESSAGE_BYTES}")
    return out


# -- decoding -------------------------------------------------------------------


def _frame(data: bytes, response: bool) -> int:
    """Check size, version and the R bit; return the opcode (7 bits)."""
    if len(data) < HEADER_BYTES:
        raise PcpError(f"PCP message of {len(data)} bytes, shorter than the header")
    if len(data) > MAX_MESSAGE_BYTES:
        raise PcpError(f"PCP message of {len(data)} bytes, more than {MAX_MESSAGE_BYTES}")
    if len(data) % 4:
        raise PcpError(f"PCP message of {len(data)} bytes, not a multiple of 4")
    if data[0] != PCP_VERSION:
        raise PcpError(f"version {data[0]}, not PCP's {PCP_VERSION}", PcpResult.UNSUPP_VERSION)
    if bool(data[1] & _RESPONSE_BIT) is not response:
        raise PcpError("a response where a request was expected" if not response
                       else "a request where a response was expected")
    return data[1] & 0x7F


def _opcode(value: int) -> PcpOpcode:
    if value not in _OPCODE_DATA_BYTES:
        raise PcpError(f"unsupported PCP opcode {value}", PcpResult.UNSUPP_OPCODE)
    return PcpOpcode(value)


def _unpack_map(data: bytes, at: int) -> PcpMap:
    nonce = data[at : at + NONCE_BYTES]
    protocol, internal, external = struct.unpack_from("!B3xHH", data, at + NONCE_BYTES)
    return PcpMap(nonce, protocol, internal, external, _unpack_address(data[at + 20 : at + 36]))


def _unpack_options(data: bytes, at: int, *, request: bool) -> tuple[PcpOption, ...]:
    options: list[PcpOption] = []
    seen: set[int] = set()
    while at < len(data):
        if len(data) - at < _OPTION_HEADER_BYTES:
            raise PcpError("truncated PCP option header", PcpResult.MALFORMED_OPTION)
        code, length = struct.unpack_from("!BxH", data, at)
        start = at + _OPTION_HEADER_BYTES
        end = start + length
        if end + (-length % 4) > len(data):
            raise PcpError(f"PCP option {code} runs past the message", PcpResult.MALFORMED_OPTION)
        if code in _KNOWN_OPTIONS:
            want = _OPTION_BYTES[PcpOptionCode(code)]
            if length != want:
                raise PcpError(f"PCP option {code} of {length} bytes, not {want}",
                               PcpResult.MALFORMED_OPTION)
            if request and code in _ONCE_ONLY and code in seen:
                raise PcpError(f"PCP option {code} more than once", PcpResult.MALFORMED_OPTION)
        elif request and code < _FIRST_OPTIONAL_CODE:
            raise PcpError(f"unknown mandatory-to-process PCP option {code}",
                           PcpResult.UNSUPP_OPTION)
        seen.add(code)
        options.append(PcpOption(code, data[start:end]))
        at = end + (-length % 4)
    return tuple(options)


def decode_pcp_request(data: bytes) -> PcpRequest:
    """Decode a request (the server's side); raise PcpError if it is not one."""
    data = bytes(data)
    opcode = _opcode(_frame(data, response=False))
    lifetime = int.from_bytes(data[4:8], "big")
    client = _unpack_address(data[8:24])
    size = _OPCODE_DATA_BYTES[opcode]
    if len(data) < HEADER_BYTES + size:
        raise PcpError(f"PCP {opcode.name} request without its {size} bytes of data")
    body = _unpack_map(data, HEADER_BYTES) if opcode == PcpOpcode.MAP else None
    options = _unpack_options(data, HEADER_BYTES + size, request=True)
    return PcpRequest(opcode, lifetime, client, body, options)


def decode_pcp_response(data: bytes) -> PcpResponse:
    """Decode a response (the client's side); raise PcpError if it is not one."""
    data = bytes(data)
    opcode = _opcode(_frame(data, response=True))
    result = data[3]
    lifetime, epoch = struct.unpack_from("!II", data, 4)
    known: int = PcpResult(result) if result in _KNOWN_RESULTS else result
    size = _OPCODE_DATA_BYTES[opcode]
    if len(data) == HEADER_BYTES and size and result != PcpResult.SUCCESS:
        return PcpResponse(opcode, known, lifetime, epoch)
    if len(data) < HEADER_BYTES + size:
        raise PcpError(f"PCP {opcode.name} response without its {size} bytes of data")
    body = _unpack_map(data, HEADER_BYTES) if opcode == PcpOpcode.MAP else None
    options = _unpack_options(data, HEADER_BYTES + size, request=False)
    return PcpResponse(opcode, known, lifetime, epoch, body, options)


def classify_answer(data: bytes) -> AnswerKind:
    """Which protocol a datagram from the gateway's port 5351 speaks.

    Reads the first four bytes only (version; for PCP the R bit; for
    NAT-PMP the 16-bit result code): a decoder still has to confirm it.
    Never raises.
    """
    if len(data) < 4:
        return AnswerKind.UNKNOWN
    if data[0] == NATPMP_VERSION:
        if int.from_bytes(data[2:4], "big") == NatPmpResult.UNSUPPORTED_VERSION:
            return AnswerKind.PCP_UNSUPPORTED
        return AnswerKind.NATPMP
    if data[0] == PCP_VERSION and data[1] & _RESPONSE_BIT:
        return AnswerKind.PCP
    return AnswerKind.UNKNOWN
