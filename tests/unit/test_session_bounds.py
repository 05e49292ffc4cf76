"""What a session holds for a peer that does not acknowledge, and the
acknowledgement elements' rules (docs/protocol.md 3.3): two sans-IO cores
back to back, a fake clock, no sockets."""

from __future__ import annotations

import pytest

from dtx import stanza as st
from dtx.errors import LocalProtocolError, StreamError, UnacknowledgedLimitError
from dtx.proto.session import SessionConfig, SessionEnded, StanzaReceived
from dtx.wire.xml import MAX_COUNT, decode_count
from tests.unit.test_session_core import End, Pair, make_pair

PING = b"<iq type='get' id='p%d'><ping xmlns='urn:xmpp:ping'/></iq>"
DISCO = b"<iq type='get' id='d%d'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>"
R = b"<r xmlns='urn:xmpp:sm:3'/>"


def opened(**kw: SessionConfig) -> Pair:
    pair = make_pair(**kw)  # type: ignore[arg-type]
    pair.roundtrip()
    assert pair.server.core.is_open and pair.client.core.is_open
    return pair


def ended(pair: Pair, e: End) -> SessionEnded:
    """How ``e``'s session ended (after running the closing timers)."""
    pair.expire()
    (only,) = e.of(SessionEnded)
    assert isinstance(only, SessionEnded)
    return only


def stream_error(pair: Pair, e: End) -> StreamError:
    error = ended(pair, e).error
    assert isinstance(error, StreamError), error
    return error


def tick(pair: Pair, now: float) -> None:
    """Move the clock to ``now``: run due timers, flush with the time, transfer."""
    pair.now = now
    for e in (pair.client, pair.server):
        due = e.core.get_timer()
        if due is not None and due <= now:
            e.core.handle_timer(now)
        e.core.flush(now)
        quic_due = e.quic.get_timer()
        if quic_due is not None and quic_due <= now:
            e.quic.handle_timer(now=now)
        e.pump_events()
    pair.roundtrip()


# -- D1: answers nobody acknowledges ---------------------------------------------


def test_a_ping_flood_that_is_never_acknowledged_is_bounded_and_closed() -> None:
    pair = opened(server_config=SessionConfig(max_unacknowledged_stanzas=100))
    pair.client.deaf = True  # reads nothing, so never answers <r/>
    server = pair.server.core
    for i in range(3):
        server.send(st.message(f"app {i}"))
    pair.roundtrip()
    most = 0
    for batch in range(8):  # 400 pings, 50 per write
        pair.client.write(b"".join(PING % (batch * 50 + i) for i in range(50)))
        pair.roundtrip()
        most = max(most, len(server._unacked))
    assert most == 100  # never more than the bound waits
    assert server.statistics.pings_answered == 97  # 3 application stanzas + 97 answers
    # The first write's 50 answers went out; the 98th ping ended the session
    # at once, before the rest of the second write's answers were written.
    assert pair.client.heard.count(b"type='result'") == 50
    error = stream_error(pair, pair.server)
    assert error.condition == "policy-violation"
    assert "too many unacknowledged stanzas" in error.text
    # The application's stanzas come back; the session's own answers do not.
    assert [st.body_of(e) for e in ended(pair, pair.server).unacknowledged] == [
        "app 0", "app 1", "app 2"]
    assert [st.body_of(e) for e in server.unacknowledged] == ["app 0", "app 1", "app 2"]
    assert stream_error(pair, pair.client).condition == "policy-violation"


def test_the_default_bound_holds_its_answers_and_no_more() -> None:
    bound = SessionConfig().max_unacknowledged_stanzas
    pair = opened()
    pair.client.deaf = True
    server = pair.server.core
    batch = 2000
    for first in range(0, bound + batch, batch):  # past the bound by one batch
        pair.client.write(b"".join(PING % (first + i) for i in range(batch)))
        pair.roundtrip(rounds=200)
    assert server.statistics.pings_answered == bound
    assert server.unacknowledged_bytes == sum(size for _, size in server._unacked)
    assert server.unacknowledged == ()
    assert stream_error(pair, pair.server).condition == "policy-violation"


