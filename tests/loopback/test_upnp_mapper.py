"""UPnP IGD port mapping (``dtx.aio.upnp``) against a fake IGD on loopback
(``tests/loopback/igd.py``): the library's SSDP search (sent unicast to
the fake's port) and SOAP calls, the mapper's choices around them, its
events, renewal and delete; ``port_mapping_check``'s UPnP answer; a
:class:`~dtx.aio.peer.Peer` trying UPnP when PCP and NAT-PMP give up.
Without async-upnp-client: what is reported instead."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import socket
import sys
from collections.abc import Callable, Iterator

import pytest

from dtx.aio.portmap import port_mapping_check
from dtx.aio.peer import Peer, PeerConfig
from dtx.aio.upnp import (UPNP_MISSING, UpnpConfig, UpnpError, UpnpMapper, UpnpUnavailable,
                          in_this_network_namespace, upnp_missing)
from dtx.identity import generate_identity
from dtx.proto.portmap import (MappingClosed, MappingCreated, MappingLost, MappingProtocol,
                               MappingRenewed, PortMapConfig, PortMapEvent, ProbeFailed)

if upnp_missing() is None:
    from tests.loopback.igd import (WAN_IP_CONNECTION_1, WAN_IP_CONNECTION_2,
                                    WAN_PPP_CONNECTION_1, fake_igd)

needs_library = pytest.mark.skipif(upnp_missing() is not None,
                                   reason="needs async-upnp-client (dtx's upnp extra)")
LOOPBACK = "127.0.0.1"


def config(igd_ssdp: tuple[str, int], **kw: object) -> UpnpConfig:
    base: dict[str, object] = {"ssdp_target": igd_ssdp, "discovery_timeout": 1.0,
                               "search_interval": 0.3, "request_timeout": 1.0}
    return UpnpConfig(**{**base, **kw})  # type: ignore[arg-type]


def internal_port() -> int:
    """A port in the mappable range (the mapper asks for it as the external one)."""
    return random.Random().randint(20000, 30000)


@pytest.fixture
def hide_library(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """async-upnp-client as if not installed (every module of it unimportable)."""
    for name in [m for m in sys.modules if m.split(".")[0] == "async_upnp_client"]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "async_upnp_client", None)
    yield


# -- without the library ---------------------------------------------------------------


async def test_without_the_library_start_raises_and_nat_check_says_so(
        hide_library: None) -> None:
    mapper = UpnpMapper(internal_port(), gateway=LOOPBACK)
    with pytest.raises(UpnpUnavailable, match="async-upnp-client is not installed"):
        mapper.start()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind((LOOPBACK, 0))
        quick = PortMapConfig(gateway_port=silent.getsockname()[1], natpmp_max_transmissions=1,
                              pcp_initial_rto=0.1, pcp_max_transmissions=1)
        report = await port_mapping_check(gateway=LOOPBACK, timeout=3, config=quick)
    assert report.upnp is not None
    assert report.upnp.to_json() == {"answered": False, "external": None, "lifetime": None,
                                     "reason": UPNP_MISSING}


# -- with the library: a fake IGD --------------------------------------------------------


async def wait_for(predicate: Callable[[], bool], timeout: float) -> None:
    """Until ``predicate()`` holds, checked every 20 ms, at most ``timeout``."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)


@needs_library
async def test_maps_with_the_preferred_service_and_deletes_on_close() -> None:
    async with fake_igd(services=[WAN_PPP_CONNECTION_1, WAN_IP_CONNECTION_1]) as igd:
        port = internal_port()
        events: list[PortMapEvent] = []
        mapper = UpnpMapper(port, gateway=LOOPBACK, config=config(igd.ssdp), on_event=events.append)
        mapper.start()
        outcome = await mapper.wait(timeout=5)
        assert outcome == MappingCreated(MappingProtocol.UPNP, ("1.2.3.4", port), 3600)
        assert mapper.external == ("1.2.3.4", port)
        assert mapper.service_type == WAN_IP_CONNECTION_1
        add, = igd.actions("AddPortMapping")
        assert add == {"NewRemoteHost": "", "NewExternalPort": str(port), "NewProtocol": "UDP",
                       "NewInternalPort": str(port), "NewInternalClient": LOOPBACK,
                       "NewEnabled": "1", "NewPortMappingDescription": "dtx",
                       "NewLeaseDuration": "3600"}
        assert igd.mappings == {port: (LOOPBACK, port, 3600)}
        assert await mapper.close() is True
        assert igd.mappings == {}
        assert events[-1] == MappingClosed(deleted=True)
        assert mapper.external is None
        assert await mapper.close() is True  # idempotent


