"""A port mapping on the local gateway (PCP, NAT-PMP), sans-IO.

A device behind a home router can ask the router to forward a public port
to its UDP socket: the mapped external address is then a candidate that
works whatever the NAT's filtering. One :class:`PortMapClient` holds one
UDP mapping for one internal port on one gateway:

1. **Probe.** :meth:`~PortMapClient.start` sends at once a PCP ANNOUNCE
   (RFC 6887 section 14.1) and a NAT-PMP external-address request (RFC
   6886 section 3.2) to the gateway's port 5351. Neither creates state on
   the gateway. Each is retransmitted on its protocol's schedule: NAT-PMP
   at 250 ms, doubling, a bounded number of times (section 3.1: nine,
   then 64 s of waiting); PCP at ``(1 + RAND) * IRT`` then
   ``(1 + RAND) * min(2 * RTprev, MRT)`` (RFC 6887 section 8.1.1), where
   the RFC's unbounded count is bounded here.
2. **Choose.** :func:`choose_protocol` picks by ``PortMapConfig.preference``
   (PCP, then NAT-PMP). The most preferred protocol that answered wins
   once every more preferred one has answered or given up, or
   ``better_answer_wait`` after the first answer. A PCP refusal ends PCP's
   probe at once: either a PCP UNSUPP_VERSION response, or NAT-PMP's
   8-byte "Unsupported Version" answer to the PCP request, which a
   NAT-PMP-only gateway sends (RFC 6887 section 9; the two share the port,
   and :func:`~dtx.wire.pcp.classify_answer` tells them apart).
3. **Map.** A MAP request in the chosen protocol (PCP with a random 96-bit
   nonce from ``rng``; NAT-PMP's answer has only the port, so the external
   address comes from the probe). Success gives :class:`MappingCreated`.
   If PCP's MAP is refused or unanswered, NAT-PMP is tried (probed again
   first if its probe was cut short), and :class:`ProbeFailed` comes when
   nothing is left.
4. **Renew** at ``renew_fraction`` (a half) of the granted lifetime, with
   the same request suggesting the port granted; success gives
   :class:`MappingRenewed` (its external address may differ, after the
   gateway's address changed). An unanswered renewal is tried again at
   half of what remains; at expiry, or on a refusal, :class:`MappingLost`.
5. **Close.** :meth:`~PortMapClient.close` sends a delete (lifetime 0; the
   mapping's nonce for PCP), a bounded number of times, and reports
   :class:`MappingClosed` when the gateway answered or the tries ran out.

Every answer's epoch is checked against the previous one of the same
protocol (RFC 6886 section 3.6, RFC 6887 section 8.5: pure functions
:func:`natpmp_epoch_valid`, :func:`pcp_epoch_valid`). An epoch that went
backwards means the gateway lost its mappings: the client maps again after
a random 0..``reboot_delay_max`` s (RFC 6886 section 3.7), and the answer
gives a new :class:`MappingCreated`. If the backwards epoch arrives on the
answer to a renewal, that answer is the re-created mapping. A NAT-PMP
external-address response with a new address (an announcement the driver
passes in) makes the client renew at once, so that the new address comes
in a :class:`MappingRenewed`.

What is ignored (counted in :meth:`~PortMapClient.statistics`, logged at
WARNING rate-limited): datagrams from any address other than the gateway's
port 5351, what does not decode, PCP MAP responses with another nonce,
answers to nothing outstanding. Nothing from the network raises.

In: :meth:`~PortMapClient.start`, :meth:`~PortMapClient.close`,
:meth:`~PortMapClient.receive_datagram`, :meth:`~PortMapClient.handle_timer`.
Out: :meth:`~PortMapClient.datagrams_to_send`, :meth:`~PortMapClient.get_timer`,
:meth:`~PortMapClient.next_event`. Time is ``now`` (seconds, any origin),
randomness is ``rng``.

UPnP IGD is not here. Its discovery and requests (SSDP, then SOAP over
HTTP) are I/O through a library, not datagrams to port 5351: they live in
:mod:`dtx.aio.upnp`, whose mapper reports with this module's events
(:class:`MappingCreated`, :class:`MappingRenewed`, :class:`MappingLost`,
:class:`ProbeFailed`, :class:`MappingClosed`) and ``MappingProtocol.UPNP``.
``PortMapConfig.preference`` names PCP and NAT-PMP only; a device tries
UPnP when this client gave up (:class:`~dtx.aio.peer.Peer`).

One machine with its config, events, policy and statistics, past the style
guide's ~800 lines (much of it these docs): the two protocols share every
state and timer, and splitting them would only scatter one API.
"""

from __future__ import annotations

import ipaddress
import logging
import random
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from enum import Enum, IntEnum

