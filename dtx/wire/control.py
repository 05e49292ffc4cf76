"""CONTROL messages (first byte 0x10) and PROBE frames (0x12).

CONTROL messages travel between a device and its rendezvous server:
registration (HELLO, CHALLENGE, REGISTER, REGISTERED), keepalives,
introductions and their acceptance. PROBE frames travel directly between
two devices that were introduced, authenticated by the introduction's
probe key. The layout is in docs/protocol.md (sections 7, 9); this module is
pure: bytes in, frozen dataclasses out, and decoders raise only
:class:`~dtx.errors.DecodeError`. Encoders raise
:class:`~dtx.errors.LocalProtocolError` when given values that cannot be
put on the wire.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Final

from dtx.errors import DecodeError, LocalProtocolError
from dtx.identity import verify_signature
from dtx.wire.demux import CONTROL_FIRST_BYTE, PROBE_FIRST_BYTE

__all__ = [
    "CONTROL_FIRST_BYTE",
    "HELLO_MIN_BYTES",
    "MAX_CANDIDATES",
    "MAX_CONTROL_BYTES",
    "MAX_JID_BYTES",
    "MAX_REASON_BYTES",
    "PROBE_FIRST_BYTE",
    "PROBE_TAG_BYTES",
    "REGISTER_CONTEXT",
    "AttrType",
    "Candidate",
    "CandidateKind",
    "ControlMessage",
    "MessageType",
    "NatMapping",
    "Probe",
    "ProbeKind",
    "Role",
    "decode_address",
    "decode_control",
    "decode_probe",
    "encode_address",
    "encode_control",
    "encode_hello",
    "encode_probe",
    "encode_register",
    "register_signature_valid",
]

TXID_BYTES = 8
HEADER_BYTES = 2 + TXID_BYTES
MAX_CONTROL_BYTES = 1200
HELLO_MIN_BYTES = 48
MAX_JID_BYTES = 768
MAX_REASON_BYTES = 128
MAX_CANDIDATES = 8
KEY_BYTES = 32
CHALLENGE_BYTES = 20
SIGNATURE_BYTES = 64
ID_BYTES = 8
PROBE_KEY_BYTES = 32
PROBE_TAG_BYTES = 16
REGISTER_CONTEXT = b"dtx-register-v1\x00"


class MessageType(IntEnum):
    """CONTROL message types; 0x80 and above go from server to device."""

    HELLO = 0x01
    REGISTER = 0x02
    KEEPALIVE = 0x03
    INTRODUCE = 0x04
    ACCEPT = 0x05
    UNREGISTER = 0x06
    CHALLENGE = 0x81
    REGISTERED = 0x82
    KEEPALIVE_ACK = 0x83
    INTRODUCTION = 0x84
    ACK = 0x85
    ERROR = 0xFF


class AttrType(IntEnum):
    """CONTROL attribute types."""

    JID = 0x01
    KEY = 0x02
    CHALLENGE = 0x03
    SIGNATURE = 0x04
    CANDIDATE = 0x05
    REGISTRATION = 0x06
    REFLEXIVE = 0x07
    LIFETIME = 0x08
    KEEPALIVE = 0x09
    TARGET = 0x0A
    INTRO = 0x0B
    CHANNEL = 0x0C
    PROBE_KEY = 0x0D
    ROLE = 0x0E
    ERROR = 0x0F
    PEER_JID = 0x10
    PEER_KEY = 0x11
    PADDING = 0x12
    MAPPING_PORT = 0x80
    """REGISTERED (comprehension-optional): the server's port, on its
    address, where a KEEPALIVE tells it the device's NAT mapping
    behaviour (docs/protocol.md 7.7)."""
    NAT_MAPPING = 0x81
    """INTRODUCTION (comprehension-optional): the NAT mapping behaviour the
    server observed, of the receiving device and of its peer."""


class CandidateKind(IntEnum):
    """Where a candidate address comes from."""

    HOST = 1
    SERVER_REFLEXIVE = 2
    PEER_REFLEXIVE = 3
    MAPPED = 4
    """A public port the device's router forwards to it on request (PCP,
    NAT-PMP, UPnP IGD): reachable whatever the NAT's filtering."""


