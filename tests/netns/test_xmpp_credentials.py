"""TURN credentials that expire under a relayed session, in the NAT lab.

Prosody mints TURN credentials for ``TTL`` seconds (a lab's minute, made
shorter still) and coturn caps allocations at ``LIFETIME`` seconds, so
within a few seconds both devices renew their credentials over XMPP more
than once, the first credentials expire, and the allocations are refreshed
after that. A relay-only pair (symmetric and port-restricted cone) keeps
one session on coturn the whole time, a stanza each way at a time: none is
lost, none arrives out of order, and the allocations are the ones made at
the start (coturn keeps an allocation's first credentials: it answers new
ones with 441, then goes on taking the first after their expiry).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from dtx import stanza as st
from dtx.aio.xmpp import XmppSignalling
from dtx.lab import STANDARD_WAN, Lab
from dtx.proto import turn as tp
from dtx.wire.address import Address

from ..loopback.test_xmpp_signalling import stanzas_both_ways
from .test_xmpp_signalling import Connected, connected, in_first_home, xmpp_lab

pytestmark = pytest.mark.netns

TTL = 4
"""Seconds each set of TURN credentials is valid (renewed at half-life)."""
LIFETIME = 6
"""coturn's --max-allocate-lifetime: refreshed every few seconds."""
DEADLINE = 10.0
WATCH = 3 * TTL
"""Seconds of traffic: three credential lifetimes, two allocation refreshes."""


async def one_each_way(c: Connected, i: int, timeout: float = DEADLINE) -> None:
    """Stanza ``i`` from the remote and its answer from the TV, both
    received in order before the next."""
    c.session.send(st.message(f"pause {i}", to=c.accepted.local_jid))
    c.accepted.send(st.message(f"paused {i}", to=c.session.local_jid))
    async with asyncio.timeout(timeout):
        assert st.body_of(await c.accepted.receive()) == f"pause {i}"
        assert st.body_of(await c.session.receive()) == f"paused {i}"


def relayed_of(sigs: tuple[XmppSignalling, XmppSignalling]) -> list[Address | None]:
    return [None if s.turn is None else s.turn.relayed for s in sigs]


def test_credentials_expire_and_are_renewed_under_a_relayed_session(
        netns_ready: None, tmp_path: Path) -> None:
    async def main() -> dict[str, object]:
        loop = asyncio.get_running_loop()
        async with connected(scene) as c:
            sigs = c.signalling
            turns = [sig.turn for sig in sigs]
            relayed = relayed_of(sigs)
            first = sigs[0].turn_service
            assert first is not None and first.expires is not None
            sent = 0
            end = loop.time() + WATCH
            while loop.time() < end:
                await one_each_way(c, sent)
                sent += 1
            return {
                "sent": sent, "paths": (str(c.session.path), str(c.accepted.path)),
                "past_first_expiry": loop.time() - first.expires,
                "renewed": [s.counters["credentials_renewed"] for s in sigs],
                "failed": [s.counters["credentials_failed"] for s in sigs],
                "states": [None if t is None else t.state for t in turns],
                "relayed_now": relayed_of(sigs),
                "relayed": relayed,
            }

    with Lab(wan=STANDARD_WAN) as lab, xmpp_lab(
            lab, tmp_path, "symmetric", "port-restricted-cone", ttl=TTL,
            max_allocate_lifetime=LIFETIME) as scene:
        outcome = in_first_home(scene, main)
        log = scene.coturn.stop()
    print(f"\n{outcome['sent']} stanzas each way over coturn in {WATCH} s; credentials "
          f"renewed {outcome['renewed']} times; {outcome['past_first_expiry']:.1f} s past "
          "the first ones' expiry")
    assert outcome["paths"] == ("relay", "relay"), outcome
    assert outcome["failed"] == [0, 0], outcome
    renewed = outcome["renewed"]
    assert isinstance(renewed, list) and all(n >= 2 for n in renewed), outcome
    past = outcome["past_first_expiry"]
    assert isinstance(past, float) and past > TTL, outcome
    assert outcome["states"] == [tp.AllocationState.ALLOCATED] * 2, outcome
    assert outcome["relayed_now"] == outcome["relayed"], outcome  # the allocations of the start
    refreshed = [s for s in scene.coturn.sessions(log) if s.event == "refreshed"]
    assert len(refreshed) >= 2, log  # refreshed after the first credentials expired


def test_a_turn_server_restart_under_a_relayed_session(netns_ready: None,
                                                       tmp_path: Path) -> None:
    """coturn restarts: every allocation is gone. Each device finds out at
    its next refresh (437), allocates again, trickles its new relayed
    address, and the session goes on over the new allocations; the
    stanzas sent meanwhile arrive, in order."""
    async def main() -> dict[str, object]:
        loop = asyncio.get_running_loop()
        async with connected(scene) as c:
            sigs = c.signalling
            before = relayed_of(sigs)
            await stanzas_both_ways(c.session, c.accepted, n=5)
            await asyncio.to_thread(scene.coturn.restart)
            restarted = loop.time()
            sent = 0
            # a stanza each way at a time, until both allocated again (and then some)
            while any(s.counters["reallocations"] == 0 for s in sigs) or sent < 10:
                await one_each_way(c, sent, 3 * DEADLINE)
                sent += 1
                assert loop.time() < restarted + 6 * DEADLINE, "bounded"
            return {
                "sent": sent, "took": loop.time() - restarted,
                "reallocations": [s.counters["reallocations"] for s in sigs],
                "before": before, "after": relayed_of(sigs),
                "paths": (str(c.session.path), str(c.accepted.path)),
                "candidates": [sorted(k.type.value for k in s.local_candidates()) for s in sigs],
            }

    with Lab(wan=STANDARD_WAN) as lab, xmpp_lab(
            lab, tmp_path, "symmetric", "symmetric", max_allocate_lifetime=LIFETIME) as scene:
        outcome = in_first_home(scene, main)
    print(f"\ncoturn restarted: {outcome['sent']} stanzas each way, both allocated again and "
          f"the session back in {outcome['took']:.1f} s")
    assert outcome["reallocations"] == [1, 1], outcome
    assert outcome["paths"] == ("relay", "relay"), outcome
    before, after = outcome["before"], outcome["after"]
    assert isinstance(before, list) and isinstance(after, list) and None not in after
    assert all(x != y for x, y in zip(before, after)), outcome  # new allocations
    assert outcome["candidates"] == [["host", "relay", "srflx"]] * 2, outcome
