"""Two devices of one account connect by JID through their own XMPP server.

A real Prosody on loopback (``mod_turn_external``) and a real coturn beside
it; no dtx rendezvous anywhere. Each device logs in as its full JID with
:class:`~dtx.aio.xmpp.XmppSignalling`, learns the TURN service by
XEP-0215, allocates on its peer's one UDP socket, and the remote reaches
the TV with Jingle: the session that comes out carries stanzas both ways.
A device of another account with no subscription is answered
``service-unavailable`` and learns no address of the TV.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest

from dtx import stanza as st
from dtx.aio.peer import Peer
from dtx.aio.session import Session
from dtx.aio.xmpp import XmppSignalling, XmppSignallingConfig
from dtx.errors import ConnectError
from dtx.identity import DeviceIdentity, generate_identity
from dtx.proto import turn as tp
from dtx.proto.signalling import CandidatesAdded, LocalCandidate, SessionTerminated
from dtx.wire.jingle import CandidateType, Reason
from dtx.lab.prosody import ProsodyServer, TurnExternal
from dtx.trust import PinStore, Verifier
from dtx.xmpp.client import XmppConfig, open_xmpp_client

from .conftest import BOTH_LOOPS, TURN_SECRET, Servers

pytestmark = BOTH_LOOPS

DEADLINE = 10.0


def xmpp_config(servers: Servers) -> XmppConfig:
    return XmppConfig(server=servers.prosody.address(), allow_plaintext=True, timeout=DEADLINE)


async def publish(servers: Servers, password: str, *ids: DeviceIdentity,
                  xmpp: XmppConfig | None = None) -> None:
    """Each device's key into its account's vCard (one login per account)."""
    async with open_xmpp_client(str(ids[0].jid.bare), password,
                                config=xmpp or xmpp_config(servers)) as client:
        for identity in ids:
            await client.publish_key(identity.public_key)


async def stanzas_both_ways(session: Session, accepted: Session, n: int = 20) -> None:
    """``n`` stanzas each way at once, all received in order."""
    for i in range(n):
        session.send(st.message(f"pause {i}", to=accepted.local_jid))
        accepted.send(st.message(f"paused {i}", to=session.local_jid))
    async with asyncio.timeout(DEADLINE):
        got_b = [st.body_of(await accepted.receive()) for _ in range(n)]
        got_a = [st.body_of(await session.receive()) for _ in range(n)]
    assert got_b == [f"pause {i}" for i in range(n)]
    assert got_a == [f"paused {i}" for i in range(n)]


@dataclass
class Device:
    peer: Peer
    signalling: XmppSignalling


OpenDevice = Callable[..., Awaitable["Device"]]


@pytest.fixture
async def open_device(servers: Servers) -> AsyncIterator[OpenDevice]:
    opened: list[Device] = []

    async def make(identity: DeviceIdentity, password: str,
                   turn: tp.TurnClientConfig = tp.TurnClientConfig(),
                   xmpp: XmppConfig | None = None) -> Device:
        signalling = XmppSignalling(identity, password, config=XmppSignallingConfig(
            xmpp=xmpp or xmpp_config(servers), connect_timeout=DEADLINE, turn=turn))
        peer = Peer(identity, Verifier([signalling.key_source], PinStore(None)))
        await peer.start("127.0.0.1")
        device = Device(peer, signalling)
        opened.append(device)
        await signalling.start(peer)
        return device

    yield make
    for device in reversed(opened):
        await device.signalling.close()
        await device.peer.close()


async def two_accounts(servers: Servers, open_device: OpenDevice,
                       *jids: str) -> tuple[Device, Device]:
    """A device of each of two accounts (password ``pw-<user>``), each key
    published in its own account's vCard."""
    devices = []
    for jid in jids:
        identity = generate_identity(jid)
        password = f"pw-{identity.jid.local}"
        await publish(servers, password, identity)
        devices.append(await open_device(identity, password))
    return devices[0], devices[1]


