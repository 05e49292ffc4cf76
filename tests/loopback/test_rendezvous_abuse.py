"""Abuse of a live rendezvous server on loopback: amplification, open
relay, forged and replayed registrations, registration floods.

The core's unit tests cover the same rules with a fake clock; these show
them holding over real UDP sockets against ``serve()``. Attackers send
from 127.0.0.2 and up, the legitimate devices from 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dtx.identity import DeviceIdentity, generate_identity
from dtx.wire.control import (
    ControlMessage,
    MessageType,
    decode_control,
    encode_control,
    encode_hello,
    encode_register,
)
from dtx.wire.relay import decode_relay, encode_relay
from dtx.wire.stun import binding_request
from rendezvous.core import AMPLIFICATION_FACTOR, RendezvousConfig
from rendezvous.server import Server, serve

from .test_rendezvous_server import Device, write_vcards

DEADLINE = 5.0


def _alias(host: str) -> None:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((host, 0))
    except OSError as exc:
        pytest.skip(f"needs {host} usable as a loopback source address: {exc}")


class Raw(Device):
    """A device socket bound to another loopback address."""

    def __init__(self, ident: DeviceIdentity, server: tuple[str, int], host: str) -> None:
        super().__init__(ident, server)
        self.host = host

    async def open(self) -> Raw:
        loop = asyncio.get_running_loop()
        inbox = self.inbox

        class Proto(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
                inbox.put_nowait(data)

        self.transport, _ = await loop.create_datagram_endpoint(
            Proto, local_addr=(self.host, 0)
        )
        return self

    async def answers(self, request: bytes) -> list[bytes]:
        """Everything the server sends back to ``request``: a STUN request
        follows it, and its answer closes the list (loopback keeps order)."""
        self.send(request)
        marker = bytes(range(12))
        self.send(binding_request(marker))
        out: list[bytes] = []
        async with asyncio.timeout(DEADLINE):
            for _ in range(100):
                data = await self.inbox.get()
                if data[:1] == b"\x01" and data[8:20] == marker:
                    return out
                out.append(data)
        raise AssertionError("no end marker")


@pytest.fixture
def accounts() -> dict[str, DeviceIdentity]:
    return {
        "tv": generate_identity("tv@example.org/living-room"),
        "phone": generate_identity("remote@example.org/phone"),
        "eve": generate_identity("eve@example.org/laptop"),
    }


@pytest.fixture
async def server(tmp_path: Path, accounts: dict[str, DeviceIdentity]) -> AsyncIterator[Server]:
    _alias("127.0.0.2")
    write_vcards(tmp_path, *accounts.values())
    srv = await serve(("127.0.0.1", 0), vcards=tmp_path,
                      config=RendezvousConfig(challenge_validity=1.0))
    try:
        yield srv
    finally:
        srv.close()
        await srv.wait_closed()
    assert srv.statistics().get("internal_errors", 0) == 0


# -- amplification -----------------------------------------------------------------


async def test_no_reply_to_an_unproven_source_exceeds_three_times_the_request(
    server: Server, accounts: dict[str, DeviceIdentity]
) -> None:
    """Every request type, in its smallest form, from an unregistered
    source; the worst ratio is the one docs/rendezvous.md reports."""
    eve = await Raw(accounts["eve"], server.address, "127.0.0.2").open()
    stranger = generate_identity("nobody@example.org/x")
    txid = bytes(8)
    try:
        eve.send(encode_hello(eve.txid()))
        challenge = (await eve.recv_control(MessageType.CHALLENGE)).challenge
        assert challenge is not None

        def register(ident: DeviceIdentity, chal: bytes) -> bytes:
            return encode_register(txid=txid, jid="a@b/c", key=ident.public_key,
                                   challenge=chal, candidates=(), sign=ident.sign)

        def control(mtype: MessageType, **fields: object) -> bytes:
            return encode_control(ControlMessage(mtype, txid, **fields))  # type: ignore[arg-type]

        requests = {
            "HELLO": encode_hello(txid),
            "HELLO padded to 1200": encode_control(
                ControlMessage(MessageType.HELLO, txid, padding=1187)),
            "REGISTER, bad challenge": register(stranger, bytes(20)),
            "REGISTER, key in no vCard": register(stranger, challenge),
            "REGISTER, bare JID": encode_register(
                txid=txid, jid="a@b", key=stranger.public_key, challenge=challenge,
                candidates=(), sign=stranger.sign),
            "KEEPALIVE, unknown": control(MessageType.KEEPALIVE, registration=bytes(8)),
            "INTRODUCE, unregistered": control(MessageType.INTRODUCE, registration=bytes(8),
                                               target="t"),
            "ACCEPT, unregistered": control(MessageType.ACCEPT, registration=bytes(8),
                                            intro=bytes(8)),
            "UNREGISTER, unknown": control(MessageType.UNREGISTER, registration=bytes(8)),
            "CHALLENGE (wrong direction)": control(MessageType.CHALLENGE, challenge=bytes(20)),
            "STUN Binding, FINGERPRINT": binding_request(bytes(12)),
            "STUN Binding, bare": binding_request(bytes(12), fingerprint=False),
            "STUN Binding, classic": binding_request(bytes(16)),
            "STUN Binding, CHANGE-REQUEST": binding_request(bytes(12), change_ip=True),
            "RELAY, unregistered": encode_relay(1, b"\xc0" * 1),
            "RELAY header only": encode_relay(1, b""),
            "garbage": b"\x10\x7f" + bytes(30),
        }
        ratios: dict[str, float] = {}
        for name, request in requests.items():
            replies = await eve.answers(request)
            assert len(replies) <= 1, name
            size = len(replies[0]) if replies else 0
            ratios[name] = size / len(request)
            assert size <= AMPLIFICATION_FACTOR * len(request), (name, len(request), size)
            if replies and replies[0][0] == 0x10:
                decode_control(replies[0])  # a well-formed answer, not junk
        assert max(ratios.values()) <= AMPLIFICATION_FACTOR
        assert server.statistics().get("registrations", 0) == 0
    finally:
        eve.close()


# -- no open relay ---------------------------------------------------------------


async def _introduce(a: Device, b: Device) -> tuple[int, int]:
    """``a`` asks for ``b``, ``b`` accepts: the relay channels of ``a`` and ``b``."""
    a.control(MessageType.INTRODUCE, target=b.ident.jid.full)
    intro_a = await a.recv_control(MessageType.INTRODUCTION)
    intro_b = await b.recv_control(MessageType.INTRODUCTION)
    assert intro_a.channel is not None and intro_b.channel is not None
    b.control(MessageType.ACCEPT, intro=intro_b.intro)
    await b.recv_control(MessageType.ACK)
    return intro_a.channel, intro_b.channel


async def test_no_open_relay(server: Server, accounts: dict[str, DeviceIdentity]) -> None:
    a = await Device(accounts["phone"], server.address).open()
    b = await Device(accounts["tv"], server.address).open()
    eve = await Raw(accounts["eve"], server.address, "127.0.0.2").open()
    outsider = await Raw(accounts["eve"], server.address, "127.0.0.3").open()
    try:
        await a.register()
        await b.register()
        await eve.register()  # registered, but never introduced to anyone
        chan_a, chan_b = await _introduce(a, b)
        before = server.statistics()
        for channel in (chan_a, chan_b):
            for i in range(50):
                outsider.send(encode_relay(channel, b"\xc0outsider-%d" % i))
                eve.send(encode_relay(channel, b"\xc0eve-%d" % i))
        # a's own frame after the hostile ones: it is the first thing b gets
        a.send(encode_relay(chan_a, b"\xc0legit"))
        assert decode_relay(await b.recv()) == (chan_b, b"\xc0legit")
        b.send(encode_relay(chan_b, b"\x40back"))
        assert decode_relay(await a.recv()) == (chan_a, b"\x40back")
        assert b.inbox.empty() and a.inbox.empty()
        stats = server.statistics()
        assert stats["dropped_relay_unregistered"] - before.get(
            "dropped_relay_unregistered", 0) == 100
        assert stats["dropped_relay_channel"] - before.get("dropped_relay_channel", 0) == 100
        assert stats["relayed_frames"] - before.get("relayed_frames", 0) == 2
    finally:
        for dev in (a, b, eve, outsider):
            dev.close()


async def test_relay_flood_is_held_to_the_device_limits(
    tmp_path: Path, accounts: dict[str, DeviceIdentity]
) -> None:
    write_vcards(tmp_path, *accounts.values())
    config = RendezvousConfig(relay_frames_per_s=100.0, relay_burst_frames=50.0,
                              relay_bytes_per_s=1e9, relay_burst_bytes=1e9)
    srv = await serve(("127.0.0.1", 0), vcards=tmp_path, config=config)
    a = await Device(accounts["phone"], srv.address).open()
    b = await Device(accounts["tv"], srv.address).open()
    try:
        await a.register()
        await b.register()
        chan_a, _ = await _introduce(a, b)
        loop = asyncio.get_running_loop()
        start = loop.time()
        flood = 2000
        for i in range(flood):
            a.send(encode_relay(chan_a, b"\xc0%d" % i))
        # a's keepalive is read after every frame of the flood (one socket, in order)
        a.control(MessageType.KEEPALIVE)
        await a.recv_control(MessageType.KEEPALIVE_ACK)
        elapsed = loop.time() - start
        stats = srv.statistics()
        allowed = config.relay_burst_frames + config.relay_frames_per_s * elapsed
        assert stats["relayed_frames"] <= allowed + 1
        assert stats["dropped_relay_rate"] >= flood - allowed - 1
        assert stats["relayed_frames"] + stats["dropped_relay_rate"] == flood
    finally:
        a.close()
        b.close()
        srv.close()


# -- registration --------------------------------------------------------------------


async def _challenge(dev: Device) -> bytes:
    dev.send(encode_hello(dev.txid()))
    challenge = (await dev.recv_control(MessageType.CHALLENGE)).challenge
    assert challenge is not None
    return challenge


def _register(dev: Device, challenge: bytes, *, key: bytes | None = None,
              sign: DeviceIdentity | None = None, jid: str | None = None) -> bytes:
    signer = sign or dev.ident
    return encode_register(
        txid=dev.txid(), jid=jid or dev.ident.jid.full, key=key or dev.ident.public_key,
        challenge=challenge, candidates=(), sign=signer.sign,
    )


async def _error_code(dev: Device) -> int:
    err = await dev.recv_control(MessageType.ERROR)
    assert err.error is not None
    return err.error[0]


async def test_forged_replayed_expired_and_wrong_key_registrations_are_refused(
    server: Server, accounts: dict[str, DeviceIdentity]
) -> None:
    phone, eve_id = accounts["phone"], accounts["eve"]
    eve = await Raw(eve_id, server.address, "127.0.0.2").open()
    dev = await Device(phone, server.address).open()
    try:
        # forged: claims the phone's key, signed by eve's
        eve.send(_register(eve, await _challenge(eve), key=phone.public_key, sign=eve_id,
                           jid=phone.jid.full))
        assert await _error_code(eve) == 403
        # wrong key: eve's own key, claiming the tv's account
        eve.send(_register(eve, await _challenge(eve), jid="tv@example.org/evil"))
        assert await _error_code(eve) == 403
        # challenge fetched from another address
        eve.send(_register(eve, await _challenge(dev), jid="eve@example.org/laptop"))
        assert await _error_code(eve) == 401
        # replayed: the phone's own valid REGISTER, sent again, and from eve
        request = _register(dev, await _challenge(dev))
        dev.send(request)
        await dev.recv_control(MessageType.REGISTERED)
        dev.send(request)
        assert await _error_code(dev) == 401
        eve.send(request)
        assert await _error_code(eve) == 401
        # expired: the server was started with 1 s challenges
        stale = await _challenge(eve)
        loop = asyncio.get_running_loop()
        until = loop.time() + 2.1
        while loop.time() < until:  # waiting out the validity, not synchronising
            await asyncio.sleep(until - loop.time())
        eve.send(_register(eve, stale))
        assert await _error_code(eve) == 401
        stats = server.statistics()
        assert stats["refused_403"] == 2 and stats["refused_401"] == 4
        assert stats["registrations"] == 1  # the phone, still there
    finally:
        eve.close()
        dev.close()


async def test_registration_flood_cannot_push_out_established_devices(
    tmp_path: Path, accounts: dict[str, DeviceIdentity]
) -> None:
    hosts = [f"127.0.0.{i}" for i in range(2, 32)]
    _alias(hosts[-1])
    flooders = [generate_identity(f"bot{i}@example.org/x") for i in range(len(hosts))]
    write_vcards(tmp_path, *accounts.values(), *flooders)
    config = RendezvousConfig(max_registrations=10)
    srv = await serve(("127.0.0.1", 0), vcards=tmp_path, config=config)
    a = await Device(accounts["phone"], srv.address).open()
    b = await Device(accounts["tv"], srv.address).open()
    bots = [await Raw(ident, srv.address, host).open() for ident, host in zip(flooders, hosts)]
    try:
        await a.register()
        await b.register()
        codes: list[int] = []
        for bot in bots:
            bot.send(_register(bot, await _challenge(bot)))
            reply = decode_control(await bot.recv())
            codes.append(200 if reply.type == MessageType.REGISTERED else
                         reply.error[0] if reply.error else 0)
        assert codes.count(200) == config.max_registrations - 2
        assert codes.count(503) == len(bots) - (config.max_registrations - 2)
        # and a flood of forged registrations stores nothing at all (from the
        # refused bots: a registered one would get the challenge it just used,
        # the challenge being per address and second, and a 401)
        for bot, code in zip(bots, codes):
            if code == 200:
                continue
            bot.send(_register(bot, await _challenge(bot), sign=accounts["eve"]))
            assert await _error_code(bot) == 403
        assert srv.statistics()["registrations"] == config.max_registrations
        # the established devices are still registered and introducible
        a.control(MessageType.KEEPALIVE)
        await a.recv_control(MessageType.KEEPALIVE_ACK)
        a.control(MessageType.INTRODUCE, target=accounts["tv"].jid.full)
        await a.recv_control(MessageType.INTRODUCTION)
        await b.recv_control(MessageType.INTRODUCTION)
    finally:
        for dev in (a, b, *bots):
            dev.close()
        srv.close()


# -- junk and HELLO floods from the device's own IP (issue D5) ----------------------


async def _drain(sock: Raw) -> int:
    """A STUN request, and how many CHALLENGEs came before its answer: the
    server has then read all ``sock`` sent (loopback keeps order)."""
    marker = bytes(range(12))
    sock.send(binding_request(marker))
    challenges = 0
    async with asyncio.timeout(DEADLINE):
        for _ in range(100_000):
            data = await sock.inbox.get()
            if data[:1] == b"\x01" and data[8:20] == marker:
                return challenges
            if decode_control(data).type == MessageType.CHALLENGE:
                challenges += 1
    raise AssertionError("no end marker")


class _Flood:
    """Every 10 ms, from sockets of the devices' IP: a 1-byte ``0x10``
    datagram (the junk of issue D5) from one, 10 valid HELLOs from another,
    and once ``wide`` one HELLO from each of 10 more, more than that IP may
    send."""

    def __init__(self, ident: DeviceIdentity, target: tuple[str, int]) -> None:
        self.junk_sock = Raw(ident, target, "127.0.0.1")
        self.hello_sock = Raw(ident, target, "127.0.0.1")
        self.wide_socks = [Raw(ident, target, "127.0.0.1") for _ in range(10)]
        self.wide = False
        self.junk = 0
        self.steps = 0
        self._waiters: list[tuple[int, asyncio.Event]] = []
        self._stop = asyncio.Event()

    def socks(self) -> list[Raw]:
        return [self.junk_sock, self.hello_sock, *self.wide_socks]

    async def open(self) -> _Flood:
        for sock in self.socks():
            await sock.open()
        return self

    async def after(self, steps: int) -> None:
        """Wait until the flood has run ``steps`` more steps."""
        event = asyncio.Event()
        self._waiters.append((self.steps + steps, event))
        async with asyncio.timeout(steps * 0.01 + 30):
            await event.wait()

    async def run(self) -> None:
        txid = 0
        while not self._stop.is_set():
            self.junk_sock.send(b"\x10")
            self.junk += 1
            for sock in [self.hello_sock] * 10 + (self.wide_socks if self.wide else []):
                txid += 1
                sock.send(encode_hello(txid.to_bytes(8, "big")))
            self.steps += 1
            for due, event in self._waiters:
                if self.steps >= due:
                    event.set()
            await asyncio.sleep(0.01)  # pacing the flood, not synchronising

    def stop(self) -> None:
        self._stop.set()


async def test_junk_and_hello_floods_from_the_device_ip_do_not_starve_it(
    tmp_path: Path, accounts: dict[str, DeviceIdentity]
) -> None:
    write_vcards(tmp_path, *accounts.values())
    config = RendezvousConfig()
    srv = await serve(("127.0.0.1", 0), vcards=tmp_path, config=config)
    a = await Device(accounts["phone"], srv.address).open()
    b = await Device(accounts["tv"], srv.address).open()
    flood = await _Flood(accounts["eve"], srv.address).open()
    loop = asyncio.get_running_loop()
    start = loop.time()
    task = asyncio.create_task(flood.run())
    try:
        await flood.after(100)
        # one HELLO and one REGISTER each, no retransmission: none may be lost
        await a.register()
        await b.register()
        flood.wide = True  # from now on the IP's budget for unproven sources is used up
        await flood.after(100)
        for _ in range(5):
            a.control(MessageType.KEEPALIVE)
            await a.recv_control(MessageType.KEEPALIVE_ACK)
            await flood.after(20)
        chan_a, chan_b = await _introduce(a, b)
        a.send(encode_relay(chan_a, b"\xc0through"))
        assert decode_relay(await b.recv()) == (chan_b, b"\xc0through")
    finally:
        flood.stop()
        await task
    try:
        hello_challenges = await _drain(flood.hello_sock)
        challenges = hello_challenges
        for sock in [flood.junk_sock, *flood.wide_socks]:
            challenges += await _drain(sock)
        elapsed = loop.time() - start
        stats = srv.statistics()
        assert stats["registrations"] == 2
        assert stats["dropped_undecodable"] == flood.junk  # each counted, none charged
        assert stats["dropped_rate_limited"] > 0
        assert stats.get("dropped_rate_limited_registered", 0) == 0
        # the HELLO socket was held to its address's budget all along
        per_address = config.control_per_address_burst + config.control_per_address_per_s * elapsed
        assert hello_challenges <= per_address
        # and all the flood's sockets together to the IP's
        per_ip = config.control_per_source_burst + config.control_per_source_per_s * elapsed
        devices = 4  # their HELLOs and REGISTERs
        assert challenges + devices <= per_ip
    finally:
        for sock in flood.socks():
            sock.close()
        a.close()
        b.close()
        srv.close()
        await srv.wait_closed()
    assert srv.statistics().get("internal_errors", 0) == 0
