"""NAT traversal of the production device endpoint on an in-memory network.

The same (nat_a, nat_b) → path table as ``tests/netns/test_traversal.py``
asserts with kernel NATs, here with :class:`tests.fakes.MemoryNat`: fast,
root-free and deterministic, so a change to the traversal logic shows up
in the unit tests before the NAT lab runs. The devices are the
:class:`~dtx.proto.endpoint.Endpoint` that ships (real QUIC sessions, real
XML streams), the server the real ``RendezvousCore``. Also: the memory NATs
measured by probes the way ``tests/netns/test_lab_nat.py`` measures the
lab's, the network's delivery order and route hook, punching under 20%
loss, a relay-only pair carrying stanzas, NAT reboots and address changes.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pytest

from dtx.errors import DecodeError
from dtx.identity import DeviceIdentity
from dtx.lab.nat import PROFILES, Filtering, Mapping
from dtx.proto.birthday import BirthdayConfig, BirthdayRole, SearchState
from dtx.proto.endpoint import EndpointConfig, SessionEnded
from dtx.proto.paths import PathKind
from dtx.proto.traversal import TraversalConfig, introduction_from_control
from dtx.wire.control import (
    ControlMessage,
    MessageType,
    Probe,
    ProbeKind,
    Role,
    decode_control,
    encode_probe,
)
from dtx.wire.demux import CONTROL_FIRST_BYTE, PROBE_FIRST_BYTE
from tests.fakes import (
    FakeClock,
    LossyRoute,
    MemoryNat,
    MemoryPeer,
    MemoryNetwork,
    MemoryServer,
    NotSettled,
    Packet,
    SERVER_ADDR,
    PublicAddresses,
    RouteHook,
    add_device,
    deliver_as_is,
    identity_for,
    make_scene,
)

Address = tuple[str, int]
REMOTE = "remote@example.org/phone"
TV = "tv@example.org/living-room"
NAMES = ["none", "full-cone", "restricted-cone", "port-restricted-cone", "symmetric"]
RELAY_ONLY = {frozenset({"symmetric"})}
BIRTHDAY_PAIRS = {frozenset({"symmetric", "port-restricted-cone"})}
"""Direct only by birthday probing (the server's mapping check on)."""
SETTLE = 4.0
"""Seconds watched after the introduction, as in the netns test: past the
quick punch attempts."""


def expected_path(a: str, b: str, *, birthday: bool = True) -> PathKind:
    pair = frozenset({a, b})
    if pair in RELAY_ONLY or (not birthday and pair in BIRTHDAY_PAIRS):
        return PathKind.RELAY
    return PathKind.DIRECT


PAIRS = list(itertools.combinations_with_replacement(NAMES, 2))
# The other order too where who initiates could matter: the relay-only pair
# and a symmetric/cone pair (combinations put "symmetric" second).
PAIRS += [("symmetric", "port-restricted-cone"), ("symmetric", "restricted-cone")]


# -- the memory NATs, measured by probes -------------------------------------------

A1, A2 = "203.0.113.10", "203.0.113.11"
PORT, ALT_PORT = 3478, 3479


@dataclass
class ProbeLab:
    net: MemoryNetwork
    host: Address
    seen: dict[Address, list[Address]]
    """server (ip, port) -> sources seen there"""
    got: list[Address]
    """sources of what reached the host"""


def probe_lab(profile: str) -> ProbeLab:
    net = MemoryNetwork(FakeClock(), seed=3)
    seen: dict[Address, list[Address]] = {}
    for ip in (A1, A2):
        net.add_public_host(ip)
        for port in (PORT, ALT_PORT):
            net.bind((ip, port), lambda d, s, local: seen.setdefault(local, []).append(s))
    nat = net.add_nat("home", profile, "198.51.100.1", lan_prefix="10.1.0")
    host = (net.add_host(nat), 5000)
    got: list[Address] = []
    net.bind(host, lambda d, s, local: got.append(s))
    return ProbeLab(net, host, seen, got)


def classify(profile: str) -> tuple[Mapping, Filtering, set[str]]:
    """RFC 5780 style: mapping from three destinations; filtering from
    answers at other addresses while the NAT has seen only A1:PORT."""
    lab = probe_lab(profile)
    for dst in ((A1, PORT), (A2, PORT), (A2, ALT_PORT)):
        lab.net.send(lab.host, dst, b"where am I")
    lab.net.run(1.0)
    x1, x2, x3 = lab.seen[(A1, PORT)][0], lab.seen[(A2, PORT)][0], lab.seen[(A2, ALT_PORT)][0]
    if x1 == x2:
        mapping = Mapping.ENDPOINT_INDEPENDENT
    elif x2 == x3:
        mapping = Mapping.ADDRESS_DEPENDENT
    else:
        mapping = Mapping.ADDRESS_AND_PORT_DEPENDENT

    lab = probe_lab(profile)
    lab.net.send(lab.host, (A1, PORT), b"where am I")
    lab.net.run(1.0)
    mapped = lab.seen[(A1, PORT)][0]
    lab.net.send((A2, ALT_PORT), mapped, b"other address and port")
    lab.net.run(1.0)
    if lab.got:
        filtering = Filtering.ENDPOINT_INDEPENDENT
    else:
        lab.net.send((A1, ALT_PORT), mapped, b"other port")
        lab.net.run(1.0)
        filtering = (Filtering.ADDRESS_DEPENDENT if lab.got
                     else Filtering.ADDRESS_AND_PORT_DEPENDENT)
    lab.net.send((A1, PORT), mapped, b"the address it sent to")
    lab.net.run(1.0)
    assert (A1, PORT) in lab.got, "an answer from where the host sent must arrive"
    return mapping, filtering, {x1[0], x2[0], x3[0]}


@pytest.mark.parametrize("profile", NAMES)
def test_memory_nat_behaviour_measured_by_probes(profile: str) -> None:
    mapping, filtering, public_ips = classify(profile)
    expected = PROFILES[profile]
    assert mapping is expected.mapping
    assert filtering is expected.filtering
    # "none" translates nothing: the host's own address is seen
    assert public_ips == ({"198.51.100.1"})


def test_port_preserved_by_a_cone_random_by_symmetric() -> None:
    cone = probe_lab("port-restricted-cone")
    sym = probe_lab("symmetric")
    for lab in (cone, sym):
        lab.net.send(lab.host, (A1, PORT), b"x")
        lab.net.send(lab.host, (A1, ALT_PORT), b"x")
        lab.net.run(1.0)
    assert cone.seen[(A1, PORT)][0][1] == 5000 == cone.seen[(A1, ALT_PORT)][0][1]
    ports = {sym.seen[(A1, PORT)][0][1], sym.seen[(A1, ALT_PORT)][0][1]}
    assert len(ports) == 2 and 5000 not in ports


def test_a_second_host_on_the_same_port_gets_another_public_port() -> None:
    lab = probe_lab("port-restricted-cone")
    nat = lab.net.nats["home"]
    other = (lab.net.add_host(nat), 5000)
    lab.net.bind(other, lambda d, s, local: None)
    lab.net.send(lab.host, (A1, PORT), b"x")
    lab.net.send(other, (A1, PORT), b"x")
    lab.net.run(1.0)
    first, second = lab.seen[(A1, PORT)]
    assert first[1] == 5000 and second[1] != 5000


def test_binding_expires_after_the_udp_timeout() -> None:
    lab = probe_lab("full-cone")
    lab.net.send(lab.host, (A1, PORT), b"x")
    lab.net.run(1.0)
    mapped = lab.seen[(A1, PORT)][0]
    lab.net.send((A2, PORT), mapped, b"in time")
    lab.net.run(PROFILES["full-cone"].udp_timeout - 2.0)
    assert lab.got == [(A2, PORT)]
    lab.net.run(2.0)  # now past udp_timeout since the host last sent
    lab.net.send((A2, PORT), mapped, b"too late")
    lab.net.run(1.0)
    assert lab.got == [(A2, PORT)]
    assert lab.net.nats["home"].counters["expired"] == 1


@pytest.mark.parametrize("hairpin", [True, False])
def test_hairpin_between_two_hosts_of_one_nat(hairpin: bool) -> None:
    profile = dataclasses.replace(PROFILES["full-cone"], hairpin=hairpin)
    net = MemoryNetwork(FakeClock())
    net.add_public_host(A1)
    seen: list[Address] = []
    net.bind((A1, PORT), lambda d, s, local: seen.append(s))
    nat = net.add_nat("home", profile, "198.51.100.1", lan_prefix="10.1.0")
    one, two = (net.add_host(nat), 5000), (net.add_host(nat), 6000)
    got: list[Address] = []
    net.bind(one, lambda d, s, local: None)
    net.bind(two, lambda d, s, local: got.append(s))
    net.send(one, (A1, PORT), b"x")
    net.send(two, (A1, PORT), b"x")
    net.run(1.0)
    one_public, two_public = seen
    net.send(one, two_public, b"to the other host's public address")
    net.run(1.0)
    if hairpin:
        assert got == [one_public], "the sender appears with its public address"
    else:
        assert got == [] and net.counters["no_hairpin"] == 1


# -- the network: order, route hook, bounds ---------------------------------------------


def test_packets_arrive_in_timestamp_order_and_the_hook_can_delay_drop_and_duplicate() -> None:
    def hook(net: MemoryNetwork, packet: Packet) -> None:
        if packet.data == b"late":
            net.deliver(packet, extra_delay=0.5)
        elif packet.data == b"twice":
            net.deliver(packet)
            net.deliver(packet, extra_delay=0.01)
        elif packet.data != b"lost":
            net.deliver(packet)

    net = MemoryNetwork(FakeClock(), route_packet=hook)
    for ip in (A1, A2):
        net.add_public_host(ip, delay=0.01)
    got: list[tuple[bytes, float]] = []
    net.bind((A2, PORT), lambda d, s, local: got.append((d, net.clock.now)))
    net.bind((A1, PORT), lambda d, s, local: None)
    start = net.clock.now
    for data in (b"late", b"lost", b"twice", b"on time"):
        net.send((A1, PORT), (A2, PORT), data)
    net.run(2.0)
    assert [d for d, _ in got] == [b"twice", b"on time", b"twice", b"late"]
    times = [t - start for _, t in got]
    assert times == sorted(times)
    assert times[0] == pytest.approx(0.0205) and times[-1] == pytest.approx(0.5205)


def lossy_counts(seed: int) -> tuple[int, int, int]:
    route = LossyRoute(random.Random(seed), loss=0.2, duplicate=0.1, jitter=0.05)
    net = MemoryNetwork(FakeClock(), route_packet=route)
    net.add_public_host(A1)
    net.add_public_host(A2)
    got: list[bytes] = []
    net.bind((A2, PORT), lambda d, s, local: got.append(d))
    net.bind((A1, PORT), lambda d, s, local: None)
    for i in range(1000):
        net.send((A1, PORT), (A2, PORT), i.to_bytes(2, "big"))
    net.run(1.0)
    return route.dropped, route.duplicated, len(got)


def test_lossy_route_is_seeded_and_roughly_as_lossy_as_asked() -> None:
    dropped, duplicated, delivered = lossy_counts(5)
    assert lossy_counts(5) == (dropped, duplicated, delivered)
    assert 150 < dropped < 250 and 50 < duplicated < 110
    assert delivered == 1000 - dropped + duplicated


def test_private_addresses_of_another_home_are_unroutable() -> None:
    net = MemoryNetwork(FakeClock())
    home_a = net.add_nat("a", "full-cone", "198.51.100.1", lan_prefix="10.1.0")
    home_b = net.add_nat("b", "full-cone", "198.51.100.2", lan_prefix="10.2.0")
    a, b = (net.add_host(home_a), 5000), (net.add_host(home_b), 5000)
    got: list[bytes] = []
    net.bind(a, lambda d, s, local: None)
    net.bind(b, lambda d, s, local: got.append(d))
    net.send(a, b, b"to a private address")
    net.run(1.0)
    assert got == [] and net.counters["unroutable"] == 1


class StuckNode:
    """A node whose timer never moves on."""

    def get_timer(self) -> float | None:
        return 0.0

    def handle_timer(self, now: float) -> None:
        pass


def test_a_run_is_bounded_in_steps() -> None:
    net = MemoryNetwork(FakeClock())
    net.add_node(StuckNode())
    with pytest.raises(NotSettled):
        net.run(1.0, max_steps=100)


# -- traversal: the NAT matrix -----------------------------------------------------------


@dataclass
class Scene:
    net: MemoryNetwork
    server: MemoryServer
    remote: MemoryPeer
    tv: MemoryPeer
    introduced_at: float


def introduce(nat_a: str, nat_b: str, *, seed: int = 0, route: RouteHook = deliver_as_is,
              same_nat: bool = False, double: bool = False,
              register_within: float = 10.0, session_within: float | None = 5.0,
              port_mapped: tuple[bool, bool] = (False, False), mapping_port: bool = False,
              config: EndpointConfig | None = None,
              trusted: Sequence[DeviceIdentity] = ()) -> Scene:
    """Two devices (the remote behind ``nat_a`` and the TV behind ``nat_b``),
    registered; the remote asks for the TV, opens a session over the
    introduction at once and sends its first stanza as soon as the TV's key
    is trusted (on the relay). ``session_within=None``: introduce only.
    ``port_mapped``: whose router forwards a port to it (remote, TV), as
    the driver's PortMapper tells the endpoint once the router answered.
    ``mapping_port``: the server checks NAT mappings (so a hard pair runs a
    birthday search); ``config``: both devices' endpoint configuration;
    ``trusted``: more identities the server and the devices know."""
    ids = [identity_for(REMOTE, 1), identity_for(TV, 2)]
    net, server = make_scene([*ids, *trusted], seed=seed, route_packet=route,
                             mapping_port=mapping_port)
    public = PublicAddresses()
    if same_nat:
        home = net.add_nat("h", nat_a, public.take(), lan_prefix="10.1.0")
        home_a = home_b = home
    else:
        if double:
            cgn = net.add_nat("cgn", "symmetric", public.take(), lan_prefix="100.64.0")
            home_a = net.add_nat("a", nat_a, cgn.next_host_ip(), lan_prefix="10.1.0",
                                 outside=cgn)
        else:
            home_a = net.add_nat("a", nat_a, public.take(), lan_prefix="10.1.0")
        home_b = net.add_nat("b", nat_b, public.take(), lan_prefix="10.2.0")
    remote = add_device(net, home_a, ids[0], server, seed=seed * 7 + 1, listen=False,
                        config=config)
    tv = add_device(net, home_b, ids[1], server, seed=seed * 7 + 2, config=config)
    for device, home, mapped in ((remote, home_a, port_mapped[0]), (tv, home_b, port_mapped[1])):
        if mapped:
            device.endpoint.set_port_mapped(home.add_port_mapping(device.addr), net.clock.now)
    tv.start()
    remote.start()
    assert net.run_until(lambda: remote.endpoint.registered and tv.endpoint.registered,
                         register_within), "both register"
    remote.introduce(TV)
    assert net.run_until(lambda: TV in remote.traversal.links, 10.0), "introduced"
    introduced_at = net.clock.now
    if session_within is not None:
        remote.connect(TV)
        assert net.run_until(lambda: TV in remote.sessions, session_within), "TV's key trusted"
        remote.send(TV, "pause")
    return Scene(net, server, remote, tv, introduced_at)


def relayed(scene: Scene) -> int:
    return scene.server.core.statistics().get("relayed_frames", 0)


def exchange(scene: Scene, expect: PathKind, n: int = 20) -> None:
    """Stanzas both ways on the settled path: all arrive, in order, on that
    path (the relay carried none of them, or all of them)."""
    remote, tv = scene.remote, scene.tv
    before_tv, before_remote = len(tv.bodies(REMOTE)), len(remote.bodies(TV))
    before_relayed = relayed(scene)
    for i in range(n):
        remote.send(TV, "to-tv %d" % i)
        tv.send(REMOTE, "to-remote %d" % i)
    scene.net.run(1.0)
    assert tv.bodies(REMOTE)[before_tv:] == ["to-tv %d" % i for i in range(n)]
    assert remote.bodies(TV)[before_remote:] == ["to-remote %d" % i for i in range(n)]
    assert (remote.path(TV), tv.path(REMOTE)) == (expect, expect)
    if expect is PathKind.RELAY:
        assert relayed(scene) - before_relayed >= 2, "both directions went through the relay"
    else:
        assert relayed(scene) == before_relayed, "nothing went through the relay"


@pytest.mark.parametrize("nat_a, nat_b", PAIRS, ids=[f"{a}--{b}" for a, b in PAIRS])
def test_connect_through_nat_pair(nat_a: str, nat_b: str) -> None:
    scene = introduce(nat_a, nat_b, mapping_port=True, config=BIRTHDAY)
    expect = expected_path(nat_a, nat_b)
    scene.net.run(SETTLE)
    remote, tv = scene.remote, scene.tv
    assert "pause" in tv.bodies(REMOTE), "the first stanza never waits for punching"
    assert (remote.path(TV), tv.path(REMOTE)) == (expect, expect)
    for device, peer in ((remote, TV), (tv, REMOTE)):
        kinds = [c.kind for c in device.changes(peer)]
        assert kinds[0] is PathKind.RELAY, "every session starts on the relay"
        if expect is PathKind.DIRECT:
            assert kinds == [PathKind.RELAY, PathKind.DIRECT], "no flapping"
    if expect is PathKind.DIRECT and "symmetric" in (nat_a, nat_b) and nat_a != nat_b:
        # The side facing the symmetric NAT talks to a peer-reflexive
        # address, not the server-reflexive one it was introduced with.
        sym, other, peer = (remote, tv, REMOTE) if nat_a == "symmetric" else (tv, remote, TV)
        current = other.traversal.links[peer].paths.current
        assert current is not None and current.key is not None
        assert sym.registered_as is not None
        assert current.key[0] == sym.registered_as[0]
        assert current.key != sym.registered_as
    exchange(scene, expect)
    assert scene.server.core.statistics().get("internal_errors", 0) == 0


MAPPED_PAIRS = [("symmetric", "symmetric"), ("symmetric", "port-restricted-cone"),
                ("port-restricted-cone", "symmetric")]


@pytest.mark.parametrize("nat_a, nat_b", MAPPED_PAIRS, ids=[f"{a}--{b}" for a, b in MAPPED_PAIRS])
@pytest.mark.parametrize("side", ["remote", "tv"])
def test_a_port_mapping_on_either_side_makes_a_hard_pair_direct(nat_a: str, nat_b: str,
                                                               side: str) -> None:
    assert expected_path(nat_a, nat_b, birthday=False) is PathKind.RELAY  # without the mapping
    scene = introduce(nat_a, nat_b, port_mapped=(side == "remote", side == "tv"))
    scene.net.run(SETTLE)
    remote, tv = scene.remote, scene.tv
    assert (remote.path(TV), tv.path(REMOTE)) == (PathKind.DIRECT, PathKind.DIRECT)
    home = scene.net.nats["a" if side == "remote" else "b"]
    assert home.counters["forwarded"] > 0, "the peer came in through the port forward"
    exchange(scene, PathKind.DIRECT)


def test_a_mapping_made_after_registering_is_registered_again() -> None:
    scene = introduce("symmetric", "symmetric", session_within=None)
    remote, tv, net = scene.remote, scene.tv, scene.net
    before = scene.server.core.statistics().get("registrations_total", 0)
    tv.endpoint.set_port_mapped(net.nats["b"].add_port_mapping(tv.addr), net.clock.now)
    tv.flush()
    assert net.run_until(lambda: scene.server.core.statistics().get("registrations_total", 0)
                         > before and tv.endpoint.registered, 5.0), "registered again"
    remote.introduce(TV)
    net.run(1.0)
    remote.connect(TV)
    net.run(SETTLE)
    assert (remote.path(TV), tv.path(REMOTE)) == (PathKind.DIRECT, PathKind.DIRECT)
    exchange(scene, PathKind.DIRECT)


# -- birthday probing ---------------------------------------------------------------

BIRTHDAY = EndpointConfig(traversal=TraversalConfig(birthday=BirthdayConfig(
    port_range=(40000, 59999))))
"""The memory NATs draw random ports from 40000-59999 (the lab's kernel
NAT from the whole range: the defaults)."""


@pytest.mark.parametrize("nat_a, nat_b", [("symmetric", "port-restricted-cone"),
                                          ("port-restricted-cone", "symmetric")])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_birthday_probing_takes_a_hard_pair_direct(nat_a: str, nat_b: str, seed: int) -> None:
    assert expected_path(nat_a, nat_b, birthday=False) is PathKind.RELAY  # without it
    scene = introduce(nat_a, nat_b, seed=seed, mapping_port=True, config=BIRTHDAY)
    remote, tv, net = scene.remote, scene.tv, scene.net
    hard, easy, hard_peer, easy_peer = ((remote, tv, TV, REMOTE) if nat_a == "symmetric"
                                        else (tv, remote, REMOTE, TV))
    search = hard.traversal.links[hard_peer].birthday
    assert search is not None and search.role is BirthdayRole.HARD
    easy_search = easy.traversal.links[easy_peer].birthday
    assert easy_search is not None and easy_search.role is BirthdayRole.EASY
    for i in range(40):  # stanzas all through the search, on the relay
        remote.send(TV, "during %d" % i)
        net.run(0.25)
        if remote.path(TV) is PathKind.DIRECT and tv.path(REMOTE) is PathKind.DIRECT:
            break
    assert (remote.path(TV), tv.path(REMOTE)) == (PathKind.DIRECT, PathKind.DIRECT)
    assert search.state is SearchState.FOUND and search.winner is not None
    assert hard.traversal.counters["birthday_found"] == 1
    assert easy_search.state is SearchState.STOPPED or easy_search.state is SearchState.FOUND
    net.run(1.0)
    assert set(hard.side) == {search.winner}, "the losing sockets are closed at once"
    assert hard.side_opened == BIRTHDAY.traversal.birthday.sockets
    assert not easy.side, "the easy side opens no socket"
    assert easy_search.probes_sent <= BIRTHDAY.traversal.birthday.probes
    sent = ["pause"] + ["during %d" % j for j in range(i + 1)]
    assert tv.bodies(REMOTE) == sent, "every stanza sent during the search, once, in order"
    # The winning socket carries the session both ways from now on.
    exchange(scene, PathKind.DIRECT)
    link = hard.traversal.links[hard_peer]
    assert link.side is not None and link.side[1] == search.winner


def test_birthday_probing_needs_the_servers_mapping_check() -> None:
    scene = introduce("symmetric", "port-restricted-cone", config=BIRTHDAY)
    scene.net.run(SETTLE + 2.0)
    for device, peer in ((scene.remote, TV), (scene.tv, REMOTE)):
        assert device.traversal.links[peer].birthday is None
        assert not device.side
    exchange(scene, PathKind.RELAY)


def test_two_symmetric_nats_run_no_birthday_search() -> None:
    scene = introduce("symmetric", "symmetric", mapping_port=True, config=BIRTHDAY)
    scene.net.run(SETTLE)
    for device, peer in ((scene.remote, TV), (scene.tv, REMOTE)):
        link = device.traversal.links[peer]
        assert link.birthday is None and not device.side
    exchange(scene, PathKind.RELAY)


def test_a_birthday_search_that_finds_nothing_gives_up_and_closes_its_sockets() -> None:
    few = EndpointConfig(traversal=TraversalConfig(birthday=BirthdayConfig(
        port_range=(40000, 59999), sockets=2, probes=20, rate=20.0)))
    scene = introduce("symmetric", "port-restricted-cone", mapping_port=True, config=few)
    remote, tv, net = scene.remote, scene.tv, scene.net
    search = remote.traversal.links[TV].birthday
    assert search is not None
    net.run(few.traversal.birthday.start_after + 0.5)
    assert search.state is SearchState.SEARCHING and len(remote.side) == 2
    net.run(few.traversal.birthday.duration + 0.5)
    assert search.state is SearchState.FAILED  # 2 ports of 20,000 in 20 guesses (seeded)
    assert remote.traversal.counters["birthday_failed"] == 1
    assert not remote.side, "its sockets are closed"
    easy = tv.traversal.links[REMOTE].birthday
    assert easy is not None and easy.probes_sent == 20
    exchange(scene, PathKind.RELAY)


def test_garbage_on_a_searchs_sockets_is_counted_and_dropped() -> None:
    scene = introduce("symmetric", "port-restricted-cone", mapping_port=True, config=BIRTHDAY,
                      session_within=None)
    remote, net = scene.remote, scene.net
    search = remote.traversal.links[TV].birthday
    assert search is not None
    net.run_until(lambda: search.state is SearchState.SEARCHING, 2.0)
    sid = min(remote.side)
    stranger = ("192.0.2.66", 4444)
    counters = remote.traversal.counters
    before = dict(counters)
    other_intro = encode_probe(Probe(ProbeKind.PING, b"\x01" * 8, b"\x02" * 8, None), b"k" * 32)
    quic_like = bytes([0xC0]) + bytes(1199)  # a long-header QUIC packet
    for data in (b"", b"garbage", quic_like, other_intro, b"\x12" + bytes(40)):
        remote.endpoint.receive_side_datagram(sid, data, stranger, net.clock.now)
        remote.flush()
    link = remote.traversal.links[TV]
    tagged = encode_probe(Probe(ProbeKind.PING, link.intro, b"\x03" * 8, None), link.probe_key)
    remote.endpoint.receive_side_datagram(10_000, tagged, stranger, net.clock.now)  # not its socket
    assert counters["side_dropped"] - before["side_dropped"] == 4
    assert counters["probes_bad"] - before["probes_bad"] == 2
    assert search.state is SearchState.SEARCHING, "the search goes on"
    assert link.side is None and remote.traversal.side_route(stranger) is None


def test_an_initial_that_beats_the_introduction_makes_one_connection() -> None:
    """The TV's INTRODUCTION is late (the server's packets to it take 60 ms
    more): the remote's direct copy of its first Initial reaches the TV
    first, from a real address, and the relayed copy after it, from the
    link's mapped one. One connection takes both; the handshake completes."""
    def route(net: MemoryNetwork, packet: Packet) -> None:
        late = packet.src == SERVER_ADDR and packet.dst[0] == "198.51.100.2"
        net.deliver(packet, extra_delay=0.06 if late else 0.0)

    scene = introduce("none", "full-cone", route=route, session_within=None)
    remote, tv, net = scene.remote, scene.tv, scene.net
    remote.connect(TV)
    assert net.run_until(lambda: TV in remote.sessions and REMOTE in tv.sessions, 5.0)
    net.run(SETTLE)
    conns = tv.endpoint.connections()
    assert len(conns) == 1 and conns[0].address == tv.traversal.links[REMOTE].mapped
    assert conns[0].is_open and remote.sessions[TV].is_open
    exchange(scene, PathKind.DIRECT)


def test_an_initial_from_a_port_no_one_has_seen_and_its_relayed_copy_make_one_connection(
        ) -> None:
    """The remote sits behind a symmetric NAT, the TV's router maps its
    port: the remote's direct copy of its first Initial reaches the TV
    after the introduction but from the NAT's port toward the TV, which no
    probe has shown yet (its probes are late here), and the relayed copy
    comes on the link's mapped address after it. One connection takes
    both and moves to the link; the handshake completes."""
    probes_held = {"until": float("inf")}  # (until the session is asked for)

    def route(net: MemoryNetwork, packet: Packet) -> None:
        probe = packet.data[:1] == bytes([PROBE_FIRST_BYTE])
        if probe and packet.src[0] == "198.51.100.1" and net.clock.now < probes_held["until"]:
            net.deliver(packet, extra_delay=0.3)
            return
        net.deliver(packet)

    scene = introduce("symmetric", "port-restricted-cone", route=route, session_within=None,
                      port_mapped=(False, True))
    remote, tv, net = scene.remote, scene.tv, scene.net
    probes_held["until"] = net.clock.now + 1.0
    remote.connect(TV)
    assert net.run_until(lambda: TV in remote.sessions and REMOTE in tv.sessions, 5.0)
    net.run(SETTLE)
    conns = tv.endpoint.connections()
    assert len(conns) == 1 and conns[0].address == tv.traversal.links[REMOTE].mapped
    counters = tv.endpoint.counters
    assert counters["initial_copies_joined"] + counters["initial_copies_dropped"] >= 1
    exchange(scene, PathKind.DIRECT)


def test_two_devices_behind_the_same_nat_use_the_lan() -> None:
    scene = introduce("port-restricted-cone", "port-restricted-cone", same_nat=True)
    scene.net.run(SETTLE)
    assert scene.remote.path(TV) is PathKind.LAN and scene.tv.path(REMOTE) is PathKind.LAN
    exchange(scene, PathKind.LAN)


def test_double_nat_symmetric_cgn_to_full_cone_goes_direct() -> None:
    scene = introduce("port-restricted-cone", "full-cone", double=True)
    scene.net.run(SETTLE)
    assert scene.remote.path(TV) is PathKind.DIRECT and scene.tv.path(REMOTE) is PathKind.DIRECT
    # the TV sees the remote at the CGN's address, not its home NAT's
    assert scene.remote.registered_as is not None
    assert scene.remote.registered_as[0] == scene.net.nats["cgn"].public_ip
    exchange(scene, PathKind.DIRECT)


def test_relay_only_pair_carries_stanzas_through_the_relay() -> None:
    scene = introduce("symmetric", "symmetric")
    scene.net.run(SETTLE)
    exchange(scene, PathKind.RELAY, n=100)
    assert scene.remote.sessions[TV].path is PathKind.RELAY


def test_relay_only_pair_probes_once_a_minute_then_stops() -> None:
    scene = introduce("symmetric", "port-restricted-cone")
    scene.net.run(120.0)
    assert scene.remote.path(TV) is PathKind.RELAY
    filtered = scene.net.counters["filtered"]
    scene.net.run(60.0)
    # past the schedule: one round of probes a minute, each side, to each candidate
    per_minute = scene.net.counters["filtered"] - filtered
    assert 1 <= per_minute <= 8, per_minute
    scene.net.run(3600.0)
    filtered = scene.net.counters["filtered"]
    scene.net.run(120.0)
    # an hour after the introduction they stop; keepalives over the relay go on
    assert scene.net.counters["filtered"] == filtered
    assert scene.remote.sessions[TV].is_open, "the session lives on the relay"


def test_a_path_that_opens_after_the_schedule_is_found_within_a_minute() -> None:
    """Home to home is cut for the first three minutes (past the whole
    punch schedule): the session lives on the relay, then moves to direct
    at the next once-a-minute punch after the cut ends."""
    homes = {"198.51.100.1", "198.51.100.2"}  # the first two PublicAddresses
    cut = [True]

    def route(net: MemoryNetwork, packet: Packet) -> None:
        if not (cut[0] and {packet.src[0], packet.dst[0]} == homes):
            net.deliver(packet)

    scene = introduce("port-restricted-cone", "port-restricted-cone", route=route)
    scene.net.run(180.0)
    assert scene.remote.path(TV) is PathKind.RELAY
    cut[0] = False
    opened = scene.net.clock.now
    assert scene.net.run_until(lambda: scene.remote.path(TV) is PathKind.DIRECT, 61.0)
    assert scene.net.clock.now - opened <= 61.0
    assert scene.remote.sessions[TV].is_open


def test_an_introduction_to_a_device_that_is_not_listening_is_refused() -> None:
    """The accepting gate: a device that does not listen takes no
    introduction it did not ask for, and no session."""
    ids = [identity_for(REMOTE, 1), identity_for(TV, 2)]
    net, server = make_scene(ids)
    public = PublicAddresses()
    home_a = net.add_nat("a", "full-cone", public.take(), lan_prefix="10.1.0")
    home_b = net.add_nat("b", "full-cone", public.take(), lan_prefix="10.2.0")
    remote = add_device(net, home_a, ids[0], server, seed=1)
    tv = add_device(net, home_b, ids[1], server, seed=2, listen=False)
    tv.start()
    remote.start()
    assert net.run_until(lambda: remote.endpoint.registered and tv.endpoint.registered, 10.0)
    remote.introduce(TV)
    net.run(5.0)
    assert REMOTE not in tv.traversal.links
    assert not tv.endpoint.connections()


# -- under loss -------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_twenty_percent_loss_still_ends_direct(seed: int) -> None:
    route = LossyRoute(random.Random(seed), loss=0.2, duplicate=0.01, jitter=0.01)
    scene = introduce("port-restricted-cone", "restricted-cone", seed=seed, route=route,
                      register_within=30.0, session_within=None)
    assert scene.net.run_until(both_direct(scene), 20.0), "direct despite loss"
    assert route.dropped > 0


def both_direct(scene: Scene) -> Callable[[], bool]:
    return lambda: (scene.remote.path(TV) is PathKind.DIRECT
                    and scene.tv.path(REMOTE) is PathKind.DIRECT)


def history(seed: int) -> list[tuple[float, str]]:
    route = LossyRoute(random.Random(seed), loss=0.2, duplicate=0.05, jitter=0.03)
    scene = introduce("restricted-cone", "symmetric", seed=seed, route=route,
                      register_within=30.0, session_within=None)
    scene.net.run(10.0)
    return [(c.at, c.kind.value) for d, p in ((scene.remote, TV), (scene.tv, REMOTE))
            for c in d.changes(p)]


def test_a_seeded_run_is_repeatable() -> None:
    assert history(11) == history(11)


# -- address changes ----------------------------------------------------------------


def stream(scene: Scene, seconds: float, every: float = 0.05) -> None:
    """Stanzas both ways every ``every`` seconds (bounded)."""
    for i in range(int(seconds / every)):
        scene.remote.send(TV, "r%d" % i)
        scene.tv.send(REMOTE, "t%d" % i)
        scene.net.run(every)


def test_a_port_preserving_nat_reboot_does_not_leave_the_direct_path() -> None:
    scene = introduce("port-restricted-cone", "port-restricted-cone")
    scene.net.run(SETTLE)
    changes = len(scene.remote.changes(TV)), len(scene.tv.changes(REMOTE))
    for nat in scene.net.nats.values():
        nat.flush()
    stream(scene, 4.0)
    # both keep sending to the same public addresses, which reopens both filters
    assert (len(scene.remote.changes(TV)), len(scene.tv.changes(REMOTE))) == changes
    assert scene.remote.path(TV) is PathKind.DIRECT and scene.tv.path(REMOTE) is PathKind.DIRECT
    before = relayed(scene)
    stream(scene, 1.0)
    assert relayed(scene) == before, "the last stanzas went direct"
    assert scene.tv.bodies(REMOTE)[-100:] == ["r%d" % i for i in range(80)] + [
        "r%d" % i for i in range(20)], "every stanza arrived, in order"


def test_a_new_public_address_falls_back_to_the_relay_then_punches_again() -> None:
    scene = introduce("port-restricted-cone", "port-restricted-cone")
    scene.net.run(SETTLE)
    start = scene.net.clock.now
    scene.net.renumber(scene.net.nats["a"], "198.51.100.99")
    stream(scene, 10.0)
    kinds = [(c.kind, round(c.at - start, 1)) for c in scene.remote.changes(TV)]
    assert [k for k, _ in kinds] == [PathKind.RELAY, PathKind.DIRECT, PathKind.RELAY,
                                     PathKind.DIRECT]
    fell_back, back_direct = kinds[2][1], kinds[3][1]
    assert fell_back < 3.0, "the dead path is dropped within a few seconds"
    assert back_direct < fell_back + 2.0, "registration and punching start at once"
    assert scene.remote.registered_as == ("198.51.100.99", 5000)
    assert scene.tv.path(REMOTE) is PathKind.DIRECT
    current = scene.tv.traversal.links[REMOTE].paths.current
    assert current is not None and current.key == ("198.51.100.99", 5000)
    assert scene.tv.bodies(REMOTE)[-200:] == ["r%d" % i for i in range(200)], \
        "every stanza arrived exactly once, in order, across the change"


# -- a hostile peer: no reflection ------------------------------------------------


class Tally:
    """A route hook that counts the bytes each (source IP, destination IP)
    pair puts on the wire, then delivers as is."""

    def __init__(self) -> None:
        self.bytes: dict[tuple[str, str], int] = {}

    def __call__(self, network: MemoryNetwork, packet: Packet) -> None:
        key = (packet.src[0], packet.dst[0])
        self.bytes[key] = self.bytes.get(key, 0) + len(packet.data)
        network.deliver(packet)

    def sent_by(self, ips: set[str]) -> int:
        return sum(n for (src, _), n in self.bytes.items() if src in ips)

    def received_by(self, ip: str, *, excluding: set[str]) -> int:
        return sum(n for (src, dst), n in self.bytes.items() if dst == ip and src not in excluding)


def test_a_peer_listing_third_parties_as_host_candidates_gets_no_reflection() -> None:
    """A registered account lists third-party addresses (on the internet and
    on the TV's own LAN) as its host candidates and introduces itself to the
    TV over and over. The TV probes none of them: toward any address not
    the peer's it sends at most 2x what the attacker spent (here, nothing)."""
    tally = Tally()
    ids = [identity_for(REMOTE, 1), identity_for(TV, 2)]
    net, server = make_scene(ids, route_packet=tally)
    public = PublicAddresses()
    home_a = net.add_nat("a", "full-cone", public.take(), lan_prefix="10.1.0")
    home_b = net.add_nat("b", "port-restricted-cone", public.take(), lan_prefix="10.2.0")
    victims = [net.add_public_host(f"192.0.2.{50 + i}") for i in range(4)]
    neighbour = net.add_host(home_b)  # a printer on the TV's LAN
    tv = add_device(net, home_b, ids[1], server, seed=2)
    listed = tuple((ip, 9) for ip in [*victims, neighbour, "10.1.0.10"])
    attacker = add_device(net, home_a, ids[0], server, seed=1, listen=False,
                          host_candidates=listed)
    tv.start()
    attacker.start()
    assert net.run_until(lambda: attacker.endpoint.registered and tv.endpoint.registered, 10.0)
    for _ in range(60):
        attacker.introduce(TV)
        net.run(1.0)
    assert REMOTE in tv.traversal.links, "the introductions reached the TV"
    attacker_ips = {home_a.public_ip, "10.1.0.10"}
    spent = tally.sent_by(attacker_ips)
    assert spent > 0
    tv_ips = {home_b.public_ip, "10.2.0.11"}
    for victim in [*victims, neighbour]:
        reflected = sum(n for (src, dst), n in tally.bytes.items()
                        if dst == victim and src in tv_ips)
        assert reflected <= 2 * spent, f"{reflected} B toward {victim} for {spent} B spent"
        assert reflected == 0
    assert tv.traversal.counters["host_candidates_skipped"] > 0
    assert tv.traversal.counters["punch_restarts_limited"] > 0, "re-introductions limited"


def tv_registered(route: RouteHook = deliver_as_is
                  ) -> tuple[MemoryNetwork, MemoryServer, MemoryNat, DeviceIdentity, MemoryPeer]:
    """Two port-restricted homes, the TV registered in ``b``: the network,
    the server, home ``a`` and the remote's identity, for remotes to be
    started there, and the TV."""
    ids = [identity_for(REMOTE, 1), identity_for(TV, 2)]
    net, server = make_scene(ids, route_packet=route)
    public = PublicAddresses()
    home_a = net.add_nat("a", "port-restricted-cone", public.take(), lan_prefix="10.1.0")
    home_b = net.add_nat("b", "port-restricted-cone", public.take(), lan_prefix="10.2.0")
    tv = add_device(net, home_b, ids[1], server, seed=2)
    tv.start()
    assert net.run_until(lambda: tv.endpoint.registered, 10.0)
    return net, server, home_a, ids[0], tv


@pytest.mark.parametrize("exit", ["graceful", "killed"])
def test_a_command_run_again_and_again_connects_at_once_every_time(exit: str) -> None:
    """A home-automation script runs ``dtx send`` six times in a row: each
    run is a new process (a new socket, so a new public port) with the same
    identity, which registers, is introduced and sends one stanza, then
    exits as the command does (closes the session, unregisters) or is
    killed. The TV's re-introduction limit (3 at once, then one per 10 s)
    must not leave it answering a dead process: every run gets its stanza
    through within the round trips it needs, not after QUIC's
    retransmission back-off."""
    net, server, home_a, remote_id, tv = tv_registered()
    took = []
    for run in range(6):
        started = net.clock.now
        remote = add_device(net, home_a, remote_id, server, seed=10 + run, listen=False)
        remote.start()
        assert net.run_until(lambda: remote.endpoint.registered, 10.0)
        remote.introduce(TV)
        assert net.run_until(lambda: TV in remote.traversal.links, 10.0)
        remote.connect(TV)
        assert net.run_until(lambda: TV in remote.sessions, 10.0), f"run {run}: connected"
        remote.send(TV, f"pause {run}")
        assert net.run_until(lambda: f"pause {run}" in tv.bodies(REMOTE), 10.0)
        took.append(round(net.clock.now - started, 2))
        if exit == "graceful":  # the session, then the device (UNREGISTER)
            remote.sessions[TV].close()
            assert net.run_until(
                lambda: any(isinstance(e, SessionEnded) for e in remote.events), 5.0)
            remote.endpoint.close(net.clock.now)
            remote.flush()
        net.unbind(remote.addr)
        net.remove_node(remote)
        net.run(0.5)
    assert tv.traversal.counters["punch_restarts_limited"] > 0, "the limit was reached"
    assert max(took) < 1.5, f"seconds from start to the stanza, each run: {took}"
    superseded = tv.endpoint.counters["connections_superseded"]
    assert superseded == (5 if exit == "killed" else 0), "a dead run's connection gave way"


# -- re-introduction ----------------------------------------------------------------


class Introductions:
    """A route hook that notes when each source sends an INTRODUCE to the server."""

    def __init__(self, server: Address) -> None:
        self.server = server
        self.sent: list[tuple[float, str]] = []
        self.blackholed: set[str] = set()
        """IPs whose packets vanish (a device switched off)."""

    def __call__(self, network: MemoryNetwork, packet: Packet) -> None:
        if packet.src[0] in self.blackholed or packet.dst[0] in self.blackholed:
            return
        if packet.dst == self.server and packet.data[:1] == bytes([CONTROL_FIRST_BYTE]):
            try:
                msg = decode_control(packet.data)
            except DecodeError:
                msg = None
            if msg is not None and msg.type is MessageType.INTRODUCE:
                self.sent.append((network.clock.now, packet.src[0]))
        network.deliver(packet)


def test_a_restarted_server_and_an_absent_peer_mean_bounded_re_introductions() -> None:
    """After the rendezvous restarts, the remote registers again and asks for
    a fresh introduction with the TV; the TV is gone (switched off), so the
    server answers 404 and the remote asks again after 1, 2, 4, 8, 15 and
    30 s — and then stops. (The old in-memory copy of this glue had no
    back-off at all.)"""
    route = Introductions(SERVER_ADDR)
    # (without resumption, whose attempt would ask once more)
    scene = introduce("full-cone", "full-cone", route=route,
                      config=EndpointConfig(resume_timeout=None))
    scene.net.run(SETTLE)
    remote_ip = scene.net.nats["a"].public_ip
    route.blackholed.add(scene.net.nats["b"].public_ip)
    route.sent.clear()
    scene.server.restart()
    scene.net.run(200.0)
    times = [t for t, src in route.sent if src == remote_ip]
    assert len(times) == 1 + len(TraversalConfig().reintroduce_backoff), times
    gaps = [round(b - a) for a, b in zip(times, times[1:])]
    assert gaps == [round(d) for d in TraversalConfig().reintroduce_backoff], gaps


def test_a_device_that_asks_for_its_peer_at_start_is_introduced_without_an_introduce() -> None:
    """A one-shot command asks for the TV as the device starts: the request
    rides in the REGISTER (TARGET), so the introduction arrives with the
    registration, one round trip to the rendezvous sooner, and the session
    opens on it."""
    route = Introductions(SERVER_ADDR)
    net, server, home_a, remote_id, tv = tv_registered(route)
    remote = add_device(net, home_a, remote_id, server, seed=1, listen=False)
    remote.start()
    remote.introduce(TV)
    assert not remote.endpoint.registered
    assert net.run_until(lambda: TV in remote.traversal.links, 10.0)
    assert remote.endpoint.registered
    assert route.sent == [], "no INTRODUCE went out"
    remote.connect(TV)
    assert net.run_until(lambda: TV in remote.sessions, 10.0)
    remote.send(TV, "pause")
    assert net.run_until(lambda: "pause" in tv.bodies(REMOTE), 10.0)
    assert server.core.statistics()["introductions_total"] == 1


def test_an_introduction_without_its_fields_is_a_decode_error_not_an_assert() -> None:
    msg = ControlMessage(MessageType.INTRODUCTION, b"t" * 8, peer_jid=TV, intro=b"i" * 8,
                         channel=7, role=Role.RESPONDER)
    with pytest.raises(DecodeError):
        introduction_from_control(msg, SERVER_ADDR)


def test_a_full_link_table_forgets_the_link_idle_longest() -> None:
    """``max_links`` 1 on the TV: a second remote's introduction is refused
    while the first one's session is open, and taken once it has ended
    (the idle link is forgotten to make room)."""
    second = identity_for("other@example.org/tablet", 5)
    config = EndpointConfig(traversal=TraversalConfig(max_links=1))
    scene = introduce("full-cone", "full-cone", config=config, trusted=[second])
    remote, tv, net = scene.remote, scene.tv, scene.net
    net.run(SETTLE)
    other = add_device(net, net.nats["a"], second, scene.server, seed=55, listen=False)
    other.start()
    assert net.run_until(lambda: other.endpoint.registered, 10.0)
    other.introduce(TV)
    net.run(2.0)
    assert "other@example.org/tablet" not in tv.traversal.links, "refused: a session uses it"
    remote.sessions[TV].close()
    remote.flush()
    net.run(6.0)  # (past the server's 5 s for answering a repeated INTRODUCE alike)
    assert not tv.sessions[REMOTE].is_open
    other.introduce(TV)
    assert net.run_until(lambda: "other@example.org/tablet" in tv.traversal.links, 10.0)
    assert REMOTE not in tv.traversal.links
    assert tv.traversal.counters["links_forgotten"] == 1
    conn = other.connect(TV)
    assert net.run_until(lambda: conn.is_open and TV in other.sessions, 5.0)
    other.send(TV, "hello")
    net.run(1.0)
    assert tv.bodies("other@example.org/tablet") == ["hello"]
