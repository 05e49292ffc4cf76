"""Red team: attacks that cost the attacker a few bytes a second.

Each test is an attacker written for the purpose (raw UDP, or a dtx peer
that misbehaves) against a real listening device on loopback, with the
bound the test holds the device to stated in it.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from dtx import stanza as st
from dtx.aio.peer import Peer, PeerConfig, open_peer
from dtx.aio.session import Session
from dtx.identity import DeviceIdentity, save_identity
from dtx.lab.scene import write_vcards
from dtx.proto import xmlstream as xs
from dtx.proto.session import SM_A, SM_R, SessionConfig

from .conftest import trusting
from .test_hostile_input import DEADLINE, quic_initials

ROOT = Path(__file__).resolve().parents[2]

HANDSHAKE_TIMEOUT = 1.0
"""The listener's half-open expiry, scaled down from the default 10 s so the
attack's period (just past it) fits a test; the attack scales with it."""


@pytest.fixture
async def tv(tv_id: DeviceIdentity, remote_id: DeviceIdentity) -> AsyncIterator[Peer]:
    config = PeerConfig(handshake_timeout=HANDSHAKE_TIMEOUT, max_half_open_per_ip=16)
    async with open_peer(tv_id, trusting(tv_id, remote_id), host="127.0.0.1",
                         config=config) as peer:
        yield peer


async def test_a_trickle_of_initials_from_the_devices_ip_cannot_lock_it_out(
    tv: Peer, tv_id: DeviceIdentity, remote_id: DeviceIdentity
) -> None:
    """16 fresh Initials (the per-IP bound) every 1.01 handshake timeouts
    from the device's own IP hold every handshake slot of that IP; the
    device must still connect, 5 times of 5, each time while the attack
    has the table full."""
    per_ip = tv.config.max_half_open_per_ip
    socks: list[socket.socket] = []
    bursts = 0

    def half_open_here() -> int:
        return sum(1 for c in tv.endpoint.connections()
                   if not c.opened and c.address[0] == "127.0.0.1")

    async def attack() -> None:
        nonlocal bursts
        for _ in range(50):  # bounded: 50 periods at most
            fresh = []
            for _ in range(per_ip):
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sock.bind(("127.0.0.1", 0))
                socks.append(sock)
                fresh.append(sock)
            for sock, data in zip(fresh, quic_initials(per_ip, tv.address)):
                sock.sendto(data, tv.address)
            bursts += 1
            await asyncio.sleep(HANDSHAKE_TIMEOUT * 1.01)  # the attack's pacing

    attacker = asyncio.create_task(attack())
    try:
        connected = 0
        async with open_peer(remote_id, trusting(tv_id, remote_id), host="127.0.0.1") as remote:
            for i in range(5):
                async with asyncio.timeout(DEADLINE):
                    while half_open_here() < per_ip:  # the attack holds the table
                        await asyncio.sleep(0.005)
                session = await remote.connect(tv_id.jid.full, tv.address, timeout=DEADLINE)
                async with asyncio.timeout(DEADLINE):
                    accepted = await tv.accept()
                session.send(st.message(f"pause {i}"))
                async with asyncio.timeout(DEADLINE):
                    assert st.body_of(await accepted.receive()) == f"pause {i}"
                await session.close()
                connected += 1
        assert connected == 5
        assert tv.counters["half_open_refused_per_ip"] >= 5, "each connect met a full table"
        assert not attacker.done(), "the attack ran throughout"
    finally:
        attacker.cancel()
        for sock in socks:
            sock.close()


# -- a trusted peer that turns hostile: the victim in its own process --------------


def rss_bytes(pid: int) -> int:
    """The resident memory of process ``pid`` (Linux ``/proc``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@dataclass
class Victim:
    proc: subprocess.Popen[str]
    address: tuple[str, int]
    events: queue.Queue[dict[str, object]]

    def rss(self) -> int:
        return rss_bytes(self.proc.pid)


VICTIM_SCRIPT = """
import asyncio, json, sys
from dtx.aio.peer import PeerConfig, open_peer
from dtx.identity import load_identity
from dtx.proto.session import SessionConfig
from dtx.trust import PinStore, VCardDirectory, Verifier

async def serve(session):
    async for _ in session:
        pass
    ended = await session.wait_closed()
    print(json.dumps({"event": "closed", "error": str(ended.error)}), flush=True)

