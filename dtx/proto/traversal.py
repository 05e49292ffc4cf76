"""NAT traversal of one device, sans-IO: introductions, probes, relay.

Owns the device's registration with its rendezvous
(:class:`~dtx.proto.rdvclient.RendezvousClient`) and one
:class:`~dtx.proto.paths.PathManager` per introduced device (a
:class:`Link`). QUIC never sees real addresses for those devices: each gets
a *mapped address* (``fd64::N``, port ``N``), and this core translates both
ways:

* :meth:`Traversal.route` says where an outgoing QUIC datagram to a mapped
  address really goes: straight to the peer, or wrapped in a relay frame to
  the rendezvous server (several places while spraying);
* :meth:`Traversal.map_incoming` names the mapped address of a QUIC
  datagram from a known direct path, and :meth:`Traversal.receive_dtx`
  unwraps relay frames on a known channel.

Between an endpoint-dependent NAT and an endpoint-independent one (the
introduction says which is which) a link also runs a birthday search
(:mod:`dtx.proto.birthday`): the hard side's extra sockets are numbered
from 1 (0 is the device's one socket); :meth:`Traversal.side_sockets`
names those to hold open, :meth:`Traversal.side_datagrams_to_send` what
leaves from them, :meth:`Traversal.receive_side` what arrives on them. A
search's winning socket then carries that peer's direct path.

**Introductions are a seam.** Whoever tells this device "here is the peer,
its key, its candidates, how to relay to it; probe now" hands an
:class:`Introduction` to :meth:`Traversal.introduced`. Today the rendezvous
client is the source (:func:`introduction_from_control`); others (the
account's XMPP server, the LAN) build the same value.

In: :meth:`receive_dtx`, :meth:`map_incoming`, :meth:`handle_timer`, the
user calls :meth:`introduce` and :meth:`introduced`. Out:
:meth:`datagrams_to_send` (control messages and probes), :meth:`route`,
:meth:`get_timer`, :meth:`next_event`. Time and randomness are arguments;
no clock, socket or asyncio here.
"""

from __future__ import annotations

import ipaddress
import logging
import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import DecodeError, DtxError
from ..jid import JID, jid_matches
from ..logs import LogLimiter
from ..wire.control import (
    CandidateKind,
    ControlMessage,
    NatMapping,
    Probe,
    ProbeKind,
    Role,
    decode_control,
    decode_probe,
    encode_probe,
)
from ..wire.demux import CONTROL_FIRST_BYTE, PROBE_FIRST_BYTE, RELAY_FIRST_BYTE, PacketKind, classify
from ..wire.relay import decode_relay, encode_relay
from .birthday import BirthdayConfig, BirthdayRole, BirthdaySearch, SearchState
from .paths import HISTORY, PathChanged, PathConfig, PathKind, PathManager, RelayWrap
from .rdvclient import (
    IntroductionFailed,
    IntroductionReceived,
    ReflexiveChanged,
    Registered,
    RegistrationLost,
    RegistrationRefused,
    RendezvousClient,
    RendezvousClientConfig,
)
from ..wire.address import Address

logger = logging.getLogger(__name__)



@dataclass(frozen=True, kw_only=True)
class TraversalConfig:
    """Tunables of NAT traversal. Times in seconds."""

    paths: PathConfig = PathConfig()
    client: RendezvousClientConfig = RendezvousClientConfig()
    birthday: BirthdayConfig = BirthdayConfig()
    reintroduce_backoff: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0)
    """After a failed re-introduction (the peer may not have registered
    again yet), ask again after these pauses, then give up."""
    max_old_intros: int = 3
    """Earlier introductions of a link whose probe keys and relay channel
    are still accepted (both sides may briefly disagree on the current one)."""
    max_links: int = 1024
    """Introduced devices held at once. Past it, the link idle longest (no
    session uses it: :meth:`Traversal.idle`) is forgotten to make room; with
    none idle, the introduction is refused."""
    punch_restarts_burst: int = 3
    punch_restart_interval: float = 10.0
    """Introductions that restart punching to one peer: ``punch_restarts_burst``
    at once, then one per ``punch_restart_interval``. A device that
    re-introduces itself over and over gets its relay channel updated and
    its server-reflexive and port-mapped addresses probed (both are the
    rendezvous's own observation of the peer, never the peer's say), but
    no probes to its host candidates and no birthday search: its candidates
    cannot turn this device into a reflector."""


# -- the seam: an introduction ------------------------------------------------


