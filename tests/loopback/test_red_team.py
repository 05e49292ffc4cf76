"""Red team: attacks that cost the attacker a few bytes a second.

Each test is an attacker written for the purpose (raw UDP, or a dtx peer
that misbehaves) against a real listening device on loopback, with the
bound the test holds the device to stated in it.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest

from dtx import stanza as st
from dtx.aio.peer import Peer, PeerConfig, open_peer
from dtx.identity import DeviceIdentity

from .conftest import trusting
from .test_hostile_input import DEADLINE, quic_initials

HANDSHAKE_TIMEOUT = 1.0
"""The listener's half-open expiry, scaled down from the default 10 s so the
attack's period (just past it) fits a test; the attack scales with it."""


@pytest.fixture
async def tv(tv_id: DeviceIdentity, remote_id: DeviceIdentity) -> AsyncIterator[Peer]:
    config = PeerConfig(handshake_timeout=HANDSHAKE_TIMEOUT, max_half_open_per_ip=16)
    async with open_peer(tv_id, trusting(tv_id, remote_id), host="127.0.0.1",
                         config=config) as peer:
        yield peer


async def test_a_trickle_of_initials_from_the_devices_ip_cannot_lock_it_out(
    tv: Peer, tv_id: DeviceIdentity, remote_id: DeviceIdentity
) -> None:
    """16 fresh Initials (the per-IP bound) every 1.01 handshake timeouts
    from the device's own IP hold every handshake slot of that IP; the
    device must still connect, 5 times of 5, each time while the attack
    has the table full."""
    per_ip = tv.config.max_half_open_per_ip
    socks: list[socket.socket] = []
    bursts = 0

    def half_open_here() -> int:
        return sum(1 for c in tv.endpoint.connections()
                   if not c.opened and c.address[0] == "127.0.0.1")

    async def attack() -> None:
        nonlocal bursts
        for _ in range(50):  # bounded: 50 periods at most
            fresh = []
            for _ in range(per_ip):
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sock.bind(("127.0.0.1", 0))
                socks.append(sock)
                fresh.append(sock)
            for sock, data in zip(fresh, quic_initials(per_ip, tv.address)):
                sock.sendto(data, tv.address)
            bursts += 1
            await asyncio.sleep(HANDSHAKE_TIMEOUT * 1.01)  # the attack's pacing

    attacker = asyncio.create_task(attack())
    try:
        connected = 0
        async with open_peer(remote_id, trusting(tv_id, remote_id), host="127.0.0.1") as remote:
            for i in range(5):
                async with asyncio.timeout(DEADLINE):
                    while half_open_here() < per_ip:  # the attack holds the table
                        await asyncio.sleep(0.005)
                session = await remote.connect(tv_id.jid.full, tv.address, timeout=DEADLINE)
                async with asyncio.timeout(DEADLINE):
                    accepted = await tv.accept()
                session.send(st.message(f"pause {i}"))
                async with asyncio.timeout(DEADLINE):
                    assert st.body_of(await accepted.receive()) == f"pause {i}"
                await session.close()
                connected += 1
        assert connected == 5
        assert tv.counters["half_open_refused_per_ip"] >= 5, "each connect met a full table"
        assert not attacker.done(), "the attack ran throughout"
    finally:
        attacker.cancel()
        for sock in socks:
            sock.close()
