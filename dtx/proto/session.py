"""The sans-IO dtx session: an XML stream on an authenticated QUIC connection.

Stacked on aioquic's :class:`~aioquic.quic.connection.QuicConnection` the way
``aioquic.h3.connection.H3Connection`` is: the driver feeds every QUIC event
to :meth:`XmlSession.handle_quic_event`, which returns session events, and
calls :meth:`XmlSession.flush` before it collects datagrams to send.

Stream rules (``docs/protocol.md``):

* the initiator (QUIC client) opens bidirectional stream 0 and sends its
  stream header at once; the responder sends its header only after it has
  checked the initiator's key *and* header, so the initiator treats the
  session as open (and delivers stanzas) only once that header arrives;
* the ``from`` of each header must be the JID the sender authenticated as;
  a stanza's ``from`` must be that JID or its bare form, or absent (then it
  is stamped with the authenticated JID); anything else is ``invalid-from``;
* delivery is acknowledged with XEP-0198 ``<r/>``/``<a h=''/>`` elements,
  always on (no ``<enable/>``): the sender keeps every stanza until it is
  acknowledged, and hands the unacknowledged ones back when the session ends;
  what waits is bounded (``SessionConfig.max_unacknowledged_*``), and a peer
  that makes no acknowledgement progress for ``ack_window`` seconds is
  closed (``docs/protocol.md`` 3.3);
* XEP-0199 pings and XEP-0030 disco#info queries are answered here;
* ``</stream:stream>`` closes gracefully: the side that closes first ends
  the QUIC connection once the peer's closing tag arrives, by which point
  the peer has processed every stanza sent before it;
* an optional unreliable channel carries one whole stanza per QUIC DATAGRAM
  frame.
"""

from __future__ import annotations

import logging
import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from xml.etree.ElementTree import Element

from aioquic.quic import events as qe
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import QuicFrameType

from .. import stanza as st
from ..errors import (
    AuthenticationError,
    DtxError,
    JIDError,
    LocalProtocolError,
    RemoteProtocolError,
    SessionClosedError,
    StanzaTooLargeError,
    StreamError,
    TrustError,
    UnacknowledgedLimitError,
)
from ..jid import JID
from ..wire.xml import decode_count
from ..logs import LogLimiter
from . import xmlstream as xs
from .sessiontypes import SessionConfig, SessionEnded
from .auth import (
    ALERT_CERTIFICATE_REQUIRED,
    ALERT_REFUSED,
    CRYPTO_ERROR_BASE,
    CredentialCheck,
    PeerCredential,
)

NS_SM = "urn:xmpp:sm:3"
SM_R = f"{{{NS_SM}}}r"
SM_A = f"{{{NS_SM}}}a"
SM_RESUMED = f"{{{NS_SM}}}resumed"
SM_FAILED = f"{{{NS_SM}}}failed"
SM_PREVID = f"{{{NS_SM}}}previd"
SM_H = f"{{{NS_SM}}}h"

ERROR_NONE = 0x0
"""QUIC application close code: graceful end of the session."""
ERROR_STREAM = 0x10
"""QUIC application close code: an XML stream error; the reason phrase is
the RFC 6120 condition, then a colon and text."""
ERROR_SESSION = 0x11
"""QUIC application close code: the session was aborted locally."""

DATAGRAM_OVERHEAD_BYTES = 1 + 20 + 4 + 16 + 1 + 2 + 8
"""Worst-case bytes a 1-RTT QUIC packet adds around a DATAGRAM frame's
payload: flags, destination CID (up to 20), packet number (4), AEAD tag,
frame type and length, and room for an ACK frame aioquic may put first."""

_H_MOD = 1 << 32

_R = b"<r xmlns='urn:xmpp:sm:3'/>"


def _a(h: int) -> bytes:
    return b"<a xmlns='urn:xmpp:sm:3' h='%d'/>" % h


class SessionState(Enum):
    HANDSHAKING = "handshaking"
    """QUIC/TLS handshake running; keys not yet checked both ways."""
    AUTHENTICATED = "authenticated"
    """Handshake done; waiting for the peer's stream header."""
    OPEN = "open"
    CLOSING = "closing"
    """We sent ``</stream:stream>``; waiting for the peer's."""
    CLOSED = "closed"
    SUSPENDED = "suspended"
    """The connection died and the session waits to be resumed on a new
    one (:meth:`XmlSession.suspend`): :meth:`XmlSession.send` still takes
    stanzas, which wait with the unacknowledged ones."""


# -- events -------------------------------------------------------------------


@dataclass(frozen=True)
class HandshakeConfirmed:
    """The peer's key was checked and trusted (locally)."""

    peer_jid: str


@dataclass(frozen=True)
class SessionOpened:
    """Both stream headers exchanged: stanzas now flow both ways."""

    peer_jid: str
    stream_id: str | None


@dataclass(slots=True)  # made per stanza: not frozen (see xmlstream.StanzaReceived)
class StanzaReceived:
    stanza: Element
    size: int = 0
    """Bytes of stream data this stanza took, about (for buffer accounting)."""


