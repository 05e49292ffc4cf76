"""Congestion control and small packets twice, on real QUIC connections
(dtx's :class:`AuthenticatedQuicConnection` with its controller) over a
simulated path: a fake clock, one-way delay, seeded random loss and, where
asked, a drop-tail bottleneck. No sockets, no wall clock."""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field

import pytest
from aioquic.buffer import Buffer  # type: ignore[attr-defined]
from aioquic.quic.events import StreamDataReceived
from aioquic.quic.packet import pull_quic_header

from dtx import stanza as st
from dtx.proto.auth import AuthenticatedQuicConnection
from dtx.proto.congestion import NAME as CONTROLLER_NAME
from dtx.proto.congestion import LossTolerantCongestionControl
from dtx.proto.endpoint import EndpointConfig
from dtx.proto.session import SessionOpened, StanzaReceived

from .test_session_core import REMOTE, SERVER_ADDR, TV, End, end

DELAY = 0.040
"""One way: an 80 ms round trip, a home to another over the core."""


@dataclass
class Bottleneck:
    """A link of ``rate`` bytes/s with a drop-tail queue of ``buffer`` bytes."""

    rate: float
    buffer: int
    busy_until: float = 0.0
    drops: int = 0

    def admit(self, now: float, size: int) -> float | None:
        """When a datagram of ``size`` leaves the link, or None: dropped."""
        start = max(now, self.busy_until)
        if (start - now) * self.rate + size > self.buffer:
            self.drops += 1
            return None
        self.busy_until = start + size / self.rate
        return self.busy_until


@dataclass
class Path:
    """Two connections on a simulated path; moves everything either sends."""

    client: End
    server: End
    loss: float
    seed: int
    bottleneck: Bottleneck | None = None
    now: float = 0.0
    sent: int = 0
    lost: int = 0
    received: bytearray = field(default_factory=bytearray)
    """What the server got on streams other than the XML stream."""
    cores: bool = False
    """Feed QUIC's events to the XML sessions (and drive their timers); the
    server echoes every message."""
    echoes: int = 0
    """Messages the client got back."""
    _queue: list[tuple[float, int, bool, bytes]] = field(default_factory=list)
    _seq: int = 0
    _heard: bool = False

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def _transmit(self, src: End, to_server: bool) -> None:
        if src is self.server and not self._heard:
            return  # a server has nothing to say before the first Initial
        if self.cores:
            src.core.flush(self.now)
        for data, _ in src.quic.datagrams_to_send(now=self.now):
            self.sent += 1
            if self._rng.random() < self.loss:
                self.lost += 1
                continue
            at = self.now
            if to_server and self.bottleneck is not None:
                left = self.bottleneck.admit(self.now, len(data))
                if left is None:
                    continue
                at = left
            self._seq += 1
            heapq.heappush(self._queue, (at + DELAY, self._seq, to_server, data))

    def _pump(self, e: End) -> None:
        while (ev := e.quic.next_event()) is not None:
            if e is self.server and isinstance(ev, StreamDataReceived) and ev.stream_id:
                self.received += ev.data
            if not self.cores:
                continue
            for sev in e.core.handle_quic_event(ev):
                e.events.append(sev)
                if isinstance(sev, StanzaReceived) and sev.stanza.tag == st.MESSAGE:
                    if e is self.server:
                        e.core.send(st.message(st.body_of(sev.stanza) or ""))
                    else:
                        self.echoes += 1

    def run(self, until: float, done: int | None = None, echoes: int | None = None) -> None:
        """Until the simulated time ``until``, ``done`` bytes arrived or
        ``echoes`` messages came back."""
        for _ in range(2_000_000):
            self._transmit(self.client, True)
            self._transmit(self.server, False)
            if done is not None and len(self.received) >= done:
                return
            if echoes is not None and self.echoes >= echoes:
                return
            ends = (self.client, self.server)
            times = [t for e in ends for t in (e.quic.get_timer(),
                                               e.core.get_timer() if self.cores else None)
                     if t is not None]
            if self._queue:
                times.append(self._queue[0][0])
            if not times or min(times) > until:
                self.now = max(self.now, until)
                return
            # A real clock always moves on: aioquic's loss timer can fall on a
            # rounding edge where it fires without declaring the packet lost.
            self.now = max(self.now + 1e-6, min(times))
            while self._queue and self._queue[0][0] <= self.now:
                _, _, to_server, data = heapq.heappop(self._queue)
                dst = self.server if to_server else self.client
                self._heard = True
                addr = ("192.0.2.1", 1111) if to_server else ("192.0.2.2", 2222)
                dst.quic.receive_datagram(data, addr, now=self.now)
            for e in ends:
                t = e.quic.get_timer()
                if t is not None and t <= self.now:
                    e.quic.handle_timer(now=self.now)
                t = e.core.get_timer() if self.cores else None
                if t is not None and t <= self.now:
                    e.core.handle_timer(self.now)
                self._pump(e)
        raise AssertionError("the simulation did not settle")


