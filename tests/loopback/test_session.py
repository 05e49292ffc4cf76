"""Sessions between two real UDP sockets on loopback."""

from __future__ import annotations

import asyncio
from xml.etree.ElementTree import Element, SubElement

import pytest

from dtx import stanza as st
from dtx.aio.peer import Peer, Session, open_peer
from dtx.errors import (
    AuthenticationError,
    PinMismatchError,
    SessionClosedError,
    StanzaTooLargeError,
    StreamError,
    TrustError,
    UnknownPeerError,
    UntrustedKeyError,
)
from dtx.identity import generate_identity
from dtx.proto.xmlstream import encode_stanza
from dtx.trust import PinStore, StaticKeys, Verifier

from .conftest import BOTH_LOOPS, Pair, trusting

pytestmark = BOTH_LOOPS

DEADLINE = 20.0


async def wait_for_refusal(peer: Peer) -> None:
    """The refusing side records the refusal when its connection has
    drained, which may be after the other side saw the close."""
    async with asyncio.timeout(DEADLINE):
        while not peer.refusals:
            await asyncio.sleep(0.01)


async def open_pair(pair: Pair) -> tuple[Session, Session]:
    client = await pair.remote.connect("tv@example.org", pair.tv.address)
    async with asyncio.timeout(DEADLINE):
        server = await pair.tv.accept()
    return client, server


async def test_both_sides_see_the_authenticated_jid(pair: Pair) -> None:
    client, server = await open_pair(pair)
    assert client.peer_jid == "tv@example.org/living-room"
    assert server.peer_jid == "remote@example.org/phone"
    client.send(st.message("pause", to="tv@example.org"))
    async with asyncio.timeout(DEADLINE):
        got = await server.receive()
    assert st.body_of(got) == "pause"
    # A stanza without 'from' is stamped with the authenticated JID.
    assert got.get("from") == "remote@example.org/phone"


async def test_ten_thousand_stanzas_each_way_in_order(pair: Pair) -> None:
    n = 10_000
    client, server = await open_pair(pair)

    async def pump(session: Session, to: str) -> None:
        for i in range(n):
            session.send(st.message(str(i), to=to, id_=f"m{i}"))
            if i % 500 == 0:
                await asyncio.sleep(0)  # let the other direction interleave

    async def drain(session: Session) -> list[str]:
        return [st.body_of(await session.receive()) or "" for _ in range(n)]

    async with asyncio.timeout(120):
        _, _, got_by_server, got_by_client = await asyncio.gather(
            pump(client, "tv@example.org"),
            pump(server, "remote@example.org"),
            drain(server),
            drain(client),
        )
        await client.wait_acknowledged()
        await server.wait_acknowledged()
    expected = [str(i) for i in range(n)]
    assert got_by_server == expected
    assert got_by_client == expected
    assert server.receive_nowait() is None and client.receive_nowait() is None
    assert client.statistics().stanzas_acknowledged == n
    ended = await client.close()
    assert ended.error is None and ended.unacknowledged == ()


async def test_graceful_close_delivers_everything_sent(pair: Pair) -> None:
    client, server = await open_pair(pair)
    for i in range(1000):
        client.send(st.message(str(i)))
    ended = await client.close()
    assert ended.error is None
    assert ended.unacknowledged == ()
    bodies = [st.body_of(el) async for el in server]
    assert bodies == [str(i) for i in range(1000)]
    with pytest.raises(SessionClosedError):
        client.send(st.message("late"))


async def test_ping_and_disco_are_answered(pair: Pair) -> None:
    client, server = await open_pair(pair)
    rtt = await client.ping()
    assert 0 < rtt < DEADLINE
    query = Element(f"{{{st.NS_DISCO_INFO}}}query")
    reply = await client.request(st.iq("get", "d1", to=server.local_jid, payload=query))
    assert reply.get("type") == "result"
    features = {f.get("var") for f in reply.iter(f"{{{st.NS_DISCO_INFO}}}feature")}
    assert {st.NS_PING, st.NS_DISCO_INFO} <= features
    # pings and disco never reach the application
    assert server.receive_nowait() is None