@dataclass(frozen=True)
class DatagramReceived:
    """A stanza from the unreliable channel."""

    stanza: Element


@dataclass(frozen=True)
class StanzasAcknowledged:
    """The peer confirmed it processed ``count`` more stanzas (``total`` so far)."""

    count: int
    total: int


@dataclass(frozen=True)
class ResumeRequested:
    """Responder: the initiator's stream header asks to resume the session
    ``previd``, having handled ``h`` of its stanzas; the endpoint answers
    with :meth:`XmlSession.accept_resume` or :meth:`XmlSession.refuse_resume`
    (no :class:`SessionOpened` comes for this stream)."""

    previd: str
    h: int


@dataclass(frozen=True)
class SessionResumed:
    """The session goes on over this stream: the peer had handled
    ``acknowledged`` more of the stanzas waiting, and the other ``resent``
    went out again."""

    acknowledged: int
    resent: int


@dataclass(frozen=True)
class ResumeFailed:
    """Initiator: the peer would not resume the session (``reason``); this
    stream closes."""

    reason: str


SessionEvent = (
    HandshakeConfirmed
    | SessionOpened
    | StanzaReceived
    | DatagramReceived
    | StanzasAcknowledged
    | SessionEnded
    | ResumeRequested
    | SessionResumed
    | ResumeFailed
)


@dataclass
class ResumeState:
    """What a suspended session hands to the stream that resumes it
    (:meth:`XmlSession.export`): bounded by the session's own limits."""

    resume_id: str
    """The responder's stream id of the session's first stream."""
    peer_jid: str
    unacked: deque[tuple[Element | bytes, int]]
    unacked_bytes: int
    acked_total: int
    handled_in: int


@dataclass
class SessionStatistics:
    stanzas_sent: int = 0
    stanzas_received: int = 0
    stanzas_acknowledged: int = 0
    datagrams_sent: int = 0
    datagrams_received: int = 0
    datagrams_dropped: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    pings_answered: int = 0
    log_suppressed: int = 0
    """Repeated warnings about this peer logged at DEBUG instead (counted)."""


def _bare(jid: str) -> str:
    return jid.split("/", 1)[0]


def _norm(jid: str) -> str | None:
    """The normalised form of ``jid`` (RFC 7622 as dtx.jid does it), or None."""
    try:
        return JID.parse(jid).full
    except JIDError:
        return None


