"""A port mapping on the home router by UPnP IGD, on the event loop, through
the ``async-upnp-client`` library (dtx's ``upnp`` extra).

UPnP IGD is the third port-mapping protocol, beside PCP and NAT-PMP
(:mod:`dtx.proto.portmap`), and the one most home routers speak. One
:class:`UpnpMapper` holds one UDP mapping on the gateway's Internet
Gateway Device for another socket's port (UPnP names the internal client
and port in the request, so the requests need not leave from the mapped
socket):

1. **Discover.** SSDP M-SEARCH for the IGD device types (versions 1 and
   2), sent from the device's address (the multicast interface toward the
   gateway) ``search_transmissions`` times, ``search_interval`` apart,
   answers awaited ``discovery_timeout`` in all. Only an answer from the
   gateway, whose description is on the gateway, is taken: another UPnP
   device on the LAN is not the router this device's traffic leaves by.
2. **Describe.** The gateway's device and service descriptions; the
   connection service is the first of ``UpnpConfig.services`` it offers
   (:func:`choose_service`: WANIPConnection:2, then :1, then
   WANPPPConnection:1).
3. **Map.** GetExternalIPAddress, then AddPortMapping: UDP, the internal
   client the device's address, the internal port the socket's, the
   external port the same when it is free. After a conflict, the
   service's AddAnyPortMapping (IGD 2: the gateway picks a free port)
   once where it has it, then random ports, ``external_port_tries`` in
   all (:func:`external_ports`, :func:`after_add_failure`). The lease is
   ``lease_duration``; an IGD that answers OnlyPermanentLeasesSupported
   (725) is asked once more with 0. Success gives
   :class:`~dtx.proto.portmap.MappingCreated` with ``MappingProtocol.UPNP``
   (a ``lifetime`` of 0: no expiry); failure
   :class:`~dtx.proto.portmap.ProbeFailed`.
4. **Renew** at ``renew_fraction`` of the lease (:func:`renewal_delay`),
   by GetExternalIPAddress and the same AddPortMapping (an IGD updates
   its own client's mapping): :class:`~dtx.proto.portmap.MappingRenewed`,
   whose address differs when the gateway's did. An unanswered renewal is
   tried again at the same fraction of what remains; a refused one, or no
   time left, gives :class:`~dtx.proto.portmap.MappingLost`. A permanent
   lease is not renewed, except on WANIPConnection:2, which turns 0 into
   a week (:func:`granted_lease`).
5. **Close.** DeletePortMapping (also of a port whose AddPortMapping was
   still outstanding), awaited a bounded time, then
   :class:`~dtx.proto.portmap.MappingClosed`.

Every step is bounded: each request by ``request_timeout``, the
descriptions by ``description_timeout``, the searches and the port tries
in number. Library failures become :class:`UpnpError` inside, and a
reason in the events outside; nothing the gateway says raises out of the
mapper's task.

The library is imported when a mapper starts, never when this module is:
:func:`upnp_missing` tells whether it can be, :meth:`UpnpMapper.start`
raises :class:`UpnpUnavailable` when it cannot. Its sockets (SSDP, HTTP)
are made in the calling thread's network namespace, so a mapper checks
that this namespace reaches the gateway from the device's address
(:class:`UpnpError` otherwise), and a device whose socket was made in
another namespace (the NAT lab's in-process devices) can be told by
:func:`in_this_network_namespace`.

No sans-IO core: the library does the I/O and the parsing (SSDP, XML,
SOAP) and has no sans-IO form, so what dtx adds are the choices, kept
here as pure functions (the ones above) that tests call without a router.
"""

from __future__ import annotations

import asyncio
import importlib
import ipaddress
import logging
import math
import os
import random
import socket
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum, IntEnum
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ..errors import DtxError
from ..proto.portmap import (
    MappingClosed,
    MappingCreated,
    MappingLost,
    MappingProtocol,
    MappingRenewed,
    PortMapEvent,
    ProbeFailed,
)
from ..wire.address import Address, format_address
from .netif import default_gateway, source_ip_towards

