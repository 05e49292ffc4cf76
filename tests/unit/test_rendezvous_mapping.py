"""The NAT mapping check on the rendezvous core (docs/protocol.md 7.7):
REGISTERED names the mapping port, a KEEPALIVE there sets the device's
mapping, INTRODUCTIONs carry both sides' mappings, and the mapping port
answers nothing but STUN."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dtx.wire.control import (
    ControlMessage,
    MessageType,
    NatMapping,
    decode_control,
    encode_control,
    encode_hello,
)
from dtx.wire.demux import PacketKind, classify
from dtx.wire.relay import encode_relay
from dtx.wire.stun import (
    StunClass,
    StunMessage,
    StunMethod,
    binding_request,
    decode_stun,
    encode_stun,
)
from rendezvous.core import RendezvousConfig
from rendezvous.stun import ServerAddresses

from .test_rendezvous_core import HOME_A, HOME_B, SERVER, Harness, make

MAPPING = (SERVER[0], 3479)
SINGLE = ServerAddresses(SERVER, mapping_port=MAPPING[1])
"""A server without alternates: the mapping port is a socket of its own."""
RFC5780 = ServerAddresses(SERVER, "198.51.100.2", 3479, mapping_port=3479)
"""RFC 5780: the alternate-port socket is the mapping port."""
INDEPENDENT, DEPENDENT, UNKNOWN = NatMapping.INDEPENDENT, NatMapping.DEPENDENT, NatMapping.UNKNOWN

Out = list[tuple[bytes, tuple[str, int], tuple[str, int]]]


def check(h: Harness, name: str, src: tuple[str, int], reg: bytes | None = None) -> Out:
    """``name``'s KEEPALIVE, sent from ``src`` to the mapping port."""
    msg = ControlMessage(MessageType.KEEPALIVE, h.txid(), registration=reg or h.regs[name])
    return h.feed(encode_control(msg), src, local=MAPPING)


def introduce(h: Harness) -> tuple[ControlMessage, ControlMessage]:
    """alice (HOME_A) introduced to bob (HOME_B): (alice's, bob's) INTRODUCTION."""
    out = h.introduce("alice", HOME_A, "bob@example.org/tv")
    to_a = [decode_control(d) for d, to, _ in out if to == HOME_A]
    to_b = [decode_control(d) for d, to, _ in out if to == HOME_B]
    assert len(to_a) == 1 and len(to_b) == 1, out
    return to_a[0], to_b[0]


def registered_pair(addresses: ServerAddresses = SINGLE,
                    config: RendezvousConfig | None = None) -> Harness:
    h = make(config, addresses=addresses)
    h.register("alice", HOME_A)
    h.register("bob", HOME_B)
    return h


def other_port(addr: tuple[str, int]) -> tuple[str, int]:
    return (addr[0], addr[1] + 7)


# -- the addresses -----------------------------------------------------------------


def test_the_mapping_socket_is_bound_once() -> None:
    assert SINGLE.sockets() == (SERVER, MAPPING)
    assert SINGLE.mapping == MAPPING
    assert RFC5780.sockets() == ServerAddresses(SERVER, "198.51.100.2", 3479).sockets()
    assert ServerAddresses(SERVER).mapping is None


@pytest.mark.parametrize("bad", [
    {"mapping_port": SERVER[1]},
    {"mapping_port": 0},
    {"mapping_port": 70000},
    {"alt_ip": "198.51.100.2", "alt_port": 3479, "mapping_port": 3480},
])
def test_a_mapping_port_that_cannot_be_is_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        ServerAddresses(SERVER, **bad)  # type: ignore[arg-type]


# -- REGISTERED and INTRODUCTION -----------------------------------------------------


@pytest.mark.parametrize("addresses", [SINGLE, RFC5780], ids=["own socket", "rfc5780"])
def test_registered_names_the_mapping_port(addresses: ServerAddresses) -> None:
    h = make(addresses=addresses)
    reply = h.register("alice", HOME_A)
    assert reply.type == MessageType.REGISTERED and reply.mapping_port == MAPPING[1]


def test_without_a_mapping_port_nothing_is_said() -> None:
    h = make(addresses=ServerAddresses(SERVER, "198.51.100.2", 3479))
    assert h.register("alice", HOME_A).mapping_port is None
    h.register("bob", HOME_B)
    a, b = introduce(h)
    assert a.nat_mapping is None and b.nat_mapping is None
    # the alternate-port socket is not a mapping port then: STUN only
    assert check(h, "alice", HOME_A) == []
    assert h.core.statistics().get("mapping_checks", 0) == 0
    assert h.core.statistics()["dropped_unknown"] == 1


def test_unchecked_devices_are_unknown() -> None:
    a, b = introduce(registered_pair())
    assert a.nat_mapping == (UNKNOWN, UNKNOWN) and b.nat_mapping == (UNKNOWN, UNKNOWN)


