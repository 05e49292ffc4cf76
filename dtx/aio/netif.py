"""Local interface addresses: a device's host candidates."""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct

_SIOCGIFADDR = 0x8915


def local_ipv4_addresses(*, include_loopback: bool = False) -> list[str]:
    """IPv4 addresses of this network namespace's interfaces (Linux)."""
    out: list[str] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _, name in socket.if_nameindex():
            try:
                req = struct.pack("256s", name.encode()[:15])
                res = fcntl.ioctl(sock.fileno(), _SIOCGIFADDR, req)
            except OSError:
                continue
            addr = socket.inet_ntoa(res[20:24])
            ip = ipaddress.IPv4Address(addr)
            if ip.is_loopback and not include_loopback:
                continue
            if ip.is_link_local or ip.is_unspecified:
                continue
            if addr not in out:
                out.append(addr)
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
