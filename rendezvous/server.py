"""asyncio driver of the rendezvous core.

Binds the primary UDP socket and, for RFC 5780 when an alternate IP is
given, three more (primary IP port+1, alternate IP port, alternate IP
port+1) that serve STUN only. Each is a :class:`~dtx.aio.socket.UdpSocket`,
the device's wrapper: it reads up to a batch of datagrams per wake-up and
hands each to :class:`~rendezvous.core.RendezvousCore`; at the end of the
batch the server transmits once — whatever the core queued, from the
socket it names — and re-arms its one timer, as aioquic's
``QuicConnectionProtocol.transmit`` does. Replies to a batch thus go out
together, and a send that fails (a full buffer, an unroutable address) is
counted, never raised.

The key source is a folder of vCards, read synchronously (files are
cached by inode, size and mtime), or an asynchronous lookup (live vCards
over XMPP, :mod:`rendezvous.xmpp`): then the core runs with ``keys=None``,
and each ``VerificationNeeded`` event it emits is answered here, when the
lookup finishes, with ``complete_verification``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import random
import socket
from collections.abc import Awaitable, Callable

from dtx.aio.socket import UdpSocket
from dtx.trust import StaticKeys, VCardDirectory
from dtx.trust.store import KeySource
from dtx.wire.stun import Address
from rendezvous.core import RendezvousConfig, RendezvousCore
from rendezvous.stun import ServerAddresses

__all__ = ["KeyLookup", "Server", "serve"]

KeyLookup = Callable[[str], Awaitable[frozenset[bytes] | None]]
"""An account's keys (bare JID in), or None when the account is unknown."""

logger = logging.getLogger(__name__)

_BIND_TRIES = 20


class Server:
    """A running rendezvous server; build it with :func:`serve`."""

    def __init__(self, core: RendezvousCore, addresses: ServerAddresses,
                 key_lookup: KeyLookup | None = None) -> None:
        self.core = core
        self.addresses = addresses
        self._key_lookup = key_lookup
        self._lookups: set[asyncio.Task[None]] = set()
        self._loop = asyncio.get_running_loop()
        self._sockets: dict[Address, UdpSocket] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._closed = asyncio.Event()

    @property
    def address(self) -> Address:
        """The primary (IP, port) actually bound."""
        return self.addresses.primary

    def statistics(self) -> dict[str, int]:
        """The core's counters plus the driver's: ``socket_errors``, the
        sends and reads that failed, over every socket."""
        stats = self.core.statistics()
        stats["socket_errors"] = sum(sock.send_errors + sock.receive_errors
                                     for sock in self._sockets.values())
        return stats

    def close(self) -> None:
        """Stop serving; idempotent."""
        if self._closed.is_set():
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for task in self._lookups:
            task.cancel()
        for sock in self._sockets.values():
            sock.close()
        self._closed.set()
        logger.info("rendezvous closed: %s", self.statistics())

    async def wait_closed(self) -> None:
        await self._closed.wait()

    # -- driver -------------------------------------------------------------

    def _attach(self, local: Address, sock: socket.socket) -> None:
        """Serve ``sock``, bound to ``local``: its datagrams go to the core,
        and the end of each batch read from it transmits."""
        core, loop = self.core, self._loop

        def received(data: bytes, src: Address) -> None:
            core.receive_datagram(data, src, local, loop.time())

        self._sockets[local] = UdpSocket(sock, received, self._transmit)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self.core.handle_timer(self._loop.time())
        self._transmit()

    def _transmit(self) -> None:
        if self._closed.is_set():
            return
        while (event := self.core.next_event()) is not None:
            self._start_lookup(event.token, event.bare_jid)
        for data, send_to, send_from in self.core.datagrams_to_send():
            sock = self._sockets.get(send_from)
            if sock is None:
                logger.debug("no socket for %s; dropping", send_from)
                continue
            sock.sendto(data, send_to)  # counts a failure in send_errors
        when = self.core.get_timer()
        if when != self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = None if when is None else self._loop.call_at(when, self._on_timer)
            self._timer_at = when

    def _start_lookup(self, token: int, bare_jid: str) -> None:
        if self._key_lookup is None:
            self.core.complete_verification(token, None, self._loop.time())
            return
        lookup = self._key_lookup

        async def run() -> None:
            try:
                keys = await lookup(bare_jid)
            except Exception as exc:  # noqa: BLE001 - a lookup must not kill the server
                logger.warning("key lookup for %s failed: %s", bare_jid, exc)
                keys = None
            if not self._closed.is_set():
                self.core.complete_verification(token, keys, self._loop.time())
                self._transmit()

        task = self._loop.create_task(run())
        self._lookups.add(task)
        task.add_done_callback(self._lookups.discard)