if TYPE_CHECKING:
    from async_upnp_client.client import UpnpService
    from async_upnp_client.utils import CaseInsensitiveDict

__all__ = [
    "AddRetry",
    "CLOSE_TIMEOUT",
    "UPNP_MISSING",
    "UpnpConfig",
    "UpnpError",
    "UpnpErrorCode",
    "UpnpMapper",
    "UpnpRequestFailed",
    "UpnpUnavailable",
    "after_add_failure",
    "choose_service",
    "external_ports",
    "granted_lease",
    "in_this_network_namespace",
    "renewal_delay",
    "upnp_missing",
]

logger = logging.getLogger(__name__)

UPNP_MISSING = "async-upnp-client is not installed"
"""Why UPnP IGD cannot be used when the library is missing (nat-check's reason)."""
_INSTALL_HINT = "install dtx's upnp extra: pip install 'dtx[upnp]'"
_LIBRARY_MODULES = ("async_upnp_client.aiohttp", "async_upnp_client.client_factory",
                    "async_upnp_client.exceptions", "async_upnp_client.search")

SSDP_ADDRESS: Address = ("239.255.255.250", 1900)
IGD_DEVICE_TYPES = ("urn:schemas-upnp-org:device:InternetGatewayDevice:1",
                    "urn:schemas-upnp-org:device:InternetGatewayDevice:2")
WAN_IP_CONNECTION_2 = "urn:schemas-upnp-org:service:WANIPConnection:2"
WAN_IP_CONNECTION_1 = "urn:schemas-upnp-org:service:WANIPConnection:1"
WAN_PPP_CONNECTION_1 = "urn:schemas-upnp-org:service:WANPPPConnection:1"
IGD2_MAX_LEASE = 604800
"""WANIPConnection:2's longest lease (a week), which it grants for 0."""
CLOSE_TIMEOUT = 3.0
"""How long :meth:`UpnpMapper.close` waits for the gateway's answer to the delete."""
SIOCGSKNS = 0x894C
"""Linux's ioctl giving a socket's network namespace (as a file descriptor)."""


class UpnpError(DtxError):
    """UPnP IGD could not map (no IGD, a refusal, no answer), or cannot run here."""


class UpnpUnavailable(UpnpError):
    """async-upnp-client is not installed (the ``upnp`` extra)."""


class UpnpRequestFailed(UpnpError):
    """One SOAP action failed: ``code`` is the IGD's UPnP error code when
    it refused, None when it did not answer (or the answer did not parse)."""

    def __init__(self, action: str, code: int | None, message: str) -> None:
        super().__init__(message)
        self.action = action
        self.code = code


class UpnpErrorCode(IntEnum):
    """The UPnP error codes (UDA, WANIPConnection:1 and :2) the mapper acts on or names."""

    INVALID_ARGS = 402
    ACTION_FAILED = 501
    ACTION_NOT_AUTHORIZED = 606
    NO_SUCH_ENTRY_IN_ARRAY = 714
    CONFLICT_IN_MAPPING_ENTRY = 718
    SAME_PORT_VALUES_REQUIRED = 724
    ONLY_PERMANENT_LEASES_SUPPORTED = 725
    NO_PORT_MAPS_AVAILABLE = 728
    CONFLICT_WITH_OTHER_MECHANISMS = 729


class AddRetry(Enum):
    """What to do after an AddPortMapping failed."""

    OTHER_PORT = "another external port"
    PERMANENT_LEASE = "the same port with a lease of 0"
    GIVE_UP = "give up"


_AFTER_ADD_FAILURE: dict[int, AddRetry] = {
    UpnpErrorCode.CONFLICT_IN_MAPPING_ENTRY: AddRetry.OTHER_PORT,
    UpnpErrorCode.CONFLICT_WITH_OTHER_MECHANISMS: AddRetry.OTHER_PORT,
    UpnpErrorCode.ONLY_PERMANENT_LEASES_SUPPORTED: AddRetry.PERMANENT_LEASE,
}


