"""The TURN client against a real coturn on loopback.

coturn runs with TURN REST credentials (``use-auth-secret`` and a static
secret, as beside Prosody's ``mod_turn_external``), listening on 127.0.0.1
only, from a throwaway folder (config on the command line, log, pid file,
database), with ``-v`` so that its log records each allocation; every test
stops it again. The client is the production :class:`TurnClient`, driven
the way a device drives it: :class:`~dtx.aio.socket.UdpSocket`, one timer,
send what it returns. The "peer" is a second UDP socket on loopback.

coturn never grants less than 600 s (its ``STUN_MIN_ALLOCATE_LIFETIME``),
so refreshes are shown on the client's clock: the driver adds an offset to
``loop.time()`` and jumps from timer to timer, waiting each time for the
real answers of the real server. Skipped, with the reason, when
``turnserver`` is not installed.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os
import random
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dtx.aio.socket import UdpSocket
from dtx.proto.turn import (
    AllocationClosed,
    AllocationFailed,
    AllocationRefreshed,
    Allocated,
    ChannelBound,
    DataReceived,
    PermissionCreated,
    TurnClient,
    TurnClientConfig,
    TurnEvent,
)
from dtx.wire.stun import binding_request, decode_stun
from dtx.wire.turn import is_channel_data

Address = tuple[str, int]
LOOPBACK = "127.0.0.1"
SECRET = "dtx-test-static-secret"
REALM = "dtx.test"
MAX_LIFETIME = 900  # coturn's --max-allocate-lifetime; the client asks for 3600
DEADLINE = 10.0  # for any one answer; on loopback they take milliseconds

pytestmark = pytest.mark.skipif(
    shutil.which("turnserver") is None,
    reason="needs coturn's turnserver (Debian package coturn; scripts/setup installs it)",
)


def rest_credentials(user: str, expires_unix: int, secret: str = SECRET) -> tuple[str, str]:
    """TURN REST credentials as Prosody's mod_turn_external mints them:
    ``expiry:user`` and base64(HMAC-SHA1(secret, username))."""
    username = f"{expires_unix}:{user}"
    mac = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return username, base64.b64encode(mac).decode()


class Coturn:
    """One turnserver process on 127.0.0.1, its files in ``folder``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.log_path = folder / "turn.log"
        self.address: Address = (LOOPBACK, 0)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        for _ in range(10):  # another process may take the port between probe and bind
            self.address = (LOOPBACK, _free_udp_port())
            self.proc = subprocess.Popen(
                [
                    "turnserver", "-n", "-v",
                    "--listening-ip", LOOPBACK, "--relay-ip", LOOPBACK,
                    "--listening-port", str(self.address[1]),
                    "--no-cli", "--no-tls", "--no-dtls", "--no-tcp", "--no-tcp-relay",
                    "--no-rfc5780", "--allow-loopback-peers",
                    "--use-auth-secret", "--static-auth-secret", SECRET, "--realm", REALM,
                    f"--max-allocate-lifetime={MAX_LIFETIME}",  # optional_argument: "=" needed
                    "--log-file", str(self.log_path), "--simple-log", "--no-stdout-log",
                    "--pidfile", str(self.folder / "turn.pid"),
                    "--db", str(self.folder / "turndb"),
                    "--relay-threads", "1",
                ],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            if self._answers_binding():
                return
            self.stop()
        raise RuntimeError("turnserver did not answer on any port tried")

    def _answers_binding(self) -> bool:
        """Ready when it answers a STUN Binding request (retransmitted every
        0.1 s until a deadline), or gone if the process exits."""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((LOOPBACK, 0))
            sock.settimeout(0.1)
            deadline = time.monotonic() + DEADLINE
            while time.monotonic() < deadline:
                if self.proc is None or self.proc.poll() is not None:
                    return False
                tid = os.urandom(12)
                sock.sendto(binding_request(tid), self.address)
                try:
                    data, _ = sock.recvfrom(2048)
                except (TimeoutError, ConnectionRefusedError):
                    continue
                if decode_stun(data).transaction_id == tid:
                    return True
        return False

    def stop(self) -> str:
        """Stop the process (it flushes its log) and return the log."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=DEADLINE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=DEADLINE)
        self.proc = None
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def coturn(tmp_path: Path) -> Iterator[Coturn]:
    server = Coturn(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


class Driver:
    """The client on a real socket: one UdpSocket, one timer, transmit().

    ``now`` is ``loop.time() + skew``: :meth:`advance` raises the skew to
    jump to the client's next timer, so its refreshes fall due at once.
    """

    def __init__(self, server: Address, username: str, password: str, ttl: float) -> None:
        self.loop = asyncio.get_running_loop()
        self.skew = 0.0
        self.sock = UdpSocket.bind(LOOPBACK, 0, self._datagram, self._transmit)
        self.client = TurnClient(
            server, username, password, self.now() + ttl, rng=random.Random(),
            config=TurnClientConfig(lifetime=3600),
        )
        self.events: list[TurnEvent] = []
        self.channel_data_in = 0
        self._changed = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None

    def now(self) -> float:
        return self.loop.time() + self.skew

    def _datagram(self, data: bytes, addr: Address) -> None:
        if addr != self.client.server:
            return  # only the server's datagrams are TURN
        if is_channel_data(data):
            self.channel_data_in += 1
        self.client.receive(data, self.now())

    def _transmit(self) -> None:
        for data, addr in self.client.datagrams_to_send():
            self.sock.sendto(data, addr)
        while (ev := self.client.next_event()) is not None:
            self.events.append(ev)
        self._changed.set()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        when = self.client.get_timer()
        if when is not None:
            self._timer = self.loop.call_at(when - self.skew, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.client.handle_timer(self.now())
        self._transmit()

    def call(self, fn: Callable[[float], object]) -> None:
        """A user call with the current time, then a transmit."""
        fn(self.now())
        self._transmit()

    def send(self, peer: Address, payload: bytes) -> bytes:
        data, addr = self.client.wrap(peer, payload)
        self.sock.sendto(data, addr)
        return data

    async def until(self, done: Callable[[], bool]) -> None:
        async with asyncio.timeout(DEADLINE):
            while not done():
                self._changed.clear()
                await self._changed.wait()

    async def event(self, kind: type[TurnEvent], count: int = 1) -> list[TurnEvent]:
        await self.until(lambda: len(self.of(kind)) >= count)
        return self.of(kind)

    def of(self, kind: type[TurnEvent]) -> list[TurnEvent]:
        return [e for e in self.events if isinstance(e, kind)]

    async def advance(self, until: float) -> None:
        """Jump from timer to timer up to ``until`` on the client's clock,
        waiting at each for the server's answers."""
        for _ in range(1000):
            when = self.client.get_timer()
            if when is None or when > until:
                break
            self.skew += max(0.0, when - self.now())
            self._on_timer()
            await self.until(lambda: self.client.outstanding == 0)
        else:
            raise AssertionError("timers did not settle")

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.sock.close()


class Peer:
    """A plain UDP socket on loopback: the remote side of the relay."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((LOOPBACK, 0))
        self.sock.setblocking(False)
        self.address: Address = self.sock.getsockname()

    async def receive(self) -> tuple[bytes, Address]:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(DEADLINE):
            data, addr = await loop.sock_recvfrom(self.sock, 2048)
        return data, (addr[0], addr[1])

    def close(self) -> None:
        self.sock.close()


def _sessions(log: str, what: str) -> list[tuple[str, str]]:
    """(username, lifetime) of coturn's "new" or "refreshed" lines (-v)."""
    return re.findall(rf"session \d+: {what}, realm=<{REALM}>, username=<([^>]*)>, "
                      r"lifetime=(\d+)", log)


async def test_allocation_permission_channel_and_refresh(coturn: Coturn) -> None:
    username, password = rest_credentials("alice", int(time.time()) + 3600)
    drv = Driver(coturn.address, username, password, ttl=3600)
    peer = Peer()
    try:
        drv.call(drv.client.allocate)
        (allocated,) = await drv.event(Allocated)
        assert isinstance(allocated, Allocated)
        # coturn grants its maximum, not the 3600 s asked for
        assert allocated.lifetime == MAX_LIFETIME
        assert allocated.relayed[0] == LOOPBACK and allocated.relayed != coturn.address
        assert allocated.mapped == drv.sock.address

        drv.call(lambda now: drv.client.permit(peer.address, now))
        assert await drv.event(PermissionCreated) == [PermissionCreated(LOOPBACK)]

        # a Send indication out, a Data indication back
        sent = drv.send(peer.address, b"\xc0 via send")
        assert sent[0] < 4  # STUN-shaped
        assert await peer.receive() == (b"\xc0 via send", allocated.relayed)
        peer.sock.sendto(b"\xc1 via data", allocated.relayed)
        assert await drv.event(DataReceived) == [DataReceived(peer.address, b"\xc1 via data")]
        assert drv.channel_data_in == 0

        # a channel: ChannelData both ways
        number = drv.client.bind_channel(peer.address, drv.now())
        drv.call(lambda now: None)
        assert await drv.event(ChannelBound) == [ChannelBound(peer.address, number)]
        sent = drv.send(peer.address, b"\xc0 via channel")
        assert 64 <= sent[0] <= 79 and int.from_bytes(sent[:2], "big") == number
        assert await peer.receive() == (b"\xc0 via channel", allocated.relayed)
        peer.sock.sendto(b"\xc1 via channel", allocated.relayed)
        await drv.event(DataReceived, 2)
        assert drv.of(DataReceived)[-1] == DataReceived(peer.address, b"\xc1 via channel")
        assert drv.channel_data_in == 1

        # two allocation lifetimes on the client's clock: permission (240 s),
        # channel (540 s) and allocation (840 s) refreshes, answered by coturn
        await drv.advance(drv.now() + 2 * MAX_LIFETIME)
        refreshed = drv.of(AllocationRefreshed)
        assert refreshed == [AllocationRefreshed(MAX_LIFETIME)] * 2
        assert drv.of(PermissionCreated) == [PermissionCreated(LOOPBACK)]  # never lapsed
        assert drv.client.channel(peer.address) == number
        drv.send(peer.address, b"\xc0 still relayed")
        assert await peer.receive() == (b"\xc0 still relayed", allocated.relayed)
        stats = drv.client.statistics()
        assert stats.integrity_failures == 0 and stats.dropped == 0

        drv.call(drv.client.close)
        assert await drv.event(AllocationClosed) == [AllocationClosed()]
    finally:
        drv.close()
        peer.close()
    log = coturn.stop()
    assert _sessions(log, "new") == [(username, str(MAX_LIFETIME))], log
    assert _sessions(log, "refreshed") == [
        (username, str(MAX_LIFETIME)), (username, str(MAX_LIFETIME)), (username, "0")], log
    assert log.count("CREATE_PERMISSION processed, success") >= 1 + 1800 // 240 - 1, log
    assert log.count("CHANNEL_BIND processed, success") == 1 + 3, log


async def test_wrong_or_expired_credentials(coturn: Coturn) -> None:
    username, _ = rest_credentials("alice", int(time.time()) + 3600)
    wrong = Driver(coturn.address, username, "not-the-password", ttl=3600)
    old_user, old_password = rest_credentials("bob", int(time.time()) - 60)
    expired = Driver(coturn.address, old_user, old_password, ttl=3600)
    other_user, other_password = rest_credentials("carol", int(time.time()) + 3600,
                                                  secret="another secret")
    foreign = Driver(coturn.address, other_user, other_password, ttl=3600)
    try:
        for drv in (wrong, expired, foreign):
            drv.call(drv.client.allocate)
            (failed,) = await drv.event(AllocationFailed)
            assert isinstance(failed, AllocationFailed) and failed.code == 401, failed
            assert drv.client.statistics().requests == 2  # asked, then signed once
            assert drv.of(Allocated) == []
    finally:
        for drv in (wrong, expired, foreign):
            drv.close()
    log = coturn.stop()
    assert _sessions(log, "new") == [], log
    assert log.count("error 401") >= 6, log


async def test_new_credentials_on_a_live_allocation(coturn: Coturn) -> None:
    """coturn binds an allocation to the credentials that made it (441 to
    others): the allocation goes on with the first ones, the next one uses
    the new ones."""
    first_user, first_password = rest_credentials("alice", int(time.time()) + 600)
    drv = Driver(coturn.address, first_user, first_password, ttl=600)
    try:
        drv.call(drv.client.allocate)
        await drv.event(Allocated)
        new_user, new_password = rest_credentials("alice", int(time.time()) + 7200)
        drv.call(lambda now: drv.client.update_credentials(new_user, new_password,
                                                           now + 7200, now))
        await drv.until(lambda: drv.client.outstanding == 0)
        # past the first credentials' expiry on the client's clock: no loss
        await drv.advance(drv.now() + 1000)
        assert drv.of(AllocationRefreshed) == [AllocationRefreshed(MAX_LIFETIME)]
        drv.call(drv.client.close)
        await drv.event(AllocationClosed)
        drv.call(drv.client.allocate)
        await drv.event(Allocated, 2)
    finally:
        drv.close()
    log = coturn.stop()
    assert "error 441" in log, log
    assert _sessions(log, "refreshed") == [(first_user, str(MAX_LIFETIME)), (first_user, "0")], log
    assert [u for u, _ in _sessions(log, "new")] == [first_user, new_user], log
