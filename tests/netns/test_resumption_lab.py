"""A session that outlives its QUIC connection, in the NAT lab.

Two port-restricted homes in the standard WAN, a real rendezvous process,
in-process devices with ``PeerConfig.resume_timeout``. The core drops all
UDP between the two homes and between each home and the server for 45 s,
longer than the 30 s idle timeout, so both QUIC connections die; the
remote resumes the session on a new connection once the network is back
(docs/protocol.md 3.5). 10,000 stanzas sent before, during and after
arrive exactly once, in order, on the same ``Session`` objects. The same
when both homes get a new public address at once, mid-stream.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from dtx import stanza as st
from dtx.aio.peer import Peer, PeerConfig
from dtx.aio.session import Session
from dtx.lab import STANDARD_WAN, Lab
from dtx.lab.topology import Home, Host

from .traversal_helpers import device_peer, rendezvous_scene

pytestmark = pytest.mark.netns

OUTAGE = 45.0
STANZAS = 10_000
CONFIG = PeerConfig(resume_timeout=180.0)


@dataclass
class Stream:
    """Two devices in two port-restricted homes, a session on the direct
    path, and everything the TV side has read of it."""

    lab: Lab
    server: Host
    home_a: Home
    home_b: Home
    remote: Peer
    tv: Peer
    session: Session
    tv_side: Session
    bodies: list[str]

    def send(self, bodies: list[str]) -> None:
        for body in bodies:
            self.session.send(st.message(body, to="tv@example.org"))


def run_stream(tmp_path: Path, drive: Callable[[Stream], Awaitable[None]],
               arrive_within: float,
               after: Callable[[Stream], Awaitable[None]] | None = None) -> None:
    """``drive`` sends the 10,000 stanzas through its faults; then every one
    must arrive, once, in order, on the same Session objects (and ``after``
    checks the rest)."""
    with Lab(wan=STANDARD_WAN) as lab:
        server = lab.add_server("rdv")
        home_a = lab.add_home("a", nat="port-restricted-cone")
        home_b = lab.add_home("b", nat="port-restricted-cone")
        lab.up()
        a, b, vcards, rdv = rendezvous_scene(lab, server, home_a.hosts[0], home_b.hosts[0],
                                             tmp_path)

        async def main() -> None:
            async with device_peer(b, vcards, rdv, listen=True, config=CONFIG) as tv, \
                    device_peer(a, vcards, rdv, listen=False, config=CONFIG) as remote:
                await tv.wait_registered(10)
                session = await remote.connect("tv@example.org", timeout=10)
                async with asyncio.timeout(10):
                    tv_side = await tv.accept()
                await session.wait_path("direct", timeout=5)
                received: list[str] = []

                async def read() -> None:
                    while len(received) < STANZAS:
                        received.append(st.body_of(await tv_side.receive()) or "")

                reader = asyncio.create_task(read())
                stream = Stream(lab, server, home_a, home_b, remote, tv, session, tv_side,
                                [f"s{i}" for i in range(STANZAS)])
                await drive(stream)
                async with asyncio.timeout(arrive_within):
                    await reader
                assert received == stream.bodies, "exactly once, in order"
                await session.wait_acknowledged(timeout=30)
                if after is not None:
                    await after(stream)
                assert remote.sessions() == [session] and tv.sessions() == [tv_side], \
                    "the same Session objects go on"
                assert tv_side.receive_nowait() is None, "nothing twice"
                await session.close()

        asyncio.run(main())


def test_ten_thousand_stanzas_across_a_45_s_outage(netns_ready: None, tmp_path: Path) -> None:
    async def outage(s: Stream) -> None:
        pairs: list[tuple[Home | Host, Home | Host]] = [
            (s.home_a, s.home_b), (s.home_a, s.server), (s.home_b, s.server)]
        s.send(s.bodies[:2000])
        await s.session.wait_acknowledged(timeout=10)
        loop = asyncio.get_running_loop()
        for x, y in pairs:
            s.lab.block(x, y)
        cut = loop.time()
        sent = 2000
        while loop.time() - cut < OUTAGE:  # 6,000 while the network is gone
            s.send(s.bodies[sent:sent + 100])
            sent = min(sent + 100, 8000)
            await asyncio.sleep(OUTAGE / 60)
        assert s.session.suspended and s.tv_side.suspended, \
            "both connections died (idle timeout) and both sessions wait"
        for x, y in pairs:
            s.lab.unblock(x, y)
        s.send(s.bodies[sent:])

    async def resumed_once(s: Stream) -> None:
        assert s.session.resumptions == 1 and s.tv_side.resumptions == 1
        assert not s.session.suspended and s.session.is_open
        s.tv_side.send(st.message("after"))
        async with asyncio.timeout(10):
            assert st.body_of(await s.session.receive()) == "after"

    run_stream(tmp_path, outage, arrive_within=90, after=resumed_once)


def test_ten_thousand_stanzas_while_both_homes_change_address(netns_ready: None,
                                                              tmp_path: Path) -> None:
    async def both_move(s: Stream) -> None:
        for start in range(0, STANZAS, 200):
            s.send(s.bodies[start:start + 200])
            if start == 4000:
                old = (s.home_a.wan_ip, s.home_b.wan_ip)
                s.home_a.change_public_ip()
                s.home_b.change_public_ip()
                assert (s.home_a.wan_ip, s.home_b.wan_ip) != old
            await asyncio.sleep(0.1)

    run_stream(tmp_path, both_move, arrive_within=120)
