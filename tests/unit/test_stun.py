"""STUN codec: RFC 5769 golden bytes, round-trip tables, fuzzing."""

from __future__ import annotations

import hashlib
import hmac
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dtx.errors import DecodeError, LocalProtocolError
from dtx.wire.stun import (
    MAGIC_COOKIE,
    Attribute,
    AttrType,
    ChangeRequest,
    ErrorCode,
    StunClass,
    StunMessage,
    StunMethod,
    address_attribute,
    binding_request,
    change_request_attribute,
    decode_stun,
    encode_stun,
    error_code_attribute,
    is_stun,
    response_port_attribute,
    software_attribute,
    unknown_attributes_attribute,
    xor_address_attribute,
)

DATA = Path(__file__).resolve().parent.parent / "data" / "stun"
TID = bytes.fromhex("b7e7a701bc34d686fa87dfae")
SHORT_TERM_PASSWORD = b"VOkJxbRl1RmTxUk/WvJxBt"  # RFC 5769 section 2.1


def golden(name: str) -> bytes:
    return (DATA / name).read_bytes()


def integrity_ok(data: bytes, key: bytes) -> bool:
    """RFC 8489 section 14.5 check, done here only to prove the vectors intact."""
    msg = decode_stun(data)
    offset = 20
    for attr in msg.attributes:
        if attr.type == AttrType.MESSAGE_INTEGRITY:
            covered = bytearray(data[:offset])
            struct.pack_into("!H", covered, 2, offset - 20 + 24)
            mac = hmac.new(key, bytes(covered), hashlib.sha1).digest()
            return hmac.compare_digest(mac, attr.value)
        offset += 4 + len(attr.value) + (-len(attr.value) % 4)
    return False


# -- RFC 5769 -----------------------------------------------------------------


def test_rfc5769_sample_request() -> None:
    data = golden("rfc5769-request.bin")
    msg = decode_stun(data)
    assert msg.method == StunMethod.BINDING
    assert msg.cls == StunClass.REQUEST
    assert not msg.classic
    assert msg.transaction_id == TID
    assert msg.software == "STUN test client"
    assert msg.has_fingerprint
    assert [a.type for a in msg.attributes] == [
        AttrType.SOFTWARE,
        0x0024,  # PRIORITY
        0x8029,  # ICE-CONTROLLED
        AttrType.USERNAME,
        AttrType.MESSAGE_INTEGRITY,
        AttrType.FINGERPRINT,
    ]
    username = msg.attribute(AttrType.USERNAME)
    assert username is not None and username.value == b"evtj:h6vY"
    assert integrity_ok(data, SHORT_TERM_PASSWORD)
    assert encode_stun(msg) == data


@pytest.mark.parametrize(
    ("name", "address"),
    [
        ("rfc5769-ipv4-response.bin", ("192.0.2.1", 32853)),
        ("rfc5769-ipv6-response.bin", ("2001:db8:1234:5678:11:2233:4455:6677", 32853)),
    ],
)
def test_rfc5769_responses(name: str, address: tuple[str, int]) -> None:
    data = golden(name)
    msg = decode_stun(data)
    assert msg.cls == StunClass.SUCCESS
    assert msg.method == StunMethod.BINDING
    assert msg.transaction_id == TID
    assert msg.software == "test vector"
    assert msg.xor_mapped_address == address
    assert msg.reflexive_address == address
    assert msg.mapped_address is None
    assert msg.has_fingerprint
    assert integrity_ok(data, SHORT_TERM_PASSWORD)
    # re-encoded byte for byte, the vectors' space padding included
    assert encode_stun(msg) == data
    # the XOR attribute built from scratch matches the vector's
    built = xor_address_attribute(address, TID)
    assert msg.attribute(AttrType.XOR_MAPPED_ADDRESS) == built


