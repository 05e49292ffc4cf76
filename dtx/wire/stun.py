"""STUN messages (RFC 8489, RFC 5780, and classic RFC 3489), bytes <-> values.

A pure codec: :func:`decode_stun` turns one UDP payload into a
:class:`StunMessage`, :func:`encode_stun` does the reverse. Attributes are
kept as raw ``(type, value)`` pairs in wire order, so a decoded message
re-encodes to the same bytes (MESSAGE-INTEGRITY is carried through untouched
unless ``encode_stun`` is given a key). Typed views of the attributes dtx
cares about are properties of :class:`StunMessage`; values for them are built
with the ``*_attribute`` functions.

Classic RFC 3489 messages have no magic cookie: their transaction id is the
16 bytes after the length field. They are modelled with ``classic=True`` and
a 16-byte ``transaction_id``; a modern (RFC 5389/8489) message has a 12-byte
id and the cookie in between. FINGERPRINT exists only in modern messages.

Decoding is strict about framing (header, lengths, padding room, a trailing
FINGERPRINT that must match) and about the shape of the attributes that have
typed views here (a malformed one makes the message malformed); any other
attribute is carried opaquely. The decoder raises :class:`DecodeError` only.

TURN (RFC 8656) uses the same framing: its methods and attributes are named
here (:class:`StunMethod`, :class:`AttrType`) with typed views on
:class:`StunMessage`; builders of TURN attributes and the ChannelData framing
are in :mod:`dtx.wire.turn`. The long-term credential mechanism of RFC 8489
section 9.2 is split: ``encode_stun(..., key=)`` appends MESSAGE-INTEGRITY
or MESSAGE-INTEGRITY-SHA256 and :func:`check_integrity` verifies them here,
while the key (:func:`dtx.wire.turn.long_term_key`) and the credential
attributes are built in :mod:`dtx.wire.turn`. Decoding never checks
integrity (it has no key); a decoded message keeps the attributes that
follow the integrity attribute, and :meth:`StunMessage.up_to_integrity`
drops them, as RFC 8489 section 14.5 asks a receiver to. The TURN value
checks (XOR-PEER-ADDRESS, XOR-RELAYED-ADDRESS, LIFETIME, CHANNEL-NUMBER,
REQUESTED-TRANSPORT, MESSAGE-INTEGRITY-SHA256, PASSWORD-ALGORITHM(S)) apply
to every method, Binding included.

This file is past the ~800 lines of the style guide on purpose: it is one
type (:class:`StunMessage`) with its typed views as properties, and
integrity is part of encoding it; what can live apart (TURN's builders, the
key, ChannelData) is in :mod:`dtx.wire.turn`.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import struct
import zlib
from dataclasses import dataclass, field
from enum import Enum, IntEnum

from dtx.errors import DecodeError, LocalProtocolError
from .address import Address

__all__ = [
    "MAGIC_COOKIE",
    "FINGERPRINT_XOR",
    "HEADER_BYTES",
    "Address",
    "AttrType",
    "Attribute",
    "ChangeRequest",
    "ErrorCode",
    "Integrity",
    "IntegrityCheck",
    "StunClass",
    "StunMethod",
    "StunMessage",
    "address_attribute",
    "binding_request",
    "change_request_attribute",
    "check_integrity",
    "decode_stun",
    "encode_stun",
    "error_code_attribute",
    "is_stun",
    "response_port_attribute",
    "software_attribute",
    "unknown_attributes_attribute",
    "xor_address_attribute",
]

MAGIC_COOKIE = 0x2112A442
FINGERPRINT_XOR = 0x5354554E  # "STUN"
HEADER_BYTES = 20
_COOKIE_BYTES = MAGIC_COOKIE.to_bytes(4, "big")
_FINGERPRINT_ATTR_BYTES = 8
MAX_SOFTWARE_BYTES = 763  # RFC 8489 section 14.14: fewer than 128 characters
MAX_REASON_BYTES = 763  # RFC 8489 section 14.8
_MI_BYTES = 20
_MI_SHA256_MIN_BYTES = 16
_MI_SHA256_BYTES = 32


class StunClass(IntEnum):
    """The class bits of the message type (RFC 8489 section 5)."""

    REQUEST = 0b00
    INDICATION = 0b01
    SUCCESS = 0b10
    ERROR = 0b11


class StunMethod(IntEnum):
    """Methods dtx knows by name; any other 12-bit method decodes as an int."""

    BINDING = 0x001
    ALLOCATE = 0x003  # RFC 8656 from here on
    REFRESH = 0x004
    SEND = 0x006
    DATA = 0x007
    CREATE_PERMISSION = 0x008
    CHANNEL_BIND = 0x009


class AttrType(IntEnum):
    """Attribute types with a meaning in this codec.

    Types below 0x8000 are comprehension-required: a receiver that does not
    understand one must not act on the message as if it had not been there.
    """

    MAPPED_ADDRESS = 0x0001
    RESPONSE_ADDRESS = 0x0002  # RFC 3489 only
    CHANGE_REQUEST = 0x0003  # RFC 3489, RFC 5780
    SOURCE_ADDRESS = 0x0004  # RFC 3489 only
    CHANGED_ADDRESS = 0x0005  # RFC 3489 only
    USERNAME = 0x0006
    MESSAGE_INTEGRITY = 0x0008
    ERROR_CODE = 0x0009
    UNKNOWN_ATTRIBUTES = 0x000A
    REFLECTED_FROM = 0x000B  # RFC 3489 only
    CHANNEL_NUMBER = 0x000C  # RFC 8656
    LIFETIME = 0x000D  # RFC 8656
    XOR_PEER_ADDRESS = 0x0012  # RFC 8656
    DATA = 0x0013  # RFC 8656
    REALM = 0x0014
    NONCE = 0x0015
    XOR_RELAYED_ADDRESS = 0x0016  # RFC 8656
    REQUESTED_ADDRESS_FAMILY = 0x0017  # RFC 8656
    EVEN_PORT = 0x0018  # RFC 8656
    REQUESTED_TRANSPORT = 0x0019  # RFC 8656
    DONT_FRAGMENT = 0x001A  # RFC 8656
    MESSAGE_INTEGRITY_SHA256 = 0x001C
    PASSWORD_ALGORITHM = 0x001D
    USERHASH = 0x001E
    XOR_MAPPED_ADDRESS = 0x0020
    RESERVATION_TOKEN = 0x0022  # RFC 8656
    PADDING = 0x0026  # RFC 5780
    RESPONSE_PORT = 0x0027  # RFC 5780
    ADDITIONAL_ADDRESS_FAMILY = 0x8000  # RFC 8656
    ADDRESS_ERROR_CODE = 0x8001  # RFC 8656
    PASSWORD_ALGORITHMS = 0x8002
    ALTERNATE_DOMAIN = 0x8003
    ICMP = 0x8004  # RFC 8656
    SOFTWARE = 0x8022
    ALTERNATE_SERVER = 0x8023
    FINGERPRINT = 0x8028
    RESPONSE_ORIGIN = 0x802B  # RFC 5780
    OTHER_ADDRESS = 0x802C  # RFC 5780


class Integrity(Enum):
    """Which integrity attribute a message carries."""

    SHA1 = "MESSAGE-INTEGRITY"
    """HMAC-SHA1, 20 bytes: RFC 5389 servers (coturn) know only this one."""
    SHA256 = "MESSAGE-INTEGRITY-SHA256"
    """HMAC-SHA256, 32 bytes (RFC 8489)."""


class IntegrityCheck(Enum):
    """What :func:`check_integrity` found."""

    ABSENT = "absent"
    VALID = "valid"
    INVALID = "invalid"


_KNOWN_METHODS = frozenset(int(m) for m in StunMethod)
_ADDRESS_TYPES = frozenset(
    {
        AttrType.MAPPED_ADDRESS,
        AttrType.RESPONSE_ADDRESS,
        AttrType.SOURCE_ADDRESS,
        AttrType.CHANGED_ADDRESS,
        AttrType.REFLECTED_FROM,
        AttrType.ALTERNATE_SERVER,
        AttrType.RESPONSE_ORIGIN,
        AttrType.OTHER_ADDRESS,
    }
)
_XOR_ADDRESS_TYPES = frozenset(
    {AttrType.XOR_MAPPED_ADDRESS, AttrType.XOR_PEER_ADDRESS, AttrType.XOR_RELAYED_ADDRESS}
)
_U32_TYPES = frozenset(
    {AttrType.CHANNEL_NUMBER, AttrType.LIFETIME, AttrType.REQUESTED_TRANSPORT}
)
_INTEGRITY_TYPES = frozenset({AttrType.MESSAGE_INTEGRITY, AttrType.MESSAGE_INTEGRITY_SHA256})
_FAMILY_IPV4 = 0x01
_FAMILY_IPV6 = 0x02
_CHANGE_IP = 0x04
_CHANGE_PORT = 0x02


def _pad_len(n: int) -> int:
    return -n % 4


@dataclass(frozen=True)
class Attribute:
    """One attribute as on the wire: its type and its unpadded value.

    ``padding`` remembers the padding bytes a decoded attribute arrived with
    (RFC 8489 lets senders fill them with anything, and RFC 5769's vectors
    use spaces) so that re-encoding reproduces the original bytes; it takes
    no part in equality, and new attributes are padded with zeros.
    """

    type: int
    value: bytes
    padding: bytes = field(default=b"", compare=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 <= self.type <= 0xFFFF:
            raise LocalProtocolError(f"attribute type {self.type} out of range")
        if len(self.value) > 0xFFFF:
            raise LocalProtocolError("attribute value longer than 65535 bytes")

    @property
    def comprehension_required(self) -> bool:
        """Whether a receiver must understand it (type below 0x8000)."""
        return self.type < 0x8000


@dataclass(frozen=True)
class ChangeRequest:
    """CHANGE-REQUEST flags: answer from the other IP and/or the other port."""

    change_ip: bool
    change_port: bool


@dataclass(frozen=True)
class ErrorCode:
    """ERROR-CODE: a code 300..699 and a human-readable reason."""

    code: int
    reason: str


@dataclass(frozen=True)
class StunMessage:
    """One STUN message.

    ``transaction_id`` is 12 bytes for a modern message and 16 bytes (the
    cookie position included) when ``classic`` is true; a classic id that
    begins with the magic cookie is read back as a modern message, as any
    RFC 5389 receiver would. ``method`` is a :class:`StunMethod` where
    known, else the plain 12-bit number.
    """

    method: int
    cls: StunClass
    transaction_id: bytes
    attributes: tuple[Attribute, ...] = ()
    classic: bool = False

    def __post_init__(self) -> None:
        want = 16 if self.classic else 12
        if len(self.transaction_id) != want:
            raise LocalProtocolError(
                f"transaction id must be {want} bytes, got {len(self.transaction_id)}"
            )
        if not 0 <= self.method <= 0xFFF:
            raise LocalProtocolError(f"method {self.method} out of range")

    # -- generic access ---------------------------------------------------

    def attribute(self, attr_type: int) -> Attribute | None:
        """The first attribute of this type, or None."""
        for attr in self.attributes:
            if attr.type == attr_type:
                return attr
        return None

    @property
    def xor_key(self) -> bytes:
        """The 16 bytes an XOR-encoded address is masked with."""
        if self.classic:
            return self.transaction_id
        return _COOKIE_BYTES + self.transaction_id

    def _address(self, attr_type: int) -> Address | None:
        attr = self.attribute(attr_type)
        if attr is None:
            return None
        return _unpack_address(attr.value, None)

    # -- typed views ------------------------------------------------------

    @property
    def xor_mapped_address(self) -> Address | None:
        """XOR-MAPPED-ADDRESS: the client's address as the server saw it."""
        return self._xor_address(AttrType.XOR_MAPPED_ADDRESS)

    @property
    def mapped_address(self) -> Address | None:
        """MAPPED-ADDRESS (RFC 3489's reflexive address, plain)."""
        return self._address(AttrType.MAPPED_ADDRESS)

    @property
    def reflexive_address(self) -> Address | None:
        """XOR-MAPPED-ADDRESS if present, else MAPPED-ADDRESS."""
        return self.xor_mapped_address or self.mapped_address

    @property
    def other_address(self) -> Address | None:
        """OTHER-ADDRESS (RFC 5780): the server's alternate IP and port."""
        return self._address(AttrType.OTHER_ADDRESS)

    @property
    def response_origin(self) -> Address | None:
        """RESPONSE-ORIGIN (RFC 5780): where the response was sent from."""
        return self._address(AttrType.RESPONSE_ORIGIN)

    @property
    def source_address(self) -> Address | None:
        """SOURCE-ADDRESS (RFC 3489): where the response was sent from."""
        return self._address(AttrType.SOURCE_ADDRESS)

    @property
    def changed_address(self) -> Address | None:
        """CHANGED-ADDRESS (RFC 3489): the server's alternate IP and port."""
        return self._address(AttrType.CHANGED_ADDRESS)

    @property
    def change_request(self) -> ChangeRequest | None:
        """CHANGE-REQUEST flags, or None when absent."""
        attr = self.attribute(AttrType.CHANGE_REQUEST)
        if attr is None:
            return None
        return _unpack_change_request(attr.value)

    @property
    def software(self) -> str | None:
        """SOFTWARE: the sender's free-form name and version."""
        attr = self.attribute(AttrType.SOFTWARE)
        if attr is None:
            return None
        return _utf8(attr.value, "SOFTWARE")

    @property
    def error_code(self) -> ErrorCode | None:
        """ERROR-CODE, or None when absent."""
        attr = self.attribute(AttrType.ERROR_CODE)
        if attr is None:
            return None
        return _unpack_error_code(attr.value)

    @property
    def unknown_attributes(self) -> tuple[int, ...] | None:
        """UNKNOWN-ATTRIBUTES: the types a 420 error response lists."""
        attr = self.attribute(AttrType.UNKNOWN_ATTRIBUTES)
        if attr is None:
            return None
        return _unpack_unknown(attr.value)

    @property
    def response_port(self) -> int | None:
        """RESPONSE-PORT (RFC 5780): the client port to send the response to."""
        attr = self.attribute(AttrType.RESPONSE_PORT)
        if attr is None:
            return None
        return _unpack_response_port(attr.value)

    @property
    def has_fingerprint(self) -> bool:
        """Whether the message ended with a (checked) FINGERPRINT."""
        return (
            not self.classic
            and bool(self.attributes)
            and self.attributes[-1].type == AttrType.FINGERPRINT
        )

    # -- TURN (RFC 8656) and credentials (RFC 8489 section 9.2) ---------------

    def _value(self, attr_type: int) -> bytes | None:
        attr = self.attribute(attr_type)
        return None if attr is None else attr.value

    def _xor_address(self, attr_type: int) -> Address | None:
        attr = self.attribute(attr_type)
        if attr is None:
            return None
        return _unpack_address(attr.value, self.xor_key)

    @property
    def xor_relayed_address(self) -> Address | None:
        """XOR-RELAYED-ADDRESS: the allocation's address on the TURN server."""
        return self._xor_address(AttrType.XOR_RELAYED_ADDRESS)

    @property
    def xor_peer_address(self) -> Address | None:
        """The first XOR-PEER-ADDRESS: whom a Send/Data indication or a
        ChannelBind is about."""
        return self._xor_address(AttrType.XOR_PEER_ADDRESS)

    @property
    def xor_peer_addresses(self) -> tuple[Address, ...]:
        """Every XOR-PEER-ADDRESS (a CreatePermission may carry several)."""
        return tuple(
            _unpack_address(a.value, self.xor_key)
            for a in self.attributes
            if a.type == AttrType.XOR_PEER_ADDRESS
        )

    def _u32(self, attr_type: int) -> int | None:
        value = self._value(attr_type)
        return None if value is None else int.from_bytes(value, "big")

    @property
    def lifetime(self) -> int | None:
        """LIFETIME: seconds until an allocation expires unless refreshed."""
        return self._u32(AttrType.LIFETIME)

    @property
    def channel_number(self) -> int | None:
        """CHANNEL-NUMBER: the 16-bit channel (the 16 RFFU bits dropped)."""
        value = self._u32(AttrType.CHANNEL_NUMBER)
        return None if value is None else value >> 16

    @property
    def requested_transport(self) -> int | None:
        """REQUESTED-TRANSPORT: an IP protocol number (17 for UDP)."""
        value = self._u32(AttrType.REQUESTED_TRANSPORT)
        return None if value is None else value >> 24

    @property
    def data(self) -> bytes | None:
        """DATA: the application payload of a Send or Data indication."""
        return self._value(AttrType.DATA)

    @property
    def username(self) -> bytes | None:
        """USERNAME, as the bytes on the wire."""
        return self._value(AttrType.USERNAME)

    @property
    def realm(self) -> bytes | None:
        """REALM, as the bytes on the wire (a client echoes them unchanged)."""
        return self._value(AttrType.REALM)

    @property
    def nonce(self) -> bytes | None:
        """NONCE, as the bytes on the wire (a client echoes them unchanged)."""
        return self._value(AttrType.NONCE)

    @property
    def password_algorithms(self) -> tuple[int, ...] | None:
        """PASSWORD-ALGORITHMS: the algorithms a server offers, in its order."""
        attr = self.attribute(AttrType.PASSWORD_ALGORITHMS)
        if attr is None:
            return None
        return tuple(alg for alg, _ in _unpack_algorithms(attr.value))

    @property
    def password_algorithm(self) -> int | None:
        """PASSWORD-ALGORITHM: the algorithm a client chose."""
        attr = self.attribute(AttrType.PASSWORD_ALGORITHM)
        if attr is None:
            return None
        return _unpack_algorithms(attr.value, single=True)[0][0]

    def up_to_integrity(self) -> StunMessage:
        """This message without the attributes after its first integrity
        attribute, which RFC 8489 section 14.5 tells receivers to ignore
        (MESSAGE-INTEGRITY-SHA256 and FINGERPRINT excepted; they are no
        views of content). Unchanged when it has no integrity attribute."""
        for i, attr in enumerate(self.attributes):
            if attr.type in _INTEGRITY_TYPES:
                return StunMessage(
                    self.method, self.cls, self.transaction_id, self.attributes[: i + 1],
                    self.classic,
                )
        return self


