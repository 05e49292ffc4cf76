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
from pathlib import Path

import pytest

from dtx import stanza as st
from dtx.aio.peer import PeerConfig
from dtx.lab import STANDARD_WAN, Lab

from .traversal_helpers import device_peer, rendezvous_scene

pytestmark = pytest.mark.netns

OUTAGE = 45.0
STANZAS = 10_000
CONFIG = PeerConfig(resume_timeout=180.0)


def test_ten_thousand_stanzas_across_a_45_s_outage(netns_ready: None, tmp_path: Path) -> None:
    with Lab(wan=STANDARD_WAN) as lab:
        server = lab.add_server("rdv")
        home_a = lab.add_home("a", nat="port-restricted-cone")
        home_b = lab.add_home("b", nat="port-restricted-cone")
        lab.up()
        a, b, vcards, rdv = rendezvous_scene(lab, server, home_a.hosts[0], home_b.hosts[0],
                                             tmp_path)
        pairs = [(home_a, home_b), (home_a, server), (home_b, server)]

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
                bodies = [f"s{i}" for i in range(STANZAS)]
                for body in bodies[:2000]:
                    session.send(st.message(body, to="tv@example.org"))
                await session.wait_acknowledged(timeout=10)
                loop = asyncio.get_running_loop()
                for x, y in pairs:
                    lab.block(x, y)
                cut = loop.time()
                sent = 2000
                while loop.time() - cut < OUTAGE:  # 6,000 while the network is gone
                    for body in bodies[sent:sent + 100]:
                        session.send(st.message(body, to="tv@example.org"))
                    sent = min(sent + 100, 8000)
                    await asyncio.sleep(OUTAGE / 60)
                assert session.suspended and tv_side.suspended, \
                    "both connections died (idle timeout) and both sessions wait"
                for x, y in pairs:
                    lab.unblock(x, y)
                for body in bodies[sent:]:
                    session.send(st.message(body, to="tv@example.org"))
                async with asyncio.timeout(90):
                    await reader
                assert received == bodies, "exactly once, in order"
                await session.wait_acknowledged(timeout=10)
                assert session.resumptions == 1 and tv_side.resumptions == 1
                assert not session.suspended and session.is_open
                assert remote.sessions() == [session] and tv.sessions() == [tv_side], \
                    "the same Session objects go on"
                tv_side.send(st.message("after"))
                async with asyncio.timeout(10):
                    assert st.body_of(await session.receive()) == "after"
                assert tv_side.receive_nowait() is None, "nothing twice"
                await session.close()

        asyncio.run(main())


def test_ten_thousand_stanzas_while_both_homes_change_address(netns_ready: None,
                                                              tmp_path: Path) -> None:
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
                bodies = [f"s{i}" for i in range(STANZAS)]
                for start in range(0, STANZAS, 200):
                    for body in bodies[start:start + 200]:
                        session.send(st.message(body, to="tv@example.org"))
                    if start == 4000:
                        old = (home_a.wan_ip, home_b.wan_ip)
                        home_a.change_public_ip()
                        home_b.change_public_ip()
                        assert (home_a.wan_ip, home_b.wan_ip) != old
                    await asyncio.sleep(0.1)
                async with asyncio.timeout(120):
                    await reader
                assert received == bodies, "exactly once, in order"
                await session.wait_acknowledged(timeout=30)
                assert remote.sessions() == [session] and tv.sessions() == [tv_side], \
                    "the same Session objects go on"
                assert tv_side.receive_nowait() is None, "nothing twice"
                await session.close()

        asyncio.run(main())
