"""Sans-IO XEP-0174 link-local XML streams: the plain TCP streams of the
XMPP clients people already have on the LAN (Pidgin's Bonjour, iChat-style).

One :class:`LinkLocalStream` is one TCP connection, fed bytes and time,
returning bytes to write, one timer and events, in the shape of
:class:`dtx.proto.session.XmlSession` (and h11):
:meth:`~LinkLocalStream.receive_data` (``b""`` for the end of the input),
:meth:`~LinkLocalStream.handle_timer` and user calls in;
:meth:`~LinkLocalStream.data_to_send`, :meth:`~LinkLocalStream.get_timer`
and :meth:`~LinkLocalStream.next_event` out. The asyncio driver is
:mod:`dtx.aio.linklocal`.

Stream rules (XEP-0174 section 6, RFC 6120 framing):

* the initiator sends a stream header ``from`` its instance name
  (``user@machine``) ``to`` the recipient's; the recipient answers with its
  own header (``version='1.0'`` and an empty ``<stream:features/>`` only if
  the initiator sent a 1.x version: legacy clients send none);
* a header without ``from`` is ``invalid-from`` (dtx must be able to say who
  the stanzas claim to be from); a ``to`` that is none of this device's
  names is ``host-unknown``; on the initiating side, an answer ``from``
  another name than the one dialled is ``invalid-from``;
* then ``message``, ``presence`` and ``iq`` stanzas in ``jabber:client``; a
  stanza's ``from`` must be the name of the header (compared without case,
  as DNS-SD names are) or absent, when it is stamped with it; XEP-0198
  elements are ``unsupported-stanza-type`` (link-local streams have no
  acknowledgements); disco#info and XEP-0199 pings are answered here;
* ``</stream:stream>`` from either side is answered with the other's, then
  the connection ends.

What the peer claims is never checked: a link-local stream is
unauthenticated and unencrypted, exactly as XEP-0174 is. Its stanzas reach
the application as :class:`LinkLocalStanzaReceived` of a stream whose
``peer_name`` is only a claim; they never enter a dtx session.

The XML is parsed by the restricted parser dtx uses everywhere
(:class:`dtx.proto.xmlstream.XmlStreamParser`), with its own limits
(:class:`LinkLocalConfig`). Bad input ends the stream with the RFC 6120
stream error, never with an exception out of :meth:`receive_data`.
"""

from __future__ import annotations

import copy
import enum
import logging
import random
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from xml.etree.ElementTree import Element

from .. import stanza as st
from ..errors import (
    DtxError,
    LocalProtocolError,
    SendBufferFullError,
    SessionClosedError,
    StanzaTooLargeError,
    StreamError,
)
from . import xmlstream as xs
from .caps import DEFAULT_CAPS_NODE, disco_info_answer

__all__ = [
    "Admission",
    "LinkLocalConfig",
    "LinkLocalEnded",
    "LinkLocalEvent",
    "LinkLocalOpened",
    "LinkLocalStanzaReceived",
    "LinkLocalState",
    "LinkLocalStatistics",
    "LinkLocalStream",
    "MAX_NAME_CHARS",
    "admit",
]

MAX_NAME_CHARS = 1023
"""Longest name accepted in a header's ``from`` (a JID's limit, RFC 7622)."""


