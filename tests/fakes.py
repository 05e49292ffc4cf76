"""In-memory stand-ins for the network, for fast, root-free, deterministic tests.

* :class:`FakeClock` — the one ``now`` every core here is driven with.
* :class:`MemoryNat` — a NAT box with RFC 4787 mapping and filtering
  behaviour, keyed the way tailscale's ``tstest/natlab/nat.go`` keys its
  tables (``NATType.key``): a binding is looked up by (inside source) for
  endpoint-independent mapping, (source, destination IP) for
  address-dependent and (source, destination IP, destination port) for
  address-and-port-dependent; its filter admits what the inside host sent
  to, compared the same three ways. The five NAT-lab profiles are
  available by name (:meth:`MemoryNat.named` reads ``dtx.lab.nat.PROFILES``,
  so both labs mean the same thing by a name).
* :class:`MemoryNetwork` — addresses in realms (the public internet, and
  the inside of each NAT, which may itself sit inside another NAT), a
  heap of packets delivered in timestamp order, nodes with timers, and a
  ``route_packet`` hook that may drop, duplicate or delay each packet
  (trio's ``test_dtls.py`` does the same with its fake network). Runs are
  bounded in steps and in simulated time.
* :class:`MemoryServer` and :class:`MemoryPeer` — the production sans-IO
  cores on the network: the rendezvous' ``RendezvousCore`` and a device's
  ``Endpoint`` (real aioquic in memory, as aioquic's own tests pair
  connections), each driven the way its asyncio driver drives it — a
  datagram in, the timer, send what it returns — and nothing more, so a
  test here proves the code that ships.

Nothing here opens a socket or reads a clock: time is :class:`FakeClock`,
randomness is a seeded ``random.Random`` (aioquic draws its connection IDs
and TLS randoms from the OS, which changes bytes, never timing or sizes).
"""

from __future__ import annotations

import heapq
import logging
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol
from xml.etree.ElementTree import Element

from dtx import stanza
from dtx.identity import DeviceIdentity
from dtx.lab.nat import PROFILES, Filtering, Mapping, NatProfile
from dtx.proto.endpoint import (
    Connection,
    Endpoint,
    EndpointConfig,
    EndpointEvent,
    HandshakeConfirmed,
    SessionResumed,
)
from dtx.proto.endpoint import StanzaReceived as EpStanzaReceived
from dtx.proto.paths import PathChanged, PathKind
from dtx.proto.traversal import Traversal
from dtx.trust import PinStore, StaticKeys, Verifier
from rendezvous.core import RendezvousConfig, RendezvousCore
from rendezvous.stun import ServerAddresses
from dtx.wire.address import Address

logger = logging.getLogger(__name__)


LAN_DELAY = 0.0005
"""One-way delay of a packet that never crosses the internet."""
WAN_DELAY = 0.020
"""A home's one-way delay to the internet core (the lab's standard WAN)."""
SERVER_DELAY = 0.040
"""The rendezvous server's one-way delay beyond the core."""
RANDOM_PORT_BASE = 40000
RANDOM_PORT_COUNT = 20000
"""Public ports that are not preserved come from this range (as in the lab)."""



class FakeClock:
    """Simulated time in seconds; only ever moves forward."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def advance_to(self, when: float) -> None:
        self.now = max(self.now, when)


# -- NAT ------------------------------------------------------------------------


@dataclass
class Binding:
    """One NAT mapping: an inside endpoint's public port, and whom it sent to."""

    inside: Address
    public_port: int
    last_out: float
    contacted: set[Address] = field(default_factory=set)