async def main(key, vcards, ack_window):
    config = PeerConfig(session=SessionConfig(ack_window=ack_window))
    verifier = Verifier([VCardDirectory(vcards)], PinStore(None))
    async with open_peer(load_identity(key), verifier, config=config) as peer:
        host, port = peer.address
        print(json.dumps({"event": "listening", "host": host, "port": port}), flush=True)
        tasks = set()
        while True:
            task = asyncio.create_task(serve(await peer.accept()))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3])))
"""
ACK_WINDOW = 3.0
"""The script victim's ack window (60 s by default), so that its close of a
peer that never acknowledges fits a test."""


LISTEN = ["-m", "dtx.cli", "listen", "{key}", "--vcards", "{vcards}", "--no-pins", "--json"]
"""``dtx listen`` as the TV (it never reads datagrams), trusting the remote."""


@contextmanager
def running_victim(tmp_path: Path, tv_id: DeviceIdentity, remote_id: DeviceIdentity,
                   argv: list[str], *, log: Path | None = None) -> Iterator[Victim]:
    """The TV in its own process (``argv`` after the interpreter, with
    ``{key}`` and ``{vcards}`` filled in), its JSON lines read by a thread,
    its stderr in ``log`` (or dropped); killed on exit."""
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc to read the victim's resident memory")
    vcards = tmp_path / "vcards"
    write_vcards(vcards, tv_id, remote_id)
    key = tmp_path / "tv.key"
    save_identity(tv_id, key)
    with open(log, "w") if log is not None else open(os.devnull, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, *[{"{key}": str(key), "{vcards}": str(vcards)}.get(a, a)
                               for a in argv]],
            stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, text=True,
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    events: queue.Queue[dict[str, object]] = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            events.put(json.loads(line))

    threading.Thread(target=read, daemon=True).start()
    try:
        try:
            first = events.get(timeout=30)
        except queue.Empty:
            raise AssertionError("the victim did not start") from None
        assert first["event"] == "listening", first
        yield Victim(proc, (str(first["host"]), int(str(first["port"]))), events)
    finally:
        proc.kill()
        proc.wait(10)


@pytest.fixture
def victim(tmp_path: Path, tv_id: DeviceIdentity,
           remote_id: DeviceIdentity) -> Iterator[Victim]:
    """``dtx listen`` as the TV, in its own process."""
    with running_victim(tmp_path, tv_id, remote_id, LISTEN) as v:
        yield v


@pytest.fixture
def strict_victim(tmp_path: Path, tv_id: DeviceIdentity,
                  remote_id: DeviceIdentity) -> Iterator[Victim]:
    """A listener like ``dtx listen`` with an ack window of ACK_WINDOW s,
    in its own process; it reports each session's end."""
    with running_victim(tmp_path, tv_id, remote_id,
                        ["-c", VICTIM_SCRIPT, "{key}", "{vcards}", str(ACK_WINDOW)]) as v:
        yield v


async def connected(remote: Peer, victim: Victim, tv_id: DeviceIdentity) -> Session:
    session = await remote.connect(tv_id.jid.full, victim.address, timeout=DEADLINE)
    assert await session.ping(timeout=DEADLINE) > 0
    return session


async def test_unread_datagrams_cost_the_receiver_a_bounded_queue(
    victim: Victim, tv_id: DeviceIdentity, remote_id: DeviceIdentity
) -> None:
    """D2: 120,000 datagrams of about 1 KB that the listener never reads
    grow it by less than 16 MB: it holds 256 per session, dropping the
    oldest (they were kept without bound: +934 MB for 474,800; the same
    run with no bound here grows it by about 60 MB). The session goes on."""
    cfg = PeerConfig(max_datagram_size=1200)
    async with open_peer(remote_id, trusting(tv_id, remote_id), config=cfg) as remote:
        session = await connected(remote, victim, tv_id)
        before = victim.rss()
        body = "x" * (session.connection.max_datagram_bytes() - 200)
        for i in range(120_000):
            session.send_datagram(st.message(body, to=tv_id.jid.full, id_=f"d{i}"))
            if i % 50 == 49:
                await asyncio.sleep(0)  # let the driver transmit (pacing)
        assert await session.ping(timeout=DEADLINE) > 0, "the session goes on"
        grown = victim.rss() - before
        assert grown < 16 * 1024 * 1024, f"grew by {grown / 1e6:.1f} MB"
        await session.close()


