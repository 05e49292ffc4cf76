"""The device, sans-IO: every session of one UDP socket, and its traversal.

An :class:`Endpoint` is what a device is on the network, minus the socket
and the clock. It owns:

* the session table: one :class:`Connection` (an
  :class:`~dtx.proto.auth.AuthenticatedQuicConnection` with an
  :class:`~dtx.proto.session.XmlSession` stacked on it) per remote address;
* half-open admission: handshakes from remote devices, bounded per source
  IP and in all, expired on a timer;
* keepalives (a QUIC PING on a quiet session);
* NAT traversal (:class:`~dtx.proto.traversal.Traversal`): the rendezvous
  registration, the path managers, probe signing, relay channels, and the
  seam through which introductions arrive;
* the receive-buffer policy (no QUIC credit while the application is
  behind);
* one merged timer.

In (the shape of aioquic's ``QuicConnection``): :meth:`receive_datagram`,
:meth:`handle_timer`, and the user calls :meth:`connect`,
:meth:`introduce`, :meth:`introduced`, ``Connection.send`` / ``close``.
Out: :meth:`datagrams_to_send`, :meth:`get_timer`, :meth:`next_event`
(typed, past-tense events). A driver is a socket, one timer and a
``transmit()``: send what :meth:`datagrams_to_send` returns, re-arm the
timer at :meth:`get_timer`. Time and randomness are arguments.

The path of one datagram in: ``receive_datagram`` → first byte
(:func:`dtx.wire.demux.classify`) → dtx frames to the traversal (a relay
frame comes back as a QUIC packet from a mapped address), QUIC packets
mapped to the stable address of their link → the connection's QUIC →
its XML stream → events. Out: ``Connection.send`` queues on the XML stream
→ ``datagrams_to_send`` flushes it into QUIC → each QUIC datagram is routed
by its link's path manager (direct, relay, or sprayed) or sent as is.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from xml.etree.ElementTree import Element

from aioquic.buffer import Buffer  # type: ignore[attr-defined]
from aioquic.quic import packet as quic_packet

from ..errors import (
    AuthenticationError,
    ConnectError,
    DtxError,
    SessionClosedError,
    StreamError,
    TrustError,
)
from ..identity import DeviceIdentity
from ..logs import LogLimiter
from ..wire.demux import PacketKind, classify
# The QUIC engine's modules load on first use, or in the background while
# the device registers (dtx._lazy): none of it is needed before a handshake.
from . import auth
from . import session as sc
from .binding import BindingClient, BindingEvent
from .paths import PathChanged, PathKind
from .retry import RetryTokens
from .portmap import (MappingCreated, MappingLost, MappingRenewed, PortMapClient,
                      PortMapEvent, PortMapState)
from .sessiontypes import SessionConfig
from .turn import AllocationState as TurnState
from .turn import DataReceived as TurnDataReceived
from .turn import TurnClient, TurnEvent
from .traversal import (
    Introduction,
    IntroductionCompleted,
    IntroductionFailed,
    Link,
    LinkPathChanged,
    Registered,
    RegistrationLost,
    RegistrationRefused,
    Traversal,
    TraversalConfig,
)
from ..wire.address import Address, format_address

logger = logging.getLogger(__name__)


Verify = Callable[[str, bytes], None]
"""Raises :class:`~dtx.errors.TrustError` unless ``key`` may speak for ``jid``."""


@dataclass(frozen=True, kw_only=True)
class EndpointConfig:
    """Tunables of a device endpoint. Times in seconds, sizes in bytes."""

    session: SessionConfig = SessionConfig()
    idle_timeout: float = 30.0
    datagrams: bool = True
    """Offer the unreliable DATAGRAM channel (RFC 9221)."""
    max_connections: int = 1024
    """Bound on concurrent connections, half-open ones included."""
    receive_buffer_bytes: int = 4 * 1024 * 1024
    """Received stanzas the application has not consumed, beyond which the
    session stops granting the sender QUIC credit (it resumes below a
    quarter of it): memory stays bounded, nothing is dropped."""
    max_datagram_size: int = 1200
    """Largest UDP payload QUIC sends."""
    keepalive_interval: float = 10.0
    """A session quiet for this long sends a QUIC PING."""
    max_half_open: int = 256
    """Handshakes from remote devices in progress; at the bound the oldest
    of the source IP holding the most is dropped to make room."""
    max_half_open_per_ip: int = 16
    """Handshakes in progress from one source IP; at the bound the oldest
    from that IP is dropped to make room."""
    handshake_timeout: float = 10.0
    """A handshake from a remote device still in progress after this long
    is dropped (on a timer)."""
    retry_half_open: int = 64
    """Under load: with this many handshakes in progress, an Initial with
    no token is answered with a QUIC Retry (stateless address validation,
    RFC 9000 section 8.1) and keeps no state; below it, no extra round trip.
    0: always Retry."""
    retry_token_lifetime: float = 10.0
    """How long a Retry token is good for (the client returns it at once)."""
    resume_timeout: float | None = 120.0
    """A session whose connection dies because the peer stopped answering
    (idle timeout) waits this long to be resumed on a new connection
    (docs/protocol.md 3.5): a :class:`SessionSuspended`, then a
    :class:`SessionResumed` or, after this long, the :class:`SessionEnded`
    with the unacknowledged stanzas. None: it ends at once, as any other."""
    resume_backoff: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0)
    """The initiating side's pauses between attempts to resume (the last
    repeats until ``resume_timeout``); an attempt that has no answer after
    ``handshake_timeout`` counts as failed."""
    max_suspended: int = 64
    """Suspended sessions held at once; past it the oldest ends."""
    congestion_control: str = "loss-tolerant"  # (dtx.proto.congestion.NAME)
    """QUIC congestion control: ``loss-tolerant`` (dtx's, which keeps its
    window at random loss: :mod:`dtx.proto.congestion`), ``reno``, ``cubic``."""
    duplicate_after_loss: float = 30.0
    """For this long after a loss, a small exchange's packets go twice (the
    copy takes the place of a probe timeout when one is lost; never in bulk
    transfers, never on a path that has not lost a packet). 0: never."""
    traversal: TraversalConfig = TraversalConfig()


# -- events -------------------------------------------------------------------


@dataclass(frozen=True)
class HandshakeConfirmed:
    """The peer's key was checked and trusted (locally): ``connection`` may send."""

    connection: Connection


@dataclass(frozen=True)
class SessionOpened:
    """Both stream headers exchanged: stanzas flow both ways."""

    connection: Connection


@dataclass(slots=True)  # made per stanza: not frozen (see xmlstream.StanzaReceived)
class StanzaReceived:
    connection: Connection
    stanza: Element
    size: int
    """Bytes of stream data it took; hand them back with
    :meth:`Connection.consumed` once the application has it."""


@dataclass(frozen=True, slots=True)
class DatagramReceived:
    connection: Connection
    stanza: Element


@dataclass(frozen=True, slots=True)
class StanzasAcknowledged:
    connection: Connection
    count: int
    total: int


@dataclass(frozen=True)
class SessionEnded:
    """``connection`` is over; ``ended`` says how, with every stanza the
    application handed over that the peer did not acknowledge."""

    connection: Connection
    ended: sc.SessionEnded


