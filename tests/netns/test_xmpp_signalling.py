"""Connecting by JID through the account's own XMPP server, in the NAT lab.

Prosody (``mod_turn_external``) and coturn run on the lab's server host;
no dtx rendezvous runs anywhere. Two devices of one account, each in its
own home, sign in with :class:`~dtx.aio.xmpp.XmppSignalling`, allocate on
coturn with the credentials XEP-0215 hands out, and the remote reaches the
TV by Jingle.

**The NAT matrix.** One pair of NAT profiles for each way the rendezvous
matrix (``tests/netns/test_traversal.py``) ends, and its
:func:`~tests.netns.test_traversal.expected_path` is the oracle: the
session ends where it would with the dtx rendezvous. Direct: a full cone
that lets a symmetric side in, a restricted cone with a port-restricted
one (both orders of who calls), two port-restricted cones (a simultaneous
punch), a symmetric side calling a restricted cone (a peer-reflexive
path); and no NAT with a symmetric side, which the rendezvous connects but
XMPP signalling does not yet (marked as expected to fail, with why).
Relay, over coturn, whose ``-v`` log shows both allocations and the
channel bound: symmetric with port-restricted cone, and symmetric with
symmetric. Stanzas flow both ways on every pair.

**Relay, then direct.** Two port-restricted homes that the lab keeps
apart (UDP between their public addresses dropped in the core) start on
coturn; once the lab lets them meet, the same session moves to the direct
path at the path manager's next punch (its ``punch_schedule``: 5 s after
the introduction, then 15, 30 and 60 s; past the last, a candidate that
never answered is not probed again), while a stanza goes each way at a
time, none lost.

Standard WAN (20 ms home to core, 40 ms core to server). Both devices'
event loops share one thread, in the first home's namespace:
each UDP socket is made in its own home (the paths under test), while the
TV's XMPP connection leaves from the first home too, which only the XMPP
server can tell.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from dtx import stanza as st
from dtx.aio.peer import Peer, PeerConfig
from dtx.aio.session import Session
from dtx.aio.xmpp import XmppSignalling, XmppSignallingConfig
from dtx.identity import DeviceIdentity, generate_identity
from dtx.lab import STANDARD_WAN, Home, Lab, ns
from dtx.lab.coturn import CoturnServer, coturn_missing
from dtx.lab.miniupnpd import miniupnpd_missing
from dtx.lab.prosody import ProsodyServer, TurnExternal, prosody_missing
from dtx.lab.topology import Host
from dtx.trust import PinStore, Verifier
from dtx.xmpp.client import XmppConfig, open_xmpp_client

from ..loopback.test_xmpp_signalling import stanzas_both_ways
from .test_traversal import expected_path

pytestmark = pytest.mark.netns

SECRET = "dtx-lab-turn-secret"
DEADLINE = 10.0
SETTLE = 4.0
"""Seconds a pair is watched for the direct path (as in the rendezvous
matrix): past the quick punch attempts."""
QUICK_PUNCHES = 2.5
"""Seconds after the connection when the quick punch attempts (up to 2 s
after the introduction) are over and the next is at 5 s."""
DIRECT_AFTER_OPEN = 15.0
"""Bound on the move to direct once the path opens: the next punch at the
latest (the 15 s one, should the 5 s one be missed)."""
PASSWORD = "pw-alice"

T = TypeVar("T")

PAIRS = [
    *(pytest.param(a, b, id=f"{a}--{b}") for a, b in [
        ("none", "symmetric"),
        ("full-cone", "symmetric"),
        ("restricted-cone", "port-restricted-cone"),
        ("port-restricted-cone", "restricted-cone"),
        ("port-restricted-cone", "port-restricted-cone"),
        ("symmetric", "restricted-cone"),
        ("symmetric", "port-restricted-cone"),
        ("symmetric", "symmetric"),
    ]),
]


@dataclass(frozen=True)
class XmppLab:
    """The lab's server host running coturn and Prosody, and two homes."""

    server: Host
    coturn: CoturnServer
    home_a: Home
    home_b: Home
    xmpp: XmppConfig
    prosody: ProsodyServer


