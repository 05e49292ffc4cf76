"""The rendezvous server on loopback: in-process ``serve`` and the
``python -m rendezvous`` command, driven by raw UDP sockets."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dtx.identity import DeviceIdentity, generate_identity
from dtx.lab.scene import write_vcards
from dtx.wire.control import (
    Candidate,
    CandidateKind,
    ControlMessage,
    MessageType,
    NatMapping,
    decode_control,
    encode_control,
    encode_hello,
    encode_register,
)
from dtx.wire.relay import decode_relay, encode_relay
from dtx.wire.stun import binding_request, decode_stun
from rendezvous.core import RendezvousConfig
from rendezvous.server import serve

from .conftest import BOTH_LOOPS

pytestmark = BOTH_LOOPS

DEADLINE = 5.0  # per answer; on loopback they take milliseconds
ROOT = Path(__file__).resolve().parents[2]


class Device:
    """A raw UDP socket speaking the device side of the protocol by hand."""

    def __init__(self, ident: DeviceIdentity, server: tuple[str, int]) -> None:
        self.ident = ident
        self.server = server
        self.inbox: asyncio.Queue[bytes] = asyncio.Queue()
        self.transport: asyncio.DatagramTransport | None = None
        self.registration = b""
        self.txn = 0

    async def open(self) -> Device:
        loop = asyncio.get_running_loop()
        inbox = self.inbox

        class Proto(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
                inbox.put_nowait(data)

        self.transport, _ = await loop.create_datagram_endpoint(
            Proto, local_addr=("127.0.0.1", 0)
        )
        return self

    @property
    def addr(self) -> tuple[str, int]:
        assert self.transport is not None
        host, port = self.transport.get_extra_info("sockname")[:2]
        return str(host), int(port)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def txid(self) -> bytes:
        self.txn += 1
        return self.txn.to_bytes(8, "big")

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.sendto(data, self.server)

    async def recv(self) -> bytes:
        return await asyncio.wait_for(self.inbox.get(), DEADLINE)

    async def recv_control(self, mtype: MessageType) -> ControlMessage:
        """The next control message of ``mtype`` (skipping retransmissions)."""
        for _ in range(20):
            data = await self.recv()
            if data[0] == 0x10:
                msg = decode_control(data)
                if msg.type == mtype:
                    return msg
        raise AssertionError(f"no {mtype.name}")

    async def register(self) -> ControlMessage:
        self.send(encode_hello(self.txid()))
        challenge = (await self.recv_control(MessageType.CHALLENGE)).challenge
        assert challenge is not None
        self.send(
            encode_register(
                txid=self.txid(),
                jid=self.ident.jid.full,
                key=self.ident.public_key,
                challenge=challenge,
                candidates=(Candidate(CandidateKind.HOST, self.addr),),
                sign=self.ident.sign,
            )
        )
        reply = await self.recv_control(MessageType.REGISTERED)
        assert reply.registration is not None
        self.registration = reply.registration
        return reply

    def control(self, mtype: MessageType, **fields: object) -> None:
        msg = ControlMessage(
            mtype, self.txid(), registration=self.registration, **fields  # type: ignore[arg-type]
        )
        self.send(encode_control(msg))


async def exercise(server: tuple[str, int], tv: DeviceIdentity, phone: DeviceIdentity) -> None:
    """Register two devices, introduce them, relay frames both ways."""
    a = await Device(phone, server).open()
    b = await Device(tv, server).open()
    try:
        reg_a = await a.register()
        assert reg_a.reflexive == a.addr
        await b.register()
        a.control(MessageType.INTRODUCE, target=tv.jid.bare.full)
        intro_a = await a.recv_control(MessageType.INTRODUCTION)
        intro_b = await b.recv_control(MessageType.INTRODUCTION)
        assert intro_a.intro == intro_b.intro and intro_a.peer_key == tv.public_key
        assert intro_a.channel is not None and intro_b.channel is not None
        assert Candidate(CandidateKind.SERVER_REFLEXIVE, b.addr) in intro_a.candidates
        b.control(MessageType.ACCEPT, intro=intro_b.intro)
        await b.recv_control(MessageType.ACK)
        for i in range(5):
            a.send(encode_relay(intro_a.channel, b"\xc0from-a-%d" % i))
            assert decode_relay(await b.recv()) == (intro_b.channel, b"\xc0from-a-%d" % i)
            b.send(encode_relay(intro_b.channel, b"\x40from-b-%d" % i))
            assert decode_relay(await a.recv()) == (intro_a.channel, b"\x40from-b-%d" % i)
        a.control(MessageType.KEEPALIVE)
        ack = await a.recv_control(MessageType.KEEPALIVE_ACK)
        assert ack.reflexive == a.addr
        # STUN on the same socket
        a.send(binding_request(bytes(12)))
        assert decode_stun(await a.recv()).xor_mapped_address == a.addr
    finally:
        a.close()
        b.close()


@pytest.fixture
def ids() -> tuple[DeviceIdentity, DeviceIdentity]:
    return generate_identity("tv@example.org/living-room"), generate_identity(
        "remote@example.org/phone"
    )


async def test_in_process(tmp_path: Path, ids: tuple[DeviceIdentity, DeviceIdentity]) -> None:
    tv, phone = ids
    write_vcards(tmp_path, tv, phone)
    server = await serve(("127.0.0.1", 0), alt_ip=None, vcards=tmp_path, config=RendezvousConfig())
    try:
        await exercise(server.address, tv, phone)
        stats = server.statistics()
        assert stats["registrations"] == 2 and stats["relayed_frames"] == 10
        assert stats.get("internal_errors", 0) == 0
        # a device whose key is in no vCard is refused over the wire too
        stranger = await Device(generate_identity("eve@example.org/x"), server.address).open()
        try:
            stranger.send(encode_hello(stranger.txid()))
            challenge = (await stranger.recv_control(MessageType.CHALLENGE)).challenge
            assert challenge is not None
            stranger.send(
                encode_register(
                    txid=stranger.txid(),
                    jid="eve@example.org/x",
                    key=stranger.ident.public_key,
                    challenge=challenge,
                    candidates=(),
                    sign=stranger.ident.sign,
                )
            )
            err = await stranger.recv_control(MessageType.ERROR)
            assert err.error is not None and err.error[0] == 403
        finally:
            stranger.close()
    finally:
        server.close()
        await server.wait_closed()


async def test_a_check_from_another_port_makes_the_introduction_say_dependent(
    tmp_path: Path, ids: tuple[DeviceIdentity, DeviceIdentity]
) -> None:
    """A KEEPALIVE with tv's registration id, from a second local socket
    (another port: what a symmetric NAT shows), to the mapping port; and
    phone's from its own socket (the same port)."""
    tv, phone = ids
    write_vcards(tmp_path, tv, phone)
    server = await serve(("127.0.0.1", 0), vcards=tmp_path)
    a = await Device(phone, server.address).open()
    b = await Device(tv, server.address).open()
    other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        other.bind(("127.0.0.1", 0))
        other.setblocking(False)
        reg_a, reg_b = await a.register(), await b.register()
        assert reg_a.mapping_port == reg_b.mapping_port == server.address[1] + 1
        mapping = ("127.0.0.1", reg_b.mapping_port)
        check_b = ControlMessage(MessageType.KEEPALIVE, b.txid(), registration=b.registration)
        other.sendto(encode_control(check_b), mapping)
        assert a.transport is not None
        check_a = ControlMessage(MessageType.KEEPALIVE, a.txid(), registration=a.registration)
        a.transport.sendto(encode_control(check_a), mapping)
        # one round trip on the primary port: the server has read both checks
        # (same loop, sent before) and sent whatever it would answer them
        b.control(MessageType.KEEPALIVE)
        await b.recv_control(MessageType.KEEPALIVE_ACK)
        assert server.statistics()["mapping_checks"] == 2
        a.control(MessageType.INTRODUCE, target=tv.jid.full)
        intro_a = await a.recv_control(MessageType.INTRODUCTION)
        intro_b = await b.recv_control(MessageType.INTRODUCTION)
        assert intro_a.nat_mapping == (NatMapping.INDEPENDENT, NatMapping.DEPENDENT)
        assert intro_b.nat_mapping == (NatMapping.DEPENDENT, NatMapping.INDEPENDENT)
        with pytest.raises(BlockingIOError):  # the mapping port answered nothing
            other.recv(2048)
    finally:
        other.close()
        a.close()
        b.close()
        server.close()
        await server.wait_closed()