from ..errors import LocalProtocolError
from ..logs import LogLimiter
from ..wire.address import Address, format_address, normalise_address
from ..wire.natpmp import (
    SERVER_PORT,
    ExternalAddressRequest,
    ExternalAddressResponse,
    MapRequest,
    MapResponse,
    NatPmpError,
    NatPmpOpcode,
    NatPmpResponse,
    NatPmpResult,
    decode_natpmp_response,
    encode_natpmp,
)
from ..wire.pcp import (
    AnswerKind,
    IPAddress,
    PcpError,
    PcpMap,
    PcpOpcode,
    PcpRequest,
    PcpResponse,
    PcpResult,
    announce_request,
    classify_answer,
    decode_pcp_response,
    encode_pcp,
    unspecified_address,
)

__all__ = [
    "MappingClosed",
    "MappingCreated",
    "MappingLost",
    "MappingProtocol",
    "MappingRenewed",
    "PortMapClient",
    "PortMapConfig",
    "PortMapEvent",
    "PortMapState",
    "PortMapStatistics",
    "ProbeFailed",
    "ProbeOutcome",
    "choose_protocol",
    "natpmp_epoch_valid",
    "pcp_epoch_valid",
]

logger = logging.getLogger(__name__)

_UDP = 17
"""IANA protocol number of UDP, PCP's name for what is mapped."""


class MappingProtocol(Enum):
    PCP = "pcp"
    NATPMP = "nat-pmp"
    UPNP = "upnp"
    """UPnP IGD: :mod:`dtx.aio.upnp`, never :class:`PortMapClient`'s."""


class ProbeOutcome(Enum):
    """What is known of one protocol on the gateway."""

    PENDING = "pending"
    """Its probe (or its MAP) is outstanding."""
    AVAILABLE = "available"
    UNAVAILABLE = "unavailable"
    UNKNOWN = "unknown"
    """Its probe was stopped before an answer (another protocol won)."""


@dataclass(frozen=True, kw_only=True)
class PortMapConfig:
    """Times in seconds."""

    lifetime: int = 7200
    """Lifetime asked for (RFC 6886 section 3.3 recommends two hours)."""
    preference: tuple[MappingProtocol, ...] = (MappingProtocol.PCP, MappingProtocol.NATPMP)
    """Protocols to probe, best first; leave one out to not use it."""
    gateway_port: int = SERVER_PORT
    natpmp_initial_rto: float = 0.25
    """RFC 6886 section 3.1: the first wait, doubled after each request."""
    natpmp_max_transmissions: int = 9
    """RFC 6886 section 3.1: nine requests (the last wait is then 64 s)."""
    pcp_initial_rto: float = 3.0
    """RFC 6887 section 8.1.1: IRT."""
    pcp_max_rto: float = 1024.0
    """RFC 6887 section 8.1.1: MRT."""
    pcp_rto_jitter: float = 0.1
    """RFC 6887 section 8.1.1: RAND is uniform in +-this."""
    pcp_max_transmissions: int = 4
    """RFC 6887's MRC is 0 (no limit); bounded here so a probe ends."""
    better_answer_wait: float = 1.0
    """After the first usable probe answer, how long a more preferred
    protocol still pending may take to answer before it is passed over."""
    renew_fraction: float = 0.5
    """Renew when this fraction of the granted lifetime has passed; an
    unanswered renewal is tried again at this fraction of what remains."""
    min_renew_interval: float = 1.0
    """No renewal round starts closer than this to the previous one's end
    (then the mapping is left to expire)."""
    reboot_delay_max: float = 5.0
    """RFC 6886 section 3.7: map again after a uniform 0..this delay when
    the gateway lost its state."""
    delete_max_transmissions: int = 3
    """Delete requests sent on close before giving up on an answer."""

    def __post_init__(self) -> None:
        if not 0 < self.lifetime <= 0xFFFFFFFF:
            raise ValueError("PortMapConfig: lifetime must be 1..2**32-1 seconds")
        if not self.preference or len(set(self.preference)) != len(self.preference):
            raise ValueError("PortMapConfig: preference must name each protocol at most once")
        if MappingProtocol.UPNP in self.preference:
            raise ValueError("PortMapConfig: UPnP IGD is not in preference (dtx.aio.upnp)")
        if not 0 < self.natpmp_initial_rto < 60 or not 0 < self.pcp_initial_rto <= self.pcp_max_rto:
            raise ValueError("PortMapConfig: retransmission timeouts must be positive")
        if not 0 <= self.pcp_rto_jitter < 1:
            raise ValueError("PortMapConfig: PCP jitter must be in [0, 1)")
        if min(self.natpmp_max_transmissions, self.pcp_max_transmissions,
               self.delete_max_transmissions) < 1:
            raise ValueError("PortMapConfig: at least one transmission of each request")
        if not 0 < self.renew_fraction < 1:
            raise ValueError("PortMapConfig: renew_fraction must be in (0, 1)")
        if self.better_answer_wait < 0 or self.reboot_delay_max < 0 \
                or self.min_renew_interval < 0:
            raise ValueError("PortMapConfig: waits must not be negative")
        if not 0 < self.gateway_port <= 0xFFFF:
            raise ValueError("PortMapConfig: gateway_port must be 1..65535")