async def test_connect_by_jid_through_the_own_server(servers: Servers,
                                                     open_device: OpenDevice) -> None:
    tv_id = generate_identity("alice@example.org/tv")
    remote_id = generate_identity("alice@example.org/remote")
    await publish(servers, "pw-alice", tv_id, remote_id)
    tv = await open_device(tv_id, "pw-alice")
    remote = await open_device(remote_id, "pw-alice")
    for device in (tv, remote):
        turn = device.signalling.turn
        assert turn is not None and turn.relayed is not None, "allocated by XEP-0215 credentials"
        kinds = {c.type.value for c in device.signalling.local_candidates()}
        # on loopback the TURN server sees the host address itself: offered as reflexive
        assert kinds == {"srflx", "relay"}, kinds

    session = await remote.signalling.connect(tv_id.jid.full, timeout=DEADLINE)
    async with asyncio.timeout(DEADLINE):
        accepted = await tv.peer.accept()
    assert session.peer_jid == tv_id.jid.full and accepted.peer_jid == remote_id.jid.full
    await stanzas_both_ways(session, accepted)
    assert tv.peer.traversal is not None and tv.peer.traversal.server is None  # no rendezvous

    # A candidate found later is trickled (transport-info) and probed.
    link = tv.peer.traversal.link_for(remote_id.jid.full)
    assert link is not None
    later = ("127.0.0.1", remote.peer.address[1] ^ 1)  # nobody there: only probed
    assert remote.signalling.add_candidates([LocalCandidate(later, CandidateType.SRFLX)]) == 1
    added = await tv.signalling.wait_event(CandidatesAdded, timeout=DEADLINE)
    assert [c.addr for c in added.candidates] == [later]
    assert link.paths.knows(later)

    # The XMPP connections go (one drops, one is closed); the dtx session
    # does not, and new ones cannot be signalled.
    xmpp = remote.signalling.xmpp
    assert xmpp is not None
    dropped = asyncio.get_running_loop().create_future()
    xmpp.add_event_handler("disconnected",
                           lambda reason: None if dropped.done() else dropped.set_result(reason))
    xmpp.abort()
    async with asyncio.timeout(DEADLINE):
        await dropped
    assert not remote.signalling.online
    with pytest.raises(ConnectError, match="not connected"):
        await remote.signalling.connect(tv_id.jid.full, timeout=DEADLINE)
    await tv.signalling.close()
    session.send(st.message("still here", to=tv_id.jid.full))
    async with asyncio.timeout(DEADLINE):
        assert st.body_of(await accepted.receive()) == "still here"
    await session.close()


async def test_a_stranger_is_refused_and_learns_no_address(servers: Servers,
                                                           open_device: OpenDevice,
                                                           ) -> None:
    tv, mallory = await two_accounts(servers, open_device, "alice@example.org/tv2",
                                     "mallory@example.org/laptop")
    tv_id, mallory_id = tv.peer.identity, mallory.peer.identity
    # mallory's own policy would not even send; make it try.
    mallory.signalling.signalling._may_contact = lambda _jid: True

    with pytest.raises(ConnectError, match="service-unavailable"):
        await mallory.signalling.connect(tv_id.jid.full, timeout=DEADLINE)
    assert tv.signalling.signalling.counters["refused_unknown"] == 1
    traversal = mallory.peer.traversal
    assert traversal is not None and traversal.links == {}, "no introduction, no address"
    assert tv.peer.traversal is not None and tv.peer.traversal.links == {}
    # and the TV's own policy refuses to offer mallory anything
    with pytest.raises(ConnectError, match="neither"):
        await tv.signalling.connect(mallory_id.jid.full, timeout=DEADLINE)


async def test_a_device_whose_key_is_not_published_is_refused_by_the_responder(
        servers: Servers, open_device: OpenDevice) -> None:
    """The remote's signed fingerprint names a key alice's vCard does not
    list: the TV refuses the offer (security-error), introduces nobody and
    sends no candidate back."""
    tv_id = generate_identity("alice@example.org/tv6")
    remote_id = generate_identity("alice@example.org/remote6")
    await publish(servers, "pw-alice", tv_id)  # the remote's key is not published
    tv = await open_device(tv_id, "pw-alice")
    remote = await open_device(remote_id, "pw-alice")
    with pytest.raises(ConnectError, match="security-error"):
        await remote.signalling.connect(tv_id.jid.full, timeout=DEADLINE)
    assert tv.signalling.signalling.counters["refused_security"] == 1
    assert tv.peer.endpoint.traversal.links == {} == remote.peer.endpoint.traversal.links


async def test_a_responder_whose_key_is_not_published_is_refused_by_the_initiator(
        servers: Servers, open_device: OpenDevice) -> None:
    """The TV's session-accept is signed by a key alice's vCard does not
    list: the remote refuses it (security-error) and opens no QUIC
    connection; the TV, which took its introduction as its answer left,
    is told the session is over."""
    tv_id = generate_identity("alice@example.org/tv7")
    remote_id = generate_identity("alice@example.org/remote7")
    await publish(servers, "pw-alice", remote_id)  # the TV's key is not published
    tv = await open_device(tv_id, "pw-alice")
    remote = await open_device(remote_id, "pw-alice")
    with pytest.raises(ConnectError, match="security-error"):
        await remote.signalling.connect(tv_id.jid.full, timeout=DEADLINE)
    assert remote.signalling.signalling.counters["refused_security"] == 1
    ended = await tv.signalling.wait_event(SessionTerminated, timeout=DEADLINE)
    assert ended.reason is Reason.SECURITY_ERROR and ended.remote
    assert remote.peer.endpoint.traversal.links == {}
    assert remote.peer.endpoint.statistics().sessions == 0


async def test_turn_credentials_are_renewed_over_xmpp(servers: Servers,
                                                     open_device: OpenDevice) -> None:
    """The TURN client asks for new credentials half way through their
    life (here a server minting them for 4 s); they come by XEP-0215 and a
    session on the allocation's device goes on."""
    short = ProsodyServer("vcard4", turn=TurnExternal(
        secret=TURN_SECRET, host=servers.coturn.ip, port=servers.coturn.port, ttl=4))
    short.start()
    try:
        short.register("alice", "pw-alice")
        xmpp = XmppConfig(server=short.address(), allow_plaintext=True, timeout=DEADLINE)
        await credentials_renewed(servers, open_device, xmpp)
    finally:
        short.stop()


