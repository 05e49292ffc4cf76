"""An Internet Gateway Device on loopback, for the UPnP tests: an SSDP
responder (answering a unicast M-SEARCH) and an HTTP server with a device
description, one or two connection services and their control URL,
answering GetExternalIPAddress, AddPortMapping, AddAnyPortMapping (IGD 2)
and DeletePortMapping as WANIPConnection says, with what the tests make
it refuse. The descriptions are the smallest the UPnP Device Architecture
allows; what a real router says is the NAT lab's miniupnpd
(``tests/netns/test_upnp_lab.py``)."""

from __future__ import annotations

import asyncio
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from aiohttp import web

from dtx.aio.upnp import WAN_IP_CONNECTION_1, WAN_IP_CONNECTION_2, WAN_PPP_CONNECTION_1

HOST = "127.0.0.1"
SOAP_NS = "http://schemas.xmlsoap.org/soap/envelope/"

_ARGS = {
    "GetExternalIPAddress": ([], [("NewExternalIPAddress", "ExternalIPAddress")]),
    "AddPortMapping": ([("NewRemoteHost", "RemoteHost"), ("NewExternalPort", "ExternalPort"),
                        ("NewProtocol", "PortMappingProtocol"),
                        ("NewInternalPort", "InternalPort"),
                        ("NewInternalClient", "InternalClient"),
                        ("NewEnabled", "PortMappingEnabled"),
                        ("NewPortMappingDescription", "PortMappingDescription"),
                        ("NewLeaseDuration", "PortMappingLeaseDuration")], []),
    "DeletePortMapping": ([("NewRemoteHost", "RemoteHost"), ("NewExternalPort", "ExternalPort"),
                           ("NewProtocol", "PortMappingProtocol")], []),
}
_ARGS["AddAnyPortMapping"] = (_ARGS["AddPortMapping"][0], [("NewReservedPort", "ExternalPort")])
_VARIABLES = [("ExternalIPAddress", "string"), ("RemoteHost", "string"),
              ("ExternalPort", "ui2"), ("PortMappingProtocol", "string"),
              ("InternalPort", "ui2"), ("InternalClient", "string"),
              ("PortMappingEnabled", "boolean"), ("PortMappingDescription", "string"),
              ("PortMappingLeaseDuration", "ui4")]


def scpd(actions: list[str]) -> str:
    def args(name: str) -> str:
        ins, outs = _ARGS[name]
        return "".join(f"<argument><name>{a}</name><direction>{d}</direction>"
                       f"<relatedStateVariable>{v}</relatedStateVariable></argument>"
                       for d, pairs in (("in", ins), ("out", outs)) for a, v in pairs)

    return ('<?xml version="1.0"?><scpd xmlns="urn:schemas-upnp-org:service-1-0">'
            "<specVersion><major>1</major><minor>0</minor></specVersion><actionList>"
            + "".join(f"<action><name>{a}</name><argumentList>{args(a)}</argumentList>"
                      "</action>" for a in actions)
            + "</actionList><serviceStateTable>"
            + "".join(f'<stateVariable sendEvents="no"><name>{n}</name>'
                      f"<dataType>{t}</dataType></stateVariable>" for n, t in _VARIABLES)
            + "</serviceStateTable></scpd>")


def description(services: list[str]) -> str:
    items = "".join(f"<service><serviceType>{s}</serviceType>"
                    f"<serviceId>urn:upnp-org:serviceId:conn{i}</serviceId>"
                    f"<SCPDURL>/scpd{i}.xml</SCPDURL><controlURL>/ctl{i}</controlURL>"
                    f"<eventSubURL>/evt{i}</eventSubURL></service>"
                    for i, s in enumerate(services))
    version = "2" if WAN_IP_CONNECTION_2 in services else "1"

    def device(kind: str, inner: str) -> str:
        return (f"<device><deviceType>urn:schemas-upnp-org:device:{kind}:{version}</deviceType>"
                f"<friendlyName>loopback {kind}</friendlyName><manufacturer>dtx tests"
                f"</manufacturer><modelName>fake</modelName>"
                f"<UDN>uuid:00000000-0000-0000-0000-00000000000{len(kind) % 10}</UDN>"
                f"{inner}</device>")

    conn = device("WANConnectionDevice", f"<serviceList>{items}</serviceList>")
    wan = device("WANDevice", f"<deviceList>{conn}</deviceList>")
    root = device("InternetGatewayDevice", f"<deviceList>{wan}</deviceList>")
    return ('<?xml version="1.0"?><root xmlns="urn:schemas-upnp-org:device-1-0">'
            f"<specVersion><major>1</major><minor>0</minor></specVersion>{root}</root>")


def envelope(body: str) -> str:
    return ('<?xml version="1.0"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/'
            'envelope/" s:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/">'
            f"<s:Body>{body}</s:Body></s:Envelope>")


def fault(code: int, text: str) -> web.Response:
    body = ("<s:Fault><faultcode>s:Client</faultcode><faultstring>UPnPError</faultstring>"
            '<detail><UPnPError xmlns="urn:schemas-upnp-org:control-1-0">'
            f"<errorCode>{code}</errorCode><errorDescription>{text}</errorDescription>"
            "</UPnPError></detail></s:Fault>")
    return web.Response(status=500, text=envelope(body), content_type="text/xml")


