"""The asyncio driver of XEP-0174 link-local streams: a TCP listener, the
streams it serves and the ones this device opens.

:class:`LinkLocal` listens on a TCP port (announced as ``_presence._tcp`` by
the device's :class:`~dtx.aio.mdns.LanAdvertiser`), admits connections
within per-IP and total bounds (:func:`dtx.proto.linklocal.admit`), runs one
sans-IO :class:`dtx.proto.linklocal.LinkLocalStream` per connection and
hands the opened ones to :meth:`LinkLocal.accept`. Outgoing,
:meth:`LinkLocal.connect` reaches a ``_presence._tcp`` peer, unless that
peer is also a dtx device with a trusted key: then it returns the
authenticated :class:`~dtx.aio.session.Session` of the device's ``Peer``.

A :class:`LinkLocalStream` is *not* a :class:`~dtx.aio.session.Session`:
its ``peer_name`` is whatever the peer claimed (``authenticated`` is always
False), nothing on it is encrypted, and its stanzas never enter a session,
whatever JID they claim. Applications that act on a stanza's sender check
which of the two they hold.

The driver only moves bytes: data in goes to ``receive_data``, what
``data_to_send`` returns is written, the one timer is re-armed at
``get_timer``. Reading stops while the application leaves more than
``receive_buffer_bytes`` unread (TCP then pushes back on the sender).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ClassVar, Literal, Protocol, cast
from xml.etree.ElementTree import Element

from zeroconf import InterfaceChoice, IPVersion
from zeroconf.asyncio import AsyncZeroconf

from ..errors import ConnectError, DtxError, LinkLocalError, SessionClosedError, StreamError
from ..identity import fingerprint as fingerprint_of
from ..identity import parse_fingerprint
from ..jid import JID
from ..logs import LogLimiter
from ..proto import linklocal as ll
from ..proto.caps import Caps, caps_for
from .mdns import Interfaces, LanAdvertiser, LanBrowser, PresenceAnnouncement, \
    presence_instance_name
from .presence import PresenceBrowser, PresenceRecord, twin_of
from .session import Session

__all__ = ["LinkLocal", "LinkLocalStatistics", "LinkLocalStream"]

logger = logging.getLogger(__name__)

Address = tuple[str, int]

DISCOVERY_TIMEOUT = 1.5
"""How long :meth:`LinkLocal.connect` waits for the peer's mDNS records."""


class DtxPeer(Protocol):
    """What :meth:`LinkLocal.connect` needs of the device's ``Peer``."""

    verifier: Any

    async def connect(self, jid: str, addr: Address | None = None, *,
                      timeout: float | None = None) -> Session: ...