async def test_no_mapping_port(tmp_path: Path) -> None:
    ident = generate_identity("tv@example.org/living-room")
    write_vcards(tmp_path, ident)
    server = await serve(("127.0.0.1", 0), mapping_port=False, vcards=tmp_path)
    dev = await Device(ident, server.address).open()
    try:
        assert server.addresses.sockets() == (server.address,)
        assert (await dev.register()).mapping_port is None
    finally:
        dev.close()
        server.close()


async def test_a_mapping_port_of_its_own_choosing(tmp_path: Path) -> None:
    server = await serve(("127.0.0.1", 0), mapping_port=0, vcards=tmp_path)
    try:
        mapping = server.addresses.mapping
        assert mapping is not None and mapping != server.address
        assert server.addresses.sockets() == (server.address, mapping)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:  # it is bound
            with pytest.raises(OSError):
                busy.bind(mapping)
    finally:
        server.close()
    with pytest.raises(ValueError):  # with an alternate IP, the mapping port is port + 1
        await serve(("127.0.0.1", 0), alt_ip="127.0.0.2", mapping_port=3479, vcards=tmp_path)
    with pytest.raises(ValueError):
        await serve(("127.0.0.1", 0), mapping_port=70000, vcards=tmp_path)


async def test_rfc5780_sockets(tmp_path: Path) -> None:
    try:
        server = await serve(("127.0.0.1", 0), alt_ip="127.0.0.2", vcards=tmp_path)
    except OSError as exc:
        pytest.skip(f"needs 127.0.0.2 usable as a loopback address: {exc}")
    try:
        assert len(server.addresses.sockets()) == 4
        assert server.addresses.mapping == ("127.0.0.1", server.address[1] + 1)
        dev = await Device(generate_identity("x@example.org/y"), server.address).open()
        try:
            dev.send(binding_request(bytes(12), change_ip=True, change_port=True))
            msg = decode_stun(await dev.recv())
            assert msg.xor_mapped_address == dev.addr
            assert msg.response_origin == ("127.0.0.2", server.address[1] + 1)
        finally:
            dev.close()
    finally:
        server.close()


@pytest.fixture
async def subprocess_server(
    tmp_path: Path, ids: tuple[DeviceIdentity, DeviceIdentity]
) -> AsyncIterator[tuple[tuple[str, int], asyncio.subprocess.Process]]:
    write_vcards(tmp_path, *ids)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "rendezvous", "--listen", "127.0.0.1:0", "--vcards", str(tmp_path),
        "--lifetime", "60",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        assert line.startswith("rendezvous listening on 127.0.0.1:"), line
        port = int(line.split()[3].rsplit(":", 1)[1])
        assert f"mapping port {port + 1}" in line, line
        yield ("127.0.0.1", port), proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_subprocess(
    subprocess_server: tuple[tuple[str, int], asyncio.subprocess.Process],
    ids: tuple[DeviceIdentity, DeviceIdentity],
) -> None:
    addr, proc = subprocess_server
    tv, phone = ids
    await exercise(addr, tv, phone)
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 10) == 0