@dataclass(frozen=True, kw_only=True)
class UpnpConfig:
    """Times in seconds."""

    lease_duration: int = 3600
    """Lease asked for; 0 asks for a permanent mapping (which some IGDs
    require, and WANIPConnection:2 turns into a week)."""
    silent_after: float = 2.0
    """A device (``PeerConfig.port_mapping``) also tries UPnP when its
    gateway has answered neither PCP nor NAT-PMP within this long (on a
    LAN they answer in milliseconds; NAT-PMP alone would retry for two
    minutes before giving up)."""
    discovery_timeout: float = 2.5
    """How long SSDP answers are awaited, in all."""
    search_transmissions: int = 3
    """M-SEARCH requests per search target (multicast is lossy)."""
    search_interval: float = 0.75
    mx: int = 1
    """The M-SEARCH's MX: devices answer within a random 0..MX s."""
    ssdp_target: Address = SSDP_ADDRESS
    """Where M-SEARCH goes (SSDP's multicast group; a unicast address
    for a gateway on loopback in tests)."""
    search_targets: tuple[str, ...] = IGD_DEVICE_TYPES
    services: tuple[str, ...] = (WAN_IP_CONNECTION_2, WAN_IP_CONNECTION_1, WAN_PPP_CONNECTION_1)
    """Connection services to map with, best first."""
    description_timeout: float = 3.0
    """Bound on fetching the device's and its services' descriptions."""
    request_timeout: float = 2.0
    """Bound on each SOAP action."""
    external_port_tries: int = 4
    """External ports asked for at most (the internal port first)."""
    min_external_port: int = 1024
    renew_fraction: float = 0.5
    """Renew when this fraction of the lease has passed; an unanswered
    renewal is tried again at this fraction of what remains."""
    min_renew_interval: float = 1.0
    """No renewal closer than this to the previous try (then the lease is
    left to run out)."""
    description: str = "dtx"
    """NewPortMappingDescription, what the router's status page shows."""

    def __post_init__(self) -> None:
        if not 0 <= self.lease_duration <= 0xFFFFFFFF:
            raise ValueError("UpnpConfig: lease_duration must be 0..2**32-1 seconds")
        if self.discovery_timeout <= 0 or self.search_interval <= 0 \
                or self.description_timeout <= 0 or self.request_timeout <= 0:
            raise ValueError("UpnpConfig: timeouts and intervals must be positive")
        if not 1 <= self.search_transmissions <= 10 or not 1 <= self.mx <= 5:
            raise ValueError("UpnpConfig: 1..10 searches, MX 1..5")
        if not self.search_targets or not self.services:
            raise ValueError("UpnpConfig: at least one search target and one service")
        if not 1 <= self.min_external_port <= 0xFFFF \
                or not 1 <= self.external_port_tries <= 0x10000 - self.min_external_port:
            raise ValueError("UpnpConfig: external ports out of range")
        if not 0 < self.renew_fraction < 1 or self.min_renew_interval < 0:
            raise ValueError("UpnpConfig: renew_fraction in (0, 1), min_renew_interval >= 0")


# -- pure choices ---------------------------------------------------------------------


def choose_service(offered: Iterable[str], preference: Sequence[str]) -> str | None:
    """The first service type of ``preference`` among ``offered``, or None."""
    have = set(offered)
    return next((s for s in preference if s in have), None)


def external_ports(internal_port: int, tries: int, rng: random.Random, *,
                   low: int = 1024) -> list[int]:
    """The external ports to ask for, in order: the internal port (when it
    is at least ``low``), then distinct random ones in ``low``..65535;
    ``tries`` of them at most."""
    ports = [internal_port] if low <= internal_port <= 0xFFFF else []
    span = range(low, 0x10000)
    for port in rng.sample(span, min(tries, len(span))):
        if len(ports) >= tries:
            break
        if port not in ports:
            ports.append(port)
    return ports[:tries]


