"""Faults in the middle of a stanza stream, in the NAT lab.

Cutting the direct path, a NAT reboot, a public address change and a
rendezvous restart: the session survives each (QUIC keeps its stable mapped
peer address while the path manager moves packets between the direct path
and the relay) and every stanza arrives exactly once, in order. A peer that
crashes ends the session with the unacknowledged stanzas handed back.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from dtx import stanza as st
from dtx.aio.peer import Peer, PeerConfig, Session
from dtx.errors import SessionClosedError
from dtx.identity import save_identity
from dtx.lab import STANDARD_WAN, Home, Host, Lab
from dtx.proto.paths import PathConfig

from .traversal_helpers import (
    Device,
    device_peer,
    make_devices,
    server_address,
    start_rendezvous,
    write_vcards,
)

pytestmark = pytest.mark.netns

STANZAS = 10_000
RATE_PER_S = 2_000
"""Paced, so the stream is still running when the fault strikes."""
RDV_ARGS = ("--keepalive", "3", "--lifetime", "12")
CONFIG = PeerConfig(idle_timeout=30.0)


async def stream_through(
    sender: Session,
    receiver: Session,
    fault: Callable[[], Awaitable[None]],
    *,
    count: int = STANZAS,
    deadline: float = 120.0,
) -> list[str]:
    """Send ``count`` numbered stanzas at a steady pace, run ``fault`` when a
    third have gone, and collect what arrives."""

    async def pump() -> None:
        batch = RATE_PER_S // 20
        for i in range(0, count, batch):
            for j in range(i, min(count, i + batch)):
                sender.send(st.message(str(j)))
            if i <= count // 3 < i + batch:
                await fault()
            await asyncio.sleep(0.05)

    async def drain() -> list[str]:
        return [st.body_of(await receiver.receive()) or "" for _ in range(count)]

    async with asyncio.timeout(deadline):
        _, got = await asyncio.gather(pump(), drain())
        await sender.wait_acknowledged()
    return got


@dataclass
class Scene:
    """Two homes behind port-restricted NATs and a rendezvous process."""

    lab: Lab
    a: Device
    b: Device
    vcards: Path
    rdv: tuple[str, int]
    server: Host
    home_a: Home
    home_b: Home
    proc: subprocess.Popen[str]


def make_scene(lab: Lab, tmp_path: Path) -> Scene:
    server = lab.add_server("rdv")
    home_a = lab.add_home("a", nat="port-restricted-cone")
    home_b = lab.add_home("b", nat="port-restricted-cone")
    lab.up()
    a, b = make_devices(lab, home_a.hosts[0], home_b.hosts[0])
    vcards = tmp_path / "vcards"
    write_vcards(vcards, a.identity, b.identity)
    proc = start_rendezvous(server, vcards, *RDV_ARGS)
    return Scene(lab, a, b, vcards, server_address(server), server, home_a, home_b, proc)


@asynccontextmanager
async def direct_session(scene: Scene) -> AsyncIterator[tuple[Peer, Peer, Session, Session]]:
    """The remote and the TV, and a session between them by JID, settled on
    the direct path: (remote, tv, remote's session, TV's session)."""
    async with device_peer(scene.b, scene.vcards, scene.rdv, listen=True, config=CONFIG) as tv, \
            device_peer(scene.a, scene.vcards, scene.rdv, listen=False, config=CONFIG) as remote:
        await tv.wait_registered(10)
        session = await remote.connect("tv@example.org")
        session.send(st.message("hello"))
        async with asyncio.timeout(10):
            tv_side = await tv.accept()
            await tv_side.receive()
        await session.wait_path("direct", timeout=5)
        yield remote, tv, session, tv_side
        await session.close()


EXPECTED = [str(i) for i in range(STANZAS)]


def test_cut_direct_path_moves_to_relay_and_back(netns_ready: None, tmp_path: Path) -> None:
    with Lab(wan=STANDARD_WAN) as lab:
        scene = make_scene(lab, tmp_path)

        async def main() -> None:
            async with direct_session(scene) as (_, _, session, tv_side):
                assert session.connection.link is not None
                seen: list[str] = []
                session.on_path_change(lambda c: seen.append(c.kind.value))

                async def cut() -> None:
                    lab.block(scene.home_a, scene.home_b)
                    await session.wait_path("relay", timeout=10)
                    lab.unblock(scene.home_a, scene.home_b)

                assert await stream_through(session, tv_side, cut) == EXPECTED
                await session.wait_path("direct", timeout=30)
                assert seen[:2] == ["relay", "direct"]

        asyncio.run(main())


def test_nat_reboot_mid_stream(netns_ready: None, tmp_path: Path) -> None:
    with Lab(wan=STANDARD_WAN) as lab:
        scene = make_scene(lab, tmp_path)

        async def main() -> None:
            async with direct_session(scene) as (_, _, session, tv_side):

                async def reboot() -> None:
                    scene.home_a.flush_nat()
                    scene.home_b.flush_nat()

                assert await stream_through(session, tv_side, reboot) == EXPECTED
                # punched again: back on a direct path
                await session.wait_path("direct", timeout=30)

        asyncio.run(main())


def test_public_address_change_mid_stream(netns_ready: None, tmp_path: Path) -> None:
    with Lab(wan=STANDARD_WAN) as lab:
        scene = make_scene(lab, tmp_path)

        async def main() -> None:
            async with direct_session(scene) as (remote, _, session, tv_side):
                assert remote.traversal is not None
                before = remote.traversal.client.reflexive

                async def roam() -> None:
                    scene.home_a.change_public_ip()

                assert await stream_through(session, tv_side, roam) == EXPECTED
                await session.wait_path("direct", timeout=30)
                after = remote.traversal.client.reflexive
                assert after is not None and before is not None and after[0] != before[0]

        asyncio.run(main())


def test_rendezvous_restart_mid_stream(netns_ready: None, tmp_path: Path) -> None:
    with Lab(wan=STANDARD_WAN) as lab:
        scene = make_scene(lab, tmp_path)

        async def main() -> None:
            async with direct_session(scene) as (remote, tv, session, tv_side):
                traversals = [p.traversal for p in (remote, tv)]
                assert all(t is not None for t in traversals)
                old_ids = [t.client.registration for t in traversals if t is not None]

                async def restart() -> None:
                    scene.proc.terminate()
                    await asyncio.to_thread(scene.proc.wait, 10)
                    start_rendezvous(scene.server, scene.vcards, *RDV_ARGS)

                assert await stream_through(session, tv_side, restart) == EXPECTED
                assert session.path == "direct"  # the direct session carried on
                # both devices registered again by themselves
                async with asyncio.timeout(30):
                    for t in traversals:
                        assert t is not None
                        while t.client.registration in old_ids:
                            await t.wait_registered(30)
                            await asyncio.sleep(0.1)

        asyncio.run(main())


def test_peer_crash_hands_back_unacknowledged(netns_ready: None, tmp_path: Path) -> None:
    """The TV is a separate `dtx listen` process, killed mid-stream."""
    with Lab(wan=STANDARD_WAN) as lab:
        scene = make_scene(lab, tmp_path)
        a, b, vcards, rdv = scene.a, scene.b, scene.vcards, scene.rdv
        keyfile = tmp_path / "tv.key"
        save_identity(b.identity, keyfile)
        tv_proc = b.host.popen(
            [sys.executable, "-m", "dtx.cli", "listen", str(keyfile), "--port", "5300",
             "--host", "0.0.0.0", "--rendezvous", f"{rdv[0]}:{rdv[1]}",
             "--vcards", str(vcards), "--no-pins", "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert tv_proc.stdout is not None
        assert "listening" in tv_proc.stdout.readline()
        idle = 5.0

        async def main() -> None:
            # Without resumption: the session ends when the peer stops
            # answering (with it, test_resumption_lab.py).
            config = PeerConfig(idle_timeout=idle, paths=PathConfig(), resume_timeout=None)
            async with device_peer(a, vcards, rdv, listen=False, config=config) as remote:
                session = await remote.connect("tv@example.org", timeout=10)
                await session.ping()
                for i in range(100):
                    session.send(st.message(str(i)))
                await session.wait_acknowledged(timeout=10)
                os.kill(tv_proc.pid, signal.SIGKILL)
                loop = asyncio.get_running_loop()
                killed_at = loop.time()
                for i in range(100, 200):
                    session.send(st.message(str(i)))
                async with asyncio.timeout(idle + 10):
                    ended = await session.wait_closed()
                took = loop.time() - killed_at
                assert isinstance(ended.error, SessionClosedError)
                assert "stopped answering" in str(ended.error)
                bodies = [st.body_of(e) for e in ended.unacknowledged]
                assert bodies == [str(i) for i in range(100, 200)]
                assert took <= idle + 5

        asyncio.run(main())