_CANDIDATE_KINDS: Final = frozenset(int(k) for k in CandidateKind)


class NatMapping(IntEnum):
    """A device's NAT mapping behaviour as the rendezvous observed it
    (RFC 4787 section 4.1), in NAT_MAPPING."""

    UNKNOWN = 0
    """Not checked (no mapping port, the check was lost, an older device)."""
    INDEPENDENT = 1
    """The same public address towards both of the server's ports."""
    DEPENDENT = 2
    """Another public port towards the server's second port: the NAT maps
    per destination ("symmetric"), so the peer cannot reach the port the
    server saw."""


class Role(IntEnum):
    """Which side of an introduction a device is (ROLE attribute)."""

    INITIATOR = 1
    """It asked for the introduction: it opens the QUIC connection."""
    RESPONDER = 2


class ProbeKind(IntEnum):
    PING = 1
    PONG = 2


@dataclass(frozen=True)
class Candidate:
    """An address at which a device may be reachable."""

    kind: CandidateKind
    addr: tuple[str, int]


@dataclass(frozen=True)
class ControlMessage:
    """One CONTROL message. Fields left None are absent on the wire.

    ``padding`` is the number of PADDING bytes (to add, or seen);
    ``signed_part`` is set by :func:`decode_control` to every byte before
    the SIGNATURE attribute (empty when there is none) and is ignored by
    :func:`encode_control`.
    """

    type: MessageType
    txid: bytes
    jid: str | None = None
    key: bytes | None = None
    challenge: bytes | None = None
    signature: bytes | None = None
    candidates: tuple[Candidate, ...] = ()
    registration: bytes | None = None
    reflexive: tuple[str, int] | None = None
    lifetime: int | None = None
    keepalive: int | None = None
    target: str | None = None
    intro: bytes | None = None
    channel: int | None = None
    probe_key: bytes | None = None
    role: Role | None = None
    error: tuple[int, str] | None = None
    peer_jid: str | None = None
    peer_key: bytes | None = None
    mapping_port: int | None = None
    nat_mapping: tuple[NatMapping, NatMapping] | None = None
    """(the receiving device's, its peer's), INTRODUCTION only."""
    padding: int = 0
    signed_part: bytes = b""


@dataclass(frozen=True)
class Probe:
    """A PING or PONG between two introduced devices; ``observed`` is the
    ping's source address as the ponging side saw it (PONG only)."""

    kind: ProbeKind
    intro: bytes
    txid: bytes
    observed: tuple[str, int] | None


# -- addresses ------------------------------------------------------------------


def encode_address(addr: tuple[str, int]) -> bytes:
    """An ADDRESS value: family (4 or 6), port, address bytes."""
    host, port = addr
    if not 0 <= port <= 0xFFFF:
        raise LocalProtocolError(f"port {port} out of range")
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError as exc:
        raise LocalProtocolError(f"not an IP address: {host!r}") from exc
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    family = 4 if ip.version == 4 else 6
    return bytes([family]) + port.to_bytes(2, "big") + ip.packed


def decode_address(value: bytes) -> tuple[str, int]:
    """Decode a whole ADDRESS value (no trailing bytes)."""
    addr, used = _address_prefix(value, 0)
    if used != len(value):
        raise DecodeError("trailing bytes after an address")
    return addr


def _address_prefix(data: bytes, pos: int) -> tuple[tuple[str, int], int]:
    """Decode an ADDRESS starting at ``pos``; return it and the end offset."""
    if pos >= len(data):
        raise DecodeError("truncated address")
    family = data[pos]
    if family == 4:
        size = 4
    elif family == 6:
        size = 16
    else:
        raise DecodeError(f"unknown address family {family}")
    end = pos + 3 + size
    if end > len(data):
        raise DecodeError("truncated address")
    port = int.from_bytes(data[pos + 1 : pos + 3], "big")
    raw = data[pos + 3 : end]
    host = str(ipaddress.IPv4Address(raw) if size == 4 else ipaddress.IPv6Address(raw))
    return (host, port), end


# -- CONTROL --------------------------------------------------------------------

