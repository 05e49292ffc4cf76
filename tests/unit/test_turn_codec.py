"""TURN on the wire: long-term credentials against RFC 5769 and RFC 8489
vectors, TURN attributes and message types as RFC 8656 lays them out,
ChannelData framing, fuzzing (decoders raise only DecodeError)."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dtx.errors import DecodeError, LocalProtocolError
from dtx.wire.demux import PacketKind, classify
from dtx.wire.stun import (
    MAGIC_COOKIE,
    Attribute,
    AttrType,
    Integrity,
    IntegrityCheck,
    StunClass,
    StunMessage,
    StunMethod,
    check_integrity,
    decode_stun,
    encode_stun,
    error_code_attribute,
    software_attribute,
    xor_address_attribute,
)
from dtx.wire.turn import (
    CHANNEL_MAX,
    CHANNEL_MIN,
    ChannelData,
    PasswordAlgorithm,
    channel_number_attribute,
    data_attribute,
    decode_channel_data,
    encode_channel_data,
    is_channel_data,
    lifetime_attribute,
    long_term_key,
    nonce_attribute,
    password_algorithm_attribute,
    password_algorithms_attribute,
    peer_address_attribute,
    realm_attribute,
    relayed_address_attribute,
    requested_transport_attribute,
    username_attribute,
)

DATA = Path(__file__).resolve().parent.parent / "data" / "stun"
RFC5769_TID = bytes.fromhex("b7e7a701bc34d686fa87dfae")
SHORT_TERM_PASSWORD = b"VOkJxbRl1RmTxUk/WvJxBt"  # RFC 5769 section 2.1

# RFC 5769 section 2.4: a request with long-term authentication. The
# password is given after SASLprep ("The\u00adM\u00aatr\u2168" -> "TheMatrIX").
LONG_TERM_REQUEST = bytes.fromhex(
    "000100602112a44278ad3433c6ad72c029da412e"
    "00060012e3839ee38388e383aae38383e382afe382b90000"
    "0015001c662f2f3439396b39353464364f4c33346f4c39465354767936347341"
    "0014000b6578616d706c652e6f726700"
    "00080014f67024656dd64a3e02b8e0712e85c9a28ca89666"
)
LT_TID = bytes.fromhex("78ad3433c6ad72c029da412e")
LT_USERNAME = "\u30de\u30c8\u30ea\u30c3\u30af\u30b9"
LT_NONCE = b"f//499k954d6OL34oL9FSTvy64sA"
LT_REALM = b"example.org"
LT_PASSWORD = "TheMatrIX"

# RFC 8489 appendix B.1 as corrected by verified erratum 6268: USERHASH, a
# nonce with the "obMatJos2" cookie, PASSWORD-ALGORITHM SHA-256 and
# MESSAGE-INTEGRITY-SHA256; same credentials as above.
SHA256_REQUEST = bytes.fromhex(
    "000100902112a44278ad3433c6ad72c029da412e"
    "001e00204a3cf38fef6992bda952c6780417da0f24819415569e60b205c46e41407f1704"
    "001500296f624d61744a6f733241414143662f2f3439396b39353464364f4c33346f4c39"
    "4653547679363473410000000014000b6578616d706c652e6f726700"
    "001d000400020000001c0020"
    "b5c7bf005b6c52a21c51c5e892f81924136296cb927c43149309278cc6518e65"
)


# -- long-term credentials ---------------------------------------------------------


def test_rfc5769_long_term_request_verifies() -> None:
    msg = decode_stun(LONG_TERM_REQUEST)
    assert msg.method == StunMethod.BINDING and msg.cls is StunClass.REQUEST
    assert msg.username == LT_USERNAME.encode()
    assert msg.nonce == LT_NONCE
    assert msg.realm == LT_REALM
    assert not msg.has_fingerprint
    key = long_term_key(LT_USERNAME, LT_REALM, LT_PASSWORD)
    assert check_integrity(LONG_TERM_REQUEST, key) is IntegrityCheck.VALID
    assert check_integrity(LONG_TERM_REQUEST, long_term_key(LT_USERNAME, LT_REALM, "TheMatrix")) \
        is IntegrityCheck.INVALID
    # the realm may be passed as text as well as the bytes a server sent
    assert long_term_key(LT_USERNAME, "example.org", LT_PASSWORD) == key


def test_rfc5769_long_term_request_is_reproduced() -> None:
    key = long_term_key(LT_USERNAME, LT_REALM, LT_PASSWORD)
    msg = StunMessage(
        StunMethod.BINDING, StunClass.REQUEST, LT_TID,
        (username_attribute(LT_USERNAME), nonce_attribute(LT_NONCE), realm_attribute(LT_REALM)),
    )
    assert encode_stun(msg, fingerprint=False, key=key) == LONG_TERM_REQUEST
    # with a FINGERPRINT after it, the integrity still verifies (it covers
    # only what precedes it) and the FINGERPRINT covers the integrity
    with_fp = encode_stun(msg, key=key)
    assert with_fp[: len(LONG_TERM_REQUEST)][4:] == LONG_TERM_REQUEST[4:]
    assert decode_stun(with_fp).has_fingerprint
    assert check_integrity(with_fp, key) is IntegrityCheck.VALID
    # re-signing a decoded message replaces its integrity attribute
    assert encode_stun(decode_stun(LONG_TERM_REQUEST), fingerprint=False, key=key) \
        == LONG_TERM_REQUEST


@pytest.mark.parametrize("index", [0, 1, 7, 19, 24, 40, 70, 95])
def test_any_flipped_covered_byte_breaks_integrity(index: int) -> None:
    key = long_term_key(LT_USERNAME, LT_REALM, LT_PASSWORD)
    data = bytearray(LONG_TERM_REQUEST)
    data[index] ^= 0x01
    assert check_integrity(bytes(data), key) is IntegrityCheck.INVALID


def test_length_field_is_not_covered_but_framing_is_checked() -> None:
    # the MAC is computed with the length rewritten (RFC 8489 section
    # 14.5), so a changed length is caught by the decoder, not the MAC
    data = bytearray(LONG_TERM_REQUEST)
    data[3] ^= 0x04
    with pytest.raises(DecodeError):
        decode_stun(bytes(data))


def test_rfc8489_sha256_request_verifies() -> None:
    msg = decode_stun(SHA256_REQUEST)
    assert msg.nonce is not None and msg.nonce.startswith(b"obMatJos2")
    assert msg.password_algorithm == PasswordAlgorithm.SHA256
    userhash = msg.attribute(AttrType.USERHASH)
    assert userhash is not None
    assert userhash.value == hashlib.sha256(f"{LT_USERNAME}:example.org".encode()).digest()
    sha256_key = long_term_key(LT_USERNAME, LT_REALM, LT_PASSWORD, PasswordAlgorithm.SHA256)
    assert len(sha256_key) == 32
    assert check_integrity(SHA256_REQUEST, sha256_key) is IntegrityCheck.VALID
    md5_key = long_term_key(LT_USERNAME, LT_REALM, LT_PASSWORD)
    assert check_integrity(SHA256_REQUEST, md5_key) is IntegrityCheck.INVALID


@pytest.mark.parametrize(
    "name", ["rfc5769-request.bin", "rfc5769-ipv4-response.bin", "rfc5769-ipv6-response.bin"]
)
def test_rfc5769_short_term_vectors_verify(name: str) -> None:
    data = (DATA / name).read_bytes()
    assert check_integrity(data, SHORT_TERM_PASSWORD) is IntegrityCheck.VALID
    assert check_integrity(data, b"not the password") is IntegrityCheck.INVALID


def test_sha256_integrity_round_trip_and_preference() -> None:
    key = long_term_key("1700000000:alice", "dtx.test", "pw", PasswordAlgorithm.SHA256)
    msg = StunMessage(StunMethod.ALLOCATE, StunClass.REQUEST, LT_TID,
                      (requested_transport_attribute(),))
    data = encode_stun(msg, key=key, integrity=Integrity.SHA256)
    decoded = decode_stun(data)
    assert [a.type for a in decoded.attributes] == [
        AttrType.REQUESTED_TRANSPORT, AttrType.MESSAGE_INTEGRITY_SHA256, AttrType.FINGERPRINT]
    assert len(decoded.attributes[1].value) == 32
    assert check_integrity(data, key) is IntegrityCheck.VALID
    # signing again replaces the integrity attribute, whichever kind it was
    again = encode_stun(decoded, key=b"other key")
    types = [a.type for a in decode_stun(again).attributes]
    assert types == [AttrType.REQUESTED_TRANSPORT, AttrType.MESSAGE_INTEGRITY,
                     AttrType.FINGERPRINT]
    assert check_integrity(again, b"other key") is IntegrityCheck.VALID


def test_check_integrity_sees_sha256_after_sha1() -> None:
    msg = StunMessage(StunMethod.REFRESH, StunClass.REQUEST, LT_TID, (lifetime_attribute(600),))
    sha1 = encode_stun(msg, fingerprint=False, key=b"k1")
    # append a MESSAGE-INTEGRITY-SHA256 over everything so far, by hand
    covered = sha1[:2] + (len(sha1) - 20 + 36).to_bytes(2, "big") + sha1[4:]
    mac = hmac.new(b"k2", covered, hashlib.sha256).digest()
    both = covered + bytes.fromhex("001c0020") + mac
    assert [a.type for a in decode_stun(both).attributes] == [
        AttrType.LIFETIME, AttrType.MESSAGE_INTEGRITY, AttrType.MESSAGE_INTEGRITY_SHA256]
    assert check_integrity(both, b"k2") is IntegrityCheck.VALID
    assert check_integrity(both, b"k1") is IntegrityCheck.INVALID  # SHA-256 wins
    assert check_integrity(sha1, b"k1") is IntegrityCheck.VALID


def test_truncated_sha256_integrity_is_accepted() -> None:
    msg = StunMessage(StunMethod.REFRESH, StunClass.REQUEST, LT_TID, (lifetime_attribute(0),))
    head = encode_stun(msg, fingerprint=False)
    covered = head[:2] + (len(head) - 20 + 20).to_bytes(2, "big") + head[4:]
    mac = hmac.new(b"k", covered, hashlib.sha256).digest()[:16]
    data = covered + bytes.fromhex("001c0010") + mac
    assert check_integrity(data, b"k") is IntegrityCheck.VALID
    assert check_integrity(data, b"x") is IntegrityCheck.INVALID


def test_integrity_absent_and_garbage() -> None:
    plain = encode_stun(StunMessage(StunMethod.BINDING, StunClass.REQUEST, LT_TID))
    assert check_integrity(plain, b"k") is IntegrityCheck.ABSENT
    assert check_integrity(b"", b"k") is IntegrityCheck.ABSENT
    assert check_integrity(LONG_TERM_REQUEST[:-4], b"k") is IntegrityCheck.INVALID


def test_up_to_integrity_drops_what_follows() -> None:
    key = b"k"
    msg = StunMessage(StunMethod.ALLOCATE, StunClass.SUCCESS, LT_TID, (lifetime_attribute(600),))
    signed = encode_stun(msg, fingerprint=False, key=key)
    # someone appends a forged relayed address after the integrity
    forged = relayed_address_attribute(("203.0.113.66", 1), LT_TID)
    extra = bytes.fromhex("0016") + len(forged.value).to_bytes(2, "big") + forged.value
    data = signed[:2] + (len(signed) - 20 + len(extra)).to_bytes(2, "big") + signed[4:] + extra
    decoded = decode_stun(data)
    assert decoded.xor_relayed_address == ("203.0.113.66", 1)
    assert check_integrity(data, key) is IntegrityCheck.VALID  # it covers only what precedes it
    trimmed = decoded.up_to_integrity()
    assert trimmed.xor_relayed_address is None
    assert trimmed.lifetime == 600
    assert trimmed.attributes[-1].type == AttrType.MESSAGE_INTEGRITY
    unsigned = decode_stun(encode_stun(msg))
    assert unsigned.up_to_integrity() is unsigned


def test_opaque_string_mapping() -> None:
    # non-ASCII spaces map to U+0020 and text is NFC-normalised (RFC 8265)
    assert long_term_key("u", "r", "a\u00a0b") == long_term_key("u", "r", "a b")
    assert long_term_key("u", "r", "e\u0301") == long_term_key("u", "r", "\u00e9")
    assert long_term_key("u", "r\u2003x", "p") == long_term_key("u", "r x", "p")
    # realm bytes that are not UTF-8 are used as they are
    raw = b"\xff\xfe"
    want = hashlib.md5(b"u:" + raw + b":p").digest()
    assert long_term_key("u", raw, "p") == want
    with pytest.raises(LocalProtocolError):
        long_term_key("u", "r", "p", algorithm=3)


def test_credential_attribute_limits() -> None:
    assert username_attribute("x" * 512).value == b"x" * 512
    with pytest.raises(LocalProtocolError):
        username_attribute("x" * 513)
    with pytest.raises(LocalProtocolError):
        realm_attribute(b"r" * 764)
    with pytest.raises(LocalProtocolError):
        nonce_attribute(b"n" * 764)
    with pytest.raises(LocalProtocolError):
        password_algorithms_attribute(())
    classic = StunMessage(StunMethod.BINDING, StunClass.REQUEST, bytes(16), classic=True)
    with pytest.raises(LocalProtocolError):
        encode_stun(classic, key=b"k")


# -- TURN messages -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "cls", "wire"),
    [
        (StunMethod.ALLOCATE, StunClass.REQUEST, 0x0003),
        (StunMethod.ALLOCATE, StunClass.SUCCESS, 0x0103),
        (StunMethod.ALLOCATE, StunClass.ERROR, 0x0113),
        (StunMethod.REFRESH, StunClass.REQUEST, 0x0004),
        (StunMethod.SEND, StunClass.INDICATION, 0x0016),
        (StunMethod.DATA, StunClass.INDICATION, 0x0017),
        (StunMethod.CREATE_PERMISSION, StunClass.REQUEST, 0x0008),
        (StunMethod.CREATE_PERMISSION, StunClass.SUCCESS, 0x0108),
        (StunMethod.CHANNEL_BIND, StunClass.REQUEST, 0x0009),
        (StunMethod.CHANNEL_BIND, StunClass.ERROR, 0x0119),
    ],
)
def test_turn_message_types(method: int, cls: StunClass, wire: int) -> None:
    data = encode_stun(StunMessage(method, cls, LT_TID), fingerprint=False)
    assert data[:2] == wire.to_bytes(2, "big")
    decoded = decode_stun(data)
    assert decoded.method is method  # decoded to the named method
    assert classify(data) is PacketKind.STUN


def test_turn_attribute_golden_bytes() -> None:
    # RFC 8656 section 18: value layouts
    assert requested_transport_attribute() == Attribute(0x0019, bytes.fromhex("11000000"))
    assert lifetime_attribute(600) == Attribute(0x000D, bytes.fromhex("00000258"))
    assert channel_number_attribute(0x4001) == Attribute(0x000C, bytes.fromhex("40010000"))
    assert data_attribute(b"hi") == Attribute(0x0013, b"hi")
    # XOR-PEER-ADDRESS and XOR-RELAYED-ADDRESS encode like XOR-MAPPED-ADDRESS
    # (the RFC 5769 section 2.2 value for 192.0.2.1:32853)
    assert peer_address_attribute(("192.0.2.1", 32853), RFC5769_TID) == Attribute(
        0x0012, bytes.fromhex("0001a147e112a643"))
    assert relayed_address_attribute(("192.0.2.1", 32853), RFC5769_TID) == Attribute(
        0x0016, bytes.fromhex("0001a147e112a643"))
    assert password_algorithm_attribute(PasswordAlgorithm.SHA256) == Attribute(
        0x001D, bytes.fromhex("00020000"))
    assert password_algorithms_attribute((2, 1)) == Attribute(
        0x8002, bytes.fromhex("0002000000010000"))


def test_allocate_request_golden() -> None:
    msg = StunMessage(StunMethod.ALLOCATE, StunClass.REQUEST, RFC5769_TID,
                      (requested_transport_attribute(), lifetime_attribute(600)))
    assert encode_stun(msg, fingerprint=False) == bytes.fromhex(
        "00030010" "2112a442" "b7e7a701bc34d686fa87dfae"
        "00190004" "11000000"
        "000d0004" "00000258"
    )


def test_turn_views_round_trip() -> None:
    tid = LT_TID
    msg = StunMessage(
        StunMethod.ALLOCATE, StunClass.SUCCESS, tid,
        (
            relayed_address_attribute(("198.51.100.1", 50000), tid),
            xor_address_attribute(("203.0.113.9", 40001), tid),
            lifetime_attribute(3600),
            peer_address_attribute(("192.0.2.7", 1), tid),
            peer_address_attribute(("2001:db8::7", 2), tid),
            channel_number_attribute(CHANNEL_MAX),
            requested_transport_attribute(),
            data_attribute(b"\x00payload"),
            username_attribute("1700000000:alice"),
            realm_attribute(b"dtx.test"),
            nonce_attribute(b"abc"),
            password_algorithms_attribute((PasswordAlgorithm.SHA256, PasswordAlgorithm.MD5)),
            password_algorithm_attribute(PasswordAlgorithm.MD5),
        ),
    )
    m = decode_stun(encode_stun(msg, key=b"k"))
    assert m.xor_relayed_address == ("198.51.100.1", 50000)
    assert m.xor_mapped_address == ("203.0.113.9", 40001)
    assert m.lifetime == 3600
    assert m.xor_peer_address == ("192.0.2.7", 1)
    assert m.xor_peer_addresses == (("192.0.2.7", 1), ("2001:db8::7", 2))
    assert m.channel_number == CHANNEL_MAX
    assert m.requested_transport == 17
    assert m.data == b"\x00payload"
    assert m.username == b"1700000000:alice"
    assert m.realm == b"dtx.test"
    assert m.nonce == b"abc"
    assert m.password_algorithms == (2, 1)
    assert m.password_algorithm == 1
    empty = StunMessage(StunMethod.REFRESH, StunClass.REQUEST, tid)
    for view in ("xor_relayed_address", "xor_peer_address", "lifetime", "channel_number",
                 "requested_transport", "data", "username", "realm", "nonce",
                 "password_algorithms", "password_algorithm"):
        assert getattr(empty, view) is None, view
    assert empty.xor_peer_addresses == ()


HEADER = bytes.fromhex("0003") + b"\x00\x00" + MAGIC_COOKIE.to_bytes(4, "big") + LT_TID


def with_body(body: bytes) -> bytes:
    return HEADER[:2] + len(body).to_bytes(2, "big") + HEADER[4:] + body


MALFORMED = [
    ("lifetime 2 bytes", with_body(bytes.fromhex("000d000202580000"))),
    ("lifetime 8 bytes", with_body(bytes.fromhex("000d0008") + bytes(8))),
    ("channel 2 bytes", with_body(bytes.fromhex("000c00024000") + bytes(2))),
    ("transport 1 byte", with_body(bytes.fromhex("0019000111") + bytes(3))),
    ("peer bad family", with_body(bytes.fromhex("00120008" "0003" "0050") + bytes(4))),
    ("relayed short", with_body(bytes.fromhex("00160004") + bytes(4))),
    ("integrity-sha256 12 bytes", with_body(bytes.fromhex("001c000c") + bytes(12))),
    ("integrity-sha256 18 bytes", with_body(bytes.fromhex("001c0012") + bytes(20))),
    ("integrity-sha256 36 bytes", with_body(bytes.fromhex("001c0024") + bytes(36))),
    ("algorithms empty", with_body(bytes.fromhex("80020000"))),
    ("algorithms truncated", with_body(bytes.fromhex("800200020002") + bytes(2))),
    ("algorithms params past end", with_body(bytes.fromhex("8002000400020004"))),
    ("algorithm two of them", with_body(bytes.fromhex("001d00080002000000010000"))),
]


@pytest.mark.parametrize(("label", "data"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_turn_attributes(label: str, data: bytes) -> None:
    with pytest.raises(DecodeError):
        decode_stun(data)


def test_error_response_with_credentials() -> None:
    msg = StunMessage(StunMethod.ALLOCATE, StunClass.ERROR, LT_TID, (
        error_code_attribute(401, "Unauthorized"), realm_attribute(b"dtx.test"),
        nonce_attribute(b"obMatJos2AAABxyz"),
        password_algorithms_attribute((PasswordAlgorithm.MD5, PasswordAlgorithm.SHA256)),
        software_attribute("test"),
    ))
    m = decode_stun(encode_stun(msg))
    assert m.error_code is not None and m.error_code.code == 401
    assert m.password_algorithms == (1, 2)


# -- ChannelData ------------------------------------------------------------------------


def test_channel_data_golden() -> None:
    assert encode_channel_data(0x4000, b"abc") == bytes.fromhex("40000003616263")
    assert encode_channel_data(0x4000, b"abc", pad=True) == bytes.fromhex("4000000361626300")
    assert encode_channel_data(0x4FFF, b"abcd", pad=True) == bytes.fromhex("4fff000461626364")
    assert encode_channel_data(0x4001, b"") == bytes.fromhex("40010000")
    for raw in (bytes.fromhex("40000003616263"), bytes.fromhex("4000000361626300")):
        assert decode_channel_data(raw) == ChannelData(0x4000, b"abc")
    # any padding content is accepted, as RFC 8656 leaves it unspecified
    assert decode_channel_data(bytes.fromhex("40000001") + b"x\xff\xff\xff").data == b"x"


def test_channel_data_first_bytes() -> None:
    assert all(is_channel_data(encode_channel_data(c, b"x")) for c in (CHANNEL_MIN, CHANNEL_MAX))
    assert {encode_channel_data(c, b"")[0] for c in range(CHANNEL_MIN, CHANNEL_MAX + 1)} \
        == set(range(64, 80))
    assert not is_channel_data(b"")
    assert not is_channel_data(b"\x3f\x00\x00\x00")
    assert not is_channel_data(b"\x50\x00\x00\x00")
    # the demux sees 64..79 as QUIC: only the TURN server's address makes it ChannelData
    assert classify(encode_channel_data(CHANNEL_MIN, b"x")) is PacketKind.QUIC


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x40\x00\x00",
        bytes.fromhex("3fff0000"),  # below the channel range
        bytes.fromhex("50000000"),  # reserved
        bytes.fromhex("ffff0000"),
        bytes.fromhex("40000004616263"),  # length past the datagram
        bytes.fromhex("400000036162630000"),  # two bytes after, only one is padding
        bytes.fromhex("4000000461626364ff"),  # a multiple of 4 needs no padding
        bytes.fromhex("40000000ff"),
    ],
)
def test_channel_data_refused(data: bytes) -> None:
    with pytest.raises(DecodeError):
        decode_channel_data(data)


def test_channel_data_encode_limits() -> None:
    for channel in (CHANNEL_MIN - 1, CHANNEL_MAX + 1, 0xFFFF):
        with pytest.raises(LocalProtocolError):
            encode_channel_data(channel, b"")
        with pytest.raises(LocalProtocolError):
            channel_number_attribute(channel)
    with pytest.raises(LocalProtocolError):
        encode_channel_data(CHANNEL_MIN, bytes(65536))
    with pytest.raises(LocalProtocolError):
        lifetime_attribute(-1)


@given(st.integers(CHANNEL_MIN, CHANNEL_MAX), st.binary(max_size=1500), st.booleans())
def test_channel_data_round_trip(channel: int, payload: bytes, pad: bool) -> None:
    data = encode_channel_data(channel, payload, pad=pad)
    assert len(data) % 4 == 0 or not pad
    assert decode_channel_data(data) == ChannelData(channel, payload)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=64))
def test_channel_data_raises_only_decode_error(data: bytes) -> None:
    try:
        frame = decode_channel_data(data)
    except DecodeError:
        return
    assert CHANNEL_MIN <= frame.channel <= CHANNEL_MAX
    assert data[4:].startswith(frame.data)


# -- property tests -------------------------------------------------------------------

addresses = st.tuples(
    st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).map(str),
    st.integers(min_value=0, max_value=0xFFFF),
)


@st.composite
def turn_messages(draw: st.DrawFn) -> StunMessage:
    tid = draw(st.binary(min_size=12, max_size=12))
    attr = st.one_of(
        st.builds(lambda a: relayed_address_attribute(a, tid), addresses),
        st.builds(lambda a: peer_address_attribute(a, tid), addresses),
        st.builds(lifetime_attribute, st.integers(0, 0xFFFFFFFF)),
        st.builds(channel_number_attribute, st.integers(CHANNEL_MIN, CHANNEL_MAX)),
        st.builds(requested_transport_attribute, st.integers(0, 255)),
        st.builds(data_attribute, st.binary(max_size=60)),
        st.builds(username_attribute, st.text(max_size=20)),
        st.builds(realm_attribute, st.binary(max_size=20)),
        st.builds(nonce_attribute, st.binary(max_size=20)),
        st.builds(password_algorithms_attribute,
                  st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=3).map(tuple)),
        st.builds(password_algorithm_attribute, st.integers(0, 0xFFFF)),
    )
    return StunMessage(
        method=draw(st.sampled_from([StunMethod.ALLOCATE, StunMethod.REFRESH, StunMethod.SEND,
                                     StunMethod.DATA, StunMethod.CREATE_PERMISSION,
                                     StunMethod.CHANNEL_BIND])),
        cls=draw(st.sampled_from(StunClass)),
        transaction_id=tid,
        attributes=tuple(draw(st.lists(attr, max_size=6))),
    )


@settings(max_examples=300, deadline=None)
@given(turn_messages(), st.binary(min_size=1, max_size=32), st.sampled_from(Integrity),
       st.data())
def test_property_signed_turn_messages(msg: StunMessage, key: bytes, integrity: Integrity,
                                       data: st.DataObject) -> None:
    raw = encode_stun(msg, key=key, integrity=integrity)
    decoded = decode_stun(raw)
    assert decoded.up_to_integrity().attributes[:-1] == msg.attributes
    assert check_integrity(raw, key) is IntegrityCheck.VALID
    assert check_integrity(raw, key + b"!") is IntegrityCheck.INVALID
    # a flipped bit anywhere before the integrity value is caught
    mac_len = 20 if integrity is Integrity.SHA1 else 32
    covered_end = len(raw) - 8 - mac_len - 4
    index = data.draw(st.integers(0, covered_end - 1))
    if 2 <= index < 8:
        return  # the length (rewritten for the MAC) or the cookie
    flipped = bytearray(raw)
    flipped[index] ^= 1 << data.draw(st.integers(0, 7))
    assert check_integrity(bytes(flipped), key) is not IntegrityCheck.VALID


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=120), st.binary(max_size=8))
def test_property_check_integrity_never_raises(data: bytes, key: bytes) -> None:
    assert check_integrity(data, key) in IntegrityCheck


TURN_TYPES = [int(t) for t in AttrType if 0x000C <= t <= 0x001D or t >= 0x8000]


@st.composite
def turnlike(draw: st.DrawFn) -> bytes:
    """Valid framing with TURN attribute types and random values, so fuzzing
    reaches the new value checks."""
    body = b""
    for _ in range(draw(st.integers(0, 4))):
        value = draw(st.binary(max_size=24))
        attr_type = draw(st.sampled_from(TURN_TYPES))
        body += attr_type.to_bytes(2, "big") + len(value).to_bytes(2, "big") + value
        body += bytes(-len(value) % 4)
    msg_type = draw(st.integers(min_value=0, max_value=0x3FFF))
    tid = draw(st.binary(min_size=12, max_size=12))
    return (msg_type.to_bytes(2, "big") + len(body).to_bytes(2, "big")
            + MAGIC_COOKIE.to_bytes(4, "big") + tid + body)


@settings(max_examples=1000, deadline=None)
@given(turnlike())
def test_property_turnlike_bytes_raise_only_decode_error(data: bytes) -> None:
    try:
        msg = decode_stun(data)
    except DecodeError:
        return
    assert encode_stun(msg, fingerprint=False) == data
    for view in ("xor_relayed_address", "xor_peer_address", "xor_peer_addresses", "lifetime",
                 "channel_number", "requested_transport", "data", "username", "realm", "nonce",
                 "password_algorithms", "password_algorithm"):
        getattr(msg, view)
    msg.up_to_integrity()