@pytest.mark.parametrize("addresses", [SINGLE, RFC5780], ids=["own socket", "rfc5780"])
def test_each_side_sees_its_own_mapping_first(addresses: ServerAddresses) -> None:
    h = registered_pair(addresses)
    assert check(h, "alice", HOME_A) == []  # the same port: independent
    assert check(h, "bob", other_port(HOME_B)) == []  # another port: dependent
    a, b = introduce(h)
    assert a.nat_mapping == (INDEPENDENT, DEPENDENT)
    assert b.nat_mapping == (DEPENDENT, INDEPENDENT)
    assert h.core.statistics()["mapping_checks"] == 2


def test_both_independent_and_both_dependent() -> None:
    h = registered_pair()
    check(h, "alice", HOME_A)
    check(h, "bob", HOME_B)
    a, b = introduce(h)
    assert a.nat_mapping == b.nat_mapping == (INDEPENDENT, INDEPENDENT)
    h.clock.advance(6)  # past the window of a repeated INTRODUCE
    check(h, "alice", other_port(HOME_A))
    check(h, "bob", other_port(HOME_B))
    a, b = introduce(h)
    assert a.nat_mapping == b.nat_mapping == (DEPENDENT, DEPENDENT)


def test_the_latest_check_counts() -> None:
    h = registered_pair()
    check(h, "bob", other_port(HOME_B))
    check(h, "bob", HOME_B)
    a, _ = introduce(h)
    assert a.nat_mapping == (UNKNOWN, INDEPENDENT)


def test_retransmitted_and_repeated_introductions_carry_the_mapping_as_it_is_now() -> None:
    h = registered_pair()
    a, b = introduce(h)
    assert b.nat_mapping == (UNKNOWN, UNKNOWN)
    check(h, "bob", other_port(HOME_B))
    check(h, "alice", HOME_A)
    resent = [decode_control(d) for d, to, _ in h.run_timers(h.clock.now + 0.3) if to == HOME_B]
    assert len(resent) == 1 and resent[0].txid == b.txid
    assert resent[0].nat_mapping == (DEPENDENT, INDEPENDENT)
    out = h.introduce("alice", HOME_A, "bob@example.org/tv")  # repeated: alice only
    assert len(out) == 1 and out[0][1] == HOME_A
    again = decode_control(out[0][0])
    assert again.intro == a.intro and again.nat_mapping == (INDEPENDENT, DEPENDENT)


def test_registering_again_starts_unknown() -> None:
    h = registered_pair()
    check(h, "bob", other_port(HOME_B))
    h.register("bob", HOME_B)  # a new registration, a new id
    a, _ = introduce(h)
    assert a.nat_mapping == (UNKNOWN, UNKNOWN)


# -- what the mapping port does not take ----------------------------------------------


def test_a_check_from_another_ip_is_counted_and_changes_nothing() -> None:
    h = registered_pair()
    check(h, "bob", HOME_B)
    assert check(h, "bob", ("198.51.100.99", 12345)) == []
    assert check(h, "bob", ("198.51.100.99", HOME_B[1])) == []
    a, _ = introduce(h)
    assert a.nat_mapping == (UNKNOWN, INDEPENDENT)
    stats = h.core.statistics()
    assert stats["mapping_checks_other_ip"] == 2 and stats["mapping_checks"] == 1


def test_an_unknown_or_expired_registration_is_counted() -> None:
    h = registered_pair(config=RendezvousConfig(lifetime=30.0, keepalive=10.0))
    assert check(h, "alice", HOME_A, reg=bytes(8)) == []
    h.clock.advance(31)  # alice's registration has expired, its timer not run yet
    assert check(h, "alice", HOME_A) == []
    stats = h.core.statistics()
    assert stats["mapping_checks_unknown"] == 2 and stats.get("mapping_checks", 0) == 0


def test_a_check_does_not_refresh_the_registration() -> None:
    h = registered_pair(config=RendezvousConfig(lifetime=30.0, keepalive=10.0))
    h.clock.advance(29)
    check(h, "alice", HOME_A)
    h.run_timers(h.clock.now + 2)
    assert h.core.statistics()["registrations"] == 0
    assert h.core.statistics()["mapping_checks"] == 1


