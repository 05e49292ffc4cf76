"""Local interface addresses: a device's host candidates and what mDNS
announces. The one place dtx asks the OS for them (through ``ifaddr``,
which zeroconf uses too)."""

from __future__ import annotations

import ipaddress
import socket
import sys

import ifaddr


def local_ipv4_addresses(*, include_loopback: bool = False,
                         include_link_local: bool = False) -> list[str]:
    """IPv4 addresses of this network namespace's interfaces, each once,
    in interface order; loopback and link-local ones only when asked."""
    out: list[str] = []
    for adapter in ifaddr.get_adapters():
        for entry in adapter.ips:
            if not isinstance(entry.ip, str):
                continue  # IPv6: (address, flowinfo, scope id)
            ip = ipaddress.IPv4Address(entry.ip)
            if ip.is_unspecified or entry.ip in out:
                continue
            if ip.is_loopback and not include_loopback:
                continue
            if ip.is_link_local and not include_link_local:
                continue
            out.append(entry.ip)
    return out


def host_candidates(bound: tuple[str, int], server: tuple[str, int]) -> list[tuple[str, int]]:
    """The host candidates of a socket bound to ``bound``: its own address,
    or every interface address when bound to the wildcard. Loopback
    addresses count only when the server is on loopback too."""
    host, port = bound
    if host not in ("0.0.0.0", "", "::"):
        return [(host, port)]
    loopback = ipaddress.ip_address(server[0]).is_loopback
    return [(a, port) for a in local_ipv4_addresses(include_loopback=loopback)]


ROUTE_TABLE = "/proc/net/route"
"""Linux's IPv4 routing table, one route a line (``ip route`` reads it too)."""


def default_gateway(table: str | None = None) -> str | None:
    """The IPv4 gateway of this network namespace's default route (the
    home router a port-mapping request goes to), or None when there is no
    default route through a gateway, or no Linux routing table to read.
    ``table``: the text of :data:`ROUTE_TABLE` (read when None). Of
    several default routes, the one of lowest metric."""
    if table is None:
        try:
            with open(ROUTE_TABLE, encoding="ascii") as f:
                table = f.read()
        except OSError:
            return None
    best: tuple[int, str] | None = None
    for line in table.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 7:
            continue
        try:
            destination, gateway = int(fields[1], 16), int(fields[2], 16)
            flags, metric = int(fields[3], 16), int(fields[6])
        except ValueError:
            continue
        up_via_gateway = flags & 0x1 and flags & 0x2  # RTF_UP, RTF_GATEWAY
        if destination != 0 or not up_via_gateway or gateway == 0:
            continue
        # The kernel writes each address as its 32-bit word in host order.
        ip = str(ipaddress.IPv4Address(gateway.to_bytes(4, sys.byteorder)))
        if best is None or metric < best[0]:
            best = (metric, ip)
    return None if best is None else best[1]


def source_ip_towards(dest: tuple[str, int], family: int = socket.AF_INET) -> str | None:
    """The local IP the routing table picks for ``dest`` (no packet is
    sent: a UDP socket is connected, which only routes), or None."""
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(dest)
        except OSError:
            return None
        return str(probe.getsockname()[0])