async def test_a_datagram_over_the_receivers_limit_closes_the_session_not_the_listener(
    victim: Victim, tv_id: DeviceIdentity, remote_id: DeviceIdentity
) -> None:
    """D2: a peer that raises its own limit and sends a 60 KB DATAGRAM frame
    is closed by QUIC; the listener serves the next session."""
    hostile = PeerConfig(max_datagram_size=65_000)  # its packets carry 60 KB frames
    async with open_peer(remote_id, trusting(tv_id, remote_id), config=hostile) as remote:
        session = await connected(remote, victim, tv_id)
        # a modified client: past its own size check, straight into QUIC
        session.connection.quic.send_datagram_frame(b"<message/>" + b" " * 60_000)
        session.connection.send(st.message("after"))  # marks it for transmission
        session._wake()
        async with asyncio.timeout(DEADLINE):
            ended = await session.wait_closed()
        assert ended.error is not None and "DATAGRAM" in str(ended.error), ended.error
        again = await connected(remote, victim, tv_id)
        await again.close()


def deafen(session: Session) -> None:
    """Make ``session`` a hostile peer's: it ignores ``<r/>`` (so it never
    acknowledges what it is sent) and ``<a/>`` (the listener acknowledges,
    unasked, the queries written past this end's stanza count), asks for no
    acknowledgement itself, and grants no more QUIC credit."""
    core = session.connection.core
    handle = core._on_xml_event

    def on_xml_event(xev: xs.XmlEvent, out: list[Any]) -> None:
        if isinstance(xev, xs.StanzaReceived) and xev.element.tag in (SM_R, SM_A):
            return
        handle(xev, out)

    core._on_xml_event = on_xml_event  # type: ignore[method-assign]
    # Nor does it ask for acknowledgements: the queries it writes bypass its
    # own stanza count, so an <a/> answering an <r/> of its would count
    # them and end the session at this end (a race that showed under load).
    core._r_outstanding = True
    session.connection.quic.receive_paused = True


def write_raw(session: Session, data: bytes) -> None:
    conn = session.connection
    stream = conn.core._stream
    assert stream is not None
    conn.quic.send_stream_data(stream, data)
    conn._endpoint._dirty.add(conn)
    session._wake()


PING = b"<iq type='get' id='p%d'><ping xmlns='urn:xmpp:ping'/></iq>"
DISCO = b"<iq type='get' id='q%d'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>"


@pytest.mark.parametrize("query", [PING, DISCO], ids=["pings", "disco"])
async def test_queries_never_acknowledged_cost_a_bounded_amount_and_end_the_session(
    strict_victim: Victim, tv_id: DeviceIdentity, remote_id: DeviceIdentity, query: bytes
) -> None:
    """D1: a trusted peer floods pings (or disco#info queries), never
    acknowledges the answers and withholds QUIC credit. The listener grows by
    less than 64 MB (it grew 410 MB for 600,000 pings, linearly): past half
    its unacknowledged bound it grants that peer no more credit, and it ends
    the session once the peer made no acknowledgement progress for its ack
    window; meanwhile and afterwards it serves other sessions."""
    victim = strict_victim
    async with open_peer(remote_id, trusting(tv_id, remote_id)) as remote:
        hostile = await connected(remote, victim, tv_id)
        deafen(hostile)
        before = victim.rss()
        batch = 500
        for first in range(0, 600_000, batch):
            if not hostile.is_open:
                break
            write_raw(hostile, b"".join(query % (first + i) for i in range(batch)))
            await asyncio.sleep(0)  # let the driver transmit (pacing)
        async with open_peer(remote_id, trusting(tv_id, remote_id)) as neighbour:
            other = await connected(neighbour, victim, tv_id)
            async with asyncio.timeout(ACK_WINDOW + DEADLINE * 3):
                ended = await hostile.wait_closed()
            grown = victim.rss() - before
            assert grown < 64 * 1024 * 1024, f"grew by {grown / 1e6:.1f} MB"
            assert ended.error is not None, "the listener ended the hostile session"
            closed = victim.events.get(timeout=DEADLINE)
            assert closed["event"] == "closed", closed
            assert "connection-timeout" in str(closed["error"]), closed
            assert await other.ping(timeout=DEADLINE) > 0, "the other session went on"
            await other.close()


