"""The device's side of the rendezvous protocol, sans-IO.

Registers (HELLO → CHALLENGE → signed REGISTER → REGISTERED), keeps the
registration alive with KEEPALIVEs inside the NAT timeout, registers again by
itself when the server forgets it (a restart, an address change), asks for
introductions and accepts them. See ``docs/protocol.md`` section 7.

In: :meth:`receive` (decoded CONTROL messages from the server),
:meth:`handle_timer`, user calls (:meth:`introduce`, :meth:`accept`).
Out: :meth:`datagrams_to_send`, :meth:`get_timer`, :meth:`next_event`.
"""

from __future__ import annotations

import logging
import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum

from ..wire.control import (
    MAX_CANDIDATES,
    Candidate,
    CandidateKind,
    ControlMessage,
    MessageType,
    Role,
    encode_control,
    encode_hello,
    encode_register,
)
from ..errors import LocalProtocolError
from ..wire.address import Address

logger = logging.getLogger(__name__)

MAX_WAITING_TARGETS = 64
"""Targets that may wait for the registration at once."""


class RegistrationState(Enum):
    IDLE = "idle"
    HELLO_SENT = "hello-sent"
    REGISTER_SENT = "register-sent"
    REGISTERED = "registered"


@dataclass(frozen=True, kw_only=True)
class RendezvousClientConfig:
    """Times in seconds."""

    retransmit: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)
    """Retransmission intervals of requests; after the last, the request
    fails (introductions) or registration restarts (with a pause)."""
    keepalive: float | None = None
    """Override the server's keepalive interval (never above it)."""
    keepalive_losses: int = 3
    """Unanswered keepalives before the registration is considered lost."""
    reregister_pause: float = 2.0


# -- events -------------------------------------------------------------------


@dataclass(frozen=True)
class Registered:
    reflexive: Address
    again: bool
    """True when this replaces a registration that was lost."""


@dataclass(frozen=True)
class RegistrationLost:
    reason: str


@dataclass(frozen=True)
class ReflexiveChanged:
    old: Address
    new: Address


@dataclass(frozen=True)
class IntroductionReceived:
    message: ControlMessage


@dataclass(frozen=True)
class IntroductionFailed:
    target: str
    code: int
    reason: str


@dataclass(frozen=True)
class RegistrationRefused:
    code: int
    reason: str


RendezvousEvent = (
    Registered
    | RegistrationLost
    | ReflexiveChanged
    | IntroductionReceived
    | IntroductionFailed
    | RegistrationRefused
)


@dataclass
class _Request:
    kind: MessageType
    txid: bytes
    data: bytes
    next_at: float
    attempt: int = 0
    target: str | None = None
    retransmitted: bool = False