@needs_library
async def test_a_taken_port_gets_another_and_the_tries_are_bounded() -> None:
    port = internal_port()
    async with fake_igd(taken={port}) as igd:
        async with UpnpMapper(port, gateway=LOOPBACK, config=config(igd.ssdp)) as mapper:
            outcome = await mapper.wait(timeout=5)
            assert isinstance(outcome, MappingCreated), outcome
            tried = [int(a["NewExternalPort"]) for a in igd.actions("AddPortMapping")]
            assert tried[0] == port and len(tried) == 2
            assert outcome.external == ("1.2.3.4", tried[1])
            assert igd.mappings == {tried[1]: (LOOPBACK, port, 3600)}

    async with fake_igd(taken=set(range(1024, 65536))) as igd:
        async with UpnpMapper(port, gateway=LOOPBACK,
                              config=config(igd.ssdp, external_port_tries=3)) as mapper:
            outcome = await mapper.wait(timeout=5)
            assert isinstance(outcome, ProbeFailed), outcome
            assert outcome.reason.startswith("upnp: no external port granted")
            assert len(igd.actions("AddPortMapping")) == 3
            assert igd.actions("DeletePortMapping") == []


@needs_library
async def test_igd2_gives_a_free_port_by_add_any_port_mapping() -> None:
    port = internal_port()
    async with fake_igd(services=[WAN_IP_CONNECTION_1, WAN_IP_CONNECTION_2], taken={port},
                        reserved_port=40404) as igd:
        async with UpnpMapper(port, gateway=LOOPBACK,
                              config=config(igd.ssdp, lease_duration=0)) as mapper:
            outcome = await mapper.wait(timeout=5)
            assert mapper.service_type == WAN_IP_CONNECTION_2
            # version 2 grants a week for "permanent"
            assert outcome == MappingCreated(MappingProtocol.UPNP, ("1.2.3.4", 40404), 604800)
            assert len(igd.actions("AddAnyPortMapping")) == 1
        assert igd.actions("DeletePortMapping")[-1]["NewExternalPort"] == "40404"


@needs_library
async def test_an_igd_of_permanent_leases_only_is_asked_again_with_0() -> None:
    port = internal_port()
    async with fake_igd(permanent_only=True) as igd:
        async with UpnpMapper(port, gateway=LOOPBACK, config=config(igd.ssdp)) as mapper:
            outcome = await mapper.wait(timeout=5)
            assert outcome == MappingCreated(MappingProtocol.UPNP, ("1.2.3.4", port), 0)
            leases = [a["NewLeaseDuration"] for a in igd.actions("AddPortMapping")]
            assert leases == ["3600", "0"]


@needs_library
async def test_renewal_at_half_the_lease_follows_a_new_external_address() -> None:
    port = internal_port()
    events: list[PortMapEvent] = []
    async with fake_igd() as igd:
        cfg = config(igd.ssdp, lease_duration=2, min_renew_interval=0.1)
        async with UpnpMapper(port, gateway=LOOPBACK, config=cfg, on_event=events.append) as mapper:
            assert isinstance(await mapper.wait(timeout=5), MappingCreated)
            igd.external_ip = "1.2.3.5"
            loop = asyncio.get_running_loop()
            created = loop.time()
            await wait_for(lambda: any(isinstance(e, MappingRenewed) for e in events), 3)
            assert 0.8 < loop.time() - created < 1.8   # at about 1 s of 2
            renewed = next(e for e in events if isinstance(e, MappingRenewed))
            assert renewed == MappingRenewed(MappingProtocol.UPNP, ("1.2.3.5", port), 2)
            assert mapper.external == ("1.2.3.5", port)
            assert len(igd.actions("AddPortMapping")) == 2


@needs_library
async def test_a_refused_renewal_loses_the_mapping() -> None:
    port = internal_port()
    events: list[PortMapEvent] = []
    async with fake_igd() as igd:
        cfg = config(igd.ssdp, lease_duration=1, min_renew_interval=0.1)
        async with UpnpMapper(port, gateway=LOOPBACK, config=cfg, on_event=events.append) as mapper:
            assert isinstance(await mapper.wait(timeout=5), MappingCreated)
            igd.refuse_renewals = True
            await wait_for(lambda: any(isinstance(e, MappingLost) for e in events), 3)
            lost = next(e for e in events if isinstance(e, MappingLost))
            assert lost.protocol is MappingProtocol.UPNP and lost.external == ("1.2.3.4", port)
            assert "501" in lost.reason
            assert mapper.external is None
        # lost: not ours to delete
        assert igd.actions("DeletePortMapping") == []


@needs_library
async def test_no_igd_gives_probe_failed_in_bounded_time() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind((LOOPBACK, 0))
        loop = asyncio.get_running_loop()
        start = loop.time()
        cfg = config(silent.getsockname(), discovery_timeout=0.6, search_interval=0.2)
        async with UpnpMapper(internal_port(), gateway=LOOPBACK, config=cfg) as mapper:
            outcome = await mapper.wait(timeout=5)
        assert isinstance(outcome, ProbeFailed)
        assert "no UPnP IGD answered" in outcome.reason
        assert loop.time() - start < 1.5
        # three searches for each of the two device types, no more
        count = 0
        silent.setblocking(False)
        while True:
            try:
                silent.recv(2048)
            except BlockingIOError:
                break
            count += 1
        assert count == 6


