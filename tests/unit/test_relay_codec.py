"""RELAY frame codec."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dtx.errors import DecodeError, LocalProtocolError
from dtx.wire.demux import PacketKind, classify
from dtx.wire.relay import RELAY_HEADER_BYTES, decode_relay, encode_relay


def test_golden() -> None:
    data = encode_relay(0x01020304, b"\xc0quic")
    assert data == b"\x11\x01\x02\x03\x04\xc0quic"
    assert decode_relay(data) == (0x01020304, b"\xc0quic")
    assert classify(data) == PacketKind.DTX
    assert RELAY_HEADER_BYTES == 5


def test_empty_payload_and_limits() -> None:
    assert decode_relay(encode_relay(0, b"")) == (0, b"")
    assert decode_relay(encode_relay(2**32 - 1, b"x")) == (2**32 - 1, b"x")
    with pytest.raises(LocalProtocolError):
        encode_relay(2**32, b"")
    with pytest.raises(LocalProtocolError):
        encode_relay(-1, b"")


@pytest.mark.parametrize("data", [b"", b"\x11", b"\x11\x00\x00\x00", b"\x10\x00\x00\x00\x00x"])
def test_refused(data: bytes) -> None:
    with pytest.raises(DecodeError):
        decode_relay(data)


@given(st.integers(0, 2**32 - 1), st.binary(max_size=1500))
def test_round_trip(channel: int, payload: bytes) -> None:
    assert decode_relay(encode_relay(channel, payload)) == (channel, payload)


@given(st.binary(max_size=40))
def test_raises_only_decode_error(data: bytes) -> None:
    try:
        decode_relay(data)
    except DecodeError:
        pass