def after_add_failure(code: int | None) -> AddRetry:
    """What an AddPortMapping refused with ``code`` calls for (None: no
    answer, which is not retried: the next try would wait as long)."""
    return AddRetry.GIVE_UP if code is None else _AFTER_ADD_FAILURE.get(code, AddRetry.GIVE_UP)


def granted_lease(service_type: str, asked: int) -> int:
    """The lease an IGD grants when asked for ``asked`` seconds (0: none
    expires): WANIPConnection:2 grants at most a week, and a week for 0."""
    if service_type == WAN_IP_CONNECTION_2 and (asked == 0 or asked > IGD2_MAX_LEASE):
        return IGD2_MAX_LEASE
    return asked


def renewal_delay(remaining: float, *, fraction: float, min_interval: float) -> float | None:
    """How long to wait before renewing a lease with ``remaining`` seconds
    left: ``fraction`` of it, or None when that is below ``min_interval``
    (let it run out). Starting from the whole lease and halving what is
    left after each unanswered try, the tries are bounded in number."""
    delay = remaining * fraction
    return delay if delay >= min_interval else None


# -- the library, and where its sockets are ----------------------------------------------


def _import_library() -> None:
    try:
        for name in _LIBRARY_MODULES:
            importlib.import_module(name)
    except ImportError as exc:
        raise UpnpUnavailable(f"UPnP IGD: {UPNP_MISSING} ({_INSTALL_HINT})") from exc


def upnp_missing() -> str | None:
    """:data:`UPNP_MISSING` when async-upnp-client cannot be imported,
    else None."""
    try:
        _import_library()
    except UpnpUnavailable:
        return UPNP_MISSING
    return None


def in_this_network_namespace(sock: socket.socket) -> bool | None:
    """Whether ``sock`` was made in the calling thread's network namespace,
    where a mapper's sockets are made; None when this cannot be told (not
    Linux, an old kernel, no CAP_NET_ADMIN)."""
    try:
        import fcntl

        ns_fd = fcntl.ioctl(sock.fileno(), SIOCGSKNS)
    except (ImportError, OSError):
        return None
    try:
        theirs = os.fstat(ns_fd)
    finally:
        os.close(ns_fd)
    try:
        ours = os.stat("/proc/thread-self/ns/net")
    except OSError:
        return None
    return (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino)


# -- the mapper ------------------------------------------------------------------------------


