"""Port mapping in the NAT lab: a home added with ``port_mapping=True`` runs
miniupnpd in its router, and what NAT-PMP (RFC 6886) or PCP (RFC 6887)
maps there really forwards through the home's NAT.

Requests are the codecs' bytes (``dtx.wire.natpmp``, ``dtx.wire.pcp``),
sent from a LAN host's socket to the router's LAN address, port 5351, and
retransmitted as RFC 6886 3.1 says (250 ms, doubling; three sends here).
"Did not arrive" is shown by order where it can be: the lab's links keep
order, so a datagram sent before one that arrives and on the same path
would have arrived first. Needs root and miniupnpd (skips saying so).
"""

from __future__ import annotations

import ipaddress
import os
import random
import select
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

from dtx.errors import DecodeError
from dtx.lab import Home, Host, Lab, ns
from dtx.lab.miniupnpd import miniupnpd_missing
from dtx.lab.topology import state_dir
from dtx.wire.natpmp import (SERVER_PORT, ExternalAddressRequest, ExternalAddressResponse,
                             MapRequest, MapResponse, NatPmpOpcode, NatPmpResult,
                             decode_natpmp_response, encode_natpmp)
from dtx.wire.pcp import (NONCE_BYTES, PcpMap, PcpOpcode, PcpRequest, PcpResponse, PcpResult,
                          decode_pcp_response, encode_pcp)
from tests.netns.conftest import receive

pytestmark = pytest.mark.netns

T = TypeVar("T")
FIRST_TIMEOUT = 0.25          # RFC 6886 3.1 and RFC 6887 8.1.1 start near here
SENDS = 3                     # 0.25 + 0.5 + 1 s of waiting at most
LIFETIME = 3600
UDP = 17
ARRIVAL_TIMEOUT = 2.0
QUIET_TIMEOUT = 0.5
MAX_STRAY_DATAGRAMS = 8       # datagrams read per send that are not the answer
REPO = Path(__file__).resolve().parents[2]


@dataclass
class MappingLab:
    lab: Lab
    home: Home        # its router runs miniupnpd
    plain: Home       # its router does not
    behind_cgn: Home  # runs miniupnpd behind a carrier-grade NAT
    outside: Host     # a host on the internet


@pytest.fixture(scope="module")
def mapping_lab(netns_ready: None) -> Iterator[MappingLab]:
    reason = miniupnpd_missing()
    if reason:
        pytest.skip(reason)
    with Lab() as lab:
        home = lab.add_home("a", nat="port-restricted-cone", port_mapping=True)
        plain = lab.add_home("b", nat="port-restricted-cone")
        behind_cgn = lab.add_double_nat_home("d", nat="port-restricted-cone",
                                             cgn_nat="full-cone", port_mapping=True)
        outside = lab.add_public_host("c")
        lab.up()
        yield MappingLab(lab, home, plain, behind_cgn, outside)


def ask(sock: socket.socket, request: bytes, gateway: tuple[str, int],
        decode: Callable[[bytes], T]) -> T | None:
    """Send ``request`` up to :data:`SENDS` times, waiting 0.25 s, then
    twice as long each time, for an answer ``decode`` accepts; None if
    none comes."""
    timeout = FIRST_TIMEOUT
    for _ in range(SENDS):
        sock.sendto(request, gateway)
        for _ in range(MAX_STRAY_DATAGRAMS):
            got = receive(sock, timeout)
            if got is None:
                break
            if got[1] == gateway:
                try:
                    return decode(got[0])
                except DecodeError:
                    pass
        timeout *= 2
    return None


def gateway_of(home: Home) -> tuple[str, int]:
    return (home.lan_gateway, SERVER_PORT)


def natpmp(sock: socket.socket, home: Home, msg: ExternalAddressRequest | MapRequest,
           ) -> ExternalAddressResponse | MapResponse:
    answer = ask(sock, encode_natpmp(msg), gateway_of(home), decode_natpmp_response)
    assert isinstance(answer, (ExternalAddressResponse, MapResponse)), answer
    return answer


def pcp(sock: socket.socket, home: Home, msg: PcpRequest) -> PcpResponse:
    answer = ask(sock, encode_pcp(msg), gateway_of(home), decode_pcp_response)
    assert answer is not None, f"no PCP answer from {home.name}"
    return answer


