"""Birthday probing in the NAT lab: a symmetric NAT (``masquerade
fully-random``: random ports over the whole range) and a port-restricted
cone, kernel NAT both, a real rendezvous process with its mapping check,
in-process devices whose sockets (the extra ones of the search included)
live in the homes.

The matrix (``test_traversal.py``) shows that the pair ends direct; here:
the session carries stanzas on the relay all through the search, none lost
or doubled; the hard side closes its losing sockets at once; and a home
behind a symmetric carrier-grade NAT finds its way the same way.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from dtx import stanza as st
from dtx.aio.peer import Peer, PeerConfig
from dtx.lab import STANDARD_WAN, Lab
from dtx.lab.topology import Host

from .test_traversal import BIRTHDAY_TEST, BIRTHDAY_WITHIN
from .traversal_helpers import device_peer, rendezvous_scene

pytestmark = pytest.mark.netns

TV = "tv@example.org/living-room"
REMOTE = "remote@example.org/phone"
EVERY = 0.1
"""A stanza this often while the search runs."""


def hard_side(peers: tuple[Peer, Peer], symmetric_first: bool) -> tuple[Peer, str]:
    """The device behind the symmetric NAT and its peer's JID."""
    remote, tv = peers
    return (remote, TV) if symmetric_first else (tv, REMOTE)


def run(tmp_path: Path, a_host: Host, b_host: Host, server: Host, lab: Lab,
        *, symmetric_first: bool) -> dict[str, object]:
    a, b, vcards, rdv = rendezvous_scene(lab, server, a_host, b_host, tmp_path)
    config = PeerConfig(traversal=BIRTHDAY_TEST)

    async def main() -> dict[str, object]:
        async with device_peer(b, vcards, rdv, listen=True, config=config) as tv, \
                device_peer(a, vcards, rdv, listen=False, config=config) as remote:
            await tv.wait_registered(10)
            loop = asyncio.get_running_loop()
            session = await remote.connect("tv@example.org", timeout=10)
            async with asyncio.timeout(10):
                tv_side = await tv.accept()
            sent: list[str] = []
            deadline = loop.time() + BIRTHDAY_WITHIN
            paths: list[str] = []
            while (session.path, tv_side.path) != ("direct", "direct"):
                assert loop.time() < deadline, "direct within %.0f s" % BIRTHDAY_WITHIN
                body = "during %d" % len(sent)
                session.send(st.message(body, to="tv@example.org"))
                sent.append(body)
                paths.append(session.path)
                await asyncio.sleep(EVERY)
            direct_after = BIRTHDAY_WITHIN - (deadline - loop.time())
            async with asyncio.timeout(10):
                got = [st.body_of(await tv_side.receive()) for _ in sent]
            assert got == sent, "every stanza of the search, once, in order"
            await session.wait_acknowledged(timeout=10)
            assert tv_side.receive_nowait() is None, "and nothing twice"
            hard, peer_jid = hard_side((remote, tv), symmetric_first)
            assert hard.traversal is not None
            link = hard.traversal.links[peer_jid]
            open_sockets = len(hard._side)
            # A hit on the device's own socket needs no extra one.
            assert open_sockets == (0 if link.side is None else 1), \
                "the losing sockets are closed at once"
            # On the winning path, both ways.
            for i in range(20):
                tv_side.send(st.message("back %d" % i))
            async with asyncio.timeout(10):
                back = [st.body_of(await session.receive()) for _ in range(20)]
            assert back == ["back %d" % i for i in range(20)]
            assert (session.path, tv_side.path) == ("direct", "direct")
            await session.close()
            return {"direct_after": direct_after, "stanzas": len(sent),
                    "counters": dict(hard.traversal.counters), "paths": paths}

    return asyncio.run(main())


@pytest.mark.parametrize("symmetric_first", [True, False],
                         ids=["symmetric-calls", "symmetric-answers"])
def test_a_symmetric_and_a_port_restricted_home_go_direct_with_nothing_lost(
        netns_ready: None, tmp_path: Path, symmetric_first: bool) -> None:
    with Lab(wan=STANDARD_WAN) as lab:
        server = lab.add_server("rdv")
        sym = lab.add_home("s", nat="symmetric").hosts[0]
        prc = lab.add_home("p", nat="port-restricted-cone").hosts[0]
        lab.up()
        a_host, b_host = (sym, prc) if symmetric_first else (prc, sym)
        result = run(tmp_path, a_host, b_host, server, lab, symmetric_first=symmetric_first)
    counters = result["counters"]
    assert isinstance(counters, dict)
    assert counters["birthday_searches"] == 1 and counters["birthday_failed"] == 0
    paths = result["paths"]
    assert isinstance(paths, list) and paths[0] == "relay" and paths.count("relay") >= 5, \
        "the session rode the relay meanwhile (the search begins 1 s after the introduction)"


def test_a_home_behind_a_symmetric_carrier_nat_goes_direct(netns_ready: None,
                                                           tmp_path: Path) -> None:
    """A port-restricted home router behind a symmetric CGN: the CGN's
    mapping is what the server observes (endpoint-dependent), so the home
    is the hard side; its router keeps each extra socket's port, the CGN
    randomises it, and the search works through both layers."""
    with Lab(wan=STANDARD_WAN) as lab:
        server = lab.add_server("rdv")
        inner = lab.add_double_nat_home("d", nat="port-restricted-cone").hosts[0]
        prc = lab.add_home("p", nat="port-restricted-cone").hosts[0]
        lab.up()
        result = run(tmp_path, inner, prc, server, lab, symmetric_first=True)
    counters = result["counters"]
    assert isinstance(counters, dict) and counters["birthday_searches"] == 1
