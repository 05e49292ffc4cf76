"""First-byte demultiplexing of the one UDP socket (RFC 9443).

A dtx socket carries STUN, dtx's own control and relay frames, and QUIC.
RFC 9443 (updating RFC 7983) assigns first-byte ranges::

    0..3      STUN                      -> PacketKind.STUN
    4..15     unassigned                -> UNKNOWN
    16..19    ZRTP                      -> PacketKind.DTX (claimed by dtx)
    20..63    DTLS                      -> UNKNOWN
    64..79    TURN channel / QUIC       -> PacketKind.QUIC (dtx runs no TURN)
    80..127   QUIC                      -> PacketKind.QUIC
    128..191  RTP/RTCP                  -> UNKNOWN
    192..255  QUIC                      -> PacketKind.QUIC

dtx claims the ZRTP range, 16..19, for its control and relay frames: dtx
never speaks ZRTP (nor DTLS, nor RTP) on this socket. Every byte in 16..19
has both top bits clear, so it can never be a QUIC packet with the fixed bit
(0x40) set, long header or short, and it is outside STUN's 0..3. The range
is kept small on purpose: a dtx frame format puts a version/type in the
first byte and anything else after it. QUIC packets with the fixed bit
greased to zero (RFC 9287) would land in 0..63 or 128..191; dtx does not
negotiate that extension, so QUIC is exactly "fixed bit set" here.

TURN channel data (64..79) is taken as QUIC: dtx's relay is its own
protocol in 16..19, not TURN, so no channel data ever reaches this socket.
"""

from __future__ import annotations

from enum import Enum

__all__ = [
    "CONTROL_FIRST_BYTE",
    "DTX_FIRST_BYTE_MAX",
    "DTX_FIRST_BYTE_MIN",
    "PROBE_FIRST_BYTE",
    "PacketKind",
    "RELAY_FIRST_BYTE",
    "classify",
]

STUN_FIRST_BYTE_MIN = 0
STUN_FIRST_BYTE_MAX = 3
DTX_FIRST_BYTE_MIN = 16
DTX_FIRST_BYTE_MAX = 19
QUIC_FIXED_BIT = 0x40

# dtx's own frames, inside DTX_FIRST_BYTE_MIN..MAX: the one home of these
# bytes (the codecs in dtx.wire.control and dtx.wire.relay use them).
CONTROL_FIRST_BYTE = 0x10
"""Rendezvous CONTROL messages (``dtx.wire.control``)."""
RELAY_FIRST_BYTE = 0x11
"""RELAY frames (``dtx.wire.relay``)."""
PROBE_FIRST_BYTE = 0x12
"""Signed PROBE ping/pong between devices (``dtx.wire.control``)."""


class PacketKind(Enum):
    """What a datagram on the shared socket is, judged by its first byte."""

    STUN = "stun"
    DTX = "dtx"
    QUIC = "quic"
    UNKNOWN = "unknown"


def _kind_of_byte(first: int) -> PacketKind:
    if STUN_FIRST_BYTE_MIN <= first <= STUN_FIRST_BYTE_MAX:
        return PacketKind.STUN
    if DTX_FIRST_BYTE_MIN <= first <= DTX_FIRST_BYTE_MAX:
        return PacketKind.DTX
    if first & QUIC_FIXED_BIT:
        return PacketKind.QUIC
    return PacketKind.UNKNOWN


_TABLE: tuple[PacketKind, ...] = tuple(_kind_of_byte(b) for b in range(256))


def classify(data: bytes) -> PacketKind:
    """Classify a datagram by its first byte; an empty one is UNKNOWN.

    Only the first byte is looked at: a STUN result still needs
    :func:`dtx.wire.stun.decode_stun` to confirm it, a DTX one its own
    decoder, and QUIC its own header parsing.
    """
    if not data:
        return PacketKind.UNKNOWN
    return _TABLE[data[0]]
