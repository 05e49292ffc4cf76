"""XEP-0174 link-local streams over real TCP on loopback (dtx.aio.linklocal):
a legacy client's stream, the trust separation from dtx sessions, hostile
input and floods, outgoing streams. No mDNS here (that would reach the
machine's network): the listener runs without discovery, the lab tests in
tests/netns/test_xep0174.py run it with discovery and Pidgin."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

import pytest

from dtx import stanza as st
from dtx.aio.linklocal import LinkLocal, LinkLocalStream
from dtx.aio.session import Session
from dtx.errors import SendBufferFullError, SessionClosedError
from dtx.identity import DeviceIdentity
from dtx.proto import xmlstream as xs
from dtx.proto.caps import caps_for, ver_of_disco_info
from dtx.proto.linklocal import LinkLocalConfig

from .conftest import BOTH_LOOPS, Pair

pytestmark = BOTH_LOOPS

DEADLINE = 5.0
TV = "tv@example.org/living-room"
PIDGIN = "alice@pidgin-box"


def header(sender: str | None, to: str, *, extra: str = "") -> bytes:
    frm = f" from='{sender}'" if sender is not None else ""
    return (f"<?xml version='1.0' encoding='UTF-8' ?>\n<stream:stream xmlns='jabber:client' "
            f"xmlns:stream='http://etherx.jabber.org/streams'{frm} to='{to}'{extra}>").encode()


class Client:
    """A raw XEP-0174 client: bytes out, the XML the device answers parsed."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.parser = xs.XmlStreamParser()
        self.events: list[xs.XmlEvent] = []
        self.eof = False

    @classmethod
    async def connect(cls, ll: LinkLocal, source: str = "127.0.0.1") -> Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", ll.port,
                                                       local_addr=(source, 0))
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read_until(self, done: Callable[[list[xs.XmlEvent]], bool],
                         timeout: float = DEADLINE) -> list[xs.XmlEvent]:
        async with asyncio.timeout(timeout):
            while not done(self.events) and not self.eof:
                data = await self.reader.read(65536)
                if not data:
                    self.eof = True
                    break
                self.events.extend(self.parser.feed(data))
        return self.events

    async def stream_error(self) -> str:
        """The condition of the stream error the device sent, once the
        connection ended."""
        await self.read_until(lambda evs: False)
        errors = [e for e in self.events if isinstance(e, xs.StreamErrorReceived)]
        assert errors, self.events
        return errors[0].condition

    def stanzas(self) -> list[xs.StanzaReceived]:
        return [e for e in self.events if isinstance(e, xs.StanzaReceived)]

    def close(self) -> None:
        self.writer.close()


@pytest.fixture
async def listener(tv_id: DeviceIdentity) -> AsyncIterator[LinkLocal]:
    async with LinkLocal(TV, tv_id.fingerprint, LinkLocalConfig(header_timeout=2.0),
                         features=("urn:example:remote",)) as ll:
        await ll.start("127.0.0.1")
        yield ll


async def accepted(ll: LinkLocal) -> LinkLocalStream:
    async with asyncio.timeout(DEADLINE):
        return await ll.accept()


async def test_a_legacy_clients_stream_is_served_and_marked_unauthenticated(
        listener: LinkLocal) -> None:
    client = await Client.connect(listener)
    await client.send(header(PIDGIN, listener.name)
                      + b"<message type='chat' from='alice@pidgin-box'><body>pause</body></message>")
    stream = await accepted(listener)
    assert stream.authenticated is False and not isinstance(stream, Session)
    assert stream.peer_name == PIDGIN and stream.incoming
    async with asyncio.timeout(DEADLINE):
        got = await stream.receive()
    assert st.body_of(got) == "pause" and got.get("from") == PIDGIN
    stream.send(st.message("paused"))
    await client.read_until(lambda evs: any(isinstance(e, xs.StanzaReceived) for e in evs))
    opened = client.events[0]
    assert isinstance(opened, xs.StreamOpened) and opened.attrs["from"] == listener.name
    (reply,) = client.stanzas()
    assert st.body_of(reply.element) == "paused"
    assert reply.element.get("to") == PIDGIN and reply.element.get("from") == listener.name
    # Closing: our </stream:stream>, the client's, the end.
    closing = asyncio.create_task(stream.close())
    await client.read_until(lambda evs: isinstance(evs[-1], xs.StreamClosed))
    await client.send(b"</stream:stream>")
    async with asyncio.timeout(DEADLINE):
        ended = await closing
    assert ended.error is None