class LinkLocalStream:
    """One XEP-0174 stream as the application sees it: unauthenticated.

    ``peer_name`` is the name the peer *claims* (its stream header's
    ``from``, or the instance dialled); every stanza's ``from`` is that
    name. Nothing here was proved: never treat it as the JID's verified
    identity. An async context manager that closes on exit.
    """

    authenticated: ClassVar[Literal[False]] = False

    def __init__(self, owner: LinkLocal, core: ll.LinkLocalStream, *, incoming: bool) -> None:
        self._owner = owner
        self._core = core
        self.incoming = incoming
        self.address: Address = ("", 0)
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._stanzas: deque[tuple[Element, int]] = deque()
        self._unread_bytes = 0
        self._paused = False
        self._readable = asyncio.Event()
        self._opened: asyncio.Future[None] = self._loop.create_future()
        self._closed: asyncio.Future[ll.LinkLocalEnded] = self._loop.create_future()
        self._timer: asyncio.TimerHandle | None = None
        self._lingering = False
        self._evicted = False
        self.id = next(_ids)

    def __repr__(self) -> str:
        return (f"LinkLocalStream(claimed={self.peer_name!r}, address={self.address!r}, "
                f"authenticated=False)")

    # -- properties -----------------------------------------------------------

    @property
    def peer_name(self) -> str:
        """The name the peer claims; unverified."""
        return self._core.peer_name or ""

    @property
    def local_name(self) -> str:
        return self._core.local_name

    @property
    def is_open(self) -> bool:
        return self._core.is_open

    def statistics(self) -> ll.LinkLocalStatistics:
        return ll.LinkLocalStatistics(**vars(self._core.statistics))

    # -- the application's calls ----------------------------------------------

    def send(self, stanza: Element) -> None:
        """Write ``stanza`` (``from`` this device's instance name, ``to`` the
        peer unless set). Unencrypted, unacknowledged. Raises
        :class:`SessionClosedError`, :class:`~dtx.errors.StanzaTooLargeError`
        or, while the peer does not read, :class:`~dtx.errors.SendBufferFullError`."""
        transport = self._transport
        if transport is None or transport.is_closing():
            raise SessionClosedError("link-local stream closed")
        room = self._core.config.send_buffer_bytes - transport.get_write_buffer_size()
        self._core.send(stanza, room=room)
        self._transmit()

    async def receive(self) -> Element:
        """The next stanza; :class:`SessionClosedError` once the stream has
        ended and every stanza was read."""
        while not self._stanzas:
            if self._closed.done():
                ended = self._closed.result()
                raise SessionClosedError(
                    f"link-local stream closed: {ended.error}" if ended.error
                    else "link-local stream closed")
            self._readable.clear()
            await self._readable.wait()
        return self._take()

    def receive_nowait(self) -> Element | None:
        return self._take() if self._stanzas else None

    def __aiter__(self) -> AsyncIterator[Element]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Element]:
        while True:
            try:
                yield await self.receive()
            except SessionClosedError:
                return

    async def close(self, timeout: float | None = 5.0) -> ll.LinkLocalEnded:
        """``</stream:stream>``, then wait for the peer's (or the connection's end)."""
        if not self._closed.done():
            self._core.close(self._loop.time())
            self._transmit()
            try:
                async with asyncio.timeout(timeout):
                    await asyncio.shield(self._closed)
            except TimeoutError:
                self.abort("close timed out")
        return await asyncio.shield(self._closed)

    def abort(self, reason: str = "aborted") -> None:
        self._core.abort(reason)
        self._transmit()

    async def wait_closed(self) -> ll.LinkLocalEnded:
        return await asyncio.shield(self._closed)

    async def __aenter__(self) -> LinkLocalStream:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    # -- the driver -------------------------------------------------------------

    def _take(self) -> Element:
        el, size = self._stanzas.popleft()
        self._unread_bytes -= size
        transport = self._transport
        if (self._paused and transport is not None
                and self._unread_bytes <= self._core.config.receive_buffer_bytes // 4):
            self._paused = False
            transport.resume_reading()
        return el

    def _attach(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.address = (str(peer[0]), int(peer[1]))
        self._transmit()

    def _received(self, data: bytes) -> None:
        self._core.receive_data(data, self._loop.time())
        self._transmit()

    def _lost(self) -> None:
        self._core.receive_data(b"", self._loop.time())
        self._transmit()
        self._transport = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _transmit(self) -> None:
        core, transport = self._core, self._transport
        data = core.data_to_send()
        if data and transport is not None and not transport.is_closing():
            transport.write(data)
        while (ev := core.next_event()) is not None:
            if isinstance(ev, ll.LinkLocalStanzaReceived):
                self._stanzas.append((ev.stanza, ev.size))
                self._unread_bytes += ev.size
                self._readable.set()
                if (transport is not None and not self._paused
                        and self._unread_bytes > core.config.receive_buffer_bytes):
                    self._paused = True
                    transport.pause_reading()
            elif isinstance(ev, ll.LinkLocalOpened):
                if not self._opened.done():
                    self._opened.set_result(None)
                self._owner._opened(self)
            else:
                self._ended(ev)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if core.closed:
            if transport is not None and not self._lingering:
                self._linger(transport)
            return
        when = core.get_timer()
        if when is not None:
            self._timer = self._loop.call_at(when, self._on_timer)

    def _linger(self, transport: asyncio.Transport) -> None:
        """End the connection without losing the last words: FIN after what
        was written, then read (and drop) until the peer closes, at most
        ``close_timeout``. Closing with unread input would reset the
        connection, and a peer still sending would never see its stream
        error."""
        self._lingering = True
        if self._paused:
            self._paused = False
            transport.resume_reading()
        if transport.can_write_eof():
            transport.write_eof()
            self._timer = self._loop.call_later(self._core.config.close_timeout,
                                                transport.abort)
        else:
            transport.close()

    def _on_timer(self) -> None:
        self._timer = None
        self._core.handle_timer(self._loop.time())
        self._transmit()

    def _ended(self, ev: ll.LinkLocalEnded) -> None:
        if not self._opened.done():
            self._opened.set_exception(ev.error or SessionClosedError("stream ended"))
            self._opened.exception()
        if not self._closed.done():
            self._closed.set_result(ev)
        self._readable.set()
        self._owner._ended(self, ev)


_ids = itertools.count(1)


class _Connection(asyncio.Protocol):
    """asyncio's callbacks for one TCP connection, handed to its stream."""

    def __init__(self, owner: LinkLocal, stream: LinkLocalStream | None) -> None:
        self._owner = owner
        self.stream = stream

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A TCP transport; not checked with isinstance: uvloop's is not a
        # subclass of asyncio.Transport (nor of BaseTransport), only alike.
        tcp = cast(asyncio.Transport, transport)
        if self.stream is None:  # incoming: admission decides
            self.stream = self._owner._admit(tcp)
            if self.stream is None:
                return
        self.stream._attach(tcp)

    def data_received(self, data: bytes) -> None:
        if self.stream is not None:
            self.stream._received(data)

    def eof_received(self) -> bool:
        if self.stream is not None:
            self.stream._received(b"")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.stream is not None:
            self.stream._lost()


@dataclass(frozen=True)
class LinkLocalStatistics:
    """A snapshot of the listener: live streams (incoming, outgoing) and counters."""

    incoming: int
    outgoing: int
    counters: dict[str, int]


class LinkLocal:
    """XEP-0174 on the LAN for one device: a TCP listener for the XMPP
    clients people have (Pidgin's Bonjour ...), and outgoing streams to them.

    ``jid`` and ``fingerprint`` name the device (its instance name is
    ``user@machine`` as :func:`~dtx.aio.mdns.presence_instance_name` makes
    it); ``features`` are the application's disco#info features
    (``SessionConfig.features``), from which the XEP-0115 ``ver`` is made.
    ``peer`` is the device's ``Peer``: with it, :meth:`connect` prefers the
    authenticated path.
    """

    def __init__(self, jid: str, fingerprint: str, config: ll.LinkLocalConfig | None = None, *,
                 features: Sequence[str] = (), rng: random.Random | None = None,
                 peer: DtxPeer | None = None,
                 interfaces: Interfaces = InterfaceChoice.All) -> None:
        self.config = config or ll.LinkLocalConfig()
        parsed = JID.parse(jid)
        self.jid = parsed.full
        self.name = presence_instance_name(self.jid, fingerprint)
        """This device's XEP-0174 instance name (its ``from``)."""
        self.caps: Caps = caps_for(features, node=self.config.caps_node)
        self._features = tuple(features)
        self._accept_names = (self.jid, parsed.bare.full)
        self._rng = rng or random.Random(random.SystemRandom().getrandbits(64))
        self._peer = peer
        self._interfaces = interfaces
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._streams: dict[int, LinkLocalStream] = {}  # incoming, oldest first
        self._outgoing: dict[int, LinkLocalStream] = {}
        self._incoming: deque[LinkLocalStream] = deque()
        self._incoming_ready = asyncio.Event()
        self._status = "avail"
        self._msg: str | None = None
        self._advertiser: LanAdvertiser | None = None
        self._zc: AsyncZeroconf | None = None
        self._devices: LanBrowser | None = None
        self._presences: PresenceBrowser | None = None
        self._log = LogLimiter(logger)
        self.counters: dict[str, int] = {
            "accepted": 0, "refused_per_ip": 0, "refused_total": 0, "evicted": 0,
            "refused_backlog": 0, "stream_errors": 0, "header_timeouts": 0, "opened": 0,
            "outgoing": 0, "preferred_dtx": 0}

    # -- lifecycle ---------------------------------------------------------------

    @property
    def port(self) -> int:
        """The listening TCP port (0 before :meth:`start` or without a listener)."""
        if self._server is None or not self._server.sockets:
            return 0
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self, host: str = "0.0.0.0", *, listen: bool = True) -> None:
        """Bind the listener on ``host`` (``config.host`` wins) at
        ``config.port``, if ``listen``; start browsing the LAN for outgoing
        streams if ``config.outgoing``."""
        self._loop = asyncio.get_running_loop()
        if listen:
            self._server = await self._loop.create_server(
                lambda: _Connection(self, None), self.config.host or host, self.config.port,
                reuse_address=True)  # the kernel's backlog: asyncio's 100; admission is ours
            logger.info("XEP-0174 listener for %s on TCP port %d", self.name, self.port)
        if self.config.outgoing:
            self._zc = AsyncZeroconf(interfaces=(self._interfaces if isinstance(
                self._interfaces, InterfaceChoice) else list(self._interfaces)),
                ip_version=IPVersion.V4Only)
            self._devices = await LanBrowser(zeroconf=self._zc).__aenter__()
            self._presences = await PresenceBrowser(zeroconf=self._zc).__aenter__()

    def presence(self) -> PresenceAnnouncement:
        """What the ``_presence._tcp`` record says now: the listener's port,
        status, nick and caps. Raises :class:`LinkLocalError` without a
        running listener (the record would promise a stream nobody serves)."""
        if self.port == 0:
            raise LinkLocalError("no XEP-0174 listener runs: nothing to announce")
        return PresenceAnnouncement(port=self.port, nick=self.config.nick, status=self._status,
                                    msg=self._msg, caps=self.caps)

    def attach(self, advertiser: LanAdvertiser) -> None:
        """The advertiser announcing :meth:`presence`, kept current by
        :meth:`set_status`."""
        self._advertiser = advertiser

    async def set_status(self, status: str, msg: str | None = None) -> None:
        """The XEP-0174 ``status`` (``avail``, ``away``, ``dnd``) and ``msg``,
        announced at once (raises :class:`~dtx.errors.DiscoveryError` for
        another status)."""
        old = (self._status, self._msg)
        self._status, self._msg = status, msg
        try:
            announcement = self.presence()
            announcement.txt(self.jid)  # checks the values
            if self._advertiser is not None:
                await self._advertiser.update_presence(announcement)
        except DtxError:
            self._status, self._msg = old
            raise

    async def close(self) -> None:
        """Stop listening, close every stream (gracefully, briefly), stop browsing."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        streams = [*self._streams.values(), *self._outgoing.values()]
        if streams:
            await asyncio.gather(*(s.close(timeout=self.config.close_timeout)
                                   for s in streams), return_exceptions=True)
        for browser in (self._presences, self._devices):
            if browser is not None:
                await browser.__aexit__(None, None, None)
        self._presences = self._devices = None
        zc, self._zc = self._zc, None
        if zc is not None:
            await zc.async_close()
        if server is not None:
            await server.wait_closed()
        self._incoming_ready.set()

    async def __aenter__(self) -> LinkLocal:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    def statistics(self) -> LinkLocalStatistics:
        return LinkLocalStatistics(len(self._streams), len(self._outgoing), dict(self.counters))

    def streams(self) -> list[LinkLocalStream]:
        """Every live stream, incoming then outgoing."""
        return [*self._streams.values(), *self._outgoing.values()]

    # -- incoming -----------------------------------------------------------------

    async def accept(self) -> LinkLocalStream:
        """The next stream a XEP-0174 peer opened (headers exchanged).
        Raises :class:`LinkLocalError` once the listener is closed."""
        while not self._incoming:
            if self._server is None:
                raise LinkLocalError("the XEP-0174 listener is closed")
            self._incoming_ready.clear()
            await self._incoming_ready.wait()
        return self._incoming.popleft()

    def _new_core(self, now: float, peer_name: str | None = None) -> ll.LinkLocalStream:
        return ll.LinkLocalStream(local_name=self.name, config=self.config,
                                  rng=random.Random(self._rng.getrandbits(64)), now=now,
                                  peer_name=peer_name, accept_names=self._accept_names,
                                  features=self._features, logger=logger)

    def _admit(self, transport: asyncio.Transport) -> LinkLocalStream | None:
        loop = asyncio.get_running_loop()
        peer = transport.get_extra_info("peername")
        ip = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
        decision = ll.admit([(s.id, s.address[0], s._core.state is not ll.LinkLocalState.HEADER)
                             for s in self._streams.values()], ip,
                            max_total=self.config.max_connections,
                            max_per_ip=self.config.max_connections_per_ip)
        if len(self._incoming) >= self.config.max_connections:
            self._purge_backlog()
        if decision.admitted and len(self._incoming) >= self.config.max_connections:
            decision = ll.Admission(False, reason="backlog")
        for victim in decision.evict:
            stream = self._streams.get(victim)
            if stream is not None:
                self.counters["evicted"] += 1
                self._log.warning("evicted", stream.address[0],
                                  "XEP-0174: dropping a connection from %s still sending its "
                                  "header, to make room", stream.address[0])
                stream._evicted = True
                stream._core.refuse("resource-constraint", "too many connections")
                stream._transmit()
        if not decision.admitted:
            self.counters[f"refused_{decision.reason.replace('-', '_')}"] += 1
            self._log.warning("refused", ip, "XEP-0174: refusing a connection from %s (%s bound)",
                              ip, decision.reason)
            core = self._new_core(loop.time())
            core.refuse("resource-constraint", f"too many connections ({decision.reason})")
            transport.write(core.data_to_send())
            if transport.can_write_eof():  # the same lingering close as a stream's
                transport.write_eof()
                loop.call_later(self.config.close_timeout, transport.abort)
            else:
                transport.close()
            return None
        stream = LinkLocalStream(self, self._new_core(loop.time()), incoming=True)
        self._streams[stream.id] = stream
        self.counters["accepted"] += 1
        return stream

    def _purge_backlog(self) -> None:
        """Forget accepted-but-untaken streams that ended with nothing unread."""
        self._incoming = deque(s for s in self._incoming
                               if not (s._closed.done() and not s._stanzas))

    def _opened(self, stream: LinkLocalStream) -> None:
        self.counters["opened"] += 1
        if stream.incoming:
            logger.info("XEP-0174 stream from %s, claiming %r (unauthenticated)",
                        stream.address[0], stream.peer_name)
            self._incoming.append(stream)
            self._incoming_ready.set()

    def _ended(self, stream: LinkLocalStream, ev: ll.LinkLocalEnded) -> None:
        self._streams.pop(stream.id, None)
        self._outgoing.pop(stream.id, None)
        error = ev.error
        if stream._evicted:
            return  # counted and logged when it was dropped
        if isinstance(error, StreamError):
            self.counters["stream_errors"] += 1
            if error.condition == "connection-timeout":
                self.counters["header_timeouts"] += 1
            self._log.warning(f"stream-error-{error.condition}", stream.address[0],
                              "XEP-0174 stream from %s (claiming %r) ended: %s",
                              stream.address[0], stream.peer_name, error)
        else:
            logger.info("XEP-0174 stream with %r ended%s", stream.peer_name,
                        "" if error is None else f": {error}")

    # -- outgoing -------------------------------------------------------------------

    async def open_stream(self, name: str, address: Address, *,
                          timeout: float = 10.0) -> LinkLocalStream:
        """Open a XEP-0174 stream to instance ``name`` at ``address``, without
        any discovery; returns once both headers are exchanged. Raises
        :class:`ConnectError` (no answer, refused) or the stream's error."""
        loop = asyncio.get_running_loop()
        stream = LinkLocalStream(self, self._new_core(loop.time(), peer_name=name),
                                 incoming=False)
        self._outgoing[stream.id] = stream
        try:
            async with asyncio.timeout(timeout):
                await loop.create_connection(lambda: _Connection(self, stream), *address)
                await asyncio.shield(stream._opened)
        except TimeoutError:
            stream.abort("timed out")
            raise ConnectError(f"no XEP-0174 stream with {name} at {address[0]}:{address[1]} "
                               f"within {timeout:.1f} s") from None
        except OSError as exc:
            stream.abort(str(exc))
            self._outgoing.pop(stream.id, None)
            raise ConnectError(f"cannot reach {name} at {address[0]}:{address[1]}: "
                               f"{exc.strerror or exc}") from None
        self.counters["outgoing"] += 1
        return stream

    async def connect(self, target: str, *, timeout: float = 10.0) -> Session | LinkLocalStream:
        """Reach ``target`` on the LAN: an instance name (``alice@laptop``) or
        the JID a ``_presence._tcp`` record names.

        When the same peer also announces ``_dtx._udp`` with a key trusted
        for its JID, the answer is the authenticated :class:`Session` that
        the device's ``Peer`` opens: the XEP-0174 stream is only for peers
        that have nothing better. Otherwise a :class:`LinkLocalStream`
        (unauthenticated). Needs ``config.outgoing``; raises
        :class:`LinkLocalError` (no record), :class:`ConnectError`."""
        presences, devices = self._presences, self._devices
        if presences is None or devices is None:
            raise LinkLocalError("outgoing XEP-0174 streams are off (LinkLocalConfig.outgoing)")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        record = await presences.wait_for(target, timeout=min(DISCOVERY_TIMEOUT, timeout))
        session = await self._dtx_twin(target, record, devices, deadline)
        if session is not None:
            return session
        if record is None:
            raise LinkLocalError(f"no _presence._tcp record for {target!r} on the LAN")
        error: ConnectError | None = None
        for address in record.addresses:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                return await self.open_stream(record.instance, address, timeout=remaining)
            except ConnectError as exc:
                error = exc
        raise error or ConnectError(f"no XEP-0174 stream with {target} in time")

    async def _dtx_twin(self, target: str, record: PresenceRecord | None, devices: LanBrowser,
                        deadline: float) -> Session | None:
        """The Session with the dtx device behind ``target``, when it has a
        trusted key on the LAN; None when there is none."""
        peer = self._peer
        if peer is None:
            return None
        names = [n for n in (record.jid if record else None, target) if n]
        loop = asyncio.get_running_loop()
        for name in names:
            try:
                account = JID.parse(name).bare.full
            except DtxError:
                continue
            trusted_keys = getattr(peer.verifier, "trusted_keys", None)
            try:
                keys = trusted_keys(account) if trusted_keys is not None else None
            except DtxError as exc:  # an unreadable trust source: nothing trusted here
                logger.info("no trusted keys for %s: %s", account, exc)
                keys = None
            trusted = [fingerprint_of(k) for k in keys or ()]
            if not trusted:
                continue
            found = await devices.wait_records(name, timeout=min(
                DISCOVERY_TIMEOUT, max(0.0, deadline - loop.time())), trusted=trusted)
            if record is not None:
                twin = twin_of(record, found, trusted)
            else:  # no XEP-0174 record: a dtx device asked for by its JID
                wanted = {parse_fingerprint(fp) for fp in trusted}
                twin = next((r for r in found if parse_fingerprint(r.fingerprint) in wanted),
                            None)
            if twin is not None:
                self.counters["preferred_dtx"] += 1
                logger.info("%s is the dtx device %s with a trusted key: using dtx, "
                            "not XEP-0174", target, twin.jid)
                return await peer.connect(twin.jid, timeout=max(0.1, deadline - loop.time()))
        return None
