"""Sans-IO core of the rendezvous server: it composes the registration
table, the introductions and their relay channels, challenges and rate
limits, and answers STUN by way of :class:`rendezvous.stun.BindingResponder`.

Shaped like aioquic's ``QuicConnection``: the driver feeds datagrams with
:meth:`RendezvousCore.receive_datagram`, sends what
:meth:`RendezvousCore.datagrams_to_send` returns, and arms one timer at
:meth:`RendezvousCore.get_timer`, calling
:meth:`RendezvousCore.handle_timer` when it fires. Time (``now``) and
randomness (``rng``, ``secret``) are arguments; nothing here touches a
socket or a clock. The protocol is docs/protocol.md (sections 7, 8); limits,
counters and the amplification table are in docs/rendezvous.md.

The pieces, one concept per module: :mod:`rendezvous.config` (every
tunable), :mod:`rendezvous.limits` (token buckets),
:mod:`rendezvous.challenge` (stateless address-bound challenges, used
ones), :mod:`rendezvous.registrations` (the registration table),
:mod:`rendezvous.introductions` (introductions and relay channels),
:mod:`rendezvous.mapping` (the NAT mapping check),
:mod:`rendezvous.timers` (the one timer heap).

Rules the core keeps whatever arrives:

* ``receive_datagram`` never raises; what does not decode is counted and
  dropped, never answered, and costs no rate-limit budget: rate limits are
  charged only to messages that decode, so junk from a device's IP (or
  its very address) cannot use up what the device may send.
* A message carrying a live registration id, from that registration's
  address, is charged to the registration; anything else (HELLO, REGISTER,
  an unknown registration) to its source address and its source IP
  (:mod:`rendezvous.config`).
* Nothing is stored for a source that has not proved its address (the
  challenge is stateless) and its key (signature and vCard), beyond its
  rate-limit buckets in bounded tables. Every table is bounded, and a full
  table refuses newcomers (503) instead of pushing out devices that are
  already registered.
* A source that has not registered never gets a reply more than 3 times
  the size of the datagram that caused it.
* The mapping port, when there is one, answers nothing but STUN: a
  KEEPALIVE there sets its registration's NAT mapping (looked up by id,
  checked against the registered IP, charged to the registration's
  budget) and is not answered, so it reflects and amplifies nothing.
* The relay forwards only between the two registered ends of an
  introduction, towards a responder only once it has ACCEPTed, within
  per-device token buckets.
* What a remote party can repeat is logged through one
  :class:`dtx.logs.LogLimiter`: per kind, and per registration for
  registered devices (an unproven source address is spoofable, so
  per-address logging would let a spoofer write one line per forged
  address); ``statistics()["log_suppressed"]`` counts what went to DEBUG.

**Key lookups that take time.** With a synchronous key source (a vCard
folder), REGISTER is answered at once. Pass ``keys=None`` instead and the
core, once the challenge and signature check out, queues a
:class:`VerificationNeeded` event (see :meth:`RendezvousCore.next_event`)
and waits for :meth:`RendezvousCore.complete_verification` with the
account's keys: the seam for live vCards fetched over XMPP. Waiting
verifications are bounded in number and time.
"""

from __future__ import annotations

import logging
import random
import traceback
from collections import deque
from dataclasses import dataclass
from enum import IntEnum