def test_checks_spend_the_registration_budget() -> None:
    config = RendezvousConfig(control_per_registration_per_s=1e-9,
                              control_per_registration_burst=3)
    h = registered_pair(config=config)
    for _ in range(3):
        check(h, "bob", HOME_B)
    assert check(h, "bob", other_port(HOME_B)) == []  # over budget: not even looked at
    a, _ = introduce(h)
    assert a.nat_mapping == (UNKNOWN, INDEPENDENT)
    stats = h.core.statistics()
    assert stats["mapping_checks"] == 3 and stats["dropped_rate_limited_registered"] == 1
    # the budget is the one the primary port charges: bob's KEEPALIVE goes unanswered
    keepalive = ControlMessage(MessageType.KEEPALIVE, h.txid(), registration=h.regs["bob"])
    assert h.feed(encode_control(keepalive), HOME_B) == []
    assert h.core.statistics()["dropped_rate_limited_registered"] == 2


def _intro_channel(h: Harness) -> int:
    a, _ = introduce(h)
    assert a.channel is not None
    return a.channel


def test_the_mapping_port_answers_nothing_but_stun() -> None:
    h = registered_pair()
    channel = _intro_channel(h)
    stranger = ("203.0.113.77", 5555)
    reg = h.regs["alice"]

    def control(mtype: MessageType, **fields: object) -> bytes:
        return encode_control(ControlMessage(mtype, h.txid(), **fields))  # type: ignore[arg-type]

    inputs = [
        b"", b"\x10", b"\x11", b"\x12", b"\xff" * 40, b"\x10" + bytes(40),
        encode_hello(h.txid()),
        h.register_msg("alice", HOME_A, challenge=h.core.make_challenge(HOME_A, h.clock.now)),
        control(MessageType.INTRODUCE, registration=reg, target="bob@example.org/tv"),
        control(MessageType.UNREGISTER, registration=reg),
        control(MessageType.ACCEPT, registration=reg, intro=bytes(8)),
        control(MessageType.REGISTERED, registration=reg),  # a device-bound type
        encode_relay(channel, b"\xc0quic"),
        # STUN-looking bytes that are no request: a response, an indication,
        # a bad length, a classic request for another method
        encode_stun(StunMessage(StunMethod.BINDING, StunClass.SUCCESS, bytes(12), ())),
        encode_stun(StunMessage(StunMethod.BINDING, StunClass.INDICATION, bytes(12), ())),
        binding_request(bytes(12))[:-4],
        bytes.fromhex("0003000c") + bytes(16) + bytes(12),
    ]
    for src in (HOME_A, other_port(HOME_A), stranger):
        for data in inputs:
            assert h.feed(data, src, local=MAPPING) == [], (data, src)
    stats = h.core.statistics()
    assert stats["registrations"] == 2 and stats["introductions"] == 1  # no UNREGISTER
    assert stats.get("mapping_checks", 0) == 0 and stats.get("relayed_frames", 0) == 0
    assert stats.get("internal_errors", 0) == 0
    (again,) = h.introduce("alice", HOME_A, "bob@example.org/tv")  # repeated: alice only
    assert decode_control(again[0]).nat_mapping == (UNKNOWN, UNKNOWN)


def test_a_check_is_never_answered_even_over_budget_or_refused() -> None:
    h = registered_pair(config=RendezvousConfig(control_per_registration_burst=2))
    for src in (HOME_A, other_port(HOME_A), ("198.51.100.99", 1)):
        for _ in range(4):
            assert check(h, "alice", src) == []
    assert check(h, "alice", HOME_A, reg=bytes(8)) == []


@pytest.mark.parametrize("addresses", [SINGLE, RFC5780], ids=["own socket", "rfc5780"])
def test_stun_on_the_mapping_port_is_answered_as_before(addresses: ServerAddresses) -> None:
    """The exception: a Binding request, answered from the mapping socket,
    as on the primary without alternates and as RFC 5780 says with them."""
    h = make(addresses=addresses)
    out = h.feed(binding_request(bytes(12)), HOME_A, local=MAPPING)
    assert len(out) == 1 and out[0][1:] == (HOME_A, MAPPING)
    reply = decode_stun(out[0][0])
    assert reply.xor_mapped_address == HOME_A
    assert (reply.other_address is not None) == addresses.rfc5780


@settings(max_examples=300, deadline=None)
@given(prefix=st.sampled_from([b"", b"\x10", b"\x10\x03", b"\x11", b"\x12", b"\x00\x01"]),
       body=st.binary(max_size=200),
       src=st.sampled_from([HOME_A, other_port(HOME_A), ("2001:db8::1", 4000)]))
def test_whatever_arrives_on_the_mapping_port_only_stun_is_answered(
    prefix: bytes, body: bytes, src: tuple[str, int]
) -> None:
    data = prefix + body
    out = _FUZZ.feed(data, src, local=MAPPING)
    for reply, to, frm in out:
        assert classify(data) == PacketKind.STUN and to == src and frm == MAPPING
        assert decode_stun(reply).cls in (StunClass.SUCCESS, StunClass.ERROR)
    assert _FUZZ.core.statistics().get("internal_errors", 0) == 0


_FUZZ = registered_pair()
