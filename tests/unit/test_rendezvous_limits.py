"""The rendezvous core's budgets against a fake clock: rate limits charged
after decoding (junk costs none), per registration for registered devices,
per address and per IP for sources that proved nothing; and the bound on
devices per account."""

from __future__ import annotations

import random

from dtx.identity import DeviceIdentity, generate_identity
from dtx.wire.control import (
    ControlMessage,
    MessageType,
    decode_control,
    encode_control,
    encode_hello,
)
from rendezvous.core import RendezvousConfig

from .test_rendezvous_core import HOME_A, HOME_B, Harness, make

DEVICE_IP = HOME_A[0]
STEP = 0.01  # the flood's clock step: 100 steps a second


class Flood:
    """An attacker at the device's IP: 100 junk datagrams/s (the 1-byte
    ``0x10`` of issue D5, from another port and from the device's very
    address, which a spoofer can forge), and HELLOs — valid, padded to 48
    bytes — at ``hellos_per_step`` per 10 ms from ``hello_ports``."""

    def __init__(self, h: Harness, *, hellos_per_step: int = 10,
                 hello_ports: tuple[int, ...] = (41000,)) -> None:
        self.h = h
        self.hellos_per_step = hellos_per_step
        self.hello_ports = hello_ports
        self.junk = 0
        self.hellos = 0
        self.challenges = 0
        self.rng = random.Random(5)

    def run(self, seconds: float) -> None:
        h = self.h
        for _ in range(round(seconds / STEP)):
            h.clock.advance(STEP)
            h.core.handle_timer(h.clock.now)
            h.core.datagrams_to_send()
            for src in ((DEVICE_IP, 40999), HOME_A):
                # 1 byte, or a control header with garbage behind it
                junk = b"\x10" if self.rng.random() < 0.5 else b"\x10" + self.rng.randbytes(20)
                assert h.feed(junk, src) == []
                self.junk += 1
            for port in self.hello_ports:
                for _ in range(self.hellos_per_step):
                    out = h.feed(encode_hello(h.txid()), (DEVICE_IP, port))
                    self.hellos += 1
                    self.challenges += len(out)


def _keepalive_ok(h: Harness, name: str, src: tuple[str, int]) -> None:
    reply = h.keepalive(name, src)
    assert reply.type == MessageType.KEEPALIVE_ACK, reply


def test_junk_costs_no_budget_even_from_the_devices_own_address() -> None:
    h = make(RendezvousConfig(control_per_source_burst=5, control_per_address_burst=5))
    short_hello = encode_control(ControlMessage(MessageType.HELLO, h.txid(), padding=1))
    wrong_way = encode_control(ControlMessage(MessageType.ACK, h.txid()))
    for junk in (b"\x10", b"\x10\x01", b"\x10\x7f" + bytes(30), short_hello, wrong_way):
        for _ in range(1000):  # all at one instant: no refill
            assert h.feed(junk, HOME_A) == []
    stats = h.core.statistics()
    assert stats["dropped_undecodable"] == 3000
    assert stats["dropped_short_hello"] == 1000 and stats["dropped_wrong_direction"] == 1000
    assert stats.get("dropped_rate_limited", 0) == 0
    assert h.register("alice", HOME_A).type == MessageType.REGISTERED


