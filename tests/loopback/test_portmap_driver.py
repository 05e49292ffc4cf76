"""The port-mapping driver (``dtx.aio.portmap``) on real UDP sockets, with
a NAT-PMP-only gateway on loopback: the driver's socket, timer and events
around the production client. (What a real router says: the NAT lab's
miniupnpd, ``tests/netns/test_port_mapping_lab.py``.)"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from dtx.aio.portmap import PortMapper, port_mapping_check
from dtx.aio.upnp import UpnpConfig
from dtx.proto.portmap import MappingCreated, MappingProtocol, PortMapConfig, ProbeFailed
from dtx.wire.natpmp import (
    ExternalAddressRequest,
    ExternalAddressResponse,
    MapRequest,
    MapResponse,
    NatPmpError,
    NatPmpResult,
    UnsupportedVersionResponse,
    decode_natpmp_request,
    encode_natpmp,
)

PUBLIC = ipaddress.IPv4Address("203.0.113.7")
EXTERNAL_PORT = 41000


@dataclass(eq=False)
class NatPmpGateway(asyncio.DatagramProtocol):
    """Answers NAT-PMP as RFC 6886 says, and PCP (version 2) with NAT-PMP's
    Unsupported Version, as a NAT-PMP-only router does."""

    requests: list[object] = field(default_factory=list)
    transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        if data[:1] != b"\x00":
            self.requests.append("pcp")
            self.transport.sendto(encode_natpmp(UnsupportedVersionResponse(epoch=100)), addr)
            return
        try:
            req = decode_natpmp_request(data)
        except NatPmpError:
            return
        self.requests.append(req)
        if isinstance(req, ExternalAddressRequest):
            answer: object = ExternalAddressResponse(NatPmpResult.SUCCESS, 100, PUBLIC)
        else:
            assert isinstance(req, MapRequest)
            answer = MapResponse(req.opcode, NatPmpResult.SUCCESS, 100, req.internal_port,
                                 0 if req.is_delete else EXTERNAL_PORT, req.lifetime)
        self.transport.sendto(encode_natpmp(answer), addr)  # type: ignore[arg-type]

    @property
    def port(self) -> int:
        assert self.transport is not None
        return int(self.transport.get_extra_info("sockname")[1])


@pytest.fixture
async def gateway() -> AsyncIterator[NatPmpGateway]:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(NatPmpGateway,
                                                           local_addr=("127.0.0.1", 0))
    try:
        yield proto
    finally:
        transport.close()


def _config(port: int, **kw: object) -> PortMapConfig:
    return PortMapConfig(gateway_port=port, better_answer_wait=0.05, **kw)  # type: ignore[arg-type]


async def test_maps_by_nat_pmp_and_deletes_on_close(gateway: NatPmpGateway) -> None:
    async with PortMapper(5000, gateway="127.0.0.1", config=_config(gateway.port)) as mapper:
        outcome = await mapper.wait(timeout=5)
        assert isinstance(outcome, MappingCreated), outcome
        assert outcome.protocol is MappingProtocol.NATPMP
        assert mapper.external == (str(PUBLIC), EXTERNAL_PORT)
    maps = [r for r in gateway.requests if isinstance(r, MapRequest)]
    assert maps[0].internal_port == 5000 and maps[0].lifetime > 0
    assert maps[-1].is_delete  # closing deleted it
    assert "pcp" in gateway.requests  # PCP was asked first, and refused
    assert mapper.external is None


async def test_a_silent_gateway_gives_probe_failed_in_bounded_time() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        config = _config(silent.getsockname()[1], natpmp_max_transmissions=2,
                         pcp_initial_rto=0.1, pcp_max_transmissions=2)
        loop = asyncio.get_running_loop()
        start = loop.time()
        async with PortMapper(5000, gateway="127.0.0.1", config=config) as mapper:
            outcome = await mapper.wait(timeout=10)
        assert isinstance(outcome, ProbeFailed), outcome
        assert mapper.external is None
        # NAT-PMP: 0.25 + 0.5 s; PCP: two tries of ~0.1 and ~0.2 s (+-10 %).
        assert loop.time() - start < 5


async def test_nat_check_reports_which_protocol_answers(gateway: NatPmpGateway) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as no_igd:
        no_igd.bind(("127.0.0.1", 0))  # UPnP's search goes there, unanswered
        upnp = UpnpConfig(ssdp_target=no_igd.getsockname(), discovery_timeout=0.3)
        report = await port_mapping_check(gateway="127.0.0.1", timeout=5,
                                          config=_config(gateway.port), upnp=upnp)
    assert report.gateway == "127.0.0.1"
    assert report.nat_pmp.answered and report.nat_pmp.external == (str(PUBLIC), EXTERNAL_PORT)
    assert not report.pcp.answered and report.pcp.external is None  # a NAT-PMP-only router
    assert report.external == (str(PUBLIC), EXTERNAL_PORT)
    doc = report.to_json()
    assert doc["nat_pmp"]["external"] == [str(PUBLIC), EXTERNAL_PORT]
    assert doc["upnp"]["answered"] is False and doc["upnp"]["external"] is None