class MemoryNat:
    """A NAT box between an inside realm and the realm outside it.

    ``outbound`` translates a packet leaving the inside (creating or
    refreshing a binding); ``inbound`` finds the inside endpoint for a
    packet arriving at the public address, or None when the filter drops
    it. Bindings expire ``udp_timeout`` seconds after the last outgoing
    packet, as the lab's learned maps do.
    """

    def __init__(self, name: str, profile: NatProfile, public_ip: str, lan_prefix: str,
                 rng: random.Random, *, outside: MemoryNat | None = None,
                 wan_delay: float = WAN_DELAY) -> None:
        self.name = name
        self.profile = profile
        self.public_ip = public_ip
        self.lan_prefix = lan_prefix
        self.outside = outside
        self.wan_delay = wan_delay
        self._rng = rng
        self._bindings: dict[tuple[object, ...], Binding] = {}
        self._by_port: dict[int, Binding] = {}
        self._hosts = 0
        self._forwards: dict[int, Address] = {}
        """Port mappings (PCP, NAT-PMP, UPnP): public port -> inside endpoint."""
        self._forwarded_from: dict[Address, tuple[int, set[Address]]] = {}
        """Inside endpoint -> its mapped port and who came in through it."""
        self.counters: dict[str, int] = {"filtered": 0, "no_binding": 0, "expired": 0,
                                         "forwarded": 0}

    @staticmethod
    def named(name: str) -> NatProfile:
        """The NAT-lab profile called ``name`` (``none``, ``full-cone``,
        ``restricted-cone``, ``port-restricted-cone``, ``symmetric``)."""
        return PROFILES[name]

    @property
    def translates(self) -> bool:
        return self.profile.translate

    def next_host_ip(self) -> str:
        self._hosts += 1
        return f"{self.lan_prefix}.{9 + self._hosts}"

    def key(self, src: Address, dst: Address) -> tuple[object, ...]:
        """The binding key of a flow, by mapping behaviour (natlab's ``NATType.key``)."""
        mapping = self.profile.mapping
        if mapping is Mapping.ENDPOINT_INDEPENDENT:
            return (src,)
        if mapping is Mapping.ADDRESS_DEPENDENT:
            return (src, dst[0])
        return (src, dst[0], dst[1])

    def bindings(self) -> list[Binding]:
        return list(self._by_port.values())

    def add_port_mapping(self, inside: Address) -> Address:
        """Forward a public port to ``inside`` from anywhere until
        :meth:`remove_port_mapping`, as a router does on a PCP, NAT-PMP or
        UPnP request; its public address. As with conntrack behind a
        port forward, what ``inside`` sends back to a source that came in
        through it leaves from that port; anything else is translated as
        the profile says."""
        port = self._allocate(inside[1])
        self._forwards[port] = inside
        self._forwarded_from[inside] = (port, set())
        return (self.public_ip, port)

    def remove_port_mapping(self, inside: Address) -> None:
        port, _ = self._forwarded_from.pop(inside)
        del self._forwards[port]

    def outbound(self, src: Address, dst: Address, now: float) -> Address:
        """The public source address of a packet from ``src`` to ``dst``."""
        forward = self._forwarded_from.get(src)
        if forward is not None and dst in forward[1]:
            return (self.public_ip, forward[0])  # a reply through the port forward
        key = self.key(src, dst)
        binding = self._bindings.get(key)
        if binding is not None and now - binding.last_out > self.profile.udp_timeout:
            self._forget(key, binding)
            binding = None
        if binding is None:
            binding = Binding(src, self._allocate(src[1]), now)
            self._bindings[key] = binding
            self._by_port[binding.public_port] = binding
        binding.last_out = now
        binding.contacted.add(dst)
        return (self.public_ip, binding.public_port)

    def inbound(self, src: Address, public_port: int, now: float) -> Address | None:
        """The inside destination of a packet from ``src`` to the public
        ``public_port``, or None when no binding admits it."""
        inside = self._forwards.get(public_port)
        if inside is not None:
            self.counters["forwarded"] += 1
            self._forwarded_from[inside][1].add(src)
            return inside
        binding = self._by_port.get(public_port)
        if binding is not None and now - binding.last_out > self.profile.udp_timeout:
            self._forget(next(k for k, b in self._bindings.items() if b is binding), binding)
            binding = None
        if binding is None:
            self.counters["no_binding"] += 1
            return None
        filtering = self.profile.filtering
        if filtering is Filtering.ENDPOINT_INDEPENDENT:
            admitted = True
        elif filtering is Filtering.ADDRESS_DEPENDENT:
            admitted = any(ip == src[0] for ip, _ in binding.contacted)
        else:
            admitted = src in binding.contacted
        if not admitted:
            self.counters["filtered"] += 1
            return None
        return binding.inside

    def flush(self) -> None:
        """Forget every binding and port forward (a NAT reboot)."""
        self._bindings.clear()
        self._by_port.clear()
        self._forwards.clear()
        self._forwarded_from.clear()

    def _forget(self, key: tuple[object, ...], binding: Binding) -> None:
        self.counters["expired"] += 1
        del self._bindings[key]
        self._by_port.pop(binding.public_port, None)

    def _allocate(self, wanted: int) -> int:
        if (self.profile.port_preservation and self.profile.mapping is Mapping.ENDPOINT_INDEPENDENT
                and wanted not in self._by_port and wanted not in self._forwards):
            return wanted
        for _ in range(RANDOM_PORT_COUNT):
            port = RANDOM_PORT_BASE + self._rng.randrange(RANDOM_PORT_COUNT)
            if port not in self._by_port and port not in self._forwards:
                return port
        raise RuntimeError(f"NAT {self.name}: no free public port")