def connect(algorithm: str, *, loss: float, seed: int,
            bottleneck: Bottleneck | None = None, cores: bool = False) -> Path:
    """A handshake over the simulated path (its first flight too)."""
    client = end(REMOTE, [TV], client=True, expected="tv@example.org",
                 congestion_control=algorithm)
    client.quic.connect(SERVER_ADDR, now=0.0)
    first = client.quic.datagrams_to_send(now=0.0)
    dcid = pull_quic_header(Buffer(data=first[0][0]), host_cid_length=8).destination_cid
    server = end(TV, [REMOTE], client=False, dcid=dcid, congestion_control=algorithm)
    path = Path(client, server, loss=loss, seed=seed, bottleneck=bottleneck, cores=cores)
    for n, (data, _) in enumerate(first):
        heapq.heappush(path._queue, (DELAY, -1 - n, True, data))
    path.run(until=1.0)
    assert client.quic._handshake_complete
    return path


def transfer(path: Path, size: int) -> float:
    """Seconds (simulated) to move ``size`` bytes client to server."""
    start = path.now
    stream = path.client.quic.get_next_available_stream_id()
    path.client.quic.send_stream_data(stream, b"x" * size, end_stream=True)
    path.run(until=start + 120.0, done=size)
    assert len(path.received) == size
    return path.now - start


def controller(e: End) -> LossTolerantCongestionControl:
    cc = e.quic.congestion
    assert cc is not None
    return cc


def test_one_percent_random_loss_does_not_collapse_the_window() -> None:
    # 1 % loss each way on an 80 ms path, 1 MB: NewReno halves at every loss.
    times = {}
    for algorithm in ("reno", "loss-tolerant"):
        runs = [transfer(connect(algorithm, loss=0.01, seed=seed), 1_000_000)
                for seed in range(3)]
        times[algorithm] = sorted(runs)[1]
    assert times["loss-tolerant"] * 3 <= times["reno"], times


def test_random_losses_keep_the_window_and_are_counted() -> None:
    path = connect("loss-tolerant", loss=0.02, seed=7)
    transfer(path, 500_000)
    cc = controller(path.client)
    assert cc.losses_random > 0
    assert cc.losses_congestive <= cc.losses_random // 4
    assert cc.congestion_window > 40 * 1200


@pytest.mark.parametrize("algorithm", ["reno", "loss-tolerant"])
def test_a_full_buffer_makes_it_back_off(algorithm: str) -> None:
    # An 8 Mbit/s bottleneck with 40 KB of buffer, no random loss: the
    # drops are the buffer overflowing (a queue behind them), so the window
    # falls as NewReno's would and the link stays used.
    link = Bottleneck(rate=1_000_000, buffer=40_000)
    path = connect(algorithm, loss=0.0, seed=1, bottleneck=link)
    seconds = transfer(path, 4_000_000)
    assert 4_000_000 / seconds >= 0.75 * link.rate
    cc = path.client.quic._loss._cc
    assert link.drops > 0
    assert link.drops <= 0.03 * path.sent
    if isinstance(cc, LossTolerantCongestionControl):
        assert cc.losses_congestive > 0
        assert cc.losses_random <= cc.losses_congestive


def test_heavy_loss_is_congestion_whatever_the_delay() -> None:
    # A policer: a fifth of the packets go, the delay never rises.
    path = connect("loss-tolerant", loss=0.2, seed=3)
    transfer(path, 200_000)
    cc = controller(path.client)
    assert cc.losses_congestive > 0
    assert cc.congestion_window < 40 * 1200


def test_small_packets_go_twice_only_after_a_loss() -> None:
    path = connect("loss-tolerant", loss=0.0, seed=1)
    quic: AuthenticatedQuicConnection = path.client.quic
    stream = quic.get_next_available_stream_id()
    quic.send_stream_data(stream, b"<message>pause</message>")
    once = quic.datagrams_to_send(now=path.now)
    assert len(once) == 1 and quic.datagrams_duplicated == 0
    path.server.quic.receive_datagram(once[0][0], ("192.0.2.1", 1111), now=path.now)
    path.run(until=path.now + 1.0)
    assert quic.datagrams_duplicated == 0

    controller(path.client).last_loss_time = path.now
    quic.send_stream_data(stream, b"<message>play</message>")
    twice = quic.datagrams_to_send(now=path.now)
    assert len(twice) == 2 and twice[0] == twice[1]
    assert quic.datagrams_duplicated == 1
    # The receiver takes one, drops the copy.
    for data, _ in twice:
        path.server.quic.receive_datagram(data, ("192.0.2.1", 1111), now=path.now)
    got = [ev for ev in iter(path.server.quic.next_event, None)
           if isinstance(ev, StreamDataReceived) and ev.stream_id]
    assert b"".join(ev.data for ev in got).endswith(b"<message>play</message>")
    assert sum(ev.data.count(b"play") for ev in got) == 1

    # A bulk transfer is not doubled, nor is anything once the loss is old.
    quic.send_stream_data(stream, b"y" * 100_000)
    bulk = quic.datagrams_to_send(now=path.now)
    assert bulk and len(set(bulk)) == len(bulk)
    assert quic.datagrams_duplicated == 1
    for data, _ in bulk:
        path.server.quic.receive_datagram(data, ("192.0.2.1", 1111), now=path.now)
    path.run(until=path.now + 5.0)
    quic.duplicate_after_loss = 1.0
    quic.send_stream_data(stream, b"<message>stop</message>")
    assert len(quic.datagrams_to_send(now=path.now)) == 1