async def test_disco_over_the_stream_answers_what_the_caps_hash(listener: LinkLocal) -> None:
    client = await Client.connect(listener)
    await client.send(header(PIDGIN, listener.name) + b"<iq type='get' id='q1'>"
                      b"<query xmlns='http://jabber.org/protocol/disco#info'/></iq>")
    await client.read_until(lambda evs: any(isinstance(e, xs.StanzaReceived) for e in evs))
    (answer,) = client.stanzas()
    assert ver_of_disco_info(answer.element) == listener.caps.ver \
        == caps_for(("urn:example:remote",)).ver
    assert listener.presence().caps == listener.caps
    client.close()


async def test_a_link_local_stanza_claiming_a_known_jid_never_reaches_its_session(
        pair: Pair, remote_id: DeviceIdentity) -> None:
    """The remote has an authenticated session with the TV. A XEP-0174 client
    claiming the remote's JID is delivered as an unauthenticated stream with
    that claimed name, and nothing of it appears on the session."""
    tv, remote = pair.tv, pair.remote
    client_session = await remote.connect("tv@example.org", tv.address)
    async with asyncio.timeout(DEADLINE):
        tv_session = await tv.accept()
    async with LinkLocal(TV, pair.tv_id.fingerprint, peer=tv) as ll:
        await ll.start("127.0.0.1")
        spoof = await Client.connect(ll)
        claimed = str(remote_id.jid)
        await spoof.send(header(claimed, ll.name) + (
            f"<message from='{claimed}' type='chat'><body>unlock</body></message>").encode())
        stream = await accepted(ll)
        async with asyncio.timeout(DEADLINE):
            got = await stream.receive()
        assert stream.peer_name == claimed and stream.authenticated is False
        assert got.get("from") == claimed and st.body_of(got) == "unlock"
        # The session carries only what the key-checked remote sends.
        client_session.send(st.message("real"))
        async with asyncio.timeout(DEADLINE):
            real = await tv_session.receive()
        await tv_session.ping(timeout=DEADLINE)  # one more round trip after both arrived
        assert st.body_of(real) == "real" and tv_session.receive_nowait() is None
        assert tv.sessions() == [tv_session] and tv_session.peer_jid == claimed
        spoof.close()


@pytest.mark.parametrize(("data", "condition"), [
    (b"<?xml version='1.0'?><!DOCTYPE lolz [<!ENTITY lol 'lol'><!ENTITY lol2 "
     b"'&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;'>]><lolz>&lol2;</lolz>",
     "restricted-xml"),
    (b"<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' "
     b"from='" + b"a" * 200_000, "policy-violation"),
    (header(PIDGIN, "tv@example.org") + b"<message><body>" + b"x" * 1_000_000,
     "policy-violation"),
    (header(None, "tv@example.org"), "invalid-from"),
], ids=["xml-bomb", "endless-header", "huge-text", "no-from"])
async def test_hostile_input_gets_the_stream_error_and_the_listener_serves_on(
        listener: LinkLocal, data: bytes, condition: str) -> None:
    bad = await Client.connect(listener)
    bad.writer.write(data)
    assert await bad.stream_error() == condition
    assert listener.counters["stream_errors"] == 1
    good = await Client.connect(listener)
    await good.send(header(PIDGIN, listener.name) + b"<message><body>hi</body></message>")
    stream = await accepted(listener)
    async with asyncio.timeout(DEADLINE):
        assert st.body_of(await stream.receive()) == "hi"


async def test_a_header_that_never_completes_is_timed_out(tv_id: DeviceIdentity) -> None:
    async with LinkLocal(TV, tv_id.fingerprint, LinkLocalConfig(header_timeout=0.3)) as ll:
        await ll.start("127.0.0.1")
        slow = await Client.connect(ll)
        await slow.send(header(PIDGIN, ll.name)[:30])
        assert await slow.stream_error() == "connection-timeout"
        assert ll.counters["header_timeouts"] == 1


