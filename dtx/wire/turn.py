"""TURN (RFC 8656) on the wire: ChannelData framing, TURN attributes and the
long-term credential key (RFC 8489 section 9.2).

TURN messages are STUN messages (:mod:`dtx.wire.stun` encodes, decodes and
checks their integrity; :class:`~dtx.wire.stun.StunMessage` has the typed
views: ``xor_relayed_address``, ``lifetime``, ``nonce`` ...). This module
adds what is TURN's own:

- **ChannelData** (RFC 8656 section 12.4): ``channel u16 | length u16 |
  data``, channel 0x4000..0x4FFF, so the first byte is 64..79, the range RFC
  9443 keeps for TURN channels. Over UDP the sender may pad to 4 bytes;
  :func:`encode_channel_data` pads only when asked, and
  :func:`decode_channel_data` accepts a datagram with or without padding.
- builders of the TURN attributes a client sends, and of the credential
  attributes (USERNAME, REALM, NONCE, PASSWORD-ALGORITHM);
- :func:`long_term_key`, the key MESSAGE-INTEGRITY is computed with.

Every decoder raises :class:`~dtx.errors.DecodeError` only.
"""

from __future__ import annotations

import hashlib
import struct
import unicodedata
from dataclasses import dataclass
from enum import IntEnum

from dtx.errors import DecodeError, LocalProtocolError
from dtx.wire.stun import Address, Attribute, AttrType, xor_address_attribute

__all__ = [
    "CHANNEL_DATA_HEADER_BYTES",
    "CHANNEL_MAX",
    "CHANNEL_MIN",
    "NONCE_COOKIE",
    "UDP_PROTOCOL",
    "ChannelData",
    "PasswordAlgorithm",
    "channel_number_attribute",
    "data_attribute",
    "decode_channel_data",
    "encode_channel_data",
    "is_channel_data",
    "lifetime_attribute",
    "long_term_key",
    "nonce_attribute",
    "password_algorithm_attribute",
    "password_algorithms_attribute",
    "peer_address_attribute",
    "realm_attribute",
    "relayed_address_attribute",
    "requested_transport_attribute",
    "username_attribute",
]

CHANNEL_MIN = 0x4000
CHANNEL_MAX = 0x4FFF
"""Channel numbers a client may bind (RFC 8656 section 12); 0x5000..0xFFFF
are reserved, and a ChannelData message on one is dropped."""
CHANNEL_DATA_HEADER_BYTES = 4
UDP_PROTOCOL = 17
"""REQUESTED-TRANSPORT for a UDP allocation, the only kind dtx asks for."""
MAX_USERNAME_BYTES = 512  # RFC 8489 section 14.3: less than 513 bytes
MAX_REALM_BYTES = 763  # RFC 8489 section 14.9
MAX_NONCE_BYTES = 763  # RFC 8489 section 14.10
NONCE_COOKIE = b"obMatJos2"
"""RFC 8489 section 9.2: a NONCE that begins with this announces the
server's security features (PASSWORD-ALGORITHMS among them)."""


class PasswordAlgorithm(IntEnum):
    """PASSWORD-ALGORITHM values (RFC 8489 section 18.5): how the long-term
    key is hashed from username, realm and password."""

    MD5 = 0x0001
    SHA256 = 0x0002


# -- ChannelData ------------------------------------------------------------------


@dataclass(frozen=True)
class ChannelData:
    """One ChannelData message: a payload on a bound channel."""

    channel: int
    data: bytes


def is_channel_data(data: bytes) -> bool:
    """Whether the first byte is in 64..79, ChannelData's range (RFC 9443).

    QUIC uses that range too: only datagrams from the TURN server's address
    are ChannelData (``docs/protocol.md``, TURN).
    """
    return bool(data) and 0x40 <= data[0] <= 0x4F


def encode_channel_data(channel: int, data: bytes, *, pad: bool = False) -> bytes:
    """ChannelData carrying ``data`` on ``channel``; ``pad`` adds zeros up
    to a multiple of 4 bytes (needed over TCP, optional over UDP)."""
    if not CHANNEL_MIN <= channel <= CHANNEL_MAX:
        raise LocalProtocolError(f"channel 0x{channel:04x} outside 0x4000..0x4FFF")
    if len(data) > 0xFFFF:
        raise LocalProtocolError("ChannelData longer than 65535 bytes")
    out = struct.pack("!HH", channel, len(data)) + data
    if pad:
        out += bytes(-len(data) % 4)
    return out


def decode_channel_data(data: bytes) -> ChannelData:
    """Decode one ChannelData datagram; DecodeError when it is not one.

    Refused: fewer than 4 bytes, a channel outside 0x4000..0x4FFF, a length
    longer than what follows, or more trailing bytes than the padding to 4.
    """
    if len(data) < CHANNEL_DATA_HEADER_BYTES:
        raise DecodeError(f"ChannelData of {len(data)} bytes, shorter than its header")
    channel, length = struct.unpack_from("!HH", data)
    if not CHANNEL_MIN <= channel <= CHANNEL_MAX:
        raise DecodeError(f"ChannelData on channel 0x{channel:04x}")
    extra = len(data) - CHANNEL_DATA_HEADER_BYTES - length
    if extra < 0:
        raise DecodeError(f"ChannelData length {length} runs past the datagram")
    if extra > -length % 4:
        raise DecodeError(f"{extra} bytes after ChannelData of length {length}")
    return ChannelData(channel, bytes(data[CHANNEL_DATA_HEADER_BYTES : CHANNEL_DATA_HEADER_BYTES + length]))


