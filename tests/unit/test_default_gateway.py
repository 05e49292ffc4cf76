"""The home router's address from Linux's routing table (port mapping
asks it)."""

from __future__ import annotations

import sys

import pytest

from dtx.aio.netif import default_gateway

HEADER = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"


def _word(ip: str) -> str:
    """An address as the kernel writes it: its 32-bit word in host order, hex."""
    raw = bytes(int(part) for part in ip.split("."))
    return f"{int.from_bytes(raw, sys.byteorder):08X}"


def _route(dest: str, gateway: str, flags: int, metric: int = 0, iface: str = "eth0") -> str:
    return f"{iface}\t{_word(dest)}\t{_word(gateway)}\t{flags:04X}\t0\t0\t{metric}\t00000000\t0\t0\t0\n"


def test_the_default_route_through_a_gateway() -> None:
    table = HEADER + _route("0.0.0.0", "192.168.1.1", 0x3) + _route("192.168.1.0", "0.0.0.0", 0x1)
    assert default_gateway(table) == "192.168.1.1"


def test_the_lowest_metric_of_several_defaults() -> None:
    table = (HEADER + _route("0.0.0.0", "10.0.0.1", 0x3, metric=600, iface="wlan0")
             + _route("0.0.0.0", "192.168.1.1", 0x3, metric=100))
    assert default_gateway(table) == "192.168.1.1"


@pytest.mark.parametrize("table", [
    HEADER,                                                  # no route at all
    HEADER + _route("192.168.1.0", "0.0.0.0", 0x1),          # only the LAN's own route
    HEADER + _route("0.0.0.0", "0.0.0.0", 0x1),              # default on a link, no gateway
    HEADER + _route("0.0.0.0", "192.168.1.1", 0x2),          # not up
    HEADER + "eth0\tzz\tyy\t0003\t0\t0\t0\n",                # not hex: skipped, no error
    "",
])
def test_no_gateway(table: str) -> None:
    assert default_gateway(table) is None