# -- attribute values ----------------------------------------------------------


def _pack_address(addr: Address, key: bytes | None) -> bytes:
    host, port = addr
    try:
        ip = ipaddress.ip_address(host)
    except ValueError as exc:
        raise LocalProtocolError(f"not an IP address: {host!r}") from exc
    if not 0 <= port <= 0xFFFF:
        raise LocalProtocolError(f"port {port} out of range")
    raw = ip.packed
    family = _FAMILY_IPV4 if ip.version == 4 else _FAMILY_IPV6
    if key is not None:
        port ^= int.from_bytes(key[:2], "big")
        raw = bytes(a ^ b for a, b in zip(raw, key))
    return struct.pack("!BBH", 0, family, port) + raw


def _unpack_address(value: bytes, key: bytes | None) -> Address:
    if len(value) < 4:
        raise DecodeError("address attribute shorter than 4 bytes")
    _, family, port = struct.unpack_from("!BBH", value)
    raw = value[4:]
    if family == _FAMILY_IPV4 and len(raw) == 4:
        pass
    elif family == _FAMILY_IPV6 and len(raw) == 16:
        pass
    else:
        raise DecodeError(f"address family {family} with {len(raw)} address bytes")
    if key is not None:
        port ^= int.from_bytes(key[:2], "big")
        raw = bytes(a ^ b for a, b in zip(raw, key))
    return (str(ipaddress.ip_address(raw)), port)