@pytest.fixture
def echo_victim(tmp_path: Path, tv_id: DeviceIdentity,
                remote_id: DeviceIdentity) -> Iterator[Victim]:
    """``dtx listen --echo`` as the TV, in its own process."""
    with running_victim(tmp_path, tv_id, remote_id, [*LISTEN, "--echo"]) as v:
        yield v


async def test_messages_whose_echoes_are_never_acknowledged_cost_a_bounded_amount(
    echo_victim: Victim, tv_id: DeviceIdentity, remote_id: DeviceIdentity
) -> None:
    """D1: a trusted peer floods ``dtx listen --echo`` with 200,000 messages
    and acknowledges none of the echoes. The listener echoes until half its
    unacknowledged bound waits, then reads no more from that peer (so grants
    it no more credit): it grows by less than 64 MB and serves another
    session meanwhile."""
    victim = echo_victim
    async with open_peer(remote_id, trusting(tv_id, remote_id)) as remote:
        hostile = await connected(remote, victim, tv_id)
        deafen(hostile)
        before = victim.rss()
        message = b"<message to='tv@example.org'><body>%d</body></message>"
        batch = 500
        for first in range(0, 200_000, batch):
            if not hostile.is_open:
                break
            write_raw(hostile, b"".join(message % (first + i) for i in range(batch)))
            await asyncio.sleep(0)  # let the driver transmit (pacing)
        # until the listener stops taking messages from that peer (bounded)
        loop = asyncio.get_running_loop()
        deadline, quiet_since, seen = loop.time() + 60, loop.time(), 0
        while loop.time() < deadline and loop.time() - quiet_since < 2.0:
            got = 0
            while not victim.events.empty():
                victim.events.get_nowait()
                got += 1
            if got:
                seen += got
                quiet_since = loop.time()
            await asyncio.sleep(0.05)  # polling the victim's output
        assert seen > SessionConfig().max_unacknowledged_stanzas // 2, seen
        assert seen < 200_000, "it stopped taking messages from a peer that does not acknowledge"
        async with open_peer(remote_id, trusting(tv_id, remote_id)) as neighbour:
            other = await connected(neighbour, victim, tv_id)
            other.send(st.message("still there?", to=tv_id.jid.full))
            async with asyncio.timeout(DEADLINE):
                assert st.body_of(await other.receive()) == "still there?"
            grown = victim.rss() - before
            assert grown < 64 * 1024 * 1024, f"grew by {grown / 1e6:.1f} MB"
            await other.close()


@pytest.fixture
def logged_victim(tmp_path: Path, tv_id: DeviceIdentity,
                  remote_id: DeviceIdentity) -> Iterator[tuple[Victim, Path]]:
    """``dtx listen`` as the TV with its log (stderr, default level) in a file."""
    log = tmp_path / "listen.log"
    with running_victim(tmp_path, tv_id, remote_id, LISTEN, log=log) as v:
        yield v, log


async def test_a_flood_of_bad_input_costs_a_few_log_lines(
    logged_victim: tuple[Victim, Path], tv_id: DeviceIdentity, remote_id: DeviceIdentity
) -> None:
    """D7: 50,000 garbage datagrams, 2,000 truncated Initials and 20,000 bad
    DATAGRAM frames from a trusted peer leave at most 64 warning lines
    (it was one WARNING per bad datagram: 231,400 lines in 10 s), and the
    listener still answers."""
    victim, log = logged_victim
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    try:
        initial = quic_initials(1, victim.address)[0]
        for i in range(50_000):
            sock.sendto(bytes([i % 256]) + b"garbage" * (1 + i % 7), victim.address)
            if i % 500 == 499:
                await asyncio.sleep(0)  # pacing: the kernel's buffer is finite
        for i in range(2_000):
            sock.sendto(initial[: 1 + i % 1199], victim.address)
        async with open_peer(remote_id, trusting(tv_id, remote_id)) as remote:
            session = await connected(remote, victim, tv_id)
            for i in range(20_000):
                session.connection.quic.send_datagram_frame(b"<not xml %d" % i)
                if i % 200 == 199:
                    session._wake()
                    await asyncio.sleep(0)  # let the driver transmit (pacing)
            assert await session.ping(timeout=DEADLINE) > 0, "the listener still answers"
            await session.close()
    finally:
        sock.close()
    warnings = [line for line in log.read_text().splitlines() if "WARNING" in line]
    assert len(warnings) <= 64, warnings[:20]
    assert any("bad datagram" in line for line in warnings), "the flood was seen and logged"
