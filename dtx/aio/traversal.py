"""NAT traversal for a :class:`~dtx.aio.peer.Peer`: rendezvous, probes, relay.

Owns the device's registration (:class:`~dtx.proto.rdvclient.RendezvousClient`)
and one :class:`~dtx.proto.paths.PathManager` per introduced device. QUIC
never sees real addresses for those devices: each gets a *mapped address*
(``fd64::N``, port ``N``), and this module translates both ways:

* outgoing QUIC datagrams to a mapped address go where the path manager
  says: straight to the peer's address, or wrapped in a relay frame to the
  rendezvous server;
* incoming QUIC datagrams from a known peer address, and relay frames on a
  known channel, are handed to QUIC as coming from the mapped address.

One timer serves the registration and every path manager.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import AuthenticationError, ConnectError, DecodeError, DtxError
from ..jid import JID
from ..proto.paths import PathChanged, PathConfig, PathKind, PathManager
from ..proto.rdvclient import (
    IntroductionFailed,
    IntroductionReceived,
    ReflexiveChanged,
    Registered,
    RegistrationLost,
    RegistrationRefused,
    RendezvousClient,
    RendezvousClientConfig,
)
from ..wire.control import (
    CandidateKind,
    ControlMessage,
    MessageType,
    Probe,
    ProbeKind,
    decode_control,
    decode_probe,
    encode_probe,
)
from ..wire.relay import RELAY_FIRST_BYTE, decode_relay, encode_relay

logger = logging.getLogger(__name__)

Address = tuple[str, int]

CONTROL_FIRST_BYTE = 0x10
PROBE_FIRST_BYTE = 0x12

_mapped_counter = itertools.count(1)

MAX_OLD_INTROS = 3
REINTRODUCE_BACKOFF = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0)


def _mapped_address() -> Address:
    n = next(_mapped_counter)
    return (f"fd64::{n:x}", n)


@dataclass
class Link:
    """What this device knows about one introduced remote device."""

    peer_jid: str
    peer_key: bytes
    mapped: Address
    paths: PathManager
    intro: bytes
    probe_key: bytes
    channel: int
    initiator: bool
    created_at: float
    old_intros: dict[bytes, tuple[bytes, int]] = field(default_factory=dict)
    """(probe key, relay channel) of earlier introductions, still accepted
    for a while: after a re-introduction both sides may briefly disagree on
    which one is current."""
    reintroduce_at: float | None = None
    reintroduce_attempts: int = 0
    changes: list[PathChanged] = field(default_factory=list)
    on_change: list[Callable[[PathChanged], None]] = field(default_factory=list)


class Traversal:
    """The rendezvous side of one device's socket."""

    def __init__(
        self,
        *,
        jid: str,
        key: bytes,
        sign: Callable[[bytes], bytes],
        server: Address,
        send: Callable[[bytes, Address], None],
        deliver_quic: Callable[[bytes, Address], None],
        host_candidates: list[Address],
        accept_introductions: bool,
        path_config: PathConfig | None = None,
        client_config: RendezvousClientConfig | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._rng = rng or random.Random(random.SystemRandom().getrandbits(64))
        self.server = server
        self._send = send
        self._deliver_quic = deliver_quic
        self._accepting = accept_introductions
        self._path_config = path_config or PathConfig()
        self.client = RendezvousClient(
            jid=jid,
            key=key,
            sign=sign,
            server=server,
            rng=self._rng,
            config=client_config or RendezvousClientConfig(),
            host_candidates=tuple(host_candidates),
        )
        self.links: dict[str, Link] = {}
        self._by_mapped: dict[Address, Link] = {}
        self._by_channel: dict[int, Link] = {}
        self._by_intro: dict[bytes, Link] = {}
        self._by_addr: dict[Address, Link] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._registered = asyncio.Event()
        self._state_changed = asyncio.Event()
        self.refusal: tuple[int, str] | None = None
        """The server's latest refusal of this device's registration."""
        self._intro_waiters: dict[str, asyncio.Future[Link]] = {}
        self.counters: dict[str, int] = {"dropped": 0, "probes_bad": 0, "relay_unknown": 0}
        self._closed = False

    # -- lifecycle ----------------------------------------------------------------

    def start(self) -> None:
        self.client.start(self._loop.time())
        self._service()

    def close(self) -> None:
        self._closed = True
        data = self.client.unregister()
        if data is not None:
            self._send(data, self.server)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for fut in self._intro_waiters.values():
            if not fut.done():
                fut.set_exception(ConnectError("peer closed"))

    async def wait_registered(self, timeout: float) -> None:
        """Wait until registered. Raises :class:`AuthenticationError` if the
        server refused this device (its key is not in the account's vCard,
        say), :class:`ConnectError` on no answer."""
        try:
            async with asyncio.timeout(timeout):
                while not self._registered.is_set():
                    if self.refusal is not None and self.refusal[0] == 403:
                        raise AuthenticationError(
                            f"the rendezvous at {self.server[0]}:{self.server[1]} refused "
                            f"this device: {self.refusal[0]} {self.refusal[1]}")
                    self._state_changed.clear()
                    await self._state_changed.wait()
        except TimeoutError:
            raise ConnectError(
                f"no registration with the rendezvous at {self.server[0]}:{self.server[1]} "
                f"within {timeout:.1f} s"
            ) from None

    # -- connecting -----------------------------------------------------------------

    async def introduce(self, target: str, timeout: float) -> Link:
        """Ask for an introduction to ``target``; returns the link once the
        server introduced both sides (the relay path is usable at once)."""
        loop = self._loop
        deadline = loop.time() + timeout
        await self.wait_registered(timeout)
        key = JID.parse(target).full
        fut = self._intro_waiters.get(key)
        if fut is None or fut.done():
            fut = loop.create_future()
            self._intro_waiters[key] = fut
            self.client.introduce(target, loop.time())
            self._service()
        try:
            async with asyncio.timeout(max(0.0, deadline - loop.time())):
                return await asyncio.shield(fut)
        except TimeoutError:
            raise ConnectError(f"no introduction to {target} within {timeout:.1f} s") from None
        finally:
            if self._intro_waiters.get(key) is fut and fut.done():
                del self._intro_waiters[key]

    def link_for_mapped(self, addr: Address) -> Link | None:
        return self._by_mapped.get(addr)

    # -- datagrams in -------------------------------------------------------------

    def on_dtx(self, data: bytes, src: Address) -> None:
        """A datagram whose first byte is in dtx's range (16–19)."""
        first = data[0]
        now = self._loop.time()
        if first == RELAY_FIRST_BYTE:
            if src != self.server:
                self.counters["dropped"] += 1
                return
            try:
                channel, payload = decode_relay(data)
            except DecodeError:
                self.counters["dropped"] += 1
                return
            link = self._by_channel.get(channel)
            if link is None:
                self.counters["relay_unknown"] += 1
                return
            self._deliver_quic(payload, link.mapped)
            return
        if first == CONTROL_FIRST_BYTE:
            if src != self.server:
                self.counters["dropped"] += 1
                return
            try:
                msg = decode_control(data)
            except DecodeError as exc:
                self.counters["dropped"] += 1
                logger.debug("bad control message from the rendezvous: %s", exc)
                return
            self.client.receive(msg, now)
        elif first == PROBE_FIRST_BYTE:
            self._on_probe(data, src, now)
        else:
            self.counters["dropped"] += 1
            return
        self._service()

    def map_incoming(self, src: Address) -> Address | None:
        """The mapped address for a QUIC datagram from ``src``, if ``src`` is
        a known direct path of an introduced device."""
        link = self._by_addr.get(src)
        if link is None:
            # Paths are only ever added, so a hit stays right once cached.
            for candidate in self.links.values():
                if candidate.paths.knows(src):
                    link = self._by_addr[src] = candidate
                    break
            else:
                return None
        link.paths.on_heard(src, self._loop.time())
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
            logger.debug("dropped a probe from %s: %s", src, exc)
            return
        link = self._by_intro[probe.intro]
        if probe.kind is ProbeKind.PING:
            link.paths.on_ping(probe.txid, src, now)
        else:
            link.paths.on_pong(probe.txid, src, now)

    # -- datagrams out --------------------------------------------------------------

    def route(self, data: bytes, mapped: Address) -> None:
        link = self._by_mapped.get(mapped)
        if link is None:
            return
        for payload, dest in link.paths.route(data, self._loop.time()):
            self._send(payload, dest)
        # Only this link's timer can have moved earlier.
        when = link.paths.get_timer()
        if when is not None and (self._timer_at is None or when < self._timer_at):
            self._arm()

    # -- the machinery ----------------------------------------------------------------

    def _service(self) -> None:
        if self._closed:
            return
        client = self.client
        now = self._loop.time()
        while (ev := client.next_event()) is not None:
            if isinstance(ev, Registered):
                self._registered.set()
                self.refusal = None
                if ev.again:
                    self._reintroduce_all(now)
            elif isinstance(ev, RegistrationLost):
                self._registered.clear()
            elif isinstance(ev, ReflexiveChanged):
                self._reintroduce_all(now)
            elif isinstance(ev, IntroductionReceived):
                self._on_introduction(ev.message, now)
            elif isinstance(ev, IntroductionFailed):
                self._on_intro_failed(ev)
            elif isinstance(ev, RegistrationRefused):
                logger.warning("rendezvous refused registration: %d %s", ev.code, ev.reason)
                self.refusal = (ev.code, ev.reason)
            self._state_changed.set()
        for data, dest in client.datagrams_to_send():
            self._send(data, dest)
        for link in self.links.values():
            self._flush_link(link)
        self._arm()

    def _flush_link(self, link: Link) -> None:
        for req in link.paths.probes_to_send():
            if req.ping:
                probe = Probe(ProbeKind.PING, link.intro, req.txid, None)
            else:
                probe = Probe(ProbeKind.PONG, link.intro, req.txid, req.observed)
            self._send(encode_probe(probe, link.probe_key), req.dest)
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
                self.client.check_now(self._loop.time())
            for callback in list(link.on_change):
                callback(change)

    def _arm(self) -> None:
        times = [t for t in (self.client.get_timer(),) if t is not None]
        times.extend(t for link in self.links.values() if (t := link.paths.get_timer()) is not None)
        times.extend(t for link in self.links.values() if (t := link.reintroduce_at) is not None)
        when = min(times) if times else None
        if when == self._timer_at and self._timer is not None:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = when
        if when is not None and not self._closed:
            self._timer = self._loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        now = self._loop.time()
        self.client.handle_timer(now)
        for link in self.links.values():
            link.paths.handle_timer(now)
            if link.reintroduce_at is not None and now >= link.reintroduce_at:
                link.reintroduce_at = None
                if self.client.registered:
                    self.client.introduce(link.peer_jid, now)
        self._service()

    # -- introductions ----------------------------------------------------------------

    def _on_introduction(self, msg: ControlMessage, now: float) -> None:
        assert msg.peer_jid is not None and msg.peer_key is not None
        assert msg.intro is not None and msg.probe_key is not None and msg.channel is not None
        try:
            peer = JID.parse(msg.peer_jid).full
        except DtxError:
            logger.warning("introduction with a bad JID %r", msg.peer_jid)
            return
        initiator = msg.role == 1
        link = self.links.get(peer)
        if link is None and not initiator and not self._accepting:
            logger.info("not accepting the introduction of %s (not listening)", peer)
            return
        server = self.server
        channel = msg.channel

        def wrap(payload: bytes) -> tuple[bytes, Address]:
            return encode_relay(channel, payload), server

        if link is None:
            paths = PathManager(self._path_config, random.Random(self._rng.getrandbits(64)), now,
                                relay=wrap)
            link = Link(peer, msg.peer_key, _mapped_address(), paths, msg.intro, msg.probe_key,
                        channel, initiator, now)
            self.links[peer] = link
            self._by_mapped[link.mapped] = link
        else:
            if link.peer_key != msg.peer_key:
                logger.warning("%s introduced with a different key than before", peer)
                link.peer_key = msg.peer_key
            link.old_intros[link.intro] = (link.probe_key, link.channel)
            while len(link.old_intros) > MAX_OLD_INTROS:
                oldest = next(iter(link.old_intros))
                _, old_channel = link.old_intros.pop(oldest)
                self._by_intro.pop(oldest, None)
                self._by_channel.pop(old_channel, None)
            link.intro, link.probe_key, link.channel = msg.intro, msg.probe_key, channel
            link.initiator = link.initiator or initiator
            link.reintroduce_at = None
            link.reintroduce_attempts = 0
            link.paths.reset(wrap, now, keep=[c.addr for c in msg.candidates])
            for addr in [a for a, cached in self._by_addr.items() if cached is link]:
                del self._by_addr[addr]
        self._by_channel[channel] = link
        self._by_intro[msg.intro] = link
        for cand in msg.candidates:
            kind = PathKind.LAN if cand.kind == CandidateKind.HOST else PathKind.DIRECT
            link.paths.add_candidate(cand.addr, kind)
        link.paths.restart_punching(now)
        link.paths.handle_timer(now)  # the first punch goes out now
        if not initiator:
            self.client.accept(msg.intro, now)
        logger.info("introduced to %s (%s), %d candidates, relay channel %d",
                    peer, "initiator" if initiator else "responder", len(msg.candidates), channel)
        for key, fut in list(self._intro_waiters.items()):
            if not fut.done() and _matches(key, peer):
                fut.set_result(link)

    def _on_intro_failed(self, ev: IntroductionFailed) -> None:
        try:
            key = JID.parse(ev.target).full
        except DtxError:
            return
        link = self.links.get(key)
        if link is not None and link.reintroduce_attempts < len(REINTRODUCE_BACKOFF):
            # The peer may not have registered again yet (a restart): retry.
            delay = REINTRODUCE_BACKOFF[link.reintroduce_attempts]
            link.reintroduce_attempts += 1
            link.reintroduce_at = self._loop.time() + delay
        fut = self._intro_waiters.get(key)
        if fut is not None and not fut.done():
            fut.set_exception(ConnectError(
                f"the rendezvous could not introduce {ev.target}: {ev.code} {ev.reason}"))

    def _reintroduce_all(self, now: float) -> None:
        """After a new registration or a new public address: fresh
        introductions (new relay channels, new candidates) with every known
        device; the other side is introduced in the same stroke."""
        for link in self.links.values():
            link.reintroduce_attempts = 0
            link.reintroduce_at = None
            self.client.introduce(link.peer_jid, now)


def _matches(requested: str, peer: str) -> bool:
    return requested == peer or ("/" not in requested and peer.split("/", 1)[0] == requested)


__all__ = ["Traversal", "Link", "MessageType"]
