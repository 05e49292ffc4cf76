"""Signalling over XMPP in the shape of Jingle, sans-IO: one device's side.

The account's own XMPP server is the rendezvous (``docs/protocol.md``,
section 12): a device offers a session to a peer's full JID with a
``session-initiate`` (XEP-0166) carrying its candidates (XEP-0176), the
fingerprint of its QUIC certificate (XEP-0320) and a signature by its device
key over that fingerprint, both JIDs and the sid; the peer answers with a
``session-accept`` carrying its own. Each side starts probing as the
exchange completes for it: the responder as its ``session-accept`` leaves,
the initiator as it arrives, half a signalling round trip later, so that
the initiator's first probe (and the QUIC Initial beside it) finds the
responder's NAT already open towards it and the responder already
introduced (``docs/protocol.md`` 12.7). Candidates found later are trickled in ``transport-info``;
``session-terminate`` ends a session, with a reason.

Who gets what: candidates go only to JIDs ``may_contact`` approves (the
account's own devices and subscribed roster contacts, XEP-0166 section
13.4); anyone else gets ``service-unavailable``, the same answer as from a
device that speaks no Jingle at all, and nothing else. A fingerprint counts
only when its signature verifies with a key the peer's account publishes
(``keys_for``, the vCard): anything else ends the session with
``security-error`` on both sides. The QUIC handshake checks the key again,
as always.

In: :meth:`JingleSignalling.receive_iq` (an iq from the XMPP server),
:meth:`~JingleSignalling.handle_timer`, and the user calls
:meth:`~JingleSignalling.connect`, :meth:`~JingleSignalling.add_candidates`,
:meth:`~JingleSignalling.keys_changed`, :meth:`~JingleSignalling.terminate`,
:meth:`~JingleSignalling.close`. Out: :meth:`~JingleSignalling.stanzas_to_send`
(iq stanzas addressed to full JIDs), :meth:`~JingleSignalling.get_timer`,
:meth:`~JingleSignalling.next_event`. :class:`PeerIntroduced` comes when it
is time to probe and carries what a
:class:`~dtx.proto.traversal.Introduction` needs
(:meth:`PeerIntroduced.introduction`). Time and randomness are arguments.

One machine with its config, events and statistics: past the style guide's
~800 lines, but its events and values are its API, and splitting them off
would only scatter it (as for :mod:`dtx.proto.turn`).
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import random
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from xml.etree.ElementTree import Element

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from ..errors import ConnectError, DecodeError, DtxError
from ..identity import DeviceIdentity, verify_signature
from ..jid import JID
from ..logs import LogLimiter
from ..stanza import IQ
from ..stanza import iq as make_iq
from ..wire.address import Address, normalise_address
from ..wire.jingle import (
    NS_ICE_UDP,
    NS_XMLSTREAM,
    Action,
    CandidateType,
    Content,
    Creator,
    DeviceProof,
    Fingerprint,
    IceCandidate,
    IceUdpTransport,
    Jingle,
    JingleCondition,
    JingleReason,
    Reason,
    Setup,
    StanzaError,
    candidate_priority,
    decode_jingle,
    decode_stanza_error,
    derive_probe_material,
    device_signing_input,
    encode_jingle,
    encode_stanza_error,
    jingle_child,
)
from .auth import ALPN
from .paths import PathKind, RelayWrap
from .traversal import Introduction

__all__ = [
    "CandidatesAdded",
    "JingleSignalling",
    "KeysWanted",
    "LocalCandidate",
    "PeerIntroduced",
    "Reason",
    "RemoteCandidate",
    "SessionState",
    "SessionTerminated",
    "SignallingConfig",
    "SignallingEvent",
    "SignallingFailed",
    "SignallingStatistics",
    "certificate_fingerprint",
]

logger = logging.getLogger(__name__)

CONTENT_NAME = "xmlstream"
HASH = "sha-256"
_ICE_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_ID_PREFIX = "dtxj-"
_SECURITY_TEXT = "fingerprint not bound to a published device key"


@dataclass(frozen=True, kw_only=True)
class SignallingConfig:
    """Tunables of Jingle signalling. Times in seconds."""

    alpn: str = ALPN
    accept_sessions: bool = True
    """Answer session-initiates (False: ``service-unavailable`` to all)."""
    iq_timeout: float = 10.0
    """A session-initiate not acknowledged within this fails (``timeout``)."""
    accept_timeout: float = 20.0
    """A session-initiate not accepted within this fails (``timeout``)."""
    key_wait: float = 5.0
    """How long to wait for an account's keys nobody knows yet
    (:class:`KeysWanted`, :meth:`JingleSignalling.keys_changed`); 0: refuse
    at once."""
    probe_delay: float = 0.0
    """This side probes this long after its exchange completes (the
    responder: its session-accept sent; the initiator: the peer's
    session-accept verified)."""
    max_sessions: int = 256
    """Sessions held at once; at the bound the least recently made active
    one is ended (``expired``) for a new one, or the new one is refused."""
    max_pending: int = 32
    """Sessions being negotiated at once."""
    max_sessions_per_account: int = 16
    """Sessions with the devices of one account (one per device)."""
    max_candidates: int = 16
    """Candidates taken from a peer, and sent to it, per session."""
    initiate_burst: float = 5.0
    initiate_interval: float = 5.0
    """Session-initiates taken from one account: ``initiate_burst`` at once,
    then one per ``initiate_interval``; more get ``resource-constraint``."""
    max_rate_entries: int = 1024
    max_requests: int = 4096
    """Outstanding requests tracked (their answers are recognised by id
    anyway)."""
    max_ended: int = 256
    """Ended sessions remembered, so a replayed session-initiate is refused."""


# -- values in and out ------------------------------------------------------------


@dataclass(frozen=True)
class LocalCandidate:
    """An address of this device to offer: a host address, the
    server-reflexive address (``related``: its host base) or a TURN relayed
    address (``related``: the server-reflexive address)."""

    addr: Address
    type: CandidateType = CandidateType.HOST
    related: Address | None = None


@dataclass(frozen=True)
class RemoteCandidate:
    """An address the peer offered."""

    addr: Address
    type: CandidateType

    @property
    def kind(self) -> PathKind:
        """How the path layer treats it: a host address is ``lan``; a
        reflexive or relayed one (a TURN relay of the peer's is just an
        address to send to) is ``direct``."""
        return PathKind.LAN if self.type is CandidateType.HOST else PathKind.DIRECT


class SessionState(Enum):
    AWAITING_ACCEPT = "awaiting-accept"
    """Initiator: session-initiate sent."""
    VERIFYING = "verifying"
    """The peer's offer or answer is in; waiting for its account's keys."""
    PROBE_WAIT = "probe-wait"
    """Verified; probing starts at ``probe_at``."""
    ACTIVE = "active"
    """Introduced: :class:`PeerIntroduced` went out."""


_ONGOING = frozenset({Action.TRANSPORT_INFO, Action.SESSION_INFO, Action.SESSION_TERMINATE})
_TAKES: dict[tuple[bool, SessionState], frozenset[Action]] = {
    (True, SessionState.AWAITING_ACCEPT): frozenset({Action.SESSION_ACCEPT,
                                                     Action.SESSION_INFO,
                                                     Action.SESSION_TERMINATE}),
    (True, SessionState.VERIFYING): _ONGOING,
    (True, SessionState.PROBE_WAIT): _ONGOING,
    (True, SessionState.ACTIVE): _ONGOING,
    (False, SessionState.VERIFYING): _ONGOING,
    (False, SessionState.PROBE_WAIT): _ONGOING,
    (False, SessionState.ACTIVE): _ONGOING,
}
"""Which actions from the peer a session takes, by (this side initiated,
state); any other is ``unexpected-request`` + ``out-of-order``."""

_SUPPORTED = frozenset({Action.SESSION_INITIATE, Action.SESSION_ACCEPT, *_ONGOING})


@dataclass(frozen=True)
class KeysWanted:
    """The keys of ``bare_jid`` are unknown: fetch its vCard, then call
    :meth:`JingleSignalling.keys_changed` (within ``key_wait``)."""

    bare_jid: str


@dataclass(frozen=True)
class PeerIntroduced:
    """Both sides are verified and it is time to probe: everything a
    :class:`~dtx.proto.traversal.Introduction` needs. ``initiator``: this
    device is the QUIC client. ``rtt``: the signalling round trip this side
    measured (initiator only). ``peer_fingerprint``: SHA-256 of the peer's
    QUIC certificate, as it signed it."""

    sid: str
    peer_jid: str
    peer_key: bytes
    initiator: bool
    candidates: tuple[RemoteCandidate, ...]
    intro: bytes
    probe_key: bytes
    probe_at: float
    rtt: float | None
    peer_fingerprint: bytes

    def introduction(self, relay: RelayWrap | None = None,
                     channel: int | None = None) -> Introduction:
        """The :class:`~dtx.proto.traversal.Introduction` to hand to
        ``Endpoint.introduced`` (``relay``: how to reach the peer through a
        relay of this device's own, if it has one)."""
        return Introduction(self.peer_jid, self.peer_key, self.intro, self.probe_key,
                            self.initiator, tuple((c.addr, c.kind) for c in self.candidates),
                            relay, channel, source="xmpp")


@dataclass(frozen=True)
class CandidatesAdded:
    """The peer of an introduced session trickled more candidates."""

    sid: str
    peer_jid: str
    candidates: tuple[RemoteCandidate, ...]


@dataclass(frozen=True)
class SignallingFailed:
    """A session ended before its introduction. ``remote``: the peer ended
    it (its session-terminate, or an iq error with ``condition``)."""

    sid: str
    peer_jid: str
    reason: Reason
    remote: bool
    condition: str | None = None
    text: str = ""


@dataclass(frozen=True)
class SessionTerminated:
    """An introduced session ended (not by :meth:`JingleSignalling.terminate`)."""

    sid: str
    peer_jid: str
    reason: Reason
    remote: bool


@dataclass(frozen=True)
class SignallingStatistics:
    """A snapshot: sessions held (``pending``: not yet introduced),
    outstanding requests, per-account rate entries, and the counters."""

    sessions: int
    pending: int
    requests: int
    rate_entries: int
    counters: dict[str, int]
    log_suppressed: int


SignallingEvent = (KeysWanted | PeerIntroduced | CandidatesAdded | SignallingFailed
                   | SessionTerminated)


def certificate_fingerprint(certificate: x509.Certificate) -> bytes:
    """SHA-256 of the certificate's DER: what XEP-0320's ``sha-256``
    fingerprint of a QUIC certificate is."""
    return hashlib.sha256(certificate.public_bytes(Encoding.DER)).digest()


# -- state --------------------------------------------------------------------------


@dataclass
class _Session:
    sid: str
    peer: str
    bare: str
    initiator: bool
    state: SessionState
    ufrag: str
    pwd: str
    created_at: float
    deadline: float | None
    sent_at: float
    content_name: str = CONTENT_NAME
    remote: IceUdpTransport | None = None
    candidates: list[RemoteCandidate] = field(default_factory=list)
    sent: list[Address] = field(default_factory=list)
    rtt: float | None = None
    probe_at: float | None = None
    peer_key: bytes | None = None
    key_deadline: float | None = None
    keys_fresh: bool = False
    """The keys were fetched for this session (after it asked)."""


@dataclass
class _Request:
    peer: str
    sid: str
    action: Action
    deadline: float


def _jid(text: str | None) -> str | None:
    """``text`` as a normalised JID, or None."""
    if text is None:
        return None
    try:
        return JID.parse(text).full
    except DtxError:
        return None


def _full_jid(text: str | None) -> str | None:
    """``text`` as a normalised full JID, or None."""
    jid = _jid(text)
    return jid if jid is not None and "/" in jid else None


def _bare_of(full: str) -> str:
    return JID.parse(full).bare.full


def _usable(addr: Address) -> bool:
    try:
        ip = ipaddress.ip_address(addr[0])
    except ValueError:
        return False
    return 0 < addr[1] < 65536 and not ip.is_unspecified and not ip.is_multicast


class JingleSignalling:
    """One device's Jingle signalling, sans-IO (module docs).

    ``fingerprint``: SHA-256 of this device's QUIC certificate
    (:func:`certificate_fingerprint`). ``may_contact(full_jid)``: whether
    that JID may learn this device's addresses. ``keys_for(bare_jid)``: the
    device keys the account publishes (None: unknown), a
    :class:`~dtx.trust.store.KeySource`'s method. ``local_candidates()``:
    this device's candidates now, for the session-accepts it sends.
    """

    def __init__(
        self,
        identity: DeviceIdentity,
        *,
        fingerprint: bytes,
        may_contact: Callable[[str], bool],
        keys_for: Callable[[str], frozenset[bytes] | None],
        local_candidates: Callable[[], Sequence[LocalCandidate]],
        rng: random.Random,
        config: SignallingConfig | None = None,
    ) -> None:
        if len(fingerprint) != 32:
            raise ConnectError("the certificate fingerprint is a 32-byte SHA-256 digest")
        self.identity = identity
        self.jid = identity.jid.full
        self.config = config or SignallingConfig()
        self._fingerprint = fingerprint
        self._may_contact = may_contact
        self._keys_for = keys_for
        self._local_candidates = local_candidates
        self._rng = rng
        self._sessions: dict[str, _Session] = {}
        self._by_peer: dict[str, _Session] = {}
        self._requests: dict[str, _Request] = {}
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._ended: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._wanted: OrderedDict[str, float] = OrderedDict()
        self._out: list[Element] = []
        self._events: deque[SignallingEvent] = deque()
        self._log = LogLimiter(logger)
        self.counters: dict[str, int] = {
            "refused_unknown": 0, "refused_rate": 0, "refused_full": 0, "refused_bad": 0,
            "refused_security": 0, "unknown_session": 0, "out_of_order": 0,
            "tie_breaks": 0, "candidates_dropped": 0, "answers_unmatched": 0,
            "errors_ignored": 0, "evicted": 0,
        }

    # -- user calls -------------------------------------------------------------------

    def connect(self, peer_jid: str, candidates: Sequence[LocalCandidate], now: float) -> str:
        """Offer a session to the full JID ``peer_jid`` with ``candidates``;
        returns the sid (that of the one in progress, if there is one). A
        :class:`PeerIntroduced` or a :class:`SignallingFailed` follows.
        Raises :class:`~dtx.errors.ConnectError` for a JID that is not a
        full JID, this device, or one ``may_contact`` refuses, and when the
        session table is full."""
        peer = _full_jid(peer_jid)
        if peer is None:
            raise ConnectError(f"{peer_jid!r} is not a full JID")
        if peer == self.jid:
            raise ConnectError("a device does not signal to itself")
        if not self._permitted(peer):
            raise ConnectError(f"{peer} may not learn this device's addresses: it is neither "
                               f"a device of this account nor a subscribed contact")
        current = self._by_peer.get(peer)
        if current is not None and current.state is not SessionState.ACTIVE:
            return current.sid
        if self._pending() >= self.config.max_pending or not self._room(now, current):
            raise ConnectError("too many signalling sessions in progress")
        if current is not None:
            self._forget(current)  # a new session replaces the introduced one
        s = self._new_session(peer, initiator=True, state=SessionState.AWAITING_ACCEPT,
                              sid=f"{self._rng.getrandbits(128):032x}", now=now)
        s.deadline = now + self.config.accept_timeout
        transport = self._transport(s, self._fresh(s, candidates), proof=True)
        self._send(s, Jingle(action=Action.SESSION_INITIATE, sid=s.sid, initiator=self.jid,
                             contents=(self._content(s, transport),)), now)
        if self._keys(s.bare) is None:
            self._want_keys(s.bare, now)
        logger.info("offered Jingle session %s to %s", s.sid, peer)
        return s.sid

    def add_candidates(self, candidates: Sequence[LocalCandidate], now: float, *,
                       sid: str | None = None) -> int:
        """Trickle ``candidates`` (transport-info) to session ``sid``, or to
        every session whose peer has this side's transport already; those a
        session was sent before are left out. Returns how many sessions got
        some."""
        if sid is not None:
            one = self._sessions.get(sid)
            targets = [] if one is None else [one]
        else:
            targets = list(self._sessions.values())
        sent = 0
        for s in targets:
            if not s.initiator and s.state is SessionState.VERIFYING:
                continue  # the responder's transport goes first in its session-accept
            fresh = self._fresh(s, candidates)
            if fresh:
                transport = self._transport(s, fresh, proof=False)
                self._send(s, Jingle(action=Action.TRANSPORT_INFO, sid=s.sid,
                                     contents=(self._content(s, transport, description=False),)),
                           now)
                sent += 1
        return sent

    def keys_changed(self, bare_jid: str, now: float) -> None:
        """The keys of ``bare_jid`` may be known now: sessions waiting for
        them go on."""
        try:
            bare = JID.parse(bare_jid).bare.full
        except DtxError:
            return
        self._wanted.pop(bare, None)  # answered: the next need may ask again
        for s in [s for s in self._sessions.values()
                  if s.bare == bare and s.state is SessionState.VERIFYING]:
            s.keys_fresh = s.key_deadline is not None
            self._verify(s, now)

    def terminate(self, sid: str, now: float, reason: Reason = Reason.SUCCESS) -> bool:
        """End session ``sid`` (a session-terminate to the peer); False when
        there is no such session. No event follows."""
        s = self._sessions.get(sid)
        if s is None:
            return False
        self._send_terminate(s, reason, now)
        self._forget(s)
        return True

    def close(self, now: float) -> None:
        """End every session (``gone``), as a device does that goes offline."""
        for s in list(self._sessions.values()):
            self._send_terminate(s, Reason.GONE, now)
            self._forget(s)

    def session_state(self, sid: str) -> SessionState | None:
        s = self._sessions.get(sid)
        return None if s is None else s.state

    def statistics(self) -> SignallingStatistics:
        return SignallingStatistics(
            sessions=len(self._sessions), pending=self._pending(),
            requests=len(self._requests), rate_entries=len(self._buckets),
            counters=dict(self.counters), log_suppressed=self._log.suppressed)

    # -- out --------------------------------------------------------------------------

    def stanzas_to_send(self) -> list[Element]:
        """Iq stanzas to hand to the XMPP server, in order."""
        out, self._out = self._out, []
        return out

    def next_event(self) -> SignallingEvent | None:
        return self._events.popleft() if self._events else None

    def get_timer(self) -> float | None:
        when: float | None = None
        for s in self._sessions.values():
            if s.deadline is not None and (when is None or s.deadline < when):
                when = s.deadline
        for r in self._requests.values():
            if when is None or r.deadline < when:
                when = r.deadline
        return when

    def handle_timer(self, now: float) -> None:
        for rid in [rid for rid, r in self._requests.items() if r.deadline <= now]:
            req = self._requests.pop(rid)
            s = self._session_for(req.sid, req.peer)
            if s is not None and req.action is Action.SESSION_INITIATE \
                    and s.state is SessionState.AWAITING_ACCEPT:
                self._fail(s, Reason.TIMEOUT, now, remote=False)
        for s in [s for s in self._sessions.values()
                  if s.deadline is not None and s.deadline <= now]:
            if s.state is SessionState.AWAITING_ACCEPT:
                self._fail(s, Reason.TIMEOUT, now, remote=False)
            elif s.state is SessionState.VERIFYING:
                self._verify(s, now)
            elif s.state is SessionState.PROBE_WAIT:
                self._introduce(s, now)

    # -- in ---------------------------------------------------------------------------

    def receive_iq(self, stanza: Element, now: float) -> bool:
        """An iq from the XMPP server. Returns whether it was signalling
        (answered or consumed here); anything else is the caller's. Never
        raises for bad input."""
        if stanza.tag != IQ:
            return False
        kind = stanza.get("type")
        if kind in ("result", "error"):
            rid = stanza.get("id") or ""
            if not rid.startswith(_ID_PREFIX):
                return False
            self._on_answer(rid, stanza, kind == "result", now)
            return True
        if kind not in ("set", "get"):
            return False
        payload = jingle_child(stanza)
        if payload is None:
            return False
        sender = stanza.get("from")
        peer = _full_jid(sender)
        if peer is None or sender is None:
            self.counters["refused_bad"] += 1
            return True  # no one to answer
        to = stanza.get("to")
        if peer == self.jid or (to is not None and _full_jid(to) != self.jid) \
                or not self._permitted(peer):
            self.counters["refused_unknown"] += 1
            self._log.info("refused", _bare_of(peer), "Jingle from %s refused: not a device "
                           "of this account nor a subscribed contact", peer)
            self._error(stanza, StanzaError("cancel", "service-unavailable"))
            return True
        if kind == "get":
            self._error(stanza, StanzaError("cancel", "bad-request"))
            return True
        try:
            j = decode_jingle(payload)
        except DecodeError as exc:
            self.counters["refused_bad"] += 1
            self._log.warning("bad", peer, "malformed Jingle from %s: %s", peer, exc)
            self._error(stanza, StanzaError("cancel", "bad-request"))
            return True
        if j.action not in _SUPPORTED:
            self._error(stanza, StanzaError("cancel", "feature-not-implemented"))
        elif j.action is Action.SESSION_INITIATE:
            self._on_initiate(stanza, peer, j, now)
        else:
            self._on_action(stanza, peer, j, now)
        return True

    def _on_answer(self, rid: str, stanza: Element, ok: bool, now: float) -> None:
        req = self._requests.get(rid)
        sender = _jid(stanza.get("from"))
        if req is None or sender not in (req.peer, _bare_of(req.peer)):
            self.counters["answers_unmatched"] += 1
            return
        del self._requests[rid]
        s = self._session_for(req.sid, req.peer)
        if s is None:
            return
        if ok:
            if req.action is Action.SESSION_INITIATE and s.rtt is None:
                s.rtt = now - s.sent_at
            return
        err = decode_stanza_error(stanza)
        if req.action is Action.SESSION_INITIATE and s.state is SessionState.AWAITING_ACCEPT:
            # A tie-break lost: had the peer's own session-initiate (sent
            # before this error, so read before it) been taken, this session
            # would be gone already. It was refused or lost: fail, say why.
            self._fail(s, Reason.BUSY if err.condition == "resource-constraint"
                       else Reason.GENERAL_ERROR, now, remote=True, condition=err.condition,
                       terminate=False)
        elif req.action is Action.SESSION_ACCEPT:
            # The initiator never took the answer (the responder is
            # introduced already: SessionTerminated says it is over).
            self._fail(s, Reason.GENERAL_ERROR, now, remote=True, condition=err.condition,
                       terminate=False)
        else:
            self.counters["errors_ignored"] += 1

    def _on_initiate(self, stanza: Element, peer: str, j: Jingle, now: float) -> None:
        cfg = self.config
        if not cfg.accept_sessions:
            self._error(stanza, StanzaError("cancel", "service-unavailable"))
            return
        clash = self._sessions.get(j.sid)
        if clash is not None and clash.peer != peer:
            self._error(stanza, StanzaError("cancel", "conflict"))
            return
        if clash is not None or (peer, j.sid) in self._ended:
            self._out_of_order(stanza)  # a repeated or replayed session-initiate
            return
        if j.initiator is not None and _full_jid(j.initiator) != peer:
            self.counters["refused_bad"] += 1
            self._error(stanza, StanzaError("cancel", "bad-request"))
            return
        current = self._by_peer.get(peer)
        if current is not None and current.initiator \
                and current.state is SessionState.AWAITING_ACCEPT:
            self.counters["tie_breaks"] += 1
            if j.sid.encode() >= current.sid.encode():  # ours is lower: ours wins
                self._error(stanza, StanzaError("cancel", "conflict", JingleCondition.TIE_BREAK))
                return
        bare = _bare_of(peer)
        if not self._take_token(bare, now):
            self.counters["refused_rate"] += 1
            self._log.warning("rate", bare, "too many session-initiates from %s", bare)
            self._error(stanza, StanzaError("wait", "resource-constraint"))
            return
        pending = self._pending()
        same_account = sum(1 for s in self._sessions.values() if s.bare == bare)
        if current is not None:
            pending -= int(current.state is not SessionState.ACTIVE)
            same_account -= 1
        if pending >= cfg.max_pending or same_account >= cfg.max_sessions_per_account \
                or not self._room(now, current):
            self.counters["refused_full"] += 1
            self._log.warning("full", bare, "signalling table full; refusing %s", peer)
            self._error(stanza, StanzaError("wait", "resource-constraint"))
            return
        if current is not None:
            self._forget(current)  # a newer session, or the peer won the tie-break
        self._result(stanza)
        s = self._new_session(peer, initiator=False, state=SessionState.VERIFYING, sid=j.sid,
                              now=now)
        s.content_name = j.contents[0].name if j.contents else CONTENT_NAME
        self._take_offer(s, j, now)

    def _on_action(self, stanza: Element, peer: str, j: Jingle, now: float) -> None:
        s = self._session_for(j.sid, peer)
        if s is None:
            self.counters["unknown_session"] += 1
            self._error(stanza, StanzaError("cancel", "item-not-found",
                                            JingleCondition.UNKNOWN_SESSION))
            return
        if j.action not in _TAKES[(s.initiator, s.state)]:
            self._out_of_order(stanza)
            return
        if j.action is Action.SESSION_TERMINATE:
            self._result(stanza)
            reason = j.reason.condition if j.reason is not None else Reason.SUCCESS
            text = (j.reason.text or "") if j.reason is not None else ""
            logger.info("%s ended Jingle session %s: %s", peer, s.sid, reason.value)
            self._fail(s, reason, now, remote=True, text=text, terminate=False)
        elif j.action is Action.SESSION_INFO:
            if j.foreign:
                self._error(stanza, StanzaError("modify", "feature-not-implemented",
                                                JingleCondition.UNSUPPORTED_INFO))
                return
            self._result(stanza)
        elif j.action is Action.SESSION_ACCEPT:
            if j.responder is not None and _full_jid(j.responder) != peer:
                self.counters["refused_bad"] += 1
                self._error(stanza, StanzaError("cancel", "bad-request"))
                return
            self._result(stanza)
            if s.rtt is None:
                s.rtt = now - s.sent_at
            s.state = SessionState.VERIFYING
            s.deadline = None
            self._take_offer(s, j, now)
        else:
            self._on_transport_info(stanza, s, j, now)

    def _on_transport_info(self, stanza: Element, s: _Session, j: Jingle, now: float) -> None:
        remote = s.remote
        t = j.contents[0].transport if len(j.contents) == 1 else None
        if remote is None or t is None or (t.ufrag, t.pwd) != (remote.ufrag, remote.pwd):
            # No ICE restarts: new credentials mean a new session.
            self.counters["refused_bad"] += 1
            self._error(stanza, StanzaError("modify", "bad-request"))
            return
        self._result(stanza)
        added = self._take_candidates(s, t.candidates)
        if added and s.state is SessionState.ACTIVE:
            self._events.append(CandidatesAdded(s.sid, s.peer, tuple(added)))

    # -- the exchange -----------------------------------------------------------------

    def _take_offer(self, s: _Session, j: Jingle, now: float) -> None:
        """Check the peer's session-initiate or session-accept (already
        acknowledged), then its key."""
        problem = self._check(s, j)
        if isinstance(problem, Reason):
            self.counters["refused_security" if problem is Reason.SECURITY_ERROR
                          else "refused_bad"] += 1
            self._log.warning("offer", s.peer, "Jingle %s from %s refused: %s",
                              j.action.value, s.peer, problem.value)
            self._fail(s, problem, now, remote=False)
            return
        s.remote = problem
        self._take_candidates(s, problem.candidates)
        self._verify(s, now)

    def _check(self, s: _Session, j: Jingle) -> IceUdpTransport | Reason:
        if len(j.contents) != 1 or j.contents[0].description != NS_XMLSTREAM:
            return Reason.UNSUPPORTED_APPLICATIONS
        content = j.contents[0]
        t = content.transport
        if t is None:
            return Reason.UNSUPPORTED_TRANSPORTS
        if content.creator is not Creator.INITIATOR or content.name != s.content_name \
                or t.ufrag is None or t.pwd is None:
            return Reason.INCOMPATIBLE_PARAMETERS
        fp, device = t.fingerprint, t.device
        if fp is None or device is None:
            return Reason.SECURITY_ERROR
        setups = (Setup.PASSIVE,) if s.initiator else (Setup.ACTIVE, Setup.ACTPASS)
        if fp.hash != HASH or len(fp.digest) != 32 or fp.setup not in setups \
                or device.alpn != self.config.alpn:
            return Reason.INCOMPATIBLE_PARAMETERS
        return t

    def _verify(self, s: _Session, now: float) -> None:
        """The peer's proof against its account's keys; on success, the
        next step of the exchange."""
        t = s.remote
        if t is None or t.fingerprint is None or t.device is None or t.ufrag is None \
                or t.pwd is None:
            return
        keys = self._keys(s.bare)
        device = t.device
        if (keys is None or device.key not in keys) and not s.keys_fresh:
            # Unknown keys, or a key they do not list (a device of the
            # account published it since they were read): read them again,
            # once, waiting up to key_wait.
            if s.key_deadline is None and self.config.key_wait > 0:
                s.key_deadline = s.deadline = now + self.config.key_wait
                self._want_keys(s.bare, now)
                return
            if s.key_deadline is not None and now < s.key_deadline:
                return
        initiator, responder = (self.jid, s.peer) if s.initiator else (s.peer, self.jid)
        signed = device_signing_input(
            role=Creator.RESPONDER if s.initiator else Creator.INITIATOR, sid=s.sid,
            initiator=initiator, responder=responder, fingerprint=t.fingerprint,
            alpn=device.alpn, ufrag=t.ufrag, pwd=t.pwd)
        if keys is None or device.key not in keys \
                or not verify_signature(device.key, device.signature, signed):
            self.counters["refused_security"] += 1
            self._log.warning("security", s.peer, "Jingle fingerprint of %s refused: %s",
                              s.peer, "its account's keys are unknown" if keys is None
                              else "not signed by a key its account publishes")
            self._fail(s, Reason.SECURITY_ERROR, now, remote=False)
            return
        s.peer_key = device.key
        s.key_deadline = None
        if not s.initiator:
            candidates = self._fresh(s, self._local_candidates())
            transport = self._transport(s, candidates, proof=True)
            self._send(s, Jingle(action=Action.SESSION_ACCEPT, sid=s.sid, responder=self.jid,
                                 contents=(self._content(s, transport),)), now)
            s.sent_at = now
        # Both probe as the exchange completes for them: the responder now,
        # as its session-accept leaves; the initiator as it arrives.
        self._schedule(s, now + self.config.probe_delay, now)

    def _schedule(self, s: _Session, probe_at: float, now: float) -> None:
        s.state = SessionState.PROBE_WAIT
        s.probe_at = s.deadline = probe_at
        if probe_at <= now:
            self._introduce(s, now)

    def _introduce(self, s: _Session, now: float) -> None:
        t = s.remote
        if t is None or t.ufrag is None or t.pwd is None or s.peer_key is None \
                or t.fingerprint is None:
            return
        mine, theirs = (s.ufrag, s.pwd), (t.ufrag, t.pwd)
        intro, probe_key = derive_probe_material(
            s.sid, mine if s.initiator else theirs, theirs if s.initiator else mine)
        s.state = SessionState.ACTIVE
        s.deadline = None
        logger.info("Jingle session %s with %s: introduced (%s, %d candidates)", s.sid,
                    s.peer, "initiator" if s.initiator else "responder", len(s.candidates))
        self._events.append(PeerIntroduced(
            s.sid, s.peer, s.peer_key, s.initiator, tuple(s.candidates), intro, probe_key,
            s.probe_at if s.probe_at is not None else now, s.rtt, t.fingerprint.digest))

    def _fail(self, s: _Session, reason: Reason, now: float, *, remote: bool,
              condition: str | None = None, text: str = "", terminate: bool = True) -> None:
        if terminate:
            self._send_terminate(s, reason, now)
        introduced = s.state is SessionState.ACTIVE
        self._forget(s)
        if introduced:
            self._events.append(SessionTerminated(s.sid, s.peer, reason, remote))
        else:
            self._events.append(SignallingFailed(s.sid, s.peer, reason, remote, condition,
                                                 text[:256]))

    # -- building ---------------------------------------------------------------------

    def _content(self, s: _Session, transport: IceUdpTransport, *,
                 description: bool = True) -> Content:
        """The one content; a transport-info leaves the description out."""
        return Content(creator=Creator.INITIATOR, name=s.content_name,
                       senders="both" if description else None,
                       description=NS_XMLSTREAM if description else None,
                       transport_ns=NS_ICE_UDP, transport=transport)

    def _transport(self, s: _Session, candidates: Sequence[LocalCandidate], *,
                   proof: bool) -> IceUdpTransport:
        ices = []
        for c in candidates:
            s.sent.append(c.addr)
            n = len(s.sent)
            base = c.related[0] if c.related is not None and c.type is CandidateType.SRFLX \
                else c.addr[0]
            foundation = hashlib.sha256(f"{c.type.value}|{base}".encode()).hexdigest()[:8]
            ices.append(IceCandidate(
                foundation=foundation, id=f"{s.sid[:8]}c{n}", ip=c.addr[0], port=c.addr[1],
                priority=candidate_priority(c.type, 0xFFFF - n), type=c.type,
                rel_addr=None if c.related is None else c.related[0],
                rel_port=None if c.related is None else c.related[1]))
        if not proof:
            return IceUdpTransport(ufrag=s.ufrag, pwd=s.pwd, candidates=tuple(ices))
        fp = Fingerprint(HASH, Setup.ACTIVE if s.initiator else Setup.PASSIVE,
                         self._fingerprint)
        initiator, responder = (self.jid, s.peer) if s.initiator else (s.peer, self.jid)
        signed = device_signing_input(
            role=Creator.INITIATOR if s.initiator else Creator.RESPONDER, sid=s.sid,
            initiator=initiator, responder=responder, fingerprint=fp, alpn=self.config.alpn,
            ufrag=s.ufrag, pwd=s.pwd)
        device = DeviceProof(self.config.alpn, self.identity.public_key,
                             self.identity.sign(signed))
        return IceUdpTransport(ufrag=s.ufrag, pwd=s.pwd, candidates=tuple(ices),
                               fingerprint=fp, device=device)

    def _fresh(self, s: _Session, candidates: Iterable[LocalCandidate]) -> list[LocalCandidate]:
        """The candidates not sent to ``s`` yet, up to the bound."""
        out: list[LocalCandidate] = []
        seen = set(s.sent)
        for c in candidates:
            if len(s.sent) + len(out) >= self.config.max_candidates:
                break
            addr = normalise_address(c.addr)
            related = None if c.related is None else normalise_address(c.related)
            if addr in seen or not _usable(addr):
                continue
            seen.add(addr)
            out.append(LocalCandidate(addr, c.type, related))
        return out

    def _take_candidates(self, s: _Session,
                         candidates: Iterable[IceCandidate]) -> list[RemoteCandidate]:
        added: list[RemoteCandidate] = []
        known = {c.addr for c in s.candidates}
        for c in candidates:
            addr = normalise_address((c.ip, c.port))
            if c.protocol != "udp" or c.component != 1 or addr in known or not _usable(addr):
                continue
            if len(s.candidates) >= self.config.max_candidates:
                self.counters["candidates_dropped"] += 1
                continue
            known.add(addr)
            rc = RemoteCandidate(addr, c.type)
            s.candidates.append(rc)
            added.append(rc)
        return added

    def _ice_text(self, n: int) -> str:
        return "".join(self._rng.choice(_ICE_ALPHABET) for _ in range(n))

    def _new_session(self, peer: str, *, initiator: bool, state: SessionState, sid: str,
                     now: float) -> _Session:
        s = _Session(sid, peer, _bare_of(peer), initiator, state, self._ice_text(8),
                     self._ice_text(24), now, None, now)
        self._sessions[sid] = s
        self._by_peer[peer] = s
        return s

    # -- sending ----------------------------------------------------------------------

    def _send(self, s: _Session, j: Jingle, now: float) -> None:
        rid = f"{_ID_PREFIX}{self._rng.getrandbits(64):016x}"
        self._out.append(make_iq("set", rid, to=s.peer, from_=self.jid,
                                 payload=encode_jingle(j)))
        if len(self._requests) < self.config.max_requests:
            self._requests[rid] = _Request(s.peer, s.sid, j.action, now + self.config.iq_timeout)

    def _send_terminate(self, s: _Session, reason: Reason, now: float) -> None:
        text = _SECURITY_TEXT if reason is Reason.SECURITY_ERROR else None
        self._send(s, Jingle(action=Action.SESSION_TERMINATE, sid=s.sid,
                             reason=JingleReason(reason, text)), now)

    def _result(self, request: Element) -> None:
        self._out.append(make_iq("result", request.get("id", ""), to=request.get("from"),
                                 from_=self.jid))

    def _error(self, request: Element, err: StanzaError) -> None:
        """An iq error with nothing but its condition: no payload echoed, no
        text, so a refused sender learns no address."""
        el = make_iq("error", request.get("id", ""), to=request.get("from"), from_=self.jid)
        el.append(encode_stanza_error(err))
        self._out.append(el)

    def _out_of_order(self, request: Element) -> None:
        self.counters["out_of_order"] += 1
        self._error(request, StanzaError("cancel", "unexpected-request",
                                         JingleCondition.OUT_OF_ORDER))

    # -- tables -----------------------------------------------------------------------

    def _permitted(self, peer: str) -> bool:
        try:
            return bool(self._may_contact(peer))
        except DtxError as exc:
            self._log.warning("policy", peer, "contact policy failed for %s: %s", peer, exc)
            return False

    def _keys(self, bare: str) -> frozenset[bytes] | None:
        try:
            return self._keys_for(bare)
        except DtxError as exc:  # a broken vCard: fail closed
            self._log.warning("keys", bare, "keys of %s unusable: %s", bare, exc)
            return frozenset()

    def _want_keys(self, bare: str, now: float) -> None:
        """One :class:`KeysWanted` per account per ``key_wait``, or until
        :meth:`keys_changed` says it was answered."""
        asked = self._wanted.pop(bare, None)
        if asked is None or now >= asked + self.config.key_wait:
            self._events.append(KeysWanted(bare))
            asked = now
        self._wanted[bare] = asked
        while len(self._wanted) > self.config.max_rate_entries:
            self._wanted.popitem(last=False)

    def _session_for(self, sid: str, peer: str) -> _Session | None:
        s = self._sessions.get(sid)
        return s if s is not None and s.peer == peer else None

    def _pending(self) -> int:
        return sum(1 for s in self._sessions.values() if s.state is not SessionState.ACTIVE)

    def _room(self, now: float, replacing: _Session | None) -> bool:
        """Whether a new session fits (after ``replacing`` goes): at the
        bound the least recently introduced session is ended for it."""
        if len(self._sessions) - int(replacing is not None) < self.config.max_sessions:
            return True
        active = [s for s in self._sessions.values()
                  if s.state is SessionState.ACTIVE and s is not replacing]
        if not active:
            return False
        oldest = min(active, key=lambda s: s.probe_at or s.created_at)
        self.counters["evicted"] += 1
        self._fail(oldest, Reason.EXPIRED, now, remote=False)
        return True

    def _take_token(self, bare: str, now: float) -> bool:
        cfg = self.config
        tokens, at = self._buckets.pop(bare, (cfg.initiate_burst, now))
        tokens = min(cfg.initiate_burst, tokens + max(0.0, now - at) / cfg.initiate_interval)
        ok = tokens >= 1.0
        self._buckets[bare] = (tokens - 1.0 if ok else tokens, now)
        while len(self._buckets) > cfg.max_rate_entries:
            self._buckets.popitem(last=False)
        return ok

    def _forget(self, s: _Session) -> None:
        if self._sessions.get(s.sid) is s:
            del self._sessions[s.sid]
        if self._by_peer.get(s.peer) is s:
            del self._by_peer[s.peer]
        self._ended[(s.peer, s.sid)] = None
        while len(self._ended) > self.config.max_ended:
            self._ended.popitem(last=False)