def test_the_byte_bound_counts_the_encoded_size_of_answers() -> None:
    cfg = SessionConfig(max_stanza_bytes=10_000, max_unacknowledged_bytes=10_000,
                        features=tuple(f"urn:example:feature:{i}" for i in range(10)))
    pair = opened(server_config=cfg)
    pair.client.deaf = True
    server = pair.server.core
    pair.client.write(DISCO % 0)
    pair.roundtrip()
    one = server.unacknowledged_bytes
    assert 400 < one < 1000  # one disco#info result, as encoded
    pair.client.write(b"".join(DISCO % i for i in range(1, 100)))
    pair.roundtrip()
    assert 10_000 - one - 10 < server.unacknowledged_bytes <= 10_000
    assert stream_error(pair, pair.server).condition == "policy-violation"


def test_send_past_the_bound_raises_and_queues_nothing() -> None:
    pair = opened(client_config=SessionConfig(max_unacknowledged_stanzas=5))
    client = pair.client.core
    for i in range(5):
        client.send(st.message(str(i)))
    with pytest.raises(UnacknowledgedLimitError, match="5 stanzas"):
        client.send(st.message("six"))
    assert isinstance(UnacknowledgedLimitError("x"), LocalProtocolError)
    assert len(client.unacknowledged) == 5
    client.request_ack()
    pair.roundtrip()  # delivered and acknowledged: room again
    assert client.unacknowledged == () and client.unacknowledged_bytes == 0
    client.send(st.message("six"))
    pair.roundtrip()
    got = [st.body_of(e.stanza) for e in pair.server.of(StanzaReceived)]
    assert got == ["0", "1", "2", "3", "4", "six"]


def test_send_past_the_byte_bound_raises() -> None:
    cfg = SessionConfig(max_stanza_bytes=10_000, max_unacknowledged_bytes=10_000)
    pair = opened(client_config=cfg)
    client = pair.client.core
    client.send(st.message("x" * 6000))
    queued = client.unacknowledged_bytes
    assert 6000 < queued < 6100
    with pytest.raises(UnacknowledgedLimitError):
        client.send(st.message("y" * 6000))
    assert client.unacknowledged_bytes == queued
    client.send(st.message("small"))  # what fits still goes
    assert len(client.unacknowledged) == 2


@pytest.mark.parametrize("kw", [
    {"max_unacknowledged_stanzas": 0},
    {"max_unacknowledged_bytes": 1000},  # below max_stanza_bytes
    {"ack_window": 0.0},
])
def test_config_refuses_bounds_that_cannot_work(kw: dict[str, float]) -> None:
    with pytest.raises(LocalProtocolError):
        SessionConfig(**kw)  # type: ignore[arg-type]


# -- the acknowledgement window ---------------------------------------------------


def test_a_peer_that_acknowledges_nothing_for_the_window_is_closed() -> None:
    pair = opened(server_config=SessionConfig(ack_window=60.0))
    pair.client.deaf = True
    server = pair.server.core
    start = pair.now
    deadlines = []
    t = start
    while t < start + 59.0:  # a ping every 5 s keeps QUIC from idling out
        pair.client.write(PING % int(t))
        for step in (0.0, 0.1, 0.2):  # the answer, then the delayed <r/>
            tick(pair, t + step)
        deadlines.append(server.get_timer())
        t += 5.0
    assert not pair.server.of(SessionEnded) and server.is_open
    assert pair.client.heard.count(R) == 1  # asked once; never answered
    # With the request outstanding, the timer is the window's end.
    first = deadlines[0]
    assert first is not None and start + 60.0 <= first < start + 60.5
    assert all(d == first for d in deadlines)
    tick(pair, first)
    error = stream_error(pair, pair.server)
    assert error.condition == "connection-timeout"
    assert "60 s" in error.text


