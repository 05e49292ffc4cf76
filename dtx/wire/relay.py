"""RELAY frames (first byte 0x11): a QUIC packet carried through the
rendezvous server on a relay channel.

``0x11 | channel u32 | payload``. This is the server's hot path, so
decoding is a length check and two slices.
"""

from __future__ import annotations

from dtx.errors import DecodeError, LocalProtocolError
from dtx.wire.demux import RELAY_FIRST_BYTE

__all__ = ["RELAY_FIRST_BYTE", "RELAY_HEADER_BYTES", "decode_relay", "encode_relay"]

RELAY_HEADER_BYTES = 5
_FIRST = bytes([RELAY_FIRST_BYTE])


def encode_relay(channel: int, payload: bytes) -> bytes:
    """A relay frame carrying ``payload`` on ``channel``."""
    if not 0 <= channel <= 0xFFFFFFFF:
        raise LocalProtocolError(f"relay channel {channel} out of range")
    return _FIRST + channel.to_bytes(4, "big") + payload


def decode_relay(data: bytes) -> tuple[int, bytes]:
    """``(channel, payload)`` of a relay frame; DecodeError when it is
    shorter than its header or does not start with 0x11."""
    if len(data) < RELAY_HEADER_BYTES or data[0] != RELAY_FIRST_BYTE:
        raise DecodeError("not a relay frame")
    return int.from_bytes(data[1:RELAY_HEADER_BYTES], "big"), data[RELAY_HEADER_BYTES:]