async def test_a_connection_flood_is_bounded_per_ip_and_in_all(
        tv_id: DeviceIdentity, caplog: pytest.LogCaptureFixture) -> None:
    """40 connections that never send a header, from 127.0.0.2 and .3: at
    most 2 live per IP (the oldest silent one makes room), at most 4 in all;
    a client from 127.0.0.4 that sends its header at once gets its stream,
    and stanzas flow. Then 4 open streams fill the table: one more is
    refused with resource-constraint. Warnings are rate-limited."""
    config = LinkLocalConfig(max_connections=4, max_connections_per_ip=2)
    caplog.set_level(logging.WARNING, logger="dtx.aio.linklocal")
    async with LinkLocal(TV, tv_id.fingerprint, config) as ll:
        await ll.start("127.0.0.1")
        flood = [await Client.connect(ll, f"127.0.0.{2 + i % 2}") for i in range(40)]
        good = await Client.connect(ll, "127.0.0.4")
        await good.send(header(PIDGIN, ll.name) + b"<message><body>hi</body></message>")
        stream = await accepted(ll)
        async with asyncio.timeout(DEADLINE):
            assert st.body_of(await stream.receive()) == "hi"
        assert ll.statistics().incoming <= 4
        assert ll.counters["evicted"] >= 36
        for c in flood[:30]:  # the early ones were dropped with a stream error
            assert await c.stream_error() == "resource-constraint"
        # Fill the table with open streams (the flood's pending ones make room).
        opened = [good]
        for i in range(3):
            c = await Client.connect(ll, f"127.0.0.{5 + i}")
            await c.send(header(f"u{i}@box", ll.name))
            await accepted(ll)
            opened.append(c)
        refused = await Client.connect(ll, "127.0.0.9")
        assert await refused.stream_error() == "resource-constraint"
        assert ll.counters["refused_total"] == 1
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
        # 37 evictions and a refusal: per kind and IP the 1st, 2nd, 4th ... only.
        assert ll.counters["evicted"] + ll.counters["refused_total"] >= 37
        assert len(warnings) <= 13
        for c in [*flood, *opened, refused]:
            c.close()


async def test_a_reader_that_falls_behind_stops_the_sender(listener: LinkLocal) -> None:
    client = await Client.connect(listener)
    message = b"<message><body>" + b"y" * 1000 + b"</body></message>"
    writer = asyncio.create_task(client.send(header(PIDGIN, listener.name) + message * 32_000))
    stream = await accepted(listener)
    limit = listener.config.receive_buffer_bytes
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(DEADLINE):
        while not stream._paused:  # the driver stops reading past the limit
            await asyncio.sleep(0.01)
    # The limit, plus one read of asyncio's (at most 256 KiB): then reading stops.
    assert limit < stream._unread_bytes <= limit + 256 * 1024 + 2_000
    assert not writer.done()  # TCP pushes back on the 32 MB writer
    got = 0
    deadline = loop.time() + 30
    while got < 32_000 and loop.time() < deadline:
        async with asyncio.timeout(DEADLINE):
            await stream.receive()
        got += 1
    assert got == 32_000
    await writer


async def test_outgoing_streams_between_two_devices(tv_id: DeviceIdentity,
                                                    remote_id: DeviceIdentity) -> None:
    async with LinkLocal(TV, tv_id.fingerprint) as tv, \
            LinkLocal(str(remote_id.jid), remote_id.fingerprint) as remote:
        await tv.start("127.0.0.1")
        await remote.start("127.0.0.1", listen=False)
        out = await remote.open_stream(tv.name, ("127.0.0.1", tv.port), timeout=DEADLINE)
        assert out.peer_name == tv.name and out.authenticated is False and not out.incoming
        inc = await accepted(tv)
        assert inc.peer_name == remote.name
        out.send(st.message("ping?"))
        async with asyncio.timeout(DEADLINE):
            assert st.body_of(await inc.receive()) == "ping?"
        inc.send(st.message("pong"))
        async with asyncio.timeout(DEADLINE):
            assert st.body_of(await out.receive()) == "pong"
        async with asyncio.timeout(DEADLINE):
            assert (await out.close()).error is None
            assert (await inc.wait_closed()).error is None
        with pytest.raises(SessionClosedError):
            out.send(st.message("late"))


async def test_send_while_the_peer_does_not_read_is_bounded(listener: LinkLocal) -> None:
    client = await Client.connect(listener)  # never reads
    await client.send(header(PIDGIN, listener.name))
    stream = await accepted(listener)
    body = "z" * 60_000
    sent = 0
    with pytest.raises(SendBufferFullError):
        for _ in range(1000):  # bounded: 60 MB would be far past the limit
            stream.send(st.message(body))
            sent += 1
    # The kernel's socket buffers took the first megabytes; what dtx itself
    # holds unsent stays within the limit.
    transport = stream._transport
    assert transport is not None and sent > 0
    assert transport.get_write_buffer_size() <= listener.config.send_buffer_bytes
    stream.abort()
    client.close()


async def test_closing_the_listener_ends_its_streams(tv_id: DeviceIdentity) -> None:
    ll = LinkLocal(TV, tv_id.fingerprint)
    await ll.start("127.0.0.1")
    port = ll.port
    client = await Client.connect(ll)
    await client.send(header(PIDGIN, ll.name))
    stream = await accepted(ll)
    closing = asyncio.create_task(ll.close())
    await client.read_until(lambda evs: bool(evs) and isinstance(evs[-1], xs.StreamClosed))
    await client.send(b"</stream:stream>")
    async with asyncio.timeout(DEADLINE):
        await closing
        assert (await stream.wait_closed()).error is None
    assert ll.port == 0
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", port)