def test_padding_bytes_do_not_affect_equality() -> None:
    data = golden("rfc5769-ipv4-response.bin")
    msg = decode_stun(data)
    software = msg.attribute(AttrType.SOFTWARE)
    assert software is not None and software.padding == b" "
    assert software == software_attribute("test vector")
    # rebuilt with fresh (zero) padding: different bytes, same message
    rebuilt = StunMessage(
        method=msg.method,
        cls=msg.cls,
        transaction_id=msg.transaction_id,
        attributes=tuple(Attribute(a.type, a.value) for a in msg.attributes),
    )
    again = encode_stun(rebuilt)
    assert again != data
    # same attributes; only the FINGERPRINT (over other bytes) differs
    assert decode_stun(again).attributes[:-1] == msg.attributes[:-1]


@pytest.mark.parametrize(
    "name", ["rfc5769-request.bin", "rfc5769-ipv4-response.bin", "rfc5769-ipv6-response.bin"]
)
def test_rfc5769_fingerprint_is_checked(name: str) -> None:
    data = bytearray(golden(name))
    data[-1] ^= 0x01
    with pytest.raises(DecodeError, match="FINGERPRINT"):
        decode_stun(bytes(data))
    # a flipped bit anywhere in the covered part is caught too
    data = bytearray(golden(name))
    data[30] ^= 0x40
    with pytest.raises(DecodeError):
        decode_stun(bytes(data))


# -- message type bits ---------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "cls", "wire"),
    [
        (0x001, StunClass.REQUEST, 0x0001),
        (0x001, StunClass.INDICATION, 0x0011),
        (0x001, StunClass.SUCCESS, 0x0101),
        (0x001, StunClass.ERROR, 0x0111),
        (0x003, StunClass.REQUEST, 0x0003),  # TURN Allocate
        (0x00A, StunClass.SUCCESS, 0x010A),  # TURN Connect
        (0xFFF, StunClass.ERROR, 0x3FFF),
        (0x080, StunClass.REQUEST, 0x0200),
    ],
)
def test_message_type_table(method: int, cls: StunClass, wire: int) -> None:
    msg = StunMessage(method=method, cls=cls, transaction_id=TID)
    data = encode_stun(msg, fingerprint=False)
    assert data[:2] == wire.to_bytes(2, "big")
    assert data[4:8] == MAGIC_COOKIE.to_bytes(4, "big")
    assert decode_stun(data) == msg


# -- round-trip tables ---------------------------------------------------------

ROUND_TRIP = [
    ("bare request", []),
    ("xor v4", [xor_address_attribute(("203.0.113.7", 40000), TID)]),
    ("xor v6", [xor_address_attribute(("2001:db8::1", 1), TID)]),
    ("mapped", [address_attribute(AttrType.MAPPED_ADDRESS, ("198.51.100.9", 65535))]),
    ("other", [address_attribute(AttrType.OTHER_ADDRESS, ("192.0.2.2", 3479))]),
    ("origin", [address_attribute(AttrType.RESPONSE_ORIGIN, ("2001:db8::2", 3478))]),
    ("change both", [change_request_attribute(change_ip=True, change_port=True)]),
    ("change port", [change_request_attribute(change_ip=False, change_port=True)]),
    ("software", [software_attribute("dtx 0.1 ünïcode")]),
    ("error", [error_code_attribute(420, "Unknown Attribute")]),
    ("unknown odd", [unknown_attributes_attribute((0x0027,))]),
    ("unknown even", [unknown_attributes_attribute((0x0027, 0x0024))]),
    ("opaque", [Attribute(0x7FFF, b"abc"), Attribute(0xC001, b"")]),
]


@pytest.mark.parametrize(("label", "attrs"), ROUND_TRIP, ids=[r[0] for r in ROUND_TRIP])
@pytest.mark.parametrize("fingerprint", [False, True])
def test_round_trip_table(label: str, attrs: list[Attribute], fingerprint: bool) -> None:
    msg = StunMessage(
        method=StunMethod.BINDING,
        cls=StunClass.SUCCESS,
        transaction_id=TID,
        attributes=tuple(attrs),
    )
    data = encode_stun(msg, fingerprint=fingerprint)
    assert is_stun(data)
    assert len(data) % 4 == 0
    decoded = decode_stun(data)
    assert decoded.has_fingerprint is fingerprint
    if fingerprint:
        assert decoded.attributes[:-1] == msg.attributes
        assert encode_stun(decoded) == data
    else:
        assert decoded == msg