@dataclass(frozen=True)
class Introduction:
    """A peer to reach, from any source of introductions.

    ``candidates`` are (address, kind) pairs to probe; ``relay`` wraps a
    QUIC packet for the relay and names where it goes (None: no relay);
    ``channel`` identifies relay frames from the peer (dtx rendezvous relay
    channels); ``intro`` and ``probe_key`` tag and sign the probes both
    sides send each other.
    """

    peer_jid: str
    peer_key: bytes
    intro: bytes
    probe_key: bytes
    initiator: bool
    candidates: tuple[tuple[Address, PathKind], ...]
    relay: RelayWrap | None
    channel: int | None
    source: str = "rendezvous"
    relay_peer: Address | None = None
    """The peer's address on the relay path, when it is not the dtx
    rendezvous: through this device's TURN allocation, where the TURN
    server sees the peer; or, when the peer relays through its own, the
    peer's relayed address. Datagrams from there reach this link."""
    reflexive: Address | None = None
    """The peer's server-reflexive address (also among ``candidates``):
    where a birthday search aims."""
    nat_mapping: NatMapping = NatMapping.UNKNOWN
    peer_nat_mapping: NatMapping = NatMapping.UNKNOWN
    """The NAT mapping behaviour of this device and of the peer, as the
    source of the introduction observed them."""


def introduction_from_control(msg: ControlMessage, server: Address) -> Introduction:
    """The :class:`Introduction` a rendezvous INTRODUCTION message carries;
    :class:`DecodeError` when a field is missing or malformed."""
    if (msg.peer_jid is None or msg.peer_key is None or msg.intro is None
            or msg.probe_key is None or msg.channel is None):
        raise DecodeError("INTRODUCTION without peer, key, intro, probe key or channel")
    if msg.role is None:
        raise DecodeError("INTRODUCTION without a role")
    try:
        peer = JID.parse(msg.peer_jid).full
    except DtxError as exc:
        raise DecodeError(f"INTRODUCTION with a bad JID: {exc}") from None
    channel = msg.channel

    def wrap(payload: bytes) -> tuple[bytes, Address]:
        return encode_relay(channel, payload), server

    candidates = tuple(
        (c.addr, PathKind.LAN if c.kind == CandidateKind.HOST else PathKind.DIRECT)
        for c in msg.candidates
    )
    reflexive = next((c.addr for c in msg.candidates
                      if c.kind == CandidateKind.SERVER_REFLEXIVE), None)
    mine, theirs = msg.nat_mapping or (NatMapping.UNKNOWN, NatMapping.UNKNOWN)
    return Introduction(peer, msg.peer_key, msg.intro, msg.probe_key,
                        msg.role is Role.INITIATOR, candidates, wrap, channel,
                        reflexive=reflexive, nat_mapping=mine, peer_nat_mapping=theirs)


# -- events (the rendezvous client's Registered, RegistrationRefused,
# RegistrationLost and IntroductionFailed pass through as they are) ----------


@dataclass(frozen=True)
class IntroductionCompleted:
    """This device and ``link.peer_jid`` were introduced (the relay path,
    if any, is usable at once)."""

    link: Link


@dataclass(frozen=True)
class LinkPathChanged:
    link: Link
    change: PathChanged


TraversalEvent = (
    Registered | RegistrationRefused | RegistrationLost | IntroductionCompleted
    | IntroductionFailed | LinkPathChanged
)


@dataclass
class Link:
    """What this device knows about one introduced remote device."""

    peer_jid: str
    peer_key: bytes
    mapped: Address
    paths: PathManager
    intro: bytes
    probe_key: bytes
    channel: int | None
    initiator: bool
    created_at: float
    relay_peer: Address | None = None
    old_intros: dict[bytes, tuple[bytes, int | None]] = field(default_factory=dict)
    """(probe key, relay channel) of earlier introductions, still accepted
    for a while: after a re-introduction both sides may briefly disagree on
    which one is current."""
    reintroduce_at: float | None = None
    reintroduce_attempts: int = 0
    punch_tokens: float = 0.0
    punch_tokens_at: float = 0.0
    changes: deque[PathChanged] = field(default_factory=lambda: deque(maxlen=HISTORY))
    """The latest path changes (bounded: a session may live for months)."""
    birthday: BirthdaySearch | None = None
    """The latest birthday search toward this peer, if one was started."""
    idle_since: float | None = None
    """Since when no session uses this link (None: one does)."""
    side: tuple[Address, int] | None = None
    """(peer address, extra socket) of the direct path a birthday search
    found: datagrams to that address leave from that socket."""
    introduced_at: float = 0.0
    """When its latest introduction arrived (a registration the rendezvous
    checked, or a Jingle exchange the XMPP server carried)."""


