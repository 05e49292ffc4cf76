"""CONTROL and PROBE codecs: golden bytes, round trips, refusals, fuzz."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dtx.errors import DecodeError, LocalProtocolError
from dtx.identity import DeviceIdentity
from dtx.wire.control import (
    HELLO_MIN_BYTES,
    MAX_CONTROL_BYTES,
    REGISTER_CONTEXT,
    Candidate,
    CandidateKind,
    ControlMessage,
    MessageType,
    Probe,
    ProbeKind,
    decode_control,
    decode_probe,
    encode_control,
    encode_hello,
    encode_probe,
    encode_register,
    register_signature_valid,
)

TXID = bytes(range(1, 9))
KEY = bytes(range(32))
INTRO = b"\xaa" * 8
PROBE_KEY = b"\x55" * 32


def test_golden_keepalive() -> None:
    msg = ControlMessage(MessageType.KEEPALIVE, TXID, registration=b"\x01" * 8)
    data = encode_control(msg)
    assert data == bytes.fromhex("1003" "0102030405060708" "060008" "0101010101010101")
    assert decode_control(data) == msg


def test_golden_registered_ipv4_and_ipv6() -> None:
    msg = ControlMessage(
        MessageType.REGISTERED,
        TXID,
        registration=b"\x02" * 8,
        reflexive=("203.0.113.5", 40000),
        lifetime=90,
        keepalive=25,
    )
    assert encode_control(msg) == bytes.fromhex(
        "1082" "0102030405060708"
        "060008" "0202020202020202"
        "070007" "04" "9c40" "cb007105"
        "080004" "0000005a"
        "090004" "00000019"
    )
    six = ControlMessage(MessageType.KEEPALIVE_ACK, TXID, reflexive=("2001:db8::1", 1), lifetime=1)
    data = encode_control(six)
    assert data[10:32] == bytes.fromhex("070013" "06" "0001" "20010db8000000000000000000000001")
    assert decode_control(data) == six


def test_golden_error_and_candidate() -> None:
    err = ControlMessage(MessageType.ERROR, TXID, error=(404, "nope"))
    assert encode_control(err) == bytes.fromhex("10ff" "0102030405060708" "0f0006" "0194") + b"nope"
    intro = ControlMessage(
        MessageType.INTRODUCTION,
        TXID,
        intro=INTRO,
        role=2,
        peer_jid="a@b/c",
        peer_key=KEY,
        channel=7,
        probe_key=PROBE_KEY,
        candidates=(Candidate(CandidateKind.HOST, ("10.0.0.2", 5000)),),
    )
    data = encode_control(intro)
    assert bytes.fromhex("050008" "01" "04" "1388" "0a000002") in data
    assert decode_control(data) == intro


def test_hello_is_48_bytes() -> None:
    data = encode_hello(TXID)
    assert len(data) == HELLO_MIN_BYTES
    msg = decode_control(data)
    assert msg.type == MessageType.HELLO and msg.padding == HELLO_MIN_BYTES - 13


ROUND_TRIP = [
    ControlMessage(MessageType.HELLO, TXID, padding=40),
    ControlMessage(MessageType.INTRODUCE, TXID, registration=b"r" * 8, target="tv@example.org"),
    ControlMessage(MessageType.ACCEPT, TXID, registration=b"r" * 8, intro=INTRO),
    ControlMessage(MessageType.UNREGISTER, TXID, registration=b"r" * 8),
    ControlMessage(MessageType.CHALLENGE, TXID, challenge=b"c" * 20),
    ControlMessage(MessageType.ACK, TXID),
    ControlMessage(MessageType.ERROR, TXID, error=(503, "")),
    ControlMessage(MessageType.ERROR, TXID, error=(400, "é" * 64)),
]


@pytest.mark.parametrize("msg", ROUND_TRIP, ids=lambda m: m.type.name)
def test_round_trip(msg: ControlMessage) -> None:
    data = encode_control(msg)
    assert decode_control(data) == msg
    assert encode_control(decode_control(data)) == data


def test_register_signature(alice: DeviceIdentity) -> None:
    cands = (
        Candidate(CandidateKind.HOST, ("10.0.0.2", 5000)),
        Candidate(CandidateKind.HOST, ("fd00::2", 5000)),
    )
    data = encode_register(
        txid=TXID,
        jid=alice.jid.full,
        key=alice.public_key,
        challenge=b"c" * 20,
        candidates=cands,
        sign=alice.sign,
    )
    msg = decode_control(data)
    assert msg.candidates == cands and msg.jid == alice.jid.full
    assert msg.signed_part == data[: -(3 + 64)]
    assert register_signature_valid(msg)
    # the context string is part of what is signed
    assert alice.sign(REGISTER_CONTEXT + msg.signed_part) == msg.signature
    # any change to the signed bytes breaks it
    tampered = bytearray(data)
    tampered[20] ^= 1
    assert not register_signature_valid(decode_control(bytes(tampered)))


@pytest.fixture
def alice() -> DeviceIdentity:
    return DeviceIdentity.from_private_bytes("alice@example.org/laptop", b"\x01" * 32)


BAD = {
    "short": b"\x10\x01" + b"\x00" * 7,
    "wrong first byte": b"\x11\x03" + TXID + bytes.fromhex("060008") + b"r" * 8,
    "unknown type": b"\x10\x40" + TXID,
    "missing required": b"\x10\x03" + TXID,
    "truncated attribute header": b"\x10\x85" + TXID + b"\x06\x00",
    "attribute past end": b"\x10\x85" + TXID + b"\x06\x00\x09" + b"r" * 8,
    "wrong fixed size": b"\x10\x03" + TXID + b"\x06\x00\x07" + b"r" * 7,
    "repeated": b"\x10\x03" + TXID + (b"\x06\x00\x08" + b"r" * 8) * 2,
    "unknown required attribute": b"\x10\x85" + TXID + b"\x7f\x00\x00",
    "bad utf-8": b"\x10\x04" + TXID + b"\x06\x00\x08" + b"r" * 8 + b"\x0a\x00\x01\xff",
    "empty jid": b"\x10\x04" + TXID + b"\x06\x00\x08" + b"r" * 8 + b"\x0a\x00\x00",
    "bad family": b"\x10\x83" + TXID + b"\x07\x00\x07\x05" + b"\x00" * 6
    + b"\x08\x00\x04" + b"\x00" * 4,
    "bad role": b"\x10\x85" + TXID + b"\x0e\x00\x01\x03",
    "attribute after signature": b"\x10\x85" + TXID + b"\x04\x00\x40" + b"s" * 64 + b"\x12\x00\x00",
    "too long": b"\x10\x01" + TXID + b"\x12\x04\xb0" + b"\x00" * 1200,
}


@pytest.mark.parametrize("data", BAD.values(), ids=list(BAD))
def test_refused(data: bytes) -> None:
    with pytest.raises(DecodeError):
        decode_control(data)


def test_unknown_optional_attribute_is_ignored() -> None:
    data = encode_control(ControlMessage(MessageType.ACK, TXID)) + b"\x90\x00\x02hi"
    assert decode_control(data) == ControlMessage(MessageType.ACK, TXID)


def test_candidates_at_most_eight() -> None:
    cand = Candidate(CandidateKind.HOST, ("10.0.0.2", 1))
    eight = ControlMessage(MessageType.ACK, TXID, candidates=(cand,) * 8)
    assert len(decode_control(encode_control(eight)).candidates) == 8
    with pytest.raises(LocalProtocolError):
        encode_control(ControlMessage(MessageType.ACK, TXID, candidates=(cand,) * 9))
    nine = encode_control(eight) + b"\x05\x00\x08\x01\x04\x00\x01\x0a\x00\x00\x02"
    with pytest.raises(DecodeError):
        decode_control(nine)


def test_a_candidate_of_an_unknown_kind_is_skipped() -> None:
    """A later kind (a newer device's) costs the message nothing else."""
    host = Candidate(CandidateKind.HOST, ("10.0.0.2", 1))
    data = encode_control(ControlMessage(MessageType.ACK, TXID, candidates=(host,)))
    later = data + b"\x05\x00\x08\x09\x04\x00\x02\x0a\x00\x00\x03"
    assert decode_control(later).candidates == (host,)
    with pytest.raises(DecodeError):  # still an address
        decode_control(data + b"\x05\x00\x03\x09\x04\x00")


def test_encoder_refuses_bad_values() -> None:
    with pytest.raises(LocalProtocolError):
        encode_control(ControlMessage(MessageType.ACK, b"short"))
    with pytest.raises(LocalProtocolError):
        encode_control(ControlMessage(MessageType.ACK, TXID, padding=MAX_CONTROL_BYTES))
    with pytest.raises(LocalProtocolError):
        encode_control(ControlMessage(MessageType.ACK, TXID, reflexive=("host.example", 1)))


# -- probes -------------------------------------------------------------------------


def keys(intro: bytes) -> bytes | None:
    return PROBE_KEY if intro == INTRO else None


def test_probe_golden_and_round_trip() -> None:
    ping = Probe(ProbeKind.PING, INTRO, TXID, None)
    data = encode_probe(ping, PROBE_KEY)
    assert data[:18] == b"\x12\x01" + INTRO + TXID and len(data) == 34
    assert decode_probe(data, keys) == ping
    pong = Probe(ProbeKind.PONG, INTRO, TXID, ("198.51.100.7", 6000))
    data = encode_probe(pong, PROBE_KEY)
    assert data[18:25] == bytes.fromhex("04" "1770" "c6336407")
    assert decode_probe(data, keys) == pong


def test_probe_refusals() -> None:
    data = encode_probe(Probe(ProbeKind.PING, INTRO, TXID, None), PROBE_KEY)
    with pytest.raises(DecodeError):
        decode_probe(data, lambda _: b"\x00" * 32)  # wrong key
    with pytest.raises(DecodeError):
        decode_probe(data, lambda _: None)  # unknown introduction
    bad = bytearray(data)
    bad[12] ^= 1
    with pytest.raises(DecodeError):
        decode_probe(bytes(bad), keys)
    with pytest.raises(DecodeError):
        decode_probe(data[:-1], keys)
    with pytest.raises(LocalProtocolError):
        encode_probe(Probe(ProbeKind.PONG, INTRO, TXID, None), PROBE_KEY)


# -- fuzz ---------------------------------------------------------------------------


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=1300))
def test_decode_control_raises_only_decode_error(data: bytes) -> None:
    try:
        msg = decode_control(b"\x10" + data)
    except DecodeError:
        return
    # whatever decodes re-encodes to something that decodes the same
    assert decode_control(encode_control(msg)).type == msg.type


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(list(MessageType)),
    st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=40)), max_size=12),
)
def test_decode_structured_fuzz(mtype: MessageType, attrs: list[tuple[int, bytes]]) -> None:
    data = b"\x10" + bytes([mtype]) + TXID
    data += b"".join(bytes([t]) + len(v).to_bytes(2, "big") + v for t, v in attrs)
    try:
        decode_control(data)
    except DecodeError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80))
def test_decode_probe_raises_only_decode_error(data: bytes) -> None:
    try:
        decode_probe(b"\x12" + data, lambda _: PROBE_KEY)
    except DecodeError:
        pass