class XmlSession:
    """The XML stream and session rules, over one QUIC connection.

    ``local_jid`` is this device's full JID; on the initiating side,
    ``peer_jid`` is the JID it meant to reach (bare or full), already
    enforced by the key check. ``rng`` makes the stream id.
    """

    def __init__(
        self,
        quic: QuicConnection,
        *,
        local_jid: str,
        peer_jid: str | None,
        config: SessionConfig,
        rng: random.Random,
        logger: logging.Logger | logging.LoggerAdapter[logging.Logger] | None = None,
        resume: ResumeState | None = None,
    ) -> None:
        self._quic = quic
        self._is_client = quic.configuration.is_client
        self._local_jid = local_jid
        self._config = config
        self._rng = rng
        self._log = logger or logging.getLogger(__name__)
        self._limited = LogLimiter(self._log)
        self._parser = xs.XmlStreamParser(
            max_stanza_bytes=config.max_stanza_bytes, max_depth=config.max_depth
        )
        self.state = SessionState.HANDSHAKING
        self.peer_jid: str | None = None
        self.stream_id: str | None = None
        self.statistics = SessionStatistics()
        self._stream: int | None = None
        self._peer_closed = False
        self._header_seen = False
        self._unattributed = 0
        # XEP-0198 style accounting: h counts stanzas, modulo 2**32. Each
        # entry is (stanza, encoded size); for the session's own answers,
        # which are never handed back, the encoded bytes instead (a resumed
        # session sends them again: the peer counts them).
        self._unacked: deque[tuple[Element | bytes, int]] = deque()
        self._unacked_bytes = 0
        self._acked_total = 0
        self._handled_in = 0
        self._a_wanted = False  # the peer asked with <r/>; answer at flush
        self._h_answered: int | None = None  # h of the last <a/> written
        # Since when the peer has acknowledged nothing while stanzas wait
        # (stamped by the first flush/handle_timer that knows the time).
        self._progress_at: float | None = None
        self._r_outstanding = False
        self._r_wanted = False
        self._acked_at_request = 0
        self._unacked_since: float | None = None
        self._ended: SessionEnded | None = None
        self._ended_error: DtxError | None = None
        self._out: list[bytes] = []
        self.resume_id: str | None = None
        """The id a later stream resumes this session by: the responder's
        stream id of its first stream (None until it is open)."""
        self._resuming: ResumeState | None = None
        """Initiator: the session this stream resumes, until the peer answers."""
        self._resume_pending = False
        """Responder: asked to resume; writes wait for the decision."""
        self._resume_of = resume
        self.connection_lost = False
        """The connection ended because the peer stopped answering (idle
        timeout) while the session was open: resumable."""
        if resume is not None:
            self._adopt(resume)
            self._resuming = resume
        if self._is_client:
            self._stream = quic.get_next_available_stream_id()
            header = xs.encode_stream_header(
                from_=local_jid, to=peer_jid or "", version="1.0",
                resume=None if resume is None else (resume.resume_id, resume.handled_in),
            )
            self._quic.send_stream_data(self._stream, header)

    # -- user calls -----------------------------------------------------------

    @property
    def unacknowledged(self) -> tuple[Element, ...]:
        """The stanzas handed to :meth:`send` that the peer has not
        acknowledged yet, in order (not the session's own answers)."""
        return tuple(e for e, _ in self._unacked if not isinstance(e, bytes))

    @property
    def unacknowledged_bytes(self) -> int:
        """Encoded bytes of every stanza waiting for the peer's
        acknowledgement, the session's own answers included: what this
        session holds for the peer (at most
        ``SessionConfig.max_unacknowledged_bytes``)."""
        return self._unacked_bytes

    @property
    def is_open(self) -> bool:
        return self.state in (SessionState.AUTHENTICATED, SessionState.OPEN)

    def send(self, stanza: Element) -> None:
        """Queue ``stanza`` on the reliable stream.

        Allowed once the handshake is done (the peer's key is trusted); the
        stanza is then encrypted to that peer only. It is kept until the peer
        acknowledges it. Raises :class:`~dtx.errors.UnacknowledgedLimitError`,
        queueing nothing, when that would keep more than
        ``SessionConfig.max_unacknowledged_stanzas`` stanzas or
        ``max_unacknowledged_bytes`` bytes waiting.
        """
        state = self.state
        if state is not SessionState.OPEN and state is not SessionState.AUTHENTICATED \
                and state is not SessionState.SUSPENDED and self._resuming is None:
            raise SessionClosedError(f"cannot send: session is {state.value}")
        data = xs.encode_stanza(stanza)
        size = len(data)
        cfg = self._config
        if size > cfg.max_stanza_bytes:
            raise StanzaTooLargeError(
                f"stanza of {size} bytes exceeds the limit of {cfg.max_stanza_bytes} bytes"
            )
        unacked = self._unacked
        if len(unacked) >= cfg.max_unacknowledged_stanzas \
                or self._unacked_bytes + size > cfg.max_unacknowledged_bytes:
            raise UnacknowledgedLimitError(
                f"{len(unacked)} stanzas ({self._unacked_bytes} bytes) already wait "
                f"for the peer's acknowledgement (limits: "
                f"{cfg.max_unacknowledged_stanzas} stanzas, "
                f"{cfg.max_unacknowledged_bytes} bytes); nothing was queued"
            )
        # _queue, inlined: this is the sender's hot path
        unacked.append((stanza, size))
        self._unacked_bytes += size
        self._out.append(data)
        statistics = self.statistics
        statistics.stanzas_sent += 1
        statistics.bytes_sent += size

    @property
    def waiting(self) -> int:
        """Stanzas waiting for the peer's acknowledgement, the session's own
        answers included (cheap: no copy)."""
        return len(self._unacked)

    def has_room(self, fraction: float = 1.0) -> bool:
        """Whether what waits is under ``fraction`` of both bounds."""
        cfg = self._config
        return (len(self._unacked) < cfg.max_unacknowledged_stanzas * fraction
                and self._unacked_bytes < cfg.max_unacknowledged_bytes * fraction)

    def _room_for(self, size: int) -> bool:
        return (
            len(self._unacked) < self._config.max_unacknowledged_stanzas
            and self._unacked_bytes + size <= self._config.max_unacknowledged_bytes
        )

    def _queue(self, stanza: Element | bytes, data: bytes) -> None:
        """Keep a stanza until acknowledged and write it at the next flush
        (``stanza`` its bytes: the session's own answer, never handed back)."""
        self._unacked.append((stanza, len(data)))
        self._unacked_bytes += len(data)
        self._out.append(data)
        self.statistics.stanzas_sent += 1
        self.statistics.bytes_sent += len(data)

    def max_datagram_bytes(self) -> int:
        """The largest encoded stanza the DATAGRAM channel accepts now."""
        remote = getattr(self._quic, "_remote_max_datagram_frame_size", None)
        local_cap = self._config.max_datagram_size - DATAGRAM_OVERHEAD_BYTES
        if remote is None:
            return 0
        return max(0, min(local_cap, int(remote) - 3))

    def send_datagram(self, stanza: Element) -> None:
        """Send ``stanza`` in one QUIC DATAGRAM frame: unreliable, unordered.

        Raises :class:`StanzaTooLargeError` when it cannot fit one datagram
        (rather than letting it block the datagram queue), and
        :class:`SessionClosedError` when the session is not open.
        """
        if self.state is not SessionState.OPEN:
            raise SessionClosedError(f"cannot send: session is {self.state.value}")
        data = xs.encode_stanza(stanza)
        limit = self.max_datagram_bytes()
        if limit == 0:
            raise StanzaTooLargeError("the peer does not accept DATAGRAM frames")
        if len(data) > limit:
            raise StanzaTooLargeError(
                f"stanza of {len(data)} bytes does not fit one datagram "
                f"(at most {limit} bytes); send it on the stream instead"
            )
        self._quic.send_datagram_frame(data)
        self.statistics.datagrams_sent += 1

    def close(self) -> None:
        """Close gracefully: ``</stream:stream>`` after everything queued."""
        if self.state in (SessionState.CLOSING, SessionState.CLOSED):
            return
        if self.state is SessionState.HANDSHAKING or self._stream is None:
            self._quic.close(error_code=ERROR_SESSION, reason_phrase="closed")
            self.state = SessionState.CLOSED
            return
        self._r_wanted = True
        # Confirm everything received before the footer: the peer would
        # otherwise hand those stanzas back as unacknowledged (and an
        # application that resends them elsewhere deliver them twice).
        self._a_wanted = False
        if self._handled_in != self._h_answered:
            self._out.append(_a(self._handled_in))
            self._h_answered = self._handled_in
        self.flush()
        self._quic.send_stream_data(
            self._stream, xs.encode_stream_footer(), end_stream=self._peer_closed
        )
        self.state = SessionState.CLOSING
        if self._peer_closed:
            self._quic.close(error_code=ERROR_NONE, reason_phrase="")

    def abort(self, reason: str = "aborted") -> None:
        """End the session at once (unacknowledged stanzas are handed back)."""
        if self.state is not SessionState.CLOSED:
            self._quic.close(error_code=ERROR_SESSION, reason_phrase=reason)

    def request_ack(self) -> None:
        """Ask for an acknowledgement at the next flush (someone waits)."""
        self._r_wanted = True

    # -- resumption (docs/protocol.md 3.5) ---------------------------------------

    def _holding(self) -> bool:
        """Whether writes wait: suspended, or a resumption not yet settled."""
        return self._resuming is not None or self._resume_pending \
            or self.state is SessionState.SUSPENDED

    def suspend(self) -> None:
        """The connection is gone; the session waits to be resumed on a new
        one. What :meth:`send` takes from now on waits with the rest."""
        self.state = SessionState.SUSPENDED
        self._out.clear()

    def export(self) -> ResumeState:
        """What a new stream needs to resume this session (this one's, or
        the one this stream was resuming when it failed)."""
        peer = self.peer_jid or (None if self._resume_of is None else self._resume_of.peer_jid)
        if self.resume_id is None or peer is None:
            raise LocalProtocolError("only an opened session can be resumed")
        return ResumeState(self.resume_id, peer, deque(self._unacked),
                           self._unacked_bytes, self._acked_total, self._handled_in)

    def _adopt(self, state: ResumeState) -> None:
        self.resume_id = state.resume_id
        self._unacked = deque(state.unacked)
        self._unacked_bytes = state.unacked_bytes
        self._acked_total = state.acked_total
        self._handled_in = state.handled_in

    def _drop_acknowledged(self, h: int) -> int:
        """Forget the stanzas the peer's ``h`` covers; how many that was."""
        count = (h - self._acked_total) % _H_MOD
        if count > len(self._unacked):
            raise StreamError(
                "undefined-condition",
                f"peer handled {count} stanzas, only {len(self._unacked)} unacknowledged",
            )
        for _ in range(count):
            self._unacked_bytes -= self._unacked.popleft()[1]
        self._acked_total = h
        self.statistics.stanzas_acknowledged += count
        return count

    def _resend_all(self, first: bytes = b"") -> int:
        """Every stanza still waiting goes out (again), in order, after
        ``first``: what :meth:`send` took while the resumption was settled
        waits among them."""
        self._out = [first] if first else []
        self._out += [e if isinstance(e, bytes) else xs.encode_stanza(e)
                      for e, _ in self._unacked]
        self._r_outstanding = False
        self._acked_at_request = 0
        self._r_wanted = bool(self._unacked)
        return len(self._unacked)

    def accept_resume(self, state: ResumeState, h: int) -> SessionResumed:
        """Responder: go on with the suspended session ``state`` on this
        stream; the initiator had handled ``h`` of its stanzas. Raises
        :class:`~dtx.errors.StreamError` when ``h`` covers more than waits
        (the caller ends the stream with it)."""
        if not self._resume_pending:
            raise LocalProtocolError("no resumption was asked for on this stream")
        self._resume_pending = False
        self._adopt(state)
        acknowledged = self._drop_acknowledged(h)
        assert self.resume_id is not None and self.resume_id.isalnum()
        self._h_answered = self._handled_in
        resent = self._resend_all(b"<resumed xmlns='urn:xmpp:sm:3' previd='%s' h='%d'/>"
                                  % (self.resume_id.encode(), self._handled_in))
        self._log.info("session with %s resumed (%d acknowledged, %d sent again)",
                       self.peer_jid, acknowledged, resent)
        return SessionResumed(acknowledged, resent)

    def refuse_resume(self, reason: str) -> None:
        """Responder: this stream does not resume anything; it closes."""
        self._resume_pending = False
        self._log.info("refused to resume a session with %s: %s", self.peer_jid, reason)
        self._out.append(b"<failed xmlns='urn:xmpp:sm:3'/>")
        self.close()

    def _on_resumed(self, el: Element, out: list[SessionEvent]) -> None:
        state = self._resuming
        assert state is not None
        h = decode_count(el.get("h"))
        if h is None or el.get("previd") != state.resume_id:
            raise StreamError("bad-format", "resumed: wrong previd or h")
        self._resuming = None
        acknowledged = self._drop_acknowledged(h)
        resent = self._resend_all()
        self._log.info("session with %s resumed (%d acknowledged, %d sent again)",
                       self.peer_jid, acknowledged, resent)
        out.append(SessionResumed(acknowledged, resent))

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` wants calling: the delayed ack request,
        or the end of the acknowledgement window."""
        if not self._unacked or self.state is SessionState.CLOSED or self._holding():
            return None
        due: float | None = None
        if not self._r_outstanding and self._unacked_since is not None:
            due = self._unacked_since + self._ack_request_delay()
        if self._progress_at is not None:
            deadline = self._progress_at + self._config.ack_window
            due = deadline if due is None else min(due, deadline)
        return due

    def handle_timer(self, now: float) -> None:
        if not self._unacked or self.state is SessionState.CLOSED or self._holding():
            return
        if (not self._r_outstanding and self._unacked_since is not None
                and now >= self._unacked_since + self._ack_request_delay()):
            self._r_wanted = True
        self._check_ack_window(now)

    def _ack_request_delay(self) -> float:
        """How long the oldest stanza waits before ``<r/>``: the configured
        delay, and at least two round trips, so that an answer the peer
        writes anyway (an echo, a result) can bring the acknowledgement."""
        rtt: float = getattr(self._quic, "smoothed_rtt", 0.0)
        return max(self._config.ack_request_delay, 2 * rtt)

    def _is_closed(self) -> bool:
        # A method, not a comparison, so that type checkers do not narrow
        # ``state`` across calls that change it.
        return self.state is SessionState.CLOSED

    def _check_ack_window(self, now: float) -> None:
        """Stamp when waiting began; end a session the peer does not
        acknowledge for ``ack_window`` seconds."""
        if not self._unacked or self.state in (SessionState.HANDSHAKING, SessionState.CLOSED):
            return
        if self._progress_at is None:
            self._progress_at = now
        elif now >= self._progress_at + self._config.ack_window:
            self._log.warning(
                "%s acknowledged none of %d stanzas in %.0f s; closing",
                self.peer_jid, len(self._unacked), self._config.ack_window,
            )
            self._stream_error(
                "connection-timeout",
                f"no acknowledgement for {self._config.ack_window:g} s",
            )

    def flush(self, now: float | None = None) -> None:
        """Hand queued stanzas to QUIC as one write, asking for an
        acknowledgement when enough is waiting, when it has waited long
        enough, or when someone asked (one request outstanding at a time)."""
        if self._stream is None or self._is_closed() or self._holding():
            return
        if now is not None:
            self._check_ack_window(now)
            if self.state is SessionState.CLOSED:
                return
        if self._a_wanted:
            # Every <r/> read since the last flush gets one answer; an <r/>
            # when the last <a/> already said the same h gets none (a dtx
            # sender asks only with stanzas in flight, so h has moved): a
            # flood of <r/> costs no output (docs/protocol.md 3.3).
            self._a_wanted = False
            if self._handled_in != self._h_answered:
                self._out.append(_a(self._handled_in))
                self._h_answered = self._handled_in
        elif self._out and self._handled_in != self._h_answered and self.is_open:
            # Stanzas go out anyway: acknowledge on the way, in the same
            # packet (docs/protocol.md 3.3), so the peer need not ask.
            self._out.append(_a(self._handled_in))
            self._h_answered = self._handled_in
        if self._unacked and not self._r_outstanding and self.is_open:
            if now is not None and self._unacked_since is None:
                self._unacked_since = now
            if self._r_wanted or len(self._unacked) - self._acked_at_request \
                    >= self._config.ack_request_every:
                self._out.append(_R)
                self._r_outstanding = True
                self._r_wanted = False
                self._acked_at_request = len(self._unacked)
        if not self._out:
            return
        data = b"".join(self._out)
        self._out.clear()
        self._quic.send_stream_data(self._stream, data)

    # -- QUIC events ------------------------------------------------------------

    def handle_quic_event(self, event: qe.QuicEvent) -> list[SessionEvent]:
        """Feed one QUIC event; returns what happened to the session."""
        if isinstance(event, qe.StreamDataReceived):
            return self._on_stream_data(event)
        if isinstance(event, qe.DatagramFrameReceived):
            return self._on_datagram(event.data)
        if isinstance(event, qe.HandshakeCompleted):
            return self._on_handshake()
        if isinstance(event, qe.ConnectionTerminated):
            return self._on_terminated(event)
        return []

    def _on_handshake(self) -> list[SessionEvent]:
        credential = getattr(self._quic, "peer_credential", None)
        if credential is None:
            # Unreachable with AuthenticatedQuicConnection: no key, no handshake.
            self._fail_local(AuthenticationError("handshake completed without a key"))
            return []
        self.peer_jid = credential.jid
        self.state = SessionState.AUTHENTICATED
        self._log.info("handshake done, peer key trusted for %s", credential.jid)
        return [HandshakeConfirmed(credential.jid)]

    def _on_stream_data(self, event: qe.StreamDataReceived) -> list[SessionEvent]:
        if self._stream is None:
            if self._is_client or event.stream_id != 0:
                self._stream_error("unsupported-feature", "unexpected QUIC stream")
                return []
            self._stream = event.stream_id
        elif event.stream_id != self._stream:
            self._stream_error("unsupported-feature", "unexpected QUIC stream")
            return []
        if self._is_closed():
            return []  # after a stream error: read nothing more from this peer
        self.statistics.bytes_received += len(event.data)
        self._unattributed += len(event.data)
        out: list[SessionEvent] = []
        try:
            xml_events = self._parser.feed(event.data) if event.data else []
        except StreamError as exc:
            self._log.warning("stream error from %s: %s", self.peer_jid, exc)
            self._stream_error(exc.condition, exc.text)
            return []
        for xev in xml_events:
            if self.state is SessionState.CLOSED:
                break
            try:
                self._on_xml_event(xev, out)
            except StreamError as exc:
                self._log.warning("stream error from %s: %s", self.peer_jid, exc)
                self._stream_error(exc.condition, exc.text)
                break
        stanzas = [e for e in out if type(e) is StanzaReceived]
        if stanzas:
            share = self._unattributed // len(stanzas)
            self._unattributed = 0
            for e in stanzas:
                e.size = share  # (the event is new and still ours)
        if event.end_stream and not self._peer_closed and self.state is not SessionState.CLOSED:
            self._stream_error("not-well-formed", "stream ended without closing tag")
        return out

    def _on_xml_event(self, xev: xs.XmlEvent, out: list[SessionEvent]) -> None:
        if isinstance(xev, xs.StanzaReceived):
            el = xev.element
            if self._resuming is not None:
                # The first element after the header settles a resumption.
                if el.tag == SM_RESUMED:
                    self._on_resumed(el, out)
                    return
                reason = "refused" if el.tag == SM_FAILED else "the peer does not resume"
                self._resuming = None
                out.append(ResumeFailed(reason))
                self.close()
                return
            if self._resume_pending:
                raise StreamError("policy-violation", "stanza before the resumption settled")
            if el.tag == SM_R:
                self._a_wanted = True
                return
            if el.tag == SM_A:
                acked = self._on_ack(el)
                if acked:
                    out.append(StanzasAcknowledged(acked, self._acked_total))
                return
            self._on_stanza(el, out)
        elif isinstance(xev, xs.StreamOpened):
            self._on_header(xev.attrs, out)
        elif isinstance(xev, xs.StreamClosed):
            self._peer_closed = True
            if self.state is SessionState.CLOSING:
                assert self._stream is not None
                self._quic.send_stream_data(self._stream, b"", end_stream=True)
                self._quic.close(error_code=ERROR_NONE, reason_phrase="")
            elif self._stream is not None:
                # Confirm everything received, then close our side too.
                self._a_wanted = False
                self._out.append(_a(self._handled_in))
                self._h_answered = self._handled_in
                self.flush()
                self._quic.send_stream_data(
                    self._stream, xs.encode_stream_footer(), end_stream=True
                )
                self.state = SessionState.CLOSING
        elif isinstance(xev, xs.StreamErrorReceived):
            self._log.warning(
                "peer %s sent stream error %s %s", self.peer_jid, xev.condition, xev.text
            )
            self._fail_local(StreamError(xev.condition, xev.text))

    def _on_header(self, attrs: dict[str, str], out: list[SessionEvent]) -> None:
        if self.peer_jid is None or self.state is SessionState.HANDSHAKING:
            raise StreamError("not-authorized", "stream header before authentication")
        if self._header_seen:
            raise StreamError("not-well-formed", "second stream header")
        sender = attrs.get("from", "")
        if _norm(sender) != self.peer_jid:
            raise StreamError(
                "invalid-from",
                f"stream from {sender!r} but the key authenticated {self.peer_jid}",
            )
        to = _norm(attrs.get("to", ""))
        if to not in (self._local_jid, _bare(self._local_jid)):
            raise StreamError("host-unknown", f"this device is {self._local_jid}")
        if attrs.get("version", "0.9").split(".")[0] != "1":
            raise StreamError("unsupported-version", "version 1.0 is required")
        previd = None if self._is_client else attrs.get(SM_PREVID)
        resume_h = None
        if previd is not None:
            resume_h = decode_count(attrs.get(SM_H))
            if resume_h is None or not previd:
                raise StreamError("bad-format", "resumption needs sm:previd and sm:h")
        if self._is_client:
            self.stream_id = attrs.get("id")
            if self.resume_id is None:
                self.resume_id = self.stream_id
        else:
            self.stream_id = "%016x" % self._rng.getrandbits(64)
            assert self._stream is not None
            self._quic.send_stream_data(
                self._stream,
                xs.encode_stream_header(
                    from_=self._local_jid,
                    to=self.peer_jid,
                    stream_id=self.stream_id,
                    version="1.0",
                ),
            )
            self.resume_id = self.stream_id
        self._header_seen = True
        if self.state is SessionState.AUTHENTICATED:
            self.state = SessionState.OPEN
        if previd is not None and resume_h is not None:
            self._resume_pending = True
            out.append(ResumeRequested(previd, resume_h))
            return
        if self._resuming is not None:
            return  # the session opened long ago; <resumed/> or <failed/> comes next
        self._log.info("session open with %s", self.peer_jid)
        out.append(SessionOpened(self.peer_jid, self.stream_id))

    def _on_stanza(self, el: Element, out: list[SessionEvent]) -> None:
        if not self._header_seen:
            raise StreamError("not-authorized", "stanza before the stream opened")
        assert self.peer_jid is not None
        self._check_from(el)
        self._handled_in = (self._handled_in + 1) % _H_MOD
        self.statistics.stanzas_received += 1
        if el.tag == st.IQ and self._answer_iq(el):
            return
        out.append(StanzaReceived(el))

    def _check_from(self, el: Element) -> None:
        assert self.peer_jid is not None
        sender = el.get("from")
        if sender is None:
            el.set("from", self.peer_jid)
        elif sender != self.peer_jid and _norm(sender) not in (
            self.peer_jid,
            _bare(self.peer_jid),
        ):
            raise StreamError(
                "invalid-from",
                f"stanza from {sender!r} on a stream authenticated as {self.peer_jid}",
            )

    def _answer_iq(self, el: Element) -> bool:
        if self.state is not SessionState.OPEN:
            return False
        if self._config.answer_pings and st.is_ping(el):
            self._answer(st.result_for(el, from_=self._local_jid))
            self.statistics.pings_answered += 1
            return True
        if st.is_disco_info_query(el):
            features = [st.NS_PING, st.NS_DISCO_INFO, *self._config.features]
            self._answer(st.disco_info_result(el, features, from_=self._local_jid))
            return True
        return False

    def _answer(self, answer: Element) -> None:
        """Queue the session's own answer, or end the session if it would
        not fit: a peer that queries faster than it acknowledges would
        otherwise grow the queue without end, and an iq cannot go
        unanswered (RFC 6120 section 8.2.3)."""
        data = xs.encode_stanza(answer)
        if not self._room_for(len(data)):
            raise StreamError(
                "policy-violation",
                f"too many unacknowledged stanzas ({len(self._unacked)}, "
                f"{self._unacked_bytes} bytes)",
            )
        self._queue(data, data)

    def _on_ack(self, el: Element) -> int:
        """Drop acknowledged stanzas; returns how many were acknowledged."""
        self._r_outstanding = False
        h = decode_count(el.get("h"))
        if h is None:
            raise StreamError("bad-format", "ack h must be ASCII digits, at most 2**32-1")
        count = (h - self._acked_total) % _H_MOD
        if count > len(self._unacked):
            raise StreamError(
                "undefined-condition",
                f"peer acknowledged {count} stanzas, only {len(self._unacked)} unacknowledged",
            )
        unacked = self._unacked
        if count == len(unacked):
            unacked.clear()
            self._unacked_bytes = 0
        else:
            popleft, freed = unacked.popleft, 0
            for _ in range(count):
                freed += popleft()[1]
            self._unacked_bytes -= freed
        if count:
            self._progress_at = None  # progress: the window starts again
        self._acked_at_request = 0
        self._unacked_since = None
        self._acked_total = h
        self.statistics.stanzas_acknowledged += count
        return count

    def _on_datagram(self, data: bytes) -> list[SessionEvent]:
        if self.state is not SessionState.OPEN or self.peer_jid is None:
            self.statistics.datagrams_dropped += 1
            return []
        parser = xs.XmlStreamParser(
            max_stanza_bytes=max(self._config.max_stanza_bytes, xs.MIN_MAX_STANZA_BYTES),
            max_depth=self._config.max_depth,
        )
        try:
            events = parser.feed(_DATAGRAM_PREFIX + data)
            stanzas = [e.element for e in events if isinstance(e, xs.StanzaReceived)]
            if len(stanzas) != 1 or stanzas[0].tag not in st.STANZA_TAGS:
                raise StreamError("bad-format", "a datagram must hold one stanza")
            self._check_from(stanzas[0])
        except StreamError as exc:
            self.statistics.datagrams_dropped += 1
            self._limited.warning("bad-datagram", None, "dropped a bad datagram from %s: %s",
                                  self.peer_jid, exc)
            self.statistics.log_suppressed = self._limited.suppressed
            return []
        self.statistics.datagrams_received += 1
        return [DatagramReceived(stanzas[0])]

    # -- ending -------------------------------------------------------------------

    def _stream_error(self, condition: str, text: str) -> None:
        """Send a stream error, close the stream and the connection."""
        if self.state is SessionState.CLOSED:
            return
        if self._stream is not None:
            try:
                self._quic.send_stream_data(
                    self._stream,
                    xs.encode_stream_error(condition, text) + xs.encode_stream_footer(),
                    end_stream=True,
                )
            except Exception:  # noqa: BLE001 - stream may already be finished
                pass
        self._ended_error = StreamError(condition, text)
        self._quic.close(
            error_code=ERROR_STREAM, reason_phrase=f"{condition}:{text}"[:200]
        )
        self.state = SessionState.CLOSED

    def _fail_local(self, error: DtxError) -> None:
        self._ended_error = error
        self._quic.close(error_code=ERROR_SESSION, reason_phrase=str(error)[:200])
        self.state = SessionState.CLOSED

    def _on_terminated(self, event: qe.ConnectionTerminated) -> list[SessionEvent]:
        if self._ended is not None:
            return []
        error = self._termination_error(event)
        self.state = SessionState.CLOSED
        self._ended = SessionEnded(error, self.unacknowledged)
        if error is None:
            self._log.info("session with %s closed", self.peer_jid)
        else:
            self._log.info("session with %s ended: %s", self.peer_jid, error)
        return [self._ended]

    def _termination_error(self, event: qe.ConnectionTerminated) -> DtxError | None:
        local_auth: DtxError | None = getattr(self._quic, "auth_error", None)
        if local_auth is not None:
            return local_auth
        if self._ended_error is not None:
            return self._ended_error
        code = event.error_code
        reason = event.reason_phrase
        if code == ERROR_NONE and self._peer_closed:
            return None  # both closing tags exchanged: a graceful end
        if code in (CRYPTO_ERROR_BASE + ALERT_REFUSED,
                    CRYPTO_ERROR_BASE + ALERT_CERTIFICATE_REQUIRED):
            return AuthenticationError(
                f"the peer refused this device's key ({reason or 'no reason given'})"
            )
        if CRYPTO_ERROR_BASE <= code < CRYPTO_ERROR_BASE + 0x100:
            return AuthenticationError(f"TLS handshake failed: {reason}")
        if code == ERROR_STREAM and event.frame_type is None:
            condition, _, text = reason.partition(":")
            return StreamError(condition or "undefined-condition", text)
        if reason == _AIOQUIC_IDLE_TIMEOUT and event.frame_type == QuicFrameType.PADDING:
            if self.state is SessionState.HANDSHAKING:
                return SessionClosedError("no answer from the peer (timeout)")
            self.connection_lost = self._header_seen and self.resume_id is not None
            return SessionClosedError("the peer stopped answering (idle timeout)")
        if code == ERROR_NONE and event.frame_type is None:
            if self.state is SessionState.HANDSHAKING:
                return SessionClosedError("connection closed during the handshake")
            return SessionClosedError("peer closed the connection without closing the stream")
        return RemoteProtocolError(f"connection closed: code {code:#x} {reason}".strip())


_AIOQUIC_IDLE_TIMEOUT = "Idle timeout"
"""How aioquic marks its own ConnectionTerminated on an idle timeout
(with frame type PADDING, which no peer's CONNECTION_CLOSE carries)."""

_DATAGRAM_PREFIX = (
    b"<stream:stream xmlns='jabber:client' "
    b"xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>"
)


Verify = Callable[[str, bytes], None]
"""Raises :class:`TrustError` unless ``key`` may speak for ``jid``."""


def trust_check_for(verify: Verify, expected_jid: str | None) -> CredentialCheck:
    """The key check of one connection: the JID matches, the key is trusted.

    ``expected_jid`` (initiator side) is the JID the application asked for:
    a bare JID accepts any device of that account, a full JID only that one.
    """

    if expected_jid is not None:
        expected_jid = JID.parse(expected_jid).full

    def check(credential: PeerCredential) -> None:
        if expected_jid is not None:
            same = (
                credential.jid == expected_jid
                if "/" in expected_jid
                else _bare(credential.jid) == expected_jid
            )
            if not same:
                raise TrustError(
                    f"reached {credential.jid}, not the requested {expected_jid}"
                )
        verify(credential.jid, credential.key)

    return check


__all__: Sequence[str] = [
    "SessionConfig",
    "SessionState",
    "XmlSession",
    "HandshakeConfirmed",
    "SessionOpened",
    "StanzaReceived",
    "DatagramReceived",
    "StanzasAcknowledged",
    "SessionEnded",
    "SessionEvent",
    "ResumeFailed",
    "ResumeRequested",
    "ResumeState",
    "SessionResumed",
    "trust_check_for",
]
