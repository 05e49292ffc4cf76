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
from dtx.aio.peer import Peer
from dtx.aio.xmpp import XmppSignalling
from dtx.identity import generate_identity
from dtx.lab import STANDARD_WAN, Lab, ns
from dtx.lab.coturn import CoturnServer, coturn_missing
from dtx.lab.prosody import ProsodyServer, TurnExternal, prosody_missing
from dtx.lab.topology import Host
from dtx.proto import turn as tp
from dtx.xmpp.client import XmppConfig, open_xmpp_client

from ..loopback.test_xmpp_signalling import stanzas_both_ways
from .test_xmpp_signalling import PASSWORD, SECRET, device

pytestmark = pytest.mark.netns

TTL = 4
"""Seconds each set of TURN credentials is valid (renewed at half-life)."""
LIFETIME = 6
"""coturn's --max-allocate-lifetime: refreshed every few seconds."""
DEADLINE = 10.0
WATCH = 3 * TTL
"""Seconds of traffic: three credential lifetimes, two allocation refreshes."""


async def relay_through_expiry(a: Host, b: Host, xmpp: XmppConfig) -> dict[str, object]:
    remote_id = generate_identity("alice@example.org/remote")
    tv_id = generate_identity("alice@example.org/tv")
    async with open_xmpp_client("alice@example.org", PASSWORD, config=xmpp) as client:
        for identity in (remote_id, tv_id):
            await client.publish_key(identity.public_key)
    opened: list[tuple[Peer, XmppSignalling]] = []
    loop = asyncio.get_running_loop()
    try:
        tv, tv_sig = await device(tv_id, b, xmpp, opened)
        remote, remote_sig = await device(remote_id, a, xmpp, opened)
        turns = [sig.turn for sig in (remote_sig, tv_sig)]
        relayed = [t.relayed for t in turns if t is not None]
        first = remote_sig.turn_service
        assert first is not None and first.expires is not None and len(relayed) == 2
        session = await remote_sig.connect(tv_id.jid.full, timeout=DEADLINE)
        async with asyncio.timeout(DEADLINE):
            accepted = await tv.accept()
        sent = 0
        end = loop.time() + WATCH
        while loop.time() < end:
            session.send(st.message(f"pause {sent}", to=accepted.local_jid))
            accepted.send(st.message(f"paused {sent}", to=session.local_jid))
            async with asyncio.timeout(DEADLINE):
                assert st.body_of(await accepted.receive()) == f"pause {sent}"
                assert st.body_of(await session.receive()) == f"paused {sent}"
            sent += 1
        outcome = {
            "sent": sent, "paths": (str(session.path), str(accepted.path)),
            "past_first_expiry": loop.time() - first.expires,
            "renewed": [s.counters["credentials_renewed"] for s in (remote_sig, tv_sig)],
            "failed": [s.counters["credentials_failed"] for s in (remote_sig, tv_sig)],
            "states": [None if t is None else t.state for t in turns],
            "relayed_now": [None if t is None else t.relayed for t in turns],
            "relayed": relayed,
        }
        await session.close()
        return outcome
    finally:
        for peer, sig in reversed(opened):
            await sig.close()
            await peer.close()


def test_credentials_expire_and_are_renewed_under_a_relayed_session(
        netns_ready: None, tmp_path: Path) -> None:
    for reason in (prosody_missing(), coturn_missing()):
        if reason:
            pytest.skip(reason)
    with Lab(wan=STANDARD_WAN) as lab:
        server = lab.add_server("xmpp", addresses=1)
        home_a = lab.add_home("a", nat="symmetric")
        home_b = lab.add_home("b", nat="port-restricted-cone")
        lab.up()
        coturn = CoturnServer(SECRET, realm="example.org", host=server,
                              folder=str(tmp_path / "turn"), max_allocate_lifetime=LIFETIME)
        coturn.start()
        prosody = ProsodyServer("vcard4", host=server, folder=str(tmp_path / "prosody"),
                                turn=TurnExternal(secret=SECRET, host=server.ip,
                                                  port=coturn.port, ttl=TTL))
        try:
            prosody.start()
            prosody.register("alice", PASSWORD)
            xmpp = XmppConfig(server=prosody.address(), allow_plaintext=True, timeout=DEADLINE)
            a, b = home_a.hosts[0], home_b.hosts[0]
            outcome = ns.in_netns(a.netns, lambda: asyncio.run(relay_through_expiry(a, b, xmpp)))
        finally:
            prosody.stop()
            log = coturn.stop()
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
    refreshed = [s for s in coturn.sessions(log) if s.event == "refreshed"]
    assert len(refreshed) >= 2, log  # refreshed after the first credentials expired


