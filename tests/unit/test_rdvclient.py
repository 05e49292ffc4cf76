"""The device's rendezvous client against the real server core, in memory:
registration, keepalives, introductions, loss, and a server restart."""

from __future__ import annotations

import dataclasses
import random
from typing import Any

from dtx.identity import DeviceIdentity, generate_identity
from dtx.proto.rdvclient import (
    IntroductionFailed,
    IntroductionReceived,
    Registered,
    RegistrationLost,
    RendezvousClient,
    RendezvousEvent,
)
from dtx.trust import StaticKeys
from dtx.wire.control import ControlMessage, decode_control
from rendezvous.core import RendezvousConfig, RendezvousCore
from rendezvous.stun import ServerAddresses

SERVER = ("203.0.113.10", 3478)


class World:
    """A server core and clients, with a clock and a lossy wire."""

    def __init__(self, *idents: DeviceIdentity) -> None:
        self.now = 1000.0
        self.keys = StaticKeys({str(i.jid.bare): [i.public_key] for i in idents})
        self.core = self.new_core()
        self.clients: dict[tuple[str, int], RendezvousClient] = {}
        self.drop_next_from: set[tuple[str, int]] = set()
        for n, ident in enumerate(idents):
            addr = (f"198.51.100.{10 + n}", 40000 + n)
            self.clients[addr] = RendezvousClient(
                jid=str(ident.jid), key=ident.public_key, sign=ident.sign, server=SERVER,
                rng=random.Random(n), host_candidates=[(f"10.0.{n}.2", 5000)])

    def new_core(self) -> RendezvousCore:
        self.restarts = getattr(self, "restarts", -1) + 1
        return RendezvousCore(keys=self.keys, addresses=ServerAddresses(SERVER),
                              config=RendezvousConfig(keepalive=5.0, lifetime=15.0),
                              secret=bytes([self.restarts]) * 32,
                              rng=random.Random(7 + self.restarts))

    def shuttle(self) -> None:
        for _ in range(50):
            moved = False
            for addr, client in self.clients.items():
                for data, dest in client.datagrams_to_send():
                    assert dest == SERVER
                    moved = True
                    if addr in self.drop_next_from:
                        self.drop_next_from.discard(addr)
                        continue
                    self.core.receive_datagram(data, addr, SERVER, self.now)
            for data, dest, _ in self.core.datagrams_to_send():
                moved = True
                client = self.clients.get(dest)
                if client is not None:
                    client.receive(decode_control(data), self.now)
            if not moved:
                return

    def run_until(self, t: float) -> None:
        """Advance to ``t`` jumping from timer to timer (bounded)."""
        for _ in range(10_000):
            self.shuttle()
            timers = [c.get_timer() for c in self.clients.values()] + [self.core.get_timer()]
            due = [x for x in timers if x is not None and x <= t]
            if not due:
                break
            self.now = max(self.now, min(due))
            for c in self.clients.values():
                c.handle_timer(self.now)
            self.core.handle_timer(self.now)
        self.now = max(self.now, t)
        self.shuttle()

    def events(self, addr: tuple[str, int]) -> list[RendezvousEvent]:
        out = []
        while (e := self.clients[addr].next_event()) is not None:
            out.append(e)
        return out


def make_world() -> tuple[World, tuple[str, int], tuple[str, int]]:
    world = World(generate_identity("remote@example.org/phone"),
                  generate_identity("tv@example.org/living-room"))
    a, b = list(world.clients)
    for client in world.clients.values():
        client.start(world.now)
    world.shuttle()
    return world, a, b


def test_both_register_and_learn_their_public_address() -> None:
    world, a, b = make_world()
    for addr in (a, b):
        (ev,) = world.events(addr)
        assert isinstance(ev, Registered) and ev.reflexive == addr and not ev.again
        assert world.clients[addr].registered


def test_a_lost_hello_is_retransmitted() -> None:
    world = World(generate_identity("tv@example.org/living-room"))
    (addr,) = world.clients
    world.drop_next_from.add(addr)
    world.clients[addr].start(world.now)
    world.shuttle()
    assert not world.clients[addr].registered
    world.run_until(world.now + 1.0)
    assert world.clients[addr].registered


