"""A UDP endpoint as dtx passes it around: ``(host, port)``.

The one home of the type and of the two things done to it everywhere:
writing it for people (IPv6 in brackets) and normalising what a dual-stack
socket reports (an IPv4-mapped IPv6 address is the IPv4 address), so that
one device has one address.
"""

from __future__ import annotations

import ipaddress

__all__ = ["Address", "format_address", "normalise_address"]

Address = tuple[str, int]
"""``(host, port)``: an IP address (or, before resolution, a name) and a port."""


def format_address(host: str, port: int) -> str:
    """``host:port``, an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def normalise_address(addr: Address) -> Address:
    """Unwrap IPv4-mapped IPv6 (a dual-stack socket's view of IPv4) and drop
    a zone index, so one device has one address."""
    host, port = addr[0], addr[1]
    if ":" not in host:
        # IPv4 as a socket reports it is already in its one form (the hot
        # path: every datagram a server reads); anything else that is not
        # IPv6 is returned as it is below too.
        return (host, port)
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return (host, port)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return (str(ip.ipv4_mapped), port)
    return (str(ip), port)
