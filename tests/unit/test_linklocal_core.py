"""The sans-IO XEP-0174 stream (dtx.proto.linklocal) and XEP-0115 caps
(dtx.proto.caps): bytes in, bytes and events out, a clock that is an
argument. No sockets."""

from __future__ import annotations

import random
from xml.etree.ElementTree import Element

import pytest

from dtx import stanza as st
from dtx.errors import SendBufferFullError, SessionClosedError, StanzaTooLargeError, StreamError
from dtx.proto import xmlstream as xs
from dtx.proto.caps import (
    DTX_IDENTITY,
    Caps,
    Identity,
    caps_for,
    caps_ver,
    disco_features,
    ver_of_disco_info,
)
from dtx.proto.linklocal import (
    LinkLocalConfig,
    LinkLocalEnded,
    LinkLocalEvent,
    LinkLocalOpened,
    LinkLocalStanzaReceived,
    LinkLocalState,
    LinkLocalStream,
    admit,
)
from dtx.proto.session import SessionConfig

ME = "tv@dtx-tv-example-org-living-room-abcdefgh"
PIDGIN = "alice@pidgin-box"
FEATURES = ("urn:example:remote-control",)
# What libpurple's Bonjour plugin writes (libpurple/protocols/bonjour/jabber.c).
PIDGIN_HEADER = (b"<?xml version='1.0' encoding='UTF-8' ?>\n<stream:stream xmlns='jabber:client' "
                 b"xmlns:stream='http://etherx.jabber.org/streams' from='alice@pidgin-box' "
                 b"to='" + ME.encode() + b"'>")
PIDGIN_MESSAGE = (b"<message to='" + ME.encode() + b"' from='alice@pidgin-box' type='chat'>"
                  b"<body>pause</body><html xmlns='http://www.w3.org/1999/xhtml'><body>"
                  b"<font>pause</font></body></html><x xmlns='jabber:x:event'><composing/></x>"
                  b"</message>")
DISCO = (b"<iq type='get' id='d1'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>")


def responder(config: LinkLocalConfig | None = None) -> LinkLocalStream:
    return LinkLocalStream(local_name=ME, config=config or LinkLocalConfig(),
                           rng=random.Random(1), now=0.0, features=FEATURES,
                           accept_names=["tv@example.org", "tv@example.org/living-room"])


def events(stream: LinkLocalStream) -> list[LinkLocalEvent]:
    out = []
    while (ev := stream.next_event()) is not None:
        out.append(ev)
    return out


def parse(data: bytes) -> list[xs.XmlEvent]:
    """What a peer would read of ``data`` (a whole stream or its start)."""
    return xs.XmlStreamParser().feed(data)


def ended_with(stream: LinkLocalStream) -> StreamError:
    (end,) = [e for e in events(stream) if isinstance(e, LinkLocalEnded)]
    assert isinstance(end.error, StreamError), end.error
    assert stream.closed
    return end.error


# -- XEP-0115 ---------------------------------------------------------------------------


def test_caps_ver_matches_the_xep_0115_example() -> None:
    # XEP-0115 section 5.2, simple generation example.
    features = ["http://jabber.org/protocol/caps", "http://jabber.org/protocol/disco#info",
                "http://jabber.org/protocol/disco#items", "http://jabber.org/protocol/muc"]
    assert caps_ver([Identity("client", "pc", "", "Exodus 0.9.1")], features) == \
        "QgayPKawpkPSDYmwT/WM94uAlu0="


def test_caps_cover_ping_disco_and_the_application_features() -> None:
    assert disco_features(FEATURES) == tuple(sorted(
        ["urn:xmpp:ping", "http://jabber.org/protocol/disco#info", *FEATURES]))
    caps = caps_for(FEATURES)
    assert caps == Caps("urn:dtx", "sha-1", caps_ver([DTX_IDENTITY], disco_features(FEATURES)))
    assert caps.ver != caps_for().ver  # the application's features change it