# -- network --------------------------------------------------------------------


@dataclass(frozen=True)
class Packet:
    """A datagram on the wire, addresses as the receiving realm sees them."""

    src: Address
    dst: Address
    data: bytes
    sent_at: float
    latency: float
    """The path's one-way delay; the route hook may add to it."""


Receiver = Callable[[bytes, Address, Address], None]
"""Called with (data, source, local address) for each delivered datagram."""


class Node(Protocol):
    def get_timer(self) -> float | None: ...

    def handle_timer(self, now: float) -> None: ...


RouteHook = Callable[["MemoryNetwork", Packet], None]


def deliver_as_is(network: MemoryNetwork, packet: Packet) -> None:
    """The default ``route_packet``: every packet once, after its latency."""
    network.deliver(packet)


class LossyRoute:
    """A ``route_packet`` hook: drops, duplicates and delays packets by a
    seeded ``random.Random``. ``only`` restricts the damage to packets for
    which it returns True (the others are delivered as they are)."""

    def __init__(self, rng: random.Random, *, loss: float = 0.0, duplicate: float = 0.0,
                 jitter: float = 0.0, only: Callable[[Packet], bool] | None = None) -> None:
        self.rng = rng
        self.loss = loss
        self.duplicate = duplicate
        self.jitter = jitter
        self.only = only
        self.dropped = 0
        self.duplicated = 0

    def __call__(self, network: MemoryNetwork, packet: Packet) -> None:
        if self.only is not None and not self.only(packet):
            network.deliver(packet)
            return
        if self.rng.random() < self.loss:
            self.dropped += 1
            return
        copies = 2 if self.rng.random() < self.duplicate else 1
        self.duplicated += copies - 1
        for _ in range(copies):
            network.deliver(packet, extra_delay=self.rng.uniform(0.0, self.jitter))


class NotSettled(RuntimeError):
    """A bounded run used up its steps (a node whose timer never moves on)."""