async def test_application_features_in_disco(tv_id, remote_id) -> None:  # type: ignore[no-untyped-def]
    from dtx.aio.peer import PeerConfig
    from dtx.proto.session import SessionConfig

    cfg = PeerConfig(session=SessionConfig(features=("urn:example:remote-control",)))
    async with open_peer(tv_id, trusting(tv_id, remote_id), config=cfg) as tv, \
            open_peer(remote_id, trusting(tv_id, remote_id)) as remote:
        client = await remote.connect("tv@example.org", tv.address)
        query = Element(f"{{{st.NS_DISCO_INFO}}}query")
        reply = await client.request(st.iq("get", "d1", payload=query))
        features = {f.get("var") for f in reply.iter(f"{{{st.NS_DISCO_INFO}}}feature")}
        assert "urn:example:remote-control" in features


# -- authentication ---------------------------------------------------------------


async def test_client_with_untrusted_key_is_refused_on_both_sides(tv_id, remote_id) -> None:  # type: ignore[no-untyped-def]
    impostor = generate_identity("remote@example.org/phone")  # same JID, other key
    async with open_peer(tv_id, trusting(tv_id, remote_id)) as tv, \
            open_peer(impostor, trusting(tv_id)) as bad:
        session = await bad.connect("tv@example.org", tv.address)
        session.send(st.message("let me in"))
        async with asyncio.timeout(DEADLINE):
            ended = await session.wait_closed()
        assert isinstance(ended.error, AuthenticationError)
        # What it sent is handed back, not silently dropped.
        assert [st.body_of(e) for e in ended.unacknowledged] == ["let me in"]
        await wait_for_refusal(tv)
        assert tv.counters["handshakes_refused"] == 1
        (_, error), = tv.refusals
        assert isinstance(error, UntrustedKeyError)
        assert impostor.fingerprint in str(error)
        # nothing it sent reached the application
        assert tv._incoming.empty()


async def test_server_with_untrusted_key_is_refused_on_both_sides(tv_id, remote_id) -> None:  # type: ignore[no-untyped-def]
    fake_tv = generate_identity("tv@example.org/living-room")
    async with open_peer(fake_tv, trusting(tv_id, remote_id)) as tv, \
            open_peer(remote_id, trusting(tv_id, remote_id)) as remote:
        with pytest.raises(UntrustedKeyError) as info:
            await remote.connect("tv@example.org", tv.address)
        assert fake_tv.fingerprint in str(info.value)
        await wait_for_refusal(tv)
        (_, error), = tv.refusals
        assert isinstance(error, AuthenticationError)
        assert tv._incoming.empty()


async def test_pin_mismatch_names_both_fingerprints(tv_id, remote_id, tmp_path) -> None:  # type: ignore[no-untyped-def]
    pins = PinStore(tmp_path / "pins.json")
    old_tv = generate_identity("tv@example.org/living-room")
    pins.pin("tv@example.org/living-room", old_tv.public_key)
    keys = StaticKeys({"tv@example.org": [tv_id.public_key, old_tv.public_key]})
    async with open_peer(tv_id, trusting(tv_id, remote_id)) as tv, \
            open_peer(remote_id, Verifier([keys], pins)) as remote:
        with pytest.raises(PinMismatchError) as info:
            await remote.connect("tv@example.org", tv.address)
        message = str(info.value)
        assert old_tv.fingerprint in message and tv_id.fingerprint in message


async def test_trust_on_first_use_pins_the_key(tv_id, remote_id, tmp_path) -> None:  # type: ignore[no-untyped-def]
    pins_path = tmp_path / "pins.json"
    async with open_peer(tv_id, trusting(tv_id, remote_id)) as tv:
        async with open_peer(remote_id, Verifier([], PinStore(pins_path))) as remote:
            with pytest.raises(UnknownPeerError):
                await remote.connect("tv@example.org", tv.address)
        tofu = Verifier([], PinStore(pins_path), trust_on_first_use=True)
        async with open_peer(remote_id, tofu) as remote:
            session = await remote.connect("tv@example.org", tv.address)
            await session.close()
        assert PinStore(pins_path).get("tv@example.org/living-room") == tv_id.public_key