def pcp_map(host: Host, sock: socket.socket, nonce: bytes, lifetime: int) -> PcpRequest:
    return PcpRequest(PcpOpcode.MAP, lifetime, ipaddress.IPv4Address(host.ip),
                      PcpMap(nonce, UDP, sock.getsockname()[1], 0, ipaddress.IPv4Address(0)))


def dnat_rules(home: Home) -> str:
    return home.router.run(["nft", "list", "chain", "inet", "miniupnpd",
                            "prerouting_miniupnpd"], check=True).stdout


def first_datagram(sock: socket.socket) -> bytes:
    got = receive(sock, ARRIVAL_TIMEOUT)
    assert got is not None, "nothing arrived"
    return got[0]


def check_forwarding_then_delete(ml: MappingLab, inside: socket.socket, external_port: int,
                                 delete: Callable[[], int]) -> None:
    """With a mapping ``public:external_port -> inside`` in place (an
    unsolicited ``before`` already sent to the internal port): the outside
    host's datagram reaches ``inside`` with its own source, the answer
    leaves from the mapped endpoint; ``delete()`` removes the mapping
    (returns the granted lifetime, 0); then a new sender is dropped while
    the flow conntrack already tracks goes on."""
    public = (ml.home.public_ip, external_port)
    out = ml.outside.udp_socket()
    out.sendto(b"mapped", public)
    got = receive(inside, ARRIVAL_TIMEOUT)
    # not "before" (sent earlier on the same path: dropped); the sender's
    # own address (only the destination is translated)
    assert got == (b"mapped", (ml.outside.ip, out.getsockname()[1]))
    inside.sendto(b"answer", (ml.outside.ip, out.getsockname()[1]))
    assert receive(out, ARRIVAL_TIMEOUT) == (b"answer", public)
    assert f"dport {external_port} dnat" in dnat_rules(ml.home)

    assert delete() == 0
    assert f"dport {external_port} dnat" not in dnat_rules(ml.home)
    late = ml.outside.udp_socket()
    late.sendto(b"new-flow", public)
    out.sendto(b"old-flow", public)
    assert first_datagram(inside) == b"old-flow"   # new-flow, sent first, was dropped
    assert receive(inside, QUIET_TIMEOUT) is None


def test_natpmp_external_address_and_map_forward_until_deleted(mapping_lab: MappingLab) -> None:
    ml = mapping_lab
    host = ml.home.hosts[0]
    inside = host.udp_socket()
    port = inside.getsockname()[1]
    ml.outside.udp_socket().sendto(b"before", (ml.home.public_ip, port))

    ext = natpmp(inside, ml.home, ExternalAddressRequest())
    assert isinstance(ext, ExternalAddressResponse)
    assert ext.result == NatPmpResult.SUCCESS
    assert str(ext.external_address) == ml.home.public_ip

    mapped = natpmp(inside, ml.home, MapRequest(NatPmpOpcode.MAP_UDP, port, port, LIFETIME))
    assert isinstance(mapped, MapResponse)
    assert mapped.result == NatPmpResult.SUCCESS, mapped
    assert (mapped.opcode, mapped.internal_port) == (NatPmpOpcode.MAP_UDP, port)
    assert 0 < mapped.lifetime <= LIFETIME and mapped.external_port != 0

    def delete() -> int:
        gone = natpmp(inside, ml.home, MapRequest(NatPmpOpcode.MAP_UDP, port, 0, 0))
        assert isinstance(gone, MapResponse) and gone.result == NatPmpResult.SUCCESS, gone
        return gone.lifetime

    check_forwarding_then_delete(ml, inside, mapped.external_port, delete)


def test_pcp_map_forwards_until_deleted(mapping_lab: MappingLab) -> None:
    ml = mapping_lab
    host = ml.home.hosts[0]
    inside = host.udp_socket()
    port = inside.getsockname()[1]
    ml.outside.udp_socket().sendto(b"before", (ml.home.public_ip, port))
    nonce = random.Random(6887).randbytes(NONCE_BYTES)

    answer = pcp(inside, ml.home, pcp_map(host, inside, nonce, LIFETIME))
    assert answer.result == PcpResult.SUCCESS, answer
    assert answer.opcode is PcpOpcode.MAP and answer.map is not None
    assert answer.map.nonce == nonce
    assert (answer.map.protocol, answer.map.internal_port) == (UDP, port)
    assert str(answer.map.external_address) == ml.home.public_ip
    assert 0 < answer.lifetime <= LIFETIME and answer.map.external_port != 0

    def delete() -> int:
        gone = pcp(inside, ml.home, pcp_map(host, inside, nonce, 0))
        assert gone.result == PcpResult.SUCCESS, gone
        return gone.lifetime

    check_forwarding_then_delete(ml, inside, answer.map.external_port, delete)


