"""The slixmpp plugin with a real Prosody (and coturn) on loopback.

Two slixmpp clients of one account, ``<account>/tv`` and
``<account>/remote``, each with ``register_plugin("dtx", ...,
module="dtx.slixmpp")``. Their code calls only ``send_message``,
``msg.reply().send()`` and ``add_event_handler``: the messages go through
the server until the session is up, then over dtx, in order, exactly
once; when the session ends the unacknowledged ones go through the server
and nothing arrives twice. A client without the plugin notices nothing.

Each test has an account of its own on the module's Prosody: a message to
one of an account's devices that has gone offline goes to the account's
other devices (RFC 6121 8.5.3.2.1), so what one test's clients still send
as it ends (a session's unacknowledged stanzas, resent through the server
when the peer closes) would otherwise arrive in the next test.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from slixmpp import JID, ClientXMPP

from dtx.identity import generate_identity, save_identity
from dtx.lab.prosody import ProsodyServer, TurnExternal

from .conftest import BOTH_LOOPS, TURN_SECRET, Servers

pytestmark = BOTH_LOOPS

DEADLINE = 10.0
PASSWORD = "pw-alice"
_ACCOUNTS = itertools.count()


@dataclass
class App:
    """An application on slixmpp: its client and what its handler saw."""

    xmpp: ClientXMPP
    jid: str
    got: list[tuple[str, str]] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def dtx(self) -> Any:
        return self.xmpp.plugin["dtx"]

    async def wait_for(self, n: int) -> None:
        async with asyncio.timeout(DEADLINE):
            while len(self.got) < n:
                self.arrived.clear()
                await self.arrived.wait()


MakeApp = Callable[..., Awaitable[App]]


@pytest.fixture
def account(servers: Servers) -> str:
    """A new account for the test (its bare JID, password ``PASSWORD``)."""
    return servers.prosody.register(f"user{next(_ACCOUNTS)}", PASSWORD)


@pytest.fixture
async def make_app(servers: Servers, account: str, tmp_path: Path
                   ) -> AsyncIterator[MakeApp]:
    apps: list[App] = []

    async def make(resource: str, *, plugin: bool = True, echo: bool = False,
                   sm: bool = False, server: ProsodyServer | None = None) -> App:
        jid = f"{account}/{resource}"
        xmpp = ClientXMPP(jid, PASSWORD)
        xmpp.register_plugin("xep_0030")
        xmpp.register_plugin("xep_0199")
        if sm:
            xmpp.register_plugin("xep_0198")
        if plugin:
            key = tmp_path / f"{jid.replace('/', '_')}.key"
            save_identity(generate_identity(jid), str(key))
            xmpp.register_plugin("dtx", {"key_file": str(key)}, module="dtx.slixmpp")
        # the test server offers no TLS (as XmppClient with allow_plaintext)
        mechs = xmpp.plugin["feature_mechanisms"]
        mechs.unencrypted_plain = True
        xmpp.enable_direct_tls = False
        xmpp.enable_plaintext = True
        app = App(xmpp, jid)

        def on_message(msg: Any) -> None:
            if msg["type"] in ("chat", "normal") and msg["body"]:
                app.got.append((str(msg["from"]), msg["body"]))
                app.arrived.set()
                # Not its own (one sent to a device gone offline comes back
                # from the server): echoed, it would come back for ever.
                if echo and msg["from"] != xmpp.boundjid:
                    msg.reply(f"echo {msg['body']}").send()

        xmpp.add_event_handler("message", on_message)
        started = asyncio.get_running_loop().create_future()
        xmpp.add_event_handler("session_start", lambda _: (
            xmpp.send_presence(), xmpp.get_roster(),
            started.done() or started.set_result(None)))
        if plugin:
            ready = asyncio.Event()
            xmpp.add_event_handler("dtx_ready", lambda _=None: ready.set())
        host, port = (server or servers.prosody).address()
        xmpp.connect(host, port)
        apps.append(app)
        async with asyncio.timeout(DEADLINE):
            await started
            if plugin:
                await ready.wait()
        return app

    yield make
    for app in reversed(apps):
        if "dtx" in app.xmpp.plugin:
            await app.dtx.close()
        app.xmpp.disconnect()


async def test_messages_go_over_dtx_once_the_session_is_up(make_app: MakeApp) -> None:
    tv = await make_app("tv", echo=True)
    remote = await make_app("remote")
    tv_jid, remote_jid = tv.jid, remote.jid
    # before any session: through the server, as always
    remote.xmpp.send_message(mto=tv_jid, mbody="first", mtype="chat")
    await tv.wait_for(1)
    assert remote.dtx.path(tv_jid) is None
    switched = asyncio.Event()
    remote.xmpp.add_event_handler("dtx_session_start", lambda _jid: switched.set())
    session = await remote.dtx.connect(tv_jid)
    async with asyncio.timeout(DEADLINE):
        await switched.wait()  # its <switch/> went: stanzas to the TV go over dtx
    assert remote.dtx.path(tv_jid) in ("direct", "relay", "lan")
    for i in range(50):
        remote.xmpp.send_message(mto=tv_jid, mbody=f"pause {i}", mtype="chat")
    await tv.wait_for(51)
    await remote.wait_for(51)
    assert [b for _, b in tv.got] == ["first"] + [f"pause {i}" for i in range(50)]
    assert [b for _, b in remote.got] == ["echo first"] + [f"echo pause {i}" for i in range(50)]
    assert {f for f, _ in tv.got} == {remote_jid} and {f for f, _ in remote.got} == {tv_jid}
    stats = session.statistics()
    assert stats.stanzas_received >= 40, stats  # the echoes came over dtx


async def test_a_session_that_ends_mid_stream_loses_nothing_and_repeats_nothing(
        make_app: MakeApp) -> None:
    """The TV drops the session while the remote's messages stream over it:
    the ones it had not acknowledged come again through the server, the
    ones the TV had delivered already are dropped there, the later ones go
    through the server: all 300 arrive once, in order."""
    tv = await make_app("tv")
    remote = await make_app("remote")
    tv_jid = tv.jid
    await remote.dtx.connect(tv_jid)
    ended = asyncio.Event()
    remote.xmpp.add_event_handler("dtx_session_end", lambda _jid: ended.set())

    def cut(msg: Any) -> None:
        if msg["body"] == "pause 100":
            for session in tv.dtx.sessions().values():
                session.abort()

    tv.xmpp.add_event_handler("message", cut)
    for i in range(200):
        remote.xmpp.send_message(mto=tv_jid, mbody=f"pause {i}", mtype="chat")
    async with asyncio.timeout(DEADLINE):
        await ended.wait()
    assert remote.dtx.path(tv_jid) is None
    for i in range(200, 300):
        remote.xmpp.send_message(mto=tv_jid, mbody=f"pause {i}", mtype="chat")
    await tv.wait_for(300)
    assert [b for _, b in tv.got] == [f"pause {i}" for i in range(300)]
    # and a new session is made by itself (the remote, the smaller JID, asks)
    again = asyncio.Event()
    remote.xmpp.add_event_handler("dtx_session_start", lambda _jid: again.set())
    async with asyncio.timeout(DEADLINE):
        await again.wait()
    assert remote.dtx.path(tv_jid) in ("direct", "relay", "lan")


async def test_a_client_without_the_plugin_notices_nothing(make_app: MakeApp) -> None:
    tv = await make_app("tv", echo=True)
    phone = await make_app("phone", plugin=False)
    for i in range(5):
        phone.xmpp.send_message(mto=tv.jid, mbody=f"hi {i}", mtype="chat")
    await phone.wait_for(5)
    assert [b for _, b in phone.got] == [f"echo hi {i}" for i in range(5)]
    assert tv.dtx.sessions() == {}  # it offers no dtx: nothing was tried on it


async def test_stream_management_counts_only_what_the_server_sent(make_app: MakeApp) -> None:
    """XEP-0198 on both connections: the stanzas that came over dtx are
    handled as the application's, but ``h`` counts only the server's (the
    server asks for it, and would end the stream on a count above its own)."""
    tv = await make_app("tv", echo=True, sm=True)
    remote = await make_app("remote", sm=True)
    from_server: list[Any] = []
    parsed = tv.xmpp._spawn_event  # what the stream parser hands on: the server's stanzas

    def count(xml: Any) -> None:
        if not tv.dtx._injecting and xml.tag.rpartition("}")[2] in ("message", "presence", "iq"):
            from_server.append(xml)
        parsed(xml)

    tv.xmpp._spawn_event = count  # type: ignore[method-assign]
    sm = tv.xmpp.plugin["xep_0198"]
    assert sm.enabled_in
    start = sm.handled
    switched = asyncio.Event()
    remote.xmpp.add_event_handler("dtx_session_start", lambda _jid: switched.set())
    await remote.dtx.connect(tv.jid)
    async with asyncio.timeout(DEADLINE):
        await switched.wait()
    for i in range(30):
        remote.xmpp.send_message(mto=tv.jid, mbody=f"pause {i}", mtype="chat")
    await remote.wait_for(30)
    # and some through the server (to the bare JID), which asks for acks
    for i in range(5):
        remote.xmpp.send_message(mto=tv.xmpp.boundjid.bare, mbody=f"bare {i}", mtype="chat")
    await tv.wait_for(35)
    assert (sm.handled - start) % 2**32 == len(from_server), (sm.handled, start, from_server)
    # the server's messages are the five; the 30 over dtx are not among them
    bodies = [xml.findtext("{jabber:client}body") for xml in from_server
              if xml.tag == "{jabber:client}message"]
    assert bodies == [f"bare {i}" for i in range(5)]
    # and the server takes the count: one above what it sent ends the stream
    sm.send_ack()  # type: ignore[no-untyped-call]
    await tv.xmpp.plugin["xep_0199"].ping(jid=JID(tv.xmpp.boundjid.domain), timeout=DEADLINE)
    assert tv.xmpp.is_connected()
    assert [b for _, b in remote.got][:30] == [f"echo pause {i}" for i in range(30)]


async def test_messages_flow_over_dtx_with_the_server_stopped(
        make_app: MakeApp, servers: Servers, account: str) -> None:
    """Prosody stops after the session is up: the two go on over dtx. Then
    the session goes too: a send is held by slixmpp (``stanza_not_sent``)
    rather than lost, and once the server is back everything arrives
    once."""
    own = ProsodyServer("vcard4", turn=TurnExternal(
        secret=TURN_SECRET, host=servers.coturn.ip, port=servers.coturn.port, ttl=600))
    own.start()
    try:
        own.register(account.partition("@")[0], PASSWORD)
        tv = await make_app("tv", server=own)
        remote = await make_app("remote", server=own)
        tv_jid = tv.jid
        switched = asyncio.Event()
        remote.xmpp.add_event_handler("dtx_session_start", lambda _jid: switched.set())
        await remote.dtx.connect(tv_jid)
        async with asyncio.timeout(DEADLINE):
            await switched.wait()
        down = asyncio.Event()
        remote.xmpp.add_event_handler("disconnected", lambda _e: down.set())
        await asyncio.to_thread(own._terminate)  # stopped, data kept
        async with asyncio.timeout(DEADLINE):
            await down.wait()
        for i in range(10):
            remote.xmpp.send_message(mto=tv_jid, mbody=f"pause {i}", mtype="chat")
        await tv.wait_for(10)
        assert [b for _, b in tv.got] == [f"pause {i}" for i in range(10)]
        rtt = await remote.dtx.sessions()[tv_jid].ping(timeout=DEADLINE)
        assert rtt < 1.0

        held = asyncio.Event()
        remote.xmpp.add_event_handler("stanza_not_sent", lambda _s: held.set())
        gone = asyncio.Event()
        remote.xmpp.add_event_handler("dtx_session_end", lambda _jid: gone.set())
        for session in remote.dtx.sessions().values():
            session.abort()
        async with asyncio.timeout(DEADLINE):
            await gone.wait()
        assert remote.dtx.path(tv_jid) is None
        remote.xmpp.send_message(mto=tv_jid, mbody="after", mtype="chat")
        assert held.is_set()  # not lost: slixmpp sends it once logged in again
        await asyncio.to_thread(own.start)
        # The TV first: what the remote held for it (resent as the session
        # ended, and "after") reaches it; sent to a full JID that is not
        # online, the server would hand them to another of the account's.
        for app in (tv, remote):
            back = asyncio.get_running_loop().create_future()
            app.xmpp.add_event_handler(
                "session_start", lambda _e, f=back: f.done() or f.set_result(None))
            app.xmpp.connect(*own.address())
            async with asyncio.timeout(DEADLINE):
                await back
        await tv.wait_for(11)
        # the ten it had over dtx came again through the server: dropped
        assert [b for _, b in tv.got] == [f"pause {i}" for i in range(10)] + ["after"]
    finally:
        own.stop()


async def test_the_table_of_peers_is_bounded(make_app: MakeApp, account: str) -> None:
    """Devices come and go with new resources: entries with nothing going
    on are dropped past ``max_links``, the live session's never."""
    tv = await make_app("tv")
    remote = await make_app("remote")
    await remote.dtx.connect(tv.jid)
    remote.dtx.max_links = 3
    for i in range(20):
        remote.dtx._link(f"{account}/gone{i}")
    assert len(remote.dtx._links) <= 3
    assert tv.jid in remote.dtx._links  # its session is live
    assert list(remote.dtx.sessions()) == [tv.jid]