class UpnpMapper:
    """One UDP port mapping for ``internal_port`` on the IGD of ``gateway``
    (default: the default route's gateway) for ``client_ip`` (default: the
    address this host reaches the gateway from). ``on_event`` sees each
    :mod:`~dtx.proto.portmap` event as it comes (module docs).

    ::

        async with UpnpMapper(peer_port) as mapper:
            event = await mapper.wait(timeout=5)   # MappingCreated or ProbeFailed
            print(mapper.external)                 # the public (ip, port), or None
    """

    def __init__(self, internal_port: int, *, gateway: str | None = None,
                 client_ip: str | None = None, config: UpnpConfig | None = None,
                 rng: random.Random | None = None,
                 on_event: Callable[[PortMapEvent], None] | None = None) -> None:
        if not 0 < internal_port <= 0xFFFF:
            raise UpnpError(f"internal port {internal_port} out of range")
        self.internal_port = internal_port
        self.gateway = gateway
        self.client_ip = client_ip
        self.config = config or UpnpConfig()
        self._rng = rng or random.Random(random.SystemRandom().getrandbits(64))
        self._on_event = on_event
        self.location: str | None = None
        """The IGD's description URL, once a search found it."""
        self.service_type: str | None = None
        """The connection service mapped with."""
        self.external: Address | None = None
        """The mapped public address while the gateway holds the mapping."""
        self.lifetime: int | None = None
        """The lease of the mapping held (0: no expiry)."""
        self._service: UpnpService | None = None
        self._mapped_port: int | None = None
        self._pending_port: int | None = None
        """The external port of an AddPortMapping still outstanding."""
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self._outcome: MappingCreated | ProbeFailed | None = None
        self._closed: MappingClosed | None = None

    async def __aenter__(self) -> UpnpMapper:
        self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    @property
    def done(self) -> bool:
        """True once the probe ended (a mapping, or why none)."""
        return self._outcome is not None

    def start(self) -> None:
        """Discover the IGD and map, in a task. Raises
        :class:`UpnpUnavailable` without the library, :class:`UpnpError`
        with no gateway to ask or when this network namespace reaches it
        from another address than ``client_ip``."""
        if self._task is not None:
            raise UpnpError("UpnpMapper.start() called twice")
        _import_library()
        gateway = self.gateway or default_gateway()
        if gateway is None:
            raise UpnpError("no default gateway to ask for a UPnP port mapping")
        try:
            ipaddress.IPv4Address(gateway)
        except ValueError:
            raise UpnpError(f"UPnP IGD maps IPv4 only, not for the gateway {gateway}") from None
        routed = source_ip_towards((gateway, SSDP_ADDRESS[1]), socket.AF_INET)
        if routed is None:
            raise UpnpError(f"no route to the gateway {gateway}")
        client_ip = self.client_ip or routed
        if client_ip != routed:
            raise UpnpError(f"this network namespace reaches the gateway {gateway} from "
                            f"{routed}, not {client_ip}: UPnP would search another LAN")
        self.gateway, self.client_ip = gateway, client_ip
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"upnp {client_ip}:{self.internal_port}")

    async def wait(self, timeout: float) -> MappingCreated | ProbeFailed:
        """The outcome of the probe: the mapping made, or why none was (a
        :class:`ProbeFailed` too when ``timeout`` passes first)."""
        if self._task is None:
            return ProbeFailed("upnp: not started")
        try:
            async with asyncio.timeout(timeout):
                while self._outcome is None and self._closed is None:
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            return ProbeFailed(f"upnp: no mapping from {self.gateway} within {timeout:g} s")
        return self._outcome or ProbeFailed("upnp: closed before a mapping was made")

    async def close(self, timeout: float = CLOSE_TIMEOUT) -> bool:
        """Stop, and delete the mapping (waiting at most ``timeout``); True
        when the gateway confirmed the delete. Idempotent."""
        if self._closed is not None:
            return self._closed.deleted
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=timeout)
        port = self._mapped_port if self._mapped_port is not None else self._pending_port
        deleted = False
        if port is not None and self._service is not None:
            try:
                await self._call(self._service, "DeletePortMapping",
                                 timeout=max(0.0, deadline - loop.time()),
                                 NewRemoteHost="", NewExternalPort=port, NewProtocol="UDP")
                deleted = True
                logger.info("UPnP: deleted the mapping of external port %d on %s", port,
                            self.gateway)
            except UpnpError as exc:
                logger.info("UPnP: delete of external port %d on %s: %s", port, self.gateway,
                            exc)
        self._mapped_port = self._pending_port = None
        self.external = self.lifetime = None
        self._emit(MappingClosed(deleted=deleted))
        return deleted

    # -- the task ---------------------------------------------------------------------

    def _emit(self, event: PortMapEvent) -> None:
        if isinstance(event, (MappingCreated, ProbeFailed)) and self._outcome is None:
            self._outcome = event
        elif isinstance(event, MappingClosed):
            self._closed = event
        self._changed.set()
        if self._on_event is not None:
            self._on_event(event)

    async def _run(self) -> None:
        try:
            service, asked = await self._map()
        except UpnpError as exc:
            logger.info("UPnP: no port mapping from %s: %s", self.gateway, exc)
            self._emit(ProbeFailed(f"upnp: {exc}"))
            return
        except Exception as exc:  # the library's own failure: no mapping all the same
            logger.warning("UPnP: no port mapping from %s: %s: %s", self.gateway,
                           type(exc).__name__, exc)
            self._emit(ProbeFailed(f"upnp: {type(exc).__name__}: {exc}"))
            return
        assert self.external is not None and self.lifetime is not None
        logger.info("UPnP: %s mapped to %s:%d for %s (%s)", format_address(*self.external),
                    self.client_ip, self.internal_port,
                    f"{self.lifetime} s" if self.lifetime else "no expiry", self.service_type)
        self._emit(MappingCreated(MappingProtocol.UPNP, self.external, self.lifetime))
        try:
            await self._renew(service, asked)
        except Exception as exc:  # as above: the mapping is then given up
            logger.warning("UPnP: renewal stopped: %s: %s", type(exc).__name__, exc)
            self._lose(f"renewal failed: {type(exc).__name__}: {exc}")

    async def _map(self) -> tuple[UpnpService, int]:
        """Discover, describe, map; the service and the lease asked for."""
        location = await self._discover()
        self.location = location
        service = await self._describe(location)
        self._service = service
        self.service_type = service.service_type
        external_ip = await self._external_ip(service)
        port, asked = await self._add(service)
        self._mapped_port, self._pending_port = port, None
        self.external = (external_ip, port)
        self.lifetime = granted_lease(service.service_type, asked)
        return service, asked

    async def _discover(self) -> str:
        """The description URL of the gateway's IGD (module docs, step 1)."""
        from async_upnp_client.exceptions import UpnpError as LibraryError
        from async_upnp_client.search import SsdpSearchListener

        cfg = self.config
        loop = asyncio.get_running_loop()
        gateway, client_ip = self.gateway, self.client_ip
        assert gateway is not None and client_ip is not None
        found: asyncio.Future[str] = loop.create_future()

        def on_answer(headers: CaseInsensitiveDict) -> None:
            host = headers.get_lower("_host")
            location = str(headers.get_lower("location") or "")
            if found.done():
                return
            if host != gateway:
                logger.debug("UPnP: ignored an SSDP answer from %s (the gateway is %s)",
                             host, gateway)
                return
            try:
                parts = urlsplit(location)
                on_gateway = parts.scheme == "http" and parts.hostname == gateway
            except ValueError:
                on_gateway = False
            if not on_gateway:
                logger.info("UPnP: ignored the gateway's SSDP answer: its location %r is "
                            "not an http URL on the gateway", location)
                return
            logger.debug("UPnP: %s answered %s at %s", host, headers.get_lower("st"), location)
            found.set_result(location)

        listeners = [SsdpSearchListener(callback=on_answer, loop=loop, source=(client_ip, 0),
                                        target=cfg.ssdp_target, timeout=cfg.mx,
                                        search_target=target)
                     for target in cfg.search_targets]
        started: list[SsdpSearchListener] = []
        deadline = loop.time() + cfg.discovery_timeout
        try:
            for listener in listeners:
                await listener.async_start()
                started.append(listener)
            for sent in range(1, cfg.search_transmissions + 1):
                for listener in started:
                    listener.async_search()
                logger.debug("UPnP: M-SEARCH #%d from %s to %s", sent, client_ip,
                             format_address(*cfg.ssdp_target))
                until = deadline if sent == cfg.search_transmissions \
                    else min(deadline, loop.time() + cfg.search_interval)
                try:
                    async with asyncio.timeout_at(until):
                        return await asyncio.shield(found)
                except TimeoutError:
                    if loop.time() >= deadline:
                        break
        except (LibraryError, OSError) as exc:
            raise UpnpError(f"SSDP search from {client_ip} failed: {exc}") from None
        finally:
            for listener in started:
                listener.async_stop()
        raise UpnpError(f"no UPnP IGD answered from {gateway} within "
                        f"{cfg.discovery_timeout:g} s")

    async def _describe(self, location: str) -> UpnpService:
        """The connection service to map with (module docs, step 2)."""
        from async_upnp_client.aiohttp import AiohttpRequester
        from async_upnp_client.client_factory import UpnpFactory
        from async_upnp_client.exceptions import UpnpError as LibraryError

        cfg = self.config
        requester = AiohttpRequester(timeout=max(1, math.ceil(cfg.request_timeout)))
        factory = UpnpFactory(requester, non_strict=True)
        try:
            async with asyncio.timeout(cfg.description_timeout):
                device = await factory.async_create_device(location)
        except TimeoutError:
            raise UpnpError(f"no description from {location} within "
                            f"{cfg.description_timeout:g} s") from None
        except (LibraryError, OSError, ValueError, SyntaxError) as exc:
            raise UpnpError(f"unusable description at {location}: {exc}") from None
        offered = [s.service_type for s in device.all_services]
        chosen = choose_service(offered, cfg.services)
        service = None if chosen is None else device.find_service(chosen)
        if service is None:
            raise UpnpError(f"the IGD at {location} offers no connection service "
                            f"({', '.join(offered) or 'none'})")
        if urlsplit(service.control_url).hostname != self.gateway:
            raise UpnpError(f"the IGD's control URL {service.control_url} is not on the "
                            f"gateway {self.gateway}")
        logger.info("UPnP: IGD %r at %s, mapping with %s", device.friendly_name, location,
                    chosen)
        return service

    async def _external_ip(self, service: UpnpService) -> str:
        result = await self._call(service, "GetExternalIPAddress")
        text = str(result.get("NewExternalIPAddress") or "").strip()
        if not text:
            raise UpnpError("the gateway reports no external address (as a router does "
                            "whose WAN address is private: another NAT beyond it)")
        try:
            ip = ipaddress.IPv4Address(text)
        except ValueError:
            raise UpnpError(f"the gateway gave no usable external address ({text!r})") from None
        if ip.is_unspecified:
            raise UpnpError("the gateway has no external address (0.0.0.0)")
        if not ip.is_global:
            logger.info("UPnP: the gateway's external address %s is not public (a NAT "
                        "beyond it?)", ip)
        return str(ip)

    def _add_args(self, port: int, lease: int) -> dict[str, Any]:
        return {"NewRemoteHost": "", "NewExternalPort": port, "NewProtocol": "UDP",
                "NewInternalPort": self.internal_port, "NewInternalClient": self.client_ip,
                "NewEnabled": True, "NewPortMappingDescription": self.config.description,
                "NewLeaseDuration": lease}

    async def _add(self, service: UpnpService) -> tuple[int, int]:
        """AddPortMapping until a port is granted (module docs, step 3);
        the external port and the lease asked for."""
        cfg = self.config
        ports = external_ports(self.internal_port, cfg.external_port_tries, self._rng,
                               low=cfg.min_external_port)
        lease = cfg.lease_duration
        asked_any = not service.has_action("AddAnyPortMapping")
        permanent_asked = lease == 0
        refusals: list[str] = []
        index = 0
        # each pass either returns, raises, or moves on: a port, the one
        # AddAnyPortMapping, the one retry with a lease of 0
        for _ in range(len(ports) + 2):
            if index >= len(ports):
                break
            port = ports[index]
            self._pending_port = port  # left set if cancelled now: close() deletes it
            try:
                await self._call(service, "AddPortMapping", **self._add_args(port, lease))
            except UpnpRequestFailed as exc:
                self._pending_port = None
                step = after_add_failure(exc.code)
                if step is AddRetry.PERMANENT_LEASE and not permanent_asked:
                    permanent_asked = True
                    lease = 0
                    logger.info("UPnP: the IGD takes permanent leases only; asking for one")
                    continue
                if step is not AddRetry.OTHER_PORT:
                    raise
                refusals.append(f"{port}: {exc.code}")
                logger.info("UPnP: external port %d is taken (%s)", port, exc)
            else:
                return port, lease
            if not asked_any:
                asked_any = True
                try:
                    result = await self._call(service, "AddAnyPortMapping",
                                              **self._add_args(port, lease))
                    reserved = int(result.get("NewReservedPort") or 0)
                except UpnpRequestFailed as exc:
                    logger.info("UPnP: AddAnyPortMapping: %s", exc)
                except ValueError:
                    logger.info("UPnP: AddAnyPortMapping answered no usable port")
                else:
                    if 0 < reserved <= 0xFFFF:
                        return reserved, lease
            index += 1
        raise UpnpError(f"no external port granted (tried {', '.join(refusals) or 'none'})")

    async def _renew(self, service: UpnpService, asked: int) -> None:
        """Renew until the mapping is lost or the task cancelled (step 4)."""
        cfg = self.config
        loop = asyncio.get_running_loop()
        lease = self.lifetime or 0
        port = self._mapped_port
        if not lease or port is None:
            return  # no expiry: nothing to renew
        expires = loop.time() + lease
        while True:
            delay = renewal_delay(expires - loop.time(), fraction=cfg.renew_fraction,
                                  min_interval=cfg.min_renew_interval)
            if delay is None:
                self._lose("the lease ran out without a renewal")
                return
            await asyncio.sleep(delay)
            try:
                external_ip = await self._external_ip(service)
                await self._call(service, "AddPortMapping", **self._add_args(port, asked))
            except UpnpRequestFailed as exc:
                if exc.code is not None:
                    self._lose(f"renewal refused: {exc}")
                    return
                logger.info("UPnP: renewal unanswered (%s); trying again", exc)
                continue
            except UpnpError as exc:
                logger.info("UPnP: renewal: %s; trying again", exc)
                continue
            expires = loop.time() + lease
            external = (external_ip, port)
            if external != self.external:
                logger.info("UPnP: the mapping is now %s", format_address(*external))
            self.external = external
            self._emit(MappingRenewed(MappingProtocol.UPNP, external, lease))

    def _lose(self, reason: str) -> None:
        external = self.external
        logger.info("UPnP: lost %s (%s)", "the mapping" if external is None
                    else format_address(*external), reason)
        self.external = self.lifetime = None
        self._mapped_port = None
        self._emit(MappingLost(MappingProtocol.UPNP, external, reason))

    async def _call(self, service: UpnpService, action: str, *, timeout: float | None = None,
                    **args: Any) -> Mapping[str, Any]:
        """One SOAP action, bounded; failures as :class:`UpnpRequestFailed`."""
        from async_upnp_client.exceptions import UpnpActionError
        from async_upnp_client.exceptions import UpnpError as LibraryError

        wait = self.config.request_timeout if timeout is None else timeout
        if not service.has_action(action):
            raise UpnpRequestFailed(action, None, f"the IGD's service has no {action}")
        logger.debug("UPnP: %s %s", action, args)
        try:
            async with asyncio.timeout(wait):
                result: Mapping[str, Any] = await service.action(action).async_call(
                    request_timeout=wait, **args)
        except TimeoutError:
            raise UpnpRequestFailed(action, None,
                                    f"no answer to {action} within {wait:g} s") from None
        except UpnpActionError as exc:
            name = _code_name(exc.error_code)
            raise UpnpRequestFailed(action, exc.error_code,
                                    f"{action} refused: UPnP error {exc.error_code}{name}"
                                    + (f" ({exc.error_desc})" if exc.error_desc else "")
                                    ) from None
        except (LibraryError, OSError, ValueError) as exc:
            raise UpnpRequestFailed(action, None, f"{action} failed: {exc}") from None
        return result


def _code_name(code: int | None) -> str:
    try:
        return "" if code is None else f" {UpnpErrorCode(code).name}"
    except ValueError:
        return ""