class Traversal:
    """The rendezvous side of one device's socket, sans-IO."""

    def __init__(
        self,
        *,
        jid: str,
        key: bytes,
        sign: Callable[[bytes], bytes],
        server: Address | None,
        host_candidates: Sequence[Address],
        accept_introductions: bool,
        rng: random.Random,
        config: TraversalConfig | None = None,
    ) -> None:
        self.config = config or TraversalConfig()
        self._rng = rng
        self.server = server
        self._accepting = accept_introductions
        self.host_candidates = tuple(host_candidates)
        self.client: RendezvousClient | None = None
        """The registration with the rendezvous; None without one (then
        introductions come only through :meth:`introduced`)."""
        if server is not None:
            self.client = RendezvousClient(
                jid=jid,
                key=key,
                sign=sign,
                server=server,
                rng=rng,
                config=self.config.client,
                host_candidates=self.host_candidates,
            )
        self.reflexive: Address | None = None
        """This device's server-reflexive address when it has no rendezvous
        to tell it (XMPP signalling learns it from its TURN allocation);
        with a rendezvous, the registration's answer counts."""
        self.links: dict[str, Link] = {}
        self._by_mapped: dict[Address, Link] = {}
        self._by_channel: dict[int, Link] = {}
        self._by_intro: dict[bytes, Link] = {}
        self._by_addr: dict[Address, Link] = {}
        self._by_relay_peer: dict[Address, Link] = {}
        self._mapped_next = 1
        self._out: list[tuple[bytes, Address]] = []
        self._events: deque[TraversalEvent] = deque()
        self.refusal: tuple[int, str] | None = None
        """The server's latest refusal of this device's registration."""
        self.counters: dict[str, int] = {"dropped": 0, "probes_bad": 0, "relay_unknown": 0,
                                         "introductions_bad": 0, "punch_restarts_limited": 0,
                                         "host_candidates_skipped": 0, "relay_ambiguous": 0,
                                         "birthday_searches": 0, "birthday_found": 0,
                                         "birthday_failed": 0, "birthday_limited": 0,
                                         "side_dropped": 0, "links_forgotten": 0}
        self._side_routes: dict[Address, int] = {}
        """Peer address -> extra socket, for birthday-found direct paths."""
        self._side_out: list[tuple[int, bytes, Address]] = []
        self._searching: dict[str, Link] = {}
        """Links whose birthday search has not ended, by peer JID."""
        self._next_socket = 1
        self._log = LogLimiter(logger)
        self._closed = False
        self._port_mapped: Address | None = None

    # -- lifecycle ----------------------------------------------------------------

    def start(self, now: float) -> None:
        if self.client is not None:
            self.client.start(now)
        self._service(now)

    def close(self) -> None:
        """Stop; a best-effort UNREGISTER goes out with the next datagrams."""
        if self._closed:
            return
        data = self.client.unregister() if self.client is not None else None
        if data is not None and self.server is not None:
            self._out.append((data, self.server))
        self._closed = True

    @property
    def registered(self) -> bool:
        return self.client is not None and self.client.registered

    @property
    def busy(self) -> bool:
        """Whether there is anything here at all: a rendezvous, a link, or
        something to send or report (a device on fixed addresses has none,
        and its hot path skips the traversal)."""
        return (self.client is not None or bool(self.links) or bool(self._out)
                or bool(self._events))

    @property
    def log_suppressed(self) -> int:
        """Repeated warnings logged at DEBUG instead."""
        return self._log.suppressed

    # -- user calls -----------------------------------------------------------------

    @property
    def port_mapped(self) -> Address | None:
        """This device's port mapping on its router (its public address)."""
        return self._port_mapped

    def set_port_mapped(self, port_mapped: Address | None, now: float) -> None:
        """The router forwards ``port_mapped`` to this device's socket now
        (None: no longer): a candidate for the rendezvous to hand out; the
        device registers again when it changes. (Not the QUIC-side
        "mapped" addresses of links.)"""
        self._port_mapped = port_mapped
        if self.client is not None:
            self.client.set_port_mapped(port_mapped, now)
            self._service(now)

    def introduce(self, target: str, now: float) -> None:
        """Ask the rendezvous to introduce this device and ``target``; an
        :class:`IntroductionCompleted` or :class:`IntroductionFailed` follows."""
        if self.client is None:
            self._events.append(IntroductionFailed(target, 404, "no rendezvous"))
            return
        self.client.introduce(target, now)
        self._service(now)

    def introduced(self, intro: Introduction, now: float) -> Link | None:
        """Take an introduction from any source; returns the link (None when
        it is refused: not listening, or too many links)."""
        link = self.links.get(intro.peer_jid)
        if link is None and not intro.initiator and not self._accepting:
            logger.info("not accepting the introduction of %s (not listening)", intro.peer_jid)
            return None
        if link is None and len(self.links) >= self.config.max_links \
                and not self._forget_idlest():
            self._log.warning("links_full", None, "link table full; refusing %s",
                              intro.peer_jid)
            return None
        cfg = self.config
        restart = True
        if link is None:
            paths = PathManager(cfg.paths, random.Random(self._rng.getrandbits(64)), now,
                                relay=intro.relay)
            n = self._mapped_next
            self._mapped_next += 1
            link = Link(intro.peer_jid, intro.peer_key, (f"fd64::{n:x}", n), paths,
                        intro.intro, intro.probe_key, intro.channel, intro.initiator, now,
                        punch_tokens=float(cfg.punch_restarts_burst), punch_tokens_at=now,
                        idle_since=now)
            self.links[intro.peer_jid] = link
            self._by_mapped[link.mapped] = link
        else:
            if link.peer_key != intro.peer_key:
                logger.warning("%s introduced with a different key than before", intro.peer_jid)
                link.peer_key = intro.peer_key
            if intro.intro != link.intro:
                link.old_intros[link.intro] = (link.probe_key, link.channel)
            while len(link.old_intros) > cfg.max_old_intros:
                oldest = next(iter(link.old_intros))
                _, old_channel = link.old_intros.pop(oldest)
                self._by_intro.pop(oldest, None)
                if old_channel is not None and self._by_channel.get(old_channel) is link:
                    del self._by_channel[old_channel]
            link.intro, link.probe_key, link.channel = intro.intro, intro.probe_key, intro.channel
            link.initiator = link.initiator or intro.initiator
            link.reintroduce_at = None
            link.reintroduce_attempts = 0
            restart = self._take_punch_token(link, now)
            if restart:
                self._end_birthday(link, now)
            # The peer's addresses may be new (a restart, a new process, a
            # new NAT mapping): paths to addresses it is no longer introduced
            # with go, even past the limit, or this device would go on
            # answering a dead socket (a script's second ``dtx send``).
            link.paths.reset(intro.relay, now, keep=[a for a, _ in intro.candidates])
            for addr in [a for a, cached in self._by_addr.items() if cached is link]:
                del self._by_addr[addr]
        link.introduced_at = now
        if intro.channel is not None:
            self._by_channel[intro.channel] = link
        if intro.relay_peer is not None:
            if link.relay_peer is not None and self._by_relay_peer.get(link.relay_peer) is link:
                del self._by_relay_peer[link.relay_peer]
            link.relay_peer = intro.relay_peer
            self._by_relay_peer[intro.relay_peer] = link
        self._by_intro[intro.intro] = link
        probed = False
        for addr, kind in intro.candidates:
            if not restart and not (kind is PathKind.DIRECT and intro.source == "rendezvous"):
                continue  # past the limit: only what the rendezvous saw itself
            if kind is PathKind.LAN and not self._may_probe_host(addr, intro.candidates):
                self.counters["host_candidates_skipped"] += 1
                continue
            link.paths.add_candidate(addr, kind)
            probed = True
        if restart or probed:
            link.paths.restart_punching(now)
            link.paths.handle_timer(now)  # the first punch goes out now
        if restart:
            self._maybe_birthday(link, intro, now)
        logger.info("introduced to %s (%s, by %s), %d candidates, relay channel %s",
                    intro.peer_jid, "initiator" if intro.initiator else "responder",
                    intro.source, len(intro.candidates), intro.channel)
        self._events.append(IntroductionCompleted(link))
        self._service(now)
        return link

    def update_relay(self, peer_jid: str, relay: RelayWrap | None,
                     relay_peer: Address | None, now: float) -> bool:
        """A link's relay changed (its TURN allocation was made again, or the
        peer's was and it trickled the new address): send relayed datagrams
        with ``relay``, take relayed ones from ``relay_peer``. False when
        there is no such link."""
        link = self.links.get(peer_jid)
        if link is None:
            return False
        if link.relay_peer is not None and self._by_relay_peer.get(link.relay_peer) is link:
            del self._by_relay_peer[link.relay_peer]
        link.relay_peer = relay_peer
        if relay_peer is not None:
            self._by_relay_peer[relay_peer] = link
        link.paths.set_relay(relay, now)
        self._flush_link(link, now)
        return True

    def add_candidates(self, peer_jid: str, candidates: Sequence[tuple[Address, PathKind]],
                       now: float) -> int:
        """More candidates of an introduced device (trickled by its
        signalling): the new ones are probed at once, host ones only where
        :meth:`_may_probe_host` allows (with the reflexive addresses known
        before counted too). Returns how many were added (0 for
        a device with no link)."""
        link = self.links.get(peer_jid)
        if link is None:
            return 0
        known = [(p.addr, p.kind) for p in link.paths.paths.values()]
        every = known + list(candidates)
        added = 0
        for addr, kind in candidates:
            if link.paths.knows(addr):
                continue
            if kind is PathKind.LAN and not self._may_probe_host(addr, every):
                self.counters["host_candidates_skipped"] += 1
                continue
            link.paths.add_candidate(addr, kind)
            added += link.paths.knows(addr)
        if added:
            for addr in [a for a, cached in self._by_addr.items() if cached is link]:
                del self._by_addr[addr]
            link.paths.restart_punching(now)
            link.paths.handle_timer(now)
            self._service(now)
        return added

    def idle(self, peer_jid: str, now: float | None) -> None:
        """No session uses the link to ``peer_jid`` since ``now`` (None: one
        does again). An idle link may be forgotten when the table is full."""
        link = self.links.get(peer_jid)
        if link is not None:
            link.idle_since = now

    def _forget_idlest(self) -> bool:
        """Forget the link idle longest; False when none is idle."""
        idle = [link for link in self.links.values() if link.idle_since is not None]
        if not idle:
            return False
        link = min(idle, key=lambda l: l.idle_since or 0.0)
        self._end_birthday(link, link.idle_since or 0.0)
        del self.links[link.peer_jid]
        indexes: tuple[dict[Any, Link], ...] = (self._by_mapped, self._by_channel,
                                                 self._by_intro, self._by_addr,
                                                 self._by_relay_peer)
        for index in indexes:
            for key in [k for k, v in index.items() if v is link]:
                del index[key]
        self.counters["links_forgotten"] += 1
        logger.info("forgot the idle link to %s (link table full)", link.peer_jid)
        return True

    def _take_punch_token(self, link: Link, now: float) -> bool:
        cfg = self.config
        link.punch_tokens = min(float(cfg.punch_restarts_burst), link.punch_tokens + (
            now - link.punch_tokens_at) / cfg.punch_restart_interval)
        link.punch_tokens_at = now
        if link.punch_tokens >= 1.0:
            link.punch_tokens -= 1.0
            return True
        self.counters["punch_restarts_limited"] += 1
        self._log.info("punch_limited", link.peer_jid,
                       "%s re-introduced too often; not probing again yet", link.peer_jid)
        return False

    def _may_probe_host(self, addr: Address,
                        candidates: Sequence[tuple[Address, PathKind]]) -> bool:
        """Whether a host candidate the peer claims can be its own: it is the
        peer's reflexive address (a peer with no NAT), or a private address
        while both devices are seen at one public IP (behind one NAT, so
        on one LAN). Anything else may be a third party that a hostile
        peer wants this device to flood: it is not probed."""
        reflexive_ips = {a[0] for a, kind in candidates if kind is PathKind.DIRECT}
        if addr[0] in reflexive_ips:
            return True
        mine = self.client.reflexive if self.client is not None else self.reflexive
        if mine is None or mine[0] not in reflexive_ips:
            return False
        try:
            return ipaddress.ip_address(addr[0]).is_private
        except ValueError:
            return False

    def link_for_mapped(self, addr: Address) -> Link | None:
        return self._by_mapped.get(addr)

    def link_for(self, jid: str) -> Link | None:
        """The link to the device ``jid`` names (a bare JID: any of its devices)."""
        try:
            key = JID.parse(jid).full
        except DtxError:
            return None
        link = self.links.get(key)
        if link is not None:
            return link
        for candidate in self.links.values():
            if jid_matches(key, candidate.peer_jid):
                return candidate
        return None

    # -- datagrams in -------------------------------------------------------------

    def receive_dtx(self, data: bytes, src: Address, now: float) -> tuple[bytes, Address] | None:
        """A datagram whose first byte is in dtx's range (16–19). Returns a
        relayed QUIC packet with the mapped address of its sender, if it
        was one."""
        first = data[0]
        if first == RELAY_FIRST_BYTE:
            if src != self.server:
                self.counters["dropped"] += 1
                return None
            try:
                channel, payload = decode_relay(data)
            except DecodeError:
                self.counters["dropped"] += 1
                return None
            link = self._by_channel.get(channel)
            if link is None:
                self.counters["relay_unknown"] += 1
                return None
            return payload, link.mapped
        if first == CONTROL_FIRST_BYTE:
            if src != self.server:
                self.counters["dropped"] += 1
                return None
            try:
                msg = decode_control(data)
            except DecodeError as exc:
                self.counters["dropped"] += 1
                self._log.warning("control_bad", src, "bad control message from the "
                                  "rendezvous: %s", exc)
                return None
            if self.client is not None:
                self.client.receive(msg, now)
        elif first == PROBE_FIRST_BYTE:
            self._on_probe(data, src, now)
        else:
            self.counters["dropped"] += 1
            return None
        self._service(now)
        return None

    def map_relayed(self, peer: Address) -> Address | None:
        """The mapped address of the link whose TURN peer is ``peer`` (a
        datagram the TURN server relayed from there)."""
        link = self._by_relay_peer.get(peer)
        if link is None:
            # The peer's NAT may map it to another port toward the relay:
            # the link relayed from that IP, if only one is (two peers on
            # one TURN server share its IP; guessing would hand one's
            # packets to the other's connection).
            same_ip = {id(c): c for c in self._by_relay_peer.values()
                       if c.relay_peer is not None and c.relay_peer[0] == peer[0]}
            if len(same_ip) != 1:
                self.counters["relay_unknown" if not same_ip else "relay_ambiguous"] += 1
                return None
            link = next(iter(same_ip.values()))
        return link.mapped

    def map_incoming(self, src: Address, now: float) -> Address | None:
        """The mapped address for a QUIC datagram from ``src``, if ``src`` is
        a known direct path of an introduced device."""
        link = self._by_addr.get(src)
        if link is None:
            # Paths are only added between resets, which clear this cache.
            for candidate in self.links.values():
                if candidate.paths.knows(src):
                    link = self._by_addr[src] = candidate
                    break
            else:
                # The relay path of a peer that relays through its own TURN
                # allocation: its datagrams come from its relayed address.
                relayed = self._by_relay_peer.get(src)
                return None if relayed is None else relayed.mapped
        link.paths.on_heard(src, now)
        return link.mapped

    def _probe_key(self, intro: bytes) -> bytes | None:
        link = self._by_intro.get(intro)
        if link is None:
            return None
        if intro == link.intro:
            return link.probe_key
        old = link.old_intros.get(intro)
        return None if old is None else old[0]

    def _on_probe(self, data: bytes, src: Address, now: float) -> None:
        try:
            probe = decode_probe(data, self._probe_key)
        except DecodeError as exc:
            self.counters["probes_bad"] += 1
            self._log.log(logging.DEBUG, "probe_bad", src, "dropped a probe from %s: %s",
                          src, exc)
            return
        link = self._by_intro.get(probe.intro)
        if link is None:  # decode_probe found its key, so this cannot happen
            self.counters["probes_bad"] += 1
            return
        if probe.kind is ProbeKind.PING:
            link.paths.on_ping(probe.txid, src, now)
        else:
            link.paths.on_pong(probe.txid, src, now)

    # -- datagrams out --------------------------------------------------------------

    def route(self, data: bytes, mapped: Address, now: float) -> list[tuple[bytes, Address]]:
        """Where a QUIC datagram for ``mapped`` goes: (payload, destination)
        pairs (none for an unknown mapped address)."""
        link = self._by_mapped.get(mapped)
        if link is None:
            return []
        out = link.paths.route(data, now)
        if link.side is not None:
            return self._divert(out)
        return out

    def datagrams_to_send(self) -> list[tuple[bytes, Address]]:
        """Control messages and probes to send."""
        out, self._out = self._out, []
        if self._side_routes:
            return self._divert(out)
        return out

    def _divert(self, out: list[tuple[bytes, Address]]) -> list[tuple[bytes, Address]]:
        """Datagrams to an address a birthday search found leave from its
        socket; the others stay."""
        routes = self._side_routes
        kept = []
        for data, addr in out:
            socket = routes.get(addr)
            if socket is None:
                kept.append((data, addr))
            else:
                self._side_out.append((socket, data, addr))
        return kept

    # -- the extra sockets of birthday searches -----------------------------------

    @property
    def side_busy(self) -> bool:
        """Whether any extra socket is wanted or has something (cheap)."""
        return bool(self._side_routes or self._side_out or self._searching)

    def side_sockets(self) -> set[int]:
        """The extra sockets to hold open now (every other one is closed)."""
        wanted = set(self._side_routes.values())
        for link in self._searching.values():
            if link.birthday is not None:
                wanted.update(link.birthday.sockets)
        return wanted

    def side_datagrams_to_send(self) -> list[tuple[int, bytes, Address]]:
        """(socket, payload, destination) to send from the extra sockets."""
        out, self._side_out = self._side_out, []
        return out

    def side_route(self, addr: Address) -> int | None:
        """The extra socket that carries the direct path to ``addr``."""
        return self._side_routes.get(addr)

    def receive_side(self, socket: int, data: bytes, src: Address, now: float) -> bool:
        """A datagram on extra socket ``socket``. A probe is handled here
        (and may end a search: that socket wins); True when it is a QUIC
        datagram of the path that socket carries, for the caller to handle
        as one from ``src`` on the device's socket. Anything else is
        counted and dropped."""
        if data and data[0] == PROBE_FIRST_BYTE:
            try:
                probe = decode_probe(data, self._probe_key)
            except DecodeError:
                self.counters["probes_bad"] += 1
                return False
            link = self._by_intro.get(probe.intro)
            search = None if link is None else link.birthday
            if link is None or not (
                    (search is not None and search.owns(socket)) or link.side == (src, socket)):
                self.counters["side_dropped"] += 1
                return False
            if search is not None and search.owns(socket):
                self._birthday_found(link, search, socket, src, now)
            if probe.kind is ProbeKind.PING:
                link.paths.on_ping(probe.txid, src, now)
            else:
                link.paths.on_pong(probe.txid, src, now)
                link.paths.ping_now(src, now)
            self._service(now)
            return False
        if self._side_routes.get(src) == socket and classify(data) is PacketKind.QUIC:
            return True
        self.counters["side_dropped"] += 1
        return False

    def _maybe_birthday(self, link: Link, intro: Introduction, now: float) -> None:
        """Start a birthday search when one side's NAT maps per destination
        and the other's does not, and the introduction named the peer's
        public address."""
        cfg = self.config.birthday
        mine, theirs = intro.nat_mapping, intro.peer_nat_mapping
        if mine is NatMapping.DEPENDENT and theirs is NatMapping.INDEPENDENT:
            role = BirthdayRole.HARD
        elif mine is NatMapping.INDEPENDENT and theirs is NatMapping.DEPENDENT:
            role = BirthdayRole.EASY
        else:
            return
        if not cfg.enabled or intro.reflexive is None:
            return
        if len(self._searching) >= cfg.max_searches:
            self.counters["birthday_limited"] += 1
            self._log.info("birthday_limited", link.peer_jid, "not starting a birthday "
                           "search toward %s: %d running", link.peer_jid, cfg.max_searches)
            return
        first = self._next_socket
        if role is BirthdayRole.HARD:
            self._next_socket += cfg.sockets
        link.birthday = BirthdaySearch(role, intro.reflexive, cfg,
                                       random.Random(self._rng.getrandbits(64)), now,
                                       first_socket=first)
        self._searching[link.peer_jid] = link
        self.counters["birthday_searches"] += 1
        logger.info("birthday search toward %s (%s side, %s:%d) in %.1f s unless a "
                    "direct path answers first", link.peer_jid, role.value,
                    *intro.reflexive, cfg.start_after)

    def _birthday_found(self, link: Link, search: BirthdaySearch, socket: int,
                        src: Address, now: float) -> None:
        search.found(socket, now)
        self._searching.pop(link.peer_jid, None)
        self.counters["birthday_found"] += 1
        if link.side is not None:
            self._side_routes.pop(link.side[0], None)
        link.side = (src, socket)
        self._side_routes[src] = socket
        for addr in [a for a, cached in self._by_addr.items() if cached is link]:
            del self._by_addr[addr]
        logger.info("birthday search toward %s found %s:%d on socket %d after %.2f s",
                    link.peer_jid, *src, socket, now - (search.started_at or now))

    def _end_birthday(self, link: Link, now: float) -> None:
        """A new introduction: the old search and its path end."""
        if link.birthday is not None:
            link.birthday.stop(now)
        self._searching.pop(link.peer_jid, None)
        if link.side is not None:
            if self._side_routes.get(link.side[0]) == link.side[1]:
                del self._side_routes[link.side[0]]
            link.side = None

    def next_event(self) -> TraversalEvent | None:
        return self._events.popleft() if self._events else None

    # -- timers -------------------------------------------------------------------

    def get_timer(self) -> float | None:
        if self._closed:
            return None
        when = self.client.get_timer() if self.client is not None else None
        for link in self.links.values():
            search = link.birthday
            for t in (link.paths.get_timer(), link.reintroduce_at,
                      None if search is None else search.get_timer()):
                if t is not None and (when is None or t < when):
                    when = t
        return when

    def handle_timer(self, now: float) -> None:
        if self._closed:
            return
        client = self.client
        if client is not None:
            client.handle_timer(now)
        for link in self.links.values():
            link.paths.handle_timer(now)
            search = link.birthday
            if search is not None and search.active:
                if link.paths.has_direct:
                    search.stop(now)
                else:
                    search.handle_timer(now)
                    if search.state is SearchState.FAILED:
                        self.counters["birthday_failed"] += 1
                        logger.info("birthday search toward %s found nothing in %.1f s",
                                    link.peer_jid, search.config.duration)
                if not search.active:
                    self._searching.pop(link.peer_jid, None)
            if link.reintroduce_at is not None and now >= link.reintroduce_at:
                link.reintroduce_at = None
                if client is not None and client.registered:
                    client.introduce(link.peer_jid, now)
        self._service(now)

    # -- the machinery ----------------------------------------------------------------

    def _service(self, now: float) -> None:
        if self._closed:
            return
        client = self.client
        while client is not None and (ev := client.next_event()) is not None:
            if isinstance(ev, Registered):
                self.refusal = None
                self._events.append(ev)
                if ev.again:
                    self._reintroduce_all(now)
            elif isinstance(ev, RegistrationLost):
                self._events.append(ev)
            elif isinstance(ev, ReflexiveChanged):
                self._reintroduce_all(now)
            elif isinstance(ev, IntroductionReceived):
                self._on_introduction(ev.message, now)
            elif isinstance(ev, IntroductionFailed):
                self._on_intro_failed(ev, now)
            elif isinstance(ev, RegistrationRefused):
                logger.warning("rendezvous refused registration: %d %s", ev.code, ev.reason)
                self.refusal = (ev.code, ev.reason)
                self._events.append(ev)
        if client is not None:
            self._out.extend(client.datagrams_to_send())
        for link in self.links.values():
            self._flush_link(link, now)

    def _flush_link(self, link: Link, now: float) -> None:
        search = link.birthday
        if search is not None:
            for socket, dest in search.pings_to_send():
                txid = self._rng.getrandbits(64).to_bytes(8, "big")
                data = encode_probe(Probe(ProbeKind.PING, link.intro, txid, None),
                                    link.probe_key)
                if socket == 0:
                    self._out.append((data, dest))
                else:
                    self._side_out.append((socket, data, dest))
        for req in link.paths.probes_to_send():
            if req.ping:
                probe = Probe(ProbeKind.PING, link.intro, req.txid, None)
            else:
                probe = Probe(ProbeKind.PONG, link.intro, req.txid, req.observed)
            self._out.append((encode_probe(probe, link.probe_key), req.dest))
        while (change := link.paths.next_event()) is not None:
            link.changes.append(change)
            logger.info(
                "path to %s: %s -> %s%s",
                link.peer_jid,
                change.previous.value if change.previous else "none",
                change.kind.value,
                f" {change.addr[0]}:{change.addr[1]}" if change.addr else "",
            )
            if change.kind is PathKind.RELAY and change.previous in (PathKind.DIRECT, PathKind.LAN):
                # The direct path died: perhaps our NAT changed. Ask the
                # server now rather than at the next keepalive.
                if self.client is not None:
                    self.client.check_now(now)
                    self._out.extend(self.client.datagrams_to_send())
            self._events.append(LinkPathChanged(link, change))

    def _on_introduction(self, msg: ControlMessage, now: float) -> None:
        try:
            assert self.server is not None  # only the rendezvous client sends these
            intro = introduction_from_control(msg, self.server)
        except DecodeError as exc:
            self.counters["introductions_bad"] += 1
            self._log.warning("introduction_bad", self.server,
                              "bad introduction from the rendezvous: %s", exc)
            return
        link = self.introduced(intro, now)
        if link is not None and not intro.initiator and self.client is not None:
            self.client.accept(intro.intro, now)

    def _on_intro_failed(self, ev: IntroductionFailed, now: float) -> None:
        try:
            key = JID.parse(ev.target).full
        except DtxError:
            key = ev.target
        link = self.links.get(key)
        backoff = self.config.reintroduce_backoff
        if link is not None and link.reintroduce_attempts < len(backoff):
            # The peer may not have registered again yet (a restart): retry.
            link.reintroduce_at = now + backoff[link.reintroduce_attempts]
            link.reintroduce_attempts += 1
        self._events.append(ev)

    def _reintroduce_all(self, now: float) -> None:
        """After a new registration or a new public address: fresh
        introductions (new relay channels, new candidates) with every known
        device; the other side is introduced in the same stroke."""
        if self.client is None:
            return
        for link in self.links.values():
            link.reintroduce_attempts = 0
            link.reintroduce_at = None
            self.client.introduce(link.peer_jid, now)


__all__ = [
    "Introduction",
    "IntroductionCompleted",
    "IntroductionFailed",
    "Link",
    "LinkPathChanged",
    "Registered",
    "RegistrationLost",
    "RegistrationRefused",
    "Traversal",
    "TraversalConfig",
    "TraversalEvent",
    "introduction_from_control",
]