def _family(host: str) -> socket.AddressFamily:
    try:
        return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return socket.AF_INET


def _bind(addr: Address) -> socket.socket:
    """A UDP socket bound to ``addr`` (an IPv6 one for IPv6 only); the
    buffer sizes and non-blocking mode are :class:`UdpSocket`'s."""
    sock = socket.socket(_family(addr[0]), socket.SOCK_DGRAM)
    try:
        if sock.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(addr)
    except OSError:
        sock.close()
        raise
    return sock


def _bind_all(listen: Address, alt_ip: str | None) -> tuple[ServerAddresses, list[socket.socket]]:
    """Bind the primary socket and, with ``alt_ip``, the three RFC 5780 ones.

    With port 0 the kernel picks the primary port; port+1 must then be free
    on both IPs too, so a few ports are tried.
    """
    tries = _BIND_TRIES if listen[1] == 0 and alt_ip is not None else 1
    last: OSError | None = None
    for _ in range(tries):
        socks: list[socket.socket] = []
        try:
            primary_sock = _bind(listen)
            socks.append(primary_sock)
            port = int(primary_sock.getsockname()[1])
            if alt_ip is None:
                return ServerAddresses((listen[0], port)), socks
            addresses = ServerAddresses((listen[0], port), alt_ip, port + 1)
            for addr in addresses.sockets()[1:]:
                socks.append(_bind(addr))
            return addresses, socks
        except OSError as exc:
            last = exc
            for sock in socks:
                sock.close()
    raise last if last is not None else OSError("could not bind")


async def serve(
    listen: Address,
    *,
    alt_ip: str | None = None,
    vcards: str | os.PathLike[str] | None,
    config: RendezvousConfig | None = None,
    keys: KeySource | None = None,
    key_lookup: KeyLookup | None = None,
) -> Server:
    """Bind and start serving; returns once every socket is bound.

    ``vcards`` names the folder of account vCards (``<bare JID>.xml``);
    ``keys`` may be given instead (tests, embedding), or ``key_lookup``, an
    asynchronous lookup (live vCards over XMPP). With none, every
    registration is refused and only STUN is useful.
    """
    source: KeySource | None
    if key_lookup is not None:
        source = None
    elif keys is not None:
        source = keys
    elif vcards is not None:
        source = VCardDirectory(vcards)
    else:
        logger.warning("no vCard folder: every registration will be refused")
        source = StaticKeys({})
    addresses, socks = _bind_all(listen, alt_ip)
    core = RendezvousCore(
        keys=source,
        addresses=addresses,
        config=config or RendezvousConfig(),
        secret=os.urandom(32),
        rng=random.SystemRandom(),
    )
    server = Server(core, addresses, key_lookup)
    try:
        for local, sock in zip(addresses.sockets(), socks):
            server._attach(local, sock)
    except BaseException:
        server.close()
        for sock in socks:
            sock.close()
        raise
    logger.info("rendezvous serving on %s", ", ".join(f"{h}:{p}" for h, p in addresses.sockets()))
    return server
