"""Hostile datagrams at live processes on loopback.

Thousands of garbage, truncated, mutated and oversized datagrams at a real
rendezvous server (in-process ``serve`` and ``python -m rendezvous``) and at
a listening ``Peer``; a flood of half-open QUIC handshakes from many source
ports. Afterwards: counters account for every datagram, warnings stayed
rate-limited, memory stayed bounded, and a legitimate device still
registers, is introduced, relays and connects.

Attackers send from 127.0.0.2 and up (Linux answers the whole 127/8 on
``lo``), the legitimate devices from 127.0.0.1, so per-source limits hit
the attacker and not the device.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import tracemalloc
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from dtx import stanza as st
from dtx.aio.peer import Peer, PeerConfig, open_peer
from dtx.identity import DeviceIdentity, generate_identity
from dtx.proto.auth import AuthenticatedQuicConnection, make_certificate, quic_configuration
from dtx.wire.control import (
    Candidate,
    CandidateKind,
    ControlMessage,
    MessageType,
    encode_control,
    encode_hello,
    encode_register,
)
from dtx.lab.scene import write_vcards
from dtx.wire.relay import encode_relay
from dtx.wire.stun import binding_request, decode_stun
from rendezvous.core import RendezvousConfig
from rendezvous.server import serve

from .conftest import trusting
from .test_rendezvous_server import ROOT, exercise

ATTACKERS = [f"127.0.0.{i}" for i in range(2, 6)]
DEADLINE = 10.0
OVERSIZED_BYTES = 65_000


def _loopback_alias_missing() -> str | None:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((ATTACKERS[-1], 0))
    except OSError as exc:
        return f"needs 127.0.0.2-5 usable as loopback source addresses: {exc}"
    return None


@pytest.fixture(autouse=True)
def _aliases() -> None:
    reason = _loopback_alias_missing()
    if reason:
        pytest.skip(reason)


# -- what the attacker sends -------------------------------------------------------


def _valid_samples() -> list[bytes]:
    ident = generate_identity("mallory@example.org/x")
    txid = bytes(8)
    cand = (Candidate(CandidateKind.HOST, ("10.0.0.9", 4000)),)
    return [
        encode_hello(txid),
        encode_register(txid=txid, jid="mallory@example.org/x", key=ident.public_key,
                        challenge=bytes(20), candidates=cand, sign=ident.sign),
        encode_control(ControlMessage(MessageType.KEEPALIVE, txid, registration=bytes(8))),
        encode_control(ControlMessage(MessageType.INTRODUCE, txid, registration=bytes(8),
                                      target="tv@example.org")),
        encode_relay(1234, b"\xc0" + bytes(100)),
        binding_request(bytes(12)),
        binding_request(bytes(12), change_ip=True, change_port=True),
    ]


def garbage(rng: random.Random) -> Iterator[bytes]:
    """About 3,000 hostile datagrams of every shape (never empty)."""
    samples = _valid_samples()
    for _ in range(1000):  # noise
        yield rng.randbytes(rng.randint(1, 1400))
    for first in (0x00, 0x01, 0x03, 0x10, 0x11, 0x12, 0x13, 0x14, 0x40, 0x80, 0xC0, 0xFF):
        for _ in range(60):  # noise behind every demultiplexing class
            yield bytes([first]) + rng.randbytes(rng.randint(0, 600))
    for sample in samples:  # every truncation of valid messages
        for cut in range(1, len(sample)):
            yield sample[:cut]
    for _ in range(600):  # valid messages with a few bytes changed
        data = bytearray(rng.choice(samples))
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        yield bytes(data)


def oversized(rng: random.Random) -> Iterator[bytes]:
    for first in (0x00, 0x10, 0x11, 0x12, 0xC0, 0x40):
        for _ in range(3):
            yield bytes([first]) + rng.randbytes(OVERSIZED_BYTES - 1)


class Attacker:
    """Blocking UDP sockets on loopback aliases; one asyncio endpoint per
    address to hear the few answers (STUN sync pings)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.socks: list[socket.socket] = []
        self.inbox: asyncio.Queue[bytes] = asyncio.Queue()
        self.transports: list[asyncio.DatagramTransport] = []
        self.sent = 0

    async def open(self) -> Attacker:
        loop = asyncio.get_running_loop()
        inbox = self.inbox

        class Proto(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
                inbox.put_nowait(data)

        for host in ATTACKERS:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
            sock.bind((host, 0))
            sock.setblocking(False)
            transport, _ = await loop.create_datagram_endpoint(Proto, sock=sock)
            self.socks.append(sock)
            self.transports.append(transport)
        return self

    def close(self) -> None:
        for transport in self.transports:
            transport.close()

    def send(self, data: bytes, which: int) -> None:
        self.transports[which % len(self.transports)].sendto(data, self.target)
        self.sent += 1

    async def sync(self, which: int, tag: int) -> None:
        """A STUN request after the burst, and its answer: the server has
        read everything this socket sent before it (loopback keeps order)."""
        txid = tag.to_bytes(12, "big")
        self.send(binding_request(txid), which)
        async with asyncio.timeout(DEADLINE):
            for _ in range(10_000):
                data = await self.inbox.get()
                if data[:1] in (b"\x00", b"\x01") and len(data) >= 20 and data[8:20] == txid:
                    decode_stun(data)
                    return
        raise AssertionError("no STUN answer")


async def flood_rendezvous(target: tuple[str, int]) -> int:
    """Send the hostile datagrams in paced bursts; returns how many."""
    rng = random.Random(1)
    attacker = await Attacker(target).open()
    try:
        tag = 0
        for i, data in enumerate(garbage(rng)):
            attacker.send(data, i // 100)
            if i % 100 == 99:
                tag += 1
                await attacker.sync(i // 100, tag)
        for i, data in enumerate(oversized(rng)):
            attacker.send(data, i)
            if i % 4 == 3:
                tag += 1
                await attacker.sync(i, tag)
        tag += 1
        await attacker.sync(0, tag)
        return attacker.sent
    finally:
        attacker.close()


_GAUGES = {"registrations", "introductions", "used_challenges", "pending_verifications",
           "pending_frames"}


def _total(stats: dict[str, int]) -> int:
    """Sum of the counters that count datagrams' fates (gauges left out)."""
    return sum(v for k, v in stats.items()
               if k not in _GAUGES and k not in ("relayed_bytes", "socket_errors"))


@pytest.fixture
def ids() -> tuple[DeviceIdentity, DeviceIdentity]:
    return (generate_identity("tv@example.org/living-room"),
            generate_identity("remote@example.org/phone"))


# -- the rendezvous, in process ----------------------------------------------------


async def test_rendezvous_in_process_survives_garbage(
    tmp_path: Path, ids: tuple[DeviceIdentity, DeviceIdentity],
    caplog: pytest.LogCaptureFixture,
) -> None:
    tv, phone = ids
    write_vcards(tmp_path, tv, phone)
    server = await serve(("127.0.0.1", 0), vcards=tmp_path, config=RendezvousConfig())
    tracemalloc.start()
    try:
        before = _total(server.statistics())
        base, _ = tracemalloc.get_traced_memory()
        with caplog.at_level("WARNING", logger="rendezvous"):
            sent = await flood_rendezvous(server.address)
        grown = tracemalloc.get_traced_memory()[0] - base
        stats = server.statistics()
        # every datagram met exactly one fate, and was counted
        assert _total(stats) - before >= sent
        assert stats.get("internal_errors", 0) == 0
        assert stats["dropped_undecodable"] > 0 and stats["dropped_rate_limited"] > 0
        assert stats["dropped_unknown"] > 0 and stats["stun_answers"] > 0
        assert stats["registrations"] == 0
        # warnings are rate-limited per source IP: a handful, not thousands
        warnings = [r for r in caplog.records if r.levelname == "WARNING"]
        assert 0 < len(warnings) <= 4 * len(ATTACKERS), [r.getMessage() for r in warnings]
        assert grown < 4 * 1024 * 1024, f"{grown} bytes kept after {sent} datagrams"
        await exercise(server.address, tv, phone)
        assert server.statistics()["registrations"] == 2
    finally:
        tracemalloc.stop()
        server.close()
        await server.wait_closed()


# -- the rendezvous command --------------------------------------------------------


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def test_rendezvous_command_survives_garbage(
    tmp_path: Path, ids: tuple[DeviceIdentity, DeviceIdentity]
) -> None:
    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs /proc to read the server's resident memory")
    tv, phone = ids
    vcards = tmp_path / "vcards"
    vcards.mkdir()
    write_vcards(vcards, tv, phone)
    log = tmp_path / "rendezvous.log"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with open(log, "wb") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "rendezvous", "--listen", "127.0.0.1:0",
            "--vcards", str(vcards), "-v",  # -v: the counters are logged at exit
            stdout=subprocess.PIPE, stderr=err, env=env, cwd=ROOT,
        )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        assert line.startswith("rendezvous listening on 127.0.0.1:"), line
        addr = ("127.0.0.1", int(line.split()[3].rsplit(":", 1)[1]))
        # warm up (first registration imports and caches), then measure
        await exercise(addr, tv, phone)
        rss_before = _rss_bytes(proc.pid)
        sent = await flood_rendezvous(addr)
        sent += await flood_rendezvous(addr)
        rss_after = _rss_bytes(proc.pid)
        assert rss_after - rss_before < 16 * 1024 * 1024, (rss_before, rss_after)
        await exercise(addr, tv, phone)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = log.read_text()
    warnings = [ln for ln in text.splitlines() if " WARNING " in ln]
    # rate-limited: at most one per 10 s per source IP (the run is shorter)
    assert 0 < len(warnings) <= 4 * len(ATTACKERS), warnings[:20]
    assert "internal error" not in text
    # the counters logged at exit account for the flood
    assert "dropped_undecodable=" in text and "dropped_rate_limited=" in text
    assert sent > 5000


# -- a listening peer --------------------------------------------------------------


async def wait_until(predicate: Callable[[], bool], timeout: float = DEADLINE) -> None:
    """Poll ``predicate`` each few milliseconds until it holds (bounded)."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


def quic_initials(count: int, target: tuple[str, int]) -> list[bytes]:
    """``count`` valid client Initials (each its own connection)."""
    ident = generate_identity("flood@example.org/x")
    cert = make_certificate(ident.private_key, str(ident.jid))
    out = []
    for _ in range(count):
        conn = AuthenticatedQuicConnection(
            configuration=quic_configuration(
                is_client=True, private_key=ident.private_key, certificate=cert,
                idle_timeout=30.0, max_datagram_frame_size=None,
            ),
            check=lambda credential: None,
        )
        conn.connect(target, now=0.0)
        out.append(conn.datagrams_to_send(now=0.0)[0][0])
    return out


@pytest.fixture
async def listener(tv_id: DeviceIdentity, remote_id: DeviceIdentity) -> AsyncIterator[Peer]:
    config = PeerConfig(max_half_open=48, max_half_open_per_ip=16, handshake_timeout=1.0,
                        idle_timeout=3.0)
    async with open_peer(tv_id, trusting(tv_id, remote_id), config=config) as tv:
        yield tv


async def legit_ping(tv: Peer, tv_id: DeviceIdentity, remote_id: DeviceIdentity) -> None:
    async with open_peer(remote_id, trusting(tv_id, remote_id)) as remote:
        session = await remote.connect(tv_id.jid.full, tv.address, timeout=DEADLINE)
        async with asyncio.timeout(DEADLINE):
            accepted = await tv.accept()
        assert await session.ping(timeout=DEADLINE) > 0
        session.send(st.message("still here"))
        async with asyncio.timeout(DEADLINE):
            assert st.body_of(await accepted.receive()) == "still here"
        await session.close()


async def test_listening_peer_survives_garbage(
    listener: Peer, tv_id: DeviceIdentity, remote_id: DeviceIdentity
) -> None:
    tv = listener
    rng = random.Random(2)
    socks = []
    for host in ATTACKERS:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((host, 0))
        socks.append(sock)
    counted = 0
    try:
        initial = quic_initials(1, tv.address)[0]
        batch: list[bytes] = []
        for data in garbage(rng):
            if data[0] & 0x80:  # long QUIC header: keep only truncated Initials
                data = initial[: rng.randint(1, 1199)]
            batch.append(data)
        batch += [bytes([0x10]) + rng.randbytes(OVERSIZED_BYTES - 1) for _ in range(5)]
        batch += [bytes([0x40]) + rng.randbytes(OVERSIZED_BYTES - 1) for _ in range(5)]
        start = tv.counters["datagrams_dropped"]
        for i in range(0, len(batch), 50):
            for data in batch[i : i + 50]:
                socks[(i // 50) % len(socks)].sendto(data, tv.address)
            counted += len(batch[i : i + 50])
            await wait_until(lambda: tv.counters["datagrams_dropped"] - start >= counted)
        # oversized valid-looking Initials from a few sources: a session each, no more
        for sock in socks:
            for _ in range(3):
                sock.sendto(initial + rng.randbytes(OVERSIZED_BYTES - len(initial)), tv.address)
        await wait_until(lambda: len(tv.endpoint.connections()) >= 1)
        assert len(tv.endpoint.connections()) <= len(socks)
        await legit_ping(tv, tv_id, remote_id)
        assert tv.counters["datagrams_dropped"] - start >= len(batch)
    finally:
        for sock in socks:
            sock.close()


async def test_half_open_flood_is_bounded_and_expires(
    listener: Peer, tv_id: DeviceIdentity, remote_id: DeviceIdentity
) -> None:
    tv = listener
    cfg = tv.config
    per_ip = 200
    socks: list[socket.socket] = []
    try:
        for host in ATTACKERS:
            for _ in range(per_ip if host == ATTACKERS[0] else 25):
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sock.bind((host, 0))
                socks.append(sock)
        initials = quic_initials(len(socks), tv.address)

        def half_open() -> int:
            return sum(1 for s in tv.endpoint.connections() if not s.opened)

        def accounted() -> int:
            c = tv.counters
            return (half_open() + c.get("half_open_refused_per_ip", 0)
                    + c.get("half_open_evicted", 0) + c.get("half_open_expired", 0))

        for i, (sock, data) in enumerate(zip(socks, initials)):
            sock.sendto(data, tv.address)
            if i % 50 == 49:
                await wait_until(lambda: accounted() >= i + 1)
        await wait_until(lambda: accounted() >= len(socks))
        assert half_open() <= cfg.max_half_open
        per_source: dict[str, int] = {}
        for s in tv.endpoint.connections():
            per_source[s.address[0]] = per_source.get(s.address[0], 0) + 1
        assert max(per_source.values()) <= cfg.max_half_open_per_ip
        assert tv.counters["half_open_refused_per_ip"] >= per_ip - cfg.max_half_open_per_ip
        assert tv.counters.get("half_open_evicted", 0) > 0

        # a legitimate device connects while the flood goes on
        async def keep_flooding() -> None:
            for _ in range(20):
                for sock, data in zip(socks[per_ip:], initials[per_ip:]):
                    sock.sendto(data, tv.address)
                await asyncio.sleep(0.05)  # pacing, not synchronisation

        flood = asyncio.create_task(keep_flooding())
        try:
            await legit_ping(tv, tv_id, remote_id)
        finally:
            flood.cancel()
        assert half_open() <= cfg.max_half_open
        # with the flood over, every half-open handshake goes (idle timeout)
        await wait_until(lambda: half_open() == 0, timeout=cfg.idle_timeout * 4)
        assert not tv.endpoint.connections() or all(s.opened for s in tv.endpoint.connections())
    finally:
        for sock in socks:
            sock.close()
