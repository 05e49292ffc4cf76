"""Fixtures for tests that run in the NAT lab (network namespaces, root)."""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator

import pytest

from dtx.lab import Lab


def lab_missing() -> str | None:
    """Why the NAT lab cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return ("needs root: the NAT lab creates network namespaces, veth/TAP links "
                "and nftables rules (CI runs as root)")
    for tool, package in (("ip", "iproute2"), ("nft", "nftables"), ("conntrack", "conntrack")):
        if shutil.which(tool) is None:
            return f"needs the {tool} command (package {package}; scripts/setup installs it)"
    if not os.path.exists("/dev/net/tun"):
        return "needs /dev/net/tun: impaired lab links are TAP devices"
    return None


@pytest.fixture(scope="session")
def netns_ready() -> None:
    """Skip (with the reason) unless the lab can run; clear stale labs once."""
    reason = lab_missing()
    if reason:
        pytest.skip(reason)
    Lab.cleanup_stale()


@pytest.fixture
def lab(netns_ready: None) -> Iterator[Lab]:
    """An empty lab, torn down after the test whatever happens."""
    with Lab() as lab:
        yield lab


def wait_until(predicate: Callable[[], bool], *, timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` passes (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def receive(sock: socket.socket, timeout: float) -> tuple[bytes, tuple[str, int]] | None:
    """One datagram, or None when none comes within ``timeout``."""
    sock.settimeout(timeout)
    try:
        data, addr = sock.recvfrom(4096)
    except (socket.timeout, BlockingIOError):
        return None
    return data, addr