def test_a_lost_lone_stanza_costs_less_than_a_probe_timeout() -> None:
    # 5 % loss each way: an exchange of one small packet each way, 200 times.
    # Once a loss was seen, each goes twice, so a loss rarely waits for the
    # probe timeout (a round trip and more).
    path = connect("loss-tolerant", loss=0.05, seed=11)
    quic = path.client.quic
    stream = quic.get_next_available_stream_id()
    slow = 0
    for i in range(200):
        start, want = path.now, len(path.received) + 10
        quic.send_stream_data(stream, b"%010d" % i)
        path.run(until=start + 10.0, done=want)
        if path.now - start > 2 * DELAY + 0.030:
            slow += 1
        path.run(until=path.now + 0.05)  # the acknowledgements
    assert quic.datagrams_duplicated > 100
    assert slow <= 4, slow


def test_an_exchange_costs_a_packet_each_way() -> None:
    # A message and its echo on an 80 ms path, fifty times in a row: the
    # echo carries the XML stream's acknowledgement and QUIC's, and the next
    # message QUIC's, so no ``<r/>``, ``<a/>`` or bare ACK has a packet.
    path = connect("loss-tolerant", loss=0.0, seed=1, cores=True)
    path.run(until=path.now + 1.0)
    assert path.client.of(SessionOpened) and path.server.of(SessionOpened)
    before = path.sent
    for i in range(50):
        path.client.core.send(st.message(f"pause {i}"))
        path.run(until=path.now + 5.0, echoes=i + 1)
        assert path.echoes == i + 1
    assert (path.sent - before) / 50 <= 2.1, path.sent - before
    path.run(until=path.now + 2.0)  # the last acknowledgements
    assert path.client.core.unacknowledged == () and path.server.core.unacknowledged == ()


def test_the_answering_end_sends_twice_once_it_sees_the_peer_lose() -> None:
    # The server only answers: it learns of no loss of its own, but a gap
    # in the client's packet numbers shows the path loses.
    path = connect("loss-tolerant", loss=0.0, seed=1)
    client: AuthenticatedQuicConnection = path.client.quic
    server: AuthenticatedQuicConnection = path.server.quic
    stream = client.get_next_available_stream_id()
    sent = []
    for word in (b"one", b"two", b"three"):
        client.send_stream_data(stream, b"<message>%s</message>" % word)
        sent += client.datagrams_to_send(now=path.now)
    assert len(sent) == 3
    server.receive_datagram(sent[0][0], ("192.0.2.1", 1111), now=path.now)
    assert server.receive_gaps == 0 and server.last_gap_time is None
    server.receive_datagram(sent[2][0], ("192.0.2.1", 1111), now=path.now)
    assert server.receive_gaps == 1 and server.last_gap_time == path.now
    # The late one fills the gap and is no new gap.
    server.receive_datagram(sent[1][0], ("192.0.2.1", 1111), now=path.now)
    assert server.receive_gaps == 1
    assert controller(path.server).last_loss_time is None
    server.send_stream_data(stream, b"<message>ok</message>")
    answer = server.datagrams_to_send(now=path.now)
    assert len(answer) == 2 and answer[0] == answer[1]
    assert server.datagrams_duplicated == 1


def test_a_lost_echo_costs_less_than_a_probe_timeout() -> None:
    # A message and its echo, 200 times, 5 % loss each way: the answering
    # end sends its echoes twice too once it has seen a loss either way, so
    # a lost echo rarely waits for the server's probe timeout.
    path = connect("loss-tolerant", loss=0.05, seed=5, cores=True)
    path.run(until=path.now + 1.0)
    slow = 0
    for i in range(200):
        start = path.now
        path.client.core.send(st.message(f"pause {i}"))
        path.run(until=start + 10.0, echoes=i + 1)
        assert path.echoes == i + 1
        if path.now - start > 2 * DELAY + 0.030:
            slow += 1
    assert path.server.quic.datagrams_duplicated > 100
    assert slow <= 4, slow


def test_the_endpoint_default_names_dtxs_controller() -> None:
    """EndpointConfig spells the name out (importing the controller's module
    would load the QUIC engine at start-up); it must stay the controller's."""
    assert EndpointConfig().congestion_control == CONTROLLER_NAME