def test_junk_and_a_hello_flood_from_the_devices_ip_do_not_starve_it() -> None:
    """Issue D5: the device registers, stays registered past its lifetime
    and is introduced, with a HELLO flood from its IP and junk from its IP
    and its address going on throughout."""
    cfg = RendezvousConfig(lifetime=6.0, keepalive=2.0)
    h = make(cfg)
    flood = Flood(h)
    flood.run(2.0)
    start = h.clock.now
    # one try each, no retransmission: nothing of the device's may be dropped
    assert h.register("alice", HOME_A).type == MessageType.REGISTERED
    for _ in range(8):  # 16 s, well past the 6 s lifetime
        flood.run(2.0)
        _keepalive_ok(h, "alice", HOME_A)
    assert h.register("bob", HOME_B).type == MessageType.REGISTERED
    flood.run(1.0)
    out = h.introduce("bob", HOME_B, "alice@example.org/laptop")
    to_alice = [decode_control(d) for d, to, _ in out if to == HOME_A]
    assert len(to_alice) == 1 and to_alice[0].type == MessageType.INTRODUCTION
    flood.run(0.1)
    ack = h.accept("alice", HOME_A, to_alice[0].intro or b"")
    assert decode_control(ack[0][0]).type == MessageType.ACK
    out = h.introduce("alice", HOME_A, "bob@example.org/tv")
    assert {to for _, to, _ in out} == {HOME_A, HOME_B}
    stats = h.core.statistics()
    assert stats["registrations"] == 2 and stats.get("expired", 0) == 0
    # the flood was real: far over the limits, and held to them
    elapsed = h.clock.now - start + 2.0
    assert flood.hellos > 20 * cfg.control_per_source_per_s * elapsed
    assert flood.challenges <= cfg.control_per_address_burst + cfg.control_per_address_per_s * elapsed
    assert stats["dropped_rate_limited"] == flood.hellos - flood.challenges
    assert stats["dropped_undecodable"] == flood.junk
    assert stats.get("dropped_rate_limited_registered", 0) == 0


def test_a_registered_device_is_charged_to_its_registration_not_its_ip() -> None:
    """Once registered, the device's messages carry its registration id and
    spend its own budget: a flood from many ports of its IP that uses up
    the IP's budget for unproven sources does not touch them."""
    # every port's HELLOs pass its address bucket, so the IP's is drained
    # at every step (the default IP budget)
    cfg = RendezvousConfig(control_per_address_per_s=1000)
    h = make(cfg)
    assert h.register("alice", HOME_A).type == MessageType.REGISTERED
    assert h.register("bob", HOME_B).type == MessageType.REGISTERED
    flood = Flood(h, hellos_per_step=2, hello_ports=tuple(range(41000, 41010)))
    flood.run(3.0)
    # the IP's budget is gone: a new socket at that IP gets no CHALLENGE...
    assert h.feed(encode_hello(h.txid()), (DEVICE_IP, 42000)) == []
    # ...and the flood's answers were held to the per-IP limit
    allowed = cfg.control_per_source_burst + cfg.control_per_source_per_s * 3.0
    assert flood.challenges <= allowed + 1
    # but the registered device is served
    for _ in range(3):
        _keepalive_ok(h, "alice", HOME_A)
        flood.run(0.5)
    out = h.introduce("alice", HOME_A, "bob@example.org/tv")
    assert {to for _, to, _ in out} == {HOME_A, HOME_B}
    # an unknown registration id from that IP is an unproven source: no answer
    stray = ControlMessage(MessageType.KEEPALIVE, h.txid(), registration=bytes(8))
    assert h.feed(encode_control(stray), (DEVICE_IP, 42001)) == []


def test_a_registration_has_its_own_budget() -> None:
    cfg = RendezvousConfig(control_per_registration_per_s=5, control_per_registration_burst=10)
    h = make(cfg)
    h.register("alice", HOME_A)
    h.register("bob", HOME_B)
    msg = ControlMessage(MessageType.KEEPALIVE, h.txid(), registration=h.regs["alice"])
    answered = sum(len(h.feed(encode_control(msg), HOME_A)) for _ in range(50))
    assert answered == 10
    stats = h.core.statistics()
    assert stats["dropped_rate_limited_registered"] == 40
    assert stats.get("dropped_rate_limited", 0) == 0
    _keepalive_ok(h, "bob", HOME_B)  # another device's budget is untouched
    h.clock.advance(1.0)  # refills at 5/s
    answered = sum(len(h.feed(encode_control(msg), HOME_A)) for _ in range(50))
    assert answered == 5


def test_one_socket_cannot_use_up_its_ips_budget() -> None:
    cfg = RendezvousConfig(control_per_address_per_s=1, control_per_address_burst=3,
                           control_per_source_per_s=1, control_per_source_burst=10)
    h = make(cfg)
    busy = (DEVICE_IP, 41000)
    answered = sum(len(h.feed(encode_hello(h.txid()), busy)) for _ in range(100))
    assert answered == 3
    # the same IP, another port: its own address budget, and the IP's is left
    assert h.register("alice", HOME_A).type == MessageType.REGISTERED
    assert h.core.statistics()["dropped_rate_limited"] == 97