@contextmanager
def xmpp_lab(lab: Lab, tmp_path: Path, nat_a: str, nat_b: str, *, ttl: int = 600,
             max_allocate_lifetime: int | None = None,
             stun_only: bool = False, port_mapping: str = "") -> Iterator[XmppLab]:
    """Bring ``lab`` up with a server host and two homes, start coturn and
    Prosody there (the account alice@example.org registered), stop both
    after. ``ttl``: of the TURN credentials Prosody mints;
    ``max_allocate_lifetime``: coturn's; ``stun_only``: Prosody lists
    coturn as a STUN server and no TURN one; ``port_mapping``: the homes
    (``"a"``, ``"b"``, ``"ab"``) whose routers run miniupnpd."""
    for reason in (prosody_missing(), coturn_missing()):
        if reason:
            pytest.skip(reason)
    server = lab.add_server("xmpp", addresses=1)
    home_a = lab.add_home("a", nat=nat_a, port_mapping="a" in port_mapping)
    home_b = lab.add_home("b", nat=nat_b, port_mapping="b" in port_mapping)
    lab.up()
    coturn = CoturnServer(SECRET, realm="example.org", host=server, folder=str(tmp_path / "turn"),
                          max_allocate_lifetime=max_allocate_lifetime)
    coturn.start()
    turn = TurnExternal(secret=SECRET, host=server.ip, port=coturn.port, ttl=ttl)
    prosody = ProsodyServer("vcard4", host=server, folder=str(tmp_path / "prosody"),
                            turn=None if stun_only else turn,
                            stun=coturn.address if stun_only else None)
    try:
        prosody.start()
        prosody.register("alice", PASSWORD)
        xmpp = XmppConfig(server=prosody.address(), allow_plaintext=True, timeout=DEADLINE)
        yield XmppLab(server, coturn, home_a, home_b, xmpp, prosody)
    finally:
        prosody.stop()
        coturn.stop()


