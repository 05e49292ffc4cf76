"""The asyncio driver: one UDP socket, many sessions.

A :class:`Peer` owns one UDP socket. It listens (answers QUIC handshakes from
devices its trust store accepts) and connects (to a JID at an address). Each
connection is an :class:`~dtx.proto.auth.AuthenticatedQuicConnection` with an
:class:`~dtx.proto.session.XmlSession` stacked on it; this module only moves
datagrams, runs one timer per connection and turns session events into
awaitable results, in the manner of aioquic's ``QuicConnectionProtocol``.

Transmissions are coalesced: ``Session.send`` only queues, and one callback
per event-loop iteration writes everything queued, so a burst of stanzas
leaves in as few QUIC packets as fit.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import socket
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from aioquic.buffer import Buffer  # type: ignore[attr-defined]
from aioquic.quic.packet import (
    QuicPacketType,
    pull_quic_header,
)

from ..errors import (
    AuthenticationError,
    ConnectError,
    DtxError,
    TrustError,
)
from ..identity import DeviceIdentity
from ..proto.paths import PathConfig
from ..wire.demux import PacketKind, classify
from .netif import host_candidates
from .socket import UdpSocket
from .session import Session, _SessionAdapter, _sid_counter
from .traversal import Link, Traversal
from ..proto.auth import (
    AuthenticatedQuicConnection,
    make_certificate,
    quic_configuration,
)
from ..proto.session import (
    SessionConfig,
    SessionEnded,
    XmlSession,
    trust_check_for,
)

logger = logging.getLogger(__name__)

Address = tuple[str, int]


class KeyVerifier(Protocol):
    """Decides whether ``key`` may speak for ``jid`` (raises TrustError)."""

    def verify(self, jid: str, key: bytes) -> None: ...


@dataclass(frozen=True, kw_only=True)
class PeerConfig:
    """Options of a :class:`Peer`. Times in seconds."""

    session: SessionConfig = SessionConfig()
    idle_timeout: float = 30.0
    connect_timeout: float = 10.0
    datagrams: bool = True
    """Offer the unreliable DATAGRAM channel (RFC 9221)."""
    max_connections: int = 1024
    """Bound on concurrent connections, half-open ones included."""
    accept_backlog: int = 128
    """Sessions opened by remote devices and not yet taken by accept()."""
    rendezvous: Address | None = None
    """The rendezvous server: register there, connect by JID alone."""
    host_addresses: tuple[str, ...] | None = None
    """This device's LAN addresses (host candidates); by default the
    address the socket is bound to, or every interface address."""
    paths: PathConfig = PathConfig()
    lan: bool = False
    """Use the LAN: advertise this device over mDNS/DNS-SD when listening,
    and look for the peer there first when connecting by JID."""
    lan_timeout: float = 1.5
    """How long connect() waits for an mDNS answer before going on."""
    receive_buffer_bytes: int = 4 * 1024 * 1024
    """Received stanzas the application has not read yet, in bytes, beyond
    which the session stops granting the sender QUIC credit (it resumes
    below a quarter of it): memory stays bounded, nothing is dropped."""
    max_datagram_size: int = 1200
    """Largest UDP payload QUIC sends (RFC 9000's safe minimum by default;
    1452 fits an Ethernet path with room for dtx's 5-byte relay header and
    cuts per-packet work by a sixth, where the path is known to carry it)."""
    keepalive_interval: float = 10.0
    """A session quiet for this long sends a QUIC PING (keeps the session,
    and the NAT bindings on its path, alive; well inside idle_timeout)."""
    max_half_open: int = 256
    """Bound on handshakes from remote devices still in progress; when it is
    reached the oldest one is dropped to make room, so a flood of Initials
    delays, but cannot lock out, a device whose handshake takes one round
    trip."""
    max_half_open_per_ip: int = 16
    """Bound on handshakes in progress from one source IP; further Initials
    from that IP are dropped until one completes or expires."""
    handshake_timeout: float = 10.0
    """A handshake from a remote device still in progress after this long is
    dropped (checked whenever a new one arrives; aioquic's idle timeout
    ends it anyway after ``idle_timeout``)."""


class Peer:
    """A device: its identity, its trust decisions and one UDP socket."""

    def __init__(
        self,
        identity: DeviceIdentity,
        verifier: KeyVerifier,
        *,
        config: PeerConfig | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.identity = identity
        self.jid = str(identity.jid)
        self.verifier = verifier
        self.config = config or PeerConfig()
        self._rng = rng or random.SystemRandom()
        self._certificate = make_certificate(identity.private_key, self.jid)
        self._socket: UdpSocket | None = None
        self._traversal: Traversal | None = None
        self._keepalive: asyncio.TimerHandle | None = None
        self._advertiser: Any = None
        self._browser: Any = None
        self._sessions: dict[Address, Session] = {}
        self._incoming: asyncio.Queue[Session] = asyncio.Queue(self.config.accept_backlog)
        self._listening = False
        self._dirty: set[Session] = set()
        self._flush_scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.refusals: deque[tuple[Address, DtxError]] = deque(maxlen=64)
        """The latest handshakes this peer refused or was refused in, newest last."""
        self.counters: dict[str, int] = {
            "handshakes_refused": 0,
            "datagrams_dropped": 0,
            "connections_refused": 0,
        }

    # -- lifecycle ----------------------------------------------------------------

    async def start(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        sock: socket.socket | None = None,
        listen: bool = True,
    ) -> None:
        """Bind the UDP socket (or adopt ``sock``); accept sessions if ``listen``."""
        self._loop = asyncio.get_running_loop()
        if sock is not None:
            self._socket = UdpSocket(sock, self._datagram_received, self._flush)
        else:
            self._socket = UdpSocket.bind(host, port, self._datagram_received, self._flush)
        self._listening = listen
        server = self.config.rendezvous
        if server is not None:
            self._traversal = Traversal(
                jid=self.jid,
                key=self.identity.public_key,
                sign=self.identity.sign,
                server=server,
                send=self._socket.sendto,
                deliver_quic=self._quic_datagram,
                host_candidates=(
                    [(a, self._socket.address[1]) for a in self.config.host_addresses]
                    if self.config.host_addresses is not None
                    else host_candidates(self._socket.address, server)
                ),
                accept_introductions=listen,
                path_config=self.config.paths,
            )
            self._traversal.start()
        self._keepalive = self._loop.call_later(self.config.keepalive_interval,
                                                self._keepalive_tick)
        if self.config.lan:
            await self._start_lan(listen)

    async def _start_lan(self, listen: bool) -> None:
        from .mdns import LanAdvertiser, LanBrowser

        assert self._socket is not None
        self._browser = LanBrowser()
        await self._browser.__aenter__()
        if listen:
            self._advertiser = LanAdvertiser(self.jid, self.identity.fingerprint,
                                             self._socket.address[1])
            await self._advertiser.__aenter__()

    async def wait_registered(self, timeout: float | None = None) -> None:
        """Wait until the rendezvous accepted this device's registration."""
        if self._traversal is None:
            raise DtxError("no rendezvous configured")
        await self._traversal.wait_registered(timeout or self.config.connect_timeout)

    @property
    def traversal(self) -> Traversal | None:
        return self._traversal

    def _keepalive_tick(self) -> None:
        assert self._loop is not None
        now = self._now()
        interval = self.config.keepalive_interval
        for session in list(self._sessions.values()):
            if session.is_open and now - session._last_rx >= interval:
                session._quic.send_ping(0)
                self._schedule(session)
        self._keepalive = self._loop.call_later(interval, self._keepalive_tick)

    @property
    def address(self) -> Address:
        if self._socket is None:
            raise DtxError("peer not started")
        return self._socket.address

    async def close(self) -> None:
        """Close every session gracefully, then the socket."""
        sessions = list(self._sessions.values())
        if sessions:
            await asyncio.gather(*(s.close(timeout=2.0) for s in sessions),
                                 return_exceptions=True)
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None
        for mdns in (self._advertiser, self._browser):
            if mdns is not None:
                try:
                    await mdns.__aexit__(None, None, None)
                except Exception as exc:  # noqa: BLE001 - shutting down anyway
                    logger.debug("mDNS shutdown: %s", exc)
        self._advertiser = self._browser = None
        if self._traversal is not None:
            self._traversal.close()
            self._traversal = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    # -- sessions -------------------------------------------------------------------

    async def connect(
        self, jid: str, addr: Address | None = None, *, timeout: float | None = None
    ) -> Session:
        """Open a session with ``jid`` at ``addr``.

        Returns once the peer's key is checked and trusted, which lets the
        first stanza leave in the same flight as the handshake's end; the
        peer delivers it once it has checked this device's key in turn.
        Raises :class:`~dtx.errors.TrustError` (a key this side refused),
        :class:`~dtx.errors.AuthenticationError` (the peer refused ours) or
        :class:`~dtx.errors.ConnectError`.
        """
        if self._socket is None:
            raise DtxError("peer not started")
        budget = timeout or self.config.connect_timeout
        link: Link | None = None
        if addr is None and self._browser is not None:
            session = await self._connect_lan(jid, budget)
            if session is not None:
                return session
        if addr is None:
            if self._traversal is None:
                raise ConnectError(f"no address for {jid} and no rendezvous configured")
            link = await self._traversal.introduce(jid, budget)
            addr = link.mapped
        if addr in self._sessions:
            raise ConnectError(f"a session with {addr[0]}:{addr[1]} already exists")
        session = self._new_session(addr, is_client=True, expected=jid)
        session.link = link
        session._quic.connect(addr, now=self._now())
        self._schedule(session)
        try:
            async with asyncio.timeout(timeout or self.config.connect_timeout):
                await asyncio.shield(session._handshake)
        except TimeoutError:
            session.abort()
            self._terminate(session, SessionEnded(
                ConnectError(f"no answer from {jid} at {addr[0]}:{addr[1]}"), ()))
            raise ConnectError(
                f"no answer from {jid} at {addr[0]}:{addr[1]} within "
                f"{timeout or self.config.connect_timeout:.1f} s"
            ) from None
        return session

    async def _connect_lan(self, jid: str, budget: float) -> Session | None:
        """Try the devices announcing ``jid`` on the LAN, trusted keys first.

        A device whose key is refused is skipped (and logged), never trusted;
        when every LAN answer was refused and there is no rendezvous to try,
        the last refusal is raised."""
        from ..identity import fingerprint

        trusted_keys = getattr(self.verifier, "trusted_keys", None)
        keys = trusted_keys(jid) if trusted_keys is not None else None
        trusted = [fingerprint(k) for k in keys or ()]
        records = await self._browser.resolve(
            jid, timeout=min(self.config.lan_timeout, budget), trusted=trusted)
        refusal: DtxError | None = None
        for record in records:
            for addr in record.addresses[:1]:
                try:
                    session = await self.connect(jid, addr, timeout=budget)
                except TrustError as exc:
                    logger.warning("LAN device %s at %s:%d refused: %s",
                                   record.instance, addr[0], addr[1], exc)
                    refusal = exc
                    continue
                except ConnectError as exc:
                    logger.info("LAN device at %s:%d did not answer: %s", *addr, exc)
                    continue
                session._fixed_path = "lan"
                return session
        if refusal is not None and self._traversal is None:
            raise refusal
        return None

    async def accept(self) -> Session:
        """The next session a remote device opened (keys checked both ways)."""
        return await self._incoming.get()

    def sessions(self) -> list[Session]:
        return list(self._sessions.values())

    # -- internals ----------------------------------------------------------------

    def _now(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    def _new_session(self, addr: Address, *, is_client: bool, expected: str | None,
                     original_dcid: bytes | None = None) -> Session:
        cfg = self.config
        qconf = quic_configuration(
            is_client=is_client,
            private_key=self.identity.private_key,
            certificate=self._certificate,
            idle_timeout=cfg.idle_timeout,
            max_datagram_frame_size=65536 if cfg.datagrams else None,
            max_datagram_size=cfg.max_datagram_size,
        )
        quic = AuthenticatedQuicConnection(
            configuration=qconf,
            check=trust_check_for(self.verifier.verify, expected),
            original_destination_connection_id=original_dcid,
        )
        sid = f"{next(_sid_counter):x}"
        log = _SessionAdapter(logger, {"sid": sid})
        core = XmlSession(
            quic,
            local_jid=self.jid,
            peer_jid=expected,
            config=dataclasses.replace(cfg.session, max_datagram_size=cfg.max_datagram_size),
            rng=random.Random(self._rng.getrandbits(64)),
            logger=log,
        )
        session = Session(self, quic, addr, core, log)
        self._sessions[addr] = session
        return session

    def _datagram_received(self, data: bytes, addr: Address) -> None:
        if not data:
            self.counters["datagrams_dropped"] += 1
            return
        kind = classify(data)
        if kind is PacketKind.QUIC:
            if self._traversal is not None:
                mapped = self._traversal.map_incoming(addr)
                if mapped is not None:
                    addr = mapped
            self._quic_datagram(data, addr)
        elif kind is PacketKind.DTX and self._traversal is not None:
            self._traversal.on_dtx(data, addr)
        else:
            self.counters["datagrams_dropped"] += 1

    def _quic_datagram(self, data: bytes, addr: Address) -> None:
        session = self._sessions.get(addr)
        if session is None:
            session = self._maybe_accept(data, addr)
            if session is None:
                return
        now = self._now()
        quic = session._quic
        session._last_rx = now
        quic.receive_datagram(data, addr, now)
        self._process(session)

    def _maybe_accept(self, data: bytes, addr: Address) -> Session | None:
        """A new listening-side session for a QUIC Initial from ``addr``, or None.

        Unauthenticated handshakes ("half-open": accepted, not yet opened)
        are bounded: those older than ``handshake_timeout`` are dropped, at
        most ``max_half_open_per_ip`` per source IP (more are refused) and
        ``max_half_open`` in all (the oldest makes room). Dropped half-open
        sessions are forgotten without a reply: their source never proved
        its address. Every refusal is counted; the warning is logged at the
        1st, 2nd, 4th, 8th... refusal, so a flood cannot flood the log.
        """
        counters = self.counters
        if not self._listening:
            counters["datagrams_dropped"] += 1
            return None
        try:
            header = pull_quic_header(Buffer(data=data), host_cid_length=8)
        except ValueError:
            counters["datagrams_dropped"] += 1
            logger.debug("dropped a non-QUIC datagram from %s", addr)
            return None
        if header.packet_type != QuicPacketType.INITIAL or len(data) < 1200:
            counters["datagrams_dropped"] += 1
            return None
        cfg = self.config
        now = self._now()

        def drop(session: Session, counter: str) -> None:
            counters[counter] = counters.get(counter, 0) + 1
            if self._sessions.get(session._addr) is session:
                del self._sessions[session._addr]
            self._dirty.discard(session)
            session._finish(SessionEnded(ConnectError(f"handshake dropped ({counter})"), ()))

        def refuse(counter: str, why: str) -> None:
            n = counters[counter] = counters.get(counter, 0) + 1
            if n & (n - 1) == 0:
                logger.warning("%s; refusing %s (%d refused so far)", why, addr, n)
            else:
                logger.debug("%s; refusing %s", why, addr)

        half_open: list[Session] = []
        same_ip = 0
        for session in list(self._sessions.values()):
            if session._quic.configuration.is_client or session._opened.done():
                continue
            if now - session.started_at > cfg.handshake_timeout:
                drop(session, "half_open_expired")
                continue
            half_open.append(session)
            if session._addr[0] == addr[0]:
                same_ip += 1
        if same_ip >= cfg.max_half_open_per_ip:
            refuse("half_open_refused_per_ip", "too many handshakes from one address")
            return None
        if len(half_open) >= cfg.max_half_open:
            drop(min(half_open, key=lambda s: s.started_at), "half_open_evicted")
        if len(self._sessions) >= cfg.max_connections:
            refuse("connections_refused", "connection table full")
            return None
        session = self._new_session(addr, is_client=False, expected=None,
                                    original_dcid=header.destination_cid)
        if self._traversal is not None:
            session.link = self._traversal.link_for_mapped(addr)
        return session

    def _process(self, session: Session) -> None:
        quic = session._quic
        core = session._core
        while (ev := quic.next_event()) is not None:
            session._dispatch(core.handle_quic_event(ev))
        self._schedule(session)

    def _schedule(self, session: Session) -> None:
        self._dirty.add(session)
        if not self._flush_scheduled and self._loop is not None:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        dirty, self._dirty = self._dirty, set()
        for session in dirty:
            self._transmit(session)

    def _transmit(self, session: Session) -> None:
        if self._socket is None:
            return
        quic = session._quic
        now = self._now()
        session._core.flush(now)
        sendto = self._socket.sendto
        link = session.link
        if link is not None and self._traversal is not None:
            route = self._traversal.route
            for data, addr in quic.datagrams_to_send(now=now):
                route(data, addr)
        else:
            for data, addr in quic.datagrams_to_send(now=now):
                sendto(data, addr)
        # Events may appear on transmit (e.g. the idle timeout fired).
        while (ev := quic.next_event()) is not None:
            session._dispatch(session._core.handle_quic_event(ev))
        timer_at = quic.get_timer()
        core_at = session._core.get_timer()
        if core_at is not None and (timer_at is None or core_at < timer_at):
            timer_at = core_at
        if session._timer is not None and session._timer_at != timer_at:
            session._timer.cancel()
            session._timer = None
        if timer_at is not None and session._timer is None and not session._closed.done():
            session._timer = self._loop.call_at(timer_at, self._on_timer, session)  # type: ignore[union-attr]
            session._timer_at = timer_at

    def _on_timer(self, session: Session) -> None:
        session._timer = None
        now = self._now()
        session._core.handle_timer(now)
        quic_at = session._quic.get_timer()
        if quic_at is not None and quic_at <= now:
            session._quic.handle_timer(now=now)
        self._process(session)

    def _on_opened(self, session: Session) -> None:
        if not session._quic.configuration.is_client:
            try:
                self._incoming.put_nowait(session)
            except asyncio.QueueFull:
                logger.warning("accept backlog full; closing session from %s",
                               session.peer_jid)
                session.abort()

    def _terminate(self, session: Session, ended: SessionEnded) -> None:
        if self._sessions.get(session._addr) is session:
            del self._sessions[session._addr]
        if ended.error is not None and not session._quic.configuration.is_client \
                and session._core.peer_jid is None:
            if isinstance(ended.error, (TrustError, AuthenticationError)):
                n = self._count("handshakes_refused")
                self.refusals.append((session._addr, ended.error))
                if _log_now(n):
                    session._log.warning("handshake from %s refused: %s (%d so far)",
                                         session._addr, ended.error, n)
            else:
                n = self._count("handshakes_failed")
                session._log.debug("handshake from %s failed: %s", session._addr, ended.error)
                if _log_now(n):
                    logger.info("%d handshakes failed or timed out so far (latest from %s: %s)",
                                n, session._addr, ended.error)
        session._finish(ended)

    def _count(self, name: str) -> int:
        self.counters[name] = self.counters.get(name, 0) + 1
        return self.counters[name]


def _log_now(count: int) -> bool:
    """Rate-limited logging of repeated events: the 1st, 2nd, 4th, 8th..."""
    return count & (count - 1) == 0


@asynccontextmanager
async def open_peer(
    identity: DeviceIdentity,
    verifier: KeyVerifier,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    listen: bool = True,
    config: PeerConfig | None = None,
    sock: socket.socket | None = None,
) -> AsyncIterator[Peer]:
    """A started :class:`Peer`, closed (gracefully) on exit."""
    peer = Peer(identity, verifier, config=config)
    await peer.start(host, port, sock=sock, listen=listen)
    try:
        yield peer
    finally:
        await peer.close()


__all__ = ["Peer", "PeerConfig", "Session", "open_peer", "KeyVerifier"]