_REQUIRED: dict[MessageType, frozenset[AttrType]] = {
    MessageType.HELLO: frozenset({AttrType.PADDING}),
    MessageType.REGISTER: frozenset(
        {AttrType.JID, AttrType.KEY, AttrType.CHALLENGE, AttrType.SIGNATURE}
    ),
    MessageType.KEEPALIVE: frozenset({AttrType.REGISTRATION}),
    MessageType.INTRODUCE: frozenset({AttrType.REGISTRATION, AttrType.TARGET}),
    MessageType.ACCEPT: frozenset({AttrType.REGISTRATION, AttrType.INTRO}),
    MessageType.UNREGISTER: frozenset({AttrType.REGISTRATION}),
    MessageType.CHALLENGE: frozenset({AttrType.CHALLENGE}),
    MessageType.REGISTERED: frozenset(
        {AttrType.REGISTRATION, AttrType.REFLEXIVE, AttrType.LIFETIME, AttrType.KEEPALIVE}
    ),
    MessageType.KEEPALIVE_ACK: frozenset({AttrType.REFLEXIVE, AttrType.LIFETIME}),
    MessageType.INTRODUCTION: frozenset(
        {
            AttrType.INTRO,
            AttrType.ROLE,
            AttrType.PEER_JID,
            AttrType.PEER_KEY,
            AttrType.CHANNEL,
            AttrType.PROBE_KEY,
        }
    ),
    MessageType.ACK: frozenset(),
    MessageType.ERROR: frozenset({AttrType.ERROR}),
}

_FIXED_SIZE: dict[AttrType, int] = {
    AttrType.KEY: KEY_BYTES,
    AttrType.CHALLENGE: CHALLENGE_BYTES,
    AttrType.SIGNATURE: SIGNATURE_BYTES,
    AttrType.REGISTRATION: ID_BYTES,
    AttrType.LIFETIME: 4,
    AttrType.KEEPALIVE: 4,
    AttrType.INTRO: ID_BYTES,
    AttrType.CHANNEL: 4,
    AttrType.PROBE_KEY: PROBE_KEY_BYTES,
    AttrType.ROLE: 1,
    AttrType.PEER_KEY: KEY_BYTES,
    AttrType.MAPPING_PORT: 2,
    AttrType.NAT_MAPPING: 2,
}


def _attr(kind: AttrType, value: bytes) -> bytes:
    if len(value) > 0xFFFF:
        raise LocalProtocolError(f"attribute {kind.name} too long")
    return bytes([kind]) + len(value).to_bytes(2, "big") + value


def _fixed(kind: AttrType, value: bytes) -> bytes:
    if len(value) != _FIXED_SIZE[kind]:
        raise LocalProtocolError(
            f"{kind.name} is {_FIXED_SIZE[kind]} bytes, not {len(value)}"
        )
    return _attr(kind, value)


def _u32(kind: AttrType, value: int) -> bytes:
    if not 0 <= value <= 0xFFFFFFFF:
        raise LocalProtocolError(f"{kind.name} {value} out of range")
    return _attr(kind, value.to_bytes(4, "big"))


def _text(kind: AttrType, value: str, limit: int) -> bytes:
    raw = value.encode("utf-8")
    if not 1 <= len(raw) <= limit:
        raise LocalProtocolError(f"{kind.name} must be 1-{limit} bytes, not {len(raw)}")
    return _attr(kind, raw)