async def test_reaching_another_jid_is_refused(tv_id, remote_id) -> None:  # type: ignore[no-untyped-def]
    radio = generate_identity("radio@example.org/kitchen")
    async with open_peer(radio, trusting(radio, remote_id)) as other, \
            open_peer(remote_id, trusting(tv_id, radio)) as remote:
        with pytest.raises(TrustError, match="not the requested tv@example.org"):
            await remote.connect("tv@example.org", other.address)


# -- stream rules and hostile input over a live session --------------------------------


def raw_send(session: Session, data: bytes) -> None:
    """Write bytes on the session's XML stream, bypassing the serialiser."""
    conn = session.connection
    core = conn.core
    assert core._stream is not None
    core.flush()
    conn.quic.send_stream_data(core._stream, data)
    conn._endpoint._dirty.add(conn)
    session._wake()


async def expect_stream_error(client: Session, server: Session, condition: str) -> None:
    async with asyncio.timeout(DEADLINE):
        server_end = await server.wait_closed()
        client_end = await client.wait_closed()
    assert isinstance(server_end.error, StreamError)
    assert server_end.error.condition == condition
    assert isinstance(client_end.error, StreamError)
    assert client_end.error.condition == condition


async def test_spoofed_from_is_a_stream_error(pair: Pair) -> None:
    client, server = await open_pair(pair)
    client.send(st.message("before"))
    raw_send(client, b"<message from='tv@example.org/living-room'><body>x</body></message>")
    await expect_stream_error(client, server, "invalid-from")
    assert [st.body_of(e) async for e in server] == ["before"]


HOSTILE = [
    # A DTD is only possible in the prolog, so mid-stream it is malformed;
    # the prolog case (restricted-xml) is covered by the parser's unit tests.
    (b"<!DOCTYPE x [<!ENTITY a 'aaaa'>]><message/>", "not-well-formed"),
    (b"<message><body>&lol;</body></message>", "restricted-xml"),
    (b"<!-- hello --><message/>", "restricted-xml"),
    (b"<?evil x?><message/>", "restricted-xml"),
    (b"<message><body>" + b"<b>" * 100_000, "policy-violation"),
    (b"<message><body>oops</bod></message>", "not-well-formed"),
    (b"<message><body>\xff\xfe</body></message>", "not-well-formed"),
    (b"<foo/>", "unsupported-stanza-type"),
]


@pytest.mark.parametrize("data, condition", HOSTILE, ids=[f"{i}-{c}" for i, (_, c) in enumerate(HOSTILE)])
async def test_hostile_xml_ends_in_the_right_stream_error(
    pair: Pair, data: bytes, condition: str
) -> None:
    client, server = await open_pair(pair)
    raw_send(client, data)
    await expect_stream_error(client, server, condition)
    # the listening peer keeps serving: a new session works
    again, _ = await open_pair(pair)
    assert await again.ping() > 0


async def test_sixty_four_megabyte_text_node_is_cut_off(pair: Pair) -> None:
    client, server = await open_pair(pair)
    raw_send(client, b"<message><body>")
    chunk = b"a" * 65536
    for _ in range(1024):  # 64 MiB at most; the server gives up long before
        if client._closed.done():
            break
        raw_send(client, chunk)
        await asyncio.sleep(0)
    await expect_stream_error(client, server, "policy-violation")
    assert server.statistics().bytes_received < 8 * 1024 * 1024


# -- the datagram channel ------------------------------------------------------------