class MemoryNetwork:
    """Hosts, NATs and a public internet, in memory.

    Realms: ``None`` is the internet; each translating :class:`MemoryNat` is
    the realm of the addresses inside it. A packet climbs out of its
    sender's realms (through each NAT's :meth:`MemoryNat.outbound`, at send
    time) until its destination is visible, goes through ``route_packet``,
    and on arrival descends through the NATs owning its destination
    (:meth:`MemoryNat.inbound`, at arrival time, so filters see the state
    of that moment). A packet to a NAT's own public address from inside
    it is hairpinned when the profile allows; unlike the lab's hairpin
    rule, a hairpinned packet still passes the receiving binding's filter.
    Private addresses of another realm are unroutable, as on the internet.
    """

    def __init__(self, clock: FakeClock, *, seed: int = 0,
                 route_packet: RouteHook = deliver_as_is) -> None:
        self.clock = clock
        self.rng = random.Random(seed)
        self.route_packet = route_packet
        self.nats: dict[str, MemoryNat] = {}
        self._realm: dict[str, MemoryNat | None] = {}
        """ip -> the realm an address lives in."""
        self._owner: dict[str, MemoryNat] = {}
        """public ip -> the NAT it belongs to."""
        self._wan_delay: dict[str, float] = {}
        """internet ip -> one-way delay to the core."""
        self._sockets: dict[Address, Receiver] = {}
        self._nodes: list[Node] = []
        self._heap: list[tuple[float, int, Packet]] = []
        self._seq = 0
        self.delivered = 0
        self.counters: dict[str, int] = {"unroutable": 0, "no_socket": 0, "filtered": 0,
                                         "no_hairpin": 0}

    # -- topology ------------------------------------------------------------------

    def add_public_host(self, ip: str, *, delay: float = SERVER_DELAY) -> str:
        """An address on the internet ``delay`` seconds (one way) from the core."""
        self._claim(ip, None)
        self._wan_delay[ip] = delay
        return ip

    def add_nat(self, name: str, profile: str | NatProfile, public_ip: str, *,
                lan_prefix: str, outside: MemoryNat | None = None,
                wan_delay: float = WAN_DELAY) -> MemoryNat:
        """A NAT box whose outside address ``public_ip`` lives in ``outside``
        (None: the internet) and whose inside hosts are ``lan_prefix.N``.
        A ``none`` profile puts no box on the path: its hosts get addresses
        of the outside realm (see :meth:`add_host`)."""
        prof = profile if isinstance(profile, NatProfile) else MemoryNat.named(profile)
        nat = MemoryNat(name, prof, public_ip, lan_prefix,
                        random.Random(self.rng.getrandbits(64)), outside=outside,
                        wan_delay=wan_delay)
        self.nats[name] = nat
        if prof.translate:
            self._claim(public_ip, outside)
            self._owner[public_ip] = nat
            if outside is None:
                self._wan_delay[public_ip] = wan_delay
        return nat

    def add_host(self, nat: MemoryNat) -> str:
        """A new host address behind ``nat``. Behind a ``none`` box the host
        uses the box's public address itself (one host per such box)."""
        if not nat.translates:
            ip = nat.public_ip
            self._claim(ip, nat.outside)
            if nat.outside is None:
                self._wan_delay[ip] = nat.wan_delay
            return ip
        ip = nat.next_host_ip()
        self._claim(ip, nat)
        return ip

    def renumber(self, nat: MemoryNat, public_ip: str) -> None:
        """Give a translating NAT a new public address and forget its
        bindings (an ISP handing out a new address after a reboot)."""
        if not nat.translates:
            raise ValueError("only a translating NAT can be renumbered")
        old = nat.public_ip
        self._claim(public_ip, nat.outside)
        del self._realm[old]
        del self._owner[old]
        self._owner[public_ip] = nat
        delay = self._wan_delay.pop(old, None)
        if delay is not None:
            self._wan_delay[public_ip] = delay
        nat.public_ip = public_ip
        nat.flush()

    def bind(self, addr: Address, receiver: Receiver) -> None:
        if addr[0] not in self._realm:
            raise ValueError(f"no host has the address {addr[0]}")
        if addr in self._sockets:
            raise ValueError(f"{addr} is already bound")
        self._sockets[addr] = receiver

    def unbind(self, addr: Address) -> None:
        """Close the socket bound to ``addr``."""
        del self._sockets[addr]

    def add_node(self, node: Node) -> None:
        self._nodes.append(node)

    def remove_node(self, node: Node) -> None:
        """``node`` is gone (its process ended): no more timers."""
        self._nodes.remove(node)

    def _claim(self, ip: str, realm: MemoryNat | None) -> None:
        if ip in self._realm:
            raise ValueError(f"address {ip} is already in use")
        self._realm[ip] = realm

    # -- packets -------------------------------------------------------------------

    def send(self, src: Address, dst: Address, data: bytes) -> None:
        """Send from the bound socket ``src``: translate on the way out,
        then hand the packet to ``route_packet``."""
        now = self.clock.now
        if src[0] not in self._realm:
            raise ValueError(f"no host has the address {src[0]}")
        realm = self._realm[src[0]]
        wire_src = src
        for _ in range(16):  # nesting depth bound
            if self._realm.get(dst[0], _NOWHERE) is realm:
                break
            if realm is None:
                self.counters["unroutable"] += 1
                logger.debug("unroutable %s -> %s", src, dst)
                return
            if dst[0] == realm.public_ip and not realm.profile.hairpin:
                self.counters["no_hairpin"] += 1
                return
            wire_src = realm.outbound(wire_src, dst, now)
            realm = realm.outside
        if realm is None:
            latency = (LAN_DELAY + self._wan_delay.get(wire_src[0], 0.0)
                       + self._wan_delay.get(dst[0], 0.0))
        else:
            latency = LAN_DELAY
        self.route_packet(self, Packet(wire_src, dst, bytes(data), now, latency))

    def deliver(self, packet: Packet, *, extra_delay: float = 0.0) -> None:
        """Queue ``packet`` for arrival after its latency (plus ``extra_delay``)."""
        self._seq += 1
        when = packet.sent_at + packet.latency + max(0.0, extra_delay)
        heapq.heappush(self._heap, (when, self._seq, packet))

    def _arrive(self, packet: Packet, now: float) -> None:
        dst = packet.dst
        for _ in range(16):
            nat = self._owner.get(dst[0])
            if nat is None:
                break
            inside = nat.inbound(packet.src, dst[1], now)
            if inside is None:
                self.counters["filtered"] += 1
                logger.debug("%s filtered %s -> %s", nat.name, packet.src, dst)
                return
            dst = inside
        receiver = self._sockets.get(dst)
        if receiver is None:
            self.counters["no_socket"] += 1
            return
        self.delivered += 1
        receiver(packet.data, packet.src, dst)

    # -- running -------------------------------------------------------------------

    def in_flight(self) -> int:
        return len(self._heap)

    def step(self, until: float) -> bool:
        """Handle the earliest packet arrival or timer due by ``until``
        (packets first on a tie). False when nothing is due."""
        t_packet = self._heap[0][0] if self._heap else None
        t_timer: float | None = None
        due_node: Node | None = None
        for node in self._nodes:
            t = node.get_timer()
            if t is not None and (t_timer is None or t < t_timer):
                t_timer, due_node = t, node
        if t_packet is not None and t_packet <= until and (t_timer is None or t_packet <= t_timer):
            _, _, packet = heapq.heappop(self._heap)
            self.clock.advance_to(t_packet)
            self._arrive(packet, self.clock.now)
            return True
        if t_timer is not None and due_node is not None and t_timer <= until:
            self.clock.advance_to(t_timer)
            due_node.handle_timer(self.clock.now)
            return True
        return False

    def run(self, duration: float, *, max_steps: int = 200_000) -> None:
        """Run ``duration`` seconds of simulated time (bounded in steps)."""
        self.run_until(lambda: False, duration, max_steps=max_steps)

    def run_until(self, condition: Callable[[], bool], timeout: float, *,
                  max_steps: int = 200_000) -> bool:
        """Run until ``condition()`` holds (checked after every step) or
        ``timeout`` simulated seconds passed; returns the condition."""
        until = self.clock.now + timeout
        for _ in range(max_steps):
            if condition():
                return True
            if not self.step(until):
                self.clock.advance_to(until)
                return condition()
        raise NotSettled(f"more than {max_steps} steps before t={until:.3f}")


