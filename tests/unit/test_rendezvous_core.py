"""The sans-IO rendezvous core: registration, refusals, keepalives,
introductions, the relay, rate limits, bounded tables and amplification."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from dtx.identity import DeviceIdentity, generate_identity
from dtx.trust import StaticKeys
from dtx.wire.control import (
    Candidate,
    CandidateKind,
    ControlMessage,
    MessageType,
    decode_control,
    encode_control,
    encode_hello,
    encode_register,
)
from dtx.wire.relay import decode_relay, encode_relay
from dtx.wire.stun import binding_request, decode_stun
from rendezvous.core import (
    AMPLIFICATION_FACTOR,
    RendezvousConfig,
    RendezvousCore,
    VerificationNeeded,
)
from rendezvous.stun import ServerAddresses

SERVER = ("198.51.100.1", 3478)
ADDRESSES = ServerAddresses(SERVER, "198.51.100.2", 3479)
HOME_A = ("203.0.113.10", 40000)
HOME_B = ("192.0.2.20", 50000)
HOST_A = Candidate(CandidateKind.HOST, ("10.0.1.2", 40000))
HOST_B = Candidate(CandidateKind.HOST, ("10.0.2.2", 50000))


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


@dataclass
class Harness:
    """A core, its clock, and helpers speaking the device side by hand."""

    core: RendezvousCore
    clock: FakeClock
    ids: dict[str, DeviceIdentity]
    txn: int = 0
    regs: dict[str, bytes] = field(default_factory=dict)

    def txid(self) -> bytes:
        self.txn += 1
        return self.txn.to_bytes(8, "big")

    def feed(
        self, data: bytes, src: tuple[str, int], local: tuple[str, int] = SERVER
    ) -> list[tuple[bytes, tuple[str, int], tuple[str, int]]]:
        self.core.receive_datagram(data, src, local, self.clock.now)
        return self.core.datagrams_to_send()

    def ask(self, msg: bytes, src: tuple[str, int]) -> ControlMessage:
        out = self.feed(msg, src)
        assert len(out) == 1, out
        data, to, frm = out[0]
        assert to == src and frm == SERVER
        return decode_control(data)

    def challenge(self, src: tuple[str, int]) -> bytes:
        reply = self.ask(encode_hello(self.txid()), src)
        assert reply.type == MessageType.CHALLENGE and reply.challenge is not None
        return reply.challenge

    def register_msg(
        self,
        name: str,
        src: tuple[str, int],
        *,
        challenge: bytes | None = None,
        candidates: tuple[Candidate, ...] = (),
        signer: DeviceIdentity | None = None,
    ) -> bytes:
        ident = self.ids[name]
        return encode_register(
            txid=self.txid(),
            jid=ident.jid.full,
            key=ident.public_key,
            challenge=challenge if challenge is not None else self.challenge(src),
            candidates=candidates,
            sign=(signer or ident).sign,
        )

    def register(
        self, name: str, src: tuple[str, int], candidates: tuple[Candidate, ...] = ()
    ) -> ControlMessage:
        reply = self.ask(self.register_msg(name, src, candidates=candidates), src)
        if reply.type == MessageType.REGISTERED:
            assert reply.registration is not None
            self.regs[name] = reply.registration
        return reply

    def keepalive(self, name: str, src: tuple[str, int]) -> ControlMessage:
        msg = ControlMessage(MessageType.KEEPALIVE, self.txid(), registration=self.regs[name])
        return self.ask(encode_control(msg), src)

    def introduce(
        self, name: str, src: tuple[str, int], target: str
    ) -> list[tuple[bytes, tuple[str, int], tuple[str, int]]]:
        msg = ControlMessage(
            MessageType.INTRODUCE, self.txid(), registration=self.regs[name], target=target
        )
        return self.feed(encode_control(msg), src)

    def accept(self, name: str, src: tuple[str, int], intro: bytes) -> list[
        tuple[bytes, tuple[str, int], tuple[str, int]]
    ]:
        msg = ControlMessage(
            MessageType.ACCEPT, self.txid(), registration=self.regs[name], intro=intro
        )
        return self.feed(encode_control(msg), src)

    def run_timers(self, until: float) -> list[tuple[bytes, tuple[str, int], tuple[str, int]]]:
        """Jump the clock from timer to timer up to ``until``."""
        out = []
        for _ in range(10_000):
            when = self.core.get_timer()
            if when is None or when > until:
                break
            self.clock.now = max(self.clock.now, when)
            self.core.handle_timer(self.clock.now)
            out.extend(self.core.datagrams_to_send())
        self.clock.now = max(self.clock.now, until)
        self.core.handle_timer(self.clock.now)
        out.extend(self.core.datagrams_to_send())
        return out


IDS = {
    "alice": generate_identity("alice@example.org/laptop"),
    "alice2": generate_identity("alice@example.org/phone"),
    "bob": generate_identity("bob@example.org/tv"),
    "mallory": generate_identity("mallory@example.org/box"),
}


def make(
    config: RendezvousConfig | None = None,
    *,
    keys: StaticKeys | None | str = "default",
    extra: dict[str, DeviceIdentity] | None = None,
    addresses: ServerAddresses = ADDRESSES,
) -> Harness:
    ids = dict(IDS)
    ids.update(extra or {})
    source: StaticKeys | None
    if keys == "default":
        table: dict[str, list[bytes]] = {}
        for name, ident in ids.items():
            if name != "mallory":  # mallory's key is in no vCard
                table.setdefault(ident.jid.bare.full, []).append(ident.public_key)
        table.setdefault("mallory@example.org", [])
        source = StaticKeys(table)
    else:
        source = keys if not isinstance(keys, str) else None
    clock = FakeClock()
    core = RendezvousCore(
        keys=source,
        addresses=addresses,
        config=config or RendezvousConfig(),
        secret=b"s" * 32,
        rng=random.Random(7),
    )
    return Harness(core, clock, ids)


# -- registration ---------------------------------------------------------------


def test_registration_ok() -> None:
    h = make()
    reply = h.register("alice", HOME_A, (HOST_A,))
    assert reply.type == MessageType.REGISTERED
    assert reply.reflexive == HOME_A
    assert reply.lifetime == 90 and reply.keepalive == 25
    assert reply.registration is not None and len(reply.registration) == 8
    stats = h.core.statistics()
    assert stats["registrations"] == 1 and stats["registrations_total"] == 1


def test_hello_under_48_bytes_is_ignored() -> None:
    h = make()
    short = encode_control(ControlMessage(MessageType.HELLO, h.txid(), padding=10))
    assert h.feed(short, HOME_A) == []
    assert h.core.statistics()["dropped_short_hello"] == 1


def test_ipv4_mapped_source_is_the_same_device() -> None:
    h = make()
    mapped = ("::ffff:" + HOME_A[0], HOME_A[1])
    out = h.feed(encode_hello(h.txid()), mapped)
    assert [to for _, to, _ in out] == [HOME_A]  # replies name the plain IPv4 form
    challenge = decode_control(out[0][0]).challenge
    reply = h.ask(h.register_msg("alice", HOME_A, challenge=challenge), HOME_A)
    assert reply.type == MessageType.REGISTERED and reply.reflexive == HOME_A


def _refused(h: Harness, reply: ControlMessage, code: int) -> None:
    assert reply.type == MessageType.ERROR and reply.error is not None
    assert reply.error[0] == code
    assert h.core.statistics()[f"refused_{code}"] >= 1
    # the server still serves others
    assert h.register("bob", HOME_B).type == MessageType.REGISTERED


def test_key_not_in_vcard_is_403() -> None:
    h = make()
    reply = h.ask(h.register_msg("mallory", HOME_A), HOME_A)
    _refused(h, reply, 403)
    assert h.core.statistics()["registrations"] == 1


def test_unknown_account_is_403() -> None:
    h = make(keys=StaticKeys({"alice@example.org": [IDS["alice"].public_key]}))
    reply = h.ask(h.register_msg("bob", HOME_B), HOME_B)  # no vCard for bob's account
    assert reply.error is not None and reply.error[0] == 403
    assert h.register("alice", HOME_A).type == MessageType.REGISTERED


def test_forged_signature_is_403() -> None:
    h = make()
    # alice's JID and key, signed by mallory
    reply = h.ask(h.register_msg("alice", HOME_A, signer=IDS["mallory"]), HOME_A)
    _refused(h, reply, 403)


def test_replayed_challenge_is_401() -> None:
    h = make()
    challenge = h.challenge(HOME_A)
    first = h.ask(h.register_msg("alice", HOME_A, challenge=challenge), HOME_A)
    assert first.type == MessageType.REGISTERED
    again = h.ask(h.register_msg("alice", HOME_A, challenge=challenge), HOME_A)
    _refused(h, again, 401)


def test_stale_challenge_is_401() -> None:
    h = make()
    challenge = h.challenge(HOME_A)
    h.clock.advance(31)
    reply = h.ask(h.register_msg("alice", HOME_A, challenge=challenge), HOME_A)
    _refused(h, reply, 401)


def test_challenge_from_another_address_is_401() -> None:
    h = make()
    challenge = h.challenge(("203.0.113.99", 40000))
    reply = h.ask(h.register_msg("alice", HOME_A, challenge=challenge), HOME_A)
    _refused(h, reply, 401)
    other_port = h.challenge((HOME_A[0], HOME_A[1] + 1))
    reply = h.ask(h.register_msg("alice", HOME_A, challenge=other_port), HOME_A)
    assert reply.error is not None and reply.error[0] == 401


def test_bare_jid_registration_is_400() -> None:
    h = make()
    ident = IDS["alice"]
    msg = encode_register(
        txid=h.txid(),
        jid="alice@example.org",
        key=ident.public_key,
        challenge=h.challenge(HOME_A),
        candidates=(),
        sign=ident.sign,
    )
    reply = h.ask(msg, HOME_A)
    assert reply.error is not None and reply.error[0] == 400


def test_async_key_lookup_seam() -> None:
    h = make(keys=None)
    assert h.feed(h.register_msg("alice", HOME_A), HOME_A) == []
    event = h.core.next_event()
    assert isinstance(event, VerificationNeeded) and event.bare_jid == "alice@example.org"
    assert h.core.next_event() is None
    h.core.complete_verification(event.token, frozenset({IDS["alice"].public_key}), h.clock.now)
    out = h.core.datagrams_to_send()
    assert decode_control(out[0][0]).type == MessageType.REGISTERED
    # a lookup that never completes is forgotten
    assert h.feed(h.register_msg("bob", HOME_B), HOME_B) == []
    assert h.core.statistics()["pending_verifications"] == 1
    h.run_timers(h.clock.now + 11)
    assert h.core.statistics()["pending_verifications"] == 0
    assert h.core.statistics()["verification_timeouts"] == 1


# -- keepalives, expiry, restart ------------------------------------------------------


def test_keepalive_refreshes_and_expiry_forgets() -> None:
    h = make()
    h.register("alice", HOME_A)
    for _ in range(5):  # 5 x 25 s > 90 s lifetime, kept alive throughout
        h.run_timers(h.clock.now + 25)
        ack = h.keepalive("alice", HOME_A)
        assert ack.type == MessageType.KEEPALIVE_ACK and ack.reflexive == HOME_A
    assert h.core.statistics()["registrations"] == 1
    h.run_timers(h.clock.now + 91)
    assert h.core.statistics()["registrations"] == 0
    assert h.core.statistics()["expired"] == 1
    reply = h.keepalive("alice", HOME_A)
    assert reply.error is not None and reply.error[0] == 404


def test_keepalive_from_another_address_is_404() -> None:
    h = make()
    h.register("alice", HOME_A)
    reply = h.keepalive("alice", ("203.0.113.10", 40001))  # NAT rebinding
    assert reply.error is not None and reply.error[0] == 404
    assert h.keepalive("alice", HOME_A).type == MessageType.KEEPALIVE_ACK


def test_reregistration_after_restart() -> None:
    h = make()
    h.register("alice", HOME_A)
    old = h.regs["alice"]
    restarted = make()
    restarted.regs["alice"] = old
    reply = restarted.keepalive("alice", HOME_A)
    assert reply.error is not None and reply.error[0] == 404
    assert restarted.register("alice", HOME_A).type == MessageType.REGISTERED
    assert restarted.keepalive("alice", HOME_A).type == MessageType.KEEPALIVE_ACK


def test_new_registration_replaces_the_old_one() -> None:
    h = make()
    h.register("alice", HOME_A)
    old = h.regs["alice"]
    h.register("alice", ("203.0.113.10", 40002))
    assert h.regs["alice"] != old
    assert h.core.statistics()["registrations"] == 1


def test_unregister() -> None:
    h = make()
    h.register("alice", HOME_A)
    msg = ControlMessage(MessageType.UNREGISTER, h.txid(), registration=h.regs["alice"])
    assert h.ask(encode_control(msg), HOME_A).type == MessageType.ACK
    assert h.core.statistics()["registrations"] == 0


# -- introductions ------------------------------------------------------------------


def _introduced(h: Harness) -> tuple[ControlMessage, ControlMessage]:
    h.register("alice", HOME_A, (HOST_A,))
    h.register("bob", HOME_B, (HOST_B,))
    out = h.introduce("alice", HOME_A, "bob@example.org/tv")
    assert len(out) == 2  # the same batch
    to_a = [decode_control(d) for d, to, _ in out if to == HOME_A]
    to_b = [decode_control(d) for d, to, _ in out if to == HOME_B]
    assert len(to_a) == 1 and len(to_b) == 1
    return to_a[0], to_b[0]


def test_introduction_reaches_both_at_once() -> None:
    h = make()
    a, b = _introduced(h)
    assert a.type == b.type == MessageType.INTRODUCTION
    assert a.intro == b.intro and a.probe_key == b.probe_key
    assert a.role == 1 and b.role == 2
    assert a.peer_jid == "bob@example.org/tv" and a.peer_key == IDS["bob"].public_key
    assert b.peer_jid == "alice@example.org/laptop" and b.peer_key == IDS["alice"].public_key
    assert a.candidates == (HOST_B, Candidate(CandidateKind.SERVER_REFLEXIVE, HOME_B))
    assert b.candidates == (HOST_A, Candidate(CandidateKind.SERVER_REFLEXIVE, HOME_A))
    assert a.channel is not None and b.channel is not None


def test_a_port_mapped_candidate_on_the_source_ip_is_handed_on() -> None:
    h = make()
    mapped = Candidate(CandidateKind.MAPPED, (HOME_B[0], 61000))
    h.register("alice", HOME_A, (HOST_A,))
    h.register("bob", HOME_B, (mapped, HOST_B))
    out = h.introduce("alice", HOME_A, "bob@example.org/tv")
    to_a = next(decode_control(d) for d, to, _ in out if to == HOME_A)
    assert to_a.candidates == (mapped, HOST_B, Candidate(CandidateKind.SERVER_REFLEXIVE, HOME_B))
    assert h.core.statistics().get("mapped_candidates_refused", 0) == 0


def test_a_port_mapped_candidate_on_another_ip_is_left_out() -> None:
    """Another IP would have peers probe a third party (reflection)."""
    h = make()
    elsewhere = Candidate(CandidateKind.MAPPED, ("198.51.100.77", 61000))
    h.register("alice", HOME_A, (HOST_A,))
    h.register("bob", HOME_B, (elsewhere, HOST_B))
    out = h.introduce("alice", HOME_A, "bob@example.org/tv")
    to_a = next(decode_control(d) for d, to, _ in out if to == HOME_A)
    assert to_a.candidates == (HOST_B, Candidate(CandidateKind.SERVER_REFLEXIVE, HOME_B))
    assert h.core.statistics()["mapped_candidates_refused"] == 1


def test_bare_target_picks_most_recently_refreshed_device() -> None:
    h = make()
    h.register("bob", HOME_B)
    h.register("alice", HOME_A)
    h.clock.advance(1)
    phone = ("203.0.113.11", 40000)
    h.register("alice2", phone)
    out = h.introduce("bob", HOME_B, "alice@example.org")
    targets = {to for _, to, _ in out}
    assert targets == {HOME_B, phone}
    h.clock.advance(1)
    h.keepalive("alice", HOME_A)
    h.clock.advance(6)  # past the duplicate window
    out = h.introduce("bob", HOME_B, "alice@example.org")
    assert {to for _, to, _ in out} == {HOME_B, HOME_A}


def test_unknown_target_is_404() -> None:
    h = make()
    h.register("alice", HOME_A)
    out = h.introduce("alice", HOME_A, "bob@example.org/tv")
    reply = decode_control(out[0][0])
    assert reply.error is not None and reply.error[0] == 404


def test_duplicate_introduce_gets_the_same_introduction() -> None:
    h = make()
    a, _ = _introduced(h)
    out = h.introduce("alice", HOME_A, "bob@example.org/tv")
    assert len(out) == 1 and out[0][1] == HOME_A
    again = decode_control(out[0][0])
    assert again.intro == a.intro and again.channel == a.channel
    assert h.core.statistics()["introductions"] == 1


def test_responder_introduction_is_retransmitted_then_forgotten() -> None:
    h = make()
    _, b = _introduced(h)
    out = h.run_timers(h.clock.now + 4.9)
    resent = [decode_control(d) for d, to, _ in out if to == HOME_B]
    assert len(resent) == 3
    assert all(m.intro == b.intro and m.txid == b.txid for m in resent)
    h.run_timers(h.clock.now + 0.2)
    assert h.core.statistics()["introductions"] == 0
    assert h.core.statistics()["introductions_timed_out"] == 1
    out = h.accept("bob", HOME_B, b.intro or b"")
    assert decode_control(out[0][0]).error == (404, "unknown introduction")


def test_accepted_introduction_stops_retransmitting() -> None:
    h = make()
    _, b = _introduced(h)
    out = h.accept("bob", HOME_B, b.intro or b"")
    assert decode_control(out[0][0]).type == MessageType.ACK
    assert h.run_timers(h.clock.now + 10) == []
    assert h.core.statistics()["introductions"] == 1


# -- relay --------------------------------------------------------------------------


def test_relay_forwards_after_accept_and_holds_before() -> None:
    h = make()
    a, b = _introduced(h)
    assert a.channel is not None and b.channel is not None
    # A's first packets race B's ACCEPT: held, bounded
    for i in range(10):
        assert h.feed(encode_relay(a.channel, b"early%d" % i), HOME_A) == []
    stats = h.core.statistics()
    assert stats["held_frames"] == 8 and stats["dropped_relay_not_accepted"] == 2
    out = h.accept("bob", HOME_B, b.intro or b"")
    frames = [decode_relay(d) for d, to, _ in out if to == HOME_B and d[0] == 0x11]
    assert frames == [(b.channel, b"early%d" % i) for i in range(8)]
    # both ways now
    out = h.feed(encode_relay(a.channel, b"quic-a"), HOME_A)
    assert [(decode_relay(d), to) for d, to, _ in out] == [((b.channel, b"quic-a"), HOME_B)]
    out = h.feed(encode_relay(b.channel, b"quic-b"), HOME_B)
    assert [(decode_relay(d), to) for d, to, _ in out] == [((a.channel, b"quic-b"), HOME_A)]
    assert h.core.statistics()["relayed_frames"] == 10


def test_held_frames_expire() -> None:
    h = make()
    a, b = _introduced(h)
    assert a.channel is not None
    h.feed(encode_relay(a.channel, b"x" * 100), HOME_A)
    h.run_timers(h.clock.now + 2.1)
    assert h.core.statistics()["dropped_pending_expired"] == 1
    out = h.accept("bob", HOME_B, b.intro or b"")
    assert [to for d, to, _ in out if d[0] == 0x11] == []


def test_held_bytes_bounded() -> None:
    h = make()
    a, _ = _introduced(h)
    assert a.channel is not None
    h.feed(encode_relay(a.channel, b"x" * 10_000), HOME_A)
    h.feed(encode_relay(a.channel, b"x" * 10_000), HOME_A)
    stats = h.core.statistics()
    assert stats["held_frames"] == 1 and stats["dropped_relay_not_accepted"] == 1


def test_no_open_relay() -> None:
    h = make()
    a, b = _introduced(h)
    h.accept("bob", HOME_B, b.intro or b"")
    assert a.channel is not None and b.channel is not None
    stranger = ("203.0.113.66", 1234)
    # unregistered source, even on a valid channel
    assert h.feed(encode_relay(a.channel, b"spoof"), stranger) == []
    assert h.feed(encode_relay(b.channel, b"spoof"), stranger) == []
    # registered source, channel of the other side or unknown
    assert h.feed(encode_relay(b.channel, b"foreign"), HOME_A) == []
    assert h.feed(encode_relay((a.channel + 1) % 2**32, b"unknown"), HOME_A) == []
    # a third registered device cannot use alice's channel
    h.register("alice2", stranger)
    assert h.feed(encode_relay(a.channel, b"foreign"), stranger) == []
    stats = h.core.statistics()
    assert stats["dropped_relay_unregistered"] == 2
    assert stats["dropped_relay_channel"] == 3
    assert stats.get("relayed_frames", 0) == 0


def test_relay_disabled() -> None:
    h = make(RendezvousConfig(relay=False))
    a, b = _introduced(h)
    h.accept("bob", HOME_B, b.intro or b"")
    assert a.channel is not None
    assert h.feed(encode_relay(a.channel, b"x"), HOME_A) == []
    assert h.core.statistics()["dropped_relay_disabled"] == 1


def test_relay_state_ends_with_registration() -> None:
    h = make()
    a, b = _introduced(h)
    h.accept("bob", HOME_B, b.intro or b"")
    msg = ControlMessage(MessageType.UNREGISTER, h.txid(), registration=h.regs["bob"])
    h.feed(encode_control(msg), HOME_B)
    assert h.core.statistics()["introductions"] == 0
    assert a.channel is not None
    assert h.feed(encode_relay(a.channel, b"x"), HOME_A) == []


# -- floods and limits ----------------------------------------------------------------


def test_relay_rate_limited_under_flood() -> None:
    cfg = RendezvousConfig(relay_frames_per_s=100, relay_burst_frames=50)
    h = make(cfg)
    a, b = _introduced(h)
    h.accept("bob", HOME_B, b.intro or b"")
    assert a.channel is not None
    forwarded = 0
    for _ in range(1000):  # all at the same instant
        forwarded += len(h.feed(encode_relay(a.channel, b"p" * 10), HOME_A))
    assert forwarded == 50
    assert h.core.statistics()["dropped_relay_rate"] == 950
    h.clock.advance(1.0)  # refills at 100 frames/s, capped at the burst
    forwarded = sum(len(h.feed(encode_relay(a.channel, b"p"), HOME_A)) for _ in range(200))
    assert forwarded == 50


def test_relay_byte_bucket() -> None:
    cfg = RendezvousConfig(relay_bytes_per_s=10_000, relay_burst_bytes=5_000)
    h = make(cfg)
    a, b = _introduced(h)
    h.accept("bob", HOME_B, b.intro or b"")
    assert a.channel is not None
    forwarded = sum(len(h.feed(encode_relay(a.channel, b"p" * 1000), HOME_A)) for _ in range(20))
    assert forwarded == 5


def test_control_flood_from_one_source_is_rate_limited() -> None:
    h = make(RendezvousConfig(control_per_source_per_s=10, control_per_source_burst=20))
    answered = sum(len(h.feed(encode_hello(h.txid()), HOME_A)) for _ in range(100))
    assert answered == 20
    assert h.core.statistics()["dropped_rate_limited"] == 80
    # another source is unaffected
    assert h.register("bob", HOME_B).type == MessageType.REGISTERED


def test_registration_flood_cannot_evict_established_devices() -> None:
    flood = {f"dev{i}": generate_identity(f"flood{i}@example.org/x") for i in range(10)}
    h = make(RendezvousConfig(max_registrations=2), extra=flood)
    h.register("alice", HOME_A)
    h.register("bob", HOME_B)
    for i, name in enumerate(flood):
        src = (f"203.0.113.{100 + i}", 30000 + i)
        reply = h.register(name, src)
        assert reply.error is not None and reply.error[0] == 503
        # unproven junk from many sources leaves no state either
        h.feed(encode_hello(h.txid()), (f"192.0.2.{100 + i}", 1000))
    assert h.keepalive("alice", HOME_A).type == MessageType.KEEPALIVE_ACK
    assert h.keepalive("bob", HOME_B).type == MessageType.KEEPALIVE_ACK
    assert h.core.statistics()["registrations"] == 2
    assert h.core.statistics()["refused_503"] == 10


def test_devices_per_account_bounded() -> None:
    h = make(RendezvousConfig(max_devices_per_account=1))
    h.register("alice", HOME_A)
    reply = h.register("alice2", ("203.0.113.11", 40000))
    assert reply.error is not None and reply.error[0] == 503
    assert h.keepalive("alice", HOME_A).type == MessageType.KEEPALIVE_ACK


def test_pending_introductions_per_target_bounded() -> None:
    h = make(RendezvousConfig(max_pending_introductions_per_target=1))
    _introduced(h)
    h.register("alice2", ("203.0.113.11", 40000))
    out = h.introduce("alice2", ("203.0.113.11", 40000), "bob@example.org/tv")
    reply = decode_control(out[0][0])
    assert reply.error is not None and reply.error[0] == 429


# -- amplification --------------------------------------------------------------------


def worst_ratios() -> dict[str, float]:
    """Largest reply/request ratio per request type from unregistered sources."""
    h = make()
    h.register("bob", HOME_B)
    stranger = ("203.0.113.77", 5555)
    ratios: dict[str, float] = {}

    def note(name: str, request: bytes, src: tuple[str, int] = stranger) -> None:
        out = h.feed(request, src)
        ratio = max((len(d) / len(request) for d, _, _ in out), default=0.0)
        ratios[name] = max(ratios.get(name, 0.0), ratio)

    txid = h.txid
    note("HELLO", encode_hello(txid()))
    note("REGISTER (401)", h.register_msg("alice", stranger, challenge=bytes(20)))
    note("REGISTER (403)", h.register_msg("mallory", stranger))
    fresh = ("203.0.113.78", 5556)
    note("REGISTER (REGISTERED)", h.register_msg("alice", fresh), fresh)
    for mtype, extra in (
        (MessageType.KEEPALIVE, {}),
        (MessageType.INTRODUCE, {"target": "x"}),
        (MessageType.ACCEPT, {"intro": bytes(8)}),
        (MessageType.UNREGISTER, {}),
    ):
        msg = ControlMessage(mtype, txid(), registration=bytes(8), **extra)
        note(mtype.name, encode_control(msg))
    note("STUN binding", binding_request(bytes(12)))
    note("STUN bare", bytes.fromhex("000100002112a442") + bytes(12))
    note("RELAY", encode_relay(1, b""))
    return ratios


def test_amplification_at_most_3x_for_unproven_sources() -> None:
    ratios = worst_ratios()
    assert set(ratios) >= {"HELLO", "KEEPALIVE", "INTRODUCE", "ACCEPT", "UNREGISTER"}
    for name, ratio in ratios.items():
        assert ratio <= AMPLIFICATION_FACTOR, (name, ratio)
    assert ratios["HELLO"] < 1.0  # the challenge is smaller than the padded HELLO


def test_stun_is_answered_from_the_right_socket() -> None:
    h = make()
    out = h.feed(binding_request(bytes(12), change_ip=True, change_port=True), HOME_A)
    assert len(out) == 1
    data, to, frm = out[0]
    assert to == HOME_A and frm == ("198.51.100.2", 3479)
    assert decode_stun(data).xor_mapped_address == HOME_A
    assert h.core.statistics()["stun_answers"] == 1


def test_control_on_a_stun_only_socket_is_dropped() -> None:
    h = make()
    assert h.feed(encode_hello(h.txid()), HOME_A, local=("198.51.100.2", 3478)) == []


# -- hostile input --------------------------------------------------------------------

_prefix = st.sampled_from([b"", b"\x10", b"\x11", b"\x12", b"\x00\x01", b"\x10\x02", b"\x10\x05"])


@settings(max_examples=400, deadline=None)
@given(
    prefix=_prefix,
    body=st.binary(max_size=300),
    host=st.sampled_from(["203.0.113.10", "192.0.2.20", "2001:db8::1", "::ffff:192.0.2.20"]),
    port=st.integers(0, 65535),
    local=st.sampled_from([SERVER, ("198.51.100.2", 3479), ("198.51.100.1", 3479)]),
)
def test_receive_datagram_never_raises(
    prefix: bytes, body: bytes, host: str, port: int, local: tuple[str, int]
) -> None:
    h = _FUZZ
    h.core.receive_datagram(prefix + body, (host, port), local, h.clock.advance(0.01))
    h.core.datagrams_to_send()
    h.core.handle_timer(h.clock.now)
    assert h.core.statistics().get("internal_errors", 0) == 0


_FUZZ = make(RendezvousConfig(
    control_per_source_per_s=1e9, control_per_source_burst=1e9,
    control_per_address_per_s=1e9, control_per_address_burst=1e9,
    control_per_registration_per_s=1e9, control_per_registration_burst=1e9,
))
_FUZZ.register("alice", HOME_A)
_FUZZ.register("bob", HOME_B)



@settings(max_examples=200, deadline=None)
@given(
    mtype=st.sampled_from(list(MessageType)),
    text=st.text(min_size=1, max_size=40),
    blob=st.binary(min_size=8, max_size=8),
    registered=st.booleans(),
)
def test_well_formed_messages_with_odd_values_never_raise(
    mtype: MessageType, text: str, blob: bytes, registered: bool
) -> None:
    h = make()
    h.register("alice", HOME_A)
    h.register("bob", HOME_B)
    reg = h.regs["alice"] if registered else blob
    msg = ControlMessage(
        mtype, blob, registration=reg, target=text, jid=text, intro=blob,
        challenge=blob * 2 + b"1234", key=bytes(32), signature=bytes(64), padding=40,
    )
    h.core.receive_datagram(encode_control(msg), HOME_A, SERVER, h.clock.advance(0.01))
    for data, to, frm in h.core.datagrams_to_send():
        assert frm == SERVER
        if to != HOME_A:  # an INTRODUCTION to the peer of a valid INTRODUCE
            assert decode_control(data).type == MessageType.INTRODUCTION
    assert h.core.statistics().get("internal_errors", 0) == 0