def _unpack_change_request(value: bytes) -> ChangeRequest:
    if len(value) != 4:
        raise DecodeError(f"CHANGE-REQUEST of {len(value)} bytes")
    flags = int.from_bytes(value, "big")
    return ChangeRequest(
        change_ip=bool(flags & _CHANGE_IP), change_port=bool(flags & _CHANGE_PORT)
    )


def _unpack_response_port(value: bytes) -> int:
    if len(value) != 4:
        raise DecodeError(f"RESPONSE-PORT of {len(value)} bytes")
    return int.from_bytes(value[:2], "big")


def _utf8(value: bytes, what: str) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DecodeError(f"{what} is not UTF-8") from exc


def _unpack_error_code(value: bytes) -> ErrorCode:
    if len(value) < 4:
        raise DecodeError("ERROR-CODE shorter than 4 bytes")
    klass = value[2] & 0x07
    number = value[3]
    if not 3 <= klass <= 6 or number > 99:
        raise DecodeError(f"ERROR-CODE class {klass} number {number}")
    if len(value) - 4 > MAX_REASON_BYTES:
        raise DecodeError("ERROR-CODE reason too long")
    return ErrorCode(code=klass * 100 + number, reason=_utf8(value[4:], "ERROR-CODE reason"))


def _unpack_algorithms(value: bytes, *, single: bool = False) -> list[tuple[int, bytes]]:
    """PASSWORD-ALGORITHMS (several) or PASSWORD-ALGORITHM (``single``):
    (algorithm, parameters) pairs, parameters padded to 4 bytes."""
    out: list[tuple[int, bytes]] = []
    offset = 0
    while offset < len(value):
        if len(value) - offset < 4:
            raise DecodeError("truncated password algorithm")
        alg, plen = struct.unpack_from("!HH", value, offset)
        end = offset + 4 + plen
        padded = end + _pad_len(plen)
        if padded > len(value) and not (single and end == len(value)):
            raise DecodeError("password algorithm parameters run past the attribute")
        out.append((alg, value[offset + 4 : end]))
        offset = padded
    if (single and len(out) != 1) or not out:
        raise DecodeError(f"{len(out)} password algorithms where one or more were expected")
    return out


