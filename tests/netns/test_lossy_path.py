"""A lossy, duplicating, reordering, jittery path in the NAT lab: every
stanza still arrives exactly once, in order.

Two homes behind port-restricted-cone NATs (a punchable pair) connect by
JID through a rendezvous; once the session runs on the direct path, one
home's uplink gets 10 % loss, 1 % duplication, 5 % reordering and 100 ms
of jitter, in each direction. Then 10,000 stanzas go one way while a few
hundred go the other. The path manager may move the session to the relay
and back while this happens; QUIC's retransmission and the XML stream's
order must hide all of it.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from dtx import stanza as st
from dtx.aio.peer import Session
from dtx.lab import STANDARD_WAN, Lab
from dtx.lab.netem import LinkSpec

from .traversal_helpers import (
    device_peer,
    make_devices,
    server_address,
    start_rendezvous,
    write_vcards,
)

pytestmark = [pytest.mark.netns, pytest.mark.slow]

STANZAS = 10_000
BACK = 300
BUDGET = 180.0
"""Seconds for the whole exchange; it takes far less (docs/security.md)."""
IMPAIRED = LinkSpec(delay=0.020, jitter=0.100, loss=0.10, duplicate=0.01, reorder=0.05, seed=7)


async def _collect(session: Session, count: int, prefix: str) -> list[str]:
    bodies = []
    for _ in range(count):
        stanza = await session.receive()
        bodies.append(st.body_of(stanza) or "")
    assert all(b.startswith(prefix) for b in bodies)
    return bodies


def test_ten_thousand_stanzas_over_a_lossy_path(netns_ready: None, tmp_path: Path) -> None:
    with Lab(wan=STANDARD_WAN) as lab:
        server = lab.add_server("rdv")
        home_a = lab.add_home("a", nat="port-restricted-cone", link=LinkSpec(delay=0.020))
        home_b = lab.add_home("b", nat="port-restricted-cone", link=LinkSpec(delay=0.020))
        lab.up()
        a, b = make_devices(lab, home_a.hosts[0], home_b.hosts[0])
        vcards = tmp_path / "vcards"
        write_vcards(vcards, a.identity, b.identity)
        start_rendezvous(server, vcards)
        rdv = server_address(server)

        async def main() -> dict[str, float]:
            async with device_peer(b, vcards, rdv, listen=True) as tv, \
                    device_peer(a, vcards, rdv, listen=False) as remote:
                await tv.wait_registered(10)
                session = await remote.connect("tv@example.org", timeout=10)
                session.send(st.message("hello"))
                async with asyncio.timeout(10):
                    tv_side = await tv.accept()
                    assert st.body_of(await tv_side.receive()) == "hello"
                await session.wait_path("direct", timeout=10)
                lab.set_link(home_a, IMPAIRED)
                start = time.monotonic()
                async with asyncio.timeout(BUDGET):
                    for i in range(STANZAS):
                        session.send(st.message(f"s{i}"))
                    for i in range(BACK):
                        tv_side.send(st.message(f"r{i}"))
                    got, back = await asyncio.gather(
                        _collect(tv_side, STANZAS, "s"), _collect(session, BACK, "r"))
                    await session.wait_acknowledged()
                    await tv_side.wait_acknowledged()
                elapsed = time.monotonic() - start
                assert got == [f"s{i}" for i in range(STANZAS)]
                assert back == [f"r{i}" for i in range(BACK)]
                # exactly once: nothing more is waiting on either side
                assert tv_side.receive_nowait() is None and session.receive_nowait() is None
                lab.set_link(home_a, LinkSpec(delay=0.020))
                await session.close()
                return {"seconds": elapsed}

        result = asyncio.run(main())
    assert result["seconds"] < BUDGET
