"""The sans-IO session (QUIC + authentication + XML stream) in memory:
two cores wired back to back, a fake clock, no sockets."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from aioquic.buffer import Buffer  # type: ignore[attr-defined]
from aioquic.quic.events import StreamDataReceived
from aioquic.quic.packet import pull_quic_header

from dtx import stanza as st
from dtx.errors import AuthenticationError, StreamError, UntrustedKeyError
from dtx.identity import DeviceIdentity, generate_identity
from dtx.proto.auth import AuthenticatedQuicConnection, make_certificate, quic_configuration
from dtx.proto.session import (
    HandshakeConfirmed,
    SessionConfig,
    SessionEnded,
    SessionEvent,
    SessionOpened,
    SessionState,
    StanzaReceived,
    XmlSession,
    trust_check_for,
)
from dtx.trust import PinStore, StaticKeys, Verifier

CLIENT_ADDR = ("192.0.2.1", 1111)
SERVER_ADDR = ("192.0.2.2", 2222)


@dataclass
class End:
    quic: AuthenticatedQuicConnection
    core: XmlSession
    events: list[SessionEvent] = field(default_factory=list)
    deaf: bool = False
    """Keep the peer's stream data from the core (in ``heard``): a peer
    that reads nothing, so never answers ``<r/>``."""
    heard: bytearray = field(default_factory=bytearray)

    def pump_events(self) -> None:
        while (ev := self.quic.next_event()) is not None:
            if self.deaf and isinstance(ev, StreamDataReceived):
                self.heard += ev.data
                continue
            self.events.extend(self.core.handle_quic_event(ev))

    def write(self, data: bytes) -> None:
        """Write raw bytes on the XML stream, bypassing the core."""
        assert self.core._stream is not None
        self.quic.send_stream_data(self.core._stream, data)

    def of(self, kind: type) -> list[SessionEvent]:
        return [e for e in self.events if isinstance(e, kind)]


def end(ident: DeviceIdentity, trusted: list[DeviceIdentity], *, client: bool,
        expected: str | None = None, dcid: bytes | None = None,
        session_config: SessionConfig | None = None,
        congestion_control: str = "loss-tolerant") -> End:
    keys: dict[str, list[bytes]] = {}
    for t in trusted:
        keys.setdefault(str(t.jid.bare), []).append(t.public_key)
    verifier = Verifier([StaticKeys(keys)], PinStore(None))
    config = quic_configuration(
        is_client=client, private_key=ident.private_key,
        certificate=make_certificate(ident.private_key, str(ident.jid)),
        idle_timeout=30.0, max_datagram_frame_size=65536,
        congestion_control=congestion_control)
    quic = AuthenticatedQuicConnection(
        configuration=config, check=trust_check_for(verifier.verify, expected),
        original_destination_connection_id=dcid)
    core = XmlSession(quic, local_jid=str(ident.jid), peer_jid=expected,
                      config=session_config or SessionConfig(), rng=random.Random(1))
    return End(quic, core)


class Pair:
    def __init__(self, client: End, make_server: Callable[[bytes], End]) -> None:
        self.client, self.now = client, 0.0
        client.quic.connect(SERVER_ADDR, now=self.now)
        first = client.quic.datagrams_to_send(now=self.now)
        header = pull_quic_header(Buffer(data=first[0][0]), host_cid_length=8)
        self.server = make_server(header.destination_cid)
        for data, _ in first:
            self.server.quic.receive_datagram(data, CLIENT_ADDR, now=self.now)
        self.server.pump_events()

    def roundtrip(self, rounds: int = 20) -> None:
        """Move datagrams both ways until quiet (bounded)."""
        for _ in range(rounds):
            moved = 0
            for src, dst, addr in ((self.client, self.server, CLIENT_ADDR),
                                   (self.server, self.client, SERVER_ADDR)):
                src.core.flush()
                for data, _ in src.quic.datagrams_to_send(now=self.now):
                    dst.quic.receive_datagram(data, addr, now=self.now)
                    moved += 1
                src.pump_events()
                dst.pump_events()
            self.now += 0.001
            if not moved:
                return

    def expire(self) -> None:
        """Jump the clock through pending timers (closing, draining)."""
        for _ in range(50):
            timers = [t for t in (self.client.quic.get_timer(), self.server.quic.get_timer())
                      if t is not None]
            if not timers:
                return
            self.now = max(self.now, min(timers))
            for e in (self.client, self.server):
                t = e.quic.get_timer()
                if t is not None and t <= self.now:
                    e.quic.handle_timer(now=self.now)
                    e.pump_events()
            self.roundtrip()


TV = generate_identity("tv@example.org/living-room")
REMOTE = generate_identity("remote@example.org/phone")


def make_pair(client_trusts: list[DeviceIdentity] | None = None,
              server_trusts: list[DeviceIdentity] | None = None,
              client_ident: DeviceIdentity = REMOTE,
              server_config: SessionConfig | None = None,
              client_config: SessionConfig | None = None) -> Pair:
    client = end(client_ident, client_trusts or [TV], client=True, expected="tv@example.org",
                 session_config=client_config)
    return Pair(client, lambda dcid: end(TV, server_trusts or [REMOTE], client=False,
                                         dcid=dcid, session_config=server_config))


def test_handshake_opens_the_stream_both_ways() -> None:
    pair = make_pair()
    pair.roundtrip()
    c, s = pair.client, pair.server
    assert c.of(HandshakeConfirmed)[0].peer_jid == "tv@example.org/living-room"
    assert s.of(SessionOpened)[0].peer_jid == "remote@example.org/phone"
    assert c.of(SessionOpened) and c.core.state is SessionState.OPEN
    assert c.core.stream_id == s.core.stream_id is not None


def test_stanzas_flow_in_order_and_are_acknowledged() -> None:
    pair = make_pair()
    pair.roundtrip()
    for i in range(100):
        pair.client.core.send(st.message(str(i)))
    pair.roundtrip()
    got = [st.body_of(e.stanza) for e in pair.server.of(StanzaReceived)]
    assert got == [str(i) for i in range(100)]
    assert pair.client.core.unacknowledged == ()


def test_untrusted_client_is_refused_on_both_sides() -> None:
    impostor = generate_identity("remote@example.org/phone")
    pair = make_pair(client_ident=impostor)
    pair.roundtrip()
    pair.client.core.send(st.message("let me in"))
    pair.roundtrip()
    pair.expire()
    server_end = pair.server.of(SessionEnded)
    client_end = pair.client.of(SessionEnded)
    assert server_end and isinstance(server_end[0].error, UntrustedKeyError)
    assert client_end and isinstance(client_end[0].error, AuthenticationError)
    assert [st.body_of(e) for e in client_end[0].unacknowledged] == ["let me in"]
    assert not pair.server.of(StanzaReceived) and not pair.server.of(SessionOpened)


def test_a_spoofed_from_ends_the_stream() -> None:
    pair = make_pair()
    pair.roundtrip()
    core = pair.client.core
    assert core._stream is not None
    pair.client.quic.send_stream_data(core._stream, b"<message from='mallory@example.org'/>")
    pair.roundtrip()
    pair.expire()
    (ended,) = pair.server.of(SessionEnded)
    assert isinstance(ended.error, StreamError) and ended.error.condition == "invalid-from"
    (client_ended,) = pair.client.of(SessionEnded)
    assert isinstance(client_ended.error, StreamError)
    assert client_ended.error.condition == "invalid-from"


def test_the_closing_side_confirms_what_it_received() -> None:
    """The server's stanzas reached the client, which closes before any
    acknowledgement went back: its close confirms them, and the server
    hands none back as unacknowledged."""
    pair = make_pair()
    pair.roundtrip()
    for i in range(5):
        pair.server.core.send(st.message(f"to the client {i}"))
    pair.roundtrip()
    assert len(pair.client.of(StanzaReceived)) == 5
    pair.client.core.close()
    pair.roundtrip()
    pair.expire()
    (s,) = pair.server.of(SessionEnded)
    assert s.error is None and s.unacknowledged == ()


def test_graceful_close_ends_without_error() -> None:
    pair = make_pair()
    pair.roundtrip()
    pair.client.core.send(st.message("last"))
    pair.client.core.close()
    pair.roundtrip()
    pair.expire()
    assert [st.body_of(e.stanza) for e in pair.server.of(StanzaReceived)] == ["last"]
    (c,) = pair.client.of(SessionEnded)
    (s,) = pair.server.of(SessionEnded)
    assert c.error is None and c.unacknowledged == ()
    assert s.error is None
