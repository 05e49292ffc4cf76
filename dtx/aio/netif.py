"""Local interface addresses: a device's host candidates and what mDNS
announces. The one place dtx asks the OS for them (through ``ifaddr``,
which zeroconf uses too)."""

from __future__ import annotations

import ipaddress

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