def test_typed_views() -> None:
    msg = StunMessage(
        method=StunMethod.BINDING,
        cls=StunClass.ERROR,
        transaction_id=TID,
        attributes=(
            xor_address_attribute(("203.0.113.7", 40000), TID),
            address_attribute(AttrType.MAPPED_ADDRESS, ("203.0.113.8", 1)),
            address_attribute(AttrType.OTHER_ADDRESS, ("192.0.2.2", 3479)),
            address_attribute(AttrType.RESPONSE_ORIGIN, ("192.0.2.1", 3478)),
            address_attribute(AttrType.SOURCE_ADDRESS, ("192.0.2.3", 3)),
            address_attribute(AttrType.CHANGED_ADDRESS, ("192.0.2.4", 4)),
            change_request_attribute(change_ip=True, change_port=False),
            software_attribute("x"),
            error_code_attribute(420, "Unknown"),
            unknown_attributes_attribute((0x27, 0x24)),
            response_port_attribute(4242),
        ),
    )
    m = decode_stun(encode_stun(msg))
    assert m.xor_mapped_address == ("203.0.113.7", 40000)
    assert m.reflexive_address == ("203.0.113.7", 40000)
    assert m.mapped_address == ("203.0.113.8", 1)
    assert m.other_address == ("192.0.2.2", 3479)
    assert m.response_origin == ("192.0.2.1", 3478)
    assert m.source_address == ("192.0.2.3", 3)
    assert m.changed_address == ("192.0.2.4", 4)
    assert m.change_request == ChangeRequest(change_ip=True, change_port=False)
    assert m.software == "x"
    assert m.error_code == ErrorCode(420, "Unknown")
    assert m.unknown_attributes == (0x27, 0x24)
    assert m.response_port == 4242
    empty = StunMessage(method=1, cls=StunClass.REQUEST, transaction_id=TID)
    assert empty.xor_mapped_address is None
    assert empty.change_request is None
    assert empty.software is None
    assert empty.error_code is None
    assert empty.unknown_attributes is None
    assert not empty.has_fingerprint


def test_binding_request_shapes() -> None:
    plain = binding_request(TID)
    assert len(plain) == 28  # header + FINGERPRINT
    msg = decode_stun(plain)
    assert msg.cls == StunClass.REQUEST and msg.change_request is None
    assert msg.has_fingerprint
    assert len(binding_request(TID, fingerprint=False)) == 20
    both = decode_stun(binding_request(TID, change_ip=True, change_port=True))
    assert both.change_request == ChangeRequest(True, True)
    assert both.attributes[0].value == bytes.fromhex("00000006")
    port = decode_stun(binding_request(TID, change_port=True))
    assert port.attributes[0].value == bytes.fromhex("00000002")


def test_classic_messages() -> None:
    tid16 = bytes(range(1, 17))
    data = binding_request(tid16, change_ip=True, change_port=True)
    assert len(data) == 28  # no FINGERPRINT in RFC 3489
    msg = decode_stun(data)
    assert msg.classic
    assert msg.transaction_id == tid16
    assert msg.change_request == ChangeRequest(True, True)
    assert not msg.has_fingerprint
    # a pystun3-style request, by hand: type, length, 16-byte id, CHANGE-REQUEST
    raw = bytes.fromhex("00010008") + tid16 + bytes.fromhex("0003000400000006")
    assert decode_stun(raw) == msg
    # 0x8028 in a classic message is opaque, not checked
    opaque = StunMessage(
        method=1,
        cls=StunClass.SUCCESS,
        transaction_id=tid16,
        attributes=(Attribute(AttrType.FINGERPRINT, b"\x00\x00\x00\x00"),),
        classic=True,
    )
    assert decode_stun(encode_stun(opaque)) == opaque
    # XOR addresses in a classic message use the whole 16-byte id as mask
    attr = xor_address_attribute(("192.0.2.1", 80), tid16)
    with_xor = StunMessage(1, StunClass.SUCCESS, tid16, (attr,), classic=True)
    assert decode_stun(encode_stun(with_xor)).xor_mapped_address == ("192.0.2.1", 80)


