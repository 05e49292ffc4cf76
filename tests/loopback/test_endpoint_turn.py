"""A dtx session relayed by a real TURN server (coturn) on loopback.

The remote device relays through its own TURN allocation
(:meth:`Endpoint.use_turn`); the TV sends plain UDP to the remote's relayed
address. Both links come from an :class:`Introduction` made here, as the
XMPP signalling will make them: this proves the relay path of the endpoint
that ships — TURN in front of the first-byte demultiplexer, ChannelData
from the TURN server never taken for QUIC, relayed QUIC reaching the
session of its link — against coturn's own implementation.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import time

import pytest

from dtx import stanza as st
from dtx.aio.peer import Peer, open_peer
from dtx.identity import DeviceIdentity
from dtx.proto import turn as tp
from dtx.proto.paths import PathKind
from dtx.proto.traversal import Introduction

from .conftest import trusting
from .test_turn_coturn import REALM, Coturn, coturn, rest_credentials  # noqa: F401

DEADLINE = 10.0

pytestmark = pytest.mark.skipif(
    shutil.which("turnserver") is None,
    reason="needs coturn's turnserver (Debian package coturn; scripts/setup installs it)",
)


class Seen:
    """Every event the peer's driver hands to its listeners (TURN events
    among them), with a wake-up for whoever waits for one."""

    def __init__(self, peer: Peer) -> None:
        self.events: list[object] = []
        self._changed = asyncio.Event()
        peer.add_event_listener(self._add)

    def _add(self, ev: object) -> None:
        self.events.append(ev)
        self._changed.set()

    async def first(self, kind: type[object]) -> object:
        async with asyncio.timeout(DEADLINE):
            while True:
                for ev in self.events:
                    if isinstance(ev, kind):
                        return ev
                self._changed.clear()
                await self._changed.wait()


async def test_a_session_relayed_through_coturn(coturn: Coturn, tv_id: DeviceIdentity,
                                                remote_id: DeviceIdentity) -> None:
    async with open_peer(tv_id, trusting(tv_id, remote_id)) as tv, \
            open_peer(remote_id, trusting(tv_id, remote_id), listen=False) as remote:
        seen = Seen(remote)
        username, password = rest_credentials("remote", int(time.time()) + 3600)
        loop = asyncio.get_running_loop()
        client = tp.TurnClient(coturn.address, username, password, loop.time() + 3600,
                               rng=random.Random(5))
        endpoint = remote.endpoint
        endpoint.use_turn(client, loop.time())
        remote._wake()
        allocated = await seen.first(tp.Allocated)
        assert isinstance(allocated, tp.Allocated)
        relayed = allocated.relayed
        client.bind_channel(tv.address, loop.time())
        remote._wake()
        await seen.first(tp.ChannelBound)

        intro, probe_key = b"turntest", b"k" * 32
        endpoint.introduced(Introduction(
            tv_id.jid.full, tv_id.public_key, intro, probe_key, True, (),
            client.relay_wrap(tv.address), None, "test", relay_peer=tv.address),
            loop.time())
        tv.endpoint.introduced(Introduction(
            remote_id.jid.full, remote_id.public_key, intro, probe_key, False, (),
            lambda payload: (payload, relayed), None, "test", relay_peer=relayed),
            loop.time())

        session = await remote.connect(tv_id.jid.full, timeout=DEADLINE)
        async with asyncio.timeout(DEADLINE):
            accepted = await tv.accept()
        assert session.path is PathKind.RELAY and accepted.path is PathKind.RELAY
        for i in range(50):
            session.send(st.message(f"pause {i}", to=tv_id.jid.full))
        async with asyncio.timeout(DEADLINE):
            got = [st.body_of(await accepted.receive()) for _ in range(50)]
        assert got == [f"pause {i}" for i in range(50)]
        assert await session.ping(timeout=DEADLINE) > 0
        assert client.channel(tv.address) is not None, "relayed as ChannelData"
        await session.close()
    log = coturn.stop()
    assert f"realm=<{REALM}>, username=<{username}>" in log, "coturn made the allocation"
