"""Fixtures for tests that run in the NAT lab (network namespaces, root)."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator

import pytest

from dtx.lab import Lab, lab_missing


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


