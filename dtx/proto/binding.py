"""A STUN Binding (RFC 8489) on the device's one UDP socket, sans-IO.

A device whose XMPP server lists a STUN service but no TURN one (or whose
TURN allocation failed) still needs its server-reflexive address to offer
as a candidate: the address its NAT maps the peer's socket to. One
:class:`BindingClient` asks one STUN server once: a Binding request,
retransmitted on RFC 8489's schedule (0, RTO, 3 RTO, 7 RTO, ...), bounded
by ``max_transmissions``; the first success response with the request's
transaction id gives :class:`ReflexiveFound`, an error response or no
answer :class:`ReflexiveFailed`. Nothing is authenticated (STUN Binding
has no credentials): the answer is only an address to offer, and the
QUIC handshake checks the peer's key whatever the path.

In: :meth:`~BindingClient.start`, :meth:`~BindingClient.receive` (datagrams
from the server's address), :meth:`~BindingClient.handle_timer`. Out:
:meth:`~BindingClient.datagrams_to_send`, :meth:`~BindingClient.get_timer`,
:meth:`~BindingClient.next_event`. The endpoint routes by the server's
address (:meth:`Endpoint.use_stun <dtx.proto.endpoint.Endpoint.use_stun>`).
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass

from ..errors import DecodeError, LocalProtocolError
from ..wire.stun import Address, StunClass, StunMethod, binding_request, decode_stun

__all__ = ["BindingClient", "BindingConfig", "BindingEvent", "ReflexiveFailed",
           "ReflexiveFound"]


@dataclass(frozen=True, kw_only=True)
class BindingConfig:
    initial_rto: float = 0.5
    """RFC 8489 section 6.2.1's RTO, doubled after each transmission."""
    max_transmissions: int = 7
    last_wait_factor: int = 16
    """After the last transmission, wait this many RTOs (RFC 8489: Rm)."""

    def __post_init__(self) -> None:
        if not 0 < self.initial_rto < 60 or self.max_transmissions < 1 \
                or self.last_wait_factor < 1:
            raise ValueError("BindingConfig: RTO in (0, 60) s, at least one transmission")


@dataclass(frozen=True)
class ReflexiveFound:
    """The server saw this socket at ``mapped``."""

    server: Address
    mapped: Address


@dataclass(frozen=True)
class ReflexiveFailed:
    server: Address
    reason: str


BindingEvent = ReflexiveFound | ReflexiveFailed


class BindingClient:
    """One Binding transaction with ``server`` (module docs)."""

    def __init__(self, server: Address, *, rng: random.Random,
                 config: BindingConfig | None = None) -> None:
        self.server = server
        self.config = config or BindingConfig()
        self._rng = rng
        self._txid: bytes | None = None
        self._sent = 0
        self._next_at: float | None = None
        self._out: list[bytes] = []
        self._events: deque[BindingEvent] = deque()
        self.mapped: Address | None = None
        self.done = False
        self.ignored = 0
        """Datagrams from the server that answered nothing of ours."""

    def start(self, now: float) -> None:
        if self._txid is not None:
            raise LocalProtocolError("BindingClient.start() called twice")
        self._txid = self._rng.getrandbits(96).to_bytes(12, "big")
        self._transmit(now)

    def _transmit(self, now: float) -> None:
        assert self._txid is not None
        self._out.append(binding_request(self._txid))
        self._sent += 1
        cfg = self.config
        wait = (cfg.last_wait_factor * cfg.initial_rto if self._sent >= cfg.max_transmissions
                else cfg.initial_rto * 2 ** (self._sent - 1))
        self._next_at = now + wait

    def receive(self, data: bytes, now: float) -> None:
        """A datagram from the server: the answer, or ignored."""
        if self.done or self._txid is None:
            self.ignored += 1
            return
        try:
            msg = decode_stun(data)
        except DecodeError:
            self.ignored += 1
            return
        if msg.method != StunMethod.BINDING or msg.transaction_id != self._txid \
                or msg.cls not in (StunClass.SUCCESS, StunClass.ERROR):
            self.ignored += 1
            return
        mapped = msg.reflexive_address if msg.cls is StunClass.SUCCESS else None
        if mapped is None:
            self._finish(ReflexiveFailed(self.server, "an error response"
                                         if msg.cls is StunClass.ERROR
                                         else "a response without a mapped address"))
            return
        self.mapped = mapped
        self._finish(ReflexiveFound(self.server, mapped))

    def _finish(self, ev: BindingEvent) -> None:
        self.done = True
        self._next_at = None
        self._events.append(ev)

    def get_timer(self) -> float | None:
        return self._next_at

    def handle_timer(self, now: float) -> None:
        if self._next_at is None or now < self._next_at:
            return
        if self._sent >= self.config.max_transmissions:
            self._finish(ReflexiveFailed(self.server, f"no answer to {self._sent} requests"))
            return
        self._transmit(now)

    def datagrams_to_send(self) -> list[tuple[bytes, Address]]:
        out = [(d, self.server) for d in self._out]
        self._out.clear()
        return out

    def next_event(self) -> BindingEvent | None:
        return self._events.popleft() if self._events else None