from dtx.errors import DecodeError, DtxError, JIDError
from dtx.jid import JID
from dtx.logs import LogLimiter
from dtx.trust.store import KeySource
from dtx.wire.control import (
    HELLO_MIN_BYTES,
    MAX_CANDIDATES,
    CandidateKind,
    ControlMessage,
    MessageType,
    Role,
    decode_control,
    encode_control,
    register_signature_valid,
)
from dtx.wire.demux import CONTROL_FIRST_BYTE, RELAY_FIRST_BYTE, PacketKind, classify
from dtx.wire.relay import RELAY_HEADER_BYTES
from dtx.wire.stun import Address
from rendezvous.challenge import Challenges, UsedChallenges
from rendezvous.config import RendezvousConfig
from rendezvous.introductions import (
    ROLE_INITIATOR,
    ROLE_RESPONDER,
    Introduction,
    IntroductionTable,
    introduction_message,
)
from rendezvous.limits import BucketTable, TokenBucket
from rendezvous.mapping import check_registration, observed_mapping
from rendezvous.registrations import Registration, RegistrationTable, account_of
from dtx.wire.address import normalise_address
from rendezvous.stun import AMPLIFICATION_FACTOR, BindingResponder, ServerAddresses
from rendezvous.timers import TimerHeap, TimerKey, TimerKind

__all__ = [
    "AMPLIFICATION_FACTOR",
    "ErrorCode",
    "RendezvousConfig",
    "RendezvousCore",
    "VerificationNeeded",
]

logger = logging.getLogger(__name__)

_USED_CHALLENGE_MARGIN = 1.0
_RELAY_FIRST = bytes([RELAY_FIRST_BYTE])
_REQUESTS = frozenset(
    {
        MessageType.HELLO,
        MessageType.REGISTER,
        MessageType.KEEPALIVE,
        MessageType.INTRODUCE,
        MessageType.ACCEPT,
        MessageType.UNREGISTER,
    }
)
_CARRY_REGISTRATION = frozenset(
    {MessageType.KEEPALIVE, MessageType.INTRODUCE, MessageType.ACCEPT, MessageType.UNREGISTER}
)


class ErrorCode(IntEnum):
    """ERROR codes of the CONTROL protocol."""

    BAD_REQUEST = 400
    CHALLENGE_INVALID = 401
    FORBIDDEN = 403
    NOT_FOUND = 404
    RATE_LIMITED = 429
    TABLE_FULL = 503


@dataclass(frozen=True)
class VerificationNeeded:
    """The core needs the keys of ``bare_jid`` to finish a registration;
    answer with :meth:`RendezvousCore.complete_verification` (``token``)."""

    token: int
    bare_jid: str