def _unpack_unknown(value: bytes) -> tuple[int, ...]:
    if len(value) % 2:
        raise DecodeError("UNKNOWN-ATTRIBUTES of odd length")
    return tuple(int.from_bytes(value[i : i + 2], "big") for i in range(0, len(value), 2))


def address_attribute(attr_type: int, addr: Address) -> Attribute:
    """A plain address attribute (MAPPED-ADDRESS, OTHER-ADDRESS, ...)."""
    return Attribute(attr_type, _pack_address(addr, None))


def xor_address_attribute(
    addr: Address,
    transaction_id: bytes,
    attr_type: int = AttrType.XOR_MAPPED_ADDRESS,
) -> Attribute:
    """An XOR-encoded address for the message with this transaction id.

    A 12-byte id means a modern message (cookie + id is the mask); a 16-byte
    id means a classic one (the id itself is the mask).
    """
    if len(transaction_id) == 12:
        key = _COOKIE_BYTES + transaction_id
    elif len(transaction_id) == 16:
        key = transaction_id
    else:
        raise LocalProtocolError("transaction id must be 12 or 16 bytes")
    return Attribute(attr_type, _pack_address(addr, key))


def change_request_attribute(*, change_ip: bool, change_port: bool) -> Attribute:
    """CHANGE-REQUEST with the given flags."""
    flags = (_CHANGE_IP if change_ip else 0) | (_CHANGE_PORT if change_port else 0)
    return Attribute(AttrType.CHANGE_REQUEST, flags.to_bytes(4, "big"))


