"""UPnP IGD in the NAT lab: the miniupnpd of a home added with
``port_mapping=True`` is found by SSDP and maps by SOAP
(``dtx.aio.upnp``), and what it maps forwards through the home's NAT.

async-upnp-client makes its own sockets (SSDP's multicast, HTTP), in the
namespace of the process that runs it; a search from this test process
would not reach the lab. So the mapper runs in a Python process started
inside the LAN host's namespace (``Host.popen``), which maps for a socket
this process made in that namespace and reports in JSON lines on stdout;
``dtx nat-check`` runs the same way (``python -m dtx.natcheck``), against a
STUN server served as in ``tests/netns/test_natcheck.py``. Needs root,
miniupnpd and async-upnp-client (skips saying which is missing).
"""

from __future__ import annotations

import json
import logging
import os
import select
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from dtx.aio.peer import Peer, PeerConfig
from dtx.aio.upnp import WAN_IP_CONNECTION_2, in_this_network_namespace, upnp_missing
from dtx.identity import generate_identity
from dtx.lab import Home, Host, Lab
from dtx.lab.miniupnpd import miniupnpd_missing
from rendezvous.stun import ServerAddresses
from tests.netns.conftest import receive
from tests.netns.test_natcheck import ALT_PORT, PORT, StunDriver

pytestmark = pytest.mark.netns

REPO = Path(__file__).resolve().parents[2]
ARRIVAL_TIMEOUT = 2.0
QUIET_TIMEOUT = 0.5
REPORT_TIMEOUT = 20.0
ENV = {**os.environ, "PYTHONPATH": str(REPO)}

# Maps argv[2] (a port of argv[3]'s socket, made by the test) on the IGD of
# argv[1]; prints the outcome, waits for a line on stdin, deletes, prints that.
MAPPER = """
import asyncio, json, sys
from dtx.aio.upnp import UpnpMapper
from dtx.proto.portmap import MappingCreated

async def main():
    mapper = UpnpMapper(int(sys.argv[2]), gateway=sys.argv[1], client_ip=sys.argv[3])
    mapper.start()
    outcome = await mapper.wait(10)
    print(json.dumps({"created": isinstance(outcome, MappingCreated),
                      "external": mapper.external, "lifetime": mapper.lifetime,
                      "service": mapper.service_type, "location": mapper.location,
                      "reason": getattr(outcome, "reason", None)}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    print(json.dumps({"deleted": await mapper.close()}), flush=True)

asyncio.run(main())
"""

# A device (Peer) with port mapping whose PCP and NAT-PMP get no answer
# (sent to a port where nothing listens), so that it tries UPnP; prints its
# address and mapping, closes on a line on stdin, prints that it closed.
DEVICE = """
import asyncio, json, sys
from dtx.aio.peer import Peer, PeerConfig
from dtx.identity import generate_identity
from dtx.proto.portmap import PortMapConfig

class TrustAll:
    def verify(self, jid, key):
        return None

async def main():
    silent = PortMapConfig(gateway_port=5399, natpmp_max_transmissions=2,
                           pcp_initial_rto=0.2, pcp_max_transmissions=2)
    config = PeerConfig(port_mapping=True, gateway=sys.argv[1], port_mapping_config=silent)
    peer = Peer(generate_identity("tv@example.org/den"), TrustAll(), config=config)
    await peer.start(sys.argv[2], 0)
    mapped = await peer.wait_port_mapped(15)
    print(json.dumps({"address": peer.address, "port_mapped": mapped}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    await peer.close()
    print(json.dumps({"closed": True}), flush=True)

asyncio.run(main())
"""


@dataclass
class UpnpLab:
    lab: Lab
    home: Home        # its router runs miniupnpd
    behind_cgn: Home  # so does this one, behind a carrier-grade NAT
    outside: Host
    stun: tuple[str, int]


