"""A port mapping on the home router, on the event loop, from a socket of
its own.

:class:`PortMapper` runs one sans-IO :class:`~dtx.proto.portmap.PortMapClient`
(PCP, NAT-PMP) from a UDP socket of its own toward the gateway's port
5351, for another socket's port: NAT-PMP names the internal port in the
request and PCP the internal address and port, so the requests need not
leave from the mapped socket. ``dtx nat-check --port-mapping`` uses it
(:func:`port_mapping_check`), with UPnP IGD's mapper
(:class:`~dtx.aio.upnp.UpnpMapper`) beside it. A device asks from its own socket instead,
through its endpoint (``PeerConfig.port_mapping``,
:meth:`~dtx.proto.endpoint.Endpoint.use_port_mapping`), so that the
mapping it registers is the one its QUIC traffic uses.

::

    async with PortMapper(peer_port) as mapper:
        event = await mapper.wait(timeout=5)   # MappingCreated or ProbeFailed
        print(mapper.external)                 # the public (ip, port), or None

Closing deletes the mapping (a bounded wait for the gateway's answer).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import DtxError
from ..proto.portmap import (
    MappingClosed,
    MappingCreated,
    MappingLost,
    MappingProtocol,
    MappingRenewed,
    PortMapClient,
    PortMapConfig,
    PortMapEvent,
    ProbeFailed,
)
from ..wire.address import Address
from .netif import default_gateway, source_ip_towards
from .socket import UdpSocket
from .upnp import UPNP_MISSING, UpnpConfig, UpnpMapper, UpnpUnavailable

logger = logging.getLogger(__name__)

CLOSE_TIMEOUT = 3.0
"""How long :meth:`PortMapper.close` waits for the gateway to confirm the delete."""


class PortMapper:
    """One UDP port mapping for ``internal_port`` on ``gateway`` (default:
    the default route's gateway). ``on_event`` sees every
    :mod:`~dtx.proto.portmap` event as it comes (the mapping created,
    renewed with a new address, lost)."""

    def __init__(self, internal_port: int, *, gateway: str | None = None,
                 config: PortMapConfig | None = None, rng: random.Random | None = None,
                 on_event: Callable[[PortMapEvent], None] | None = None) -> None:
        self.internal_port = internal_port
        self.gateway = gateway
        self.config = config or PortMapConfig()
        self._rng = rng or random.Random(random.SystemRandom().getrandbits(64))
        self._on_event = on_event
        self.client: PortMapClient | None = None
        self._socket: UdpSocket | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._changed = asyncio.Event()
        self._outcome: MappingCreated | ProbeFailed | None = None
        self._closed: MappingClosed | None = None

    @property
    def external(self) -> Address | None:
        """The mapped public address while the gateway holds the mapping."""
        return None if self.client is None else self.client.external

    async def __aenter__(self) -> PortMapper:
        self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    def start(self) -> None:
        """Probe the gateway and map; raises :class:`~dtx.errors.DtxError`
        when there is no gateway to ask (no default route)."""
        if self.client is not None:
            raise DtxError("PortMapper.start() called twice")
        gateway = self.gateway or default_gateway()
        if gateway is None:
            raise DtxError("no default gateway to ask for a port mapping")
        client_ip = source_ip_towards((gateway, self.config.gateway_port), socket.AF_INET)
        if client_ip is None:
            raise DtxError(f"no route to the gateway {gateway}")
        self.gateway = gateway
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.bind((client_ip, 0))
        except OSError:
            sock.close()
            raise
        loop = asyncio.get_running_loop()
        self.client = PortMapClient(gateway, client_ip=client_ip,
                                    internal_port=self.internal_port, rng=self._rng,
                                    config=self.config)
        self._socket = UdpSocket(sock, self._received, self._transmit)
        self.client.start(loop.time())
        self._transmit()

    async def wait(self, timeout: float) -> MappingCreated | ProbeFailed:
        """The outcome of the probe: the first mapping made, or why none was
        (a :class:`ProbeFailed` too when ``timeout`` passes first)."""
        try:
            async with asyncio.timeout(timeout):
                while self._outcome is None:
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            return ProbeFailed(f"no answer from the gateway {self.gateway} in {timeout} s")
        return self._outcome

    async def close(self, timeout: float = CLOSE_TIMEOUT) -> bool:
        """Delete the mapping and stop; True when the gateway confirmed
        the delete. Idempotent."""
        client = self.client
        if client is None or self._socket is None:
            return False
        if self._closed is None:
            client.close(asyncio.get_running_loop().time())
            self._transmit()
            try:
                async with asyncio.timeout(timeout):
                    while self._closed is None:
                        self._changed.clear()
                        await self._changed.wait()
            except TimeoutError:
                logger.info("port mapping: no answer to the delete from %s", self.gateway)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._socket.close()
        self._socket = None
        return self._closed is not None and self._closed.deleted

    # -- the driver -------------------------------------------------------------------

    def _received(self, data: bytes, addr: Address) -> None:
        if self.client is not None:
            self.client.receive_datagram(data, addr, asyncio.get_running_loop().time())

    def _transmit(self) -> None:
        client, sock = self.client, self._socket
        if client is None or sock is None:
            return
        loop = asyncio.get_running_loop()
        for data, addr in client.datagrams_to_send(loop.time()):
            sock.sendto(data, addr)
        while (event := client.next_event()) is not None:
            self._handle(event)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        when = client.get_timer()
        if when is not None:
            self._timer = loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.client is not None:
            self.client.handle_timer(asyncio.get_running_loop().time())
            self._transmit()

    def _handle(self, event: PortMapEvent) -> None:
        if isinstance(event, (MappingCreated, MappingRenewed)):
            logger.info("port mapping by %s: %s:%d for %d s", event.protocol.value,
                        event.external[0], event.external[1], event.lifetime)
        elif isinstance(event, (MappingLost, ProbeFailed)):
            logger.info("port mapping on %s: %s", self.gateway, event.reason)
        if isinstance(event, (MappingCreated, ProbeFailed)) and self._outcome is None:
            self._outcome = event
        elif isinstance(event, MappingClosed):
            self._closed = event
        self._changed.set()
        if self._on_event is not None:
            self._on_event(event)


# -- nat-check ------------------------------------------------------------------------


@dataclass(frozen=True)
class ProtocolAnswer:
    """What the gateway said to one protocol's request for a mapping."""

    answered: bool
    external: Address | None = None
    lifetime: int | None = None
    reason: str | None = None
    """Why there is no mapping (no answer, a refusal), when there is none."""

    def to_json(self) -> dict[str, Any]:
        return {"answered": self.answered,
                "external": None if self.external is None else list(self.external),
                "lifetime": self.lifetime, "reason": self.reason}


@dataclass(frozen=True)
class PortMappingReport:
    """Which port-mapping protocols the gateway answers (``dtx nat-check
    --port-mapping``). ``upnp`` None: not probed; without async-upnp-client
    it is not answered, with the reason :data:`~dtx.aio.upnp.UPNP_MISSING`."""

    gateway: str | None
    pcp: ProtocolAnswer
    nat_pmp: ProtocolAnswer
    upnp: ProtocolAnswer | None = None

    @property
    def external(self) -> Address | None:
        """The mapped address of the best protocol that answered."""
        for answer in (self.pcp, self.nat_pmp, self.upnp):
            if answer is not None and answer.external is not None:
                return answer.external
        return None

    def to_json(self) -> dict[str, Any]:
        return {"gateway": self.gateway, "pcp": self.pcp.to_json(),
                "nat_pmp": self.nat_pmp.to_json(),
                "upnp": None if self.upnp is None else self.upnp.to_json(),
                "external": None if self.external is None else list(self.external)}


async def port_mapping_check(*, gateway: str | None = None, timeout: float = 5.0,
                             config: PortMapConfig | None = None,
                             upnp: UpnpConfig | None = None) -> PortMappingReport:
    """Ask ``gateway`` (default: the default route's) for a UDP mapping by
    PCP, by NAT-PMP and by UPnP IGD at once, each for a socket of its own,
    then delete them: which protocols it answers, and the public address
    each gives. Bounded by ``timeout`` (and the deletes by
    :data:`CLOSE_TIMEOUT`). UPnP's answer is "not answered" with the
    reason :data:`~dtx.aio.upnp.UPNP_MISSING` without async-upnp-client."""
    gateway = gateway or default_gateway()
    if gateway is None:
        missing = ProtocolAnswer(False, reason="no default gateway")
        return PortMappingReport(None, missing, missing, missing)
    base = config or PortMapConfig()

    async def one(protocol: MappingProtocol) -> ProtocolAnswer:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as mapped:
            mapped.bind(("0.0.0.0", 0))
            mapper = PortMapper(mapped.getsockname()[1], gateway=gateway,
                                config=dataclasses.replace(base, preference=(protocol,)))
            try:
                mapper.start()
            except (DtxError, OSError) as exc:
                return ProtocolAnswer(False, reason=str(exc))

            def answered() -> bool:
                stats = mapper.client.statistics() if mapper.client is not None else None
                return stats is not None and 0 < (
                    stats.pcp_answers if protocol is MappingProtocol.PCP
                    else stats.natpmp_answers)

            return await _outcome(mapper, timeout, answered)

    async def by_upnp() -> ProtocolAnswer:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as mapped:
            mapped.bind(("0.0.0.0", 0))
            mapper = UpnpMapper(mapped.getsockname()[1], gateway=gateway, config=upnp)
            try:
                mapper.start()
            except UpnpUnavailable:
                logger.info("port mapping: UPnP IGD not probed: %s", UPNP_MISSING)
                return ProtocolAnswer(False, reason=UPNP_MISSING)
            except DtxError as exc:
                return ProtocolAnswer(False, reason=str(exc))
            return await _outcome(mapper, timeout, lambda: mapper.location is not None)

    pcp, nat_pmp, by_igd = await asyncio.gather(one(MappingProtocol.PCP),
                                                one(MappingProtocol.NATPMP), by_upnp())
    return PortMappingReport(gateway, pcp, nat_pmp, by_igd)


async def _outcome(mapper: PortMapper | UpnpMapper, timeout: float,
                   answered: Callable[[], bool]) -> ProtocolAnswer:
    """What one started mapper got within ``timeout``, its mapping deleted
    after; ``answered``: whether the gateway spoke its protocol at all."""
    try:
        outcome = await mapper.wait(timeout)
    finally:
        await mapper.close()
    if isinstance(outcome, MappingCreated):
        return ProtocolAnswer(True, outcome.external, outcome.lifetime)
    return ProtocolAnswer(answered(), reason=outcome.reason)