def test_a_dtx_session_answers_disco_with_what_the_caps_hash() -> None:
    from tests.unit.test_session_core import make_pair

    pair = make_pair(server_config=SessionConfig(features=FEATURES))
    pair.roundtrip()
    pair.client.deaf = True
    pair.client.write(DISCO)
    pair.roundtrip()
    got = parse(b"<stream:stream xmlns='jabber:client' "
                b"xmlns:stream='http://etherx.jabber.org/streams'>" + bytes(pair.client.heard))
    (answer,) = [e.element for e in got if isinstance(e, xs.StanzaReceived)
                 and e.element.tag == st.IQ]
    assert answer.get("type") == "result"
    assert ver_of_disco_info(answer) == caps_for(FEATURES).ver


# -- the responding side (a legacy client connects) -------------------------------------


@pytest.mark.parametrize("split", [False, True], ids=["whole", "byte-by-byte"])
def test_a_pidgin_stream_opens_and_its_message_arrives_marked_with_the_claimed_name(
        split: bool) -> None:
    s = responder()
    data = PIDGIN_HEADER + PIDGIN_MESSAGE
    chunks = [data[i:i + 1] for i in range(len(data))] if split else [data]
    for chunk in chunks:
        s.receive_data(chunk, 1.0)
    evs = events(s)
    assert [type(e) for e in evs] == [LinkLocalOpened, LinkLocalStanzaReceived]
    assert evs[0] == LinkLocalOpened(PIDGIN, s.stream_id)
    stanza = evs[1]
    assert isinstance(stanza, LinkLocalStanzaReceived)
    assert stanza.stanza.get("from") == PIDGIN and st.body_of(stanza.stanza) == "pause"
    answer = s.data_to_send()
    (opened,) = parse(answer)
    assert isinstance(opened, xs.StreamOpened)
    # Pidgin sent no version: none comes back, nor stream features.
    assert opened.attrs == {"from": ME, "to": PIDGIN, "id": s.stream_id}
    assert b"features" not in answer


def test_a_version_1_header_gets_version_and_empty_features() -> None:
    s = responder()
    s.receive_data(PIDGIN_HEADER.replace(b"from=", b"version='1.0' from="), 0.0)
    answer = s.data_to_send()
    assert b' version="1.0"' in answer and answer.endswith(b"<stream:features/>")


def test_a_stanza_without_from_is_stamped_with_the_claimed_name() -> None:
    s = responder()
    s.receive_data(PIDGIN_HEADER + b"<message><body>hi</body></message>", 0.0)
    (stanza,) = [e for e in events(s) if isinstance(e, LinkLocalStanzaReceived)]
    assert stanza.stanza.get("from") == PIDGIN


def test_disco_and_ping_are_answered_with_what_the_caps_hash() -> None:
    s = responder()
    s.receive_data(PIDGIN_HEADER + DISCO.replace(b"id=", b"from='alice@pidgin-box' id=")
                   + b"<iq type='get' id='p1'><ping xmlns='urn:xmpp:ping'/></iq>", 0.0)
    assert [type(e) for e in events(s)] == [LinkLocalOpened]  # answered, not delivered
    got = [e.element for e in parse(s.data_to_send()) if isinstance(e, xs.StanzaReceived)]
    disco, pong = got
    assert disco.get("to") == PIDGIN and disco.get("from") == ME and disco.get("id") == "d1"
    assert ver_of_disco_info(disco) == caps_for(FEATURES).ver
    assert pong.get("type") == "result" and pong.get("id") == "p1"
    assert s.statistics.queries_answered == 2


@pytest.mark.parametrize(("data", "condition"), [
    (PIDGIN_HEADER.replace(b" from='alice@pidgin-box'", b""), "invalid-from"),
    (PIDGIN_HEADER.replace(ME.encode(), b"someone@else"), "host-unknown"),
    (PIDGIN_HEADER + b"<message from='bob@pidgin-box'><body>x</body></message>", "invalid-from"),
    (PIDGIN_HEADER + b"<r xmlns='urn:xmpp:sm:3'/>", "unsupported-stanza-type"),
    (b"<?xml version='1.0'?><!DOCTYPE lolz [<!ENTITY lol 'lol'>]>", "restricted-xml"),
    (PIDGIN_HEADER + b"<message><body>" + b"a" * 70_000, "policy-violation"),
    (b"<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' "
     b"from='" + b"a" * 70_000, "policy-violation"),
    (PIDGIN_HEADER + b"<presence>" + b"<a>" * 17, "policy-violation"),
    (PIDGIN_HEADER + b"junk", "bad-format"),
], ids=["no-from", "wrong-to", "stanza-from", "sm", "dtd", "big-stanza", "endless-header",
        "deep", "text"])