@dataclass(frozen=True)
class SessionSuspended:
    """``connection`` lost its QUIC connection (``error``); it waits to be
    resumed (``EndpointConfig.resume_timeout``). Stanzas sent meanwhile
    wait with the unacknowledged ones."""

    connection: Connection
    error: DtxError


@dataclass(frozen=True)
class SessionResumed:
    """``connection`` goes on over a new QUIC connection: the peer had
    handled ``acknowledged`` more stanzas, ``resent`` went out again."""

    connection: Connection
    acknowledged: int
    resent: int


@dataclass(frozen=True)
class HandshakeRefused:
    """A remote device's handshake ended before it opened a session: its key
    was refused (``refused``) or it failed or timed out."""

    address: Address
    error: DtxError
    refused: bool


@dataclass(frozen=True)
class PathChangedEvent:
    """The path to ``peer_jid`` changed; ``connections`` run over it."""

    peer_jid: str
    change: PathChanged
    connections: tuple[Connection, ...]


EndpointEvent = (
    HandshakeConfirmed | SessionOpened | StanzaReceived | DatagramReceived
    | StanzasAcknowledged | SessionEnded | HandshakeRefused | PathChangedEvent
    | SessionSuspended | SessionResumed
    | Registered | RegistrationRefused | RegistrationLost
    | IntroductionCompleted | IntroductionFailed
    | TurnEvent | BindingEvent | PortMapEvent
)


@dataclass(frozen=True)
class SessionStatistics:
    """A snapshot of one session's counters."""

    stanzas_sent: int
    stanzas_received: int
    stanzas_acknowledged: int
    datagrams_sent: int
    datagrams_received: int
    datagrams_dropped: int
    bytes_sent: int
    bytes_received: int
    pings_answered: int
    log_suppressed: int
    unacknowledged: int
    received_unconsumed_bytes: int
    rtt_ms: float
    path: PathKind
    packets_lost: int = 0
    """QUIC packets this side declared lost (the congestion controller's count)."""
    losses_random: int = 0
    """Loss events the controller judged random: the window kept."""
    losses_congestive: int = 0
    """Loss events judged congestive: the window reduced."""
    packets_sent_twice: int = 0
    """Datagrams of small exchanges sent a second time after a loss."""
    receive_gaps: int = 0
    """Gaps in the packet numbers of the peer's packets (its losses, or
    reordering), seen by this side."""


@dataclass(frozen=True)
class EndpointStatistics:
    """A snapshot of a device's counters (the traversal's included)."""

    sessions: int
    half_open: int
    links: int
    registered: bool
    counters: dict[str, int]


# -- one connection -----------------------------------------------------------


class Connection:
    """One session: QUIC, the XML stream on it, and the path it runs on.

    Made by :meth:`Endpoint.connect` (this side initiates) or by the
    endpoint for a remote device's handshake. The application's handle:
    what it calls here is queued and goes out with the endpoint's next
    :meth:`Endpoint.datagrams_to_send`.
    """

    def __init__(self, endpoint: Endpoint, quic: auth.AuthenticatedQuicConnection,
                 core: sc.XmlSession, address: Address, *, initiator: bool, now: float,
                 sid: str, log: logging.LoggerAdapter[logging.Logger],
                 link: Link | None, fixed_path: PathKind) -> None:
        self._endpoint = endpoint
        self.quic = quic
        self.core = core
        self.address = address
        self.initiator = initiator
        self.sid = sid
        self.log = log
        self.link = link
        self.fixed_path = fixed_path
        self.started_at = now
        self.last_rx = now
        self._last_keepalive = now
        self.opened = False
        self.ended: sc.SessionEnded | None = None
        self.peer_key: bytes | None = None
        """The key the peer authenticated with (None before the handshake)."""
        self.resume_deadline: float | None = None
        """While suspended: when the session ends if not resumed by then."""
        self.resume_next: float | None = None
        """Initiator, suspended: when to try again."""
        self.resume_attempts = 0
        self.resuming_since: float | None = None
        """Initiator: an attempt to resume is in flight since then."""
        self._unconsumed = 0
        self._timer_at: float | None = None
        cfg = endpoint.config
        # the credit policy's thresholds, computed once
        self._pause_bytes = cfg.receive_buffer_bytes
        self._pause_waiting = (cfg.session.max_unacknowledged_stanzas + 1) // 2
        self._pause_waiting_bytes = (cfg.session.max_unacknowledged_bytes + 1) // 2

    # -- reading ------------------------------------------------------------------

    @property
    def peer_jid(self) -> str | None:
        """The JID the peer authenticated as (None before its key is checked)."""
        return self.core.peer_jid

    @property
    def local_jid(self) -> str:
        return self._endpoint.jid

    @property
    def is_open(self) -> bool:
        return self.core.is_open

    @property
    def stream_id(self) -> str | None:
        return self.core.stream_id

    @property
    def unacknowledged(self) -> tuple[Element, ...]:
        return self.core.unacknowledged

    @property
    def path(self) -> PathKind:
        """The path now carrying this session."""
        if self.link is None or self.link.paths.kind is None:
            return self.fixed_path
        return self.link.paths.kind

    def path_history(self) -> list[tuple[float, PathKind]]:
        """(seconds since the session started, path) for every path change."""
        if self.link is None:
            return [(0.0, self.fixed_path)]
        return [(max(0.0, at - self.started_at), kind) for at, kind in self.link.paths.history]

    def max_datagram_bytes(self) -> int:
        return self.core.max_datagram_bytes()

    def statistics(self) -> SessionStatistics:
        s = self.core.statistics
        cc = self.quic.congestion
        return SessionStatistics(
            stanzas_sent=s.stanzas_sent,
            stanzas_received=s.stanzas_received,
            stanzas_acknowledged=s.stanzas_acknowledged,
            datagrams_sent=s.datagrams_sent,
            datagrams_received=s.datagrams_received,
            datagrams_dropped=s.datagrams_dropped,
            bytes_sent=s.bytes_sent,
            bytes_received=s.bytes_received,
            pings_answered=s.pings_answered,
            log_suppressed=s.log_suppressed,
            unacknowledged=len(self.core.unacknowledged),
            received_unconsumed_bytes=self._unconsumed,
            rtt_ms=round(self.quic.smoothed_rtt * 1000, 3),
            path=self.path,
            packets_lost=0 if cc is None else cc.packets_lost,
            losses_random=0 if cc is None else cc.losses_random,
            losses_congestive=0 if cc is None else cc.losses_congestive,
            packets_sent_twice=self.quic.datagrams_duplicated,
            receive_gaps=self.quic.receive_gaps,
        )

    # -- user calls ---------------------------------------------------------------

    def send(self, stanza: Element) -> None:
        """Queue ``stanza`` on the reliable stream (kept until acknowledged)."""
        self.core.send(stanza)
        self._endpoint._dirty.add(self)

    def send_datagram(self, stanza: Element) -> None:
        """Send ``stanza`` in one unreliable DATAGRAM frame."""
        self.core.send_datagram(stanza)
        self._endpoint._dirty.add(self)

    def request_ack(self) -> None:
        """Ask the peer to acknowledge what it has (someone waits for it)."""
        if self.core.waiting:
            self.core.request_ack()
            self._endpoint._dirty.add(self)

    def consumed(self, size: int) -> bool:
        """The application took a received stanza of ``size`` bytes; grant
        the sender credit again once the backlog is small. True when that
        happened now (there is something to transmit)."""
        self._unconsumed -= size
        # Consuming can only lift a pause, never start one.
        return self.quic.receive_paused and self._credit()

    def has_room(self) -> bool:
        """Whether what waits for the peer's acknowledgement is under half
        the session's bounds (``Session.drain`` waits for this)."""
        return self.core.has_room(0.5)

    def _credit(self) -> bool:
        """The receive-credit policy: no QUIC credit for a peer while the
        application has not consumed ``receive_buffer_bytes`` of its
        stanzas, or while half the unacknowledged bound waits on it (the
        answers it asked for and does not acknowledge); credit again below
        a quarter of both. True when credit was granted again just now."""
        core = self.core
        if not self.quic.receive_paused:
            # (the same thresholds as Connection.has_room, which drain() waits on)
            if self._unconsumed > self._pause_bytes or core.waiting >= self._pause_waiting \
                    or core.unacknowledged_bytes >= self._pause_waiting_bytes:
                self.quic.receive_paused = True
            return False
        if self._unconsumed <= self._pause_bytes // 4 \
                and core.waiting < self._pause_waiting // 2 \
                and core.unacknowledged_bytes < self._pause_waiting_bytes // 2:
            self.quic.receive_paused = False
            self._endpoint._dirty.add(self)
            return True
        return False

    def close(self) -> None:
        """Close gracefully: everything queued is delivered first; a
        :class:`SessionEnded` follows (at once, with what waits, for a
        suspended session)."""
        if self.resume_deadline is not None:
            self._endpoint._end_suspended(self, "closed while suspended")
            return
        self.core.close()
        self._endpoint._dirty.add(self)

    def abort(self, reason: str = "aborted") -> None:
        """End at once; unacknowledged stanzas come back in :class:`SessionEnded`."""
        if self.resume_deadline is not None:
            self._endpoint._end_suspended(self, reason)
            return
        self.core.abort(reason)
        self._endpoint._dirty.add(self)

    def end(self, error: DtxError) -> None:
        """Forget this connection now, with ``error`` (a close that timed
        out): a :class:`SessionEnded` follows at once."""
        if self.ended is None:
            self.core.abort(str(error))
            self._endpoint._terminate(self, sc.SessionEnded(error, self.core.unacknowledged))

    # -- the endpoint's side --------------------------------------------------------

    def _timer(self, cfg: EndpointConfig) -> float | None:
        when = self.quic.get_timer()
        core_at = self.core.get_timer()
        if core_at is not None and (when is None or core_at < when):
            when = core_at
        if self.opened:
            ka = max(self.last_rx, self._last_keepalive) + cfg.keepalive_interval
            if when is None or ka < when:
                when = ka
        elif not self.initiator:
            deadline = self.started_at + cfg.handshake_timeout
            if when is None or deadline < when:
                when = deadline
        return when

    def __repr__(self) -> str:
        return f"<Connection {self.sid} {self.peer_jid or '?'} at {self.address}>"


