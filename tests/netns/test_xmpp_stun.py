"""A domain whose server lists STUN and no TURN, in the NAT lab.

Prosody names only a STUN server by XEP-0215 (``mod_external_services``;
coturn answers the Bindings, no allocation is possible with no
credentials). Each device asks it, from its peer's one UDP socket, for its
reflexive address (a STUN Binding, :class:`~dtx.proto.binding.BindingClient`)
and offers that with its host candidate: a punchable pair (port-restricted
cone and restricted cone) ends on the direct path with no relay at all.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from dtx.aio.peer import Peer
from dtx.aio.xmpp import XmppSignalling
from dtx.identity import generate_identity
from dtx.lab import STANDARD_WAN, Lab, ns
from dtx.lab.coturn import CoturnServer, coturn_missing
from dtx.lab.prosody import ProsodyServer, prosody_missing
from dtx.lab.topology import Home, Host
from dtx.wire.jingle import CandidateType
from dtx.xmpp.client import XmppConfig, open_xmpp_client

from ..loopback.test_xmpp_signalling import stanzas_both_ways
from .test_xmpp_signalling import PASSWORD, SECRET, device

pytestmark = pytest.mark.netns

DEADLINE = 10.0


async def over_stun(a: Host, b: Host, xmpp: XmppConfig,
                    homes: tuple[Home, Home]) -> dict[str, object]:
    remote_id = generate_identity("alice@example.org/remote")
    tv_id = generate_identity("alice@example.org/tv")
    async with open_xmpp_client("alice@example.org", PASSWORD, config=xmpp) as client:
        for identity in (remote_id, tv_id):
            await client.publish_key(identity.public_key)
    opened: list[tuple[Peer, XmppSignalling]] = []
    try:
        tv, tv_sig = await device(tv_id, b, xmpp, opened)
        remote, remote_sig = await device(remote_id, a, xmpp, opened)
        kinds = [sorted(c.type.value for c in sig.local_candidates())
                 for sig in (remote_sig, tv_sig)]
        reflexive = [next((c.addr[0] for c in sig.local_candidates()
                           if c.type is CandidateType.SRFLX), None)
                     for sig in (remote_sig, tv_sig)]
        session = await remote_sig.connect(tv_id.jid.full, timeout=DEADLINE)
        async with asyncio.timeout(DEADLINE):
            accepted = await tv.accept()
        await session.wait_path("direct", timeout=DEADLINE)
        await stanzas_both_ways(session, accepted)
        outcome = {"kinds": kinds, "reflexive": reflexive,
                   "public": [h.public_ip for h in homes],
                   "turn": [sig.turn for sig in (remote_sig, tv_sig)],
                   "paths": (str(session.path), str(accepted.path))}
        await session.close()
        return outcome
    finally:
        for peer, sig in reversed(opened):
            await sig.close()
            await peer.close()


def test_a_stun_only_server_gives_reflexive_candidates_that_punch(
        netns_ready: None, tmp_path: Path) -> None:
    for reason in (prosody_missing(), coturn_missing()):
        if reason:
            pytest.skip(reason)
    with Lab(wan=STANDARD_WAN) as lab:
        server = lab.add_server("xmpp", addresses=1)
        home_a = lab.add_home("a", nat="port-restricted-cone")
        home_b = lab.add_home("b", nat="restricted-cone")
        lab.up()
        stun = CoturnServer(SECRET, realm="example.org", host=server,
                            folder=str(tmp_path / "stun"))
        stun.start()
        prosody = ProsodyServer("vcard4", host=server, folder=str(tmp_path / "prosody"),
                                stun=stun.address)
        try:
            prosody.start()
            prosody.register("alice", PASSWORD)
            xmpp = XmppConfig(server=prosody.address(), allow_plaintext=True, timeout=DEADLINE)
            a, b = home_a.hosts[0], home_b.hosts[0]
            outcome = ns.in_netns(a.netns, lambda: asyncio.run(
                over_stun(a, b, xmpp, (home_a, home_b))))
        finally:
            prosody.stop()
            log = stun.stop()
    assert outcome["kinds"] == [["host", "srflx"], ["host", "srflx"]], outcome
    assert outcome["reflexive"] == outcome["public"], outcome  # each home's NAT address
    assert outcome["turn"] == [None, None], outcome
    assert outcome["paths"] == ("direct", "direct"), outcome
    assert [s for s in stun.sessions(log) if s.event == "new"] == [], log  # nothing allocated