def test_bad_input_ends_in_the_stream_error(data: bytes, condition: str) -> None:
    s = responder()
    s.receive_data(data, 0.0)
    assert ended_with(s).condition == condition
    out = s.data_to_send()
    got = parse(out)
    # A header first when none was sent yet (RFC 6120 section 4.9.1.2), the error, the end.
    assert isinstance(got[0], xs.StreamOpened)
    assert isinstance(got[-2], xs.StreamErrorReceived) and got[-2].condition == condition
    assert isinstance(got[-1], xs.StreamClosed)
    s.receive_data(PIDGIN_MESSAGE, 1.0)  # nothing more is read
    assert events(s) == [] and s.data_to_send() == b""


def test_no_header_in_time_is_a_connection_timeout_on_the_timer() -> None:
    s = responder(LinkLocalConfig(header_timeout=5.0))
    s.receive_data(PIDGIN_HEADER[:40], 1.0)  # a trickled header never completes
    assert s.get_timer() == 5.0
    s.handle_timer(4.9)
    assert not s.closed
    s.handle_timer(5.0)
    assert ended_with(s).condition == "connection-timeout"


def test_idle_stream_is_closed_gracefully() -> None:
    s = responder(LinkLocalConfig(idle_timeout=30.0, close_timeout=2.0))
    s.receive_data(PIDGIN_HEADER, 1.0)
    s.receive_data(b" ", 10.0)  # whitespace keepalives count as activity
    assert s.get_timer() == 40.0
    s.data_to_send()
    s.handle_timer(40.0)
    assert s.state is LinkLocalState.CLOSING and s.data_to_send() == b"</stream:stream>"
    s.receive_data(b"</stream:stream>", 41.0)
    assert events(s)[-1] == LinkLocalEnded(None)


def test_the_peer_closing_first_gets_our_closing_tag() -> None:
    s = responder()
    s.receive_data(PIDGIN_HEADER, 0.0)
    s.data_to_send()
    s.receive_data(b"</stream:stream>", 1.0)
    assert s.data_to_send() == b"</stream:stream>"
    assert events(s)[-1] == LinkLocalEnded(None)


@pytest.mark.parametrize(("before", "message"), [
    (b"", "before a stream header"), (PIDGIN_HEADER, "without ending the stream")])
def test_a_hang_up_is_an_error_unless_we_were_closing(before: bytes, message: str) -> None:
    s = responder()
    s.receive_data(before, 0.0)
    s.receive_data(b"", 1.0)
    (end,) = [e for e in events(s) if isinstance(e, LinkLocalEnded)]
    assert isinstance(end.error, SessionClosedError) and message in str(end.error)


# -- the initiating side ------------------------------------------------------------------


def initiator() -> LinkLocalStream:
    return LinkLocalStream(local_name=ME, peer_name=PIDGIN, config=LinkLocalConfig(),
                           rng=random.Random(2), now=0.0)


def test_the_initiator_writes_its_header_at_once_and_sends_once_answered() -> None:
    s = initiator()
    (header,) = parse(s.data_to_send())
    assert isinstance(header, xs.StreamOpened)
    assert header.attrs["from"] == ME and header.attrs["to"] == PIDGIN
    with pytest.raises(SessionClosedError):
        s.send(st.message("too early"))
    # DNS-SD names compare without case.
    s.receive_data(PIDGIN_HEADER.replace(b"alice@pidgin-box", b"Alice@Pidgin-Box"), 1.0)
    assert events(s) == [LinkLocalOpened(PIDGIN, None)]
    s.send(st.message("play"))
    (sent,) = [e.element for e in parse(PIDGIN_HEADER + s.data_to_send())
               if isinstance(e, xs.StanzaReceived)]
    assert sent.get("from") == ME and sent.get("to") == PIDGIN and st.body_of(sent) == "play"