def test_introduction_reaches_both_sides() -> None:
    world, a, b = make_world()
    world.events(a), world.events(b)
    world.clients[a].introduce("tv@example.org", world.now)
    world.shuttle()
    (ev_a,) = world.events(a)
    (ev_b,) = world.events(b)
    assert isinstance(ev_a, IntroductionReceived) and isinstance(ev_b, IntroductionReceived)
    ma, mb = ev_a.message, ev_b.message
    assert ma.role == 1 and mb.role == 2
    assert ma.peer_jid == "tv@example.org/living-room"
    assert mb.peer_jid == "remote@example.org/phone"
    assert ma.intro == mb.intro and ma.probe_key == mb.probe_key
    assert b in [c.addr for c in ma.candidates]  # the TV's public address
    assert ("10.0.1.2", 5000) in [c.addr for c in ma.candidates]  # and its LAN one


def test_introduction_to_an_unknown_device_fails() -> None:
    world, a, _ = make_world()
    world.events(a)
    world.clients[a].introduce("radio@example.org", world.now)
    world.shuttle()
    (ev,) = world.events(a)
    assert isinstance(ev, IntroductionFailed) and ev.code == 404


def test_keepalives_hold_the_registration() -> None:
    world, a, _ = make_world()
    world.events(a)
    world.run_until(world.now + 60.0)  # four times the server's lifetime
    assert world.clients[a].registered
    assert world.events(a) == []


def test_registers_again_after_a_server_restart() -> None:
    world, a, b = make_world()
    world.events(a), world.events(b)
    old = world.clients[a].registration
    world.core = world.new_core()  # the server restarts with empty tables
    world.run_until(world.now + 12.0)
    evs = world.events(a)
    assert any(isinstance(e, RegistrationLost) for e in evs)
    again = [e for e in evs if isinstance(e, Registered)]
    assert again and again[-1].again
    assert world.clients[a].registered and world.clients[a].registration != old


# -- an introduction asked for before registering rides in the REGISTER ---------


