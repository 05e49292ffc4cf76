"""Connecting by JID across two federated XMPP domains, in the NAT lab.

alice@example.org/remote and bob@example.net/tv, each account on its own
Prosody with its own coturn, the two servers federated over s2s and
finding each other through the lab's DNS (:mod:`tests.netns.xmpp_domains`);
no dtx rendezvous anywhere. The test makes the two accounts contacts (a
presence subscription each way, asked and granted over the signalling
clients: nothing is approved by itself), then the remote connects to the
TV by JID: Jingle and the key fetch from the other domain's vCard cross
s2s. As in the one-server matrix
(``tests/netns/test_xmpp_signalling.py``), the rendezvous matrix's
:func:`~tests.netns.test_traversal.expected_path` is the oracle: a
punchable pair ends on the direct path; symmetric with port-restricted cone
stays on TURN, each device on its own domain's coturn (two relays in a
row), and each coturn's ``-v`` log shows one allocation in its own realm
and the channel bound. Stanzas flow both ways on either.

Standard WAN (20 ms home to core, 40 ms core to a server, so 80 ms
between the two servers). Both devices' event loops share one thread, in
the first home's namespace: each UDP socket is made in its own home, the
TV's XMPP connection leaves from the first home too.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from dtx.aio.peer import Peer
from dtx.aio.xmpp import XmppSignalling
from dtx.identity import DeviceIdentity, generate_identity
from dtx.lab import STANDARD_WAN, Host, Lab, ns
from dtx.lab.prosody import ProsodyServer
from dtx.xmpp.client import XmppConfig, open_xmpp_client

from ..loopback.test_xmpp_signalling import (
    Device,
    stanzas_both_ways,
    subscribe,
    wait_subscription,
)
from .test_traversal import expected_path
from .test_xmpp_signalling import device, path_address, seen_at
from .xmpp_domains import Federated, federated_domains

pytestmark = pytest.mark.netns

DEADLINE = 10.0
SETTLE = 4.0
"""Seconds a pair is watched for the direct path: past the quick punches."""
ACCOUNTS = {"example.org": ("alice", "pw-alice"), "example.net": ("bob", "pw-bob")}
REMOTE = "alice@example.org/remote"
TV = "bob@example.net/tv"


def xmpp_config(prosody: ProsodyServer) -> XmppConfig:
    return XmppConfig(server=prosody.address(), allow_plaintext=True, timeout=DEADLINE)


async def open_device(identity: DeviceIdentity, password: str, host: Host,
                      prosody: ProsodyServer,
                      opened: list[tuple[Peer, XmppSignalling]]) -> Device:
    """The device's key published in its account's vCard, then its peer
    (socket in ``host``) and signalling started."""
    xmpp = xmpp_config(prosody)
    async with open_xmpp_client(identity.jid.bare.full, password, config=xmpp) as client:
        await client.publish_key(identity.public_key)
    return Device(*await device(identity, host, xmpp, opened, password=password))


async def exchange(scene: Federated, *,
                   expect: str) -> tuple[tuple[str, str], list[str | None], float]:
    """Both devices up and subscribed to each other, the remote connects by
    JID; returns both sides' final paths, the IPs they send to (None: the
    relay) and the connect time."""
    org, net = scene.domains["example.org"], scene.domains["example.net"]
    a, b = scene.homes["a"].hosts[0], scene.homes["b"].hosts[0]
    opened: list[tuple[Peer, XmppSignalling]] = []
    try:
        tv = await open_device(generate_identity(TV), ACCOUNTS["example.net"][1], b,
                               net.prosody, opened)
        remote = await open_device(generate_identity(REMOTE), ACCOUNTS["example.org"][1], a,
                                   org.prosody, opened)
        for d in (tv, remote):
            turn = d.signalling.turn
            assert turn is not None and turn.relayed is not None
        await subscribe(remote, tv)
        await subscribe(tv, remote)
        await wait_subscription(tv, "alice@example.org", "both")
        await wait_subscription(remote, "bob@example.net", "both")

        loop = asyncio.get_running_loop()
        started = loop.time()
        session = await remote.signalling.connect(TV, timeout=DEADLINE)
        connect_time = loop.time() - started
        async with asyncio.timeout(DEADLINE):
            accepted = await tv.peer.accept()
        assert accepted.peer_jid == REMOTE and session.peer_jid == TV
        if expect == "relay":
            with pytest.raises(TimeoutError):
                await session.wait_path("direct", timeout=SETTLE)
        else:
            await session.wait_path(expect, timeout=SETTLE)
            await accepted.wait_path(expect, timeout=SETTLE)
        await stanzas_both_ways(session, accepted)
        paths = (str(session.path), str(accepted.path))
        to = [None if a is None else a[0] for a in map(path_address, (session, accepted))]
        await session.close()
        return paths, to, connect_time
    finally:
        for peer, signalling in reversed(opened):
            await signalling.close()
            await peer.close()


@pytest.mark.parametrize(("nat_a", "nat_b"), [
    ("port-restricted-cone", "restricted-cone"),
    ("symmetric", "port-restricted-cone"),
], ids=lambda nat: str(nat))
def test_connect_by_jid_across_domains(netns_ready: None, tmp_path: Path, nat_a: str,
                                       nat_b: str) -> None:
    expect = expected_path(nat_a, nat_b, birthday=False)  # no birthday search over XMPP yet
    with Lab(wan=STANDARD_WAN) as lab, federated_domains(
            lab, tmp_path, {"a": nat_a, "b": nat_b}, ttl=600) as scene:
        for domain, (user, password) in ACCOUNTS.items():
            scene.domains[domain].prosody.register(user, password)
        a = scene.homes["a"].hosts[0]
        paths, to, connect_time = ns.in_netns(a.netns, lambda: asyncio.run(
            exchange(scene, expect=expect)))
        logs = {domain: d.coturn.stop() for domain, d in scene.domains.items()}
    print(f"\n{REMOTE} -> {TV}, {nat_a} x {nat_b}: connect by JID {connect_time * 1000:.0f} ms "
          f"(Jingle over s2s and the QUIC handshake; ends on the {expect} path)")
    assert paths == (expect, expect)
    homes = scene.homes
    assert to == ([None, None] if expect == "relay"
                  else [seen_at(homes["b"]), seen_at(homes["a"])])
    for domain, log in logs.items():
        allocations = [s for s in scene.domains[domain].coturn.sessions(log) if s.event == "new"]
        assert [s.realm for s in allocations] == [domain], log  # its own device only
        if expect == "relay":
            assert "CHANNEL_BIND processed, success" in log, log