async def test_datagram_channel(pair: Pair) -> None:
    client, server = await open_pair(pair)
    await client.ping()  # the server's stream header has arrived: session open
    client.send_datagram(st.message("volume 11"))
    async with asyncio.timeout(DEADLINE):
        got = await server.receive_datagram()
    assert st.body_of(got) == "volume 11"
    assert got.get("from") == "remote@example.org/phone"


async def test_oversized_datagram_is_refused_at_send_time(pair: Pair) -> None:
    client, server = await open_pair(pair)
    await client.ping()
    limit = client.connection.max_datagram_bytes()
    base = len(encode_stanza(st.message("x"))) - 1

    def sized(n: int) -> Element:
        el = st.message("x" * (n - base))
        assert len(encode_stanza(el)) == n
        return el

    with pytest.raises(StanzaTooLargeError):
        client.send_datagram(sized(limit + 1))
    # the largest allowed one still goes through, and so do the ones after it
    client.send_datagram(sized(limit))
    client.send_datagram(st.message("after"))
    async with asyncio.timeout(DEADLINE):
        first = await server.receive_datagram()
        second = await server.receive_datagram()
    assert {len(st.body_of(first) or ""), len(st.body_of(second) or "")} == {
        limit - base,
        len("after"),
    }


async def test_stanza_larger_than_the_limit_is_refused(pair: Pair) -> None:
    client, _ = await open_pair(pair)
    el = st.message("x" * (300 * 1024))
    with pytest.raises(StanzaTooLargeError):
        client.send(el)


async def test_peer_crash_hands_back_unacknowledged_stanzas(pair: Pair) -> None:
    client, server = await open_pair(pair)
    await client.ping()
    server.abort()  # the TV vanishes without closing the stream
    async with asyncio.timeout(DEADLINE):
        while not client._closed.done():
            client.send(st.message("are you there?"))
            await asyncio.sleep(0.01)
    ended = await client.wait_closed()
    assert ended.error is not None
    messages = [e for e in ended.unacknowledged if e.tag == st.MESSAGE]
    assert len(messages) >= 1
    assert all(st.body_of(e) == "are you there?" for e in messages)


async def test_deep_nesting_inside_a_stanza(pair: Pair) -> None:
    client, server = await open_pair(pair)
    el = st.message()
    node = el
    for _ in range(100):
        node = SubElement(node, "{urn:example}x")
    client.send(el)
    await expect_stream_error(client, server, "policy-violation")


async def test_a_reader_that_falls_behind_bounds_memory_and_loses_nothing(  # type: ignore[no-untyped-def]
    tv_id, remote_id
) -> None:
    """The TV does not read; the remote keeps sending. The TV stops granting
    QUIC credit, so what it holds stays bounded; once it reads, everything
    arrives in order."""
    from dtx.aio.peer import PeerConfig

    buffer = 256 * 1024
    config = PeerConfig(receive_buffer_bytes=buffer)
    n = 60_000  # ~12 MB of stanzas, far beyond the buffer and the window
    async with open_peer(tv_id, trusting(tv_id, remote_id), config=config) as tv, \
            open_peer(remote_id, trusting(tv_id, remote_id)) as remote:
        client = await remote.connect("tv@example.org", tv.address)
        server = await tv.accept()
        for i in range(n):
            client.send(st.message(str(i)))
        # wait (bounded) until the TV has paused and nothing more arrives
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        last, stable = -1, 0
        while stable < 20 and loop.time() < deadline:
            now_bytes = server.statistics().bytes_received
            stable = stable + 1 if now_bytes == last else 0
            last = now_bytes
            await asyncio.sleep(0.01)
        assert server.connection.quic.receive_paused
        window = server.connection.quic.stream_window
        assert server.statistics().received_unconsumed_bytes <= buffer + window + 64 * 1024
        assert server.statistics().bytes_received < n * 100 // 2
        assert client.statistics().unacknowledged > 0
        async with asyncio.timeout(60):
            bodies = [st.body_of(await server.receive()) for _ in range(n)]
        assert bodies == [str(i) for i in range(n)]
        await client.wait_acknowledged(timeout=30)