async def relay_through_restart(a: Host, b: Host, xmpp: XmppConfig,
                                coturn: CoturnServer) -> dict[str, object]:
    remote_id = generate_identity("alice@example.org/remote")
    tv_id = generate_identity("alice@example.org/tv")
    async with open_xmpp_client("alice@example.org", PASSWORD, config=xmpp) as client:
        for identity in (remote_id, tv_id):
            await client.publish_key(identity.public_key)
    opened: list[tuple[Peer, XmppSignalling]] = []
    loop = asyncio.get_running_loop()
    try:
        tv, tv_sig = await device(tv_id, b, xmpp, opened)
        remote, remote_sig = await device(remote_id, a, xmpp, opened)
        sigs = (remote_sig, tv_sig)
        before = [s.turn.relayed if s.turn is not None else None for s in sigs]
        session = await remote_sig.connect(tv_id.jid.full, timeout=DEADLINE)
        async with asyncio.timeout(DEADLINE):
            accepted = await tv.accept()
        await stanzas_both_ways(session, accepted, n=5)
        await asyncio.to_thread(coturn.restart)
        restarted = loop.time()
        sent = 0
        # a stanza each way at a time, until both allocated again (and then some)
        while any(s.counters["reallocations"] == 0 for s in sigs) or sent < 10:
            session.send(st.message(f"pause {sent}", to=accepted.local_jid))
            accepted.send(st.message(f"paused {sent}", to=session.local_jid))
            async with asyncio.timeout(3 * DEADLINE):
                assert st.body_of(await accepted.receive()) == f"pause {sent}"
                assert st.body_of(await session.receive()) == f"paused {sent}"
            sent += 1
            assert loop.time() < restarted + 6 * DEADLINE, "bounded"
        outcome = {
            "sent": sent, "took": loop.time() - restarted,
            "reallocations": [s.counters["reallocations"] for s in sigs],
            "before": before,
            "after": [s.turn.relayed if s.turn is not None else None for s in sigs],
            "paths": (str(session.path), str(accepted.path)),
            "candidates": [sorted(c.type.value for c in s.local_candidates()) for s in sigs],
        }
        await session.close()
        return outcome
    finally:
        for peer, sig in reversed(opened):
            await sig.close()
            await peer.close()


def test_a_turn_server_restart_under_a_relayed_session(netns_ready: None,
                                                       tmp_path: Path) -> None:
    """coturn restarts: every allocation is gone. Each device finds out at
    its next refresh (437), allocates again, trickles its new relayed
    address, and the session goes on over the new allocations; the
    stanzas sent meanwhile arrive, in order."""
    for reason in (prosody_missing(), coturn_missing()):
        if reason:
            pytest.skip(reason)
    with Lab(wan=STANDARD_WAN) as lab:
        server = lab.add_server("xmpp", addresses=1)
        home_a = lab.add_home("a", nat="symmetric")
        home_b = lab.add_home("b", nat="symmetric")
        lab.up()
        coturn = CoturnServer(SECRET, realm="example.org", host=server,
                              folder=str(tmp_path / "turn"), max_allocate_lifetime=LIFETIME)
        coturn.start()
        prosody = ProsodyServer("vcard4", host=server, folder=str(tmp_path / "prosody"),
                                turn=TurnExternal(secret=SECRET, host=server.ip,
                                                  port=coturn.port, ttl=600))
        try:
            prosody.start()
            prosody.register("alice", PASSWORD)
            xmpp = XmppConfig(server=prosody.address(), allow_plaintext=True, timeout=DEADLINE)
            a, b = home_a.hosts[0], home_b.hosts[0]
            outcome = ns.in_netns(a.netns, lambda: asyncio.run(
                relay_through_restart(a, b, xmpp, coturn)))
        finally:
            prosody.stop()
            coturn.stop()
    print(f"\ncoturn restarted: {outcome['sent']} stanzas each way, both allocated again and "
          f"the session back in {outcome['took']:.1f} s")
    assert outcome["reallocations"] == [1, 1], outcome
    assert outcome["paths"] == ("relay", "relay"), outcome
    before, after = outcome["before"], outcome["after"]
    assert isinstance(before, list) and isinstance(after, list) and None not in after
    assert all(x != y for x, y in zip(before, after)), outcome  # new allocations
    assert outcome["candidates"] == [["host", "relay", "srflx"]] * 2, outcome
