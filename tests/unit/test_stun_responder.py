"""The sans-IO STUN Binding responder: answers, drops, and the 3x cap."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dtx.wire.stun import (
    MAGIC_COOKIE,
    Attribute,
    AttrType,
    StunClass,
    StunMessage,
    StunMethod,
    binding_request,
    change_request_attribute,
    decode_stun,
    encode_stun,
    response_port_attribute,
    software_attribute,
)
from rendezvous.stun import AMPLIFICATION_FACTOR, ServerAddresses, answer_binding, answer_stun

DATA = Path(__file__).resolve().parent.parent / "data" / "stun"
TID = bytes(range(12))
TID16 = bytes(range(100, 116))
PRIMARY = ("192.0.2.1", 3478)
FULL = ServerAddresses(primary=PRIMARY, alt_ip="192.0.2.2", alt_port=3479)
BASIC = ServerAddresses(primary=PRIMARY)
PORT_ONLY = ServerAddresses(primary=PRIMARY, alt_port=3479)
IP_ONLY = ServerAddresses(primary=PRIMARY, alt_ip="192.0.2.2")
CLIENT = ("203.0.113.5", 50000)
CLIENT6 = ("2001:db8::5", 50000)
SERVERS = {"full": FULL, "basic": BASIC, "port-only": PORT_ONLY, "ip-only": IP_ONLY}


def request(
    attrs: tuple[Attribute, ...] = (),
    *,
    tid: bytes = TID,
    method: int = StunMethod.BINDING,
    cls: StunClass = StunClass.REQUEST,
    fingerprint: bool = False,
) -> bytes:
    msg = StunMessage(method, cls, tid, attrs, classic=len(tid) == 16)
    return encode_stun(msg, fingerprint=fingerprint)


def answer(
    data: bytes,
    *,
    src: tuple[str, int] = CLIENT,
    local: tuple[str, int] = PRIMARY,
    addresses: ServerAddresses = FULL,
    software: str | None = None,
) -> tuple[StunMessage, tuple[str, int]]:
    out = answer_binding(data, src=src, local=local, addresses=addresses, software=software)
    assert out is not None
    response, send_from = out
    assert len(response) <= AMPLIFICATION_FACTOR * len(data)
    return decode_stun(response), send_from


def test_sockets() -> None:
    assert FULL.sockets() == (
        ("192.0.2.1", 3478),
        ("192.0.2.1", 3479),
        ("192.0.2.2", 3478),
        ("192.0.2.2", 3479),
    )
    assert BASIC.sockets() == (PRIMARY,)
    assert PORT_ONLY.sockets() == (PRIMARY, ("192.0.2.1", 3479))
    assert FULL.rfc5780 and not PORT_ONLY.rfc5780 and not IP_ONLY.rfc5780


# -- RFC 8489 / RFC 5780 ---------------------------------------------------------


def test_bare_request_gets_mapped_address_and_rfc5780_pair() -> None:
    data = request()
    assert len(data) == 20
    msg, send_from = answer(data)
    assert send_from == PRIMARY
    assert msg.cls == StunClass.SUCCESS and msg.method == StunMethod.BINDING
    assert msg.transaction_id == TID and not msg.classic
    assert msg.xor_mapped_address == CLIENT
    assert msg.mapped_address is None
    assert msg.other_address == ("192.0.2.2", 3479)
    assert msg.response_origin == PRIMARY
    assert not msg.has_fingerprint  # 20 + 36 + 8 would pass 60 bytes


def test_request_with_fingerprint_gets_everything() -> None:
    msg, _ = answer(binding_request(TID), software="dtx-rendezvous 0.1")
    assert msg.xor_mapped_address == CLIENT
    assert msg.other_address == ("192.0.2.2", 3479)
    assert msg.response_origin == PRIMARY
    assert msg.has_fingerprint
    assert msg.software is None  # 64 + 24 would pass 84 bytes


def test_software_when_it_fits() -> None:
    padded = request((Attribute(AttrType.PADDING, bytes(40)),), fingerprint=True)
    msg, _ = answer(padded, software="dtx-rendezvous")
    assert msg.software == "dtx-rendezvous"
    assert msg.has_fingerprint


def test_ipv6_client_within_budget() -> None:
    msg, _ = answer(request(), src=CLIENT6)
    assert msg.xor_mapped_address == CLIENT6
    msg, _ = answer(binding_request(TID), src=CLIENT6)
    assert msg.xor_mapped_address == CLIENT6
    assert msg.has_fingerprint  # required: the request had one


def test_basic_server_has_no_rfc5780_attributes() -> None:
    msg, send_from = answer(binding_request(TID), addresses=BASIC, software="x")
    assert send_from == PRIMARY
    assert msg.xor_mapped_address == CLIENT
    assert msg.other_address is None and msg.response_origin is None
    assert msg.software == "x"


LOCALS = FULL.sockets()
FLAGS = list(itertools.product([False, True], repeat=2))


@pytest.mark.parametrize("local", LOCALS)
@pytest.mark.parametrize(("change_ip", "change_port"), FLAGS)
def test_change_request_from_every_local_address(
    local: tuple[str, int], change_ip: bool, change_port: bool
) -> None:
    data = binding_request(TID, change_ip=change_ip, change_port=change_port)
    msg, send_from = answer(data, local=local)
    other_ip = "192.0.2.2" if local[0] == "192.0.2.1" else "192.0.2.1"
    other_port = 3479 if local[1] == 3478 else 3478
    want = (other_ip if change_ip else local[0], other_port if change_port else local[1])
    assert send_from == want
    assert msg.response_origin == want
    assert msg.other_address == (other_ip, other_port)
    assert msg.xor_mapped_address == CLIENT


@pytest.mark.parametrize(
    ("server", "change_ip", "change_port", "answered_from"),
    [
        (BASIC, True, False, None),
        (BASIC, False, True, None),
        (BASIC, False, False, PRIMARY),
        (PORT_ONLY, False, True, ("192.0.2.1", 3479)),
        (PORT_ONLY, True, True, None),
        (IP_ONLY, True, False, ("192.0.2.2", 3478)),
        (IP_ONLY, False, True, None),
    ],
)
def test_change_request_without_alternates(
    server: ServerAddresses,
    change_ip: bool,
    change_port: bool,
    answered_from: tuple[str, int] | None,
) -> None:
    data = request((change_request_attribute(change_ip=change_ip, change_port=change_port),))
    msg, send_from = answer(data, addresses=server)
    if answered_from is None:
        assert msg.cls == StunClass.ERROR
        assert msg.error_code is not None and msg.error_code.code == 420
        assert msg.unknown_attributes == (AttrType.CHANGE_REQUEST,)
        assert send_from == PRIMARY
    else:
        assert msg.cls == StunClass.SUCCESS
        assert send_from == answered_from
        assert msg.other_address is None  # only a full RFC 5780 server says it


def test_unknown_comprehension_required_attribute_gets_420() -> None:
    data = request(
        (
            Attribute(0x7777, b"x"),
            Attribute(0xC777, b"optional, ignored"),
            Attribute(0x7777, b"again"),
            Attribute(AttrType.RESPONSE_PORT, b"\x13\x88\x00\x00"),
        )
    )
    msg, send_from = answer(data)
    assert send_from == PRIMARY
    assert msg.cls == StunClass.ERROR and msg.method == StunMethod.BINDING
    assert msg.error_code is not None and msg.error_code.code == 420
    assert msg.unknown_attributes == (0x7777, AttrType.RESPONSE_PORT)


def test_unknown_optional_attribute_is_ignored() -> None:
    msg, _ = answer(request((Attribute(0xC777, b"hello"),)))
    assert msg.cls == StunClass.SUCCESS


def test_rfc5769_sample_request_gets_420_for_priority() -> None:
    # USERNAME and MESSAGE-INTEGRITY are accepted and ignored; PRIORITY (ICE)
    # is comprehension-required and not a STUN server's business.
    data = (DATA / "rfc5769-request.bin").read_bytes()
    msg, _ = answer(data)
    assert msg.cls == StunClass.ERROR
    assert msg.unknown_attributes == (0x0024,)
    assert msg.has_fingerprint  # the request had one


def test_credentials_are_ignored() -> None:
    attrs = (
        Attribute(AttrType.USERNAME, b"user"),
        Attribute(AttrType.MESSAGE_INTEGRITY, bytes(20)),
    )
    msg, _ = answer(request(attrs, fingerprint=True))
    assert msg.cls == StunClass.SUCCESS
    assert msg.attribute(AttrType.MESSAGE_INTEGRITY) is None


def test_other_method_gets_400() -> None:
    msg, _ = answer(request(method=0x003))  # TURN Allocate
    assert msg.cls == StunClass.ERROR and msg.method == 0x003
    assert msg.error_code is not None and msg.error_code.code == 400


@pytest.mark.parametrize("cls", [StunClass.INDICATION, StunClass.SUCCESS, StunClass.ERROR])
def test_non_requests_are_dropped(cls: StunClass) -> None:
    data = request(cls=cls)
    assert answer_binding(data, src=CLIENT, local=PRIMARY, addresses=FULL) is None


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc0" + bytes(40),  # QUIC long header
        b"\x10" + bytes(19),  # dtx frame
        bytes(19),
        request()[:-1],
        binding_request(TID)[:-1] + b"\x00",  # bad FINGERPRINT
    ],
)
def test_garbage_is_dropped(data: bytes) -> None:
    assert answer_binding(data, src=CLIENT, local=PRIMARY, addresses=FULL) is None


def test_ipv4_mapped_source_is_unwrapped() -> None:
    msg, _ = answer(request(), src=("::ffff:203.0.113.5", 50000))
    assert msg.xor_mapped_address == CLIENT


def test_wildcard_local_address_counts_as_primary() -> None:
    msg, send_from = answer(request(), local=("0.0.0.0", 3478))
    assert send_from == PRIMARY
    assert msg.response_origin == PRIMARY


# -- RFC 3489 ----------------------------------------------------------------------


def pystun3_request(change: str = "") -> bytes:
    """A request as pystun3 builds it: hex type, length, 16-byte id, attributes."""
    body = bytes.fromhex(change)
    return bytes.fromhex("0001") + len(body).to_bytes(2, "big") + TID16 + body


def test_classic_request() -> None:
    data = pystun3_request()
    msg, send_from = answer(data, software="ignored for classic clients")
    assert send_from == PRIMARY
    assert msg.classic and msg.transaction_id == TID16
    assert msg.cls == StunClass.SUCCESS
    assert msg.mapped_address == CLIENT
    assert msg.source_address == PRIMARY
    assert msg.changed_address == ("192.0.2.2", 3479)
    assert msg.software is None
    # every attribute is a whole number of words: pystun3 ignores padding
    assert all(len(a.value) % 4 == 0 for a in msg.attributes)
    response = encode_stun(msg)
    assert response[4:20] == TID16  # pystun3 matches these 16 bytes


@pytest.mark.parametrize(("flags", "want"), [
    ("00000006", ("192.0.2.2", 3479)),
    ("00000002", ("192.0.2.1", 3479)),
    ("00000004", ("192.0.2.2", 3478)),
    ("00000000", PRIMARY),
])
def test_classic_change_request(flags: str, want: tuple[str, int]) -> None:
    data = pystun3_request("00030004" + flags)
    msg, send_from = answer(data)
    assert send_from == want
    assert msg.source_address == want
    assert msg.mapped_address == CLIENT


def test_classic_change_request_that_cannot_be_honoured_is_dropped() -> None:
    data = pystun3_request("0003000400000006")
    assert answer_binding(data, src=CLIENT, local=PRIMARY, addresses=BASIC) is None


def test_classic_other_method_is_dropped() -> None:
    data = request(tid=TID16, method=0x002)  # Shared Secret
    assert answer_binding(data, src=CLIENT, local=PRIMARY, addresses=FULL) is None


def test_classic_response_address_is_not_honoured() -> None:
    data = pystun3_request("00020008" + "0001" + "0050" + "c6336401")
    msg, send_from = answer(data)
    assert send_from == PRIMARY
    assert msg.mapped_address == CLIENT


# -- amplification, every request shape --------------------------------------------

SHAPES: dict[str, bytes] = {
    "bare": request(),
    "fingerprint": binding_request(TID),
    "change both": request((change_request_attribute(change_ip=True, change_port=True),)),
    "change both + fp": binding_request(TID, change_ip=True, change_port=True),
    "change port": request((change_request_attribute(change_ip=False, change_port=True),)),
    "change ip": request((change_request_attribute(change_ip=True, change_port=False),)),
    "unknown required": request((Attribute(0x7777, b""),)),
    "many unknown": request(tuple(Attribute(0x7000 + i, b"") for i in range(8))),
    "unknown + fp": request((Attribute(0x7777, b""),), fingerprint=True),
    "response port": request((response_port_attribute(1),)),
    "response port + change": request(
        (response_port_attribute(1), change_request_attribute(change_ip=True, change_port=True))
    ),
    "other method": request(method=0x003),
    "other method + fp": request(method=0x003, fingerprint=True),
    "padding": request((Attribute(AttrType.PADDING, bytes(100)),)),
    "software": request((software_attribute("client"),)),
    "rfc5769": (DATA / "rfc5769-request.bin").read_bytes(),
    "classic": pystun3_request(),
    "classic change": pystun3_request("0003000400000006"),
    "classic change port": pystun3_request("0003000400000002"),
    "classic unknown": pystun3_request("77770000"),
}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("server", list(SERVERS))
@pytest.mark.parametrize("src", [CLIENT, CLIENT6])
@pytest.mark.parametrize("which", ["first", "last"])
def test_no_response_exceeds_three_times_its_request(
    shape: str, server: str, src: tuple[str, int], which: str
) -> None:
    data = SHAPES[shape]
    sockets = SERVERS[server].sockets()
    local = sockets[0] if which == "first" else sockets[-1]
    out = answer_binding(
        data, src=src, local=local, addresses=SERVERS[server], software="dtx-rendezvous 0.1"
    )
    if out is not None:
        response, send_from = out
        assert len(response) <= AMPLIFICATION_FACTOR * len(data)
        msg = decode_stun(response)
        assert msg.cls in (StunClass.SUCCESS, StunClass.ERROR)
        assert send_from in sockets
        if msg.cls == StunClass.SUCCESS:
            assert msg.reflexive_address == src


@st.composite
def stunlike(draw: st.DrawFn) -> bytes:
    """Bytes framed like STUN, so fuzzing gets past the cheap checks."""
    body = draw(st.binary(max_size=80))
    body += bytes(-len(body) % 4)
    cookie = draw(st.sampled_from([MAGIC_COOKIE.to_bytes(4, "big"), b"\x00\x00\x00\x00"]))
    msg_type = draw(st.sampled_from([0x0001, 0x0011, 0x0101, 0x0003, 0x0002]))
    return (
        msg_type.to_bytes(2, "big")
        + len(body).to_bytes(2, "big")
        + cookie
        + draw(st.binary(min_size=12, max_size=12))
        + body
    )


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    """Well-formed Binding requests with a random mix of attributes."""
    tid = draw(st.sampled_from([TID, TID16]))
    attr = st.one_of(
        st.builds(
            lambda i, p: change_request_attribute(change_ip=i, change_port=p),
            st.booleans(),
            st.booleans(),
        ),
        st.builds(Attribute, st.integers(0, 0xFFFF).filter(
            lambda t: t not in {int(a) for a in AttrType}), st.binary(max_size=12)),
        st.builds(lambda n: Attribute(AttrType.PADDING, bytes(n)), st.integers(0, 64)),
        st.builds(response_port_attribute, st.integers(0, 0xFFFF)),
    )
    return request(
        tuple(draw(st.lists(attr, max_size=4))),
        tid=tid,
        fingerprint=draw(st.booleans()),
    )


@settings(max_examples=400, deadline=None)
@given(
    st.one_of(st.binary(max_size=120), stunlike(), requests()),
    st.sampled_from(list(SERVERS.values())),
    st.sampled_from([CLIENT, CLIENT6]),
)
def test_property_never_raises_never_amplifies(
    data: bytes, server: ServerAddresses, src: tuple[str, int]
) -> None:
    out = answer_binding(data, src=src, local=PRIMARY, addresses=server, software="dtx")
    if out is not None:
        response, _ = out
        assert len(response) <= AMPLIFICATION_FACTOR * len(data)
        decode_stun(response)


# -- RFC 5780 RESPONSE-PORT (answer_stun) -------------------------------------------


def test_response_port_goes_to_the_same_ip() -> None:
    data = request(
        (
            response_port_attribute(50001),
            change_request_attribute(change_ip=True, change_port=True),
        )
    )
    reply = answer_stun(data, src=CLIENT, local=PRIMARY, addresses=FULL)
    assert reply is not None
    assert reply.send_to == ("203.0.113.5", 50001)
    assert reply.send_from == ("192.0.2.2", 3479)
    assert len(reply.data) <= AMPLIFICATION_FACTOR * len(data)
    msg = decode_stun(reply.data)
    assert msg.cls == StunClass.SUCCESS
    assert msg.xor_mapped_address == CLIENT  # the sender, not the response port


def test_answer_binding_refuses_response_port() -> None:
    data = request((response_port_attribute(50001),))
    msg, send_from = answer(data)
    assert msg.cls == StunClass.ERROR
    assert msg.unknown_attributes == (AttrType.RESPONSE_PORT,)


def test_errors_never_go_to_the_response_port() -> None:
    data = request((response_port_attribute(50001), Attribute(0x7777, b"")))
    reply = answer_stun(data, src=CLIENT, local=PRIMARY, addresses=FULL)
    assert reply is not None and reply.send_to == CLIENT
    assert decode_stun(reply.data).unknown_attributes == (0x7777,)
    zero = answer_stun(
        request((response_port_attribute(0),)), src=CLIENT, local=PRIMARY, addresses=FULL
    )
    assert zero is not None and zero.send_to == CLIENT
    error = decode_stun(zero.data).error_code
    assert error is not None and error.code == 400


def test_plain_reply_goes_to_sender() -> None:
    reply = answer_stun(request(), src=CLIENT6, local=PRIMARY, addresses=FULL)
    assert reply is not None
    assert reply.send_to == CLIENT6 and reply.send_from == PRIMARY


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(st.binary(max_size=120), stunlike(), requests()),
    st.sampled_from(list(SERVERS.values())),
    st.sampled_from([CLIENT, CLIENT6]),
)
def test_property_answer_stun_stays_on_the_sender_ip(
    data: bytes, server: ServerAddresses, src: tuple[str, int]
) -> None:
    reply = answer_stun(data, src=src, local=PRIMARY, addresses=server)
    if reply is not None:
        assert len(reply.data) <= AMPLIFICATION_FACTOR * len(data)
        assert reply.send_to[0] == src[0]
        assert reply.send_from in server.sockets()