@dataclass(eq=False)
class FakeIgd(asyncio.DatagramProtocol):
    """What the tests set: the services offered (in that order), the
    external address, ports already taken, refusals; what it saw: the SOAP
    calls (action, arguments) and the mappings it holds."""

    services: list[str] = field(default_factory=lambda: [WAN_IP_CONNECTION_1])
    external_ip: str = "1.2.3.4"
    taken: set[int] = field(default_factory=set)
    permanent_only: bool = False
    reserved_port: int = 40000
    refuse_renewals: bool = False
    location_host: str = HOST
    calls: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    mappings: dict[int, tuple[str, int, int]] = field(default_factory=dict)
    searches: int = 0
    http_port: int = 0
    transport: asyncio.DatagramTransport | None = None

    @property
    def ssdp(self) -> tuple[str, int]:
        assert self.transport is not None
        return (HOST, int(self.transport.get_extra_info("sockname")[1]))

    def actions(self, name: str) -> list[dict[str, str]]:
        return [args for action, args in self.calls if action == name]

    # -- SSDP --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        text = data.decode("latin-1")
        if not text.startswith("M-SEARCH"):
            return
        self.searches += 1
        st = next((line.split(":", 1)[1].strip() for line in text.split("\r\n")
                   if line.lower().startswith("st:")), "")
        answer = (f"HTTP/1.1 200 OK\r\nCACHE-CONTROL: max-age=120\r\nST: {st}\r\n"
                  f"USN: uuid:00000000-0000-0000-0000-000000000001::{st}\r\nEXT:\r\n"
                  f"SERVER: test UPnP/1.1 fake/1\r\n"
                  f"LOCATION: http://{self.location_host}:{self.http_port}/desc.xml\r\n\r\n")
        self.transport.sendto(answer.encode("latin-1"), addr)

    # -- HTTP ----------------------------------------------------------------------

    async def _description(self, request: web.Request) -> web.Response:
        return web.Response(text=description(self.services), content_type="text/xml")

    async def _scpd(self, request: web.Request) -> web.Response:
        index = int(request.match_info["index"])
        actions = ["GetExternalIPAddress", "AddPortMapping", "DeletePortMapping"]
        if self.services[index] == WAN_IP_CONNECTION_2:
            actions.append("AddAnyPortMapping")
        return web.Response(text=scpd(actions), content_type="text/xml")

    async def _control(self, request: web.Request) -> web.Response:
        service = self.services[int(request.match_info["index"])]
        body = ET.fromstring(await request.text()).find(f"{{{SOAP_NS}}}Body")
        assert body is not None and len(body) == 1
        call = body[0]
        action = call.tag.rpartition("}")[2]
        args = {child.tag.rpartition("}")[2]: child.text or "" for child in call}
        self.calls.append((action, args))
        out = self._answer(action, args)
        if isinstance(out, web.Response):
            return out
        values = "".join(f"<{k}>{v}</{k}>" for k, v in out.items())
        return web.Response(text=envelope(f'<u:{action}Response xmlns:u="{service}">{values}'
                                          f"</u:{action}Response>"), content_type="text/xml")

    def _answer(self, action: str, args: dict[str, str]) -> dict[str, str] | web.Response:
        if action == "GetExternalIPAddress":
            return {"NewExternalIPAddress": self.external_ip}
        port = int(args["NewExternalPort"])
        if action == "DeletePortMapping":
            if self.mappings.pop(port, None) is None:
                return fault(714, "NoSuchEntryInArray")
            return {}
        lease = int(args["NewLeaseDuration"])
        client = (args["NewInternalClient"], int(args["NewInternalPort"]))
        if self.permanent_only and lease:
            return fault(725, "OnlyPermanentLeasesSupported")
        if action == "AddAnyPortMapping":
            self.mappings[self.reserved_port] = (*client, lease)
            return {"NewReservedPort": str(self.reserved_port)}
        held = self.mappings.get(port)
        if held is not None and self.refuse_renewals:
            return fault(501, "ActionFailed")
        if port in self.taken or (held is not None and held[:2] != client):
            return fault(718, "ConflictInMappingEntry")
        self.mappings[port] = (*client, lease)
        return {}


@asynccontextmanager
async def fake_igd(**kw: object) -> AsyncIterator[FakeIgd]:
    loop = asyncio.get_running_loop()
    transport, igd = await loop.create_datagram_endpoint(lambda: FakeIgd(**kw),  # type: ignore[arg-type]
                                                         local_addr=(HOST, 0))
    app = web.Application()
    app.router.add_get("/desc.xml", igd._description)
    app.router.add_get("/scpd{index:\\d}.xml", igd._scpd)
    app.router.add_post("/ctl{index:\\d}", igd._control)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, HOST, 0)
    await site.start()
    igd.http_port = int(runner.addresses[0][1])
    try:
        yield igd
    finally:
        await runner.cleanup()
        transport.close()


__all__ = ["FakeIgd", "HOST", "WAN_IP_CONNECTION_1", "WAN_IP_CONNECTION_2",
           "WAN_PPP_CONNECTION_1", "fake_igd"]