def _body(msg: ControlMessage) -> bytes:
    """Header and every attribute except SIGNATURE, in a fixed order."""
    if len(msg.txid) != TXID_BYTES:
        raise LocalProtocolError(f"transaction id is {TXID_BYTES} bytes, not {len(msg.txid)}")
    if len(msg.candidates) > MAX_CANDIDATES:
        raise LocalProtocolError(f"at most {MAX_CANDIDATES} candidates")
    out = [bytes([CONTROL_FIRST_BYTE, msg.type]), msg.txid]
    if msg.jid is not None:
        out.append(_text(AttrType.JID, msg.jid, MAX_JID_BYTES))
    if msg.key is not None:
        out.append(_fixed(AttrType.KEY, msg.key))
    if msg.challenge is not None:
        out.append(_fixed(AttrType.CHALLENGE, msg.challenge))
    for cand in msg.candidates:
        out.append(_attr(AttrType.CANDIDATE, bytes([cand.kind]) + encode_address(cand.addr)))
    if msg.registration is not None:
        out.append(_fixed(AttrType.REGISTRATION, msg.registration))
    if msg.reflexive is not None:
        out.append(_attr(AttrType.REFLEXIVE, encode_address(msg.reflexive)))
    if msg.lifetime is not None:
        out.append(_u32(AttrType.LIFETIME, msg.lifetime))
    if msg.keepalive is not None:
        out.append(_u32(AttrType.KEEPALIVE, msg.keepalive))
    if msg.target is not None:
        out.append(_text(AttrType.TARGET, msg.target, MAX_JID_BYTES))
    if msg.intro is not None:
        out.append(_fixed(AttrType.INTRO, msg.intro))
    if msg.channel is not None:
        out.append(_u32(AttrType.CHANNEL, msg.channel))
    if msg.probe_key is not None:
        out.append(_fixed(AttrType.PROBE_KEY, msg.probe_key))
    if msg.role is not None:
        if msg.role not in (1, 2):
            raise LocalProtocolError(f"ROLE is 1 or 2, not {msg.role}")
        out.append(_attr(AttrType.ROLE, bytes([msg.role])))
    if msg.error is not None:
        code, reason = msg.error
        if not 0 <= code <= 0xFFFF:
            raise LocalProtocolError(f"error code {code} out of range")
        raw = reason.encode("utf-8")
        if len(raw) > MAX_REASON_BYTES:
            raise LocalProtocolError(f"error reason over {MAX_REASON_BYTES} bytes")
        out.append(_attr(AttrType.ERROR, code.to_bytes(2, "big") + raw))
    if msg.peer_jid is not None:
        out.append(_text(AttrType.PEER_JID, msg.peer_jid, MAX_JID_BYTES))
    if msg.peer_key is not None:
        out.append(_fixed(AttrType.PEER_KEY, msg.peer_key))
    if msg.mapping_port is not None:
        if not 1 <= msg.mapping_port <= 0xFFFF:
            raise LocalProtocolError(f"MAPPING_PORT {msg.mapping_port} out of range")
        out.append(_attr(AttrType.MAPPING_PORT, msg.mapping_port.to_bytes(2, "big")))
    if msg.nat_mapping is not None:
        out.append(_attr(AttrType.NAT_MAPPING, bytes([int(msg.nat_mapping[0]),
                                                      int(msg.nat_mapping[1])])))
    if msg.padding:
        if msg.padding < 0:
            raise LocalProtocolError("negative padding")
        out.append(_attr(AttrType.PADDING, bytes(msg.padding)))
    return b"".join(out)


def _check_size(data: bytes) -> bytes:
    if len(data) > MAX_CONTROL_BYTES:
        raise LocalProtocolError(f"control message of {len(data)} bytes > {MAX_CONTROL_BYTES}")
    return data


def encode_control(msg: ControlMessage) -> bytes:
    """Encode a CONTROL message; a SIGNATURE, if given, goes last."""
    body = _body(msg)
    if msg.signature is not None:
        body += _fixed(AttrType.SIGNATURE, msg.signature)
    return _check_size(body)


def encode_hello(txid: bytes) -> bytes:
    """A HELLO padded to exactly :data:`HELLO_MIN_BYTES`."""
    padding = HELLO_MIN_BYTES - HEADER_BYTES - 3
    return encode_control(ControlMessage(MessageType.HELLO, txid, padding=padding))


def encode_register(
    *,
    txid: bytes,
    jid: str,
    key: bytes,
    challenge: bytes,
    candidates: tuple[Candidate, ...] | list[Candidate],
    sign: Callable[[bytes], bytes],
    target: str | None = None,
) -> bytes:
    """A REGISTER signed with ``sign`` over REGISTER_CONTEXT and every byte
    before the SIGNATURE attribute; ``target``: introduce this device to
    it once registered (docs/protocol.md 7.6). :class:`LocalProtocolError`
    when it would not fit in one message."""
    msg = ControlMessage(
        MessageType.REGISTER,
        txid,
        jid=jid,
        key=key,
        challenge=challenge,
        candidates=tuple(candidates),
        target=target,
    )
    body = _body(msg)
    signature = sign(REGISTER_CONTEXT + body)
    return _check_size(body + _fixed(AttrType.SIGNATURE, signature))