class Wire:
    """What went over the wire between one client and the server, decoded."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.sent: list[tuple[str, str]] = []  # (direction, type name)

    def shuttle(self, drop: frozenset[str] = frozenset()) -> None:
        """Like World.shuttle, noting every message; types in ``drop`` that
        the server sends vanish."""
        world = self.world
        for _ in range(50):
            moved = False
            for addr, client in world.clients.items():
                for data, _ in client.datagrams_to_send():
                    moved = True
                    self.sent.append(("->", decode_control(data).type.name))
                    world.core.receive_datagram(data, addr, SERVER, world.now)
            for data, dest, _ in world.core.datagrams_to_send():
                moved = True
                msg = decode_control(data)
                self.sent.append(("<-", msg.type.name))
                if msg.type.name not in drop and dest in world.clients:
                    world.clients[dest].receive(msg, world.now)
            if not moved:
                return


def tv_registered() -> tuple[World, tuple[str, int], tuple[str, int]]:
    """A remote and a TV; the TV registered (its events read)."""
    world = World(generate_identity("remote@example.org/phone"),
                  generate_identity("tv@example.org/living-room"))
    a, b = list(world.clients)
    world.clients[b].start(world.now)
    world.shuttle()
    world.events(b)
    return world, a, b


def cold_start(drop: frozenset[str] = frozenset()
               ) -> tuple[World, Wire, tuple[str, int], tuple[str, int]]:
    """The TV registered; the remote starts and asks for the TV at once."""
    world, a, b = tv_registered()
    wire = Wire(world)
    remote = world.clients[a]
    remote.start(world.now)
    remote.introduce("tv@example.org", world.now)
    assert world.events(a) == [], "the introduction waits for the registration"
    wire.shuttle(drop)
    return world, wire, a, b


def test_an_introduction_asked_for_while_registering_takes_two_round_trips_not_three() -> None:
    world, wire, a, b = cold_start()
    mine = [t for d, t in wire.sent if d == "->"]
    assert mine == ["HELLO", "REGISTER"], "no INTRODUCE: it rode in the REGISTER"
    evs = world.events(a)
    assert [type(e).__name__ for e in evs] == ["Registered", "IntroductionReceived"]
    intro = evs[1]
    assert isinstance(intro, IntroductionReceived)
    assert intro.message.peer_jid == "tv@example.org/living-room" and intro.message.role == 1
    (theirs,) = world.events(b)
    assert isinstance(theirs, IntroductionReceived) and theirs.message.role == 2
    assert theirs.message.intro == intro.message.intro
    assert world.core.statistics()["introductions_total"] == 1


def test_a_lost_introduction_after_the_register_is_asked_for_again() -> None:
    world, wire, a, _ = cold_start(drop=frozenset({"INTRODUCTION"}))
    assert [type(e).__name__ for e in world.events(a)] == ["Registered"]
    world.run_until(world.now + 0.3)  # the INTRODUCE's first retransmission time
    evs = world.events(a)
    assert [type(e).__name__ for e in evs] == ["IntroductionReceived"]
    assert world.core.statistics()["introductions_repeated"] == 1, "the same introduction"


def test_an_old_server_that_ignores_the_target_gets_the_introduce() -> None:
    world, a, _ = tv_registered()
    core = world.core
    finish = core._finish_register

    def ignoring_target(msg: ControlMessage, *args: Any) -> None:
        finish(dataclasses.replace(msg, target=None), *args)

    core._finish_register = ignoring_target  # type: ignore[assignment,method-assign]
    wire = Wire(world)
    remote = world.clients[a]
    remote.start(world.now)
    remote.introduce("tv@example.org", world.now)
    wire.shuttle()
    assert [t for d, t in wire.sent if d == "->"] == ["HELLO", "REGISTER", "INTRODUCE"]
    evs = world.events(a)
    assert [type(e).__name__ for e in evs] == ["Registered", "IntroductionReceived"]


def test_a_target_that_is_not_registered_fails_after_registering() -> None:
    world = World(generate_identity("remote@example.org/phone"),
                  generate_identity("tv@example.org/living-room"))
    a, _ = list(world.clients)
    remote = world.clients[a]
    remote.start(world.now)
    remote.introduce("tv@example.org", world.now)
    world.shuttle()
    evs = world.events(a)
    assert [type(e).__name__ for e in evs] == ["Registered", "IntroductionFailed"]
    failed = evs[1]
    assert isinstance(failed, IntroductionFailed)
    assert (failed.code, failed.reason) == (404, "target not registered")


def test_a_refused_registration_fails_the_waiting_introductions() -> None:
    stranger = generate_identity("remote@example.org/phone")
    world = World(generate_identity("tv@example.org/living-room"))
    world.clients[("198.51.100.99", 40099)] = RendezvousClient(
        jid=str(stranger.jid), key=stranger.public_key, sign=stranger.sign, server=SERVER,
        rng=random.Random(9))
    addr = ("198.51.100.99", 40099)
    world.clients[addr].start(world.now)
    world.clients[addr].introduce("tv@example.org", world.now)
    world.shuttle()
    evs = world.events(addr)
    names = [type(e).__name__ for e in evs]
    assert names == ["RegistrationRefused", "IntroductionFailed"], names
    assert isinstance(evs[1], IntroductionFailed) and evs[1].code == 403


def test_a_server_with_a_mapping_port_waits_for_the_introduce() -> None:
    """With a mapping port the INTRODUCTION must say the new device's NAT
    mapping, known only after its mapping check: the server leaves TARGET
    alone and the device's INTRODUCE, after the check, gets it."""
    world = World(generate_identity("remote@example.org/phone"),
                  generate_identity("tv@example.org/living-room"))
    world.core = RendezvousCore(keys=world.keys,
                                addresses=ServerAddresses(SERVER, mapping_port=SERVER[1] + 1),
                                config=RendezvousConfig(keepalive=5.0, lifetime=15.0),
                                secret=bytes(32), rng=random.Random(7))
    a, b = list(world.clients)
    sent: list[str] = []

    def pump() -> None:
        for _ in range(50):
            moved = False
            for addr, client in world.clients.items():
                for data, dest in client.datagrams_to_send():
                    moved = True
                    if addr == a:
                        sent.append(decode_control(data).type.name)
                    world.core.receive_datagram(data, addr, dest, world.now)
            for data, dest, _ in world.core.datagrams_to_send():
                moved = True
                if dest in world.clients:
                    world.clients[dest].receive(decode_control(data), world.now)
            if not moved:
                return

    world.clients[b].start(world.now)
    pump()
    world.events(b)
    remote = world.clients[a]
    remote.start(world.now)
    remote.introduce("tv@example.org", world.now)
    pump()
    assert sent[:2] == ["HELLO", "REGISTER"] and "INTRODUCE" in sent
    assert sent.index("KEEPALIVE") < sent.index("INTRODUCE"), "the mapping check first"
    assert [type(e).__name__ for e in world.events(a)] == ["Registered", "IntroductionReceived"]