def test_construction_errors_are_local() -> None:
    with pytest.raises(LocalProtocolError):
        StunMessage(method=1, cls=StunClass.REQUEST, transaction_id=bytes(16))
    with pytest.raises(LocalProtocolError):
        StunMessage(method=1, cls=StunClass.REQUEST, transaction_id=bytes(12), classic=True)
    with pytest.raises(LocalProtocolError):
        StunMessage(method=0x1000, cls=StunClass.REQUEST, transaction_id=bytes(12))
    with pytest.raises(LocalProtocolError):
        address_attribute(AttrType.MAPPED_ADDRESS, ("example.org", 1))
    with pytest.raises(LocalProtocolError):
        address_attribute(AttrType.MAPPED_ADDRESS, ("192.0.2.1", 70000))
    with pytest.raises(LocalProtocolError):
        error_code_attribute(200, "OK")
    with pytest.raises(LocalProtocolError):
        binding_request(bytes(5))


# -- malformed input -------------------------------------------------------------

HEADER = bytes.fromhex("0001") + b"\x00\x00" + MAGIC_COOKIE.to_bytes(4, "big") + TID


def with_body(body: bytes, header: bytes = HEADER) -> bytes:
    return header[:2] + len(body).to_bytes(2, "big") + header[4:] + body


MALFORMED = [
    ("empty", b""),
    ("short header", HEADER[:19]),
    ("top bits", b"\x40" + with_body(b"")[1:]),
    ("length not /4", HEADER[:2] + b"\x00\x02" + HEADER[4:] + b"\x00\x00"),
    ("length too big", HEADER[:2] + b"\x00\x04" + HEADER[4:]),
    ("trailing bytes", HEADER + b"\x00\x00\x00\x00"),
    ("truncated attribute header", with_body(b"\x80\x22\x00\x08")),
    ("value past end", with_body(b"\x80\x22\x00\x08abcd")),
    ("padding past end", with_body(b"\x80\x22\x00\x05abcd")),
    ("bad family", with_body(b"\x00\x01\x00\x08\x00\x03\x00\x50\xc0\x00\x02\x01")),
    ("v4 with v6 length", with_body(b"\x00\x20\x00\x14\x00\x01" + bytes(18))),
    ("address too short", with_body(b"\x00\x01\x00\x00")),
    ("change request 8 bytes", with_body(b"\x00\x03\x00\x08" + bytes(8))),
    ("software not utf-8", with_body(b"\x80\x22\x00\x04\xff\xfe\xfd\xfc")),
    ("error class 2", with_body(b"\x00\x09\x00\x04\x00\x00\x02\x00")),
    ("error number 100", with_body(b"\x00\x09\x00\x04\x00\x00\x04\x64")),
    ("unknown attrs odd", with_body(b"\x00\x0a\x00\x03\x00\x01\x00\x00")),
    ("response port 2 bytes", with_body(b"\x00\x27\x00\x02\x13\x88\x00\x00")),
    ("integrity 16 bytes", with_body(b"\x00\x08\x00\x10" + bytes(16))),
    ("fingerprint not last", with_body(b"\x80\x28\x00\x04" + bytes(4) + b"\x80\x22\x00\x00")),
    ("fingerprint 8 bytes", with_body(b"\x80\x28\x00\x08" + bytes(8))),
    ("fingerprint wrong", with_body(b"\x80\x28\x00\x04" + bytes(4))),
]