def in_first_home(scene: XmppLab, main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run ``main`` on an event loop in a thread inside the first home's
    namespace."""
    return ns.in_netns(scene.home_a.hosts[0].netns, lambda: asyncio.run(main()))


async def device(identity: DeviceIdentity, host: Host, xmpp: XmppConfig,
                 opened: list[tuple[Peer, XmppSignalling]], *,
                 password: str = PASSWORD,
                 gateway: str | None = None) -> tuple[Peer, XmppSignalling]:
    """A peer on a UDP socket in ``host`` and its XMPP signalling, started
    (and listed in ``opened`` for closing, as soon as there is something
    to close); with ``gateway``, port-mapped by that router first."""
    signalling = XmppSignalling(identity, password, config=XmppSignallingConfig(
        xmpp=xmpp, connect_timeout=DEADLINE))
    peer = Peer(identity, Verifier([signalling.key_source], PinStore(None)),
                config=PeerConfig(host_addresses=(host.ip,), port_mapping=gateway is not None,
                                  gateway=gateway))
    await peer.start(sock=host.udp_socket())
    opened.append((peer, signalling))
    if gateway is not None:
        assert await peer.wait_port_mapped(DEADLINE) is not None, "the router mapped a port"
    await signalling.start(peer)
    return peer, signalling


@dataclass(frozen=True)
class Connected:
    """A session by JID from the remote (in the first home) to the TV."""

    session: Session
    accepted: Session
    connect: float
    """Seconds the connection by JID took (Jingle and the QUIC handshake)."""
    relayed: set[tuple[str, int]]
    """Both devices' relayed addresses on coturn."""
    signalling: tuple[XmppSignalling, XmppSignalling]
    """The remote's and the TV's."""


@asynccontextmanager
async def connected(scene: XmppLab, *, turn: bool = True) -> AsyncIterator[Connected]:
    """Both devices signed in, their keys published (each with a TURN
    allocation unless ``turn`` is False), and the remote connected to the
    TV by JID; closed after."""
    a, b = scene.home_a.hosts[0], scene.home_b.hosts[0]
    remote_id = generate_identity("alice@example.org/remote")
    tv_id = generate_identity("alice@example.org/tv")
    async with open_xmpp_client("alice@example.org", PASSWORD, config=scene.xmpp) as client:
        for identity in (remote_id, tv_id):
            await client.publish_key(identity.public_key)
    opened: list[tuple[Peer, XmppSignalling]] = []
    try:
        def gateway(home: Home) -> str | None:
            return home.lan_gateway if home.port_mapping else None

        tv, tv_sig = await device(tv_id, b, scene.xmpp, opened, gateway=gateway(scene.home_b))
        _, remote_sig = await device(remote_id, a, scene.xmpp, opened,
                                     gateway=gateway(scene.home_a))
        relayed = set()
        for sig in (tv_sig, remote_sig) if turn else ():
            assert sig.turn is not None and sig.turn.relayed is not None
            relayed.add(sig.turn.relayed)
        loop = asyncio.get_running_loop()
        started = loop.time()
        session = await remote_sig.connect(tv_id.jid.full, timeout=DEADLINE)
        connect_time = loop.time() - started
        async with asyncio.timeout(DEADLINE):
            accepted = await tv.accept()
        assert accepted.peer_jid == remote_id.jid.full
        yield Connected(session, accepted, connect_time, relayed, (remote_sig, tv_sig))
        await session.close()
    finally:
        for peer, sig in reversed(opened):
            await sig.close()
            await peer.close()


def path_address(session: Session) -> tuple[str, int] | None:
    """Where the session's packets go now (None: the relay)."""
    link = session.connection.link
    current = None if link is None else link.paths.current
    return None if current is None else current.key


def seen_at(home: Home) -> str:
    """The IP the internet sees the home's device at: its NAT's public
    address, or its own where the home does not translate (``none``)."""
    return home.public_ip if home.nat.translate else home.hosts[0].ip


def check_relayed(scene: XmppLab, log: str, relayed: set[tuple[str, int]]) -> None:
    """coturn's log shows both devices' allocations and a channel bound
    (the relay path carried the session)."""
    allocations = [s for s in scene.coturn.sessions(log) if s.event == "new"]
    assert len(allocations) == 2 and {s.realm for s in allocations} == {"example.org"}, log
    assert all(r[0] == scene.server.ip for r in relayed), relayed
    assert "CHANNEL_BIND processed, success" in log, log


@pytest.mark.parametrize(("nat_a", "nat_b"), PAIRS)
def test_connect_by_jid_in_the_lab(netns_ready: None, tmp_path: Path, nat_a: str,
                                   nat_b: str) -> None:
    expect = expected_path(nat_a, nat_b, birthday=False)  # no birthday search over XMPP yet

    async def main() -> tuple[tuple[str, str], list[str | None], set[tuple[str, int]], float]:
        async with connected(scene) as c:
            if expect == "relay":
                with pytest.raises(TimeoutError):
                    await c.session.wait_path("direct", timeout=SETTLE)
            else:
                await c.session.wait_path(expect, timeout=SETTLE)
                await c.accepted.wait_path(expect, timeout=SETTLE)
            await stanzas_both_ways(c.session, c.accepted)
            to = [None if a is None else a[0] for a in map(path_address, (c.session, c.accepted))]
            return (str(c.session.path), str(c.accepted.path)), to, c.relayed, c.connect

    with Lab(wan=STANDARD_WAN) as lab, xmpp_lab(lab, tmp_path, nat_a, nat_b) as scene:
        paths, to, relayed, connect_time = in_first_home(scene, main)
        log = scene.coturn.stop()
    print(f"\n{nat_a} x {nat_b}: connect by JID {connect_time * 1000:.0f} ms "
          f"(Jingle and the QUIC handshake; ends on the {expect} path)")
    assert paths == (expect, expect)
    if expect == "relay":
        assert to == [None, None]
        check_relayed(scene, log, relayed)
    else:  # home to home, not through anyone's relayed address
        assert to == [seen_at(scene.home_b), seen_at(scene.home_a)]


@pytest.mark.parametrize("mapping", ["a", "b"])
def test_a_port_mapping_takes_symmetric_to_symmetric_direct_over_xmpp(
        netns_ready: None, tmp_path: Path, mapping: str) -> None:
    """The relay-only pair of the table, with miniupnpd on one router: the
    mapped device offers its mapping as an srflx Jingle candidate and the
    session goes home to home, not through coturn."""
    if miniupnpd_missing() is not None:
        pytest.skip(f"port mapping needs miniupnpd: {miniupnpd_missing()}")
    assert expected_path("symmetric", "symmetric") == "relay"  # without the mapping

    async def main() -> tuple[tuple[str, str], tuple[str, int] | None]:
        async with connected(scene) as c:
            await c.session.wait_path("direct", timeout=SETTLE)
            await c.accepted.wait_path("direct", timeout=SETTLE)
            await stanzas_both_ways(c.session, c.accepted)
            mapped_side = c.session if mapping == "b" else c.accepted
            return (str(c.session.path), str(c.accepted.path)), path_address(mapped_side)

    with Lab(wan=STANDARD_WAN) as lab, xmpp_lab(lab, tmp_path, "symmetric", "symmetric",
                                                 port_mapping=mapping) as scene:
        paths, to = in_first_home(scene, main)
    assert paths == ("direct", "direct")
    mapped_home = scene.home_b if mapping == "b" else scene.home_a
    assert to is not None and to[0] == mapped_home.public_ip  # the peer talks to the mapping


async def one_each_way_until(session: Session, accepted: Session, done: Callable[[], bool],
                             *, first: int, timeout: float) -> int:
    """One numbered stanza each way at a time, each awaited and checked
    (in order, none lost), until ``done()``; returns the next number."""
    i = first
    async with asyncio.timeout(timeout):
        while not done():
            session.send(st.message(f"up {i}", to=accepted.local_jid))
            accepted.send(st.message(f"down {i}", to=session.local_jid))
            assert st.body_of(await accepted.receive()) == f"up {i}"
            assert st.body_of(await session.receive()) == f"down {i}"
            i += 1
    return i


def test_relay_moves_to_direct_when_the_path_opens(netns_ready: None, tmp_path: Path) -> None:
    nat = "port-restricted-cone"
    assert expected_path(nat, nat) == "direct"  # the block alone keeps them on the relay

    async def main() -> tuple[float, float, int, set[tuple[str, int]]]:
        loop = asyncio.get_running_loop()
        async with connected(scene) as c:
            session, accepted = c.session, c.accepted
            connection = session.connection
            with pytest.raises(TimeoutError):  # the quick punches go nowhere
                await session.wait_path("direct", timeout=QUICK_PUNCHES)
            assert (session.path, accepted.path) == ("relay", "relay")
            await stanzas_both_ways(session, accepted)  # on coturn

            lab.unblock(scene.home_a, scene.home_b)
            opened = loop.time()
            both_direct = lambda: session.path == accepted.path == "direct"  # noqa: E731
            sent = await one_each_way_until(session, accepted, both_direct, first=0,
                                            timeout=DIRECT_AFTER_OPEN)
            moved = loop.time() - opened
            await stanzas_both_ways(session, accepted)  # on the direct path
            await session.wait_acknowledged(timeout=DEADLINE)
            assert session.connection is connection and session.is_open  # the same session
            assert [k for _, k in session.path_history()] == ["relay", "direct"]
            return c.connect, moved, sent, c.relayed

    with Lab(wan=STANDARD_WAN) as lab, xmpp_lab(lab, tmp_path, nat, nat) as scene:
        lab.block(scene.home_a, scene.home_b)
        connect_time, moved, sent, relayed = in_first_home(scene, main)
        log = scene.coturn.stop()
    print(f"\nrelay to direct: connect by JID {connect_time * 1000:.0f} ms; direct "
          f"{moved * 1000:.0f} ms after the lab opened the path ({sent} stanzas each way "
          f"meanwhile)")
    check_relayed(scene, log, relayed)