@dataclass
class RendezvousClient:
    """One device's registration with one rendezvous server."""

    jid: str
    key: bytes
    sign: Callable[[bytes], bytes]
    server: Address
    rng: random.Random
    config: RendezvousClientConfig = field(default_factory=RendezvousClientConfig)
    host_candidates: Sequence[Address] = ()
    port_mapped: Address | None = None
    """A port mapping on this device's router (its public address): a
    candidate of kind MAPPED in the registration; :meth:`set_port_mapped`."""
    state: RegistrationState = RegistrationState.IDLE
    registration: bytes | None = None
    reflexive: Address | None = None
    keepalive_interval: float = 25.0
    mapping_port: int | None = None
    """The server's mapping port (MAPPING_PORT in REGISTERED): a KEEPALIVE
    sent there tells the server whether this device's NAT maps per
    destination (docs/protocol.md 7.7). None: the server has none."""
    _mapping_out: list[bytes] = field(default_factory=list)
    _requests: dict[bytes, _Request] = field(default_factory=dict)
    _out: list[bytes] = field(default_factory=list)
    _events: deque[RendezvousEvent] = field(default_factory=deque)
    _next_keepalive: float | None = None
    _keepalive_misses: int = 0
    _restart_at: float | None = None
    _was_registered: bool = False
    _waiting: list[str] = field(default_factory=list)
    """Targets asked for before the registration was accepted: the first
    rides in the REGISTER (TARGET), the rest are asked for once
    registered."""
    _register_target: str | None = None

    # -- user calls ---------------------------------------------------------------

    def start(self, now: float) -> None:
        """Begin (or restart) registration."""
        self._drop_requests(MessageType.HELLO, MessageType.REGISTER, MessageType.KEEPALIVE)
        self.state = RegistrationState.HELLO_SENT
        self._next_keepalive = None
        self._restart_at = None
        self._request(MessageType.HELLO, encode_hello, now)

    def introduce(self, target: str, now: float) -> None:
        """Ask the server to introduce this device and ``target``. Before
        the registration is accepted the target waits for it (the first
        one goes in the REGISTER itself, saving a round trip); a
        registration refused for good fails the waiting ones."""
        if self.registration is None:
            if target not in self._waiting:
                if len(self._waiting) >= MAX_WAITING_TARGETS:
                    self._events.append(IntroductionFailed(target, 429, "too many waiting"))
                    return
                self._waiting.append(target)
            return
        registration = self.registration
        self._request(MessageType.INTRODUCE,
                      lambda txid: _introduce_message(txid, registration, target), now,
                      target=target)

    def accept(self, intro: bytes, now: float) -> None:
        if self.registration is None:
            return
        registration = self.registration
        self._request(
            MessageType.ACCEPT,
            lambda txid: encode_control(
                ControlMessage(MessageType.ACCEPT, txid, registration=registration, intro=intro)
            ),
            now,
        )

    def set_port_mapped(self, port_mapped: Address | None, now: float) -> None:
        """The router's port mapping changed (made, moved, lost): register
        again with it, so that introductions from now on carry it."""
        if port_mapped == self.port_mapped:
            return
        self.port_mapped = port_mapped
        # Before the REGISTER is written (HELLO sent) it takes the new one.
        if self.state in (RegistrationState.REGISTER_SENT, RegistrationState.REGISTERED):
            self.start(now)

    def _candidates(self) -> list[Candidate]:
        out = [] if self.port_mapped is None \
            else [Candidate(CandidateKind.MAPPED, self.port_mapped)]
        hosts = list(self.host_candidates)[: MAX_CANDIDATES - len(out)]
        return out + [Candidate(CandidateKind.HOST, a) for a in hosts]

    def unregister(self) -> bytes | None:
        """A final UNREGISTER to send (best effort) before shutting down."""
        if self.registration is None:
            return None
        txid = self.rng.getrandbits(64).to_bytes(8, "big")
        return encode_control(
            ControlMessage(MessageType.UNREGISTER, txid, registration=self.registration)
        )

    def check_now(self, now: float) -> None:
        """Send a KEEPALIVE at once (something looks wrong on the path):
        the answer tells whether the registration and the public address
        still hold."""
        if self.state is not RegistrationState.REGISTERED:
            return
        if any(r.kind is MessageType.KEEPALIVE for r in self._requests.values()):
            return
        self._send_keepalive(now, retransmit=True)

    def _mapping_check(self) -> None:
        """A KEEPALIVE to the mapping port: never answered, and it goes
        before anything else queued now (an INTRODUCE that follows finds
        the check done at the server)."""
        if self.mapping_port is None or self.registration is None:
            return
        txid = self.rng.getrandbits(64).to_bytes(8, "big")
        self._mapping_out.append(encode_control(
            ControlMessage(MessageType.KEEPALIVE, txid, registration=self.registration)))

    def _send_keepalive(self, now: float, *, retransmit: bool) -> None:
        registration = self.registration
        self._request(
            MessageType.KEEPALIVE,
            lambda txid: encode_control(
                ControlMessage(MessageType.KEEPALIVE, txid, registration=registration)
            ),
            now,
            retransmit=retransmit,
        )

    @property
    def registered(self) -> bool:
        return self.state is RegistrationState.REGISTERED

    # -- in -------------------------------------------------------------------------

    def receive(self, msg: ControlMessage, now: float) -> None:
        req = self._requests.get(msg.txid)
        if msg.type is MessageType.INTRODUCTION and msg.role is Role.RESPONDER:
            # Unsolicited: another device asked for us.
            self._events.append(IntroductionReceived(msg))
            return
        if req is None:
            logger.debug("rendezvous: unmatched %s", msg.type.name)
            return
        del self._requests[msg.txid]
        if msg.type is MessageType.ERROR:
            self._on_error(req, msg, now)
        elif msg.type is MessageType.CHALLENGE and req.kind is MessageType.HELLO:
            challenge = msg.challenge
            if challenge is None:  # decode_control requires it; never trust that here
                logger.debug("rendezvous: CHALLENGE without a challenge")
                return
            self.state = RegistrationState.REGISTER_SENT
            self._request(MessageType.REGISTER,
                          lambda txid: self._register(txid, challenge), now)
        elif msg.type is MessageType.REGISTERED and req.kind is MessageType.REGISTER:
            if msg.reflexive is None or msg.registration is None:
                logger.debug("rendezvous: REGISTERED without an address or registration")
                return
            again = self._was_registered
            self.registration = msg.registration
            self.state = RegistrationState.REGISTERED
            old = self.reflexive
            self.reflexive = msg.reflexive
            server_keepalive = float(msg.keepalive or 25)
            self.keepalive_interval = min(
                server_keepalive, self.config.keepalive or server_keepalive
            )
            self._keepalive_misses = 0
            self._next_keepalive = now + self.keepalive_interval
            self._was_registered = True
            self.mapping_port = msg.mapping_port
            self._mapping_check()
            logger.info("registered with %s:%d as %s, seen at %s:%d",
                        *self.server, self.jid, *msg.reflexive)
            self._events.append(Registered(msg.reflexive, again))
            if old is not None and old != msg.reflexive:
                self._events.append(ReflexiveChanged(old, msg.reflexive))
            self._introduce_waiting(msg, req, now)
        elif msg.type is MessageType.KEEPALIVE_ACK and req.kind is MessageType.KEEPALIVE:
            self._keepalive_misses = 0
            if msg.reflexive is not None and msg.reflexive != self.reflexive:
                old = self.reflexive
                self.reflexive = msg.reflexive
                if old is not None:
                    logger.info("public address changed: %s:%d -> %s:%d", *old, *msg.reflexive)
                    self._events.append(ReflexiveChanged(old, msg.reflexive))
        elif msg.type is MessageType.INTRODUCTION and req.kind is MessageType.INTRODUCE:
            self._events.append(IntroductionReceived(msg))
        elif msg.type is MessageType.ACK:
            pass
        else:
            logger.debug("rendezvous: unexpected %s for %s", msg.type.name, req.kind.name)

    def _register(self, txid: bytes, challenge: bytes) -> bytes:
        """The signed REGISTER, with the first waiting target when it fits
        (a JID near the limit may not leave room for a second one)."""
        target = self._waiting[0] if self._waiting else None

        def build(target: str | None) -> bytes:
            return encode_register(txid=txid, jid=self.jid, key=self.key, challenge=challenge,
                                   candidates=self._candidates(), sign=self.sign, target=target)
        try:
            data = build(target)
        except LocalProtocolError:
            if target is None:
                raise
            target = None
            data = build(None)
        self._register_target = target
        return data

    def _introduce_waiting(self, msg: ControlMessage, req: _Request, now: float) -> None:
        """Registered: the waiting targets are asked for. The REGISTER's own
        target is not when REGISTERED names it (its INTRODUCTION follows
        with the REGISTER's transaction id; if that is lost, the INTRODUCE
        goes out under the same id on the usual retransmission timer)."""
        waiting, self._waiting = self._waiting, []
        sent, self._register_target = self._register_target, None
        for target in waiting:
            if target == sent and msg.target == sent and msg.registration is not None:
                data = _introduce_message(req.txid, msg.registration, target)
                self._requests[req.txid] = _Request(
                    MessageType.INTRODUCE, req.txid, data, now + self.config.retransmit[0],
                    1, target)
            else:
                self.introduce(target, now)

    def _fail_waiting(self, code: int, reason: str) -> None:
        waiting, self._waiting = self._waiting, []
        for target in waiting:
            self._events.append(IntroductionFailed(target, code, reason))

    def _on_error(self, req: _Request, msg: ControlMessage, now: float) -> None:
        code, reason = msg.error or (400, "")
        if req.kind is MessageType.INTRODUCE:
            self._events.append(IntroductionFailed(req.target or "", code, reason))
            if code == 404 and reason.startswith("unknown registration"):
                self._lost(f"server forgot us ({reason})", now)
        elif req.kind is MessageType.KEEPALIVE or (
            req.kind is MessageType.ACCEPT and code == 404
            and reason.startswith("unknown registration")
        ):
            self._lost(f"server refused {req.kind.name}: {code} {reason}", now)
        elif req.kind is MessageType.ACCEPT:
            logger.info("introduction no longer accepted: %d %s", code, reason)
        elif req.kind in (MessageType.HELLO, MessageType.REGISTER):
            logger.warning("registration refused: %d %s", code, reason)
            self._events.append(RegistrationRefused(code, reason))
            self.state = RegistrationState.IDLE
            # 401: the challenge expired, or was used by a REGISTER whose
            # answer got lost: start again at once with a fresh one.
            if code == 401:
                self._restart_at = now
            else:
                self._fail_waiting(code, reason)
                self._restart_at = now + (
                    self.config.reregister_pause if code in (429, 503) else 30.0
                )

    # -- timers -------------------------------------------------------------------

    def get_timer(self) -> float | None:
        times = [r.next_at for r in self._requests.values()]
        if self._next_keepalive is not None:
            times.append(self._next_keepalive)
        if self._restart_at is not None:
            times.append(self._restart_at)
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        if self._restart_at is not None and now >= self._restart_at:
            self.start(now)
        if self._next_keepalive is not None and now >= self._next_keepalive:
            if any(r.kind is MessageType.KEEPALIVE for r in self._requests.values()):
                self._keepalive_misses += 1
            if self._keepalive_misses >= self.config.keepalive_losses:
                self._lost("keepalives unanswered", now)
            else:
                self._drop_requests(MessageType.KEEPALIVE)
                self._send_keepalive(now, retransmit=False)
                self._mapping_check()
                self._next_keepalive = now + self.keepalive_interval
        for txid, req in list(self._requests.items()):
            if now < req.next_at:
                continue
            schedule = self.config.retransmit
            if req.attempt >= len(schedule):
                del self._requests[txid]
                if req.kind is MessageType.INTRODUCE:
                    self._events.append(IntroductionFailed(req.target or "", 408, "no answer"))
                elif req.kind in (MessageType.HELLO, MessageType.REGISTER):
                    self.state = RegistrationState.IDLE
                    self._restart_at = now + self.config.reregister_pause
                    self._fail_waiting(408, "no answer from the rendezvous")
                elif req.kind is MessageType.KEEPALIVE and req.retransmitted:
                    self._lost("no answer to keepalive", now)
                continue
            self._out.append(req.data)
            req.next_at = now + schedule[req.attempt]
            req.attempt += 1

    def _lost(self, reason: str, now: float) -> None:
        if self.state is RegistrationState.REGISTERED:
            logger.info("registration lost: %s; registering again", reason)
            self._events.append(RegistrationLost(reason))
        self.registration = None
        self.start(now)

    # -- out ----------------------------------------------------------------------

    def datagrams_to_send(self) -> list[tuple[bytes, Address]]:
        out = []
        if self._mapping_out and self.mapping_port is not None:
            check = (self.server[0], self.mapping_port)
            out = [(d, check) for d in self._mapping_out]
        self._mapping_out.clear()
        out.extend((d, self.server) for d in self._out)
        self._out.clear()
        return out

    def next_event(self) -> RendezvousEvent | None:
        return self._events.popleft() if self._events else None

    def _request(
        self,
        kind: MessageType,
        build: Callable[[bytes], bytes],
        now: float,
        *,
        target: str | None = None,
        retransmit: bool = True,
    ) -> None:
        txid = self.rng.getrandbits(64).to_bytes(8, "big")
        data = build(txid)
        self._out.append(data)
        first = self.config.retransmit[0]
        req = _Request(kind, txid, data, now + first, 1, target, retransmit)
        if not retransmit:
            req.attempt = len(self.config.retransmit)
            req.next_at = now + self.keepalive_interval
        self._requests[txid] = req

    def _drop_requests(self, *kinds: MessageType) -> None:
        for txid in [t for t, r in self._requests.items() if r.kind in kinds]:
            del self._requests[txid]


def _introduce_message(txid: bytes, registration: bytes, target: str) -> bytes:
    return encode_control(
        ControlMessage(MessageType.INTRODUCE, txid, registration=registration, target=target))