def response_port_attribute(port: int) -> Attribute:
    """RESPONSE-PORT asking for the response on this port of the client."""
    if not 0 <= port <= 0xFFFF:
        raise LocalProtocolError(f"port {port} out of range")
    return Attribute(AttrType.RESPONSE_PORT, port.to_bytes(2, "big") + bytes(2))


def software_attribute(text: str) -> Attribute:
    """SOFTWARE with this text (at most 763 bytes of UTF-8)."""
    raw = text.encode("utf-8")
    if len(raw) > MAX_SOFTWARE_BYTES:
        raise LocalProtocolError("SOFTWARE longer than 763 bytes")
    return Attribute(AttrType.SOFTWARE, raw)


def error_code_attribute(code: int, reason: str) -> Attribute:
    """ERROR-CODE for a code in 300..699."""
    if not 300 <= code <= 699:
        raise LocalProtocolError(f"error code {code} outside 300..699")
    raw = reason.encode("utf-8")
    if len(raw) > MAX_REASON_BYTES:
        raise LocalProtocolError("error reason longer than 763 bytes")
    return Attribute(AttrType.ERROR_CODE, bytes((0, 0, code // 100, code % 100)) + raw)


def unknown_attributes_attribute(types: tuple[int, ...]) -> Attribute:
    """UNKNOWN-ATTRIBUTES listing these attribute types."""
    return Attribute(AttrType.UNKNOWN_ATTRIBUTES, b"".join(t.to_bytes(2, "big") for t in types))


def _integrity_mac(covered: bytes, key: bytes, kind: int) -> bytes:
    digest = hashlib.sha1 if kind == AttrType.MESSAGE_INTEGRITY else hashlib.sha256
    return hmac.new(key, covered, digest).digest()


def check_integrity(data: bytes, key: bytes) -> IntegrityCheck:
    """Verify the integrity attribute of an encoded message with ``key``.

    MESSAGE-INTEGRITY-SHA256 is checked when present, else
    MESSAGE-INTEGRITY (RFC 8489 section 14.6: a receiver uses the strongest
    one it understands); each covers the bytes before it, with the length
    field counting up to its own end. Safe on any bytes (never raises); a
    message that does not decode gives ABSENT or INVALID.
    """
    found: dict[int, tuple[int, bytes]] = {}
    offset = HEADER_BYTES
    end = len(data)
    while offset + 4 <= end:
        attr_type, attr_len = struct.unpack_from("!HH", data, offset)
        if attr_type in _INTEGRITY_TYPES and attr_type not in found:
            value = data[offset + 4 : offset + 4 + attr_len]
            if len(value) != attr_len:
                return IntegrityCheck.INVALID  # runs past the message
            found[attr_type] = (offset, value)
        offset += 4 + attr_len + _pad_len(attr_len)
    kind = next((t for t in (AttrType.MESSAGE_INTEGRITY_SHA256, AttrType.MESSAGE_INTEGRITY)
                 if t in found), None)
    if kind is None:
        return IntegrityCheck.ABSENT
    at, value = found[kind]
    if kind == AttrType.MESSAGE_INTEGRITY:
        ok_len = len(value) == _MI_BYTES
    else:
        ok_len = _MI_SHA256_MIN_BYTES <= len(value) <= _MI_SHA256_BYTES and not len(value) % 4
    if not ok_len:
        return IntegrityCheck.INVALID
    covered = data[:2] + (at - HEADER_BYTES + 4 + len(value)).to_bytes(2, "big") + data[4:at]
    mac = _integrity_mac(covered, key, kind)[: len(value)]
    return IntegrityCheck.VALID if hmac.compare_digest(mac, value) else IntegrityCheck.INVALID


# -- messages ------------------------------------------------------------------


def _message_type(method: int, cls: int) -> int:
    return (
        (method & 0x000F)
        | ((method & 0x0070) << 1)
        | ((method & 0x0F80) << 2)
        | ((cls & 0b01) << 4)
        | ((cls & 0b10) << 7)
    )


def _split_type(msg_type: int) -> tuple[int, StunClass]:
    method = (msg_type & 0x000F) | ((msg_type >> 1) & 0x0070) | ((msg_type >> 2) & 0x0F80)
    cls = StunClass(((msg_type >> 4) & 0b01) | ((msg_type >> 7) & 0b10))
    return method, cls


def _fingerprint(data: bytes) -> bytes:
    return ((zlib.crc32(data) ^ FINGERPRINT_XOR) & 0xFFFFFFFF).to_bytes(4, "big")


def is_stun(data: bytes) -> bool:
    """Cheap check that ``data`` is framed like a STUN message.

    True when the first two bits are zero, the datagram holds at least a
    header, and the length field (a multiple of 4) accounts for the rest
    exactly. Classic RFC 3489 messages pass too (no cookie is required);
    use ``data[4:8]`` to tell them apart. Attributes are not looked at.
    """
    if len(data) < HEADER_BYTES or data[0] & 0xC0:
        return False
    length = int.from_bytes(data[2:4], "big")
    return length % 4 == 0 and length == len(data) - HEADER_BYTES


def _check_value(attr_type: int, value: bytes, classic: bool, key: bytes) -> None:
    """Raise DecodeError when a known attribute's value is malformed."""
    if attr_type in _ADDRESS_TYPES:
        _unpack_address(value, None)
    elif attr_type in _XOR_ADDRESS_TYPES:
        _unpack_address(value, key)
    elif attr_type == AttrType.CHANGE_REQUEST:
        _unpack_change_request(value)
    elif attr_type == AttrType.RESPONSE_PORT:
        _unpack_response_port(value)
    elif attr_type == AttrType.ERROR_CODE:
        _unpack_error_code(value)
    elif attr_type == AttrType.UNKNOWN_ATTRIBUTES:
        _unpack_unknown(value)
    elif attr_type == AttrType.SOFTWARE:
        if len(value) > MAX_SOFTWARE_BYTES:
            raise DecodeError("SOFTWARE longer than 763 bytes")
        _utf8(value, "SOFTWARE")
    elif attr_type == AttrType.MESSAGE_INTEGRITY:
        if len(value) != _MI_BYTES:
            raise DecodeError(f"MESSAGE-INTEGRITY of {len(value)} bytes")
    elif attr_type == AttrType.MESSAGE_INTEGRITY_SHA256:
        # RFC 8489 section 14.6: 16 to 32 bytes, a multiple of 4
        if not _MI_SHA256_MIN_BYTES <= len(value) <= _MI_SHA256_BYTES or len(value) % 4:
            raise DecodeError(f"MESSAGE-INTEGRITY-SHA256 of {len(value)} bytes")
    elif attr_type in _U32_TYPES:
        if len(value) != 4:
            raise DecodeError(f"attribute 0x{attr_type:04x} of {len(value)} bytes, not 4")
    elif attr_type in (AttrType.PASSWORD_ALGORITHMS, AttrType.PASSWORD_ALGORITHM):
        _unpack_algorithms(value, single=attr_type == AttrType.PASSWORD_ALGORITHM)
    elif attr_type == AttrType.FINGERPRINT and not classic:
        if len(value) != 4:
            raise DecodeError(f"FINGERPRINT of {len(value)} bytes")


def decode_stun(data: bytes) -> StunMessage:
    """Decode one whole STUN message; raise DecodeError if it is not one.

    Checks: header framing (see :func:`is_stun`), that attributes and their
    padding fill the body exactly, that a FINGERPRINT (modern messages only)
    is the last attribute and matches, and the shape of the known
    attributes.
    """
    data = bytes(data)
    if len(data) < HEADER_BYTES:
        raise DecodeError(f"STUN message of {len(data)} bytes, shorter than a header")
    msg_type, length = struct.unpack_from("!HH", data)
    if msg_type & 0xC000:
        raise DecodeError("first two bits of a STUN message must be zero")
    if length % 4:
        raise DecodeError(f"STUN length {length} is not a multiple of 4")
    if length != len(data) - HEADER_BYTES:
        raise DecodeError(
            f"STUN length field says {length}, datagram carries {len(data) - HEADER_BYTES}"
        )
    classic = data[4:8] != _COOKIE_BYTES
    transaction_id = data[4:20] if classic else data[8:20]
    key = data[4:20]
    method, cls = _split_type(msg_type)
    attributes: list[Attribute] = []
    offset = HEADER_BYTES
    end = len(data)
    while offset < end:
        if end - offset < 4:
            raise DecodeError("truncated attribute header")
        attr_type, attr_len = struct.unpack_from("!HH", data, offset)
        value_start = offset + 4
        value_end = value_start + attr_len
        padded_end = value_end + _pad_len(attr_len)
        if padded_end > end:
            raise DecodeError(f"attribute 0x{attr_type:04x} runs past the message")
        value = data[value_start:value_end]
        if attr_type == AttrType.FINGERPRINT and not classic:
            if padded_end != end:
                raise DecodeError("FINGERPRINT is not the last attribute")
            _check_value(attr_type, value, classic, key)
            if _fingerprint(data[:offset]) != value:
                raise DecodeError("FINGERPRINT does not match")
        else:
            _check_value(attr_type, value, classic, key)
        attributes.append(Attribute(attr_type, value, data[value_end:padded_end]))
        offset = padded_end
    known_method: int = StunMethod(method) if method in _KNOWN_METHODS else method
    return StunMessage(
        method=known_method,
        cls=cls,
        transaction_id=transaction_id,
        attributes=tuple(attributes),
        classic=classic,
    )


def encode_stun(
    msg: StunMessage,
    *,
    fingerprint: bool = True,
    key: bytes | None = None,
    integrity: Integrity = Integrity.SHA1,
) -> bytes:
    """Encode a message.

    Any FINGERPRINT in ``msg.attributes`` is dropped and, when
    ``fingerprint`` is true and the message is modern, a fresh one is
    appended last. Classic messages never get one (RFC 3489 has none).

    With ``key`` (modern messages only), integrity attributes in
    ``msg.attributes`` are dropped too, and a fresh MESSAGE-INTEGRITY (or
    MESSAGE-INTEGRITY-SHA256, per ``integrity``) is appended after the other
    attributes, before the FINGERPRINT. Without a key, integrity attributes
    are carried as they are.
    """
    parts: list[bytes] = []
    for attr in msg.attributes:
        if attr.type == AttrType.FINGERPRINT and not msg.classic:
            continue
        if key is not None and attr.type in _INTEGRITY_TYPES:
            continue
        pad = _pad_len(len(attr.value))
        padding = attr.padding if len(attr.padding) == pad else bytes(pad)
        parts.append(struct.pack("!HH", attr.type, len(attr.value)) + attr.value + padding)
    body = b"".join(parts)
    msg_type = _message_type(msg.method, msg.cls)
    tail = msg.transaction_id if msg.classic else _COOKIE_BYTES + msg.transaction_id
    add_fp = fingerprint and not msg.classic
    if key is not None:
        if msg.classic:
            raise LocalProtocolError("a classic RFC 3489 message carries no integrity")
        kind = (AttrType.MESSAGE_INTEGRITY if integrity is Integrity.SHA1
                else AttrType.MESSAGE_INTEGRITY_SHA256)
        mac_len = _MI_BYTES if integrity is Integrity.SHA1 else _MI_SHA256_BYTES
        if len(body) + 4 + mac_len > 0xFFFF:
            raise LocalProtocolError("STUN message longer than 65535 bytes")
        covered = struct.pack("!HH", msg_type, len(body) + 4 + mac_len) + tail + body
        body += struct.pack("!HH", kind, mac_len) + _integrity_mac(covered, key, kind)
    length = len(body) + (_FINGERPRINT_ATTR_BYTES if add_fp else 0)
    if length > 0xFFFF:
        raise LocalProtocolError("STUN message longer than 65535 bytes")
    out = struct.pack("!HH", msg_type, length) + tail + body
    if add_fp:
        out += struct.pack("!HH", AttrType.FINGERPRINT, 4) + _fingerprint(out)
    return out


def binding_request(
    transaction_id: bytes,
    *,
    change_ip: bool = False,
    change_port: bool = False,
    fingerprint: bool = True,
) -> bytes:
    """A Binding request, modern (12-byte id) or classic (16-byte id).

    CHANGE-REQUEST is included only when a flag is set. The FINGERPRINT
    (modern only) also makes the request big enough that an RFC 5780
    server's full IPv4 answer stays within its 3x amplification budget.
    """
    classic = len(transaction_id) == 16
    attrs: tuple[Attribute, ...] = ()
    if change_ip or change_port:
        attrs = (change_request_attribute(change_ip=change_ip, change_port=change_port),)
    msg = StunMessage(
        method=StunMethod.BINDING,
        cls=StunClass.REQUEST,
        transaction_id=transaction_id,
        attributes=attrs,
        classic=classic,
    )
    return encode_stun(msg, fingerprint=fingerprint)
