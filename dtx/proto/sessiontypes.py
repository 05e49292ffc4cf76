"""What a session is configured with and how it ends, apart from the QUIC
engine: importing these does not load aioquic, so a device can start (open
its socket, register, be introduced) while the engine loads
(:mod:`dtx._lazy`). :mod:`dtx.proto.session` re-exports both."""

from __future__ import annotations

from dataclasses import dataclass
from xml.etree.ElementTree import Element

from ..errors import DtxError, LocalProtocolError
from . import xmlstream as xs


@dataclass(frozen=True, kw_only=True)
class SessionConfig:
    """Tunables of one session. All sizes in bytes, times in seconds."""

    max_stanza_bytes: int = xs.DEFAULT_MAX_STANZA_BYTES
    max_depth: int = xs.DEFAULT_MAX_DEPTH
    features: tuple[str, ...] = ()
    """XEP-0030 features the application supports (disco#info answers)."""
    answer_pings: bool = True
    max_datagram_size: int = 1200
    """The QUIC packet size in use; bounds the DATAGRAM channel."""
    ack_request_every: int = 64
    """Ask for an acknowledgement (``<r/>``) once this many stanzas are
    unacknowledged ..."""
    ack_request_delay: float = 0.05
    """... or once stanzas have waited this long (seconds), and two round
    trips, for one. Asking on every write would cost a packet each way per
    exchange; an answer the peer writes anyway carries its ``<a/>``."""
    max_unacknowledged_stanzas: int = 65_536
    """At most this many stanzas wait for the peer's acknowledgement: the
    application's and the session's own answers (pings, disco) together.
    Past it :meth:`XmlSession.send` raises
    :class:`~dtx.errors.UnacknowledgedLimitError` (a sender that wants to
    wait for room instead awaits ``Session.drain()``), and a query whose
    answer would not fit ends the session (``policy-violation``). The
    session's own answers are held as their size only, so a peer that
    floods queries and acknowledges nothing costs about the bytes it made
    this side write."""
    max_unacknowledged_bytes: int = 32 * 1024 * 1024
    """The same bound on the encoded size of those stanzas."""
    ack_window: float = 60.0
    """A peer that leaves stanzas unacknowledged this long (seconds) without
    acknowledging any of them, although asked with ``<r/>``, is closed with
    the stream error ``connection-timeout``. Needs the ``now`` given to
    :meth:`XmlSession.flush` and :meth:`XmlSession.handle_timer`."""

    def __post_init__(self) -> None:
        if self.max_unacknowledged_stanzas < 1:
            raise LocalProtocolError("max_unacknowledged_stanzas must be at least 1")
        if self.max_unacknowledged_bytes < self.max_stanza_bytes:
            raise LocalProtocolError(
                "max_unacknowledged_bytes must be at least max_stanza_bytes "
                f"({self.max_stanza_bytes}), or a large stanza could never be sent"
            )
        if not self.ack_window > 0:
            raise LocalProtocolError("ack_window must be positive")


@dataclass(frozen=True)
class SessionEnded:
    """The session is over. ``error`` is None after a graceful close.

    ``unacknowledged`` holds every stanza handed to :meth:`XmlSession.send`
    that the peer did not confirm, in order, so nothing is silently lost.
    The session's own answers (to pings, disco#info) are not in it: no one
    is waiting for them.
    """

    error: DtxError | None
    unacknowledged: tuple[Element, ...] = ()