class _Nowhere:
    pass


_NOWHERE = _Nowhere()


# -- the rendezvous server --------------------------------------------------------


class MemoryServer:
    """A :class:`RendezvousCore` on the network at ``addr``."""

    def __init__(self, network: MemoryNetwork, addr: Address, keys: StaticKeys, *,
                 seed: int = 0, config: RendezvousConfig | None = None,
                 mapping_port: bool = False) -> None:
        self.network = network
        self.addr = addr
        self.keys = keys
        self._seed = seed
        self._config = config or RendezvousConfig()
        self.addresses = ServerAddresses(addr, mapping_port=addr[1] + 1 if mapping_port else None)
        self.core = self._new_core()
        for local in self.addresses.sockets():
            network.bind(local, self._receive)
        network.add_node(self)

    def _new_core(self) -> RendezvousCore:
        return RendezvousCore(keys=self.keys, addresses=self.addresses,
                              config=self._config,
                              secret=random.Random(self._seed).randbytes(32),
                              rng=random.Random(self._seed))

    def restart(self) -> None:
        """The server process restarts: every registration is forgotten."""
        self._seed += 1
        self.core = self._new_core()

    def _receive(self, data: bytes, src: Address, local: Address) -> None:
        self.core.receive_datagram(data, src, local, self.network.clock.now)
        self._flush()

    def get_timer(self) -> float | None:
        return self.core.get_timer()

    def handle_timer(self, now: float) -> None:
        self.core.handle_timer(now)
        self._flush()

    def _flush(self) -> None:
        for data, to, frm in self.core.datagrams_to_send():
            self.network.send(frm, to, data)


