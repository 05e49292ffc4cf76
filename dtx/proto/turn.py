"""A TURN client (RFC 8656) on the device's one UDP socket, sans-IO.

One :class:`TurnClient` holds one UDP allocation on one TURN server: it
allocates with long-term credentials (RFC 8489 section 9.2; TURN REST ones
from XEP-0215: ``expiry:user`` and base64(HMAC-SHA1(secret, username))),
keeps the allocation, its permissions and channel bindings alive, and wraps
application data for a peer: ChannelData on a bound channel, else a Send
indication. ``docs/protocol.md`` (TURN) says what goes on the wire and why.

In: :meth:`~TurnClient.receive` (datagrams *from the TURN server's
address*), :meth:`~TurnClient.handle_timer`, user calls (``allocate``,
``permit``, ``bind_channel``, ``forget``, ``close``,
``update_credentials``). Out: :meth:`~TurnClient.datagrams_to_send` (all to
the server), :meth:`~TurnClient.get_timer`, :meth:`~TurnClient.next_event`,
and :meth:`~TurnClient.wrap`, the path layer's ``RelayWrap`` shape
(:meth:`~TurnClient.relay_wrap` binds it to one peer).

Requests are retransmitted on RFC 8489's schedule (0, RTO, 3 RTO, 7 RTO
..., then a last wait); a 401 or 438 gets a new transaction, a bounded
number of times. A response counts only if its integrity verifies with the
request's key (error responses without any are believed: servers send 437
or 441 before they authenticate anything). New credentials are tried on the
live allocation at once; a server that binds an allocation to its first
credentials answers 441 (coturn does), and the client keeps signing it with
those and saves the new ones for the next Allocate. When ``expires`` passes
with no new credentials, the allocation is released and
:class:`AllocationLost` says why.

One machine with its config, events and statistics: past the style guide's
~800 lines, but splitting its events off would only scatter its API.
"""

from __future__ import annotations

import logging
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from ..errors import DecodeError, LocalProtocolError
from ..wire.stun import (
    Address,
    Attribute,
    AttrType,
    Integrity,
    IntegrityCheck,
    StunClass,
    StunMessage,
    StunMethod,
    check_integrity,
    decode_stun,
    encode_stun,
    software_attribute,
)
from ..wire.turn import (
    CHANNEL_MAX,
    CHANNEL_MIN,
    NONCE_COOKIE,
    PasswordAlgorithm,
    channel_number_attribute,
    data_attribute,
    decode_channel_data,
    encode_channel_data,
    is_channel_data,
    lifetime_attribute,
    long_term_key,
    nonce_attribute,
    password_algorithm_attribute,
    peer_address_attribute,
    realm_attribute,
    requested_transport_attribute,
    username_attribute,
)