def register_signature_valid(msg: ControlMessage) -> bool:
    """Whether a decoded REGISTER's SIGNATURE verifies under its KEY."""
    if msg.type != MessageType.REGISTER or msg.key is None or msg.signature is None:
        return False
    return verify_signature(msg.key, msg.signature, REGISTER_CONTEXT + msg.signed_part)


def _nat_mapping(value: int) -> NatMapping:
    return NatMapping(value) if value in _NAT_MAPPINGS else NatMapping.UNKNOWN


_NAT_MAPPINGS: Final = frozenset(int(m) for m in NatMapping)


def _utf8(value: bytes, what: str, limit: int, *, allow_empty: bool = False) -> str:
    if len(value) > limit or (not value and not allow_empty):
        raise DecodeError(f"{what} must be {0 if allow_empty else 1}-{limit} bytes")
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DecodeError(f"{what} is not UTF-8") from exc


def decode_control(data: bytes) -> ControlMessage:
    """Decode a CONTROL message and check the attributes its type requires."""
    if len(data) < HEADER_BYTES:
        raise DecodeError("control message shorter than its header")
    if len(data) > MAX_CONTROL_BYTES:
        raise DecodeError(f"control message over {MAX_CONTROL_BYTES} bytes")
    if data[0] != CONTROL_FIRST_BYTE:
        raise DecodeError(f"first byte {data[0]:#04x} is not a control message")
    try:
        mtype = MessageType(data[1])
    except ValueError:
        raise DecodeError(f"unknown control message type {data[1]:#04x}") from None
    txid = bytes(data[2:HEADER_BYTES])
    fields: dict[str, object] = {}
    seen: set[AttrType] = set()
    candidates: list[Candidate] = []
    candidate_attrs = 0
    signed_part = b""
    pos = HEADER_BYTES
    while pos < len(data):
        if pos + 3 > len(data):
            raise DecodeError("truncated attribute header")
        if AttrType.SIGNATURE in seen:
            raise DecodeError("SIGNATURE is not the last attribute")
        code = data[pos]
        length = int.from_bytes(data[pos + 1 : pos + 3], "big")
        start = pos + 3
        end = start + length
        if end > len(data):
            raise DecodeError("attribute runs past the end")
        value = bytes(data[start:end])
        try:
            kind = AttrType(code)
        except ValueError:
            if code < 0x80:
                raise DecodeError(f"unknown comprehension-required attribute {code:#04x}") from None
            pos = end
            continue
        if kind != AttrType.CANDIDATE:
            if kind in seen:
                raise DecodeError(f"attribute {kind.name} repeated")
        seen.add(kind)
        fixed = _FIXED_SIZE.get(kind)
        if fixed is not None and length != fixed:
            raise DecodeError(f"{kind.name} is {fixed} bytes, not {length}")
        if kind == AttrType.SIGNATURE:
            signed_part = bytes(data[:pos])
            fields["signature"] = value
        elif kind in (AttrType.JID, AttrType.TARGET, AttrType.PEER_JID):
            fields[kind.name.lower()] = _utf8(value, kind.name, MAX_JID_BYTES)
        elif kind == AttrType.CANDIDATE:
            candidate_attrs += 1
            if candidate_attrs > MAX_CANDIDATES:
                raise DecodeError(f"more than {MAX_CANDIDATES} candidates")
            if not value:
                raise DecodeError("empty candidate")
            addr = decode_address(value[1:])
            # A kind this version does not know (a later one) is skipped,
            # so that a newer device still registers with an older server.
            if value[0] in _CANDIDATE_KINDS:
                candidates.append(Candidate(CandidateKind(value[0]), addr))
        elif kind == AttrType.REFLEXIVE:
            fields["reflexive"] = decode_address(value)
        elif kind in (AttrType.LIFETIME, AttrType.KEEPALIVE, AttrType.CHANNEL):
            fields[kind.name.lower()] = int.from_bytes(value, "big")
        elif kind == AttrType.ROLE:
            if value[0] not in (Role.INITIATOR, Role.RESPONDER):
                raise DecodeError(f"ROLE {value[0]} is neither 1 nor 2")
            fields["role"] = Role(value[0])
        elif kind == AttrType.ERROR:
            if length < 2:
                raise DecodeError("ERROR shorter than its code")
            reason = _utf8(value[2:], "error reason", MAX_REASON_BYTES, allow_empty=True)
            fields["error"] = (int.from_bytes(value[:2], "big"), reason)
        elif kind == AttrType.PADDING:
            fields["padding"] = length
        elif kind == AttrType.MAPPING_PORT:
            port = int.from_bytes(value, "big")
            if port == 0:
                raise DecodeError("MAPPING_PORT 0")
            fields["mapping_port"] = port
        elif kind == AttrType.NAT_MAPPING:
            # A value this version does not know counts as unknown.
            fields["nat_mapping"] = (_nat_mapping(value[0]), _nat_mapping(value[1]))
        else:  # KEY, CHALLENGE, REGISTRATION, INTRO, PROBE_KEY, PEER_KEY
            fields[kind.name.lower()] = value
        pos = end
    missing = _REQUIRED[mtype] - seen
    if missing:
        names = ", ".join(sorted(m.name for m in missing))
        raise DecodeError(f"{mtype.name} without {names}")
    return ControlMessage(
        type=mtype,
        txid=txid,
        candidates=tuple(candidates),
        signed_part=signed_part,
        **fields,  # type: ignore[arg-type]
    )