@pytest.mark.parametrize(("label", "data"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_raises_decode_error(label: str, data: bytes) -> None:
    with pytest.raises(DecodeError):
        decode_stun(data)


def test_is_stun() -> None:
    assert is_stun(binding_request(TID))
    assert is_stun(golden("rfc5769-request.bin"))
    assert not is_stun(b"")
    assert not is_stun(HEADER[:19])
    assert not is_stun(b"\xc0" + HEADER[1:])  # a QUIC long header byte
    assert not is_stun(HEADER + b"\x00")  # length field disagrees
    assert not is_stun(HEADER[:2] + b"\x00\x02" + HEADER[4:] + b"\x00\x00")


# -- property tests --------------------------------------------------------------

addresses_v4 = st.tuples(
    st.ip_addresses(v=4).map(str), st.integers(min_value=0, max_value=0xFFFF)
)
addresses_v6 = st.tuples(
    st.ip_addresses(v=6).map(str), st.integers(min_value=0, max_value=0xFFFF)
)
addresses = st.one_of(addresses_v4, addresses_v6)
# opaque attributes: any type with no typed view in the codec
opaque_types = st.integers(min_value=0, max_value=0xFFFF).filter(
    lambda t: t not in {int(a) for a in AttrType}
)


@st.composite
def messages(draw: st.DrawFn) -> StunMessage:
    classic = draw(st.booleans())
    tid = draw(st.binary(min_size=16 if classic else 12, max_size=16 if classic else 12))
    if classic and tid[:4] == MAGIC_COOKIE.to_bytes(4, "big"):
        tid = b"\x00" + tid[1:]
    plain_types = [
        AttrType.MAPPED_ADDRESS,
        AttrType.OTHER_ADDRESS,
        AttrType.RESPONSE_ORIGIN,
        AttrType.SOURCE_ADDRESS,
        AttrType.CHANGED_ADDRESS,
        AttrType.ALTERNATE_SERVER,
    ]
    attr = st.one_of(
        st.builds(address_attribute, st.sampled_from(plain_types), addresses),
        st.builds(lambda a: xor_address_attribute(a, tid), addresses),
        st.builds(
            lambda i, p: change_request_attribute(change_ip=i, change_port=p),
            st.booleans(),
            st.booleans(),
        ),
        st.builds(software_attribute, st.text(max_size=40)),
        st.builds(
            error_code_attribute,
            st.integers(min_value=300, max_value=699),
            st.text(max_size=30),
        ),
        st.builds(
            unknown_attributes_attribute,
            st.lists(st.integers(0, 0xFFFF), max_size=5).map(tuple),
        ),
        st.builds(Attribute, opaque_types, st.binary(max_size=40)),
    )
    return StunMessage(
        method=draw(st.integers(min_value=0, max_value=0xFFF)),
        cls=draw(st.sampled_from(StunClass)),
        transaction_id=tid,
        attributes=tuple(draw(st.lists(attr, max_size=6))),
        classic=classic,
    )


@settings(max_examples=300, deadline=None)
@given(messages())
def test_property_round_trip(msg: StunMessage) -> None:
    data = encode_stun(msg, fingerprint=False)
    assert is_stun(data)
    assert decode_stun(data) == msg
    with_fp = decode_stun(encode_stun(msg))
    if msg.classic:
        assert with_fp == msg
    else:
        assert with_fp.has_fingerprint
        assert with_fp.attributes[:-1] == msg.attributes


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_property_arbitrary_bytes_raise_only_decode_error(data: bytes) -> None:
    try:
        msg = decode_stun(data)
    except DecodeError:
        return
    # whatever decodes re-encodes to the same bytes
    assert encode_stun(msg, fingerprint=msg.has_fingerprint) == data


@st.composite
def stunlike(draw: st.DrawFn) -> bytes:
    """Framing that passes is_stun, so fuzzing reaches the attribute parser."""
    body = draw(st.binary(max_size=120))
    body += bytes(-len(body) % 4)
    cookie = draw(st.sampled_from([MAGIC_COOKIE.to_bytes(4, "big"), b"\x00\x01\x02\x03"]))
    msg_type = draw(st.integers(min_value=0, max_value=0x3FFF))
    head = msg_type.to_bytes(2, "big") + len(body).to_bytes(2, "big") + cookie
    return head + draw(st.binary(min_size=12, max_size=12)) + body


@settings(max_examples=500, deadline=None)
@given(stunlike())
def test_property_stunlike_bytes_raise_only_decode_error(data: bytes) -> None:
    assert is_stun(data)
    try:
        msg = decode_stun(data)
    except DecodeError:
        return
    assert encode_stun(msg, fingerprint=msg.has_fingerprint) == data
    # typed views of a decoded message never raise
    for view in (
        "xor_mapped_address",
        "mapped_address",
        "other_address",
        "response_origin",
        "source_address",
        "changed_address",
        "change_request",
        "software",
        "error_code",
        "unknown_attributes",
        "response_port",
    ):
        getattr(msg, view)