async def credentials_renewed(servers: Servers, open_device: OpenDevice,
                              xmpp: XmppConfig) -> None:
    tv_id = generate_identity("alice@example.org/tv3")
    remote_id = generate_identity("alice@example.org/remote3")
    await publish(servers, "pw-alice", tv_id, remote_id, xmpp=xmpp)
    tv = await open_device(tv_id, "pw-alice", xmpp=xmpp)
    remote = await open_device(remote_id, "pw-alice", xmpp=xmpp)
    first = remote.signalling.turn_service
    assert first is not None and first.expires is not None
    session = await remote.signalling.connect(tv_id.jid.full, timeout=DEADLINE)
    async with asyncio.timeout(DEADLINE):
        accepted = await tv.peer.accept()
    await remote.signalling.wait_credentials_renewed(timeout=DEADLINE)
    renewed = remote.signalling.turn_service
    assert renewed is not None and renewed.expires is not None
    assert renewed.expires > first.expires and renewed.username != first.username
    assert remote.signalling.counters["credentials_failed"] == 0
    await stanzas_both_ways(session, accepted)
    turn = remote.signalling.turn
    assert turn is not None and turn.state is tp.AllocationState.ALLOCATED


async def subscribe(a: Device, b: Device) -> None:
    """``a`` asks to see ``b``'s presence and ``b`` grants it, once the
    request reached it (nothing is approved by itself)."""
    xa, xb = a.signalling.xmpp, b.signalling.xmpp
    assert xa is not None and xb is not None
    asked = asyncio.get_running_loop().create_future()
    xb.add_event_handler("presence_subscribe",
                         lambda p: None if asked.done() else asked.set_result(p))
    xa.send_presence(pto=str(b.peer.identity.jid.bare), ptype="subscribe")
    async with asyncio.timeout(DEADLINE):
        request = await asked
    xb.send_presence(pto=str(request["from"].bare), ptype="subscribed")


async def wait_subscription(d: Device, contact: str, state: str) -> None:
    xmpp = d.signalling.xmpp
    assert xmpp is not None
    reached = asyncio.Event()

    def check(_event: object = None) -> None:
        roster = xmpp.client_roster
        if roster.has_jid(contact) and roster[contact]["subscription"] == state:
            reached.set()

    xmpp.add_event_handler("roster_update", check)
    check()
    async with asyncio.timeout(DEADLINE):
        await reached.wait()


async def test_a_subscribed_contact_of_another_account_connects(
        servers: Servers, open_device: OpenDevice) -> None:
    # A contact account of its own: the server keeps rosters, and this test
    # runs once per event loop against the same server.
    user = f"bob{secrets.token_hex(4)}"
    contact = await asyncio.to_thread(servers.prosody.register, user, f"pw-{user}")
    tv, bob = await two_accounts(servers, open_device, "alice@example.org/tv4",
                                 f"{contact}/phone")
    tv_id, bob_id = tv.peer.identity, bob.peer.identity
    with pytest.raises(ConnectError, match="neither"):  # no subscription yet
        await bob.signalling.connect(tv_id.jid.full, timeout=DEADLINE)
    await subscribe(bob, tv)
    await subscribe(tv, bob)
    await wait_subscription(tv, contact, "both")
    await wait_subscription(bob, "alice@example.org", "both")

    session = await bob.signalling.connect(tv_id.jid.full, timeout=DEADLINE)
    async with asyncio.timeout(DEADLINE):
        accepted = await tv.peer.accept()
    assert accepted.peer_jid == bob_id.jid.full
    await stanzas_both_ways(session, accepted)


async def test_the_server_restarting_ends_no_session_and_devices_log_back_in(
        servers: Servers, open_device: OpenDevice) -> None:
    """Prosody restarts under an established session: the session goes on
    (it never touches the server), both devices log back in by themselves,
    and a new session is signalled through the restarted server."""
    tv_id = generate_identity("alice@example.org/tv5")
    remote_id = generate_identity("alice@example.org/remote5")
    await publish(servers, "pw-alice", tv_id, remote_id)
    tv = await open_device(tv_id, "pw-alice")
    remote = await open_device(remote_id, "pw-alice")
    session = await remote.signalling.connect(tv_id.jid.full, timeout=DEADLINE)
    async with asyncio.timeout(DEADLINE):
        accepted = await tv.peer.accept()
    went: list[bool] = []
    remote.signalling.add_online_listener(went.append)
    await asyncio.to_thread(servers.prosody.restart)
    for device in (tv, remote):
        await device.signalling.wait_online(True, timeout=3 * DEADLINE)
        assert device.signalling.counters["relogins"] == 1
    assert went == [False, True]
    await stanzas_both_ways(session, accepted)
    assert session.is_open and accepted.is_open
    await session.close()

    again = await remote.signalling.connect(tv_id.jid.full, timeout=DEADLINE)
    async with asyncio.timeout(DEADLINE):
        accepted_again = await tv.peer.accept()
    await stanzas_both_ways(again, accepted_again)