@needs_library
async def test_a_description_off_the_gateway_is_not_taken() -> None:
    async with fake_igd(location_host="127.0.0.2") as igd:
        async with UpnpMapper(internal_port(), gateway=LOOPBACK,
                              config=config(igd.ssdp, discovery_timeout=0.5)) as mapper:
            outcome = await mapper.wait(timeout=5)
        assert isinstance(outcome, ProbeFailed), outcome
        assert igd.searches > 0 and igd.calls == []


@needs_library
async def test_close_while_probing_ends_the_wait() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind((LOOPBACK, 0))
        mapper = UpnpMapper(internal_port(), gateway=LOOPBACK,
                            config=config(silent.getsockname(), discovery_timeout=5))
        mapper.start()
        waiter = asyncio.create_task(mapper.wait(timeout=10))
        await asyncio.sleep(0.1)
        assert await mapper.close() is False
        outcome = await asyncio.wait_for(waiter, 1)
        assert isinstance(outcome, ProbeFailed) and "closed" in outcome.reason


@needs_library
async def test_the_gateway_must_be_reached_from_the_client_address() -> None:
    mapper = UpnpMapper(internal_port(), gateway=LOOPBACK, client_ip="192.0.2.77")
    with pytest.raises(UpnpError, match="reaches the gateway 127.0.0.1 from 127.0.0.1"):
        mapper.start()


@needs_library
async def test_nat_check_reports_upnp_and_deletes_its_mapping() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind((LOOPBACK, 0))
        quick = PortMapConfig(gateway_port=silent.getsockname()[1], natpmp_max_transmissions=1,
                              pcp_initial_rto=0.1, pcp_max_transmissions=1)
        async with fake_igd() as igd:
            report = await port_mapping_check(gateway=LOOPBACK, timeout=3, config=quick,
                                              upnp=config(igd.ssdp))
            assert igd.mappings == {}
    assert report.upnp is not None and report.upnp.answered
    assert report.upnp.external is not None and report.upnp.external[0] == "1.2.3.4"
    assert report.external == report.upnp.external   # PCP and NAT-PMP did not answer
    doc = report.to_json()
    assert doc["upnp"] == {"answered": True, "external": list(report.upnp.external),
                           "lifetime": 3600, "reason": None}
    assert not doc["pcp"]["answered"] and not doc["nat_pmp"]["answered"]


class TrustAll:
    def verify(self, jid: str, key: bytes) -> None:
        return None


@needs_library
async def test_a_peer_tries_upnp_when_pcp_and_nat_pmp_give_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind((LOOPBACK, 0))
        quick = PortMapConfig(gateway_port=silent.getsockname()[1], natpmp_max_transmissions=1,
                              pcp_initial_rto=0.1, pcp_max_transmissions=1)
        async with fake_igd() as igd:
            cfg = PeerConfig(port_mapping=True, gateway=LOOPBACK, port_mapping_config=quick,
                             upnp_config=config(igd.ssdp))
            peer = Peer(generate_identity("tv@example.org/den"), TrustAll(), config=cfg)
            await peer.start(LOOPBACK, 0)
            port = peer.address[1]
            try:
                mapped = await peer.wait_port_mapped(5)
                assert mapped == ("1.2.3.4", port)
                assert peer.port_mapped == mapped
                assert igd.mappings == {port: (LOOPBACK, port, 3600)}
            finally:
                await peer.close()
            assert igd.mappings == {}
            assert igd.actions("DeletePortMapping")[-1]["NewExternalPort"] == str(port)


@needs_library
async def test_a_peer_tries_upnp_beside_a_silent_pcp_and_nat_pmp() -> None:
    """A gateway that answers neither: UPnP after ``silent_after``, long
    before NAT-PMP's own retries (here nine, over two minutes) give up."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind((LOOPBACK, 0))
        slow = PortMapConfig(gateway_port=silent.getsockname()[1])  # the RFC schedules
        async with fake_igd() as igd:
            cfg = PeerConfig(port_mapping=True, gateway=LOOPBACK, port_mapping_config=slow,
                             upnp_config=dataclasses.replace(config(igd.ssdp),
                                                             silent_after=0.5))
            peer = Peer(generate_identity("tv@example.org/den"), TrustAll(), config=cfg)
            await peer.start(LOOPBACK, 0)
            port = peer.address[1]
            try:
                mapped = await peer.wait_port_mapped(5)
                assert mapped == ("1.2.3.4", port)
                portmap = peer._started().portmap
                assert portmap is not None  # still probing, unanswered
                assert portmap.statistics().natpmp_answers == 0
            finally:
                await peer.close()
            assert igd.mappings == {}


def test_a_socket_made_here_is_in_this_network_namespace() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        assert in_this_network_namespace(sock) in (True, None)   # None: not permitted to ask