@dataclass(frozen=True, kw_only=True)
class LinkLocalConfig:
    """The XEP-0174 listener and its streams. Sizes in bytes, times in seconds.

    Memory per stream is bounded by ``max_stanza_bytes`` (input of the
    stanza in progress; its tree can take about 30 times that for a stanza
    of many tiny elements), ``receive_buffer_bytes`` and
    ``send_buffer_bytes``; the listener holds at most ``max_connections``
    streams, so about 3 MB each and 50 MB in all at the defaults, in the
    worst case.
    """

    port: int = 0
    """TCP port of the listener (0: any free one); the ``_presence._tcp`` SRV
    record and ``port.p2pj`` name the port it got."""
    host: str | None = None
    """Address to bind; None: the address of the device's UDP socket."""
    outgoing: bool = False
    """Open XEP-0174 streams to ``_presence._tcp`` peers that have no
    ``_dtx._udp`` record with a trusted key (``LinkLocal.connect``)."""
    nick: str | None = None
    """The ``nick`` TXT key (default: the JID's resource)."""
    caps_node: str = DEFAULT_CAPS_NODE
    """The XEP-0115 ``node`` announced beside ``hash`` and ``ver``."""
    max_stanza_bytes: int = 64 * 1024
    max_depth: int = 16
    max_names: int = 1000
    """Distinct element and attribute names over one stream (a legacy
    client uses a few dozen)."""
    header_timeout: float = 10.0
    """A connection whose stream header is not complete after this long is
    closed with ``connection-timeout`` (an endless or trickled header)."""
    idle_timeout: float = 600.0
    """A stream with no input for this long is closed gracefully."""
    close_timeout: float = 2.0
    """How long a closing side waits for the peer's ``</stream:stream>``."""
    max_connections: int = 16
    """Connections at once, those still sending their header included."""
    max_connections_per_ip: int = 4
    """Connections at once from one IP address."""
    receive_buffer_bytes: int = 256 * 1024
    """Received stanzas the application has not read, beyond which the
    driver stops reading from the connection (TCP pushes back)."""
    send_buffer_bytes: int = 256 * 1024
    """Unsent bytes beyond which ``send`` raises ``SendBufferFullError``."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise LocalProtocolError(f"port {self.port} is not a TCP port")
        if self.max_stanza_bytes < xs.MIN_MAX_STANZA_BYTES:
            raise LocalProtocolError(
                f"max_stanza_bytes must be at least {xs.MIN_MAX_STANZA_BYTES}")
        if self.max_connections < 1 or self.max_connections_per_ip < 1:
            raise LocalProtocolError("max_connections and max_connections_per_ip must be >= 1")
        for name in ("header_timeout", "idle_timeout", "close_timeout"):
            if not getattr(self, name) > 0:
                raise LocalProtocolError(f"{name} must be positive")
        if self.send_buffer_bytes < self.max_stanza_bytes:
            raise LocalProtocolError("send_buffer_bytes must be at least max_stanza_bytes")


# -- admission ------------------------------------------------------------------


@dataclass(frozen=True)
class Admission:
    """What to do with a new connection: take it or not, and which
    connections (ids) to drop first to make room."""

    admitted: bool
    evict: tuple[int, ...] = ()
    reason: str = ""


def admit(connections: Iterable[tuple[int, str, bool]], ip: str, *, max_total: int,
          max_per_ip: int) -> Admission:
    """The admission of a connection from ``ip``, given the live ones as
    ``(id, ip, opened)``, oldest first (``opened``: its header is done).

    At the per-IP bound the oldest connection of that IP still sending its
    header makes room; at the total bound the oldest still-sending one of
    the IP holding the most. Open streams are never dropped for a newcomer:
    when only open streams fill the table, the newcomer is refused. So a
    flood of connections that never finish a header delays, but cannot
    lock out, a client whose header takes one round trip."""
    live = list(connections)
    evict: list[int] = []
    mine = [c for c in live if c[1] == ip]
    if len(mine) >= max_per_ip:
        pending = [c for c in mine if not c[2]]
        if not pending:
            return Admission(False, reason="per-ip")
        evict.append(pending[0][0])
        live.remove(pending[0])
    if len(live) >= max_total:
        held: dict[str, int] = {}
        for c in live:
            held[c[1]] = held.get(c[1], 0) + 1
        pending = [c for c in live if not c[2]]
        if not pending:
            return Admission(False, reason="total")
        # The IP holding the most; among equals, the one with the oldest.
        victim = max(pending, key=lambda c: (held[c[1]], -live.index(c)))
        victim = next(c for c in pending if c[1] == victim[1])
        evict.append(victim[0])
    return Admission(True, tuple(evict))


# -- events -----------------------------------------------------------------------


@dataclass(frozen=True)
class LinkLocalOpened:
    """Both headers are exchanged. ``peer_name`` is the name the peer
    *claims* (its header's ``from``, or the name dialled): never verified."""

    peer_name: str
    stream_id: str | None


@dataclass(frozen=True)
class LinkLocalStanzaReceived:
    """A stanza from an unauthenticated link-local peer; its ``from`` is the
    claimed name (stamped when absent). ``size``: input bytes, about."""

    stanza: Element
    size: int


@dataclass(frozen=True)
class LinkLocalEnded:
    """The stream is over; ``error`` is None when both sides closed it."""

    error: DtxError | None


LinkLocalEvent = LinkLocalOpened | LinkLocalStanzaReceived | LinkLocalEnded


class LinkLocalState(enum.Enum):
    HEADER = "header"
    """Waiting for the peer's stream header."""
    OPEN = "open"
    CLOSING = "closing"
    """This side sent ``</stream:stream>``; waiting for the peer's."""
    CLOSED = "closed"


_TRANSITIONS: dict[LinkLocalState, frozenset[LinkLocalState]] = {
    LinkLocalState.HEADER: frozenset({LinkLocalState.OPEN, LinkLocalState.CLOSING,
                                      LinkLocalState.CLOSED}),
    LinkLocalState.OPEN: frozenset({LinkLocalState.CLOSING, LinkLocalState.CLOSED}),
    LinkLocalState.CLOSING: frozenset({LinkLocalState.CLOSED}),
    LinkLocalState.CLOSED: frozenset(),
}


@dataclass
class LinkLocalStatistics:
    bytes_received: int = 0
    bytes_sent: int = 0
    stanzas_received: int = 0
    stanzas_sent: int = 0
    queries_answered: int = 0


def _fold(name: str) -> str:
    return name.casefold()


# -- the stream -----------------------------------------------------------------


class LinkLocalStream:
    """One XEP-0174 XML stream over one TCP connection.

    ``local_name`` is this device's instance name (``user@machine``), used
    as ``from``; ``accept_names`` are the names a peer's ``to`` may carry
    (the instance name is always one). ``peer_name`` given: this side
    initiates, to that name, and writes its header at once. ``features``
    are the application's disco#info features (``SessionConfig.features``).
    """

    def __init__(self, *, local_name: str, config: LinkLocalConfig, rng: random.Random,
                 now: float, peer_name: str | None = None, accept_names: Iterable[str] = (),
                 features: Sequence[str] = (),
                 logger: logging.Logger | logging.LoggerAdapter[logging.Logger] | None = None,
                 ) -> None:
        self.local_name = local_name
        self.peer_name = peer_name
        self.initiator = peer_name is not None
        self.config = config
        self.state = LinkLocalState.HEADER
        self.stream_id: str | None = None
        self.error: DtxError | None = None
        self.statistics = LinkLocalStatistics()
        self._accept = {_fold(local_name), *(_fold(n) for n in accept_names)}
        self._features = tuple(features)
        self._rng = rng
        self._log = logger or logging.getLogger(__name__)
        self._parser = xs.XmlStreamParser(max_stanza_bytes=config.max_stanza_bytes,
                                          max_depth=config.max_depth,
                                          max_names=config.max_names)
        self._out: list[bytes] = []
        self._events: deque[LinkLocalEvent] = deque()
        self._started_at = now
        self._heard_at = now
        self._closing_at: float | None = None
        self._header_sent = False
        self._unattributed = 0
        if peer_name is not None:
            self._write_header(to=peer_name, version="1.0")

    # -- out ----------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """The bytes to write to the connection now."""
        data = b"".join(self._out)
        self._out.clear()
        self.statistics.bytes_sent += len(data)
        return data

    def next_event(self) -> LinkLocalEvent | None:
        return self._events.popleft() if self._events else None

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` wants calling."""
        if self.state is LinkLocalState.HEADER:
            return self._started_at + self.config.header_timeout
        if self.state is LinkLocalState.OPEN:
            return self._heard_at + self.config.idle_timeout
        if self.state is LinkLocalState.CLOSING and self._closing_at is not None:
            return self._closing_at + self.config.close_timeout
        return None

    @property
    def closed(self) -> bool:
        """True once the stream is over: write what is left, close the connection."""
        return self.state is LinkLocalState.CLOSED

    @property
    def is_open(self) -> bool:
        return self.state is LinkLocalState.OPEN

    # -- user calls ---------------------------------------------------------------

    def send(self, stanza: Element, *, room: int | None = None) -> int:
        """Queue ``stanza`` (``from`` this device, ``to`` the peer unless the
        stanza says otherwise); returns its encoded size. ``room``: unsent
        bytes the driver can still take; a stanza larger than that raises
        :class:`SendBufferFullError` and queues nothing."""
        if self.state is not LinkLocalState.OPEN:
            raise SessionClosedError(f"cannot send: link-local stream is {self.state.value}")
        el = copy.copy(stanza)
        if el.get("from") is None:
            el.set("from", self.local_name)
        if el.get("to") is None and self.peer_name is not None:
            el.set("to", self.peer_name)
        data = xs.encode_stanza(el)
        if len(data) > self.config.max_stanza_bytes:
            raise StanzaTooLargeError(
                f"stanza of {len(data)} bytes exceeds the limit of "
                f"{self.config.max_stanza_bytes} bytes")
        if room is not None and len(data) > room:
            raise SendBufferFullError(
                f"the peer is not reading: {self.config.send_buffer_bytes - room} bytes are "
                f"unsent (limit {self.config.send_buffer_bytes}); nothing was queued")
        self._out.append(data)
        self.statistics.stanzas_sent += 1
        return len(data)

    def close(self, now: float) -> None:
        """Close gracefully: ``</stream:stream>``, then wait (``close_timeout``)
        for the peer's."""
        if self.state is LinkLocalState.OPEN or (self.state is LinkLocalState.HEADER
                                                 and self._header_sent):
            self._out.append(xs.encode_stream_footer())
            self._closing_at = now
            self._to(LinkLocalState.CLOSING)
        elif self.state is LinkLocalState.HEADER:
            self._end(SessionClosedError("closed before the stream opened"))

    def abort(self, reason: str = "aborted") -> None:
        """End at once, without a closing tag."""
        if self.state is not LinkLocalState.CLOSED:
            self._end(SessionClosedError(reason))

    def refuse(self, condition: str, text: str) -> None:
        """End with a stream error this side decided (the listener is full, say)."""
        self._stream_error(StreamError(condition, text))

    # -- in -----------------------------------------------------------------------

    def handle_timer(self, now: float) -> None:
        when = self.get_timer()
        if when is None or now < when:
            return
        if self.state is LinkLocalState.HEADER:
            self._stream_error(StreamError(
                "connection-timeout",
                f"no stream header within {self.config.header_timeout:g} s"))
        elif self.state is LinkLocalState.OPEN:
            self._log.info("link-local stream with %s idle for %.0f s; closing",
                           self.peer_name, self.config.idle_timeout)
            self.close(now)
        else:
            self._end(SessionClosedError(
                f"the peer did not end its stream within {self.config.close_timeout:g} s"))

    def receive_data(self, data: bytes, now: float) -> None:
        """Feed bytes from the connection; ``b""`` means the peer closed it."""
        if self.state is LinkLocalState.CLOSED:
            return
        if not data:
            if self.state is LinkLocalState.CLOSING:
                self._end(None)  # we closed; the peer hung up (Pidgin does so)
            elif self.state is LinkLocalState.HEADER:
                self._end(SessionClosedError("connection closed before a stream header"))
            else:
                self._end(SessionClosedError("connection closed without ending the stream"))
            return
        self._heard_at = now
        self.statistics.bytes_received += len(data)
        self._unattributed += len(data)
        try:
            for xev in self._parser.feed(data):
                self._on_xml_event(xev)
                if self.closed:
                    break
        except StreamError as exc:
            self._stream_error(exc)

    def _on_xml_event(self, xev: xs.XmlEvent) -> None:
        if isinstance(xev, xs.StreamOpened):
            self._on_header(xev.attrs)
        elif isinstance(xev, xs.StanzaReceived):
            self._on_stanza(xev.element)
        elif isinstance(xev, xs.StreamErrorReceived):
            self._log.info("link-local peer %s sent stream error %s %s", self.peer_name,
                           xev.condition, xev.text)
            self._out.append(xs.encode_stream_footer())
            self._end(StreamError(xev.condition, xev.text))
        else:  # StreamClosed
            if self.state is not LinkLocalState.CLOSING:
                self._out.append(xs.encode_stream_footer())
            self._end(None)

    def _on_header(self, attrs: dict[str, str]) -> None:
        sender = attrs.get("from")
        if self.initiator:
            if sender is not None and _fold(sender) != _fold(self.peer_name or ""):
                raise StreamError("invalid-from",
                                  f"answered from {sender[:80]!r}, not {self.peer_name!r}")
            self.stream_id = attrs.get("id")
        else:
            if not sender:
                raise StreamError("invalid-from", "the stream header must name its sender "
                                  "(from, XEP-0174 section 6)")
            if len(sender) > MAX_NAME_CHARS:
                raise StreamError("invalid-from", f"'from' longer than {MAX_NAME_CHARS}")
            to = attrs.get("to")
            if to and _fold(to) not in self._accept:
                raise StreamError("host-unknown", f"this device is {self.local_name}")
            self.peer_name = sender
            self.stream_id = "%016x" % self._rng.getrandbits(64)
            versioned = attrs.get("version") is not None
            self._write_header(to=sender, version="1.0" if versioned else None,
                               stream_id=self.stream_id)
            if versioned:
                self._out.append(b"<stream:features/>")
        self._to(LinkLocalState.OPEN)
        self._log.info("link-local stream open with %s (claimed)", self.peer_name)
        self._events.append(LinkLocalOpened(self.peer_name or "", self.stream_id))

    def _on_stanza(self, el: Element) -> None:
        if self.state is LinkLocalState.HEADER:  # unreachable: the parser wants a header
            raise StreamError("not-authorized", "stanza before the stream header")
        if el.tag not in st.STANZA_TAGS:
            raise StreamError("unsupported-stanza-type",
                              "no XEP-0198 on link-local streams")
        claimed = self.peer_name or ""  # set with the header
        sender = el.get("from")
        if sender is None:
            el.set("from", claimed)
        elif _fold(sender) != _fold(claimed):
            raise StreamError("invalid-from",
                              f"stanza from {sender[:80]!r} on a stream from {self.peer_name!r}")
        self.statistics.stanzas_received += 1
        if self.state is LinkLocalState.OPEN and self._answer(el):
            return
        size, self._unattributed = self._unattributed, 0
        self._events.append(LinkLocalStanzaReceived(el, size))

    def _answer(self, el: Element) -> bool:
        if st.is_ping(el):
            answer = st.result_for(el, from_=self.local_name)
        elif st.is_disco_info_query(el):
            answer = disco_info_answer(el, self._features, from_=self.local_name)
        else:
            return False
        self._out.append(xs.encode_stanza(answer))
        self.statistics.queries_answered += 1
        return True

    # -- ending ---------------------------------------------------------------------

    def _write_header(self, *, to: str, version: str | None,
                      stream_id: str | None = None) -> None:
        self._out.append(xs.encode_stream_header(from_=self.local_name, to=to,
                                                 stream_id=stream_id, version=version))
        self._header_sent = True

    def _stream_error(self, exc: StreamError) -> None:
        if self.state is LinkLocalState.CLOSED:
            return
        if not self._header_sent:
            # RFC 6120 section 4.9.1.2: a header first, then the error.
            self._write_header(to=self.peer_name or "", version=None)
        self._out.append(xs.encode_stream_error(exc.condition, exc.text)
                         + xs.encode_stream_footer())
        self._end(exc)

    def _end(self, error: DtxError | None) -> None:
        self.error = error
        self._to(LinkLocalState.CLOSED)
        self._events.append(LinkLocalEnded(error))

    def _to(self, state: LinkLocalState) -> None:
        if state not in _TRANSITIONS[self.state]:
            raise LocalProtocolError(f"link-local stream: {self.state.value} -> {state.value}")
        self.state = state
