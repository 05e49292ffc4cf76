"""A session as the application sees it: send, receive, close.

:class:`Session` wraps one :class:`~dtx.proto.session.XmlSession` (and its
QUIC connection) owned by a :class:`~dtx.aio.peer.Peer`, and turns the
core's events into awaitable results: the next stanza, an iq's answer, the
acknowledgement of everything sent, the end of the session. Sending only
queues; the peer writes everything queued once per event-loop iteration.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any
from xml.etree.ElementTree import Element

from .. import stanza as st
from ..errors import DtxError, RemoteProtocolError, SessionClosedError
from ..proto.auth import AuthenticatedQuicConnection
from ..proto.session import (
    DatagramReceived,
    HandshakeConfirmed,
    SessionEnded,
    SessionEvent,
    SessionOpened,
    StanzaReceived,
    StanzasAcknowledged,
    XmlSession,
)
from .traversal import Link

if TYPE_CHECKING:
    from .peer import Peer

Address = tuple[str, int]


class _SessionAdapter(logging.LoggerAdapter):  # type: ignore[type-arg]
    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"[{self.extra['sid']}] {msg}", kwargs  # type: ignore[index]


_sid_counter = itertools.count(1)


class Session:
    """One authenticated XML stream with a remote device.

    Obtained from :meth:`Peer.connect` or :meth:`Peer.accept`.
    """

    def __init__(self, peer: Peer, quic: AuthenticatedQuicConnection, addr: Address,
                 core: XmlSession, log: logging.LoggerAdapter) -> None:  # type: ignore[type-arg]
        self._peer = peer
        self._quic = quic
        self._addr = addr
        self._core = core
        self._log = log
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._stanzas: deque[tuple[Element, int]] = deque()
        self._queued_bytes = 0
        self._datagrams: deque[Element] = deque()
        self._readable = asyncio.Event()
        self._handshake: asyncio.Future[None] = self._loop.create_future()
        self._opened: asyncio.Future[None] = self._loop.create_future()
        self._closed: asyncio.Future[SessionEnded] = self._loop.create_future()
        self._acked = asyncio.Event()
        self._iq_waiters: dict[str, asyncio.Future[Element]] = {}
        self._iq_ids = itertools.count(1)
        self.link: Link | None = None
        self._fixed_path = "direct"
        self.started_at = self._loop.time()
        self._last_rx = self.started_at

    # -- properties -------------------------------------------------------------

    @property
    def peer_jid(self) -> str:
        """The JID the peer authenticated as (its key proved it)."""
        return self._core.peer_jid or ""

    @property
    def local_jid(self) -> str:
        return self._core._local_jid

    @property
    def remote_address(self) -> Address:
        return self._addr

    @property
    def is_open(self) -> bool:
        return self._core.is_open

    @property
    def stream_id(self) -> str | None:
        return self._core.stream_id

    @property
    def path(self) -> str:
        """The path now carrying the session: ``lan``, ``direct`` or ``relay``.

        A session opened to an explicit address reports ``direct``."""
        if self.link is None or self.link.paths.kind is None:
            return self._fixed_path
        return self.link.paths.kind.value

    def path_history(self) -> list[tuple[float, str]]:
        """(seconds since the session started, path) for every path change."""
        if self.link is None:
            return [(0.0, self._fixed_path)]
        return [(max(0.0, at - self.started_at), kind.value)
                for at, kind in self.link.paths.history]

    async def wait_path(self, path: str, timeout: float | None = None) -> None:
        """Wait until the session runs on ``path`` (``lan``, ``direct``,
        ``relay``); raises TimeoutError after ``timeout`` seconds."""
        if self.path == path:
            return
        if self.link is None:
            raise DtxError(f"this session's path is fixed ({self.path})")
        changed = asyncio.Event()

        def on_change(change: Any) -> None:
            changed.set()

        self.link.on_change.append(on_change)
        try:
            async with asyncio.timeout(timeout):
                while self.path != path:
                    changed.clear()
                    await changed.wait()
        finally:
            self.link.on_change.remove(on_change)

    def direct_after(self) -> float | None:
        """Seconds from the start until a direct (or LAN) path took over."""
        for at, kind in self.path_history():
            if kind in ("direct", "lan"):
                return at
        return None

    def statistics(self) -> dict[str, Any]:
        stats: dict[str, Any] = dict(vars(self._core.statistics))
        stats["unacknowledged"] = len(self._core.unacknowledged)
        rtt = getattr(self._quic._loss, "_rtt_smoothed", 0.0)
        stats["rtt_ms"] = round(rtt * 1000, 3)
        return stats

    # -- sending ----------------------------------------------------------------

    def send(self, stanza: Element) -> None:
        """Queue ``stanza``; it is kept until the peer acknowledges it."""
        self._core.send(stanza)
        self._peer._schedule(self)

    def send_datagram(self, stanza: Element) -> None:
        """Send ``stanza`` in one unreliable DATAGRAM (see XmlSession)."""
        self._core.send_datagram(stanza)
        self._peer._schedule(self)

    async def wait_acknowledged(self, timeout: float | None = None) -> None:
        """Wait until the peer acknowledged every stanza sent so far."""
        if self._core.unacknowledged:
            self._core.request_ack()
            self._peer._schedule(self)
        async with asyncio.timeout(timeout):
            while self._core.unacknowledged:
                if self._closed.done():
                    ended = self._closed.result()
                    if ended.error is not None:
                        # The typed reason (a refused key, a stream error).
                        raise ended.error
                    raise SessionClosedError(
                        f"session ended with {len(self._core.unacknowledged)} "
                        "stanzas unacknowledged"
                    )
                self._acked.clear()
                await self._acked.wait()

    async def request(self, iq: Element, timeout: float | None = 10.0) -> Element:
        """Send an iq get/set and return its result (or error) stanza."""
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
            async with asyncio.timeout(timeout):
                return await fut
        finally:
            self._iq_waiters.pop(iq_id, None)

    async def ping(self, timeout: float | None = 10.0) -> float:
        """One XEP-0199 round trip; returns its duration in seconds."""
        start = self._loop.time()
        reply = await self.request(st.ping(f"ping{next(self._iq_ids)}"), timeout)
        if reply.get("type") != "result":
            raise RemoteProtocolError("ping answered with an error")
        return self._loop.time() - start

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
        self._queued_bytes -= size
        if self._quic.receive_paused and \
                self._queued_bytes <= self._peer.config.receive_buffer_bytes // 4:
            self._quic.receive_paused = False
            self._peer._schedule(self)  # grant credit again
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
            self._core.close()
            self._peer._schedule(self)
            try:
                async with asyncio.timeout(timeout):
                    await asyncio.shield(self._closed)
            except TimeoutError:
                self._core.abort("close timed out")
                self._peer._schedule(self)
                self._peer._terminate(self, SessionEnded(
                    SessionClosedError("close timed out"), self._core.unacknowledged))
        return self._closed.result()

    async def wait_closed(self) -> SessionEnded:
        return await asyncio.shield(self._closed)

    def abort(self) -> None:
        self._core.abort()
        self._peer._schedule(self)

    # -- driver side --------------------------------------------------------------

    def _dispatch(self, events: list[SessionEvent]) -> None:
        for ev in events:
            if isinstance(ev, StanzaReceived):
                el = ev.stanza
                if el.tag == st.IQ and el.get("type") in ("result", "error"):
                    fut = self._iq_waiters.get(el.get("id", ""))
                    if fut is not None and not fut.done():
                        fut.set_result(el)
                        continue
                self._stanzas.append((el, ev.size))
                self._queued_bytes += ev.size
                if self._queued_bytes > self._peer.config.receive_buffer_bytes:
                    self._quic.receive_paused = True
                self._readable.set()
            elif isinstance(ev, DatagramReceived):
                self._datagrams.append(ev.stanza)
                self._readable.set()
            elif isinstance(ev, StanzasAcknowledged):
                self._acked.set()
            elif isinstance(ev, HandshakeConfirmed):
                if not self._handshake.done():
                    self._handshake.set_result(None)
            elif isinstance(ev, SessionOpened):
                if not self._handshake.done():
                    self._handshake.set_result(None)
                if not self._opened.done():
                    self._opened.set_result(None)
                self._peer._on_opened(self)
            elif isinstance(ev, SessionEnded):
                self._peer._terminate(self, ev)

    def _finish(self, ended: SessionEnded) -> None:
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
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