class _Adapter(logging.LoggerAdapter):  # type: ignore[type-arg]
    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"[{self.extra['sid']}] {msg}", kwargs  # type: ignore[index]


# -- the endpoint -------------------------------------------------------------


class Endpoint:
    """One device on one UDP socket, sans-IO.

    ``verify`` decides whether a key may speak for a JID (it raises
    :class:`~dtx.errors.TrustError`); it is called inside the handshake.
    ``listen``: accept handshakes and introductions from remote devices.
    ``rendezvous``: register there (host candidates ``host_candidates``)
    so that :meth:`introduce` works.
    """

    def __init__(
        self,
        identity: DeviceIdentity,
        verify: Verify,
        *,
        rng: random.Random,
        config: EndpointConfig | None = None,
        listen: bool = True,
        rendezvous: Address | None = None,
        host_candidates: Sequence[Address] = (),
    ) -> None:
        self.identity = identity
        self.jid = str(identity.jid)
        self.config = config or EndpointConfig()
        self.listening = listen
        self._verify = verify
        self._rng = rng
        self._certificate: Any = None
        """The device's self-signed certificate, made with the first
        connection (its module and the QUIC engine load by then)."""
        self._connections: dict[Address, Connection] = {}
        self._dirty: set[Connection] = set()
        self._events: deque[EndpointEvent] = deque()
        self._out_turn: list[tuple[bytes, Address]] = []
        self._sid_next = 1
        self._log = LogLimiter(logger)
        self.counters: dict[str, int] = {
            "handshakes_refused": 0,
            "handshakes_failed": 0,
            "datagrams_dropped": 0,
            "connections_refused": 0,
            "half_open_refused_per_ip": 0,
            "half_open_evicted": 0,
            "half_open_expired": 0,
            "retry_sent": 0,
            "retry_validated": 0,
            "retry_token_invalid": 0,
            "connections_superseded": 0,
            "initial_copies_joined": 0,
            "initial_copies_dropped": 0,
            "sessions_suspended": 0,
            "sessions_resumed": 0,
            "resume_attempts": 0,
            "resume_refused": 0,
            "resume_expired": 0,
        }
        self._suspended: dict[str, Connection] = {}
        """Suspended sessions by resumption id (``resume_timeout``)."""
        self._now = 0.0
        """The latest time an input gave."""
        self.traversal = Traversal(
            jid=self.jid,
            key=identity.public_key,
            sign=identity.sign,
            server=rendezvous,
            host_candidates=host_candidates,
            accept_introductions=listen,
            rng=random.Random(rng.getrandbits(64)),
            config=self.config.traversal,
        )
        """Links to introduced devices (introductions from the rendezvous, if
        there is one, or from :meth:`introduced`)."""
        self.turn: TurnClient | None = None
        self.stun: BindingClient | None = None
        self._retry = RetryTokens(self._rng.getrandbits(256).to_bytes(32, "big"),
                                  lifetime=self.config.retry_token_lifetime)
        self._out_stateless: list[tuple[bytes, Address]] = []
        """Retry packets: answers that keep no connection."""
        self.portmap: PortMapClient | None = None
        """The port mapping on the router (:meth:`use_port_mapping`)."""
        """The STUN Binding asking for this socket's reflexive address."""
        """The TURN allocation relaying for this device, if any (:meth:`use_turn`)."""
        self._started = False
        self._closed = False

    # -- lifecycle ----------------------------------------------------------------

    def start(self, now: float) -> None:
        """Begin: register with the rendezvous, if there is one."""
        if not self._started:
            self._started = True
            self.traversal.start(now)
            self._drain_traversal()

    def close(self, now: float | None = None) -> None:
        """Stop: abort every connection still open, unregister and (given
        ``now``) delete the port mapping (the last datagrams go out with
        the next :meth:`datagrams_to_send`; the router's answer, while the
        driver still reads, ends in a MappingClosed event)."""
        if self._closed:
            return
        for conn in list(self._connections.values()):
            conn.abort("device shut down")
        for conn in list(self._suspended.values()):
            self._end_suspended(conn, "device shut down")
        self.traversal.close()
        if self.portmap is not None and now is not None:
            self.portmap.close(now)
        self._closed = True

    # -- user calls ---------------------------------------------------------------

    def connect(self, jid: str, now: float, *, address: Address | None = None,
                path: PathKind = PathKind.DIRECT,
                resume: sc.ResumeState | None = None) -> Connection:
        """Open a session with ``jid``: at ``address``, or, without one,
        over the link an introduction made (:meth:`introduce`).

        A :class:`HandshakeConfirmed` follows once the peer's key is
        trusted (the connection may send from then on), or a
        :class:`SessionEnded`. ``path`` names a fixed path (``lan`` for an
        mDNS find) when ``address`` is given. Raises
        :class:`~dtx.errors.ConnectError` when there is no address, no
        link, or a session at that address already. With ``resume`` (a
        suspended session's :meth:`XmlSession.export`), the new stream asks
        to resume that session instead of opening one: a
        :class:`SessionResumed`, or a :class:`SessionEnded` when refused.
        """
        link: Link | None = None
        if address is None:
            link = self.traversal.link_for(jid)
            if link is None:
                if self.traversal.client is None:
                    raise ConnectError(f"no address for {jid} and no rendezvous configured")
                raise ConnectError(f"no introduction to {jid} yet")
            address = link.mapped
        if address in self._connections:
            raise ConnectError(f"a session with {address[0]}:{address[1]} already exists")
        conn = self._new_connection(address, initiator=True, expected=jid, now=now,
                                    link=link, fixed_path=path, resume=resume)
        if resume is not None:
            conn.opened = True
            conn.resuming_since = now
            self._suspended[resume.resume_id] = conn
            conn.resume_deadline = now + (self.config.resume_timeout or
                                          self.config.handshake_timeout)
        conn.quic.connect(address, now=now)
        self._dirty.add(conn)
        return conn

    def introduce(self, target: str, now: float) -> None:
        """Ask the rendezvous to introduce ``target``; an
        :class:`IntroductionCompleted` or :class:`IntroductionFailed` follows."""
        if self.traversal.client is None:
            raise ConnectError("no rendezvous configured")
        self.traversal.introduce(target, now)
        self._drain_traversal()

    def introduced(self, intro: Introduction, now: float) -> Link | None:
        """An introduction from another source (XMPP signalling, the LAN)."""
        link = self.traversal.introduced(intro, now)
        self._drain_traversal()
        return link

    def set_port_mapped(self, port_mapped: Address | None, now: float) -> None:
        """This socket's port mapping on the router, or None when it is
        gone: offered to the rendezvous as a candidate (see
        :meth:`Traversal.set_port_mapped`). :meth:`use_port_mapping` calls
        it as the router answers; a driver with a mapping of its own may."""
        self.traversal.set_port_mapped(port_mapped, now)
        self._drain_traversal()

    def use_port_mapping(self, client: PortMapClient, now: float) -> None:
        """Ask the router for a port mapping of this socket through
        ``client`` (PCP, NAT-PMP), from this socket: datagrams from the
        gateway's port go to it, the mapping it gets becomes this device's
        port-mapped candidate (renewed, moved, lost with it), and its events
        come out of :meth:`next_event`. :meth:`close` deletes the mapping."""
        self.portmap = client
        client.start(now)
        self._drain_portmap(now)

    def use_stun(self, client: BindingClient, now: float) -> None:
        """Ask ``client``'s STUN server for this socket's reflexive address:
        datagrams from that server go to it (a TURN server's go to TURN
        first), and its :class:`~dtx.proto.binding.ReflexiveFound` or
        :class:`~dtx.proto.binding.ReflexiveFailed` comes out of
        :meth:`next_event`. Replaces an earlier one."""
        self.stun = client
        client.start(now)

    def use_turn(self, client: TurnClient, now: float) -> None:
        """Relay through ``client``'s TURN server (credentials from XEP-0215,
        say): datagrams from that server go to it, what it relays from a
        peer reaches the link whose ``relay_peer`` that is, and its events
        come out of :meth:`next_event`. Allocates at once unless it already
        did; the previous client, if any, is closed."""
        if self.turn is not None and self.turn is not client:
            self.turn.close(now)
            self._out_turn.extend(self.turn.datagrams_to_send())
        self.turn = client
        if client.state is TurnState.IDLE:
            client.allocate(now)
        self._drain_turn(now)

    def connections(self) -> list[Connection]:
        return list(self._connections.values())

    @property
    def registered(self) -> bool:
        return self.traversal.registered

    def statistics(self) -> EndpointStatistics:
        counters = dict(self.counters)
        counters["log_suppressed"] = self._log.suppressed + sum(
            c.core.statistics.log_suppressed for c in self._connections.values())
        counters["log_suppressed"] += self.traversal.log_suppressed
        for name, n in self.traversal.counters.items():
            counters[f"traversal_{name}"] = n
        return EndpointStatistics(
            sessions=sum(1 for c in self._connections.values() if c.opened),
            half_open=sum(1 for c in self._connections.values() if self._half_open(c)),
            links=len(self.traversal.links),
            registered=self.registered,
            counters=counters,
        )

    # -- datagrams in -------------------------------------------------------------

    def receive_datagram(self, data: bytes, addr: Address, now: float) -> None:
        """One UDP datagram from ``addr``. Never raises for bad input: it is
        counted and dropped, or ends the connection it belongs to."""
        self._now = now
        turn = self.turn
        if turn is not None and addr == turn.server:
            # Before the first byte: ChannelData (64–79) from the TURN
            # server is TURN, not QUIC.
            turn.receive(data, now)
            self._drain_turn(now)
            return
        stun = self.stun
        if stun is not None and addr == stun.server:
            stun.receive(data, now)
            self._drain_stun()
            return
        portmap = self.portmap
        if portmap is not None and addr == portmap.gateway:
            portmap.receive_datagram(data, addr, now)
            self._drain_portmap(now)
            return
        kind = classify(data)
        if kind is PacketKind.QUIC:
            if self.traversal.links:
                mapped = self.traversal.map_incoming(addr, now)
                if mapped is not None:
                    addr = mapped
            self._quic_datagram(data, addr, now)
        elif kind is PacketKind.DTX and self.traversal.busy:
            relayed = self.traversal.receive_dtx(data, addr, now)
            if relayed is not None:
                self._quic_datagram(relayed[0], relayed[1], now)
            self._drain_traversal()
        else:
            self.counters["datagrams_dropped"] += 1

    def receive_side_datagram(self, socket: int, data: bytes, addr: Address,
                              now: float) -> None:
        """One UDP datagram from ``addr`` on extra socket ``socket`` (a
        birthday search's; :meth:`side_sockets`). Never raises."""
        traversal = self.traversal
        if traversal.receive_side(socket, data, addr, now):
            mapped = traversal.map_incoming(addr, now)
            if mapped is not None:
                self._quic_datagram(data, mapped, now)
        self._drain_traversal()

    @property
    def side_busy(self) -> bool:
        """Whether the driver must look at the extra sockets (cheap)."""
        return self.traversal.side_busy

    def side_sockets(self) -> set[int]:
        """The extra sockets to hold open now, by id (a driver opens a UDP
        socket on the device's local address for each id it does not have,
        and closes those no longer named)."""
        return self.traversal.side_sockets()

    def side_datagrams_to_send(self) -> list[tuple[int, bytes, Address]]:
        """(socket, payload, destination) to send from the extra sockets;
        call after :meth:`datagrams_to_send`."""
        return self.traversal.side_datagrams_to_send()

    def _quic_datagram(self, data: bytes, addr: Address, now: float) -> None:
        conn = self._connections.get(addr)
        # (an Initial is rare on a connection: one byte decides for the rest)
        if conn is not None and data[0] & 0xF0 == 0xC0 and self._new_client(conn, data):
            self._supersede(conn)
            conn = None
        if conn is None:
            conn = self._same_handshake(data, addr)
            if conn is not None and conn.address != addr:
                return  # another copy of an Initial under way elsewhere (counted)
        if conn is None:
            conn = self._admit(data, addr, now)
            if conn is None:
                return
        conn.last_rx = now
        conn.quic.receive_datagram(data, addr, now)
        self._process(conn)
        self._dirty.add(conn)

    @staticmethod
    def _new_client(conn: Connection, data: bytes) -> bool:
        """Whether ``data`` is a QUIC Initial of another connection than
        ``conn`` (an accepted one) from a peer that was introduced again
        since ``conn`` began: the peer device started afresh (a new
        process registers again, from a new socket) and the old one is
        gone. A source that could only spoof the peer's address cannot
        make a new introduction: that takes the peer's key."""
        link = conn.link
        if conn.initiator or link is None or link.introduced_at <= conn.started_at:
            return False
        dcid = _initial_dcid(data)
        return dcid is not None and not _addressed_to(conn, dcid)

    def _supersede(self, conn: Connection) -> None:
        """A restarted peer's new connection takes the place of ``conn``:
        its session is suspended when it can be resumed (the peer may be
        resuming it), otherwise it ends with its unacknowledged stanzas."""
        self.counters["connections_superseded"] += 1
        conn.log.info("%s connects afresh; its earlier connection is given up", conn.peer_jid)
        error = ConnectError("the peer connected afresh")
        if self.config.resume_timeout is not None and conn.opened \
                and conn.core.resume_id is not None:
            self._suspend(conn, error)
        else:
            self._end(conn, sc.SessionEnded(error, conn.core.unacknowledged))

    def _half_open(self, conn: Connection) -> bool:
        return not conn.initiator and not conn.opened and conn.ended is None

    def _admit(self, data: bytes, addr: Address, now: float) -> Connection | None:
        """A new listening-side connection for a QUIC Initial from ``addr``, or None.

        Unauthenticated handshakes ("half-open") are bounded: at most
        ``max_half_open_per_ip`` per source IP (the oldest of that IP makes
        room) and ``max_half_open`` in all (the oldest of the IP holding
        the most makes room); each expires ``handshake_timeout`` after it
        began, on the timer. Dropped ones
        are forgotten without a reply: their source never proved its
        address. Refusals are counted and logged rate-limited.
        """
        counters = self.counters
        if not self.listening or self._closed:
            counters["datagrams_dropped"] += 1
            return None
        try:
            header = quic_packet.pull_quic_header(Buffer(data=data), host_cid_length=8)
        except ValueError:
            counters["datagrams_dropped"] += 1
            logger.debug("dropped a non-QUIC datagram from %s", addr)
            return None
        if header.packet_type != quic_packet.QuicPacketType.INITIAL or len(data) < 1200:
            counters["datagrams_dropped"] += 1
            return None
        cfg = self.config
        half_open = [c for c in self._connections.values() if self._half_open(c)]
        original_dcid, retry_scid = header.destination_cid, None
        if header.token:
            odcid = self._retry.validate(addr, header.token, header.destination_cid, now)
            if odcid is None:
                # Forged, stale, or another source's: RFC 9000 section 8.1.3
                # allows a new Retry, but a spoofer would only get more.
                counters["retry_token_invalid"] += 1
                self._log.warning("retry_token_invalid", addr[0],
                                  "an Initial from %s with a bad Retry token: dropped", addr[0])
                return None
            original_dcid, retry_scid = odcid, header.destination_cid
            counters["retry_validated"] += 1
        elif len(half_open) >= cfg.retry_half_open:
            self._send_retry(header, addr, now)
            return None
        same_ip = [c for c in half_open if c.address[0] == addr[0]]
        if len(same_ip) >= cfg.max_half_open_per_ip:
            # The oldest handshake from that IP makes room: every device of
            # a home shares its IP, and a real handshake takes one round
            # trip, so a trickle of Initials cannot keep a device out.
            counters["half_open_refused_per_ip"] += 1
            self._log.warning("half_open_per_ip", addr[0],
                              "too many handshakes from %s; dropping its oldest", addr[0])
            oldest = min(same_ip, key=lambda c: c.started_at)
            self._drop(oldest, "half_open_evicted")
            half_open.remove(oldest)
        if len(half_open) >= cfg.max_half_open:
            # Room is made at the expense of the IP holding the most
            # handshakes (its oldest one), never of a lone device's.
            by_ip: dict[str, list[Connection]] = {}
            for c in half_open:
                by_ip.setdefault(c.address[0], []).append(c)
            crowd = max(by_ip.values(), key=len)
            self._drop(min(crowd, key=lambda c: c.started_at), "half_open_evicted")
        if len(self._connections) >= cfg.max_connections:
            counters["connections_refused"] += 1
            self._log.warning("connections_full", None, "connection table full; refusing %s",
                              addr)
            return None
        link = self.traversal.link_for_mapped(addr)
        return self._new_connection(addr, initiator=False, expected=None, now=now,
                                    original_dcid=original_dcid, retry_scid=retry_scid,
                                    link=link, fixed_path=PathKind.DIRECT)

    def _send_retry(self, header: Any, addr: Address, now: float) -> None:
        """Answer an Initial with a Retry: the client comes back with the
        token from the address it claims, or (spoofed) never does."""
        scid = self._rng.getrandbits(64).to_bytes(8, "big")
        token = self._retry.issue(addr, header.destination_cid, scid, now)
        self._out_stateless.append((quic_packet.encode_quic_retry(
            header.version, source_cid=scid, destination_cid=header.source_cid,
            original_destination_cid=header.destination_cid, retry_token=token), addr))
        self.counters["retry_sent"] += 1

    def _drop(self, conn: Connection, counter: str) -> None:
        """Forget a half-open connection without a word to its source."""
        self.counters[counter] += 1
        self._forget(conn)
        self._dirty.discard(conn)
        conn.ended = sc.SessionEnded(ConnectError(f"handshake dropped ({counter})"), ())
        self._released(conn.link)

    # -- datagrams out --------------------------------------------------------------

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Address]]:
        """Everything to send now: (payload, destination) pairs. TURN's own
        requests go first: a permission or channel binding asked for in the
        same batch as the data that needs it reaches the server before it
        (coturn drops a Send indication to a peer it has no permission for)."""
        out: list[tuple[bytes, Address]] = []
        turn = self.turn
        if turn is not None:
            out.extend(turn.datagrams_to_send())
        if self.stun is not None:
            out.extend(self.stun.datagrams_to_send())
        if self.portmap is not None:
            out.extend(self.portmap.datagrams_to_send(now))
        if self._out_turn:
            out.extend(self._out_turn)
            self._out_turn.clear()
        traversal = self.traversal
        if self._out_stateless:
            for data, addr in self._out_stateless:
                if traversal.link_for_mapped(addr) is not None:
                    out.extend(traversal.route(data, addr, now))  # through the relay
                else:
                    out.append((data, addr))
            self._out_stateless.clear()
        dirty, self._dirty = self._dirty, set()
        for conn in dirty:
            conn._credit()
            conn.core.flush(now)
            if conn.link is not None:
                route = traversal.route
                for data, addr in conn.quic.datagrams_to_send(now=now):
                    out.extend(route(data, addr, now))
            else:
                out.extend(conn.quic.datagrams_to_send(now=now))
            # Events may appear on transmit (the idle timeout fired, say).
            self._process(conn)
            if conn.ended is None:
                conn._timer_at = conn._timer(self.config)
        if traversal.busy:
            self._drain_traversal()
            out.extend(traversal.datagrams_to_send())
        if turn is not None:
            out.extend(turn.datagrams_to_send())
        return out

    def next_event(self) -> EndpointEvent | None:
        return self._events.popleft() if self._events else None

    @property
    def has_events(self) -> bool:
        """Whether :meth:`next_event` has something (cheap)."""
        return bool(self._events)

    # -- the timer ------------------------------------------------------------------

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` wants calling (the earliest of every
        connection's, the traversal's and the half-open expiry); read it
        after :meth:`datagrams_to_send`, as a driver does."""
        when = self.traversal.get_timer() if self.traversal.busy else None
        for client in (self.turn, self.stun, self.portmap):
            t = None if client is None else client.get_timer()
            if t is not None and (when is None or t < when):
                when = t
        for conn in self._connections.values():
            t = conn._timer_at
            if t is not None and (when is None or t < when):
                when = t
        for conn in self._suspended.values():
            for t in (conn.resume_deadline, conn.resume_next,
                      None if conn.resuming_since is None
                      else conn.resuming_since + self.config.handshake_timeout):
                if t is not None and (when is None or t < when):
                    when = t
        return when

    def handle_timer(self, now: float) -> None:
        cfg = self.config
        self._now = now
        if self._suspended:
            self._service_suspended(now)
        if self.turn is not None:
            due = self.turn.get_timer()
            if due is not None and now >= due:
                self.turn.handle_timer(now)
                self._drain_turn(now)
        stun = self.stun
        if stun is not None:
            due = stun.get_timer()
            if due is not None and now >= due:
                stun.handle_timer(now)
                self._drain_stun()
        portmap = self.portmap
        if portmap is not None:
            due = portmap.get_timer()
            if due is not None and now >= due:
                portmap.handle_timer(now)
                self._drain_portmap(now)
        due = self.traversal.get_timer()
        if due is not None and now >= due:
            self.traversal.handle_timer(now)
            self._drain_traversal()
        for conn in list(self._connections.values()):
            if conn._timer_at is None or now < conn._timer_at:
                continue
            if self._half_open(conn) and now >= conn.started_at + cfg.handshake_timeout:
                self._drop(conn, "half_open_expired")
                continue
            conn.core.handle_timer(now)
            quic_at = conn.quic.get_timer()
            if quic_at is not None and quic_at <= now:
                conn.quic.handle_timer(now=now)
            if conn.opened and conn.is_open and \
                    now >= max(conn.last_rx, conn._last_keepalive) + cfg.keepalive_interval:
                conn._last_keepalive = now
                conn.quic.send_ping(0)
            self._process(conn)
            self._dirty.add(conn)

    # -- the machinery ----------------------------------------------------------------

    def _new_connection(self, address: Address, *, initiator: bool, expected: str | None,
                        now: float, link: Link | None, fixed_path: PathKind,
                        original_dcid: bytes | None = None,
                        retry_scid: bytes | None = None,
                        resume: sc.ResumeState | None = None) -> Connection:
        quic, core, sid, log = self._machines(initiator=initiator, expected=expected,
                                              original_dcid=original_dcid,
                                              retry_scid=retry_scid, resume=resume)
        conn = Connection(self, quic, core, address, initiator=initiator, now=now, sid=sid,
                          log=log, link=link, fixed_path=fixed_path)
        self._connections[address] = conn
        if link is not None:
            self.traversal.idle(link.peer_jid, None)
        return conn

    def device_certificate(self) -> Any:
        """This device's self-signed certificate (an X.509 certificate of
        ``cryptography``), made on first use (with the first connection, or
        when signalling needs its fingerprint)."""
        if self._certificate is None:
            self._certificate = auth.make_certificate(self.identity.private_key, self.jid)
        return self._certificate

    def _machines(self, *, initiator: bool, expected: str | None,
                  original_dcid: bytes | None = None, retry_scid: bytes | None = None,
                  resume: sc.ResumeState | None = None,
                  ) -> tuple[auth.AuthenticatedQuicConnection, sc.XmlSession, str,
                             logging.LoggerAdapter[logging.Logger]]:
        """A QUIC connection and the XML stream on it (resuming ``resume``)."""
        cfg = self.config
        qconf = auth.quic_configuration(
            is_client=initiator,
            private_key=self.identity.private_key,
            certificate=self.device_certificate(),
            idle_timeout=cfg.idle_timeout,
            # The receiver's own limit: no DATAGRAM frame larger than a packet.
            max_datagram_frame_size=cfg.max_datagram_size if cfg.datagrams else None,
            max_datagram_size=cfg.max_datagram_size,
            congestion_control=cfg.congestion_control,
        )
        quic = auth.AuthenticatedQuicConnection(
            configuration=qconf,
            check=sc.trust_check_for(self._verify, expected),
            original_destination_connection_id=original_dcid,
            retry_source_connection_id=retry_scid,
        )
        quic.duplicate_after_loss = cfg.duplicate_after_loss
        sid = f"{self._sid_next:x}"
        self._sid_next += 1
        log = _Adapter(logger, {"sid": sid})
        core = sc.XmlSession(
            quic,
            local_jid=self.jid,
            peer_jid=expected,
            config=dataclasses.replace(cfg.session, max_datagram_size=cfg.max_datagram_size),
            rng=random.Random(self._rng.getrandbits(64)),
            logger=log,
            resume=resume,
        )
        return quic, core, sid, log

    # -- resumption ---------------------------------------------------------------------

    def _suspend(self, conn: Connection, error: DtxError) -> None:
        """The connection died under an open session: keep the session for
        ``resume_timeout``; the initiator tries to resume it at once."""
        cfg = self.config
        assert cfg.resume_timeout is not None
        resume_id = conn.core.resume_id
        assert resume_id is not None
        now = self._now
        self._forget(conn)
        conn.core.suspend()
        conn.resume_deadline = now + cfg.resume_timeout
        conn.resume_attempts = 0
        conn.resume_next = now if conn.initiator else None
        self._suspended[resume_id] = conn
        self.counters["sessions_suspended"] += 1
        conn.log.info("connection to %s lost (%s); the session waits %.0f s to be resumed",
                      conn.peer_jid, error, cfg.resume_timeout)
        self._events.append(SessionSuspended(conn, error))
        while len(self._suspended) > cfg.max_suspended:
            oldest = min(self._suspended.values(), key=lambda c: c.resume_deadline or 0.0)
            self._end_suspended(oldest, "too many suspended sessions")

    def _end_suspended(self, conn: Connection, why: str) -> None:
        """End a suspended session now (an attempt to resume in flight is
        dropped)."""
        if conn.resuming_since is not None:
            self._forget(conn)
            conn.resuming_since = None
        self._give_up(conn, why)

    def _give_up(self, conn: Connection, why: str) -> None:
        self.counters["resume_expired"] += 1
        conn.log.info("session with %s not resumed: %s", conn.peer_jid, why)
        self._end(conn, sc.SessionEnded(SessionClosedError(f"session not resumed: {why}"),
                                        conn.core.unacknowledged))

    def _service_suspended(self, now: float) -> None:
        cfg = self.config
        for conn in list(self._suspended.values()):
            if conn.resume_deadline is not None and now >= conn.resume_deadline:
                self._end_suspended(conn, f"no new connection within {cfg.resume_timeout:g} s")
            elif conn.resuming_since is not None:
                if now >= conn.resuming_since + cfg.handshake_timeout:
                    self._attempt_failed(conn, SessionClosedError("no answer to resume"))
            elif conn.resume_next is not None and now >= conn.resume_next:
                self._attempt(conn, now)

    def _attempt(self, conn: Connection, now: float) -> None:
        """Initiator: a new QUIC connection to the peer, resuming the session."""
        address = conn.link.mapped if conn.link is not None else conn.address
        conn.resume_next = None
        if address in self._connections:  # (something else talks there: later)
            self._schedule_attempt(conn, now)
            return
        state = conn.core.export()
        quic, core, _, _ = self._machines(initiator=True, expected=state.peer_jid,
                                          resume=state)
        conn.quic, conn.core, conn.address = quic, core, address
        conn.resuming_since = now
        conn.last_rx = conn._last_keepalive = now
        conn.resume_attempts += 1
        self.counters["resume_attempts"] += 1
        self._connections[address] = conn
        quic.connect(address, now=now)
        self._dirty.add(conn)
        if conn.resume_attempts == 1 and conn.link is not None \
                and self.traversal.client is not None and self.traversal.client.registered:
            # Fresh candidates and relay channels for both sides, once (a
            # failed introduction is retried by the traversal's back-off).
            self.traversal.introduce(conn.link.peer_jid, now)
            self._drain_traversal()

    def _schedule_attempt(self, conn: Connection, now: float) -> None:
        backoff = self.config.resume_backoff
        conn.resume_next = now + backoff[min(max(conn.resume_attempts - 1, 0), len(backoff) - 1)]

    def _attempt_failed(self, conn: Connection, error: DtxError | None) -> None:
        """An attempt to resume ended before the peer answered: the session
        waits again (a refused key ends it)."""
        self._forget(conn)
        conn.resuming_since = None
        conn.core.suspend()
        if isinstance(error, (TrustError, AuthenticationError)):
            self._give_up(conn, f"the peer's key was refused: {error}")
            return
        conn.log.debug("attempt %d to resume with %s failed: %s", conn.resume_attempts,
                       conn.peer_jid, error)
        self._schedule_attempt(conn, self._now)

    def _resumed(self, conn: Connection, acknowledged: int, resent: int) -> None:
        """Initiator: the peer took the session up on this connection."""
        resume_id = conn.core.resume_id
        if resume_id is not None:
            self._suspended.pop(resume_id, None)
        conn.resuming_since = conn.resume_deadline = conn.resume_next = None
        self.counters["sessions_resumed"] += 1
        self._events.append(SessionResumed(conn, acknowledged, resent))

    def _resume_failed(self, conn: Connection, reason: str) -> None:
        """Initiator: the peer has no such session (it restarted, say)."""
        conn.resuming_since = None
        self._give_up(conn, f"the peer refused ({reason})")

    def _resume_requested(self, new: Connection, req: sc.ResumeRequested) -> Connection:
        """Responder: ``new`` asks to resume ``req.previd``. Only the same
        device (the key the session was authenticated with) may; the stream
        then belongs to the suspended session's connection."""
        old = self._suspended.get(req.previd)
        why = None
        if old is None:
            why = "no such session"
        elif old.initiator or old.peer_key != new.peer_key or old.peer_jid != new.peer_jid:
            why = "another device's session"
        if old is None or why is not None:
            self.counters["resume_refused"] += 1
            self._log.warning("resume_refused", new.address[0],
                              "%s asked to resume a session: refused (%s)", new.peer_jid, why)
            new.core.refuse_resume(why or "refused")
            return new
        try:
            result = new.core.accept_resume(old.core.export(), req.h)
        except StreamError as exc:
            self.counters["resume_refused"] += 1
            self._log.warning("resume_refused", new.address[0],
                              "%s asked to resume with a bad count: %s", new.peer_jid, exc)
            new.core.refuse_resume(str(exc))
            return new
        del self._suspended[req.previd]
        if self._connections.get(new.address) is new:
            self._connections[new.address] = old
        self._dirty.discard(new)
        self._dirty.add(old)
        old.quic, old.core, old.address, old.link = new.quic, new.core, new.address, new.link
        old.last_rx = old._last_keepalive = self._now
        old.resume_deadline = None
        self.counters["sessions_resumed"] += 1
        self._events.append(SessionResumed(old, result.acknowledged, result.resent))
        return old

    def _process(self, conn: Connection) -> None:
        """Feed the connection's QUIC events to its XML stream and queue the
        resulting endpoint events. (Its credit and timer are brought up to
        date in :meth:`datagrams_to_send`, once per batch: every input marks
        the connection dirty.)"""
        quic, core, events = conn.quic, conn.core, self._events
        while (ev := quic.next_event()) is not None:
            for sev in core.handle_quic_event(ev):
                if type(sev) is sc.StanzaReceived:  # the hot path, first
                    conn._unconsumed += sev.size
                    events.append(StanzaReceived(conn, sev.stanza, sev.size))
                else:
                    conn = self._on_session_event(conn, sev)

    def _on_session_event(self, conn: Connection, sev: sc.SessionEvent) -> Connection:
        """Queue what ``sev`` means for the application; the connection the
        rest of this stream's events belong to (another when a resumption
        hands the stream to the session it resumes)."""
        events = self._events  # (StanzaReceived is handled inline in _process)
        if isinstance(sev, sc.StanzasAcknowledged):
            events.append(StanzasAcknowledged(conn, sev.count, sev.total))
        elif isinstance(sev, sc.DatagramReceived):
            events.append(DatagramReceived(conn, sev.stanza))
        elif isinstance(sev, sc.HandshakeConfirmed):
            credential = conn.quic.peer_credential
            conn.peer_key = None if credential is None else credential.key
            if conn.resuming_since is None:  # (an attempt to resume: the session goes on)
                events.append(HandshakeConfirmed(conn))
        elif isinstance(sev, sc.SessionOpened):
            conn.opened = True
            events.append(SessionOpened(conn))
        elif isinstance(sev, sc.SessionEnded):
            self._terminate(conn, sev)
        elif isinstance(sev, sc.ResumeRequested):
            return self._resume_requested(conn, sev)
        elif isinstance(sev, sc.SessionResumed):
            self._resumed(conn, sev.acknowledged, sev.resent)
        elif isinstance(sev, sc.ResumeFailed):
            self._resume_failed(conn, sev.reason)
        return conn

    def _forget(self, conn: Connection) -> None:
        """Out of the table and the timer (what it still has to send, a
        CONNECTION_CLOSE say, goes out with the next datagrams)."""
        if self._connections.get(conn.address) is conn:
            del self._connections[conn.address]
        conn._timer_at = None

    def _terminate(self, conn: Connection, ended: sc.SessionEnded) -> None:
        if conn.ended is not None:
            return
        if conn.resuming_since is not None:
            self._attempt_failed(conn, ended.error)
            return
        if self.config.resume_timeout is not None and conn.opened \
                and conn.core.connection_lost and ended.error is not None:
            self._suspend(conn, ended.error)
            return
        self._end(conn, ended)

    def _end(self, conn: Connection, ended: sc.SessionEnded) -> None:
        conn.ended = ended
        conn.resume_deadline = conn.resume_next = conn.resuming_since = None
        resume_id = conn.core.resume_id
        if resume_id is not None and self._suspended.get(resume_id) is conn:
            del self._suspended[resume_id]
        self._forget(conn)
        self._released(conn.link)
        if ended.error is not None and not conn.initiator and conn.core.peer_jid is None:
            refused = isinstance(ended.error, (TrustError, AuthenticationError))
            name = "handshakes_refused" if refused else "handshakes_failed"
            self.counters[name] += 1
            if refused:
                self._log.warning(name, conn.address[0], "handshake from %s refused: %s",
                                  conn.address, ended.error)
            else:
                self._log.info(name, conn.address[0], "handshake from %s failed: %s",
                               conn.address, ended.error)
            self._events.append(HandshakeRefused(conn.address, ended.error, refused))
        self._events.append(SessionEnded(conn, ended))

    def _released(self, link: Link | None) -> None:
        """A connection over ``link`` is gone: the link is idle if no other
        (open or suspended) uses it."""
        if link is not None and not any(
                c.link is link for c in (*self._connections.values(), *self._suspended.values())):
            self.traversal.idle(link.peer_jid, self._now)

    def _drain_turn(self, now: float) -> None:
        """Relayed QUIC datagrams into their connections; every other TURN
        event out to the application."""
        turn = self.turn
        if turn is None:
            return
        while (ev := turn.next_event()) is not None:
            if isinstance(ev, TurnDataReceived):
                # Only QUIC rides the relay; probes go on direct paths.
                payload = ev.payload
                if classify(payload) is PacketKind.QUIC:
                    mapped = self.traversal.map_relayed(ev.peer)
                    if mapped is not None:
                        self._quic_datagram(payload, mapped, now)
                        continue
                self.counters["datagrams_dropped"] += 1
            else:
                self._events.append(ev)

    def _drain_portmap(self, now: float) -> None:
        portmap = self.portmap
        while portmap is not None and (ev := portmap.next_event()) is not None:
            self._follow_mapping(ev, now)
            self._events.append(ev)

    def port_mapping_changed(self, event: PortMapEvent, now: float) -> None:
        """An event of a port-mapping client a driver runs itself (UPnP
        IGD, :mod:`dtx.aio.upnp`): the port-mapped candidate follows it,
        unless this endpoint's own client (PCP, NAT-PMP) holds a mapping,
        which is preferred."""
        own = self.portmap
        if own is None or own.state not in (PortMapState.MAPPED, PortMapState.RENEWING):
            self._follow_mapping(event, now)

    def _follow_mapping(self, ev: PortMapEvent, now: float) -> None:
        if isinstance(ev, (MappingCreated, MappingRenewed)):
            logger.info("port mapping by %s: %s for %d s", ev.protocol.value,
                        format_address(*ev.external), ev.lifetime)
            self.set_port_mapped(ev.external, now)
        elif isinstance(ev, MappingLost):
            self.set_port_mapped(None, now)

    def _drain_stun(self) -> None:
        stun = self.stun
        while stun is not None and (ev := stun.next_event()) is not None:
            self._events.append(ev)

    def _drain_traversal(self) -> None:
        traversal = self.traversal
        while (ev := traversal.next_event()) is not None:
            if isinstance(ev, LinkPathChanged):
                link = ev.link
                conns = tuple(c for c in self._connections.values() if c.link is link)
                self._events.append(PathChangedEvent(link.peer_jid, ev.change, conns))
            else:
                if isinstance(ev, IntroductionCompleted):
                    self._rehome(ev.link)
                self._events.append(ev)

    def _same_handshake(self, data: bytes, addr: Address) -> Connection | None:
        """The accepted handshake in progress that a copy of this Initial
        belongs to (None: it starts one), when the copy comes another way:
        the initiator sends its first
        Initial through the relay and straight to the peer's candidates at
        once, and the direct copy can come first from an address the link
        does not know yet (a peer behind a symmetric NAT, whose port toward
        this device no one has seen). The copy that arrives on the link's
        mapped address moves that handshake there (as :meth:`_rehome`
        does); a copy from an unknown address of a handshake the link has
        already is counted and dropped. Without this each copy would start
        a connection of its own, with its own keys, and neither would
        finish."""
        dcid = _initial_dcid(data)
        if dcid is None:
            return None
        for other in self._connections.values():
            if not self._half_open(other) or not _addressed_to(other, dcid):
                continue
            link = self.traversal.link_for_mapped(addr)
            if other.link is None and link is not None:
                self._move(other, link)
                self.counters["initial_copies_joined"] += 1
            else:
                self.counters["initial_copies_dropped"] += 1
            return other
        return None

    def _rehome(self, link: Link) -> None:
        """A handshake that began at one of ``link``'s real addresses before
        the introduction arrived (the initiator's direct copy of its Initial
        beat the server's INTRODUCTION) moves to the link's mapped address:
        the relayed copy of the same Initial then reaches the same
        connection instead of starting a second one with other keys."""
        if link.mapped in self._connections:
            return
        for addr, conn in list(self._connections.items()):
            if conn.link is None and not conn.initiator and not conn.opened \
                    and link.paths.knows(addr):
                self._move(conn, link)
                return

    def _move(self, conn: Connection, link: Link) -> None:
        """``conn``, begun at a real address, is ``link``'s from now on, at
        its mapped address."""
        old = conn.address
        del self._connections[old]
        conn.address, conn.link = link.mapped, link
        conn.quic.rehome(old, link.mapped)
        self._connections[link.mapped] = conn
        self.traversal.idle(link.peer_jid, None)


def _initial_dcid(data: bytes) -> bytes | None:
    """The destination connection id of a QUIC v1 Initial big enough to be
    one (RFC 9000 14.1), or None for any other datagram."""
    if len(data) < 1200 or data[0] & 0xF0 != 0xC0:
        return None
    return data[6:6 + data[5]]


def _addressed_to(conn: Connection, dcid: bytes) -> bool:
    """Whether a long-header packet with destination ``dcid`` is ``conn``'s:
    the id its client chose first, or one of this side's own ids (which
    the client uses once it has the first answer)."""
    quic = conn.quic
    return dcid == quic.original_destination_connection_id \
        or any(c.cid == dcid for c in quic._host_cids)


__all__ = [
    "Connection",
    "DatagramReceived",
    "Endpoint",
    "EndpointConfig",
    "EndpointEvent",
    "EndpointStatistics",
    "HandshakeConfirmed",
    "HandshakeRefused",
    "Introduction",
    "IntroductionCompleted",
    "IntroductionFailed",
    "PathChangedEvent",
    "Registered",
    "RegistrationLost",
    "RegistrationRefused",
    "SessionEnded",
    "SessionResumed",
    "SessionSuspended",
    "SessionOpened",
    "SessionStatistics",
    "StanzaReceived",
    "StanzasAcknowledged",
    "Verify",
]