# -- a device -----------------------------------------------------------------------


class MemoryPeer:
    """The production :class:`~dtx.proto.endpoint.Endpoint` of one device on
    the memory network, driven as ``dtx/aio/peer.py`` drives it: each
    datagram in goes to ``receive_datagram``, the timer to ``handle_timer``,
    and after either, everything ``datagrams_to_send`` returns goes out.
    Nothing else: every decision is the endpoint's. The events are kept
    (``events``) and stanzas filed by peer (``received``) for the tests."""

    def __init__(self, network: MemoryNetwork, identity: DeviceIdentity, addr: Address,
                 server: Address | None, keys: StaticKeys, *, seed: int,
                 config: EndpointConfig | None = None, listen: bool = True,
                 host_candidates: tuple[Address, ...] | None = None) -> None:
        self.network = network
        self.identity = identity
        self.jid = str(identity.jid)
        self.addr = addr
        verify = Verifier([keys], PinStore(None)).verify  # exactly the keys listed
        self.endpoint = Endpoint(identity, verify, rng=random.Random(seed),
                                 config=config, listen=listen, rendezvous=server,
                                 host_candidates=host_candidates or (addr,))
        self.events: list[EndpointEvent] = []
        self.received: dict[str, list[Element]] = {}
        self.sessions: dict[str, Connection] = {}
        """Open connections by peer JID (initiated or accepted)."""
        self.side: dict[int, Address] = {}
        """The endpoint's extra sockets (birthday searches): id -> bound address."""
        self.side_opened = 0
        self._side_port = addr[1] + 1
        network.bind(addr, self._receive)
        network.add_node(self)

    @property
    def now(self) -> float:
        return self.network.clock.now

    @property
    def traversal(self) -> Traversal:
        return self.endpoint.traversal

    # -- the driver -------------------------------------------------------------------

    def start(self) -> None:
        self.endpoint.start(self.now)
        self.flush()

    def _receive(self, data: bytes, src: Address, local: Address) -> None:
        self.endpoint.receive_datagram(data, src, self.now)
        self.flush()

    def _receive_side(self, sid: int, data: bytes, src: Address, local: Address) -> None:
        self.endpoint.receive_side_datagram(sid, data, src, self.now)
        self.flush()

    def get_timer(self) -> float | None:
        return self.endpoint.get_timer()

    def handle_timer(self, now: float) -> None:
        self.endpoint.handle_timer(now)
        self.flush()

    def flush(self) -> None:
        endpoint = self.endpoint
        for data, dest in endpoint.datagrams_to_send(self.now):
            self.network.send(self.addr, dest, data)
        if self.side or endpoint.side_busy:
            wanted = endpoint.side_sockets()
            for sid in [s for s in self.side if s not in wanted]:
                self.network.unbind(self.side.pop(sid))
            for sid in sorted(wanted - self.side.keys()):
                local = (self.addr[0], self._side_port)
                self._side_port += 1
                self.network.bind(local, partial(self._receive_side, sid))
                self.side[sid] = local
                self.side_opened += 1
            for sid, data, dest in endpoint.side_datagrams_to_send():
                self.network.send(self.side[sid], dest, data)
        while (ev := self.endpoint.next_event()) is not None:
            self.events.append(ev)
            if isinstance(ev, EpStanzaReceived):
                peer = ev.connection.peer_jid or "?"
                self.received.setdefault(peer, []).append(ev.stanza)
                ev.connection.consumed(ev.size)
            elif isinstance(ev, HandshakeConfirmed | SessionResumed) \
                    and ev.connection.peer_jid is not None:
                # (a stream that resumes a session hands over to the session's
                # connection: SessionResumed names it)
                self.sessions[ev.connection.peer_jid] = ev.connection

    # -- what a test asks -------------------------------------------------------------

    def introduce(self, target: str) -> None:
        self.endpoint.introduce(target, self.now)
        self.flush()

    def connect(self, target: str) -> Connection:
        conn = self.endpoint.connect(target, self.now)
        self.flush()
        return conn

    def send(self, peer_jid: str, body: str) -> None:
        self.sessions[peer_jid].send(stanza.message(body, to=peer_jid))
        self.flush()

    def bodies(self, peer_jid: str) -> list[str]:
        return [stanza.body_of(el) or "" for el in self.received.get(peer_jid, [])]

    def path(self, peer_jid: str) -> PathKind | None:
        link = self.endpoint.traversal.links.get(peer_jid)
        return None if link is None else link.paths.kind

    def changes(self, peer_jid: str) -> Sequence[PathChanged]:
        return self.traversal.links[peer_jid].changes

    @property
    def registered_as(self) -> Address | None:
        client = self.traversal.client
        return None if client is None else client.reflexive


