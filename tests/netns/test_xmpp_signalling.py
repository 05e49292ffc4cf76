"""Connecting by JID through the account's own XMPP server, in the NAT lab.

Prosody (``mod_turn_external``) and coturn run on the lab's server host;
no dtx rendezvous runs anywhere. Two devices of one account, each in its
own home, sign in with :class:`~dtx.aio.xmpp.XmppSignalling`, allocate on
coturn with the credentials XEP-0215 hands out, and the remote reaches the
TV by Jingle. A punchable pair (port-restricted cone and restricted cone)
ends on the direct path; the relay-only pair (symmetric and port-restricted
cone) stays on coturn, whose ``-v`` log shows both allocations, and
stanzas flow both ways on either.

Standard WAN (20 ms home to core, 40 ms core to server). Both devices'
event loops share one thread, in the first home's namespace:
each UDP socket is made in its own home (the paths under test), while the
TV's XMPP connection leaves from the first home too, which only the XMPP
server can tell.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from dtx.aio.peer import Peer, PeerConfig
from dtx.aio.xmpp import XmppSignalling, XmppSignallingConfig
from dtx.identity import DeviceIdentity, generate_identity
from dtx.lab import STANDARD_WAN, Lab, ns
from dtx.lab.coturn import CoturnServer, coturn_missing
from dtx.lab.prosody import ProsodyServer, TurnExternal, prosody_missing
from dtx.lab.topology import Host
from dtx.trust import PinStore, Verifier
from dtx.xmpp.client import XmppConfig, open_xmpp_client

from ..loopback.test_xmpp_signalling import stanzas_both_ways

pytestmark = pytest.mark.netns

SECRET = "dtx-lab-turn-secret"
DEADLINE = 10.0
SETTLE = 4.0
"""Seconds the relay-only pair is watched: past the quick punch attempts."""
PASSWORD = "pw-alice"


async def device(identity: DeviceIdentity, host: Host, xmpp: XmppConfig,
                 opened: list[tuple[Peer, XmppSignalling]]) -> tuple[Peer, XmppSignalling]:
    signalling = XmppSignalling(identity, PASSWORD, config=XmppSignallingConfig(
        xmpp=xmpp, connect_timeout=DEADLINE))
    peer = Peer(identity, Verifier([signalling.key_source], PinStore(None)),
                config=PeerConfig(host_addresses=(host.ip,)))
    await peer.start(sock=host.udp_socket())
    opened.append((peer, signalling))
    await signalling.start(peer)
    return peer, signalling


async def exchange(a: Host, b: Host, xmpp: XmppConfig, *, expect: str) -> dict[str, Any]:
    remote_id = generate_identity("alice@example.org/remote")
    tv_id = generate_identity("alice@example.org/tv")
    async with open_xmpp_client("alice@example.org", PASSWORD, config=xmpp) as client:
        for identity in (remote_id, tv_id):
            await client.publish_key(identity.public_key)
    opened: list[tuple[Peer, XmppSignalling]] = []
    try:
        tv, tv_sig = await device(tv_id, b, xmpp, opened)
        remote, remote_sig = await device(remote_id, a, xmpp, opened)
        for sig in (tv_sig, remote_sig):
            assert sig.turn is not None and sig.turn.relayed is not None
        started = asyncio.get_running_loop().time()
        session = await remote_sig.connect(tv_id.jid.full, timeout=DEADLINE)
        connect_time = asyncio.get_running_loop().time() - started
        async with asyncio.timeout(DEADLINE):
            accepted = await tv.accept()
        if expect == "relay":
            with pytest.raises(TimeoutError):
                await session.wait_path("direct", timeout=SETTLE)
        else:
            await session.wait_path(expect, timeout=DEADLINE)
            await accepted.wait_path(expect, timeout=DEADLINE)
        await stanzas_both_ways(session, accepted)
        assert accepted.peer_jid == remote_id.jid.full
        paths = (str(session.path), str(accepted.path))
        relayed = {tv_sig.turn.relayed, remote_sig.turn.relayed}  # type: ignore[union-attr]
        await session.close()
        return {"paths": paths, "relayed": relayed, "connect": connect_time}
    finally:
        for peer, sig in reversed(opened):
            await sig.close()
            await peer.close()


@pytest.mark.parametrize(("nat_a", "nat_b", "expect"), [
    ("port-restricted-cone", "restricted-cone", "direct"),
    ("symmetric", "port-restricted-cone", "relay"),
])
def test_connect_by_jid_in_the_lab(netns_ready: None, tmp_path: Path, nat_a: str, nat_b: str,
                                   expect: str) -> None:
    for reason in (prosody_missing(), coturn_missing()):
        if reason:
            pytest.skip(reason)
    with Lab(wan=STANDARD_WAN) as lab:
        server = lab.add_server("xmpp", addresses=1)
        home_a = lab.add_home("a", nat=nat_a)
        home_b = lab.add_home("b", nat=nat_b)
        lab.up()
        coturn = CoturnServer(SECRET, realm="example.org", host=server,
                              folder=str(tmp_path / "turn"))
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
                exchange(a, b, xmpp, expect=expect)))
        finally:
            prosody.stop()
            log = coturn.stop()
    print(f"\n{nat_a} x {nat_b}: connect by JID {outcome['connect'] * 1000:.0f} ms "
          f"(Jingle and the QUIC handshake; ends on the {expect} path)")
    assert outcome["paths"] == (expect, expect), outcome
    allocations = [s for s in coturn.sessions(log) if s.event == "new"]
    assert len(allocations) == 2 and {s.realm for s in allocations} == {"example.org"}, log
    relayed = outcome["relayed"]
    assert isinstance(relayed, set) and all(r[0] == server.ip for r in relayed)
    if expect == "relay":
        assert "CHANNEL_BIND processed, success" in log, log