def test_home_without_port_mapping_does_not_answer(mapping_lab: MappingLab) -> None:
    ml = mapping_lab
    host = ml.plain.hosts[0]
    sock = host.udp_socket()
    assert ask(sock, encode_natpmp(ExternalAddressRequest()), gateway_of(ml.plain),
               decode_natpmp_response) is None
    nonce = random.Random(5351).randbytes(NONCE_BYTES)
    assert ask(sock, encode_pcp(pcp_map(host, sock, nonce, LIFETIME)), gateway_of(ml.plain),
               decode_pcp_response) is None


def test_behind_a_cgn_miniupnpd_answers_but_refuses(mapping_lab: MappingLab) -> None:
    """Its WAN address is private (the CGN's inside): miniupnpd says so
    in its log and maps nothing, the double-NAT home a client must expect."""
    ml = mapping_lab
    home = ml.behind_cgn
    host = home.hosts[0]
    sock = host.udp_socket()
    port = sock.getsockname()[1]
    ext = natpmp(sock, home, ExternalAddressRequest())
    assert ext.result == NatPmpResult.NETWORK_FAILURE, ext
    mapped = natpmp(sock, home, MapRequest(NatPmpOpcode.MAP_UDP, port, port, LIFETIME))
    assert mapped.result == NatPmpResult.NETWORK_FAILURE, mapped
    nonce = random.Random(6886).randbytes(NONCE_BYTES)
    answer = pcp(sock, home, pcp_map(host, sock, nonce, LIFETIME))
    assert answer.result != PcpResult.SUCCESS, answer
    assert home.miniupnpd is not None
    assert f"Reserved / private IP address {home.wan_ip}" in home.miniupnpd.log_text()
    assert f"dport {port} dnat" not in dnat_rules(home)


def test_teardown_stops_miniupnpd_and_removes_its_files(netns_ready: None) -> None:
    reason = miniupnpd_missing()
    if reason:
        pytest.skip(reason)
    with Lab() as lab:
        home = lab.add_home("a", port_mapping=True)
        lab.up()
        assert home.miniupnpd is not None
        pid = home.miniupnpd.pid
        assert pid is not None
        assert home.public_ip == home.wan_ip and not ipaddress.ip_address(home.wan_ip).is_private
        config = home.miniupnpd.config_path
        with open(config, encoding="utf-8") as f:
            assert f"allow 1024-65535 {home.lan_cidr} 1-65535" in f.read()
    assert not _alive(pid)
    assert home.miniupnpd.pid is None
    assert not os.path.exists(lab.folder)


CRASHING_OWNER = """
import sys
from dtx.lab import Lab
lab = Lab()
home = lab.add_home("a", port_mapping=True)
lab.up()
print(lab.prefix, home.miniupnpd.pid, flush=True)
sys.stdin.read()
"""


def test_cleanup_stale_stops_the_miniupnpd_of_a_crashed_run(netns_ready: None) -> None:
    reason = miniupnpd_missing()
    if reason:
        pytest.skip(reason)
    owner = subprocess.Popen([sys.executable, "-c", CRASHING_OWNER], cwd=REPO,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout is not None
        ready, _, _ = select.select([owner.stdout], [], [], 30.0)
        assert ready, "the lab owner did not come up"
        prefix, pid_text = owner.stdout.readline().split()
        pid = int(pid_text)
        owner.kill()                                   # a crash: no teardown at all
        owner.wait(timeout=10)
        assert _alive(pid) and os.path.isdir(os.path.join(state_dir(), prefix))
        assert prefix in Lab.cleanup_stale()
        assert not _alive(pid)
        assert not os.path.exists(os.path.join(state_dir(), prefix))
        assert [n for n in ns.list_netns() if n.startswith(prefix + "-")] == []
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait(timeout=10)
        Lab.cleanup_stale()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False