@pytest.fixture(scope="module")
def upnp_lab(netns_ready: None) -> Iterator[UpnpLab]:
    for reason in (miniupnpd_missing(), upnp_missing()):
        if reason:
            pytest.skip(reason)
    with Lab() as lab:
        home = lab.add_home("a", nat="port-restricted-cone", port_mapping=True)
        behind_cgn = lab.add_double_nat_home("d", nat="port-restricted-cone",
                                             cgn_nat="full-cone", port_mapping=True)
        outside = lab.add_public_host("c")
        server = lab.add_server("stun", addresses=2)
        lab.up()
        a1, a2 = server.addresses[:2]
        addresses = ServerAddresses((a1, PORT), a2, ALT_PORT)
        socks = {addr: server.udp_socket(addr[1], addr[0]) for addr in addresses.sockets()}
        with StunDriver(addresses, socks):
            yield UpnpLab(lab, home, behind_cgn, outside, (a1, PORT))


def read_json(proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"no answer from the mapper process within {timeout} s"
    line = proc.stdout.readline()
    assert line, f"the mapper process ended (exit {proc.poll()})"
    doc: dict[str, Any] = json.loads(line)
    return doc


def dnat_rules(home: Home) -> str:
    return home.router.run(["nft", "list", "chain", "inet", "miniupnpd",
                            "prerouting_miniupnpd"], check=True).stdout


def test_sockets_made_in_a_lab_namespace_are_told_apart(upnp_lab: UpnpLab) -> None:
    host = upnp_lab.home.hosts[0]
    assert in_this_network_namespace(host.udp_socket()) is False


def test_upnp_finds_miniupnpd_maps_forwards_and_deletes(upnp_lab: UpnpLab) -> None:
    ul = upnp_lab
    home, host = ul.home, ul.home.hosts[0]
    inside = host.udp_socket(bind_ip=host.ip)
    port = inside.getsockname()[1]
    ul.outside.udp_socket().sendto(b"before", (home.public_ip, port))   # no mapping: dropped

    proc = host.popen([sys.executable, "-c", MAPPER, home.lan_gateway, str(port), host.ip],
                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO,
                      env=ENV)
    try:
        made = read_json(proc, REPORT_TIMEOUT)
        assert made["created"], made["reason"]
        assert made["service"] == WAN_IP_CONNECTION_2       # miniupnpd 2.3 is an IGD 2
        assert urlsplit(made["location"]).hostname == home.lan_gateway
        public_ip, external_port = made["external"]
        assert public_ip == home.public_ip
        assert made["lifetime"] == 3600
        public = (public_ip, external_port)
        assert f"dport {external_port} dnat" in dnat_rules(home)

        out = ul.outside.udp_socket()
        out.sendto(b"mapped", public)
        # not "before", sent earlier on the same path; the sender's own address
        assert receive(inside, ARRIVAL_TIMEOUT) == (b"mapped", (ul.outside.ip,
                                                                out.getsockname()[1]))
        inside.sendto(b"answer", (ul.outside.ip, out.getsockname()[1]))
        assert receive(out, ARRIVAL_TIMEOUT) == (b"answer", public)

        assert proc.stdin is not None
        proc.stdin.write("delete\n")
        proc.stdin.flush()
        assert read_json(proc, REPORT_TIMEOUT) == {"deleted": True}
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert f"dport {external_port} dnat" not in dnat_rules(home)
    late = ul.outside.udp_socket()
    late.sendto(b"new-flow", public)
    out.sendto(b"old-flow", public)      # conntrack still carries the flow it knows
    got = receive(inside, ARRIVAL_TIMEOUT)
    assert got is not None and got[0] == b"old-flow"   # new-flow, sent first, was dropped
    assert receive(inside, QUIET_TIMEOUT) is None


def nat_check(ul: UpnpLab, host: Host) -> dict[str, Any]:
    stun = f"{ul.stun[0]}:{ul.stun[1]}"
    done = host.run([sys.executable, "-m", "dtx.natcheck", "--stun", stun, "--no-classic",
                     "--port-mapping", "--json", "--bind", host.ip, "--timeout", "8"],
                    timeout=60, cwd=str(REPO), env=ENV)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1, done.stdout
    doc: dict[str, Any] = json.loads(lines[0])["port_mapping"]
    return doc


def test_nat_check_in_the_home_reports_pcp_nat_pmp_and_upnp(upnp_lab: UpnpLab) -> None:
    home = upnp_lab.home
    pm = nat_check(upnp_lab, home.hosts[0])
    assert pm["gateway"] == home.lan_gateway
    for protocol in ("pcp", "nat_pmp", "upnp"):
        answer = pm[protocol]
        assert answer["answered"] is True, (protocol, answer)
        assert answer["external"][0] == home.public_ip, (protocol, answer)
        assert answer["lifetime"] > 0 and answer["reason"] is None
    assert pm["external"][0] == home.public_ip
    assert "dnat" not in dnat_rules(home)   # each deleted its mapping


def test_nat_check_behind_a_cgn_gets_three_refusals(upnp_lab: UpnpLab) -> None:
    """The inner router's WAN address is private: miniupnpd answers every
    protocol and maps nothing; over UPnP its external address is empty."""
    home = upnp_lab.behind_cgn
    pm = nat_check(upnp_lab, home.hosts[0])
    for protocol in ("pcp", "nat_pmp", "upnp"):
        answer = pm[protocol]
        assert answer["answered"] is True and answer["external"] is None, (protocol, answer)
    assert "no external address" in pm["upnp"]["reason"]
    assert pm["external"] is None
    assert "dnat" not in dnat_rules(home)


def test_a_device_whose_pcp_gets_no_answer_maps_by_upnp(upnp_lab: UpnpLab) -> None:
    home, host = upnp_lab.home, upnp_lab.home.hosts[0]
    proc = host.popen([sys.executable, "-c", DEVICE, home.lan_gateway, host.ip],
                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO,
                      env=ENV)
    try:
        started = read_json(proc, REPORT_TIMEOUT)
        assert started["port_mapped"] is not None, "no UPnP mapping for the device"
        public_ip, external_port = started["port_mapped"]
        assert public_ip == home.public_ip
        internal = f"dport {external_port} dnat ip to {host.ip}:{started['address'][1]}"
        assert internal in dnat_rules(home)
        assert proc.stdin is not None
        proc.stdin.write("close\n")
        proc.stdin.flush()
        assert read_json(proc, REPORT_TIMEOUT) == {"closed": True}
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert f"dport {external_port} dnat" not in dnat_rules(home)   # deleted on close


async def test_an_in_process_device_in_a_lab_namespace_does_not_try_upnp(
        upnp_lab: UpnpLab, caplog: pytest.LogCaptureFixture) -> None:
    """Its socket is in the lab, this process is not: UPnP's search would go
    out on this machine's own network, so it is not made (PCP and NAT-PMP,
    from the device's socket, are refused behind the CGN)."""
    home, host = upnp_lab.behind_cgn, upnp_lab.behind_cgn.hosts[0]
    config = PeerConfig(port_mapping=True, gateway=home.lan_gateway,
                        host_addresses=(host.ip,))
    peer = Peer(generate_identity("tv@example.org/den"), TrustAll(), config=config)
    with caplog.at_level(logging.INFO, logger="dtx"):
        await peer.start(sock=host.udp_socket())
        try:
            assert await peer.wait_port_mapped(10) is None
        finally:
            await peer.close()
    messages = [r.getMessage() for r in caplog.records]
    assert "no UPnP port mapping: the socket is in another network namespace" in messages
    assert not [m for m in messages if m.startswith("UPnP")]


class TrustAll:
    def verify(self, jid: str, key: bytes) -> None:
        return None
