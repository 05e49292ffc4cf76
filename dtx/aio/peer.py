"""The asyncio driver of a device: one UDP socket, one timer, ``transmit()``.

A :class:`Peer` runs one :class:`~dtx.proto.endpoint.Endpoint` (the
sans-IO device: sessions, admission, keepalives, traversal) on one UDP
socket, in the manner of aioquic's ``QuicConnectionProtocol``: datagrams in
go to :meth:`Endpoint.receive_datagram`; after each batch of them, and once
per event-loop iteration after the application queued something,
``_transmit`` sends what :meth:`Endpoint.datagrams_to_send` returns, hands
the endpoint's events to the :class:`Session` objects and waiters, and
re-arms the one timer at :meth:`Endpoint.get_timer`. Transmissions are
coalesced: ``Session.send`` only queues, so a burst of stanzas leaves in as
few QUIC packets as fit.

What only a driver can do stays here: the socket, the clock, mDNS on the
LAN (``dtx.aio.mdns``), and the waiting.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

from .. import _lazy
from ..errors import AuthenticationError, ConnectError, DtxError, TrustError
from ..identity import DeviceIdentity, fingerprint
from ..jid import JID, jid_matches
from ..proto import endpoint as ep
from ..proto.linklocal import LinkLocalConfig
from ..proto.paths import PathConfig, PathKind
from ..proto.portmap import PortMapClient, PortMapConfig, PortMapEvent, PortMapState, ProbeFailed
from ..proto.sessiontypes import SessionConfig, SessionEnded
from ..proto.traversal import Link, Traversal, TraversalConfig
from .netif import default_gateway, host_candidates, source_ip_towards
from .session import Session
from .socket import UdpSocket
from .upnp import UpnpConfig, UpnpMapper, in_this_network_namespace
from ..wire.address import Address

if TYPE_CHECKING:
    from .linklocal import LinkLocal

logger = logging.getLogger(__name__)

PORT_MAPPING_CLOSE_TIMEOUT = 1.0
"""How long closing a device waits for its router to confirm that the port
mapping is deleted (it expires by itself otherwise)."""


_GAVE_UP = frozenset({PortMapState.IDLE, PortMapState.CLOSING, PortMapState.CLOSED})
"""Port-mapping states with no mapping to wait for (IDLE: it failed)."""


def _closed(portmap: PortMapClient) -> bool:
    return portmap.state is PortMapState.CLOSED



class KeyVerifier(Protocol):
    """Decides whether ``key`` may speak for ``jid`` (raises TrustError)."""

    def verify(self, jid: str, key: bytes) -> None: ...


@dataclass(frozen=True, kw_only=True)
class PeerConfig:
    """Options of a :class:`Peer`. Times in seconds."""

    session: SessionConfig = SessionConfig()
    idle_timeout: float = 30.0
    resume_timeout: float | None = 120.0
    """A session whose connection dies (the peer stopped answering) waits
    this long to be resumed on a new QUIC connection, nothing lost or
    doubled (docs/protocol.md 3.5); None: it ends at once, its
    unacknowledged stanzas handed back (an application with another way
    to the peer, as the slixmpp plugin has the server, wants that)."""
    connect_timeout: float = 10.0
    """The default deadline of :meth:`Peer.connect`, for the whole call."""
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
    traversal: TraversalConfig | None = None
    """Traversal tunables; ``paths`` above is used in it when this is None."""
    lan: bool = False
    """Use the LAN: advertise this device over mDNS/DNS-SD when listening,
    and look for the peer there first when connecting by JID."""
    lan_timeout: float = 1.5
    """How long connect() waits for an mDNS answer before going on."""
    link_local: LinkLocalConfig | None = None
    """Also speak XEP-0174 on the LAN (with ``lan``): a TCP listener for the
    XMPP clients people have (Pidgin's Bonjour), announced as
    ``_presence._tcp`` only while it runs. Its streams are unauthenticated:
    they come from ``Peer.link_local.accept()`` as ``LinkLocalStream``,
    never as a Session (docs/lan-discovery.md). None: no listener, no record."""
    receive_buffer_bytes: int = 4 * 1024 * 1024
    """Received stanzas the application has not read yet, in bytes, beyond
    which the session stops granting the sender QUIC credit (it resumes
    below a quarter of it): memory stays bounded, nothing is dropped."""
    max_datagram_size: int = 1200
    """Largest UDP payload QUIC sends (RFC 9000's safe minimum by default;
    1452 fits an Ethernet path with room for dtx's 5-byte relay header and
    cuts per-packet work by a sixth, where the path is known to carry it).
    It also bounds the DATAGRAM frames this device accepts."""
    max_received_datagrams: int = 256
    """Unreliable-channel stanzas held for the application per session;
    past it the oldest is dropped (counted in ``statistics()``)."""
    keepalive_interval: float = 10.0
    """A session quiet for this long sends a QUIC PING (keeps the session,
    and the NAT bindings on its path, alive; well inside idle_timeout)."""
    max_half_open: int = 256
    """Bound on handshakes from remote devices still in progress; when it is
    reached the oldest one of the source IP holding the most is dropped to
    make room, so a flood of Initials from a few addresses delays, but
    cannot lock out, a device whose handshake takes one round trip."""
    max_half_open_per_ip: int = 16
    """Bound on handshakes in progress from one source IP; at the bound the
    oldest from that IP is dropped to make room (a home's devices share
    one IP: a trickle of Initials from it cannot lock them out)."""
    handshake_timeout: float = 10.0
    """A handshake from a remote device still in progress after this long is
    dropped (on a timer)."""
    port_mapping: bool = False
    """Ask the home router to forward a public port to this device's socket
    (PCP, NAT-PMP: :mod:`dtx.proto.portmap`, from the socket itself; when
    they give up, UPnP IGD: :mod:`dtx.aio.upnp`, with async-upnp-client)
    and offer it as a candidate to the rendezvous and in Jingle: with a
    mapping on either side, any pair of NATs goes direct
    (docs/nat-traversal.md). Renewed at half its lifetime, deleted on close."""
    gateway: str | None = None
    """The router to ask for the port mapping (default: the default
    route's gateway)."""
    port_mapping_config: PortMapConfig = PortMapConfig()
    """The port-mapping client's tunables (lifetime, retransmissions)."""
    upnp_config: UpnpConfig = UpnpConfig()
    """UPnP IGD's tunables (lease, discovery time), when it is tried."""
    side_sockets: Callable[[], socket.socket] | None = None
    """Opens one extra UDP socket, bound (any port), for a birthday search
    (``TraversalConfig.birthday``; up to ``BirthdayConfig.sockets`` at
    once). Default: bound to the device socket's IP in this process
    (a socket made in another network namespace needs its own)."""

    def endpoint_config(self) -> ep.EndpointConfig:
        """The sans-IO endpoint's share of these options."""
        return ep.EndpointConfig(
            session=self.session,
            idle_timeout=self.idle_timeout,
            datagrams=self.datagrams,
            max_connections=self.max_connections,
            receive_buffer_bytes=self.receive_buffer_bytes,
            max_datagram_size=self.max_datagram_size,
            keepalive_interval=self.keepalive_interval,
            max_half_open=self.max_half_open,
            max_half_open_per_ip=self.max_half_open_per_ip,
            handshake_timeout=self.handshake_timeout,
            resume_timeout=self.resume_timeout,
            traversal=self.traversal or TraversalConfig(paths=self.paths),
        )


@dataclass(frozen=True)
class PeerStatistics:
    """A snapshot of a device's counters."""

    sessions: int
    half_open: int
    links: int
    registered: bool
    counters: dict[str, int]
    send_errors: int
    packets_sent: int = 0
    """UDP datagrams sent from the device's socket (and a birthday
    search's), all kinds together."""
    packets_received: int = 0


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
        self._rng = rng or random.Random(random.SystemRandom().getrandbits(64))
        self._socket: UdpSocket | None = None
        self._side: dict[int, UdpSocket] = {}
        """Extra sockets of birthday searches, by the endpoint's ids."""
        self._endpoint: ep.Endpoint | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._transmit_scheduled = False
        self._advertiser: Any = None
        self._browser: Any = None
        self.link_local: LinkLocal | None = None
        """The XEP-0174 listener (``PeerConfig.link_local``), once started."""
        self._sessions: dict[ep.Connection, Session] = {}
        self._incoming: asyncio.Queue[Session] = asyncio.Queue(self.config.accept_backlog)
        self._state_changed = asyncio.Event()
        self._introductions: dict[str, asyncio.Future[Link]] = {}
        self.refusals: deque[tuple[Address, DtxError]] = deque(maxlen=64)
        """The latest handshakes this peer refused or was refused in, newest last."""
        self._listeners: list[Callable[[object], None]] = []
        self._upnp: UpnpMapper | None = None
        self._upnp_timer: asyncio.TimerHandle | None = None
        """UPnP IGD's mapping, when PCP and NAT-PMP gave up (``port_mapping``)."""
        self._upnp_here = True

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
            self._socket = UdpSocket(sock, self._datagram_received, self._batch_done)
        else:
            self._socket = UdpSocket.bind(host, port, self._datagram_received, self._batch_done)
        cfg = self.config
        server = cfg.rendezvous
        candidates: list[Address] = []
        if server is not None:
            bound = self._socket.address
            candidates = ([(a, bound[1]) for a in cfg.host_addresses]
                          if cfg.host_addresses is not None
                          else host_candidates(bound, server))
        self._endpoint = ep.Endpoint(
            self.identity, self.verifier.verify, rng=random.Random(self._rng.getrandbits(64)),
            config=cfg.endpoint_config(), listen=listen, rendezvous=server,
            host_candidates=candidates)
        self._endpoint.start(self._now())
        if cfg.port_mapping:
            self._start_port_mapping()
            self._upnp_fallback(sock)
        self._transmit()
        # The first datagrams are out: the QUIC engine loads while they
        # travel (a cold command's handshake is two round trips away).
        _lazy.load_in_background()
        if cfg.lan:
            await self._start_lan(listen)

    def _start_port_mapping(self) -> None:
        """Ask the router (``PeerConfig.gateway``, or the default route's)
        for a mapping of this socket, from this socket (the endpoint's)."""
        assert self._socket is not None and self._endpoint is not None
        cfg = self.config
        gateway = cfg.gateway or default_gateway()
        if gateway is None:
            logger.warning("no port mapping: no default gateway to ask")
            return
        bound = self._socket.address
        client_ip = self._mapping_client_ip() or source_ip_towards(
            (gateway, cfg.port_mapping_config.gateway_port))
        if client_ip is None:
            logger.warning("no port mapping: no route to the gateway %s", gateway)
            return
        try:
            client = PortMapClient(gateway, client_ip=client_ip, internal_port=bound[1],
                                   rng=random.Random(self._rng.getrandbits(64)),
                                   config=cfg.port_mapping_config)
        except (DtxError, ValueError) as exc:
            logger.warning("no port mapping: %s", exc)
            return
        self._endpoint.use_port_mapping(client, self._now())

    def _mapping_client_ip(self) -> str | None:
        """The address a router maps this socket for: the one it is bound
        to, else the first host address configured; None: the route to
        the gateway decides."""
        assert self._socket is not None
        bound = self._socket.address[0]
        if bound not in ("0.0.0.0", "::", ""):
            return bound
        hosts = self.config.host_addresses
        return hosts[0] if hosts else None

    async def _port_mapping_deleted(self) -> None:
        """Wait (bounded) for the router to confirm the delete of the port
        mapping, if there is one."""
        endpoint = self._endpoint
        portmap = None if endpoint is None else endpoint.portmap
        if portmap is None or _closed(portmap):
            return
        try:
            async with asyncio.timeout(PORT_MAPPING_CLOSE_TIMEOUT):
                while not _closed(portmap):
                    self._state_changed.clear()
                    await self._state_changed.wait()
        except TimeoutError:
            logger.info("port mapping: no answer to the delete from %s", portmap.gateway[0])

    async def wait_port_mapped(self, timeout: float) -> Address | None:
        """The port mapping once the router granted it (``port_mapping``),
        or None: none asked for, refused, or not within ``timeout``."""
        endpoint = self._started()
        try:
            async with asyncio.timeout(timeout):
                while self.port_mapped is None:
                    portmap = endpoint.portmap
                    if (portmap is None or portmap.state in _GAVE_UP) and not self._upnp_trying():
                        return None
                    self._state_changed.clear()
                    await self._state_changed.wait()
        except TimeoutError:
            return None
        return self.port_mapped

    # -- UPnP IGD, when PCP and NAT-PMP gave up -------------------------------------

    def _upnp_fallback(self, sock: socket.socket | None) -> None:
        """Try UPnP when PCP and NAT-PMP give up (their ProbeFailed), or at
        once when there is no PCP/NAT-PMP client. Not for a socket made in
        another network namespace than this thread's, where UPnP's own
        sockets (SSDP, HTTP) would search another LAN."""
        self._upnp_here = sock is None or in_this_network_namespace(sock) is not False
        if not self._upnp_here:
            logger.info("no UPnP port mapping: the socket is in another network namespace")
            return
        self._listeners.append(self._on_port_map_event)
        portmap = self._started().portmap
        if portmap is None:
            self._start_upnp()
            return

        def if_silent() -> None:
            stats = portmap.statistics()
            if stats.pcp_answers + stats.natpmp_answers == 0 and self.port_mapped is None:
                logger.info("the gateway answers neither PCP nor NAT-PMP; trying UPnP IGD too")
                self._start_upnp()

        self._upnp_timer = self._loop_().call_later(self.config.upnp_config.silent_after,
                                                    if_silent)

    def _on_port_map_event(self, event: object) -> None:
        if isinstance(event, ProbeFailed):
            logger.info("PCP and NAT-PMP gave up (%s); trying UPnP IGD", event.reason)
            self._start_upnp()

    def _start_upnp(self) -> None:
        if self._upnp is not None or self._socket is None or not self._upnp_here:
            return
        cfg = self.config
        mapper = UpnpMapper(self._socket.address[1], gateway=cfg.gateway,
                            client_ip=self._mapping_client_ip(),
                            config=cfg.upnp_config, rng=random.Random(self._rng.getrandbits(64)),
                            on_event=self._on_upnp_event)
        try:
            mapper.start()
        except DtxError as exc:
            logger.warning("no UPnP port mapping: %s", exc)
            return
        self._upnp = mapper

    def _on_upnp_event(self, event: PortMapEvent) -> None:
        if self._endpoint is not None:
            self._endpoint.port_mapping_changed(event, self._now())
        self._state_changed.set()
        self._wake()

    def _upnp_trying(self) -> bool:
        """A UPnP probe is under way (no mapping yet, no failure yet)."""
        return self._upnp is not None and not self._upnp.done

    async def _upnp_deleted(self) -> None:
        """Delete UPnP's mapping, if there is one (bounded)."""
        if self._upnp_timer is not None:
            self._upnp_timer.cancel()
            self._upnp_timer = None
        mapper, self._upnp = self._upnp, None
        if mapper is not None:
            await mapper.close(PORT_MAPPING_CLOSE_TIMEOUT)

    @property
    def port_mapped(self) -> Address | None:
        """The public address the router forwards to this device's socket
        (``PeerConfig.port_mapping``), while it does."""
        return None if self._endpoint is None else self._endpoint.traversal.port_mapped

    async def _start_lan(self, listen: bool) -> None:
        from .mdns import LanAdvertiser, LanBrowser

        assert self._socket is not None
        self._browser = LanBrowser()
        await self._browser.__aenter__()
        presence = None
        if self.config.link_local is not None:
            from .linklocal import LinkLocal

            self.link_local = LinkLocal(self.jid, self.identity.fingerprint,
                                        self.config.link_local, peer=self,
                                        features=self.config.session.features,
                                        rng=random.Random(self._rng.getrandbits(64)))
            await self.link_local.start(self._socket.address[0], listen=listen)
            if listen:
                presence = self.link_local.presence()
        if listen:
            self._advertiser = LanAdvertiser(self.jid, self.identity.fingerprint,
                                             self._socket.address[1], presence=presence)
            await self._advertiser.__aenter__()
            if self.link_local is not None:
                self.link_local.attach(self._advertiser)

    async def wait_registered(self, timeout: float | None = None) -> None:
        """Wait until the rendezvous accepted this device's registration.
        Raises :class:`AuthenticationError` if it refused this device (its
        key is not in the account's vCard, say), :class:`ConnectError` on
        no answer within ``timeout``."""
        endpoint = self._started()
        traversal = endpoint.traversal
        server = traversal.server
        if server is None:
            raise DtxError("no rendezvous configured")
        budget = self.config.connect_timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(budget):
                while not traversal.registered:
                    refusal = traversal.refusal
                    if refusal is not None and refusal[0] == 403:
                        raise AuthenticationError(
                            f"the rendezvous at {server[0]}:{server[1]} refused "
                            f"this device: {refusal[0]} {refusal[1]}")
                    self._state_changed.clear()
                    await self._state_changed.wait()
        except TimeoutError:
            raise ConnectError(
                f"no registration with the rendezvous at {server[0]}:{server[1]} "
                f"within {budget:.1f} s"
            ) from None

    @property
    def traversal(self) -> Traversal | None:
        """The sans-IO traversal (links; the registration when there is a
        rendezvous); None before :meth:`start`."""
        return None if self._endpoint is None else self._endpoint.traversal

    @property
    def endpoint(self) -> ep.Endpoint:
        return self._started()

    @property
    def address(self) -> Address:
        if self._socket is None:
            raise DtxError("peer not started")
        return self._socket.address

    @property
    def counters(self) -> dict[str, int]:
        """The endpoint's counters (live)."""
        return self._started().counters

    def statistics(self) -> PeerStatistics:
        stats = self._started().statistics()
        socks = ([] if self._socket is None else [self._socket]) + list(self._side.values())
        return PeerStatistics(stats.sessions, stats.half_open, stats.links, stats.registered,
                              stats.counters,
                              0 if self._socket is None else self._socket.send_errors,
                              packets_sent=sum(s.sent for s in socks),
                              packets_received=sum(s.received for s in socks))

    async def close(self) -> None:
        """Close every session gracefully, then the socket."""
        sessions = list(self._sessions.values())
        if sessions:
            await asyncio.gather(*(s.close(timeout=2.0) for s in sessions),
                                 return_exceptions=True)
        for mdns in (self._advertiser, self._browser):
            if mdns is not None:
                try:
                    await mdns.__aexit__(None, None, None)
                except Exception as exc:  # noqa: BLE001 - shutting down anyway
                    logger.debug("mDNS shutdown: %s", exc)
        self._advertiser = self._browser = None
        link_local, self.link_local = self.link_local, None
        if link_local is not None:  # after the goodbye of its record
            await link_local.close()
        if self._endpoint is not None:
            await self._upnp_deleted()
            self._endpoint.close(self._now())
            self._transmit()
            await self._port_mapping_deleted()
            for fut in self._introductions.values():
                if not fut.done():
                    fut.set_exception(ConnectError("peer closed"))
                    fut.exception()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for side in self._side.values():
            side.close()
        self._side.clear()
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def add_event_listener(self, listener: Callable[[object], None]) -> Callable[[], None]:
        """Also hand ``listener`` the endpoint events this driver does not
        consume itself (TURN events, registration events), as they come
        out; a source of introductions (``dtx.aio.xmpp``) reacts to its
        TURN allocation this way. Returns the function that removes it."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners \
            else None

    # -- sessions -------------------------------------------------------------------

    async def connect(
        self, jid: str, addr: Address | None = None, *, timeout: float | None = None
    ) -> Session:
        """Open a session with ``jid``, at ``addr`` or found by JID alone
        (the LAN first, then the rendezvous).

        ``timeout`` (default ``PeerConfig.connect_timeout``) is a deadline
        for the whole call. Returns once the peer's key is checked and
        trusted, which lets the first stanza leave in the same flight as
        the handshake's end. Raises :class:`~dtx.errors.TrustError` (a key
        this side refused), :class:`~dtx.errors.AuthenticationError` (the
        peer refused ours) or :class:`~dtx.errors.ConnectError`.
        """
        self._started()
        loop = self._loop_()
        budget = self.config.connect_timeout if timeout is None else timeout
        deadline = loop.time() + budget
        logger.info("connecting to %s%s, within %.1f s", jid,
                    "" if addr is None else f" at {addr[0]}:{addr[1]}", budget)
        if addr is not None:
            return await self._open(jid, deadline, address=addr)
        if self._browser is not None:
            session = await self._connect_lan(jid, deadline)
            if session is not None:
                return session
        if self.config.rendezvous is not None:
            await self._introduce(jid, deadline)
        elif self._started().traversal.link_for(jid) is None:
            # Links may come from other sources of introductions (XMPP).
            raise ConnectError(f"no address for {jid} and no rendezvous configured")
        return await self._open(jid, deadline)

    async def _introduce(self, jid: str, deadline: float) -> Link:
        loop = self._loop_()
        key = JID.parse(jid).full
        fut = self._introductions.get(key)
        if fut is None or fut.done():
            # Asked for before the registration is accepted: the request
            # rides in the REGISTER (one round trip less for a cold start).
            fut = loop.create_future()
            # (its error may reach the caller as the registration's instead)
            fut.add_done_callback(lambda f: f.cancelled() or f.exception())
            self._introductions[key] = fut
            self._started().introduce(key, self._now())
            self._wake()
        try:
            await self.wait_registered(max(0.0, deadline - loop.time()))
            async with asyncio.timeout_at(deadline):
                return await asyncio.shield(fut)
        except TimeoutError:
            raise ConnectError(f"no introduction to {jid} in time") from None
        finally:
            if self._introductions.get(key) is fut and fut.done():
                del self._introductions[key]

    async def _open(self, jid: str, deadline: float, *, address: Address | None = None,
                    path: PathKind = PathKind.DIRECT) -> Session:
        endpoint = self._started()
        conn = endpoint.connect(jid, self._now(), address=address, path=path)
        session = self._session_for(conn)
        self._wake()
        try:
            async with asyncio.timeout_at(deadline):
                await session.wait_handshake()
        except TimeoutError:
            where = f"{conn.address[0]}:{conn.address[1]}"
            conn.end(ConnectError(f"no answer from {jid} at {where}"))
            self._transmit()  # the session ends now, not at the next iteration
            raise ConnectError(f"no answer from {jid} at {where} in time") from None
        return session

    async def _connect_lan(self, jid: str, deadline: float) -> Session | None:
        """Try the devices announcing ``jid`` on the LAN, trusted keys first.

        A device whose key is refused is skipped (and logged), never trusted;
        when every LAN answer was refused and there is no rendezvous to try,
        the last refusal is raised."""
        loop = self._loop_()
        trusted_keys = getattr(self.verifier, "trusted_keys", None)
        keys = trusted_keys(jid) if trusted_keys is not None else None
        trusted = [fingerprint(k) for k in keys or ()]
        wait = min(self.config.lan_timeout, max(0.0, deadline - loop.time()))
        records = await self._browser.resolve(jid, timeout=wait, trusted=trusted)
        refusal: DtxError | None = None
        for record in records:
            for addr in record.addresses[:1]:
                if loop.time() >= deadline:
                    break
                try:
                    return await self._open(jid, deadline, address=addr, path=PathKind.LAN)
                except TrustError as exc:
                    logger.warning("LAN device %s at %s:%d refused: %s",
                                   record.instance, addr[0], addr[1], exc)
                    refusal = exc
                except ConnectError as exc:
                    logger.info("LAN device at %s:%d did not answer: %s", *addr, exc)
        if refusal is not None and self.config.rendezvous is None:
            raise refusal
        return None

    async def accept(self) -> Session:
        """The next session a remote device opened (keys checked both ways)."""
        return await self._incoming.get()

    def sessions(self) -> list[Session]:
        return list(self._sessions.values())

    # -- the driver ---------------------------------------------------------------

    def _started(self) -> ep.Endpoint:
        if self._endpoint is None:
            raise DtxError("peer not started")
        return self._endpoint

    def _loop_(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise DtxError("peer not started")
        return self._loop

    def _now(self) -> float:
        return self._loop_().time()

    def _session_for(self, conn: ep.Connection) -> Session:
        session = Session(conn, wake=self._wake,
                          max_datagrams=self.config.max_received_datagrams)
        self._sessions[conn] = session
        return session

    def _datagram_received(self, data: bytes, addr: Address) -> None:
        if self._endpoint is not None:
            self._endpoint.receive_datagram(data, addr, self._now())

    def _batch_done(self) -> None:
        """After a batch of datagrams: hand out their events now (waking the
        tasks that wait for them) and transmit once those tasks have run, so
        what they send at once (an answer, an echo) leaves in the same
        packets as the acknowledgements of the batch."""
        self._dispatch()
        self._wake()

    def _wake(self) -> None:
        """Transmit once this event-loop iteration is done (coalescing)."""
        if not self._transmit_scheduled and self._loop is not None:
            self._transmit_scheduled = True
            self._loop.call_soon(self._transmit)

    def _transmit(self) -> None:
        self._transmit_scheduled = False
        endpoint = self._endpoint
        if endpoint is None:
            return
        self._dispatch()
        now = self._now()
        sock = self._socket
        if sock is not None:
            sendto = sock.sendto
            for data, addr in endpoint.datagrams_to_send(now):
                sendto(data, addr)
            if self._side or endpoint.side_busy:
                self._transmit_side(endpoint, sock)
        self._dispatch()
        when = endpoint.get_timer()
        if when != self._timer_at or self._timer is None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._timer_at = when
            if when is not None and sock is not None:
                self._timer = self._loop_().call_at(when, self._on_timer)

    def _transmit_side(self, endpoint: ep.Endpoint, main: UdpSocket) -> None:
        """Open the extra sockets the endpoint names (on the main socket's
        local IP, any port), close the others, send what leaves from them."""
        side = self._side
        wanted = endpoint.side_sockets()
        for sid in [s for s in side if s not in wanted]:
            side.pop(sid).close()
        host = main.address[0]
        factory = self.config.side_sockets
        for sid in wanted:
            if sid in side:
                continue
            received = partial(self._side_received, sid)
            try:
                if factory is not None:
                    side[sid] = UdpSocket(factory(), received, self._batch_done)
                else:
                    side[sid] = UdpSocket.bind(host, 0, received, self._batch_done)
            except OSError as exc:  # out of descriptors or ports: search with fewer
                logger.warning("birthday search: could not open socket %d: %s", sid, exc)
                break
        for sid, data, addr in endpoint.side_datagrams_to_send():
            out = side.get(sid)
            if out is not None:
                out.sendto(data, addr)

    def _side_received(self, sid: int, data: bytes, addr: Address) -> None:
        if self._endpoint is not None:
            self._endpoint.receive_side_datagram(sid, data, addr, self._now())

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        if self._endpoint is not None:
            self._endpoint.handle_timer(self._now())
            self._transmit()

    def _dispatch(self) -> None:
        endpoint = self._endpoint
        if endpoint is None or not endpoint.has_events:
            return
        sessions = self._sessions
        per_session = _PER_SESSION
        stanza_received = ep.StanzaReceived
        while (ev := endpoint.next_event()) is not None:
            kind = type(ev)
            if kind is stanza_received:  # the hot path
                session = sessions.get(ev.connection)  # type: ignore[union-attr]
                if session is not None:
                    session.stanza_received(ev)  # type: ignore[arg-type]
            elif kind in per_session:
                session = sessions.get(ev.connection)  # type: ignore[union-attr]
                if session is not None:
                    session.handle_event(ev)
            elif isinstance(ev, ep.SessionOpened):
                self._on_opened(ev.connection, ev)
            elif isinstance(ev, ep.SessionEnded):
                ended = sessions.pop(ev.connection, None)
                if ended is not None:
                    ended.handle_event(ev)
            elif isinstance(ev, ep.PathChangedEvent):
                for conn in ev.connections:
                    target = sessions.get(conn)
                    if target is not None:
                        target.handle_event(ev)
            elif isinstance(ev, ep.HandshakeRefused):
                if ev.refused:
                    self.refusals.append((ev.address, ev.error))
            elif isinstance(ev, ep.IntroductionCompleted):
                for key, fut in list(self._introductions.items()):
                    if not fut.done() and jid_matches(key, ev.link.peer_jid):
                        fut.set_result(ev.link)
                self._state_changed.set()
            elif isinstance(ev, ep.IntroductionFailed):
                failed = self._introductions.get(_normal(ev.target))
                if failed is not None and not failed.done():
                    failed.set_exception(ConnectError(
                        f"the rendezvous could not introduce {ev.target}: {ev.code} {ev.reason}"))
                    failed.exception()
                self._state_changed.set()
            else:  # registration and TURN events
                for listener in self._listeners:
                    listener(ev)
                self._state_changed.set()

    def _on_opened(self, conn: ep.Connection, ev: ep.SessionOpened) -> None:
        session = self._sessions.get(conn)
        if session is not None:
            session.handle_event(ev)
            return
        session = self._session_for(conn)
        session.handle_event(ev)
        try:
            self._incoming.put_nowait(session)
        except asyncio.QueueFull:
            logger.warning("accept backlog full; closing session from %s", conn.peer_jid)
            session.abort()


_PER_SESSION = frozenset({ep.StanzasAcknowledged, ep.DatagramReceived, ep.HandshakeConfirmed,
                          ep.SessionSuspended, ep.SessionResumed})
"""Endpoint events that only the session of their connection needs
(StanzaReceived, the hot one, is tested for first)."""


def _normal(jid: str) -> str:
    try:
        return JID.parse(jid).full
    except DtxError:
        return jid


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


__all__ = ["Peer", "PeerConfig", "PeerStatistics", "Session", "SessionEnded", "open_peer",
           "KeyVerifier"]