# -- PROBE ----------------------------------------------------------------------

_PROBE_FIXED = 2 + ID_BYTES + TXID_BYTES


def _probe_tag(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()[:PROBE_TAG_BYTES]


def encode_probe(probe: Probe, probe_key: bytes) -> bytes:
    """A PING or PONG, tagged with the introduction's probe key."""
    if len(probe.intro) != ID_BYTES or len(probe.txid) != TXID_BYTES:
        raise LocalProtocolError("probe intro and txid are 8 bytes each")
    if (probe.kind == ProbeKind.PONG) != (probe.observed is not None):
        raise LocalProtocolError("a PONG carries the observed address, a PING does not")
    body = bytes([PROBE_FIRST_BYTE, probe.kind]) + probe.intro + probe.txid
    if probe.observed is not None:
        body += encode_address(probe.observed)
    return body + _probe_tag(probe_key, body)


def decode_probe(data: bytes, key_for: Callable[[bytes], bytes | None]) -> Probe:
    """Decode and authenticate a probe; ``key_for(intro)`` gives the probe
    key of the introduction it names, or None when that is unknown."""
    if len(data) < _PROBE_FIXED + PROBE_TAG_BYTES:
        raise DecodeError("probe too short")
    if data[0] != PROBE_FIRST_BYTE:
        raise DecodeError(f"first byte {data[0]:#04x} is not a probe")
    try:
        kind = ProbeKind(data[1])
    except ValueError:
        raise DecodeError(f"unknown probe kind {data[1]}") from None
    intro = bytes(data[2 : 2 + ID_BYTES])
    txid = bytes(data[2 + ID_BYTES : _PROBE_FIXED])
    body_end = len(data) - PROBE_TAG_BYTES
    observed: tuple[str, int] | None = None
    if kind == ProbeKind.PONG:
        observed, used = _address_prefix(data[:body_end], _PROBE_FIXED)
        if used != body_end:
            raise DecodeError("trailing bytes in a pong")
    elif body_end != _PROBE_FIXED:
        raise DecodeError("trailing bytes in a ping")
    key = key_for(intro)
    if key is None:
        raise DecodeError("probe for an unknown introduction")
    if not hmac.compare_digest(_probe_tag(key, bytes(data[:body_end])), data[body_end:]):
        raise DecodeError("probe tag does not verify")
    return Probe(kind, intro, txid, observed)
