"""Sans-IO core of the rendezvous server: registrations, introductions,
the relay table, and STUN by way of :func:`rendezvous.stun.answer_stun`.

Shaped like aioquic's ``QuicConnection``: the driver feeds datagrams with
:meth:`RendezvousCore.receive_datagram`, sends what
:meth:`RendezvousCore.datagrams_to_send` returns, and arms one timer at
:meth:`RendezvousCore.get_timer`, calling
:meth:`RendezvousCore.handle_timer` when it fires. Time (``now``) and
randomness (``rng``, ``secret``) are arguments; nothing here touches a
socket or a clock. The protocol is docs/protocol.md (sections 7, 8); limits,
counters and the amplification table are in docs/rendezvous.md.

Rules the core keeps whatever arrives:

* ``receive_datagram`` never raises; what does not decode is counted and
  dropped, never answered.
* Nothing is stored for a source that has not proved its address (the
  challenge is stateless) and its key (signature and vCard). Every table
  is bounded, and a full table refuses newcomers (503) instead of pushing
  out devices that are already registered.
* A source that has not registered never gets a reply more than 3 times
  the size of the datagram that caused it.
* The relay forwards only between the two registered ends of an
  introduction, towards a responder only once it has ACCEPTed, within
  per-device token buckets.

**Key lookups that take time.** With a synchronous key source (a vCard
folder), REGISTER is answered at once. Pass ``keys=None`` instead and the
core, once the challenge and signature check out, queues a
:class:`VerificationNeeded` event (see :meth:`RendezvousCore.next_event`)
and waits for :meth:`RendezvousCore.complete_verification` with the
account's keys: the seam for live vCards fetched over XMPP. Waiting
verifications are bounded in number and time.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import ipaddress
import logging
import random
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from enum import IntEnum

from dtx.errors import DecodeError, DtxError, JIDError
from dtx.jid import JID
from dtx.trust.store import KeySource
from dtx.wire.control import (
    CHALLENGE_BYTES,
    MAX_CANDIDATES,
    Candidate,
    CandidateKind,
    ControlMessage,
    MessageType,
    decode_control,
    encode_control,
    register_signature_valid,
)
from dtx.wire.demux import PacketKind, classify
from dtx.wire.relay import RELAY_FIRST_BYTE, decode_relay, encode_relay
from dtx.wire.stun import Address
from rendezvous.stun import ServerAddresses, answer_stun, normalise_address

__all__ = [
    "AMPLIFICATION_FACTOR",
    "ErrorCode",
    "RendezvousConfig",
    "RendezvousCore",
    "VerificationNeeded",
]

logger = logging.getLogger(__name__)

AMPLIFICATION_FACTOR = 3
_CONTROL = 0x10
_CHALLENGE_LABEL = b"dtx-challenge"
_ROLE_INITIATOR = 1
_ROLE_RESPONDER = 2
_ID_TRIES = 16


class ErrorCode(IntEnum):
    """ERROR codes of the CONTROL protocol."""

    BAD_REQUEST = 400
    CHALLENGE_INVALID = 401
    FORBIDDEN = 403
    NOT_FOUND = 404
    RATE_LIMITED = 429
    TABLE_FULL = 503


@dataclass(frozen=True, kw_only=True)
class RendezvousConfig:
    """Tunables of the rendezvous core; seconds unless the name says."""

    lifetime: float = 90.0
    keepalive: float = 25.0
    challenge_validity: float = 30.0
    max_registrations: int = 100_000
    max_devices_per_account: int = 32
    max_introductions: int = 200_000
    max_introductions_per_device: int = 256
    max_pending_introductions_per_target: int = 16
    max_used_challenges: int = 200_000
    max_pending_verifications: int = 1024
    verification_timeout: float = 10.0
    relay: bool = True
    relay_bytes_per_s: float = 2 * 1024 * 1024
    relay_burst_bytes: float = 512 * 1024
    relay_frames_per_s: float = 2000.0
    relay_burst_frames: float = 500.0
    pending_frames: int = 8
    pending_bytes: int = 16 * 1024
    pending_hold: float = 2.0
    intro_timeout: float = 5.0
    intro_retransmits: tuple[float, ...] = (0.25, 0.5, 1.0)
    control_per_source_per_s: float = 50.0
    control_per_source_burst: float = 100.0
    max_sources: int = 65_536
    warning_interval: float = 10.0


@dataclass(frozen=True)
class VerificationNeeded:
    """The core needs the keys of ``bare_jid`` to finish a registration;
    answer with :meth:`RendezvousCore.complete_verification` (``token``)."""

    token: int
    bare_jid: str


class _Bucket:
    """A token bucket; starts full."""

    __slots__ = ("tokens", "stamp")

    def __init__(self, burst: float, now: float) -> None:
        self.tokens = burst
        self.stamp = now

    def take(self, amount: float, now: float, rate: float, burst: float) -> bool:
        if now > self.stamp:
            self.tokens = min(burst, self.tokens + (now - self.stamp) * rate)
            self.stamp = now
        if self.tokens < amount:
            return False
        self.tokens -= amount
        return True


@dataclass(eq=False)
class _Registration:
    id: bytes
    jid: JID
    key: bytes
    addr: Address
    candidates: tuple[Candidate, ...]
    refreshed: float
    expires: float
    byte_bucket: _Bucket
    frame_bucket: _Bucket
    channels: dict[int, _Introduction] = field(default_factory=dict)
    intros: set[bytes] = field(default_factory=set)


@dataclass(eq=False)
class _Introduction:
    id: bytes
    probe_key: bytes
    initiator: _Registration
    responder: _Registration
    channel_initiator: int
    channel_responder: int
    created: float
    responder_txid: bytes
    accepted: bool = False
    retransmits: int = 0
    pending: deque[tuple[float, bytes]] = field(default_factory=deque)
    pending_bytes: int = 0


@dataclass
class _Verification:
    msg: ControlMessage
    jid: JID
    src: Address
    size: int
    deadline: float


def _address_bytes(addr: Address) -> bytes:
    """``family ‖ address ‖ port`` for the challenge MAC."""
    try:
        ip = ipaddress.ip_address(addr[0].split("%", 1)[0])
    except ValueError:
        return b"\x00" + addr[0].encode("utf-8", "replace") + addr[1].to_bytes(2, "big")
    return bytes([ip.version]) + ip.packed + (addr[1] & 0xFFFF).to_bytes(2, "big")


class RendezvousCore:
    """The rendezvous server's state machine; see the module docs."""

    def __init__(
        self,
        *,
        keys: KeySource | None,
        addresses: ServerAddresses,
        config: RendezvousConfig,
        secret: bytes,
        rng: random.Random,
    ) -> None:
        self._keys = keys
        self._addresses = addresses
        self._config = config
        self._secret = secret
        self._rng = rng
        self._primary = addresses.primary
        self._out: list[tuple[bytes, Address, Address]] = []
        self._events: deque[VerificationNeeded] = deque()
        self._regs: dict[bytes, _Registration] = {}
        self._by_jid: dict[JID, _Registration] = {}
        self._by_account: dict[JID, set[bytes]] = {}
        self._by_addr: dict[Address, _Registration] = {}
        self._intros: dict[bytes, _Introduction] = {}
        self._pending_per_target: dict[bytes, int] = {}
        self._used: OrderedDict[bytes, float] = OrderedDict()
        self._in_flight: set[bytes] = set()
        self._verifications: dict[int, _Verification] = {}
        self._next_token = 1
        self._sources: OrderedDict[str, _Bucket] = OrderedDict()
        self._warned: OrderedDict[str, float] = OrderedDict()
        self._heap: list[tuple[float, int, int, bytes | int]] = []
        self._seq = 0
        self._counters: dict[str, int] = {}

    # -- driver interface ---------------------------------------------------

    def receive_datagram(self, data: bytes, src: Address, local: Address, now: float) -> None:
        """Handle one datagram from ``src`` received on ``local``; never raises."""
        try:
            self._receive(bytes(data), normalise_address(src), local, now)
        except Exception:  # a bug must not take the server down; counted, tests check 0
            self._count("internal_errors")
            logger.exception("internal error handling a datagram from %s", src)

    def datagrams_to_send(self) -> list[tuple[bytes, Address, Address]]:
        """``(data, send_to, send_from)`` for everything queued; clears the queue."""
        out, self._out = self._out, []
        return out

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` should next be called, or None."""
        times = []
        if self._heap:
            times.append(self._heap[0][0])
        if self._used:
            times.append(next(iter(self._used.values())))
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        """Expire registrations, retransmit and forget introductions, drop
        held frames and stale challenges whose time has come."""
        try:
            self._handle_timer(now)
        except Exception:
            self._count("internal_errors")
            logger.exception("internal error in the timer")

    def next_event(self) -> VerificationNeeded | None:
        """The next event for the driver (only with ``keys=None``)."""
        return self._events.popleft() if self._events else None

    def complete_verification(
        self, token: int, keys: frozenset[bytes] | None, now: float
    ) -> None:
        """Finish a registration that waited for its account's keys
        (``None``: the account is unknown). Unknown tokens are ignored."""
        pending = self._verifications.pop(token, None)
        if pending is None:
            return
        self._in_flight.discard(pending.msg.challenge or b"")
        self._finish_register(pending.msg, pending.jid, pending.src, pending.size, keys, now)

    def statistics(self) -> dict[str, int]:
        """Counters (monotonic totals) and gauges (current table sizes)."""
        stats = dict(self._counters)
        stats["registrations"] = len(self._regs)
        stats["introductions"] = len(self._intros)
        stats["used_challenges"] = len(self._used)
        stats["pending_verifications"] = len(self._verifications)
        stats["pending_frames"] = sum(len(i.pending) for i in self._intros.values() if i.pending)
        return stats

    # -- plumbing -----------------------------------------------------------

    def _count(self, name: str, n: int = 1) -> None:
        self._counters[name] = self._counters.get(name, 0) + n

    def _warn(self, src: Address, now: float, fmt: str, *args: object) -> None:
        """WARNING at most once per ``warning_interval`` per source IP."""
        last = self._warned.get(src[0])
        if last is not None and now - last < self._config.warning_interval:
            logger.debug(fmt, *args)
            return
        self._warned[src[0]] = now
        self._warned.move_to_end(src[0])
        while len(self._warned) > self._config.max_sources:
            self._warned.popitem(last=False)
        logger.warning(fmt, *args)

    def _send(self, data: bytes, to: Address) -> None:
        self._out.append((data, to, self._primary))

    def _reply(self, msg: ControlMessage, to: Address, size: int, *, proven: bool) -> bool:
        data = encode_control(msg)
        if not proven and len(data) > AMPLIFICATION_FACTOR * size:
            self._count("dropped_amplification")
            logger.debug("not answering %s: %d bytes for %d", to, len(data), size)
            return False
        self._send(data, to)
        return True

    def _error(
        self,
        txid: bytes,
        code: ErrorCode,
        reason: str,
        to: Address,
        size: int,
        now: float,
        *,
        proven: bool,
    ) -> None:
        self._count(f"refused_{int(code)}")
        if code in (ErrorCode.FORBIDDEN, ErrorCode.CHALLENGE_INVALID):
            self._warn(to, now, "refused %s: %d %s", to, code, reason)
        else:
            logger.debug("refused %s: %d %s", to, code, reason)
        msg = ControlMessage(MessageType.ERROR, txid, error=(int(code), reason))
        if not proven and len(encode_control(msg)) > AMPLIFICATION_FACTOR * size:
            msg = ControlMessage(MessageType.ERROR, txid, error=(int(code), ""))
        self._reply(msg, to, size, proven=proven)

    def _push(self, deadline: float, kind: int, key: bytes | int) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (deadline, self._seq, kind, key))
        live = len(self._regs) + len(self._intros) + len(self._verifications)
        if len(self._heap) > 4 * live + 1024:
            self._compact_heap()

    def _compact_heap(self) -> None:
        """Drop timer entries of objects that are gone."""
        kept = []
        for entry in self._heap:
            kind, key = entry[2], entry[3]
            if (
                (kind == 0 and key in self._regs)
                or (kind == 1 and key in self._intros)
                or (kind == 2 and key in self._verifications)
            ):
                kept.append(entry)
        heapq.heapify(kept)
        self._heap = kept

    def _random_id(self, table: dict[bytes, _Registration] | dict[bytes, _Introduction]) -> bytes:
        for _ in range(_ID_TRIES):
            value = self._rng.randbytes(8)
            if value not in table:
                return value
        raise DtxError("no free identifier")  # 2**64 space: practically unreachable

    def _source_allowed(self, src: Address, now: float) -> bool:
        cfg = self._config
        bucket = self._sources.get(src[0])
        if bucket is None:
            bucket = _Bucket(cfg.control_per_source_burst, now)
            self._sources[src[0]] = bucket
            while len(self._sources) > cfg.max_sources:
                self._sources.popitem(last=False)
        else:
            self._sources.move_to_end(src[0])
        return bucket.take(1, now, cfg.control_per_source_per_s, cfg.control_per_source_burst)

    # -- dispatch -----------------------------------------------------------

    def _receive(self, data: bytes, src: Address, local: Address, now: float) -> None:
        kind = classify(data)
        if kind == PacketKind.STUN:
            reply = answer_stun(data, src=src, local=local, addresses=self._addresses)
            if reply is None:
                self._count("stun_dropped")
                return
            self._count("stun_answers")
            self._out.append((reply.data, reply.send_to, reply.send_from))
            return
        if kind != PacketKind.DTX or local != self._primary:
            self._count("dropped_unknown")
            logger.debug("dropping %d bytes from %s on %s", len(data), src, local)
            return
        if data[0] == RELAY_FIRST_BYTE:
            self._on_relay(data, src, now)
        elif data[0] == _CONTROL:
            self._on_control(data, src, now)
        else:
            self._count("dropped_unknown")

    def _on_control(self, data: bytes, src: Address, now: float) -> None:
        if not self._source_allowed(src, now):
            self._count("dropped_rate_limited")
            logger.debug("rate limiting %s", src)
            return
        try:
            msg = decode_control(data)
        except DecodeError as exc:
            self._count("dropped_undecodable")
            self._warn(src, now, "undecodable control message from %s: %s", src, exc)
            return
        logger.debug("%s from %s (%d bytes)", msg.type.name, src, len(data))
        size = len(data)
        if msg.type == MessageType.HELLO:
            self._on_hello(msg, src, size, now)
        elif msg.type == MessageType.REGISTER:
            self._on_register(msg, src, size, now)
        elif msg.type == MessageType.KEEPALIVE:
            self._on_keepalive(msg, src, size, now)
        elif msg.type == MessageType.INTRODUCE:
            self._on_introduce(msg, src, size, now)
        elif msg.type == MessageType.ACCEPT:
            self._on_accept(msg, src, size, now)
        elif msg.type == MessageType.UNREGISTER:
            self._on_unregister(msg, src, size, now)
        else:
            self._count("dropped_wrong_direction")

    # -- registration -------------------------------------------------------

    def _challenge_mac(self, head: bytes, src: Address) -> bytes:
        data = _CHALLENGE_LABEL + head + _address_bytes(src)
        return hmac.new(self._secret, data, hashlib.sha256).digest()[:12]

    def make_challenge(self, src: Address, now: float) -> bytes:
        """The stateless challenge for ``src`` at ``now``: the time in
        seconds and a random nonce (so two challenges are never equal, even
        within one second), authenticated with the source address."""
        t = int(now) & 0xFFFFFFFF
        head = t.to_bytes(4, "big") + self._rng.getrandbits(32).to_bytes(4, "big")
        return head + self._challenge_mac(head, normalise_address(src))

    def _challenge_valid(self, challenge: bytes, src: Address, now: float) -> bool:
        if len(challenge) != CHALLENGE_BYTES:
            return False
        t = int.from_bytes(challenge[:4], "big")
        age = (int(now) - t) & 0xFFFFFFFF
        if age > self._config.challenge_validity:
            return False
        return hmac.compare_digest(challenge[8:], self._challenge_mac(challenge[:8], src))

    def _on_hello(self, msg: ControlMessage, src: Address, size: int, now: float) -> None:
        if size < 48:
            self._count("dropped_short_hello")
            return
        self._count("challenges")
        reply = ControlMessage(
            MessageType.CHALLENGE, msg.txid, challenge=self.make_challenge(src, now)
        )
        self._reply(reply, src, size, proven=False)

    def _on_register(self, msg: ControlMessage, src: Address, size: int, now: float) -> None:
        proven = src in self._by_addr
        try:
            jid = JID.parse(msg.jid or "")
        except JIDError:
            self._error(msg.txid, ErrorCode.BAD_REQUEST, "bad JID", src, size, now, proven=proven)
            return
        if jid.is_bare:
            self._error(
                msg.txid, ErrorCode.BAD_REQUEST, "full JID needed", src, size, now, proven=proven
            )
            return
        challenge = msg.challenge or b""
        if not self._challenge_valid(challenge, src, now):
            self._error(
                msg.txid,
                ErrorCode.CHALLENGE_INVALID,
                "challenge invalid or expired",
                src,
                size,
                now,
                proven=proven,
            )
            return
        self._purge_used(now)
        if challenge in self._in_flight:
            # A retransmitted REGISTER while its keys are being looked up.
            self._count("duplicate_registers")
            return
        if challenge in self._used:  # checked early, and again after a slow key lookup
            self._refuse_used(msg, src, size, now, proven)
            return
        if not register_signature_valid(msg):
            self._error(
                msg.txid, ErrorCode.FORBIDDEN, "bad signature", src, size, now, proven=proven
            )
            return
        if self._keys is not None:
            try:
                keys = self._keys.keys_for(jid.bare.full)
            except DtxError as exc:
                self._warn(src, now, "key lookup for %s failed: %s", jid.bare, exc)
                keys = None
            self._finish_register(msg, jid, src, size, keys, now)
            return
        if len(self._verifications) >= self._config.max_pending_verifications:
            self._error(msg.txid, ErrorCode.TABLE_FULL, "busy", src, size, now, proven=proven)
            return
        token = self._next_token
        self._next_token += 1
        deadline = now + self._config.verification_timeout
        self._verifications[token] = _Verification(msg, jid, src, size, deadline)
        self._in_flight.add(challenge)
        self._events.append(VerificationNeeded(token, jid.bare.full))
        self._push(deadline, 2, token)

    def _refuse_used(
        self, msg: ControlMessage, src: Address, size: int, now: float, proven: bool
    ) -> None:
        self._error(msg.txid, ErrorCode.CHALLENGE_INVALID, "challenge already used", src, size,
                    now, proven=proven)

    def _finish_register(
        self,
        msg: ControlMessage,
        jid: JID,
        src: Address,
        size: int,
        keys: frozenset[bytes] | None,
        now: float,
    ) -> None:
        cfg = self._config
        proven = src in self._by_addr
        if keys is None or msg.key not in keys:
            self._error(
                msg.txid, ErrorCode.FORBIDDEN, "key not in vCard", src, size, now, proven=proven
            )
            return
        challenge = msg.challenge or b""
        if challenge in self._used:
            self._refuse_used(msg, src, size, now, proven)
            return
        if len(self._used) >= cfg.max_used_challenges:
            self._error(msg.txid, ErrorCode.TABLE_FULL, "busy", src, size, now, proven=True)
            return
        old = self._by_jid.get(jid)
        if old is None:
            self._expire_due(now)
            account = self._by_account.get(jid.bare, set())
            at_src = self._by_addr.get(src)
            freed = 1 if at_src is not None else 0
            if len(self._regs) - freed >= cfg.max_registrations:
                self._error(
                    msg.txid, ErrorCode.TABLE_FULL, "table full", src, size, now, proven=True
                )
                return
            if len(account) >= cfg.max_devices_per_account and not (
                at_src is not None and at_src.jid.bare == jid.bare
            ):
                self._error(
                    msg.txid, ErrorCode.TABLE_FULL, "too many devices", src, size, now, proven=True
                )
                return
        else:
            self._remove_registration(old, "replaced")
        other = self._by_addr.get(src)
        if other is not None:
            self._remove_registration(other, "replaced by another JID on its address")
        hosts = [c for c in msg.candidates if c.kind == CandidateKind.HOST]
        reg = _Registration(
            id=self._random_id(self._regs),
            jid=jid,
            key=msg.key or b"",
            addr=src,
            candidates=tuple(hosts[: MAX_CANDIDATES - 1]),
            refreshed=now,
            expires=now + cfg.lifetime,
            byte_bucket=_Bucket(cfg.relay_burst_bytes, now),
            frame_bucket=_Bucket(cfg.relay_burst_frames, now),
        )
        self._regs[reg.id] = reg
        self._by_jid[jid] = reg
        self._by_account.setdefault(jid.bare, set()).add(reg.id)
        self._by_addr[src] = reg
        self._used[challenge] = now + cfg.challenge_validity + 1.0
        self._push(reg.expires, 0, reg.id)
        self._count("registrations_total")
        logger.info("registered %s from %s", jid, src)
        reply = ControlMessage(
            MessageType.REGISTERED,
            msg.txid,
            registration=reg.id,
            reflexive=src,
            lifetime=int(cfg.lifetime),
            keepalive=int(cfg.keepalive),
        )
        self._reply(reply, src, size, proven=True)

    def _registered(self, reg_id: bytes | None, src: Address, now: float) -> _Registration | None:
        """The live registration ``reg_id`` if it belongs to ``src``."""
        reg = self._regs.get(reg_id or b"")
        if reg is None or reg.addr != src:
            return None
        if reg.expires <= now:
            self._remove_registration(reg, "expired")
            self._count("expired")
            return None
        return reg

    def _registered_or_refuse(
        self, msg: ControlMessage, src: Address, size: int, now: float
    ) -> _Registration | None:
        """The sender's live registration, or None after answering 404."""
        reg = self._registered(msg.registration, src, now)
        if reg is None:
            self._error(msg.txid, ErrorCode.NOT_FOUND, "unknown registration", src, size, now,
                        proven=src in self._by_addr)
        return reg

    def _on_keepalive(self, msg: ControlMessage, src: Address, size: int, now: float) -> None:
        reg = self._registered_or_refuse(msg, src, size, now)
        if reg is None:
            return
        reg.refreshed = now
        reg.expires = now + self._config.lifetime
        self._count("keepalives")
        reply = ControlMessage(
            MessageType.KEEPALIVE_ACK,
            msg.txid,
            reflexive=src,
            lifetime=int(self._config.lifetime),
        )
        self._reply(reply, src, size, proven=True)

    def _on_unregister(self, msg: ControlMessage, src: Address, size: int, now: float) -> None:
        reg = self._registered_or_refuse(msg, src, size, now)
        if reg is None:
            return
        self._remove_registration(reg, "unregistered")
        self._count("unregistrations")
        self._reply(ControlMessage(MessageType.ACK, msg.txid), src, size, proven=True)

    def _remove_registration(self, reg: _Registration, why: str) -> None:
        if self._regs.pop(reg.id, None) is None:
            return
        if self._by_jid.get(reg.jid) is reg:
            del self._by_jid[reg.jid]
        account = self._by_account.get(reg.jid.bare)
        if account is not None:
            account.discard(reg.id)
            if not account:
                del self._by_account[reg.jid.bare]
        if self._by_addr.get(reg.addr) is reg:
            del self._by_addr[reg.addr]
        for intro_id in list(reg.intros):
            intro = self._intros.get(intro_id)
            if intro is not None:
                self._remove_introduction(intro)
        logger.info("registration of %s from %s ended: %s", reg.jid, reg.addr, why)

    def _expire_due(self, now: float) -> None:
        """Drop registrations past their lifetime whose timer has not run yet."""
        self._handle_timer(now)

    def _purge_used(self, now: float) -> None:
        while self._used:
            challenge, expiry = next(iter(self._used.items()))
            if expiry > now:
                break
            del self._used[challenge]

    # -- introductions ------------------------------------------------------

    def _on_introduce(self, msg: ControlMessage, src: Address, size: int, now: float) -> None:
        cfg = self._config
        reg = self._registered_or_refuse(msg, src, size, now)
        if reg is None:
            return
        try:
            target = JID.parse(msg.target or "")
        except JIDError:
            self._error(msg.txid, ErrorCode.BAD_REQUEST, "bad target", src, size, now, proven=True)
            return
        peer = self._find_target(target, reg, now)
        if peer is None:
            self._error(
                msg.txid, ErrorCode.NOT_FOUND, "target not registered", src, size, now, proven=True
            )
            return
        if peer is reg:
            self._error(
                msg.txid, ErrorCode.BAD_REQUEST, "cannot introduce to itself", src, size, now,
                proven=True,
            )
            return
        for intro_id in reg.intros:
            existing = self._intros[intro_id]
            if (
                existing.initiator is reg
                and existing.responder is peer
                and now - existing.created < cfg.intro_timeout
            ):
                self._count("introductions_repeated")
                self._send(self._introduction(existing, _ROLE_INITIATOR, msg.txid), reg.addr)
                return
        if len(self._intros) >= cfg.max_introductions:
            self._error(msg.txid, ErrorCode.TABLE_FULL, "table full", src, size, now, proven=True)
            return
        if (
            len(reg.intros) >= cfg.max_introductions_per_device
            or len(peer.intros) >= cfg.max_introductions_per_device
            or self._pending_per_target.get(peer.id, 0) >= cfg.max_pending_introductions_per_target
        ):
            self._error(
                msg.txid, ErrorCode.RATE_LIMITED, "too many introductions", src, size, now,
                proven=True,
            )
            return
        intro = _Introduction(
            id=self._random_id(self._intros),
            probe_key=self._rng.randbytes(32),
            initiator=reg,
            responder=peer,
            channel_initiator=self._free_channel(reg),
            channel_responder=self._free_channel(peer),
            created=now,
            responder_txid=self._rng.randbytes(8),
        )
        self._intros[intro.id] = intro
        reg.intros.add(intro.id)
        peer.intros.add(intro.id)
        reg.channels[intro.channel_initiator] = intro
        peer.channels[intro.channel_responder] = intro
        self._pending_per_target[peer.id] = self._pending_per_target.get(peer.id, 0) + 1
        self._count("introductions_total")
        logger.info("introducing %s to %s", reg.jid, peer.jid)
        # both in the same batch: both sides start probing at the same moment
        self._send(self._introduction(intro, _ROLE_INITIATOR, msg.txid), reg.addr)
        self._send(self._introduction(intro, _ROLE_RESPONDER, intro.responder_txid), peer.addr)
        self._schedule_intro(intro)

    def _find_target(self, target: JID, asker: _Registration, now: float) -> _Registration | None:
        if not target.is_bare:
            peer = self._by_jid.get(target)
            if peer is not None and peer.expires <= now:
                return None
            return peer
        best: _Registration | None = None
        for reg_id in self._by_account.get(target, ()):
            reg = self._regs[reg_id]
            if reg is asker or reg.expires <= now:
                continue
            if best is None or reg.refreshed > best.refreshed:
                best = reg
        return best

    def _free_channel(self, reg: _Registration) -> int:
        for _ in range(_ID_TRIES):
            channel = self._rng.getrandbits(32)
            if channel not in reg.channels:
                return channel
        raise DtxError("no free channel")  # 256 channels in 2**32: unreachable

    def _introduction(self, intro: _Introduction, role: int, txid: bytes) -> bytes:
        me, peer = (
            (intro.initiator, intro.responder)
            if role == _ROLE_INITIATOR
            else (intro.responder, intro.initiator)
        )
        channel = intro.channel_initiator if role == _ROLE_INITIATOR else intro.channel_responder
        reflexive = Candidate(CandidateKind.SERVER_REFLEXIVE, peer.addr)
        cands = [c for c in peer.candidates if c.addr != peer.addr] + [reflexive]
        return encode_control(
            ControlMessage(
                MessageType.INTRODUCTION,
                txid,
                intro=intro.id,
                role=role,
                peer_jid=peer.jid.full,
                peer_key=peer.key,
                channel=channel,
                probe_key=intro.probe_key,
                candidates=tuple(cands),
            )
        )

    def _on_accept(self, msg: ControlMessage, src: Address, size: int, now: float) -> None:
        reg = self._registered_or_refuse(msg, src, size, now)
        if reg is None:
            return
        intro = self._intros.get(msg.intro or b"")
        if intro is None or intro.responder is not reg:
            self._error(
                msg.txid, ErrorCode.NOT_FOUND, "unknown introduction", src, size, now, proven=True
            )
            return
        if not intro.accepted:
            intro.accepted = True
            self._unpend(intro)
            logger.info("%s accepted %s", reg.jid, intro.initiator.jid)
            while intro.pending:
                _, payload = intro.pending.popleft()
                self._forward(intro, reg, payload)
            intro.pending_bytes = 0
        self._reply(ControlMessage(MessageType.ACK, msg.txid), src, size, proven=True)

    def _unpend(self, intro: _Introduction) -> None:
        peer_id = intro.responder.id
        left = self._pending_per_target.get(peer_id, 0) - 1
        if left > 0:
            self._pending_per_target[peer_id] = left
        else:
            self._pending_per_target.pop(peer_id, None)

    def _remove_introduction(self, intro: _Introduction) -> None:
        if self._intros.pop(intro.id, None) is None:
            return
        if not intro.accepted:
            self._unpend(intro)
        for reg, channel in (
            (intro.initiator, intro.channel_initiator),
            (intro.responder, intro.channel_responder),
        ):
            reg.intros.discard(intro.id)
            if reg.channels.get(channel) is intro:
                del reg.channels[channel]
        if intro.pending:
            self._count("dropped_pending_expired", len(intro.pending))
            intro.pending.clear()

    def _schedule_intro(self, intro: _Introduction) -> None:
        cfg = self._config
        if intro.accepted:
            return
        times = [intro.created + cfg.intro_timeout]
        if intro.retransmits < len(cfg.intro_retransmits):
            times.append(intro.created + cfg.intro_retransmits[intro.retransmits])
        if intro.pending:
            times.append(intro.pending[0][0] + cfg.pending_hold)
        self._push(min(times), 1, intro.id)

    def _service_intro(self, intro: _Introduction, now: float) -> None:
        cfg = self._config
        if intro.accepted:
            return
        if now >= intro.created + cfg.intro_timeout:
            self._count("introductions_timed_out")
            logger.info("%s did not accept %s in time", intro.responder.jid, intro.initiator.jid)
            self._remove_introduction(intro)
            return
        while intro.pending and intro.pending[0][0] + cfg.pending_hold <= now:
            _, payload = intro.pending.popleft()
            intro.pending_bytes -= len(payload)
            self._count("dropped_pending_expired")
        due = False
        while (
            intro.retransmits < len(cfg.intro_retransmits)
            and now >= intro.created + cfg.intro_retransmits[intro.retransmits]
        ):
            intro.retransmits += 1
            due = True
        if due:
            self._count("introductions_retransmitted")
            self._send(
                self._introduction(intro, _ROLE_RESPONDER, intro.responder_txid),
                intro.responder.addr,
            )
        self._schedule_intro(intro)

    # -- relay --------------------------------------------------------------

    def _on_relay(self, data: bytes, src: Address, now: float) -> None:
        cfg = self._config
        if not cfg.relay:
            self._count("dropped_relay_disabled")
            return
        try:
            channel, payload = decode_relay(data)
        except DecodeError:
            self._count("dropped_undecodable")
            return
        reg = self._by_addr.get(src)
        if reg is None or reg.expires <= now:
            self._count("dropped_relay_unregistered")
            self._warn(src, now, "relay frame from unregistered %s", src)
            return
        intro = reg.channels.get(channel)
        if intro is None:
            self._count("dropped_relay_channel")
            self._warn(src, now, "relay frame from %s on a channel not its own", src)
            return
        if not reg.frame_bucket.take(
            1, now, cfg.relay_frames_per_s, cfg.relay_burst_frames
        ) or not reg.byte_bucket.take(
            len(payload), now, cfg.relay_bytes_per_s, cfg.relay_burst_bytes
        ):
            self._count("dropped_relay_rate")
            return
        to = intro.responder if reg is intro.initiator else intro.initiator
        if to is intro.responder and not intro.accepted:
            if (
                len(intro.pending) >= cfg.pending_frames
                or intro.pending_bytes + len(payload) > cfg.pending_bytes
            ):
                self._count("dropped_relay_not_accepted")
                return
            first = not intro.pending
            intro.pending.append((now, payload))
            intro.pending_bytes += len(payload)
            self._count("held_frames")
            if first:
                self._schedule_intro(intro)
            return
        self._forward(intro, to, payload)

    def _forward(self, intro: _Introduction, to: _Registration, payload: bytes) -> None:
        channel = intro.channel_responder if to is intro.responder else intro.channel_initiator
        self._send(encode_relay(channel, payload), to.addr)
        self._count("relayed_frames")
        self._count("relayed_bytes", len(payload))

    # -- timers -------------------------------------------------------------

    def _handle_timer(self, now: float) -> None:
        self._purge_used(now)
        while self._heap and self._heap[0][0] <= now:
            _, _, kind, key = heapq.heappop(self._heap)
            if kind == 0 and isinstance(key, bytes):
                reg = self._regs.get(key)
                if reg is None:
                    continue
                if reg.expires <= now:
                    self._count("expired")
                    self._remove_registration(reg, "expired")
                else:
                    self._push(reg.expires, 0, reg.id)
            elif kind == 1 and isinstance(key, bytes):
                intro = self._intros.get(key)
                if intro is not None:
                    self._service_intro(intro, now)
            elif kind == 2 and isinstance(key, int):
                pending = self._verifications.pop(key, None)
                if pending is not None:
                    self._in_flight.discard(pending.msg.challenge or b"")
                    self._count("verification_timeouts")
                    logger.info("key lookup for %s timed out", pending.jid.bare)