__all__ = [
    "AllocationClosed",
    "AllocationFailed",
    "AllocationLost",
    "AllocationRefreshed",
    "AllocationState",
    "Allocated",
    "ChannelBindFailed",
    "ChannelBound",
    "CredentialsExpiring",
    "DataReceived",
    "PermissionCreated",
    "PermissionFailed",
    "TurnClient",
    "TurnClientConfig",
    "TurnEvent",
    "TurnStatistics",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class TurnClientConfig:
    """Times in seconds."""

    initial_rto: float = 0.5
    """RFC 8489 section 6.2.1's RTO: the first retransmission interval,
    doubled after each one."""
    max_transmissions: int = 7
    """Rc: transmissions of one request, the first included."""
    last_wait_factor: int = 16
    """Rm: after the last transmission, wait this many RTOs for an answer."""
    max_auth_retries: int = 2
    """New transactions one request may take after 401/438 challenges."""
    mismatch_retries: tuple[float, ...] = (2.0, 4.0)
    """Pauses before asking again when an Allocate gets 437 (the server
    still holds an allocation for this socket: coturn keeps a released one
    for about a second). There is no other socket to try from, as RFC 8656
    section 7.4 would have it; after the last, :class:`AllocationFailed`."""
    lifetime: int = 600
    """LIFETIME asked for in Allocate and Refresh (the server decides)."""
    refresh_margin: float = 60.0
    """Refresh an allocation, permission or binding this long before it
    would expire (at the latest half-way through its lifetime)."""
    permission_lifetime: float = 300.0
    """RFC 8656 section 9: fixed at five minutes."""
    channel_lifetime: float = 600.0
    """RFC 8656 section 12: fixed at ten minutes."""
    credential_margin: float = 300.0
    """:class:`CredentialsExpiring` this long before the credentials'
    ``expires`` (at most half their lifetime from when they came)."""
    max_permissions: int = 1024
    """Peer IPs permitted at once; one more is a :class:`LocalProtocolError`."""
    pad_channel_data: bool = False
    """Pad ChannelData to 4 bytes (optional over UDP, RFC 8656 section 12.5)."""
    software: str | None = None
    """SOFTWARE in Allocate requests, if set."""


class AllocationState(Enum):
    IDLE = "idle"
    ALLOCATING = "allocating"
    ALLOCATED = "allocated"
    CLOSING = "closing"


# -- events -------------------------------------------------------------------


@dataclass(frozen=True)
class Allocated:
    """The server granted an allocation: ``relayed`` is where peers send,
    ``mapped`` this socket as the server saw it (a reflexive candidate)."""

    relayed: Address
    mapped: Address | None
    lifetime: int


@dataclass(frozen=True)
class AllocationRefreshed:
    lifetime: int


@dataclass(frozen=True)
class AllocationFailed:
    """Allocate did not succeed: the server's error code (408: no answer)."""

    code: int
    reason: str


@dataclass(frozen=True)
class AllocationLost:
    """A granted allocation is gone (or was released) and will not come
    back by itself; :meth:`TurnClient.allocate` makes a new one."""

    reason: str


@dataclass(frozen=True)
class AllocationClosed:
    """The allocation asked for by :meth:`TurnClient.close` is released."""


@dataclass(frozen=True)
class PermissionCreated:
    ip: str


@dataclass(frozen=True)
class PermissionFailed:
    ip: str
    code: int
    reason: str


@dataclass(frozen=True)
class ChannelBound:
    peer: Address
    channel: int


@dataclass(frozen=True)
class ChannelBindFailed:
    peer: Address
    code: int
    reason: str


@dataclass(frozen=True)
class DataReceived:
    """A peer's datagram, relayed by the server."""

    peer: Address
    payload: bytes


@dataclass(frozen=True)
class CredentialsExpiring:
    """Fresh credentials are needed before ``expires`` (the client's clock);
    pass them to :meth:`TurnClient.update_credentials`."""

    expires: float


TurnEvent = (
    Allocated | AllocationRefreshed | AllocationFailed | AllocationLost | AllocationClosed
    | PermissionCreated | PermissionFailed | ChannelBound | ChannelBindFailed | DataReceived
    | CredentialsExpiring
)


@dataclass
class TurnStatistics:
    requests: int = 0
    """Transactions started (each retry after a challenge is one more)."""
    retransmissions: int = 0
    dropped: int = 0
    """Datagrams from the server that were not TURN, did not decode, or
    answered nothing outstanding."""
    integrity_failures: int = 0
    """Responses dropped because their integrity did not verify."""
    data_in: int = 0
    data_out: int = 0


# -- internal state -------------------------------------------------------------


@dataclass(frozen=True)
class _Credentials:
    username: str
    password: str
    expires: float | None


class _Kind(Enum):
    ALLOCATE = "Allocate"
    REFRESH = "Refresh"
    REAUTH = "Refresh (new credentials)"
    CLOSE = "Refresh (lifetime 0)"
    PERMISSION = "CreatePermission"
    CHANNEL = "ChannelBind"


_METHOD = {
    _Kind.ALLOCATE: StunMethod.ALLOCATE,
    _Kind.REFRESH: StunMethod.REFRESH,
    _Kind.REAUTH: StunMethod.REFRESH,
    _Kind.CLOSE: StunMethod.REFRESH,
    _Kind.PERMISSION: StunMethod.CREATE_PERMISSION,
    _Kind.CHANNEL: StunMethod.CHANNEL_BIND,
}


@dataclass
class _Transaction:
    kind: _Kind
    txid: bytes
    data: bytes
    credentials: _Credentials
    key: bytes | None
    nonce: bytes | None
    next_at: float
    sent: int = 1
    auth_retries: int = 0
    ip: str | None = None
    peer: Address | None = None
    channel: int | None = None


@dataclass(kw_only=True)
class _Lease:
    """What the server keeps for a while: a permission or a channel binding."""

    active: bool = False
    refresh_at: float | None = None
    expires_at: float | None = None
    pending: bytes | None = None
    """Transaction id of the request in flight for it."""


@dataclass(kw_only=True)
class _Permission(_Lease):
    ip: str


@dataclass(kw_only=True)
class _Channel(_Lease):
    peer: Address
    number: int


def _refresh_delay(lifetime: float, margin: float) -> float:
    return max(lifetime - margin, lifetime / 2)


class TurnClient:
    """One UDP allocation on one TURN server, sans-IO.

    ``expires`` (and every time argument) is on the clock the caller passes
    as ``now``; None means the credentials never expire.
    """

    def __init__(
        self,
        server: Address,
        username: str,
        password: str,
        expires: float | None,
        *,
        rng: random.Random,
        config: TurnClientConfig | None = None,
    ) -> None:
        self.server = server
        self.config = config or TurnClientConfig()
        self.rng = rng
        self.state = AllocationState.IDLE
        self.relayed: Address | None = None
        self.mapped: Address | None = None
        self.lifetime: int | None = None
        self._creds = _Credentials(username, password, expires)
        self._alloc_creds = self._creds
        """The credentials the live allocation is signed with."""
        self._pinned = False
        """The server refused new credentials on this allocation (441)."""
        self._warned: _Credentials | None = None
        self._creds_at: float | None = None
        """When the current credentials came (None: not known yet; the
        first Allocate sets it)."""
        self._realm: bytes | None = None
        self._nonce: bytes | None = None
        self._algorithm: int = PasswordAlgorithm.MD5
        self._integrity = Integrity.SHA1
        self._algorithms_attr: Attribute | None = None
        self._keys: dict[tuple[str, str, bytes, int], bytes] = {}
        self._txns: dict[bytes, _Transaction] = {}
        self._out: list[bytes] = []
        self._events: deque[TurnEvent] = deque()
        self._refresh_at: float | None = None
        self._expires_at: float | None = None
        self._allocate_at: float | None = None
        """When to ask again after a 437 to Allocate."""
        self._mismatches = 0
        self._permissions: dict[str, _Permission] = {}
        self._channels: dict[Address, _Channel] = {}
        self._by_number: dict[int, _Channel] = {}
        self._quarantine: dict[int, float] = {}
        self.stats = TurnStatistics()

    # -- user calls ---------------------------------------------------------------

    def allocate(self, now: float, *, as_before: bool = False) -> None:
        """Ask for an allocation; :class:`Allocated` or
        :class:`AllocationFailed` follows. ``as_before``: with the
        credentials the last allocation was made with, when they have not
        expired (after :class:`AllocationLost`: a server that restarted ties
        this socket to the first username it sees from it, which is the
        Refresh's that found the allocation gone; coturn answers an
        Allocate with any other 437)."""
        if self.state is not AllocationState.IDLE:
            raise LocalProtocolError(f"allocate() while {self.state.value}")
        self.state = AllocationState.ALLOCATING
        if self._creds_at is None:
            self._creds_at = now
        old = self._alloc_creds
        if not (as_before and (old.expires is None or now < old.expires)):
            self._alloc_creds = self._creds
        self._pinned = False
        self._mismatches = 0
        self._request(_Kind.ALLOCATE, now, credentials=self._alloc_creds)

    def permit(self, peer: Address, now: float) -> None:
        """Install (and keep refreshing) a permission for the peer's IP;
        :class:`PermissionCreated` or :class:`PermissionFailed` follows.
        Ports do not matter to permissions (RFC 8656 section 9)."""
        self._require_allocation("permit()")
        ip = peer[0]
        if ip in self._permissions:
            return
        if len(self._permissions) >= self.config.max_permissions:
            raise LocalProtocolError(f"more than {self.config.max_permissions} permissions")
        perm = _Permission(ip=ip)
        self._permissions[ip] = perm
        perm.pending = self._request(_Kind.PERMISSION, now, ip=ip)

    def bind_channel(self, peer: Address, now: float) -> int:
        """Bind a channel to ``peer`` (which installs its permission too);
        :class:`ChannelBound` or :class:`ChannelBindFailed` follows. Returns
        the channel number; the same one for a peer already bound."""
        self._require_allocation("bind_channel()")
        existing = self._channels.get(peer)
        if existing is not None:
            return existing.number
        self._quarantine = {n: t for n, t in self._quarantine.items() if t > now}
        number = next((n for n in range(CHANNEL_MIN, CHANNEL_MAX + 1)
                       if n not in self._by_number and n not in self._quarantine), None)
        if number is None:
            raise LocalProtocolError("every channel number is bound")
        chan = _Channel(peer=peer, number=number)
        self._channels[peer] = chan
        self._by_number[number] = chan
        chan.pending = self._request(_Kind.CHANNEL, now, peer=peer, channel=number)
        return number

    def forget(self, peer: Address, now: float) -> None:
        """Stop refreshing the channel to ``peer`` and, when no other channel
        uses that IP, its permission: both lapse on the server. The channel
        number is not given to another peer until five minutes after the
        server's binding ends (RFC 8656 section 12)."""
        chan = self._channels.pop(peer, None)
        if chan is not None:
            del self._by_number[chan.number]
            self._cancel(chan.pending)
            ends = chan.expires_at if chan.expires_at is not None \
                else now + self.config.channel_lifetime
            self._quarantine[chan.number] = ends + 300.0
        if not any(c.peer[0] == peer[0] for c in self._channels.values()):
            perm = self._permissions.pop(peer[0], None)
            if perm is not None:
                self._cancel(perm.pending)

    def close(self, now: float) -> None:
        """Release the allocation (a Refresh with LIFETIME 0);
        :class:`AllocationClosed` follows."""
        if self.state in (AllocationState.IDLE, AllocationState.CLOSING):
            return
        authenticated = self._realm is not None and self._nonce is not None
        self._reset()
        if not authenticated:
            self._events.append(AllocationClosed())
            return
        self.state = AllocationState.CLOSING
        self._request(_Kind.CLOSE, now)

    def update_credentials(self, username: str, password: str, expires: float | None,
                           now: float) -> None:
        """New credentials (from XEP-0215, before the old ones' ``expires``).

        The next Allocate uses them; a live allocation is refreshed with them
        at once unless its server already refused new credentials.
        """
        new = _Credentials(username, password, expires)
        if new == self._creds:
            return
        self._creds = new
        self._creds_at = now
        if self.state is AllocationState.ALLOCATED and not self._pinned \
                and new != self._alloc_creds:
            self._request(_Kind.REAUTH, now)

    def wrap(self, peer: Address, payload: bytes) -> tuple[bytes, Address]:
        """``payload`` for ``peer``, ready for the socket: ChannelData when a
        channel to it is bound, else a Send indication; and the server's
        address to send it to. The path layer's ``RelayWrap`` shape."""
        self.stats.data_out += 1
        chan = self._channels.get(peer)
        if chan is not None and chan.active:
            return encode_channel_data(chan.number, payload, pad=self.config.pad_channel_data), \
                self.server
        txid = self._txid()
        msg = StunMessage(StunMethod.SEND, StunClass.INDICATION, txid,
                          (peer_address_attribute(peer, txid), data_attribute(payload)))
        return encode_stun(msg, fingerprint=False), self.server

    def relay_wrap(self, peer: Address) -> Callable[[bytes], tuple[bytes, Address]]:
        """:meth:`wrap` for one peer: an ``Introduction.relay``."""
        return lambda payload: self.wrap(peer, payload)

    def channel(self, peer: Address) -> int | None:
        """The channel bound (and confirmed) to ``peer``, if any."""
        chan = self._channels.get(peer)
        return chan.number if chan is not None and chan.active else None

    @property
    def outstanding(self) -> int:
        """Requests sent and neither answered nor given up yet."""
        return len(self._txns)

    def permitted(self, ip: str) -> bool:
        perm = self._permissions.get(ip)
        return perm is not None and perm.active

    def statistics(self) -> TurnStatistics:
        return self.stats

    # -- in -------------------------------------------------------------------------

    def receive(self, data: bytes, now: float) -> None:
        """A datagram that came from the TURN server's address."""
        try:
            if is_channel_data(data):
                self._receive_channel_data(data)
                return
            msg = decode_stun(data)
        except DecodeError as exc:
            logger.debug("turn %s:%d: dropped datagram: %s", *self.server, exc)
            self.stats.dropped += 1
            return
        if msg.classic:
            self.stats.dropped += 1
        elif msg.cls is StunClass.INDICATION and msg.method == StunMethod.DATA:
            peer, payload = msg.xor_peer_address, msg.data
            if peer is None or payload is None:
                self.stats.dropped += 1
                return
            self.stats.data_in += 1
            self._events.append(DataReceived(peer, payload))
        elif msg.cls in (StunClass.SUCCESS, StunClass.ERROR):
            self._receive_response(msg, data, now)
        else:
            self.stats.dropped += 1

    def _receive_channel_data(self, data: bytes) -> None:
        frame = decode_channel_data(data)
        chan = self._by_number.get(frame.channel)
        if chan is None:
            self.stats.dropped += 1
            return
        self.stats.data_in += 1
        self._events.append(DataReceived(chan.peer, frame.data))

    def _receive_response(self, msg: StunMessage, raw: bytes, now: float) -> None:
        txn = self._txns.get(msg.transaction_id)
        if txn is None or msg.method != _METHOD[txn.kind]:
            self.stats.dropped += 1
            return
        error = msg.error_code
        challenge = error is not None and error.code in (401, 438)
        if txn.key is not None and not challenge:
            check = check_integrity(raw, txn.key)
            if check is IntegrityCheck.INVALID or (
                check is IntegrityCheck.ABSENT and msg.cls is StunClass.SUCCESS
            ):
                logger.debug("turn %s:%d: %s response with integrity %s, dropped",
                             *self.server, txn.kind.value, check.value)
                self.stats.integrity_failures += 1
                return
            msg = msg.up_to_integrity()
        del self._txns[txn.txid]
        if msg.cls is StunClass.SUCCESS:
            self._succeeded(txn, msg, now)
            return
        code, reason = (error.code, error.reason.rstrip("\x00")) if error is not None \
            else (400, "no ERROR-CODE")  # coturn counts a NUL into its reasons
        if challenge and self._challenged(txn, msg, code, now):
            return
        self._failed(txn, code, reason, now)

    def _challenged(self, txn: _Transaction, msg: StunMessage, code: int, now: float) -> bool:
        """A 401 or 438: take the realm and nonce and retry, if that can help."""
        nonce, realm = msg.nonce, msg.realm
        if nonce is None or txn.auth_retries >= self.config.max_auth_retries:
            return False
        if code == 401 and txn.key is not None and nonce == txn.nonce:
            return False  # signed with this very nonce: the credentials are wrong
        if realm is not None:
            self._realm = realm
        if self._realm is None:
            return False
        self._nonce = nonce
        offered = msg.password_algorithms
        if not nonce.startswith(NONCE_COOKIE):  # an RFC 5389 server (coturn)
            self._algorithm, self._integrity, self._algorithms_attr = \
                PasswordAlgorithm.MD5, Integrity.SHA1, None
        elif offered is not None:
            # RFC 8489 section 9.2.5: the server's choices, echoed back
            # (bid-down protection); SHA-256 when offered.
            if PasswordAlgorithm.SHA256 in offered:
                self._algorithm = PasswordAlgorithm.SHA256
            elif PasswordAlgorithm.MD5 in offered:
                self._algorithm = PasswordAlgorithm.MD5
            else:
                return False
            self._integrity = Integrity.SHA256
            self._algorithms_attr = msg.attribute(AttrType.PASSWORD_ALGORITHMS)
        retry = self._request(txn.kind, now, ip=txn.ip, peer=txn.peer, channel=txn.channel,
                              credentials=txn.credentials)
        self._txns[retry].auth_retries = txn.auth_retries + 1
        self._repoint(txn.txid, retry)
        return True

    # -- outcomes -------------------------------------------------------------------

    def _succeeded(self, txn: _Transaction, msg: StunMessage, now: float) -> None:
        kind = txn.kind
        if kind is _Kind.ALLOCATE:
            relayed = msg.xor_relayed_address
            if relayed is None:
                self._failed(txn, 500, "Allocate success without XOR-RELAYED-ADDRESS", now)
                return
            self.state = AllocationState.ALLOCATED
            self.relayed, self.mapped = relayed, msg.xor_mapped_address
            lifetime = self._granted(msg, now)
            logger.info("turn %s:%d: allocated %s:%d for %d s", *self.server, *relayed, lifetime)
            self._events.append(Allocated(relayed, self.mapped, lifetime))
            if self._creds != self._alloc_creds:  # new ones came while allocating
                self._request(_Kind.REAUTH, now)
        elif kind in (_Kind.REFRESH, _Kind.REAUTH):
            if self.state is not AllocationState.ALLOCATED:
                return
            if kind is _Kind.REAUTH:
                self._alloc_creds = txn.credentials
            lifetime = self._granted(msg, now)
            self._events.append(AllocationRefreshed(lifetime))
        elif kind is _Kind.CLOSE:
            self._closed()
        elif kind is _Kind.PERMISSION and txn.ip is not None:
            perm = self._permissions.get(txn.ip)
            if perm is not None and perm.pending == txn.txid:
                self._permission_refreshed(perm, now)
        elif kind is _Kind.CHANNEL and txn.peer is not None:
            chan = self._channels.get(txn.peer)
            if chan is None or chan.pending != txn.txid:
                return
            chan.pending = None
            first = not chan.active
            chan.active = True
            chan.expires_at = now + self.config.channel_lifetime
            chan.refresh_at = now + _refresh_delay(self.config.channel_lifetime,
                                                   self.config.refresh_margin)
            if first:
                self._events.append(ChannelBound(chan.peer, chan.number))
            # RFC 8656 section 12.2: a ChannelBind installs or refreshes the
            # permission of the peer's IP too
            perm = self._permissions.get(chan.peer[0])
            if perm is None and len(self._permissions) < self.config.max_permissions:
                perm = self._permissions[chan.peer[0]] = _Permission(ip=chan.peer[0])
            if perm is not None and perm.pending is None:
                self._permission_refreshed(perm, now)

    def _permission_refreshed(self, perm: _Permission, now: float) -> None:
        perm.pending = None
        first = not perm.active
        perm.active = True
        perm.expires_at = now + self.config.permission_lifetime
        perm.refresh_at = now + _refresh_delay(self.config.permission_lifetime,
                                               self.config.refresh_margin)
        if first:
            self._events.append(PermissionCreated(perm.ip))

    def _granted(self, msg: StunMessage, now: float) -> int:
        lifetime = msg.lifetime if msg.lifetime is not None else self.config.lifetime
        self.lifetime = lifetime
        self._expires_at = now + lifetime
        self._refresh_at = now + _refresh_delay(lifetime, self.config.refresh_margin)
        return lifetime

    def _failed(self, txn: _Transaction, code: int, reason: str, now: float) -> None:
        kind = txn.kind
        logger.info("turn %s:%d: %s failed: %d %s", *self.server, kind.value, code, reason)
        if kind is _Kind.ALLOCATE:
            if code == 437 and self._mismatches < len(self.config.mismatch_retries):
                self._allocate_at = now + self.config.mismatch_retries[self._mismatches]
                self._mismatches += 1
                return
            self._reset()
            self._events.append(AllocationFailed(code, reason))
        elif kind is _Kind.CLOSE:
            self._closed()
        elif self.state is not AllocationState.ALLOCATED:
            return
        elif code == 437:  # RFC 8656: no allocation for this 5-tuple any more
            self._lose(f"{kind.value} answered 437 {reason}: the server has no allocation",
                       now, release=False)
        elif kind is _Kind.REAUTH:
            if code == 441:
                logger.info("turn %s:%d: keeps this allocation's first credentials",
                            *self.server)
                self._pinned = True
            if self._refresh_at is None:  # a refresh fell due while this was out
                self._refresh_at = now
        elif kind is _Kind.REFRESH:
            if code == 408 and self._expires_at is not None and now < self._expires_at:
                self._request(_Kind.REFRESH, now)  # no answer yet: try until expiry
            else:
                self._lose(f"Refresh failed: {code} {reason}", now, release=False)
        elif kind is _Kind.PERMISSION and txn.ip is not None:
            perm = self._permissions.get(txn.ip)
            if perm is not None and perm.pending == txn.txid:
                del self._permissions[txn.ip]
                self._events.append(PermissionFailed(txn.ip, code, reason))
        elif kind is _Kind.CHANNEL and txn.peer is not None:
            chan = self._channels.get(txn.peer)
            if chan is not None and chan.pending == txn.txid:
                del self._channels[txn.peer]
                del self._by_number[chan.number]
                self._events.append(ChannelBindFailed(txn.peer, code, reason))

    def _lose(self, reason: str, now: float, *, release: bool) -> None:
        """The allocation is gone, or must go: forget it, and with
        ``release`` send one unretransmitted Refresh with LIFETIME 0."""
        logger.info("turn %s:%d: allocation lost: %s", *self.server, reason)
        self._reset()
        if release and self._realm is not None and self._nonce is not None:
            self._request(_Kind.CLOSE, now)
            self._txns.clear()  # best effort: no retransmission, no event
        self._events.append(AllocationLost(reason))

    def _closed(self) -> None:
        self._reset()
        self._events.append(AllocationClosed())

    def _reset(self) -> None:
        self.state = AllocationState.IDLE
        self.relayed = self.mapped = None
        self.lifetime = None
        self._refresh_at = self._expires_at = self._allocate_at = None
        self._txns.clear()
        self._permissions.clear()
        self._channels.clear()
        self._by_number.clear()
        self._quarantine.clear()

    # -- timers ---------------------------------------------------------------------

    def get_timer(self) -> float | None:
        times = [t.next_at for t in self._txns.values()]
        if self._allocate_at is not None:
            times.append(self._allocate_at)
        expires = self._creds.expires
        if self.state is AllocationState.ALLOCATED:
            times += [t for t in (self._refresh_at, self._expires_at) if t is not None]
            for rec in self._leases():
                if rec.refresh_at is not None:
                    times.append(rec.refresh_at)
                if rec.expires_at is not None and rec.pending is None:
                    times.append(rec.expires_at)
            if expires is not None:
                times.append(expires)
        warn_at = self._warn_at()
        if self.state in (AllocationState.ALLOCATING, AllocationState.ALLOCATED) \
                and warn_at is not None and self._warned != self._creds:
            times.append(warn_at)
        return min(times) if times else None

    def _warn_at(self) -> float | None:
        """When to say the credentials are expiring: ``credential_margin``
        before they do, but not before half their life has passed (Prosody
        can be set to mint credentials for a minute: a margin longer than
        that would ask for new ones as soon as they came, over and over)."""
        expires = self._creds.expires
        if expires is None:
            return None
        margin = self.config.credential_margin
        if self._creds_at is not None:
            margin = min(margin, max(0.0, expires - self._creds_at) / 2)
        return expires - margin

    def handle_timer(self, now: float) -> None:
        for txn in [t for t in self._txns.values() if now >= t.next_at]:
            if self._txns.get(txn.txid) is not txn:
                continue  # an earlier outcome in this loop dropped it
            self._retransmit_or_fail(txn, now)
        if self.state not in (AllocationState.ALLOCATING, AllocationState.ALLOCATED):
            return
        expires = self._creds.expires
        warn_at = self._warn_at()
        if expires is not None and warn_at is not None and self._warned != self._creds \
                and now >= warn_at:
            self._warned = self._creds
            self._events.append(CredentialsExpiring(expires))
        if self._allocate_at is not None and now >= self._allocate_at:
            self._allocate_at = None
            self._request(_Kind.ALLOCATE, now, credentials=self._alloc_creds)
        if self.state is not AllocationState.ALLOCATED:
            return  # an Allocate in flight: the server judges its credentials
        if expires is not None and now >= expires:
            self._lose("the TURN credentials expired and no new ones came", now, release=True)
            return
        if self._expires_at is not None and now >= self._expires_at:
            self._lose("the allocation's lifetime ended without a refresh", now, release=False)
            return
        if self._refresh_at is not None and now >= self._refresh_at:
            self._refresh_at = None  # the answer sets the next one
            if not any(t.kind in (_Kind.REFRESH, _Kind.REAUTH) for t in self._txns.values()):
                self._request(_Kind.REFRESH, now)
        self._refresh_records(now)

    def _refresh_records(self, now: float) -> None:
        """Refresh permissions and bindings that are due. One that expired
        unrefreshed (the host slept, say) is requested again: it stays
        wanted until :meth:`forget`."""
        for lease in self._leases():
            if lease.pending is not None:
                continue
            lapsed = lease.expires_at is not None and now >= lease.expires_at
            if lapsed:
                lease.active, lease.expires_at = False, None
            if lapsed or (lease.refresh_at is not None and now >= lease.refresh_at):
                lease.refresh_at = None
                if isinstance(lease, _Permission):
                    lease.pending = self._request(_Kind.PERMISSION, now, ip=lease.ip)
                elif isinstance(lease, _Channel):
                    lease.pending = self._request(_Kind.CHANNEL, now, peer=lease.peer,
                                                  channel=lease.number)

    def _retransmit_or_fail(self, txn: _Transaction, now: float) -> None:
        cfg = self.config
        if txn.sent >= cfg.max_transmissions:
            del self._txns[txn.txid]
            self._failed(txn, 408, "no answer from the TURN server", now)
            return
        self._out.append(txn.data)
        self.stats.retransmissions += 1
        txn.sent += 1
        txn.next_at = now + self._wait_after(txn.sent)

    def _wait_after(self, sent: int) -> float:
        """RFC 8489 section 6.2.1: RTO, 2 RTO, 4 RTO ... after the first
        transmissions, Rm RTO after the last."""
        cfg = self.config
        if sent >= cfg.max_transmissions:
            return cfg.last_wait_factor * cfg.initial_rto
        return float(cfg.initial_rto * 2 ** (sent - 1))

    # -- out ------------------------------------------------------------------------

    def datagrams_to_send(self) -> list[tuple[bytes, Address]]:
        out = [(d, self.server) for d in self._out]
        self._out.clear()
        return out

    def next_event(self) -> TurnEvent | None:
        return self._events.popleft() if self._events else None

    # -- requests -------------------------------------------------------------------

    def _txid(self) -> bytes:
        return self.rng.getrandbits(96).to_bytes(12, "big")

    def _key(self, creds: _Credentials) -> bytes | None:
        if self._realm is None:
            return None
        cache = (creds.username, creds.password, self._realm, self._algorithm)
        key = self._keys.get(cache)
        if key is None:
            if len(self._keys) >= 8:
                self._keys.clear()
            key = self._keys[cache] = long_term_key(
                creds.username, self._realm, creds.password, self._algorithm)
        return key

    def _request(
        self,
        kind: _Kind,
        now: float,
        *,
        ip: str | None = None,
        peer: Address | None = None,
        channel: int | None = None,
        credentials: _Credentials | None = None,
    ) -> bytes:
        """Start a transaction; returns its id."""
        if credentials is None:
            credentials = self._creds if kind in (_Kind.ALLOCATE, _Kind.REAUTH) \
                else self._alloc_creds
        txid = self._txid()
        attrs: list[Attribute] = []
        if kind is _Kind.ALLOCATE:
            attrs += [requested_transport_attribute(), lifetime_attribute(self.config.lifetime)]
            if self.config.software:
                attrs.append(software_attribute(self.config.software))
        elif kind in (_Kind.REFRESH, _Kind.REAUTH):
            attrs.append(lifetime_attribute(self.config.lifetime))
        elif kind is _Kind.CLOSE:
            attrs.append(lifetime_attribute(0))
        elif kind is _Kind.PERMISSION and ip is not None:
            attrs.append(peer_address_attribute((ip, 0), txid))
        elif kind is _Kind.CHANNEL and peer is not None and channel is not None:
            attrs += [channel_number_attribute(channel), peer_address_attribute(peer, txid)]
        key = self._key(credentials) if self._nonce is not None else None
        if key is not None and self._realm is not None and self._nonce is not None:
            attrs += [username_attribute(credentials.username), realm_attribute(self._realm),
                      nonce_attribute(self._nonce)]
            if self._algorithms_attr is not None:
                attrs += [self._algorithms_attr, password_algorithm_attribute(self._algorithm)]
        msg = StunMessage(_METHOD[kind], StunClass.REQUEST, txid, tuple(attrs))
        data = encode_stun(msg, key=key, integrity=self._integrity)
        self._txns[txid] = _Transaction(kind, txid, data, credentials, key, self._nonce,
                                        now + self._wait_after(1), ip=ip, peer=peer,
                                        channel=channel)
        self._out.append(data)
        self.stats.requests += 1
        logger.debug("turn %s:%d: %s %s", *self.server, kind.value, txid.hex())
        return txid

    def _repoint(self, old: bytes, new: bytes) -> None:
        """A retried request carries on the pending mark of its record."""
        for rec in self._leases():
            if rec.pending == old:
                rec.pending = new

    def _leases(self) -> list[_Lease]:
        return [*self._permissions.values(), *self._channels.values()]

    def _cancel(self, txid: bytes | None) -> None:
        if txid is not None:
            self._txns.pop(txid, None)

    def _require_allocation(self, what: str) -> None:
        if self.state is not AllocationState.ALLOCATED:
            raise LocalProtocolError(f"{what} without an allocation ({self.state.value})")