# -- a whole scene ----------------------------------------------------------------------

SERVER_ADDR: Address = ("203.0.113.10", 3478)
DEVICE_PORT = 5000


def identity_for(jid: str, seed: int) -> DeviceIdentity:
    """A fixed identity (deterministic key) for ``jid``."""
    return DeviceIdentity.from_private_bytes(jid, random.Random(seed).randbytes(32))


class PublicAddresses:
    """Hands out internet addresses from 198.51.100.0/24 in order."""

    def __init__(self) -> None:
        self._next = 1

    def take(self) -> str:
        if self._next > 254:
            raise RuntimeError("out of documentation addresses")
        ip = f"198.51.100.{self._next}"
        self._next += 1
        return ip


def make_scene(identities: Iterable[DeviceIdentity], *, seed: int = 0,
               route_packet: RouteHook = deliver_as_is,
               mapping_port: bool = False) -> tuple[MemoryNetwork, MemoryServer]:
    """A network with a rendezvous server that knows ``identities``' keys
    (and, with ``mapping_port``, checks NAT mappings on port + 1)."""
    clock = FakeClock()
    net = MemoryNetwork(clock, seed=seed, route_packet=route_packet)
    net.add_public_host(SERVER_ADDR[0], delay=SERVER_DELAY)
    by_account: dict[str, list[bytes]] = {}
    for i in identities:  # (an account may have several devices)
        by_account.setdefault(str(i.jid.bare), []).append(i.public_key)
    keys = StaticKeys(by_account)
    server = MemoryServer(net, SERVER_ADDR, keys, seed=seed, mapping_port=mapping_port)
    return net, server


def add_device(net: MemoryNetwork, nat: MemoryNat, identity: DeviceIdentity,
               server: MemoryServer, *, seed: int,
               config: EndpointConfig | None = None, listen: bool = True,
               host_candidates: tuple[Address, ...] | None = None) -> MemoryPeer:
    """A device on a new host behind ``nat``, bound to :data:`DEVICE_PORT`,
    trusting the keys the server knows; it registers ``host_candidates``
    (by default its own address)."""
    ip = net.add_host(nat)
    return MemoryPeer(net, identity, (ip, DEVICE_PORT), server.addr, server.keys, seed=seed,
                      config=config, listen=listen, host_candidates=host_candidates)


__all__ = [
    "SERVER_ADDR",
    "Binding",
    "FakeClock",
    "LossyRoute",
    "MemoryPeer",
    "MemoryNat",
    "MemoryNetwork",
    "MemoryServer",
    "NotSettled",
    "Packet",
    "PublicAddresses",
    "RouteHook",
    "add_device",
    "deliver_as_is",
    "identity_for",
    "make_scene",
]