class PortMapState(Enum):
    IDLE = "idle"
    """Not started, or stopped after ProbeFailed or MappingLost."""
    PROBING = "probing"
    MAPPING = "mapping"
    MAPPED = "mapped"
    RENEWING = "renewing"
    CLOSING = "closing"
    CLOSED = "closed"


_S = PortMapState
_TRANSITIONS: dict[PortMapState, frozenset[PortMapState]] = {
    _S.IDLE: frozenset({_S.PROBING, _S.CLOSED}),
    _S.PROBING: frozenset({_S.MAPPING, _S.IDLE, _S.CLOSED}),
    _S.MAPPING: frozenset({_S.MAPPED, _S.MAPPING, _S.PROBING, _S.IDLE, _S.CLOSING, _S.CLOSED}),
    _S.MAPPED: frozenset({_S.MAPPED, _S.RENEWING, _S.MAPPING, _S.IDLE, _S.CLOSING}),
    _S.RENEWING: frozenset({_S.MAPPED, _S.MAPPING, _S.IDLE, _S.CLOSING}),
    _S.CLOSING: frozenset({_S.CLOSED}),
    _S.CLOSED: frozenset(),
}
_HOLDING = frozenset({_S.MAPPED, _S.RENEWING})


# -- events -------------------------------------------------------------------


@dataclass(frozen=True)
class MappingCreated:
    """The gateway forwards ``external`` to the internal port for
    ``lifetime`` seconds. Also sent when a mapping was re-created after the
    gateway lost its state (the external port may then differ)."""

    protocol: MappingProtocol
    external: Address
    lifetime: int


@dataclass(frozen=True)
class MappingRenewed:
    """The gateway extended the mapping; ``external`` is its current
    address (it differs from before when the gateway's address changed)."""

    protocol: MappingProtocol
    external: Address
    lifetime: int


@dataclass(frozen=True)
class MappingLost:
    """A mapping that existed is gone or could not be kept; the client is
    IDLE (:meth:`PortMapClient.start` tries again)."""

    protocol: MappingProtocol
    external: Address | None
    reason: str


@dataclass(frozen=True)
class ProbeFailed:
    """No mapping was obtained: no protocol answered, or each refused."""

    reason: str


@dataclass(frozen=True)
class MappingClosed:
    """:meth:`PortMapClient.close` is done. ``deleted``: the gateway
    confirmed the delete (False when there was nothing to delete, the
    gateway refused, or no answer came)."""

    deleted: bool


PortMapEvent = MappingCreated | MappingRenewed | MappingLost | ProbeFailed | MappingClosed


@dataclass
class PortMapStatistics:
    transmissions: int = 0
    """Datagrams sent, retransmissions included."""
    retransmissions: int = 0
    pcp_answers: int = 0
    """PCP datagrams from the gateway that decoded, whatever they said (a
    refusal is an answer: the gateway speaks PCP)."""
    natpmp_answers: int = 0
    """The same of NAT-PMP (its "Unsupported Version" to a PCP request
    included: a NAT-PMP-only gateway)."""
    foreign: int = 0
    """Datagrams from an address other than the gateway's port."""
    malformed: int = 0
    nonce_mismatch: int = 0
    """PCP MAP responses with a nonce other than this mapping's."""
    unexpected: int = 0
    """Answers that decoded but answered nothing outstanding."""


# -- policy -------------------------------------------------------------------


def choose_protocol(preference: Sequence[MappingProtocol],
                    outcomes: Mapping[MappingProtocol, ProbeOutcome], *,
                    waited: bool = False) -> MappingProtocol | None:
    """The protocol to map with now, or None (wait, or nothing usable).

    The first AVAILABLE one in ``preference`` order, unless a protocol
    before it is still PENDING and the wait for better answers is not
    over (``waited``). Protocols missing from ``outcomes`` are skipped.
    """
    for protocol in preference:
        outcome = outcomes.get(protocol)
        if outcome is ProbeOutcome.AVAILABLE:
            return protocol
        if outcome is ProbeOutcome.PENDING and not waited:
            return None
    return None


def natpmp_epoch_valid(previous: int, elapsed: float, current: int) -> bool:
    """RFC 6886 section 3.6: false when ``current`` is more than 2 s below
    ``previous`` plus 7/8 of the ``elapsed`` client time (the gateway lost
    its mappings)."""
    return current >= previous + elapsed * 7 / 8 - 2