def test_a_peer_that_acknowledges_is_never_closed_by_the_window() -> None:
    pair = opened(server_config=SessionConfig(ack_window=10.0))
    server = pair.server.core
    t = pair.now
    for i in range(40):  # 200 s of traffic, twenty windows
        server.send(st.message(str(i)))
        pair.client.core.send(st.ping(f"p{i}"))
        for step in (0.0, 0.1, 0.2):
            tick(pair, t + step)
        t += 5.0
    assert server.is_open and not pair.server.of(SessionEnded)
    assert server.unacknowledged == ()
    assert server.statistics.pings_answered == 40


# -- acknowledgement elements -----------------------------------------------------


@pytest.mark.parametrize("h", [
    "0_0", "1_000", "\u0661", "\uff11", "\u00b9", " 1", "1 ", "+1", "-1", "",
    "0x1", "1.0", "4294967296", "9" * 5000, "1" + "0" * 4400,
])
def test_a_count_that_is_not_ascii_digits_up_to_2_32_is_bad_format(h: str) -> None:
    pair = opened()
    pair.client.write(b"<a xmlns='urn:xmpp:sm:3' h='%s'/>" % h.encode())
    pair.roundtrip()
    assert stream_error(pair, pair.server).condition == "bad-format"


def test_an_ack_without_h_is_bad_format() -> None:
    pair = opened()
    pair.client.write(b"<a xmlns='urn:xmpp:sm:3'/>")
    pair.roundtrip()
    assert stream_error(pair, pair.server).condition == "bad-format"


@pytest.mark.parametrize("h", ["0", "00", "0000000000"])
def test_ascii_zero_is_a_valid_count(h: str) -> None:
    pair = opened()
    pair.client.write(b"<a xmlns='urn:xmpp:sm:3' h='%s'/>" % h.encode())
    pair.roundtrip()
    assert pair.server.core.is_open and not pair.server.of(SessionEnded)


def test_an_ack_for_more_than_was_sent_is_undefined_condition() -> None:
    pair = opened()
    pair.client.write(b"<a xmlns='urn:xmpp:sm:3' h='%d'/>" % MAX_COUNT)
    pair.roundtrip()
    assert stream_error(pair, pair.server).condition == "undefined-condition"


@pytest.mark.parametrize(("text", "value"), [
    ("0", 0), ("007", 7), ("4294967295", MAX_COUNT), ("4294967296", None),
    ("\u0661", None), ("\uff10", None), ("0_0", None), (" 1", None), ("", None),
    (None, None), ("0" * 100 + "1", 1),
])
def test_decode_count_table(text: str | None, value: int | None) -> None:
    assert decode_count(text) == value
    assert decode_count("10", max_value=9) is None


def test_a_flood_of_requests_costs_no_output() -> None:
    pair = opened()
    pair.client.deaf = True
    before = pair.client.heard.count(b"<a ")
    for _ in range(10):
        pair.client.write(R * 100)
        pair.roundtrip()
    # One answer for h=0; asking again while h stands still gets no more.
    assert pair.client.heard.count(b"<a ") - before == 1
    pair.client.write(b"<message><body>hi</body></message>" + R * 100)
    pair.roundtrip()
    assert pair.client.heard.count(b"<a ") - before == 2
    assert pair.client.heard.endswith(b"<a xmlns='urn:xmpp:sm:3' h='1'/>")
    assert pair.server.core.is_open


def test_a_second_stream_header_is_not_well_formed() -> None:
    pair = opened()
    pair.client.write(
        b"<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'"
        b" from='remote@example.org/phone' to='tv@example.org' version='1.0'>")
    pair.roundtrip()
    error = stream_error(pair, pair.server)
    assert error.condition == "not-well-formed" and "second stream header" in error.text
