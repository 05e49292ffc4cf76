"""Connecting by JID through every pair of NAT profiles, in the NAT lab.

The expectation table (also in docs/nat-traversal.md): the session runs on
a direct path whenever at least one side maps endpoint-independently;
symmetric with symmetric stays on the relay. Symmetric with
port-restricted-cone goes direct by birthday probing (the rendezvous checks
each device's mapping on its second port); without that check (a server
run with ``--no-mapping-port``) it stays on the relay too.
"""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import pytest

from dtx import stanza as st
from dtx.aio.peer import PeerConfig
from dtx.lab import STANDARD_WAN, Lab
from dtx.proto.birthday import BirthdayConfig
from dtx.proto.traversal import TraversalConfig

from .traversal_helpers import device_peer, rendezvous_scene

pytestmark = pytest.mark.netns

PROFILES = ["none", "full-cone", "restricted-cone", "port-restricted-cone", "symmetric"]
RELAY_ONLY = {frozenset({"symmetric"})}
BIRTHDAY_PAIRS = {frozenset({"symmetric", "port-restricted-cone"})}
"""Direct only by birthday probing."""


def expected_path(a: str, b: str, *, birthday: bool = True) -> str:
    pair = frozenset({a, b})
    if pair in RELAY_ONLY or (not birthday and pair in BIRTHDAY_PAIRS):
        return "relay"
    return "direct"


BIRTHDAY_WITHIN = 15.0
"""Seconds for a birthday search (it starts 1 s after the introduction)."""
BIRTHDAY_TEST = TraversalConfig(birthday=BirthdayConfig(probes=3000, rate=300.0))
"""Three times the default probes at three times the rate: 1 − (1 −
256/64,512)^3000 leaves a search empty-handed about once in 150,000 (the
defaults: once in 80, which the bench measures rather than a test)."""


PAIRS = list(itertools.combinations_with_replacement(PROFILES, 2))
# Both orders where it matters (who initiates): the relay-only pair and a
# symmetric/cone pair.
PAIRS += [("symmetric", "port-restricted-cone"), ("symmetric", "restricted-cone")]

SETTLE = 4.0
"""Seconds a relay-only pair is watched: past the quick punch attempts."""


async def exchange(initiator, responder, *, expect: str,  # type: ignore[no-untyped-def]
                   within: float = SETTLE) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    start = loop.time()
    session = await initiator.connect("tv@example.org", timeout=10)
    session.send(st.message("pause", to="tv@example.org"))
    async with asyncio.timeout(10):
        tv_side = await responder.accept()
        got = await tv_side.receive()
    first_ms = (loop.time() - start) * 1000
    assert st.body_of(got) == "pause"
    assert got.get("from") == "remote@example.org/phone"
    tv_side.send(st.message("paused"))
    async with asyncio.timeout(10):
        back = await session.receive()
    assert st.body_of(back) == "paused"
    if expect == "relay":
        with pytest.raises(TimeoutError):
            await session.wait_path("direct", timeout=SETTLE)
        assert session.path == "relay" and tv_side.path == "relay"
    else:
        await session.wait_path(expect, timeout=within)
        await tv_side.wait_path(expect, timeout=within)
    # stanzas still flow both ways on the final path
    for i in range(20):
        session.send(st.message(str(i)))
    async with asyncio.timeout(10):
        bodies = [st.body_of(await tv_side.receive()) for _ in range(20)]
    assert bodies == [str(i) for i in range(20)]
    await session.wait_acknowledged(timeout=10)
    await session.close()
    return {"first_stanza_ms": first_ms, "path": session.path}