# -- TURN attributes --------------------------------------------------------------


def lifetime_attribute(seconds: int) -> Attribute:
    """LIFETIME: the allocation's requested (or granted) lifetime; 0 in a
    Refresh deletes the allocation."""
    if not 0 <= seconds <= 0xFFFFFFFF:
        raise LocalProtocolError(f"lifetime {seconds} out of range")
    return Attribute(AttrType.LIFETIME, seconds.to_bytes(4, "big"))


def requested_transport_attribute(protocol: int = UDP_PROTOCOL) -> Attribute:
    """REQUESTED-TRANSPORT: the protocol number, then three RFFU bytes."""
    if not 0 <= protocol <= 0xFF:
        raise LocalProtocolError(f"protocol {protocol} out of range")
    return Attribute(AttrType.REQUESTED_TRANSPORT, bytes((protocol, 0, 0, 0)))


def channel_number_attribute(channel: int) -> Attribute:
    """CHANNEL-NUMBER: the channel, then two RFFU bytes."""
    if not CHANNEL_MIN <= channel <= CHANNEL_MAX:
        raise LocalProtocolError(f"channel 0x{channel:04x} outside 0x4000..0x4FFF")
    return Attribute(AttrType.CHANNEL_NUMBER, channel.to_bytes(2, "big") + bytes(2))


def data_attribute(payload: bytes) -> Attribute:
    """DATA: the payload of a Send or Data indication."""
    return Attribute(AttrType.DATA, payload)


def peer_address_attribute(addr: Address, transaction_id: bytes) -> Attribute:
    """XOR-PEER-ADDRESS for the message with this transaction id."""
    return xor_address_attribute(addr, transaction_id, AttrType.XOR_PEER_ADDRESS)


def relayed_address_attribute(addr: Address, transaction_id: bytes) -> Attribute:
    """XOR-RELAYED-ADDRESS for the message with this transaction id."""
    return xor_address_attribute(addr, transaction_id, AttrType.XOR_RELAYED_ADDRESS)


# -- credentials (RFC 8489 section 9.2) --------------------------------------------


def username_attribute(username: str) -> Attribute:
    """USERNAME (fewer than 513 bytes of UTF-8)."""
    raw = username.encode("utf-8")
    if len(raw) > MAX_USERNAME_BYTES:
        raise LocalProtocolError("USERNAME longer than 512 bytes")
    return Attribute(AttrType.USERNAME, raw)


def realm_attribute(realm: bytes) -> Attribute:
    """REALM, the bytes a server sent (a client echoes them)."""
    if len(realm) > MAX_REALM_BYTES:
        raise LocalProtocolError("REALM longer than 763 bytes")
    return Attribute(AttrType.REALM, realm)


def nonce_attribute(nonce: bytes) -> Attribute:
    """NONCE, the bytes a server sent (a client echoes them)."""
    if len(nonce) > MAX_NONCE_BYTES:
        raise LocalProtocolError("NONCE longer than 763 bytes")
    return Attribute(AttrType.NONCE, nonce)


def password_algorithm_attribute(algorithm: int) -> Attribute:
    """PASSWORD-ALGORITHM naming this algorithm, without parameters (MD5
    and SHA-256 have none)."""
    return Attribute(AttrType.PASSWORD_ALGORITHM, struct.pack("!HH", algorithm, 0))


def password_algorithms_attribute(algorithms: tuple[int, ...]) -> Attribute:
    """PASSWORD-ALGORITHMS offering these algorithms (no parameters)."""
    if not algorithms:
        raise LocalProtocolError("PASSWORD-ALGORITHMS needs one algorithm or more")
    return Attribute(
        AttrType.PASSWORD_ALGORITHMS, b"".join(struct.pack("!HH", a, 0) for a in algorithms)
    )


def _opaque_string(text: str) -> str:
    """The mapping of PRECIS OpaqueString (RFC 8265 section 4.2): non-ASCII
    spaces become U+0020, then NFC. Its check for disallowed code points is
    not applied; REST credentials (base64 and digits) are ASCII anyway."""
    mapped = "".join(" " if unicodedata.category(c) == "Zs" else c for c in text)
    return unicodedata.normalize("NFC", mapped)


def long_term_key(
    username: str,
    realm: bytes | str,
    password: str,
    algorithm: int = PasswordAlgorithm.MD5,
) -> bytes:
    """The long-term credential key: MD5 (or SHA-256) of
    ``username ":" OpaqueString(realm) ":" OpaqueString(password)``.

    ``realm`` may be the REALM bytes a server sent; bytes that are not UTF-8
    are used as they are.
    """
    raw_realm = realm.encode("utf-8") if isinstance(realm, str) else realm
    try:
        raw_realm = _opaque_string(raw_realm.decode("utf-8")).encode("utf-8")
    except UnicodeDecodeError:
        pass
    material = (
        username.encode("utf-8") + b":" + raw_realm + b":"
        + _opaque_string(password).encode("utf-8")
    )
    if algorithm == PasswordAlgorithm.MD5:
        return hashlib.md5(material, usedforsecurity=False).digest()
    if algorithm == PasswordAlgorithm.SHA256:
        return hashlib.sha256(material).digest()
    raise LocalProtocolError(f"unknown password algorithm {algorithm}")