@dataclass
class _Verification:
    msg: ControlMessage
    jid: JID
    src: Address
    size: int
    deadline: float


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
        self._rng = rng
        self._primary = addresses.primary
        self._mapping = addresses.mapping
        self._out: list[tuple[bytes, Address, Address]] = []
        self._events: deque[VerificationNeeded] = deque()
        self._regs = RegistrationTable()
        self._intros = IntroductionTable()
        self._challenges = Challenges(secret, validity=config.challenge_validity)
        self._used = UsedChallenges()
        self._in_flight: set[bytes] = set()
        self._verifications: dict[int, _Verification] = {}
        self._next_token = 1
        self._per_ip = BucketTable(rate=config.control_per_source_per_s,
                                   burst=config.control_per_source_burst,
                                   max_entries=config.max_sources)
        self._per_address = BucketTable(rate=config.control_per_address_per_s,
                                        burst=config.control_per_address_burst,
                                        max_entries=config.max_sources)
        self._log = LogLimiter(logger, max_peers=config.max_sources)
        self._timers = TimerHeap()
        self._counters: dict[str, int] = {}
        self._stun = BindingResponder(addresses)
        # the counters of the hot paths, kept out of the dict (see statistics())
        self._stun_answers = 0
        self._relayed_frames = 0
        self._relayed_bytes = 0

    # -- driver interface ---------------------------------------------------

    def receive_datagram(self, data: bytes, src: Address, local: Address, now: float) -> None:
        """Handle one datagram from ``src`` received on ``local``; never raises."""
        try:
            if len(src) != 2 or ":" in src[0]:  # IPv4 as a socket reports it is as it is
                src = normalise_address(src)
            self._receive(data if type(data) is bytes else bytes(data), src, local, now)
        except Exception:  # a bug must not take the server down; counted, tests check 0
            self._internal_error(f"handling a datagram from {src}")

    def datagrams_to_send(self) -> list[tuple[bytes, Address, Address]]:
        """``(data, send_to, send_from)`` for everything queued; clears the queue."""
        out, self._out = self._out, []
        return out

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` should next be called, or None."""
        timers, used = self._timers.next_deadline(), self._used.next_expiry()
        if timers is None or (used is not None and used < timers):
            return used
        return timers

    def handle_timer(self, now: float) -> None:
        """Expire registrations, retransmit and forget introductions, drop
        held frames and stale challenges whose time has come."""
        try:
            self._handle_timer(now)
        except Exception:
            self._internal_error("in the timer")

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

    def make_challenge(self, src: Address, now: float) -> bytes:
        """The stateless challenge for ``src`` at ``now`` (what a HELLO
        from ``src`` would be answered with)."""
        return self._challenges.make(normalise_address(src), now, self._rng)

    def statistics(self) -> dict[str, int]:
        """Counters (monotonic totals) and gauges (current table sizes)."""
        stats = dict(self._counters)
        for name, value in (("stun_answers", self._stun_answers),
                            ("relayed_frames", self._relayed_frames),
                            ("relayed_bytes", self._relayed_bytes)):
            if value:
                stats[name] = value
        stats["registrations"] = len(self._regs)
        stats["introductions"] = len(self._intros)
        stats["used_challenges"] = len(self._used)
        stats["pending_verifications"] = len(self._verifications)
        stats["pending_frames"] = self._intros.held_frames()
        stats["log_suppressed"] = self._log.suppressed
        return stats

    # -- plumbing -----------------------------------------------------------

    def _count(self, name: str, n: int = 1) -> None:
        self._counters[name] = self._counters.get(name, 0) + n

    def _internal_error(self, where: str) -> None:
        self._count("internal_errors")
        self._log.log(logging.ERROR, "internal error", None, "internal error %s:\n%s",
                      where, traceback.format_exc())

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
        *,
        proven: bool,
    ) -> None:
        self._count(f"refused_{int(code)}")
        if code == ErrorCode.FORBIDDEN:
            # a return-routable address (its challenge checked out) with a
            # key or signature that does not prove the JID
            self._log.warning("refused 403", None, "refused %s: %d %s", to, code, reason)
        elif code == ErrorCode.CHALLENGE_INVALID:
            # what every device gets after a server restart or a slow retry,
            # and free to forge: not a warning
            self._log.info("refused 401", None, "refused %s: %d %s", to, code, reason)
        else:
            logger.debug("refused %s: %d %s", to, code, reason)
        msg = ControlMessage(MessageType.ERROR, txid, error=(int(code), reason))
        if not proven and len(encode_control(msg)) > AMPLIFICATION_FACTOR * size:
            msg = ControlMessage(MessageType.ERROR, txid, error=(int(code), ""))
        self._reply(msg, to, size, proven=proven)

    def _push(self, deadline: float, kind: TimerKind, key: TimerKey) -> None:
        self._timers.push(deadline, kind, key)
        live = len(self._regs) + len(self._intros) + len(self._verifications)
        if len(self._timers) > 4 * live + 1024:
            self._timers.compact(self._timer_alive)

    def _timer_alive(self, kind: TimerKind, key: TimerKey) -> bool:
        if kind == TimerKind.REGISTRATION:
            return key in self._regs
        if kind == TimerKind.INTRODUCTION:
            return key in self._intros
        return key in self._verifications

    def _registration_allowed(self, reg: Registration, src: Address, now: float) -> bool:
        """Charge a message carrying ``reg``'s id to ``reg``'s budget;
        False (counted) when the budget is spent."""
        cfg = self._config
        if reg.control_bucket.take(1, now, cfg.control_per_registration_per_s,
                                   cfg.control_per_registration_burst):
            return True
        self._count("dropped_rate_limited_registered")
        self._log.warning("registration rate limited", reg.full_jid,
                          "%s (%s) is over its control message budget", reg.full_jid, src)
        return False

    def _unproven_allowed(self, src: Address, now: float) -> bool:
        """Charge a message from a source that proved nothing: to its
        address first (one busy socket stops at its own bucket), then to
        its IP."""
        return self._per_address.take(src, now) and self._per_ip.take(src[0], now)

    # -- dispatch -----------------------------------------------------------

    def _receive(self, data: bytes, src: Address, local: Address, now: float) -> None:
        if data[:1] == _RELAY_FIRST and local == self._primary:  # the relay's hot path first
            self._on_relay(data, src, now)
            return
        kind = classify(data)
        if kind == PacketKind.STUN:
            reply = self._stun.answer(data, src, local)
            if reply is None:
                self._count("stun_dropped")
                return
            self._stun_answers += 1
            self._out.append((reply.data, reply.send_to, reply.send_from))
            return
        if local == self._mapping:
            self._on_mapping_check(data, src, now)
            return
        if kind != PacketKind.DTX or local != self._primary:
            self._count("dropped_unknown")
            logger.debug("dropping %d bytes from %s on %s", len(data), src, local)
            return
        if data[0] == RELAY_FIRST_BYTE:
            self._on_relay(data, src, now)
        elif data[0] == CONTROL_FIRST_BYTE:
            self._on_control(data, src, now)
        else:
            self._count("dropped_unknown")

    def _on_control(self, data: bytes, src: Address, now: float) -> None:
        size = len(data)
        try:
            msg = decode_control(data)
        except DecodeError as exc:
            self._count("dropped_undecodable")
            self._log.warning("undecodable control", None,
                              "undecodable control message from %s: %s", src, exc)
            return
        if msg.type not in _REQUESTS:
            self._count("dropped_wrong_direction")
            return
        if msg.type == MessageType.HELLO and size < HELLO_MIN_BYTES:
            self._count("dropped_short_hello")
            return
        reg = None
        if msg.type in _CARRY_REGISTRATION:
            reg = self._registered(msg.registration, src, now)
        if reg is not None:
            if not self._registration_allowed(reg, src, now):
                return
        elif not self._unproven_allowed(src, now):
            self._count("dropped_rate_limited")
            logger.debug("rate limiting %s", src)
            return
        logger.debug("%s from %s (%d bytes)", msg.type.name, src, size)
        if msg.type == MessageType.HELLO:
            self._on_hello(msg, src, size, now)
        elif msg.type == MessageType.REGISTER:
            self._on_register(msg, src, size, now)
        elif reg is None:
            self._error(msg.txid, ErrorCode.NOT_FOUND, "unknown registration", src, size,
                        proven=self._regs.at(src) is not None)
        elif msg.type == MessageType.KEEPALIVE:
            self._on_keepalive(msg, reg, now)
        elif msg.type == MessageType.INTRODUCE:
            self._on_introduce(msg, reg, now)
        elif msg.type == MessageType.ACCEPT:
            self._on_accept(msg, reg)
        else:
            self._on_unregister(msg, reg)

    def _answer(self, msg: ControlMessage, reg: Registration) -> None:
        """A reply to a registered device (at the address it proved)."""
        self._send(encode_control(msg), reg.addr)

    def _refuse(self, msg: ControlMessage, reg: Registration, code: ErrorCode,
                reason: str) -> None:
        """An ERROR to a registered device."""
        self._error(msg.txid, code, reason, reg.addr, 0, proven=True)

    # -- registration -------------------------------------------------------

    def _on_hello(self, msg: ControlMessage, src: Address, size: int, now: float) -> None:
        self._count("challenges")
        reply = ControlMessage(
            MessageType.CHALLENGE, msg.txid, challenge=self._challenges.make(src, now, self._rng)
        )
        self._reply(reply, src, size, proven=False)

    def _on_register(self, msg: ControlMessage, src: Address, size: int, now: float) -> None:
        proven = self._regs.at(src) is not None
        try:
            jid = JID.parse(msg.jid or "")
        except JIDError:
            self._error(msg.txid, ErrorCode.BAD_REQUEST, "bad JID", src, size, proven=proven)
            return
        if jid.is_bare:
            self._error(msg.txid, ErrorCode.BAD_REQUEST, "full JID needed", src, size,
                        proven=proven)
            return
        challenge = msg.challenge or b""
        if not self._challenges.valid(challenge, src, now):
            self._error(msg.txid, ErrorCode.CHALLENGE_INVALID, "challenge invalid or expired",
                        src, size, proven=proven)
            return
        self._used.purge(now)
        if challenge in self._in_flight:
            # A retransmitted REGISTER while its keys are being looked up.
            self._count("duplicate_registers")
            return
        if challenge in self._used:  # checked early, and again after a slow key lookup
            self._refuse_used(msg, src, size, proven)
            return
        if not register_signature_valid(msg):
            self._error(msg.txid, ErrorCode.FORBIDDEN, "bad signature", src, size, proven=proven)
            return
        if self._keys is not None:
            try:
                keys = self._keys.keys_for(jid.bare.full)
            except DtxError as exc:
                self._log.warning("key lookup failed", jid.bare,
                                  "key lookup for %s failed: %s", jid.bare, exc)
                keys = None
            self._finish_register(msg, jid, src, size, keys, now)
            return
        if len(self._verifications) >= self._config.max_pending_verifications:
            self._error(msg.txid, ErrorCode.TABLE_FULL, "busy", src, size, proven=proven)
            return
        token = self._next_token
        self._next_token += 1
        deadline = now + self._config.verification_timeout
        self._verifications[token] = _Verification(msg, jid, src, size, deadline)
        self._in_flight.add(challenge)
        self._events.append(VerificationNeeded(token, jid.bare.full))
        self._push(deadline, TimerKind.VERIFICATION, token)

    def _refuse_used(self, msg: ControlMessage, src: Address, size: int, proven: bool) -> None:
        self._error(msg.txid, ErrorCode.CHALLENGE_INVALID, "challenge already used", src, size,
                    proven=proven)

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
        proven = self._regs.at(src) is not None
        if keys is None or msg.key not in keys:
            self._error(msg.txid, ErrorCode.FORBIDDEN, "key not in vCard", src, size,
                        proven=proven)
            return
        challenge = msg.challenge or b""
        if challenge in self._used:
            self._refuse_used(msg, src, size, proven)
            return
        if len(self._used) >= cfg.max_used_challenges:
            self._error(msg.txid, ErrorCode.TABLE_FULL, "busy", src, size, proven=True)
            return
        old = self._regs.for_jid(jid)
        if old is None:
            self._expire_due(now)
            at_src = self._regs.at(src)
            freed = 1 if at_src is not None else 0
            if len(self._regs) - freed >= cfg.max_registrations:
                self._error(msg.txid, ErrorCode.TABLE_FULL, "table full", src, size, proven=True)
                return
            if self._regs.account_size(jid.bare) >= cfg.max_devices_per_account and not (
                at_src is not None and at_src.account == account_of(jid)
            ):
                self._count("refused_too_many_devices")
                self._error(msg.txid, ErrorCode.TABLE_FULL, "too many devices", src, size,
                            proven=True)
                return
        else:
            # the same device (full JID) registering again: it keeps its slot
            self._remove_registration(old, "replaced")
        other = self._regs.at(src)
        if other is not None:
            self._remove_registration(other, "replaced by another JID on its address")
        hosts = [c for c in msg.candidates if c.kind == CandidateKind.HOST]
        # A port-mapped candidate is the device's router's public address,
        # so it has the source's IP: another IP would make peers probe a
        # third party (reflection), and is left out.
        mapped = [c for c in msg.candidates if c.kind == CandidateKind.MAPPED]
        kept = [c for c in mapped if c.addr[0] == src[0]][:1]
        if len(kept) < len(mapped):
            self._count("mapped_candidates_refused")
        kept += hosts
        reg = Registration(
            id=self._regs.new_id(self._rng),
            account=account_of(jid),
            resource=jid.resource or "",
            key=msg.key or b"",
            addr=src,
            candidates=tuple(kept[: MAX_CANDIDATES - 1]),
            refreshed=now,
            expires=now + cfg.lifetime,
            byte_bucket=TokenBucket(cfg.relay_burst_bytes, now),
            frame_bucket=TokenBucket(cfg.relay_burst_frames, now),
            control_bucket=TokenBucket(cfg.control_per_registration_burst, now),
        )
        self._regs.add(reg)
        self._used.add(challenge, now + cfg.challenge_validity + _USED_CHALLENGE_MARGIN)
        self._push(reg.expires, TimerKind.REGISTRATION, reg.id)
        self._count("registrations_total")
        logger.info("registered %s from %s", jid, src)
        # A TARGET in the REGISTER asks for the introduction at once
        # (docs/protocol.md 7.6): REGISTERED names it when the INTRODUCTIONs
        # follow in the same batch, behind it; a refusal is left to the
        # device's own INTRODUCE, which gets the error. A server with a
        # mapping port waits for that INTRODUCE: only then does it know the
        # device's NAT mapping (7.7), which a birthday search needs.
        at = len(self._out)
        target = msg.target if self._mapping is None else None
        if target is not None and self._introduce(reg, target, msg.txid, now) is not None:
            target = None
        self._out.insert(at, (encode_control(ControlMessage(
            MessageType.REGISTERED,
            msg.txid,
            registration=reg.id,
            reflexive=src,
            lifetime=int(cfg.lifetime),
            keepalive=int(cfg.keepalive),
            mapping_port=self._addresses.mapping_port,
            target=target,
        )), reg.addr, self._primary))

    def _registered(self, reg_id: bytes | None, src: Address, now: float) -> Registration | None:
        """The live registration ``reg_id`` if it belongs to ``src``."""
        reg = self._regs.get(reg_id or b"")
        if reg is None or reg.addr != src:
            return None
        if reg.expires <= now:
            self._remove_registration(reg, "expired")
            self._count("expired")
            return None
        return reg

    def _on_keepalive(self, msg: ControlMessage, reg: Registration, now: float) -> None:
        reg.refreshed = now
        reg.expires = now + self._config.lifetime
        self._count("keepalives")
        self._answer(
            ControlMessage(
                MessageType.KEEPALIVE_ACK,
                msg.txid,
                reflexive=reg.addr,
                lifetime=int(self._config.lifetime),
            ),
            reg,
        )

    def _on_mapping_check(self, data: bytes, src: Address, now: float) -> None:
        """A datagram on the mapping port (docs/protocol.md 7.7), never
        answered: a KEEPALIVE from the registered IP sets the mapping."""
        reg_id = check_registration(data)
        if reg_id is None:
            self._count("dropped_mapping_port")
            logger.debug("dropping %d bytes from %s on the mapping port", len(data), src)
            return
        reg = self._regs.get(reg_id)
        if reg is None or reg.expires <= now:
            self._count("mapping_checks_unknown")
            return
        mapping = observed_mapping(reg.addr, src)
        if mapping is None:
            # another IP tells nothing about the device's NAT, and must not
            # spend the device's budget
            self._count("mapping_checks_other_ip")
            logger.debug("mapping check for %s from another IP, %s", reg.full_jid, src)
            return
        if not self._registration_allowed(reg, src, now):
            return
        self._count("mapping_checks")
        if mapping != reg.nat_mapping:
            self._log.info("nat mapping", reg.full_jid,
                           "NAT mapping of %s: %s (%s, registered %s)",
                           reg.full_jid, mapping.name.lower(), src, reg.addr)
            reg.nat_mapping = mapping

    def _on_unregister(self, msg: ControlMessage, reg: Registration) -> None:
        self._remove_registration(reg, "unregistered")
        self._count("unregistrations")
        self._answer(ControlMessage(MessageType.ACK, msg.txid), reg)

    def _remove_registration(self, reg: Registration, why: str) -> None:
        if not self._regs.discard(reg):
            return
        for intro in list(reg.channels.values()):
            self._remove_introduction(intro)
        logger.info("registration of %s from %s ended: %s", reg.full_jid, reg.addr, why)

    def _expire_due(self, now: float) -> None:
        """Drop registrations past their lifetime whose timer has not run yet."""
        self._handle_timer(now)

    # -- introductions ------------------------------------------------------

    def _on_introduce(self, msg: ControlMessage, reg: Registration, now: float) -> None:
        refused = self._introduce(reg, msg.target or "", msg.txid, now)
        if refused is not None:
            self._refuse(msg, reg, *refused)

    def _introduce(self, reg: Registration, target_jid: str, txid: bytes,
                   now: float) -> tuple[ErrorCode, str] | None:
        """Introduce ``reg`` to ``target_jid`` (docs/protocol.md 7.6): the
        INTRODUCTIONs go out, ``reg``'s with ``txid``; or the refusal
        (code, reason), with nothing sent."""
        cfg = self._config
        try:
            target = JID.parse(target_jid)
        except JIDError:
            return ErrorCode.BAD_REQUEST, "bad target"
        peer = self._regs.find_target(target, reg, now)
        if peer is None:
            return ErrorCode.NOT_FOUND, "target not registered"
        if peer is reg:
            return ErrorCode.BAD_REQUEST, "cannot introduce to itself"
        existing = self._intros.recent(reg, peer, now, cfg.intro_timeout)
        if existing is not None:
            self._count("introductions_repeated")
            self._send(self._introduction(existing, ROLE_INITIATOR, txid), reg.addr)
            return None
        if len(self._intros) >= cfg.max_introductions:
            return ErrorCode.TABLE_FULL, "table full"
        if (
            len(reg.channels) >= cfg.max_introductions_per_device
            or len(peer.channels) >= cfg.max_introductions_per_device
            or self._intros.pending_for(peer) >= cfg.max_pending_introductions_per_target
        ):
            return ErrorCode.RATE_LIMITED, "too many introductions"
        intro = self._intros.create(reg, peer, now, self._rng)
        self._count("introductions_total")
        logger.info("introducing %s to %s", reg.full_jid, peer.full_jid)
        # both in the same batch: both sides start probing at the same moment
        self._send(self._introduction(intro, ROLE_INITIATOR, txid), reg.addr)
        self._send(self._introduction(intro, ROLE_RESPONDER, intro.responder_txid), peer.addr)
        self._schedule_intro(intro)
        return None

    def _introduction(self, intro: Introduction, role: Role, txid: bytes) -> bytes:
        """One side's INTRODUCTION, with NAT_MAPPING when there is a
        mapping port."""
        return introduction_message(intro, role, txid, nat_mapping=self._mapping is not None)

    def _on_accept(self, msg: ControlMessage, reg: Registration) -> None:
        intro = self._intros.get(msg.intro or b"")
        if intro is None or intro.responder is not reg:
            self._refuse(msg, reg, ErrorCode.NOT_FOUND, "unknown introduction")
            return
        if not intro.accepted:
            self._intros.accept(intro)
            logger.info("%s accepted %s", reg.full_jid, intro.initiator.full_jid)
            for payload in intro.take_held():
                self._forward(intro, reg, payload)
        self._answer(ControlMessage(MessageType.ACK, msg.txid), reg)

    def _remove_introduction(self, intro: Introduction) -> None:
        dropped = self._intros.remove(intro)
        if dropped:
            self._count("dropped_pending_expired", dropped)

    def _schedule_intro(self, intro: Introduction) -> None:
        cfg = self._config
        if intro.accepted:
            return
        times = [intro.created + cfg.intro_timeout]
        if intro.retransmits < len(cfg.intro_retransmits):
            times.append(intro.created + cfg.intro_retransmits[intro.retransmits])
        if intro.pending:
            times.append(intro.pending[0][0] + cfg.pending_hold)
        self._push(min(times), TimerKind.INTRODUCTION, intro.id)

    def _service_intro(self, intro: Introduction, now: float) -> None:
        cfg = self._config
        if intro.accepted:
            return
        if now >= intro.created + cfg.intro_timeout:
            self._count("introductions_timed_out")
            logger.info("%s did not accept %s in time", intro.responder.full_jid,
                        intro.initiator.full_jid)
            self._remove_introduction(intro)
            return
        expired = intro.expire_held(now, cfg.pending_hold)
        if expired:
            self._count("dropped_pending_expired", expired)
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
                self._introduction(intro, ROLE_RESPONDER, intro.responder_txid),
                intro.responder.addr,
            )
        self._schedule_intro(intro)

    # -- relay --------------------------------------------------------------

    def _on_relay(self, data: bytes, src: Address, now: float) -> None:
        cfg = self._config
        if not cfg.relay:
            self._count("dropped_relay_disabled")
            return
        if len(data) < RELAY_HEADER_BYTES:
            self._count("dropped_undecodable")
            return
        channel = int.from_bytes(data[1:RELAY_HEADER_BYTES], "big")
        reg = self._regs.at(src)
        if reg is None or reg.expires <= now:
            self._count("dropped_relay_unregistered")
            # spoofable, and what devices send for a moment after a restart
            self._log.info("relay unregistered", None, "relay frame from unregistered %s", src)
            return
        intro = reg.channels.get(channel)
        if intro is None:
            self._count("dropped_relay_channel")
            self._log.warning("relay channel", reg.full_jid,
                              "relay frame from %s (%s) on a channel not its own",
                              reg.full_jid, src)
            return
        if not reg.relay_allowed(len(data) - RELAY_HEADER_BYTES, now, cfg):
            self._count("dropped_relay_rate")
            return
        if intro.accepted:
            self._forward(intro, intro.other(reg), data[RELAY_HEADER_BYTES:])
            return
        to = intro.other(reg)
        if to is intro.responder:
            payload = data[RELAY_HEADER_BYTES:]
            first = not intro.pending
            if not intro.hold(payload, now, max_frames=cfg.pending_frames,
                              max_bytes=cfg.pending_bytes):
                self._count("dropped_relay_not_accepted")
                return
            self._count("held_frames")
            if first:
                self._schedule_intro(intro)
            return
        self._forward(intro, to, data[RELAY_HEADER_BYTES:])

    def _forward(self, intro: Introduction, to: Registration, payload: bytes) -> None:
        self._out.append((intro.header_of(to) + payload, to.addr, self._primary))
        self._relayed_frames += 1
        self._relayed_bytes += len(payload)

    # -- timers -------------------------------------------------------------

    def _handle_timer(self, now: float) -> None:
        self._used.purge(now)
        self._per_address.forget_full(now)
        self._per_ip.forget_full(now)
        # entries pushed while servicing are later than now: one pass suffices
        for _ in range(len(self._timers)):
            due = self._timers.pop_due(now)
            if due is None:
                break
            kind, key = due
            if kind == TimerKind.REGISTRATION and isinstance(key, bytes):
                reg = self._regs.get(key)
                if reg is None:
                    continue
                if reg.expires <= now:
                    self._count("expired")
                    self._remove_registration(reg, "expired")
                else:
                    self._push(reg.expires, TimerKind.REGISTRATION, reg.id)
            elif kind == TimerKind.INTRODUCTION and isinstance(key, bytes):
                intro = self._intros.get(key)
                if intro is not None:
                    self._service_intro(intro, now)
            elif kind == TimerKind.VERIFICATION and isinstance(key, int):
                pending = self._verifications.pop(key, None)
                if pending is not None:
                    self._in_flight.discard(pending.msg.challenge or b"")
                    self._count("verification_timeouts")
                    logger.info("key lookup for %s timed out", pending.jid.bare)