def test_an_answer_from_another_name_is_invalid_from() -> None:
    s = initiator()
    s.receive_data(PIDGIN_HEADER.replace(b"alice@pidgin-box", b"mallory@pidgin-box"), 1.0)
    assert ended_with(s).condition == "invalid-from"


def test_send_limits_queue_nothing() -> None:
    s = initiator()
    s.receive_data(PIDGIN_HEADER, 0.0)
    s.data_to_send()
    with pytest.raises(StanzaTooLargeError):
        s.send(st.message("x" * 70_000))
    with pytest.raises(SendBufferFullError):
        s.send(st.message("hello"), room=10)
    assert s.data_to_send() == b"" and s.statistics.stanzas_sent == 0
    assert s.send(st.message("hello"), room=1000) > 0


def test_close_ends_after_the_peer_answers_or_the_close_timeout() -> None:
    s = initiator()
    s.receive_data(PIDGIN_HEADER, 0.0)
    events(s)
    s.close(1.0)
    assert s.data_to_send().endswith(b"</stream:stream>")
    assert s.get_timer() == 1.0 + LinkLocalConfig().close_timeout
    s.handle_timer(3.0)
    (end,) = events(s)
    assert isinstance(end, LinkLocalEnded) and isinstance(end.error, SessionClosedError)


# -- admission ------------------------------------------------------------------------------

A, B, C = "10.1.0.10", "10.1.0.11", "10.1.0.12"


@pytest.mark.parametrize(("live", "ip", "expected"), [
    ([], A, (True, ())),
    ([(1, A, True), (2, A, False)], A, (True, (2,))),          # per-IP: oldest pending of A
    ([(1, A, True), (2, A, True)], A, (False, ())),            # per-IP, all open: refused
    ([(1, A, False), (2, B, False), (3, B, False)], C, (True, (2,))),  # total: busiest IP
    ([(1, A, True), (2, B, True), (3, B, True)], C, (False, ())),      # total, all open
    ([(1, A, False), (2, B, True), (3, B, False)], C, (True, (3,))),   # never an open one
    ([(1, A, True)], B, (True, ())),
], ids=["empty", "per-ip-evicts", "per-ip-refuses", "total-evicts-busiest",
        "total-refuses", "open-kept", "room"])
def test_admission(live: list[tuple[int, str, bool]], ip: str,
                   expected: tuple[bool, tuple[int, ...]]) -> None:
    decision = admit(live, ip, max_total=3, max_per_ip=2)
    assert (decision.admitted, decision.evict) == expected


def test_elements_handed_to_send_are_not_changed() -> None:
    s = initiator()
    s.receive_data(PIDGIN_HEADER, 0.0)
    el = Element(st.MESSAGE)
    s.send(el)
    assert el.get("from") is None and el.get("to") is None


# -- fuzz: a bad peer ends the stream, never raises out of receive_data ---------------

from hypothesis import given  # noqa: E402
from hypothesis import strategies as hst  # noqa: E402

VALID = PIDGIN_HEADER + PIDGIN_MESSAGE + DISCO + b"</stream:stream>"


def feed_all(chunks: list[bytes]) -> LinkLocalStream:
    s = responder()
    for i, chunk in enumerate(chunks):
        s.receive_data(chunk, float(i))  # raises nothing, whatever the bytes
        s.data_to_send()
    s.handle_timer(1e9)
    end = [e for e in events(s) if isinstance(e, LinkLocalEnded)]
    if end:
        assert end[-1].error is None or isinstance(end[-1].error, (StreamError, SessionClosedError))
    return s


@given(hst.lists(hst.binary(max_size=200), max_size=8))
def test_fuzz_arbitrary_bytes(chunks: list[bytes]) -> None:
    feed_all(chunks)


@given(hst.lists(hst.binary(max_size=100), max_size=4))
def test_fuzz_after_a_valid_header(chunks: list[bytes]) -> None:
    feed_all([PIDGIN_HEADER, *chunks])


@given(hst.integers(0, len(VALID) - 1), hst.integers(0, 255), hst.integers(1, 40))
def test_fuzz_mutations_of_a_valid_stream(at: int, byte: int, split: int) -> None:
    data = VALID[:at] + bytes([byte]) + VALID[at + 1:]
    feed_all([data[i:i + split] for i in range(0, len(data), split)])
