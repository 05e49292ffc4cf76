"""Fuzz every decoder that reads bytes from the network.

Each decoder gets arbitrary bytes and, more usefully, mutations of valid
messages (flipped bytes, cut tails, inserted and deleted runs, rewritten
length fields), so the fuzzing reaches past the first length check. The
promise under test: a decoder raises only its typed error
(``DecodeError`` for the wire codecs, ``StreamError`` for the XML
parser), the rendezvous core never raises and counts no internal error,
and the QUIC header check in front of the listening peer raises only the
``ValueError`` it catches. ``--fuzz-examples N`` (tests/conftest.py) sets
the number of examples per test.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Callable
from pathlib import Path

from aioquic.buffer import Buffer  # type: ignore[attr-defined]
from aioquic.quic.packet import pull_quic_header
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dtx.errors import DecodeError, StreamError
from dtx.identity import generate_identity
from dtx.proto.auth import AuthenticatedQuicConnection, make_certificate, quic_configuration
from dtx.proto.xmlstream import XmlStreamParser, encode_stream_header
from dtx.trust import StaticKeys
from dtx.wire.control import (
    Candidate,
    CandidateKind,
    ControlMessage,
    MessageType,
    Probe,
    ProbeKind,
    Role,
    decode_control,
    decode_probe,
    encode_control,
    encode_hello,
    encode_probe,
    encode_register,
)
from dtx.wire.demux import PacketKind, classify
from dtx.wire.natpmp import (
    ExternalAddressRequest,
    ExternalAddressResponse,
    MapRequest,
    MapResponse,
    NatPmpError,
    NatPmpOpcode,
    UnsupportedVersionResponse,
    decode_natpmp_request,
    decode_natpmp_response,
    encode_natpmp,
)
from dtx.wire.pcp import (
    AnswerKind,
    PcpError,
    PcpMap,
    PcpOpcode,
    PcpOption,
    PcpRequest,
    PcpResponse,
    announce_request,
    classify_answer,
    decode_pcp_request,
    decode_pcp_response,
    encode_pcp,
    prefer_failure_option,
    third_party_option,
)
from dtx.wire.relay import decode_relay, encode_relay
from dtx.wire.stun import binding_request, decode_stun
from rendezvous.core import RendezvousConfig, RendezvousCore
from rendezvous.stun import ServerAddresses
from tests.conftest import fuzz_examples

DATA = Path(__file__).resolve().parents[1] / "data"
SERVER = ("198.51.100.1", 3478)
HOME = ("203.0.113.10", 40000)
FUZZ = settings(
    max_examples=fuzz_examples(),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)

# -- mutations of valid messages ------------------------------------------------


def _mutate(seed: bytes, ops: list[tuple[int, int, int, bytes]]) -> bytes:
    """Apply (kind, position, count, bytes) edits to ``seed``."""
    data = bytearray(seed)
    for kind, pos, count, blob in ops:
        at = pos % (len(data) + 1)
        if kind == 0 and data:  # flip one byte
            data[at % len(data)] ^= (count % 255) + 1
        elif kind == 1:  # cut the tail
            del data[at:]
        elif kind == 2:  # insert a run
            data[at:at] = blob
        elif kind == 3:  # delete a run
            del data[at : at + count]
        elif kind == 4 and len(data) >= 2:  # rewrite a 16-bit field (lengths)
            at = at % (len(data) - 1)
            data[at : at + 2] = (count * 257 + pos).to_bytes(4, "big")[-2:]
        elif kind == 5:  # duplicate a run (repeated attributes)
            data[at:at] = data[at : at + count]
    return bytes(data)


_ops = st.lists(
    st.tuples(
        st.integers(0, 5),
        st.integers(0, 2000),
        st.integers(0, 64),
        st.binary(max_size=16),
    ),
    max_size=6,
)


def mutants(seeds: list[bytes]) -> st.SearchStrategy[bytes]:
    """Arbitrary bytes, or a valid seed with a few edits."""
    return st.one_of(
        st.binary(max_size=300),
        st.builds(_mutate, st.sampled_from(seeds), _ops),
    )


# -- seeds -----------------------------------------------------------------------

_alice = generate_identity("alice@example.org/phone")
_TXID = bytes(range(8))
_CANDS = (
    Candidate(CandidateKind.HOST, ("10.0.0.2", 40000)),
    Candidate(CandidateKind.SERVER_REFLEXIVE, ("2001:db8::1", 40001)),
)
CONTROL_SEEDS = [
    encode_hello(_TXID),
    encode_register(
        txid=_TXID,
        jid="alice@example.org/phone",
        key=_alice.public_key,
        challenge=bytes(20),
        candidates=_CANDS,
        sign=_alice.sign,
    ),
    encode_control(ControlMessage(MessageType.KEEPALIVE, _TXID, registration=bytes(8))),
    encode_control(
        ControlMessage(MessageType.INTRODUCE, _TXID, registration=bytes(8), target="tv@example.org")
    ),
    encode_control(
        ControlMessage(MessageType.ACCEPT, _TXID, registration=bytes(8), intro=bytes(8))
    ),
    encode_control(
        ControlMessage(
            MessageType.REGISTERED, _TXID, registration=bytes(8), reflexive=HOME,
            lifetime=90, keepalive=25,
        )
    ),
    encode_control(
        ControlMessage(
            MessageType.INTRODUCTION, _TXID, intro=bytes(8), role=Role.INITIATOR,
            peer_jid="tv@example.org/living-room", peer_key=bytes(32), channel=7,
            probe_key=bytes(32), candidates=_CANDS,
        )
    ),
    encode_control(ControlMessage(MessageType.ERROR, _TXID, error=(404, "unknown"))),
]
PROBE_KEY = bytes(range(32))
PROBE_SEEDS = [
    encode_probe(Probe(ProbeKind.PING, bytes(8), _TXID, None), PROBE_KEY),
    encode_probe(Probe(ProbeKind.PONG, bytes(8), _TXID, HOME), PROBE_KEY),
    encode_probe(Probe(ProbeKind.PONG, bytes(8), _TXID, ("2001:db8::2", 9)), PROBE_KEY),
]
STUN_SEEDS = [
    binding_request(bytes(12)),
    binding_request(bytes(12), change_ip=True, change_port=True),
    binding_request(bytes(16)),
    binding_request(bytes(12), fingerprint=False),
    *(p.read_bytes() for p in sorted((DATA / "stun").glob("*.bin"))),
]
RELAY_SEEDS = [encode_relay(7, b"\xc0" + bytes(40)), encode_relay(0xFFFFFFFF, b"")]
_NATPMP_EXTERNAL = ipaddress.IPv4Address("203.0.113.7")
NATPMP_REQUEST_SEEDS = [
    encode_natpmp(ExternalAddressRequest()),
    encode_natpmp(MapRequest(NatPmpOpcode.MAP_UDP, 40000, 40000, 7200)),
    encode_natpmp(MapRequest(NatPmpOpcode.MAP_TCP, 22, 0, 0)),
]
NATPMP_RESPONSE_SEEDS = [
    encode_natpmp(ExternalAddressResponse(0, 7200, _NATPMP_EXTERNAL)),
    encode_natpmp(MapResponse(NatPmpOpcode.MAP_UDP, 0, 3600, 40000, 50000, 7200)),
    encode_natpmp(MapResponse(NatPmpOpcode.MAP_TCP, 2, 3600, 22, 0, 0)),
    encode_natpmp(UnsupportedVersionResponse(42)),
]
_PCP_CLIENT = ipaddress.IPv4Address("192.168.1.10")
_PCP_MAP = PcpMap(bytes(range(12)), 17, 40000, 50000, _NATPMP_EXTERNAL)
PCP_REQUEST_SEEDS = [
    encode_pcp(announce_request(_PCP_CLIENT)),
    encode_pcp(PcpRequest(PcpOpcode.MAP, 7200, _PCP_CLIENT, _PCP_MAP)),
    encode_pcp(PcpRequest(PcpOpcode.MAP, 7200, ipaddress.IPv6Address("2001:db8::2"), _PCP_MAP,
                          (prefer_failure_option(), PcpOption(0x80, b"abc"),
                           third_party_option(_PCP_CLIENT)))),
]
PCP_RESPONSE_SEEDS = [
    encode_pcp(PcpResponse(PcpOpcode.ANNOUNCE, 0, 0, 1234)),
    encode_pcp(PcpResponse(PcpOpcode.MAP, 0, 7200, 100, _PCP_MAP)),
    encode_pcp(PcpResponse(PcpOpcode.MAP, 1, 0, 100)),
    encode_pcp(PcpResponse(PcpOpcode.MAP, 8, 30, 100, _PCP_MAP, (PcpOption(0x7F, b"xyz"),))),
]
HEADER = encode_stream_header(from_="alice@example.org/phone", to="tv@example.org/living-room")
XML_SEEDS = [
    HEADER,
    HEADER + b"<message to='tv@example.org'><body>pause &amp; play</body></message>",
    HEADER + b"<iq type='get' id='1'><ping xmlns='urn:xmpp:ping'/></iq>",
    HEADER + b"<presence><status><![CDATA[x<y]]></status></presence></stream:stream>",
    b"<?xml version='1.0'?><!DOCTYPE x [<!ENTITY a 'aaaa'>]>" + HEADER,
]


def _quic_initial() -> bytes:
    ident = generate_identity("flood@example.org/x")
    conn = AuthenticatedQuicConnection(
        configuration=quic_configuration(
            is_client=True,
            private_key=ident.private_key,
            certificate=make_certificate(ident.private_key, str(ident.jid)),
            idle_timeout=30.0,
            max_datagram_frame_size=None,
        ),
        check=lambda credential: None,
    )
    conn.connect(SERVER, now=0.0)
    return conn.datagrams_to_send(now=0.0)[0][0]


# -- the codecs --------------------------------------------------------------------


def _only(error: type[Exception], decode: Callable[[bytes], object], data: bytes) -> None:
    try:
        decode(data)
    except error:
        pass


@FUZZ
@given(mutants(STUN_SEEDS))
def test_stun(data: bytes) -> None:
    _only(DecodeError, decode_stun, data)


@FUZZ
@given(mutants(CONTROL_SEEDS))
def test_control(data: bytes) -> None:
    _only(DecodeError, decode_control, data)


@FUZZ
@given(mutants(PROBE_SEEDS), st.booleans())
def test_probe(data: bytes, known: bool) -> None:
    _only(DecodeError, lambda d: decode_probe(d, lambda _: PROBE_KEY if known else None), data)


@FUZZ
@given(mutants(RELAY_SEEDS))
def test_relay(data: bytes) -> None:
    _only(DecodeError, decode_relay, data)


@FUZZ
@given(mutants(NATPMP_REQUEST_SEEDS + NATPMP_RESPONSE_SEEDS))
def test_natpmp(data: bytes) -> None:
    _only(NatPmpError, decode_natpmp_request, data)
    _only(NatPmpError, decode_natpmp_response, data)


@FUZZ
@given(mutants(PCP_REQUEST_SEEDS + PCP_RESPONSE_SEEDS + NATPMP_RESPONSE_SEEDS))
def test_pcp(data: bytes) -> None:
    _only(PcpError, decode_pcp_request, data)
    _only(PcpError, decode_pcp_response, data)
    assert isinstance(classify_answer(data), AnswerKind)


@FUZZ
@given(mutants(STUN_SEEDS + CONTROL_SEEDS + RELAY_SEEDS + PROBE_SEEDS))
def test_demux_is_total(data: bytes) -> None:
    assert isinstance(classify(data), PacketKind)


_QUIC_SEEDS: list[bytes] = []


@FUZZ
@given(st.data())
def test_quic_header_check_raises_only_value_error(data: st.DataObject) -> None:
    # Peer._maybe_accept catches ValueError around this call; anything else
    # would escape from datagram_received.
    if not _QUIC_SEEDS:
        _QUIC_SEEDS.append(_quic_initial())
    packet = data.draw(mutants(_QUIC_SEEDS))
    _only(ValueError, lambda d: pull_quic_header(Buffer(data=d), host_cid_length=8), packet)


@FUZZ
@given(mutants(XML_SEEDS), st.integers(1, 64))
def test_xml_stream_parser(data: bytes, chunk: int) -> None:
    parser = XmlStreamParser()
    try:
        for i in range(0, len(data), chunk):
            parser.feed(data[i : i + chunk])
    except StreamError as exc:
        assert exc.condition  # names the RFC 6120 stream error to send


# -- the rendezvous core end to end --------------------------------------------------


_UNLIMITED = 1e9
"""A rate and burst no fuzz run reaches: every mutant that decodes reaches
its handler instead of being dropped by a control budget."""


class _Core:
    """One core reused across examples (with a registered device), so state
    built by earlier inputs is exercised by later ones. Every control budget
    (per IP, per address, per registration) is turned off; a registration
    that a mutant ended (UNREGISTER) or let expire is made again, so later
    mutants aimed at it still get past the lookup."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.core = RendezvousCore(
            keys=StaticKeys({"alice@example.org": [_alice.public_key]}),
            addresses=ServerAddresses(SERVER),
            config=RendezvousConfig(
                control_per_source_per_s=_UNLIMITED, control_per_source_burst=_UNLIMITED,
                control_per_address_per_s=_UNLIMITED, control_per_address_burst=_UNLIMITED,
                control_per_registration_per_s=_UNLIMITED,
                control_per_registration_burst=_UNLIMITED,
            ),
            secret=bytes(32),
            rng=random.Random(7),
        )
        self.registration = b""
        self.register()

    def register(self) -> None:
        """Register alice's phone from HOME (again); keep its registration id."""
        self.core.datagrams_to_send()  # what earlier inputs left queued
        challenge = self.core.make_challenge(HOME, self.now)
        self.core.receive_datagram(
            encode_register(
                txid=_TXID, jid="alice@example.org/phone", key=_alice.public_key,
                challenge=challenge, candidates=_CANDS, sign=_alice.sign,
            ),
            HOME, SERVER, self.now,
        )
        reply = decode_control(self.core.datagrams_to_send()[0][0])
        assert reply.type == MessageType.REGISTERED and reply.registration is not None
        self.registration = reply.registration


_CORE = _Core()


@FUZZ
@given(mutants(CONTROL_SEEDS + STUN_SEEDS + RELAY_SEEDS), st.booleans(), st.integers(0, 3))
def test_rendezvous_core(data: bytes, from_home: bool, replace_reg: int) -> None:
    h = _CORE
    if replace_reg and len(data) > 21 and data[0] == 0x10:
        # aim some mutants at the live registration so they get past the lookup
        data = data[:13] + h.registration + data[21:]
    h.now += 0.01
    src = HOME if from_home else ("192.0.2.99", 5000 + replace_reg)
    h.core.receive_datagram(data, src, SERVER, h.now)
    for reply, _, _ in h.core.datagrams_to_send():
        if src != HOME:  # unproven source: the 3x budget holds
            assert len(reply) <= 3 * len(data)
    h.core.handle_timer(h.now)
    stats = h.core.statistics()
    assert stats.get("internal_errors", 0) == 0
    assert stats.get("dropped_rate_limited", 0) == 0
    assert stats.get("dropped_rate_limited_registered", 0) == 0
    if stats["registrations"] == 0:
        h.register()
