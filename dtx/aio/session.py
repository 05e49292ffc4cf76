"""A session as the application sees it: send, receive, close.

:class:`Session` holds the waiters and queues of one
:class:`~dtx.proto.endpoint.Connection` (the sans-IO session the device's
endpoint owns): the next stanza, an iq's answer, the acknowledgement of
everything sent, the end of the session. The :class:`~dtx.aio.peer.Peer`
that made it hands it the endpoint's events for its connection
(:meth:`Session.handle_event`); sending only queues, and ``wake`` asks the
peer to transmit once per event-loop iteration.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from types import TracebackType
from xml.etree.ElementTree import Element

from .. import stanza as st
from ..errors import DtxError, IqError, IqTimeout, SessionClosedError
from ..proto import endpoint as ep
from ..proto.paths import PathChanged, PathKind
from ..proto.sessiontypes import SessionEnded
from ..wire.address import Address

logger = logging.getLogger(__name__)

StanzaHandler = Callable[[Element], None]
_IQ = st.IQ
PathHandler = Callable[[PathChanged], None]


class Session:
    """One authenticated XML stream with a remote device.

    Obtained from :meth:`Peer.connect` or :meth:`Peer.accept`; an async
    context manager that closes it gracefully on exit.
    """

    def __init__(self, connection: ep.Connection, *, wake: Callable[[], None],
                 max_datagrams: int = 256) -> None:
        self.connection = connection
        self._wake = wake
        self._loop = asyncio.get_running_loop()
        self._stanzas: deque[tuple[Element, int]] = deque()
        self._datagrams: deque[Element] = deque()
        self._max_datagrams = max_datagrams
        self.datagrams_dropped = 0
        """Received datagrams dropped, oldest first, because the application
        did not read them and ``max_datagrams`` were waiting."""
        self.suspended = False
        """The QUIC connection is gone and the session waits to be resumed
        (``PeerConfig.resume_timeout``); :meth:`send` still queues."""
        self.resumptions = 0
        """Times the session went on over a new QUIC connection."""
        self._readable = asyncio.Event()
        self._handshake: asyncio.Future[None] = self._loop.create_future()
        self._opened: asyncio.Future[None] = self._loop.create_future()
        self._closed: asyncio.Future[SessionEnded] = self._loop.create_future()
        self._acked = asyncio.Event()
        self._path_changed = asyncio.Event()
        self._iq_waiters: dict[str, asyncio.Future[Element]] = {}
        self._iq_ids = itertools.count(1)
        self._on_stanza: StanzaHandler | None = None
        self._on_path: PathHandler | None = None
        self.started_at = self._loop.time()

    # -- properties -------------------------------------------------------------

    @property
    def peer_jid(self) -> str:
        """The JID the peer authenticated as (its key proved it)."""
        return self.connection.peer_jid or ""

    @property
    def local_jid(self) -> str:
        return self.connection.local_jid

    @property
    def remote_address(self) -> Address:
        return self.connection.address

    @property
    def is_open(self) -> bool:
        return self.connection.is_open

    @property
    def stream_id(self) -> str | None:
        return self.connection.stream_id

    @property
    def ended(self) -> SessionEnded | None:
        """How the session ended (with its unacknowledged stanzas), or
        None while it is not over."""
        return self._closed.result() if self._closed.done() else None

    @property
    def path(self) -> PathKind:
        """The path now carrying the session (a :class:`PathKind`, whose
        string value is ``lan``, ``direct`` or ``relay``). A session opened
        to an explicit address reports ``direct``; one found on the LAN ``lan``."""
        return self.connection.path

    def path_history(self) -> list[tuple[float, PathKind]]:
        """(seconds since the session started, path) for every path change."""
        return self.connection.path_history()

    async def wait_path(self, path: PathKind | str, timeout: float | None = None) -> None:
        """Wait until the session runs on ``path``; raises TimeoutError after
        ``timeout`` seconds, :class:`SessionClosedError` if it ends first."""
        want = PathKind(path)
        if self.path == want:
            return
        if self.connection.link is None:
            raise DtxError(f"this session's path is fixed ({self.path})")
        async with asyncio.timeout(timeout):
            while self.path != want:
                if self._closed.done():
                    raise SessionClosedError("session ended before its path changed")
                self._path_changed.clear()
                await self._path_changed.wait()

    def direct_after(self) -> float | None:
        """Seconds from the start until a direct (or LAN) path took over."""
        for at, kind in self.path_history():
            if kind in (PathKind.DIRECT, PathKind.LAN):
                return at
        return None

    def statistics(self) -> ep.SessionStatistics:
        """A snapshot of the session's counters."""
        stats = self.connection.statistics()
        return dataclasses.replace(
            stats, datagrams_dropped=stats.datagrams_dropped + self.datagrams_dropped)

    # -- callbacks ----------------------------------------------------------------

    def on_stanza(self, handler: StanzaHandler | None) -> None:
        """Call ``handler`` with each received stanza instead of queueing it
        for :meth:`receive` (stanzas already queued are handed over first).
        ``None`` goes back to queueing. The handler runs inside the event
        loop's datagram processing: it must not block."""
        self._on_stanza = handler
        if handler is not None:
            while self._stanzas:
                handler(self._take())

    def on_path_change(self, handler: PathHandler | None) -> None:
        """Call ``handler`` with every later :class:`PathChanged`."""
        self._on_path = handler

    # -- sending ----------------------------------------------------------------

    def send(self, stanza: Element) -> None:
        """Queue ``stanza``; it is kept until the peer acknowledges it.
        Raises :class:`~dtx.errors.UnacknowledgedLimitError` (nothing
        queued) when the session already holds its bound of unacknowledged
        stanzas: see :meth:`drain`."""
        self.connection.send(stanza)
        self._wake()

    def send_datagram(self, stanza: Element) -> None:
        """Send ``stanza`` in one unreliable DATAGRAM (see XmlSession)."""
        self.connection.send_datagram(stanza)
        self._wake()

    async def drain(self, timeout: float | None = None) -> None:
        """Wait until there is room to send: what waits for the peer's
        acknowledgement is under half the session's bounds
        (``SessionConfig.max_unacknowledged_*``). A sender that may outrun
        its peer calls this between bursts rather than meeting
        :class:`~dtx.errors.UnacknowledgedLimitError` from :meth:`send`."""
        conn = self.connection
        if conn.has_room():
            return
        conn.request_ack()
        self._wake()
        async with asyncio.timeout(timeout):
            while not conn.has_room():
                if self._closed.done():
                    raise SessionClosedError("session ended while waiting for room")
                self._acked.clear()
                await self._acked.wait()

    async def wait_acknowledged(self, timeout: float | None = None) -> None:
        """Wait until the peer acknowledged every stanza sent so far."""
        conn = self.connection
        if conn.unacknowledged:
            conn.request_ack()
            self._wake()
        async with asyncio.timeout(timeout):
            while conn.unacknowledged:
                if self._closed.done():
                    ended = self._closed.result()
                    if ended.error is not None:
                        # The typed reason (a refused key, a stream error).
                        raise ended.error
                    raise SessionClosedError(
                        f"session ended with {len(conn.unacknowledged)} stanzas unacknowledged"
                    )
                self._acked.clear()
                await self._acked.wait()

    async def request(self, iq: Element, timeout: float | None = 10.0) -> Element:
        """Send an iq get/set and return its result stanza.

        Raises :class:`~dtx.errors.IqError` for an error reply,
        :class:`~dtx.errors.IqTimeout` when none comes within ``timeout``
        seconds, :class:`SessionClosedError` when the session ends first."""
        iq_id = iq.get("id")
        if not iq_id:
            iq_id = f"dtx{next(self._iq_ids)}"
            iq.set("id", iq_id)
        if iq_id in self._iq_waiters:
            raise DtxError(f"an iq with id {iq_id!r} is already pending")
        fut: asyncio.Future[Element] = self._loop.create_future()
        self._iq_waiters[iq_id] = fut
        try:
            self.send(iq)
            try:
                async with asyncio.timeout(timeout):
                    reply = await fut
            except TimeoutError:
                raise IqTimeout(f"no answer to iq {iq_id!r} within {timeout} s") from None
        finally:
            self._iq_waiters.pop(iq_id, None)
        if reply.get("type") == "error":
            raise IqError(reply)
        return reply

    async def ping(self, timeout: float | None = 10.0) -> float:
        """One XEP-0199 round trip; returns its duration in seconds.

        Timed with :func:`time.perf_counter`, not the loop's clock: uvloop's
        counts whole milliseconds, and a round trip on a LAN is less."""
        start = time.perf_counter()
        await self.request(st.ping(f"ping{next(self._iq_ids)}"), timeout)
        return time.perf_counter() - start

    # -- receiving --------------------------------------------------------------

    async def receive(self) -> Element:
        """The next stanza from the stream (in order).

        Raises :class:`SessionClosedError` once the session has ended and
        every received stanza was read.
        """
        while not self._stanzas:
            if self._closed.done():
                ended = self._closed.result()
                raise SessionClosedError(
                    f"session closed: {ended.error}" if ended.error else "session closed"
                )
            self._readable.clear()
            await self._readable.wait()
        return self._take()

    def receive_nowait(self) -> Element | None:
        return self._take() if self._stanzas else None

    def _take(self) -> Element:
        el, size = self._stanzas.popleft()
        if self.connection.consumed(size):
            self._wake()  # grant credit again
        return el

    async def receive_datagram(self) -> Element:
        """The next stanza from the unreliable channel."""
        while not self._datagrams:
            if self._closed.done():
                raise SessionClosedError("session closed")
            self._readable.clear()
            await self._readable.wait()
        return self._datagrams.popleft()

    def __aiter__(self) -> AsyncIterator[Element]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Element]:
        while True:
            try:
                yield await self.receive()
            except SessionClosedError:
                return

    # -- closing ----------------------------------------------------------------

    async def close(self, timeout: float | None = 5.0) -> SessionEnded:
        """Close gracefully; every stanza already sent is delivered first.

        Returns how the session ended, with any unacknowledged stanzas.
        """
        if not self._closed.done():
            self.connection.close()
            self._wake()
            try:
                async with asyncio.timeout(timeout):
                    await asyncio.shield(self._closed)
            except TimeoutError:
                self.connection.end(SessionClosedError("close timed out"))
                self._wake()
        return await asyncio.shield(self._closed)

    async def wait_closed(self) -> SessionEnded:
        return await asyncio.shield(self._closed)

    def abort(self) -> None:
        self.connection.abort()
        self._wake()

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    # -- the driver's side ----------------------------------------------------------

    async def wait_handshake(self) -> None:
        """Until the peer's key is trusted (the first stanza may then go)."""
        await asyncio.shield(self._handshake)

    async def wait_opened(self) -> None:
        await asyncio.shield(self._opened)

    def stanza_received(self, ev: ep.StanzaReceived) -> None:
        """A stanza for this session (from the peer's event pump)."""
        el = ev.stanza
        if el.tag == _IQ and el.get("type") in ("result", "error"):
            fut = self._iq_waiters.get(el.get("id", ""))
            if fut is not None and not fut.done():
                self.connection.consumed(ev.size)
                fut.set_result(el)
                return
        if self._on_stanza is not None:
            self.connection.consumed(ev.size)
            self._on_stanza(el)
            return
        self._stanzas.append((el, ev.size))
        self._readable.set()

    def handle_event(self, ev: ep.EndpointEvent) -> None:
        """An endpoint event for this session's connection (from the peer)."""
        if isinstance(ev, ep.StanzaReceived):
            self.stanza_received(ev)
        elif isinstance(ev, ep.DatagramReceived):
            if len(self._datagrams) >= self._max_datagrams:
                self._datagrams.popleft()
                self.datagrams_dropped += 1
            self._datagrams.append(ev.stanza)
            self._readable.set()
        elif isinstance(ev, ep.StanzasAcknowledged):
            self._acked.set()
        elif isinstance(ev, ep.HandshakeConfirmed):
            if not self._handshake.done():
                self._handshake.set_result(None)
        elif isinstance(ev, ep.SessionOpened):
            if not self._handshake.done():
                self._handshake.set_result(None)
            if not self._opened.done():
                self._opened.set_result(None)
        elif isinstance(ev, ep.PathChangedEvent):
            self._path_changed.set()
            if self._on_path is not None:
                self._on_path(ev.change)
        elif isinstance(ev, ep.SessionEnded):
            self.finish(ev.ended)
        elif isinstance(ev, ep.SessionSuspended):
            self.suspended = True
            self._path_changed.set()
        elif isinstance(ev, ep.SessionResumed):
            self.suspended = False
            self.resumptions += 1
            self._path_changed.set()
            self._acked.set()

    def finish(self, ended: SessionEnded) -> None:
        """The session is over: wake every waiter."""
        if self._closed.done():
            return
        self._closed.set_result(ended)
        error = ended.error or SessionClosedError("session closed")
        for fut in (self._handshake, self._opened):
            if not fut.done():
                fut.set_exception(error)
                fut.exception()  # mark retrieved: the caller may be gone
        for fut2 in self._iq_waiters.values():
            if not fut2.done():
                fut2.set_exception(SessionClosedError("session closed"))
        self._readable.set()
        self._acked.set()
        self._path_changed.set()