def run_pair(lab: Lab, tmp_path: Path, nat_a: str, nat_b: str, *, same_nat: bool = False,
             double: bool = False) -> dict[str, object]:
    server = lab.add_server("rdv")
    if same_nat:
        home = lab.add_home("h", nat=nat_a, hosts=2)
        a_host, b_host = home.hosts
    else:
        home_a = (lab.add_double_nat_home("a", nat=nat_a) if double
                  else lab.add_home("a", nat=nat_a))
        home_b = lab.add_home("b", nat=nat_b)
        a_host, b_host = home_a.hosts[0], home_b.hosts[0]
    lab.up()
    a, b, vcards, rdv = rendezvous_scene(lab, server, a_host, b_host, tmp_path)
    config = PeerConfig(traversal=BIRTHDAY_TEST)
    birthday = frozenset({nat_a, nat_b}) in BIRTHDAY_PAIRS and not same_nat

    async def main() -> dict[str, object]:
        async with device_peer(b, vcards, rdv, listen=True, config=config) as tv, \
                device_peer(a, vcards, rdv, listen=False, config=config) as remote:
            await tv.wait_registered(10)
            expect = "lan" if same_nat else expected_path(nat_a, nat_b)
            result = await exchange(remote, tv, expect=expect,
                                    within=BIRTHDAY_WITHIN if birthday else SETTLE)
            result["birthday_searches"] = [
                p.traversal.counters["birthday_searches"]  # type: ignore[union-attr]
                for p in (remote, tv)]
            return result

    return asyncio.run(main())


@pytest.mark.parametrize("nat_a, nat_b", PAIRS, ids=[f"{a}--{b}" for a, b in PAIRS])
def test_connect_by_jid_through_nat_pair(netns_ready: None, tmp_path: Path,
                                         nat_a: str, nat_b: str) -> None:
    with Lab(wan=STANDARD_WAN) as lab:
        result = run_pair(lab, tmp_path, nat_a, nat_b)
    assert result["path"] == expected_path(nat_a, nat_b)
    if frozenset({nat_a, nat_b}) in BIRTHDAY_PAIRS:
        assert result["birthday_searches"] == [1, 1], "both sides of the hard pair searched"
    elif "symmetric" not in (nat_a, nat_b):
        assert result["birthday_searches"] == [0, 0], "no search between cone NATs"


def test_two_devices_behind_the_same_nat(netns_ready: None, tmp_path: Path) -> None:
    with Lab(wan=STANDARD_WAN) as lab:
        result = run_pair(lab, tmp_path, "port-restricted-cone", "port-restricted-cone",
                          same_nat=True)
    assert result["path"] == "lan"


def test_double_nat(netns_ready: None, tmp_path: Path) -> None:
    # A home port-restricted NAT behind a symmetric carrier-grade NAT, to a
    # full-cone home: the symmetric layer decides, and full cone lets it in.
    with Lab(wan=STANDARD_WAN) as lab:
        result = run_pair(lab, tmp_path, "port-restricted-cone", "full-cone", double=True)
    assert result["path"] == "direct"


def test_a_device_that_restarts_connects_again_directly(netns_ready: None,
                                                       tmp_path: Path) -> None:
    """The remote restarts (a new socket, a new public port) and connects
    to the same TV again: the TV drops the old address and the new session
    goes direct like the first."""
    with Lab(wan=STANDARD_WAN) as lab:
        server = lab.add_server("rdv")
        home_a = lab.add_home("a", nat="port-restricted-cone")
        home_b = lab.add_home("b", nat="port-restricted-cone")
        lab.up()
        a, b, vcards, rdv = rendezvous_scene(lab, server, home_a.hosts[0], home_b.hosts[0],
                                             tmp_path)

        async def main() -> None:
            async with device_peer(b, vcards, rdv, listen=True) as tv:
                await tv.wait_registered(10)
                old_address = None
                for _ in range(2):
                    async with device_peer(a, vcards, rdv, listen=False) as remote:
                        result = await exchange(remote, tv, expect="direct")
                        assert result["path"] == "direct"
                        assert remote.traversal is not None
                        public = remote.traversal.client.reflexive
                        assert public is not None and public != old_address
                        link = tv.traversal.links["remote@example.org/phone"]  # type: ignore[union-attr]
                        if old_address is not None:
                            assert not link.paths.knows(old_address)
                        old_address = public

        asyncio.run(main())
