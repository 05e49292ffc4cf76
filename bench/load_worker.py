"""One client process of the ``load`` scenario: many simulated devices.

Reads a JSON job on stdin (server address, devices: JID, raw private key,
source IP; keepalive interval; how many relay pairs to run), then:

1. registers every device from its own UDP socket (HELLO, CHALLENGE,
   REGISTER, REGISTERED), a bounded number at a time, retransmitting;
2. prints ``registered N`` and waits for a line on stdin;
3. for ``duration`` seconds sends each device's KEEPALIVE at the interval
   (spread evenly) and times the KEEPALIVE_ACK; the first ``2 * pairs``
   devices also introduce themselves in pairs, accept, and pump relay
   frames both ways. An introduction is timed from just before its
   INTRODUCE is sent to the later of the moments the two INTRODUCTIONs
   reached their sockets, by the kernel's receive timestamp
   (``SIOCGSTAMPNS``), so that the figure is the server's (and
   loopback's), not the time this process's event loop, busy with
   thousands of other devices, took to read them; where the kernel gives
   no timestamp, the moment the datagram was read. The time until this
   process's coroutine saw both (``intro_client_s``) is reported beside;
4. prints one JSON line of samples and counts, and exits.

Started by :mod:`bench.scenarios.load`; not a public interface.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import socket
import struct
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519

from dtx.wire.control import (
    ControlMessage,
    MessageType,
    decode_control,
    encode_control,
    encode_hello,
    encode_register,
)
from dtx.wire.relay import decode_relay, encode_relay
from dtx.wire.address import Address

WINDOW = 200
"""Registrations in flight at once."""
RETRY = 1.0
TRIES = 8
SIOCGSTAMPNS = 0x8907
"""Linux: the receive time of the last datagram read from a socket."""


def enable_receive_stamps(sock: socket.socket) -> None:
    """Have the kernel stamp what ``sock`` receives (the first
    ``SIOCGSTAMPNS`` turns it on, and fails: nothing was stamped yet)."""
    try:
        fcntl.ioctl(sock.fileno(), SIOCGSTAMPNS, bytes(16))
    except OSError:
        pass


def received_at(sock: socket.socket | None) -> float:
    """When the datagram just read from ``sock`` reached it (``time.time()``
    clock): the kernel's stamp, or now where there is none."""
    if sock is not None:
        try:
            sec, nsec = struct.unpack("@ll", fcntl.ioctl(sock.fileno(), SIOCGSTAMPNS,
                                                         bytes(16)))
            return float(sec + nsec * 1e-9)
        except OSError:
            pass
    return time.time()


@dataclass(eq=False)
class Dev:
    jid: str
    key: ed25519.Ed25519PrivateKey
    ip: str
    sock: socket.socket | None = None
    transport: asyncio.DatagramTransport | None = None
    registration: bytes = b""
    waiter: asyncio.Future[ControlMessage] | None = None
    txn: int = 0
    pending: dict[bytes, float] = field(default_factory=dict)
    channel: int | None = None
    intro: bytes | None = None
    got_intro: asyncio.Event = field(default_factory=asyncio.Event)
    intro_at: float = 0.0
    """When the first INTRODUCTION reached the socket (``received_at``)."""
    relayed_in: int = 0

    def txid(self) -> bytes:
        self.txn += 1
        return self.txn.to_bytes(8, "big")