def pcp_epoch_valid(previous: int, elapsed: float, current: int) -> bool:
    """RFC 6887 section 8.5: false when the epoch went back more than 1 s,
    or the server's and the client's elapsed times disagree by more than
    2 s plus a sixteenth."""
    if current + 1 < previous:
        return False
    client = int(elapsed)
    server = current - previous
    return not (client + 2 < server - server // 16 or server + 2 < client - client // 16)


# -- internal state -------------------------------------------------------------


class _Purpose(Enum):
    PROBE = "probe"
    MAP = "MAP"
    RENEW = "renewal"
    DELETE = "delete"


_MAPPING_PURPOSES = frozenset({_Purpose.MAP, _Purpose.RENEW, _Purpose.DELETE})


@dataclass(eq=False)
class _Transaction:
    """One request on its protocol's retransmission schedule."""

    protocol: MappingProtocol
    purpose: _Purpose
    data: bytes
    max_transmissions: int
    sent: int = 0
    rto: float = 0.0
    next_at: float = 0.0
    """When to send again, or, after the last transmission, to give up."""


def _result_name(result: int, names: type[IntEnum]) -> str:
    try:
        return names(result).name
    except ValueError:
        return str(result)


class PortMapClient:
    """One UDP port mapping on one gateway (module docs).

    ``gateway`` is the gateway's IP address (the port is
    ``config.gateway_port``); ``client_ip`` the address this device sends
    to it from (PCP carries it, section 7.1); ``internal_port`` the local
    UDP port to map; ``suggested_port`` the external port to ask for
    first (default: the internal port).
    """

    def __init__(self, gateway: str, *, client_ip: str, internal_port: int,
                 rng: random.Random, config: PortMapConfig | None = None,
                 suggested_port: int | None = None) -> None:
        self.config = config or PortMapConfig()
        if not 0 < internal_port <= 0xFFFF:
            raise LocalProtocolError(f"internal port {internal_port} out of range")
        self.gateway: Address = normalise_address((gateway, self.config.gateway_port))
        self.internal_port = internal_port
        self._client_ip: IPAddress = ipaddress.ip_address(client_ip)
        self._first_suggestion = internal_port if suggested_port is None else suggested_port
        if not 0 <= self._first_suggestion <= 0xFFFF:
            raise LocalProtocolError(f"suggested port {suggested_port} out of range")
        self._rng = rng
        self._log = LogLimiter(logger)
        self._state = PortMapState.IDLE
        self._outcomes: dict[MappingProtocol, ProbeOutcome] = {}
        self._reasons: dict[MappingProtocol, str] = {}
        self._txns: list[_Transaction] = []
        self._decide_at: float | None = None
        self._remap_at: float | None = None
        self._renew_at: float | None = None
        self._expires_at: float | None = None
        self._epochs: dict[MappingProtocol, tuple[int, float]] = {}
        self._natpmp_external: ipaddress.IPv4Address | None = None
        self._nonce = bytes(12)
        self._suggested_port = self._first_suggestion
        self._suggested_address: IPAddress = unspecified_address(self._client_ip)
        self._had_mapping = False
        self._out: list[bytes] = []
        self._events: deque[PortMapEvent] = deque()
        self._stats = PortMapStatistics()
        self.protocol: MappingProtocol | None = None
        """The protocol chosen (None before the choice)."""
        self.external: Address | None = None
        """The mapped external address while a mapping is held."""
        self.lifetime: int | None = None
        """The granted lifetime of the mapping held, in seconds."""

    # -- user calls ---------------------------------------------------------------

    @property
    def state(self) -> PortMapState:
        return self._state

    @property
    def expires_at(self) -> float | None:
        """When the mapping held expires unless renewed (client clock)."""
        return self._expires_at if self._state in _HOLDING else None

    def start(self, now: float) -> None:
        """Probe the gateway (from IDLE: first use, or after a failure)."""
        if self._state is not PortMapState.IDLE:
            raise LocalProtocolError(f"PortMapClient.start() while {self._state.value}")
        self._outcomes.clear()
        self._reasons.clear()
        self._epochs.clear()
        self._had_mapping = False
        self._nonce = self._rng.getrandbits(96).to_bytes(12, "big")
        self._suggested_port = self._first_suggestion
        self._suggested_address = unspecified_address(self._client_ip)
        self._probe(self.config.preference, now)

    def close(self, now: float) -> None:
        """Delete the mapping (if one may exist) and stop; idempotent."""
        if self._state in (PortMapState.CLOSING, PortMapState.CLOSED):
            return
        may_exist = self._state in _HOLDING or (
            self._state is PortMapState.MAPPING and self._remap_at is None)
        protocol = self.protocol
        self._cancel_all()
        if not may_exist or protocol is None:
            self._set_state(PortMapState.CLOSED)
            self._clear_mapping()
            self._events.append(MappingClosed(deleted=False))
            return
        self._set_state(PortMapState.CLOSING)
        self._send(protocol, _Purpose.DELETE, now)

    def statistics(self) -> PortMapStatistics:
        return replace(self._stats)

    # -- network input ---------------------------------------------------------------

    def receive_datagram(self, data: bytes, addr: Address, now: float) -> None:
        """A datagram that arrived on the mapped socket; never raises."""
        if normalise_address(addr) != self.gateway:
            self._stats.foreign += 1
            self._log.log(logging.WARNING, "foreign", addr[0],
                          "port mapping: answer from %s, not the gateway %s: ignored",
                          format_address(*addr), format_address(*self.gateway))
            return
        if self._state in (PortMapState.IDLE, PortMapState.CLOSED):
            self._unexpected("an answer while %s", self._state.value)
            return
        kind = classify_answer(data)
        if kind is AnswerKind.PCP:
            try:
                pcp = decode_pcp_response(data)
            except PcpError as exc:
                self._malformed("PCP", exc)
                return
            self._stats.pcp_answers += 1
            logger.debug("port mapping: PCP %s response, result %s", pcp.opcode.name,
                         _result_name(pcp.result, PcpResult))
            self._on_pcp(pcp, now)
        elif kind in (AnswerKind.NATPMP, AnswerKind.PCP_UNSUPPORTED):
            try:
                natpmp = decode_natpmp_response(data)
            except NatPmpError as exc:
                self._malformed("NAT-PMP", exc)
                return
            self._stats.natpmp_answers += 1
            logger.debug("port mapping: NAT-PMP %s, result %s", type(natpmp).__name__,
                         _result_name(natpmp.result, NatPmpResult))
            if natpmp.result == NatPmpResult.UNSUPPORTED_VERSION:
                # only our version-2 (PCP) request can be answered so
                self._pcp_refused("the gateway answered PCP with NAT-PMP's Unsupported Version",
                                  now)
            else:
                self._on_natpmp(natpmp, now)
        else:
            self._malformed("port mapping", None)

    def _on_pcp(self, msg: PcpResponse, now: float) -> None:
        if msg.result == PcpResult.UNSUPP_VERSION:
            self._pcp_refused("the gateway answered PCP with UNSUPP_VERSION", now)
            return
        if msg.opcode == PcpOpcode.ANNOUNCE:
            probe = self._find(MappingProtocol.PCP, _Purpose.PROBE)
            if probe is not None:
                self._txns.remove(probe)
                self._epoch_reset(MappingProtocol.PCP, msg.epoch, now)
                ok = msg.result == PcpResult.SUCCESS
                self._settle_probe(MappingProtocol.PCP, ok, now, reason="" if ok else
                                   f"ANNOUNCE answered {_result_name(msg.result, PcpResult)}")
            elif self.protocol is MappingProtocol.PCP and self._state in _HOLDING:
                if self._epoch_reset(MappingProtocol.PCP, msg.epoch, now):
                    self._gateway_lost_state(now)
            else:
                self._unexpected("a PCP ANNOUNCE response")
            return
        body = msg.map
        if body is not None:
            if body.nonce != self._nonce:
                self._stats.nonce_mismatch += 1
                self._log.log(logging.WARNING, "nonce", self.gateway[0],
                              "port mapping: PCP MAP response with another nonce: ignored")
                return
            if body.protocol != _UDP or body.internal_port != self.internal_port:
                self._unexpected("a PCP MAP response for another mapping")
                return
        if self.protocol is not MappingProtocol.PCP:
            self._unexpected("a PCP MAP response while PCP is not in use")
            return
        reset = self._epoch_reset(MappingProtocol.PCP, msg.epoch, now)
        txn = self._find_mapping_txn(MappingProtocol.PCP)
        ok = msg.result == PcpResult.SUCCESS
        external = None if body is None else (str(body.external_address), body.external_port)
        if txn is None:
            if ok and msg.lifetime and external is not None and self._state is PortMapState.MAPPED:
                self._refreshed(external, msg.lifetime, now)  # section 14.2, or a duplicate
            elif reset and self._state in _HOLDING:
                self._gateway_lost_state(now)
            else:
                self._unexpected("a PCP MAP response to nothing outstanding")
            return
        self._answered(txn, ok, external, msg.lifetime, _result_name(msg.result, PcpResult),
                       reset, now)

    def _on_natpmp(self, msg: NatPmpResponse, now: float) -> None:
        if isinstance(msg, ExternalAddressResponse):
            ok = msg.result == NatPmpResult.SUCCESS and int(msg.external_address) != 0
            probe = self._find(MappingProtocol.NATPMP, _Purpose.PROBE)
            if probe is not None:
                self._txns.remove(probe)
                self._epoch_reset(MappingProtocol.NATPMP, msg.epoch, now)
                if ok:
                    self._natpmp_external = msg.external_address
                reason = "" if ok else (
                    f"external address answered {_result_name(msg.result, NatPmpResult)}"
                    if msg.result else "no external address")
                self._settle_probe(MappingProtocol.NATPMP, ok, now, reason=reason)
            elif self.protocol is MappingProtocol.NATPMP and self._state in (
                    *_HOLDING, PortMapState.MAPPING):
                reset = self._epoch_reset(MappingProtocol.NATPMP, msg.epoch, now)
                moved = ok and msg.external_address != self._natpmp_external
                if ok:
                    self._natpmp_external = msg.external_address
                if reset and self._state in _HOLDING:
                    self._gateway_lost_state(now)
                elif moved and self._state is PortMapState.MAPPED:
                    logger.info("port mapping: the gateway's address is now %s; renewing",
                                msg.external_address)
                    self._start_renewal(now)
            else:
                self._unexpected("a NAT-PMP external address response")
            return
        if not isinstance(msg, MapResponse):
            return  # Unsupported Version: handled by the caller
        if msg.opcode != NatPmpOpcode.MAP_UDP or msg.internal_port != self.internal_port:
            self._unexpected("a NAT-PMP map response for another mapping")
            return
        if self.protocol is not MappingProtocol.NATPMP:
            self._unexpected("a NAT-PMP map response while NAT-PMP is not in use")
            return
        reset = self._epoch_reset(MappingProtocol.NATPMP, msg.epoch, now)
        txn = self._find_mapping_txn(MappingProtocol.NATPMP)
        if txn is None:
            if reset and self._state in _HOLDING:
                self._gateway_lost_state(now)
            else:
                self._unexpected("a NAT-PMP map response to nothing outstanding")
            return
        external = (str(self._natpmp_external or ipaddress.IPv4Address(0)), msg.external_port)
        self._answered(txn, msg.result == NatPmpResult.SUCCESS, external, msg.lifetime,
                       _result_name(msg.result, NatPmpResult), reset, now)

    def _answered(self, txn: _Transaction, ok: bool, external: Address | None, lifetime: int,
                  result: str, reset: bool, now: float) -> None:
        """The answer to an outstanding MAP, renewal or delete."""
        if txn.purpose is _Purpose.DELETE:
            if ok and lifetime:
                self._unexpected("a late answer granting a lifetime while deleting")
                return
            self._txns.remove(txn)
            self._closed(deleted=ok)
            return
        self._txns.remove(txn)
        if not ok or not lifetime or external is None:
            reason = f"{txn.purpose.value} answered {result}" if not ok \
                else f"{txn.purpose.value} granted no lifetime"
            if txn.purpose is _Purpose.RENEW:
                self._lose(reason, now)
            else:
                self._map_failed(txn.protocol, reason, now)
            return
        created = txn.purpose is _Purpose.MAP or reset
        self._hold(external, lifetime, now)
        logger.info("port mapping: %s %s %s for %d s", txn.protocol.value,
                    "created" if created else "renewed", format_address(*external), lifetime)
        event = MappingCreated if created else MappingRenewed
        self._events.append(event(txn.protocol, external, lifetime))

    # -- timers ---------------------------------------------------------------------

    def get_timer(self) -> float | None:
        times = [t.next_at for t in self._txns]
        times += [t for t in (self._decide_at, self._remap_at, self._renew_at) if t is not None]
        if self._state in _HOLDING and self._expires_at is not None:
            times.append(self._expires_at)
        return min(times, default=None)

    def handle_timer(self, now: float) -> None:
        if self._state in _HOLDING and self._expires_at is not None and now >= self._expires_at:
            self._lose("expired without a renewal", now)
            return
        if self._decide_at is not None and now >= self._decide_at:
            self._decide(now)
        if self._remap_at is not None and now >= self._remap_at:
            self._remap_at = None
            if self.protocol is not None:
                self._send(self.protocol, _Purpose.MAP, now)
        if self._renew_at is not None and now >= self._renew_at:
            self._renew_at = None
            self._start_renewal(now)
        for txn in list(self._txns):
            if txn in self._txns and now >= txn.next_at:
                if txn.sent >= txn.max_transmissions:
                    self._txns.remove(txn)
                    self._gave_up(txn, now)
                else:
                    self._stats.retransmissions += 1
                    self._transmit(txn, now)

    def _gave_up(self, txn: _Transaction, now: float) -> None:
        reason = f"no answer to {txn.sent} {txn.purpose.value} requests"
        if txn.purpose is _Purpose.PROBE:
            self._settle_probe(txn.protocol, False, now, reason=reason)
        elif txn.purpose is _Purpose.MAP:
            self._map_failed(txn.protocol, reason, now)
        elif txn.purpose is _Purpose.RENEW:
            assert self._expires_at is not None
            remaining = self._expires_at - now
            self._set_state(PortMapState.MAPPED)
            again = remaining * self.config.renew_fraction
            if again >= self.config.min_renew_interval:
                self._renew_at = now + again
            logger.info("port mapping: %s; %s", reason, "trying again" if self._renew_at
                        else "waiting for expiry")
        else:
            self._closed(deleted=False)

    # -- output -------------------------------------------------------------------------

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Address]]:
        """What to send to the gateway (``now`` for the shape of the other
        cores; nothing queued depends on it)."""
        out = [(d, self.gateway) for d in self._out]
        self._out.clear()
        return out

    def next_event(self) -> PortMapEvent | None:
        return self._events.popleft() if self._events else None

    # -- the machine ----------------------------------------------------------------------

    def _set_state(self, new: PortMapState) -> None:
        if new not in _TRANSITIONS[self._state]:
            raise LocalProtocolError(f"port mapping: {self._state.value} -> {new.value}")
        self._state = new

    def _probe(self, protocols: Sequence[MappingProtocol], now: float) -> None:
        self._set_state(PortMapState.PROBING)
        self.protocol = None
        self._decide_at = None
        for protocol in protocols:
            self._outcomes[protocol] = ProbeOutcome.PENDING
            self._send(protocol, _Purpose.PROBE, now)

    def _settle_probe(self, protocol: MappingProtocol, available: bool, now: float, *,
                      reason: str = "") -> None:
        """Record what one protocol's probe found, then decide if possible."""
        self._outcomes[protocol] = ProbeOutcome.AVAILABLE if available \
            else ProbeOutcome.UNAVAILABLE
        if reason:
            self._reasons[protocol] = reason
        logger.debug("port mapping: %s %s%s", protocol.value, self._outcomes[protocol].value,
                     f" ({reason})" if reason else "")
        self._decide(now)

    def _decide(self, now: float) -> None:
        if self._state is not PortMapState.PROBING and any(
                o is ProbeOutcome.PENDING for o in self._outcomes.values()):
            return
        waited = self._decide_at is not None and now >= self._decide_at
        chosen = choose_protocol(self.config.preference, self._outcomes, waited=waited)
        if chosen is not None:
            self._decide_at = None
            for txn in [t for t in self._txns if t.purpose is _Purpose.PROBE]:
                self._txns.remove(txn)
                self._outcomes[txn.protocol] = ProbeOutcome.UNKNOWN
            self._begin_mapping(chosen, now)
            return
        outcomes = self._outcomes.values()
        if ProbeOutcome.PENDING in outcomes:
            if ProbeOutcome.AVAILABLE in outcomes and self._decide_at is None:
                self._decide_at = now + self.config.better_answer_wait
            return
        self._decide_at = None
        unknown = [p for p in self.config.preference
                   if self._outcomes.get(p) is ProbeOutcome.UNKNOWN]
        if unknown:
            self._probe(unknown, now)
            return
        reason = "; ".join(f"{p.value}: {self._reasons.get(p, 'unavailable')}"
                           for p in self.config.preference)
        logger.info("port mapping: no mapping from %s (%s)", format_address(*self.gateway),
                    reason)
        self._cancel_all()
        self._set_state(PortMapState.IDLE)
        self.protocol = None
        self._events.append(ProbeFailed(reason))

    def _pcp_refused(self, reason: str, now: float) -> None:
        probe = self._find(MappingProtocol.PCP, _Purpose.PROBE)
        if probe is not None:
            self._txns.remove(probe)
            self._settle_probe(MappingProtocol.PCP, False, now, reason=reason)
            return
        txn = self._find_mapping_txn(MappingProtocol.PCP)
        if txn is not None and txn.purpose is not _Purpose.DELETE:
            self._txns.remove(txn)
            if txn.purpose is _Purpose.RENEW:
                self._lose(reason, now)
            else:
                self._map_failed(MappingProtocol.PCP, reason, now)
            return
        if txn is not None:
            self._txns.remove(txn)
            self._closed(deleted=False)
            return
        self._unexpected("a PCP refusal with no PCP request outstanding")

    def _begin_mapping(self, protocol: MappingProtocol, now: float) -> None:
        self._set_state(PortMapState.MAPPING)
        self.protocol = protocol
        self._outcomes[protocol] = ProbeOutcome.PENDING
        self._send(protocol, _Purpose.MAP, now)

    def _map_failed(self, protocol: MappingProtocol, reason: str, now: float) -> None:
        if self._had_mapping:
            self._lose(reason, now)
            return
        self._outcomes[protocol] = ProbeOutcome.UNAVAILABLE
        self._reasons[protocol] = reason
        logger.info("port mapping: %s refused or silent (%s)", protocol.value, reason)
        self._decide(now)

    def _hold(self, external: Address, lifetime: int, now: float) -> None:
        self._set_state(PortMapState.MAPPED)
        assert self.protocol is not None
        self._outcomes[self.protocol] = ProbeOutcome.AVAILABLE
        self._had_mapping = True
        self.external = external
        self.lifetime = lifetime
        self._expires_at = now + lifetime
        self._renew_at = now + lifetime * self.config.renew_fraction
        self._remap_at = None
        self._suggested_port = external[1]
        if self.protocol is MappingProtocol.PCP:
            self._suggested_address = ipaddress.ip_address(external[0])

    def _refreshed(self, external: Address, lifetime: int, now: float) -> None:
        """A PCP MAP success for the mapping held with nothing outstanding:
        the server's own update (RFC 6887 section 14.2) when the external
        address or port moved, else a repeated answer, which changes nothing."""
        if external == self.external or self.protocol is None:
            self._unexpected("a repeated PCP MAP response")
            return
        self._hold(external, lifetime, now)
        self._events.append(MappingRenewed(self.protocol, external, lifetime))

    def _start_renewal(self, now: float) -> None:
        if self._state is not PortMapState.MAPPED or self.protocol is None:
            return
        self._renew_at = None
        self._set_state(PortMapState.RENEWING)
        self._send(self.protocol, _Purpose.RENEW, now)

    def _gateway_lost_state(self, now: float) -> None:
        delay = self._rng.uniform(0.0, self.config.reboot_delay_max)
        logger.info("port mapping: %s lost its mappings (epoch went back); mapping again in "
                    "%.1f s", format_address(*self.gateway), delay)
        self._cancel_all()
        self._set_state(PortMapState.MAPPING)
        self._renew_at = None
        self._expires_at = None
        self._remap_at = now + delay

    def _lose(self, reason: str, now: float) -> None:
        protocol = self.protocol
        external = self.external
        logger.info("port mapping: lost %s (%s)", format_address(*external) if external
                    else "the mapping", reason)
        self._cancel_all()
        self._set_state(PortMapState.IDLE)
        self._clear_mapping()
        if protocol is not None:
            self._events.append(MappingLost(protocol, external, reason))

    def _closed(self, *, deleted: bool) -> None:
        self._cancel_all()
        self._set_state(PortMapState.CLOSED)
        self._clear_mapping()
        self._events.append(MappingClosed(deleted=deleted))

    def _clear_mapping(self) -> None:
        self.external = None
        self.lifetime = None
        self._expires_at = None
        self._renew_at = None
        self._remap_at = None

    def _cancel_all(self) -> None:
        self._txns.clear()
        self._decide_at = None
        self._remap_at = None
        self._renew_at = None

    # -- requests ------------------------------------------------------------------------

    def _request(self, protocol: MappingProtocol, purpose: _Purpose) -> bytes:
        lifetime = 0 if purpose is _Purpose.DELETE else self.config.lifetime
        if protocol is MappingProtocol.NATPMP:
            if purpose is _Purpose.PROBE:
                return encode_natpmp(ExternalAddressRequest())
            # RFC 6886 section 3.4: a delete suggests port 0
            suggested = 0 if purpose is _Purpose.DELETE else self._suggested_port
            return encode_natpmp(MapRequest(NatPmpOpcode.MAP_UDP, self.internal_port,
                                            suggested, lifetime))
        if purpose is _Purpose.PROBE:
            return encode_pcp(announce_request(self._client_ip))
        body = PcpMap(self._nonce, _UDP, self.internal_port, self._suggested_port,
                      self._suggested_address)
        return encode_pcp(PcpRequest(PcpOpcode.MAP, lifetime, self._client_ip, body))

    def _send(self, protocol: MappingProtocol, purpose: _Purpose, now: float) -> None:
        cfg = self.config
        if purpose is _Purpose.DELETE:
            most = cfg.delete_max_transmissions
        elif protocol is MappingProtocol.NATPMP:
            most = cfg.natpmp_max_transmissions
        else:
            most = cfg.pcp_max_transmissions
        txn = _Transaction(protocol, purpose, self._request(protocol, purpose), most)
        self._txns.append(txn)
        self._transmit(txn, now)

    def _transmit(self, txn: _Transaction, now: float) -> None:
        cfg = self.config
        self._out.append(txn.data)
        txn.sent += 1
        self._stats.transmissions += 1
        if txn.protocol is MappingProtocol.NATPMP:
            txn.rto = cfg.natpmp_initial_rto * 2 ** (txn.sent - 1)
        else:
            base = cfg.pcp_initial_rto if txn.sent == 1 else min(2 * txn.rto, cfg.pcp_max_rto)
            jitter = cfg.pcp_rto_jitter
            txn.rto = (1 + self._rng.uniform(-jitter, jitter)) * base if jitter else base
        txn.next_at = now + txn.rto
        logger.debug("port mapping: %s %s #%d to %s", txn.protocol.value, txn.purpose.value,
                     txn.sent, format_address(*self.gateway))

    def _find(self, protocol: MappingProtocol, purpose: _Purpose) -> _Transaction | None:
        return next((t for t in self._txns if t.protocol is protocol and t.purpose is purpose),
                    None)

    def _find_mapping_txn(self, protocol: MappingProtocol) -> _Transaction | None:
        return next((t for t in self._txns
                     if t.protocol is protocol and t.purpose in _MAPPING_PURPOSES), None)

    def _epoch_reset(self, protocol: MappingProtocol, epoch: int, now: float) -> bool:
        """Record an answer's epoch; True when it shows the gateway lost state."""
        previous = self._epochs.get(protocol)
        self._epochs[protocol] = (epoch, now)
        if previous is None:
            return False
        valid = natpmp_epoch_valid if protocol is MappingProtocol.NATPMP else pcp_epoch_valid
        return not valid(previous[0], now - previous[1], epoch)

    # -- what is ignored ----------------------------------------------------------------------

    def _unexpected(self, what: str, *args: object) -> None:
        self._stats.unexpected += 1
        logger.debug("port mapping: ignored " + what, *args)

    def _malformed(self, what: str, exc: Exception | None) -> None:
        self._stats.malformed += 1
        self._log.log(logging.WARNING, "malformed", self.gateway[0],
                      "port mapping: undecodable %s answer from %s: %s", what,
                      format_address(*self.gateway), exc or "unknown protocol")