def test_unproven_sources_leave_no_state_but_their_buckets() -> None:
    """A HELLO flood from many forged addresses, and REGISTERs carrying
    challenges made for other addresses, store no registration, challenge
    or verification; the rate-limit tables stay bounded."""
    cfg = RendezvousConfig(max_sources=64)
    h = make(cfg)
    for i in range(2000):
        src = (f"198.18.{i // 250}.{i % 250}", 1000 + i)
        h.feed(encode_hello(h.txid()), src)
        forged = h.register_msg("alice", src, challenge=h.core.make_challenge(HOME_A, h.clock.now))
        reply = h.ask(forged, src)
        assert reply.error is not None and reply.error[0] == 401
    stats = h.core.statistics()
    assert stats["registrations"] == 0 and stats["used_challenges"] == 0
    assert stats["pending_verifications"] == 0
    assert len(h.core._per_ip) <= 64 and len(h.core._per_address) <= 64


# -- devices per account ---------------------------------------------------------


def _account(n: int) -> dict[str, DeviceIdentity]:
    return {f"dev{i}": generate_identity(f"carol@example.org/dev{i}") for i in range(n)}


def _home(i: int) -> tuple[str, int]:
    return (f"203.0.113.{100 + i % 100}", 20000 + i)


def test_a_full_account_is_refused_with_503_and_counted() -> None:
    devices = _account(4)
    h = make(RendezvousConfig(max_devices_per_account=3), extra=devices)
    for i in range(3):
        assert h.register(f"dev{i}", _home(i)).type == MessageType.REGISTERED
    reply = h.register("dev3", _home(3))
    assert reply.type == MessageType.ERROR and reply.error == (503, "too many devices")
    stats = h.core.statistics()
    assert stats["refused_too_many_devices"] == 1 and stats["refused_503"] == 1
    assert stats["registrations"] == 3
    for i in range(3):  # nobody was pushed out
        _keepalive_ok(h, f"dev{i}", _home(i))
    # another account is not affected
    assert h.register("alice", HOME_A).type == MessageType.REGISTERED
    # a slot that frees (unregister) is taken
    bye = ControlMessage(MessageType.UNREGISTER, h.txid(), registration=h.regs["dev0"])
    assert h.ask(encode_control(bye), _home(0)).type == MessageType.ACK
    assert h.register("dev3", _home(3)).type == MessageType.REGISTERED


def test_the_same_device_registering_again_keeps_its_slot() -> None:
    """A device (same key, same full JID) that registers again — from its
    address, or from a new one after its NAT mapping changed — replaces its
    registration, even when its account is full."""
    devices = _account(2)
    h = make(RendezvousConfig(max_devices_per_account=2), extra=devices)
    assert h.register("dev0", _home(0)).type == MessageType.REGISTERED
    assert h.register("dev1", _home(1)).type == MessageType.REGISTERED
    first = h.regs["dev0"]
    assert h.register("dev0", _home(0)).type == MessageType.REGISTERED
    second = h.regs["dev0"]
    moved = ("192.0.2.200", 30000)
    assert h.register("dev0", moved).type == MessageType.REGISTERED
    latest = h.regs["dev0"]
    assert len({first, second, latest}) == 3
    stats = h.core.statistics()
    assert stats["registrations"] == 2 and stats.get("refused_too_many_devices", 0) == 0
    # the old registrations are gone: 404 at the old address
    for old in (first, second):
        h.regs["dev0"] = old
        reply = h.keepalive("dev0", _home(0))
        assert reply.error is not None and reply.error[0] == 404
    h.regs["dev0"] = latest
    _keepalive_ok(h, "dev0", moved)
    _keepalive_ok(h, "dev1", _home(1))


def test_the_default_bound_is_32_devices_per_account() -> None:
    devices = _account(33)
    h = make(extra=devices)
    assert RendezvousConfig().max_devices_per_account == 32
    for i in range(32):
        assert h.register(f"dev{i}", _home(i)).type == MessageType.REGISTERED
    reply = h.register("dev32", _home(32))
    assert reply.error == (503, "too many devices")