class Worker:
    def __init__(self, job: dict[str, Any]) -> None:
        self.server: Address = (job["server"][0], int(job["server"][1]))
        self.devs = [
            Dev(d["jid"], ed25519.Ed25519PrivateKey.from_private_bytes(bytes.fromhex(d["key"])),
                d["ip"])
            for d in job["devices"]
        ]
        self.interval = float(job["interval"])
        self.duration = float(job["duration"])
        self.pairs = int(job["pairs"])
        self.frames_per_s = float(job["frames_per_s"])
        self.keepalive_s: list[float] = []
        self.intro_s: list[float] = []
        self.intro_client_s: list[float] = []
        self.lost_keepalives = 0
        self.relay_sent = 0
        self.counting = False

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        for i, dev in enumerate(self.devs):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((dev.ip, 0))
            sock.setblocking(False)
            if i < 2 * self.pairs:  # the introduced ones
                enable_receive_stamps(sock)
            dev.sock = sock
            dev.transport, _ = await loop.create_datagram_endpoint(
                lambda dev=dev: _Proto(self, dev), sock=sock)  # type: ignore[misc]

    def received(self, dev: Dev, data: bytes) -> None:
        if data[:1] == b"\x11":
            if self.counting:
                decode_relay(data)
                dev.relayed_in += 1
            return
        msg = decode_control(data)
        if msg.type == MessageType.KEEPALIVE_ACK:
            sent = dev.pending.pop(msg.txid, None)
            if sent is not None:
                self.keepalive_s.append(time.perf_counter() - sent)
        elif msg.type == MessageType.INTRODUCTION:
            if not dev.got_intro.is_set():
                dev.intro_at = received_at(dev.sock)
            if dev.intro is None:
                dev.intro, dev.channel = msg.intro, msg.channel
            dev.got_intro.set()
            if msg.role == 2:
                self.send(dev, ControlMessage(MessageType.ACCEPT, dev.txid(),
                                              registration=dev.registration, intro=msg.intro))
        elif dev.waiter is not None and not dev.waiter.done():
            dev.waiter.set_result(msg)

    def send(self, dev: Dev, msg: ControlMessage | bytes) -> None:
        assert dev.transport is not None
        data = msg if isinstance(msg, bytes) else encode_control(msg)
        dev.transport.sendto(data, self.server)

    async def ask(self, dev: Dev, data: bytes, want: MessageType) -> ControlMessage:
        loop = asyncio.get_running_loop()
        for _ in range(TRIES):
            dev.waiter = loop.create_future()
            self.send(dev, data)
            try:
                msg = await asyncio.wait_for(dev.waiter, RETRY)
            except TimeoutError:
                continue
            if msg.type == want:
                return msg
            raise RuntimeError(f"{dev.jid}: {msg.type.name} {msg.error}")
        raise RuntimeError(f"{dev.jid}: no {want.name}")

    async def register(self, dev: Dev) -> None:
        chal = await self.ask(dev, encode_hello(dev.txid()), MessageType.CHALLENGE)
        assert chal.challenge is not None
        pub = dev.key.public_key().public_bytes_raw()
        reg = await self.ask(dev, encode_register(
            txid=dev.txid(), jid=dev.jid, key=pub, challenge=chal.challenge,
            candidates=(), sign=dev.key.sign), MessageType.REGISTERED)
        assert reg.registration is not None
        dev.registration = reg.registration

    async def register_all(self) -> None:
        window = asyncio.Semaphore(WINDOW)

        async def one(dev: Dev) -> None:
            async with window:
                await self.register(dev)

        await asyncio.gather(*(one(d) for d in self.devs))

    async def keepalives(self, dev: Dev, offset: float, until: float) -> None:
        await asyncio.sleep(offset)  # spreads the devices over the interval
        loop = asyncio.get_running_loop()
        while loop.time() < until:
            txid = dev.txid()
            dev.pending[txid] = time.perf_counter()
            self.send(dev, ControlMessage(MessageType.KEEPALIVE, txid,
                                          registration=dev.registration))
            await asyncio.sleep(self.interval)
        self.lost_keepalives += len(dev.pending)

    async def introduce(self, a: Dev, b: Dev) -> None:
        """Introduce ``a`` to ``b`` (``b`` ACCEPTs as it gets its
        INTRODUCTION): the time until both INTRODUCTIONs reached their
        sockets goes to ``intro_s``, until this coroutine saw them to
        ``intro_client_s``."""
        start, wall = time.perf_counter(), time.time()
        for _ in range(TRIES):
            self.send(a, ControlMessage(MessageType.INTRODUCE, a.txid(),
                                        registration=a.registration, target=b.jid))
            try:
                await asyncio.wait_for(asyncio.gather(a.got_intro.wait(), b.got_intro.wait()),
                                       RETRY)
                break
            except TimeoutError:
                continue
        else:
            raise RuntimeError(f"no introduction of {a.jid} to {b.jid}")
        self.intro_client_s.append(time.perf_counter() - start)
        self.intro_s.append(max(a.intro_at, b.intro_at) - wall)

    async def relay_pair(self, a: Dev, b: Dev, until: float) -> None:
        await self.introduce(a, b)
        assert a.channel is not None and b.channel is not None
        loop = asyncio.get_running_loop()
        frame_a = encode_relay(a.channel, b"\xc0" + bytes(99))
        frame_b = encode_relay(b.channel, b"\x40" + bytes(99))
        period = 1.0 / self.frames_per_s
        while loop.time() < until:
            assert a.transport is not None and b.transport is not None
            a.transport.sendto(frame_a, self.server)
            b.transport.sendto(frame_b, self.server)
            if self.counting:
                self.relay_sent += 2
            await asyncio.sleep(period)

    async def run(self) -> dict[str, Any]:
        await self.open()
        t0 = time.perf_counter()
        await self.register_all()
        reg_s = time.perf_counter() - t0
        print(f"registered {len(self.devs)}", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        loop = asyncio.get_running_loop()
        settle = 2.0
        until = loop.time() + self.duration + settle
        n = len(self.devs)
        tasks = [asyncio.create_task(self.keepalives(d, self.interval * i / n, until))
                 for i, d in enumerate(self.devs)]
        pairs = self.devs[: 2 * self.pairs]
        tasks += [asyncio.create_task(self.relay_pair(pairs[2 * i], pairs[2 * i + 1], until))
                  for i in range(self.pairs)]
        await asyncio.sleep(settle)  # introductions done, pumps running: count from here
        received_before = sum(d.relayed_in for d in pairs)
        self.counting = True
        window = until - loop.time()  # the pumps stop at ``until``
        await asyncio.gather(*tasks)
        self.counting = False
        relayed = sum(d.relayed_in for d in pairs) - received_before
        for dev in self.devs:
            if dev.transport is not None:
                dev.transport.close()
        return {
            "devices": n, "register_s": reg_s, "keepalive_s": self.keepalive_s,
            "lost_keepalives": self.lost_keepalives, "intro_s": self.intro_s,
            "intro_client_s": self.intro_client_s,
            "relay_sent": self.relay_sent, "relay_received": relayed, "window_s": window,
        }


class _Proto(asyncio.DatagramProtocol):
    def __init__(self, worker: Worker, dev: Dev) -> None:
        self.worker = worker
        self.dev = dev

    def datagram_received(self, data: bytes, addr: tuple[str | Any, ...]) -> None:
        self.worker.received(self.dev, data)

    def error_received(self, exc: Exception) -> None:
        pass


def main() -> int:
    job = json.loads(sys.stdin.readline())
    if job.get("cpu") is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {int(job["cpu"])})
    result = asyncio.run(Worker(job).run())
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
