"""asyncio driver of the rendezvous core.

Binds the primary UDP socket and, for RFC 5780 when an alternate IP is
given, three more (primary IP port+1, alternate IP port, alternate IP
port+1) that serve STUN only; and the mapping port of the NAT mapping
check (docs/protocol.md 7.7), by default primary IP port+1: with an
alternate IP that is the RFC 5780 socket already bound there, without one
a socket of its own. Each is a :class:`~rendezvous.udp.ServerSocket`: it
reads every waiting datagram per wake-up (up to a batch) and hands each
straight to :class:`~rendezvous.core.RendezvousCore`; at the end of the
batch the server transmits once — whatever the core queued, from the
socket it names — and re-arms its one timer only if the core's next
deadline moved, as aioquic's ``QuicConnectionProtocol.transmit`` does.
Replies to a batch thus go out together, and a send that fails (a full
buffer, an unroutable address) is counted, never raised.

The key source is a folder of vCards, read synchronously (files are
cached by inode, size and mtime), or an asynchronous lookup (live vCards
over XMPP, :mod:`rendezvous.xmpp`): then the core runs with ``keys=None``,
and each ``VerificationNeeded`` event it emits is answered here, when the
lookup finishes, with ``complete_verification``.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import os
import random
import socket
from collections.abc import Awaitable, Callable

from dtx.trust import StaticKeys, VCardDirectory
from dtx.trust.store import KeySource
from dtx.wire.address import format_address
from dtx.wire.stun import Address
from rendezvous.core import RendezvousConfig, RendezvousCore
from rendezvous.stun import ServerAddresses
from rendezvous.udp import ServerSocket, TransportSocket, open_server_socket

__all__ = ["BindError", "KeyLookup", "Server", "serve"]

KeyLookup = Callable[[str], Awaitable[frozenset[bytes] | None]]
"""An account's keys (bare JID in), or None when the account is unknown."""

logger = logging.getLogger(__name__)

_BIND_TRIES = 20


class BindError(OSError):
    """A socket of the server could not be bound: the bind's ``errno`` and
    ``strerror``, and ``address``, the local address it was for."""

    def __init__(self, exc: OSError, address: Address) -> None:
        super().__init__(exc.errno, exc.strerror or str(exc))
        self.address = address


class Server:
    """A running rendezvous server; build it with :func:`serve`."""

    def __init__(self, core: RendezvousCore, addresses: ServerAddresses,
                 key_lookup: KeyLookup | None = None) -> None:
        self.core = core
        self.addresses = addresses
        self._key_lookup = key_lookup
        self._lookups: set[asyncio.Task[None]] = set()
        self._loop = asyncio.get_running_loop()
        self._sockets: dict[Address, ServerSocket | TransportSocket] = {}
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

    async def _attach(self, local: Address, sock: socket.socket) -> None:
        """Serve ``sock``, bound to ``local``: its datagrams go to the core,
        and the end of each batch read from it transmits."""
        self._sockets[local] = await open_server_socket(
            sock, local, self.core.receive_datagram, self._transmit)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self.core.handle_timer(self._loop.time())
        self._transmit()

    def _transmit(self) -> None:
        if self._closed.is_set():
            return
        core = self.core
        while (event := core.next_event()) is not None:
            self._start_lookup(event.token, event.bare_jid)
        sockets = self._sockets
        last_from: Address | None = None
        sock: ServerSocket | TransportSocket | None = None
        for data, send_to, send_from in core.datagrams_to_send():
            if send_from != last_from:  # nearly always the primary: one lookup per batch
                last_from, sock = send_from, sockets.get(send_from)
            if sock is None:
                logger.debug("no socket for %s; dropping", send_from)
                continue
            sock.sendto(data, send_to)  # counts a failure in send_errors
        when = core.get_timer()
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
    buffer sizes and non-blocking mode are :class:`ServerSocket`'s. Raises
    :class:`BindError`."""
    sock = socket.socket(_family(addr[0]), socket.SOCK_DGRAM)
    try:
        if sock.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise BindError(exc, addr) from exc
    return sock


def _addresses(primary: Address, alt_ip: str | None,
               mapping_port: bool | int) -> ServerAddresses:
    """The addresses to bind once the primary port is known (see
    :func:`serve` for ``mapping_port``)."""
    port = primary[1]
    if port == 0xFFFF and (alt_ip is not None or mapping_port is True):
        raise _bind_error(errno.EADDRNOTAVAIL, primary)  # no port + 1
    alt_port = None if alt_ip is None else port + 1
    mapping: int | None
    if mapping_port is True:
        mapping = port + 1
    elif mapping_port is False:
        mapping = None
    else:
        mapping = mapping_port
    if mapping == port:  # only when the kernel picked the mapping port for the primary
        raise _bind_error(errno.EADDRINUSE, primary)
    return ServerAddresses(primary, alt_ip, alt_port, mapping)


def _bind_error(code: int, addr: Address) -> BindError:
    return BindError(OSError(code, os.strerror(code)), addr)


def _bind_all(
    listen: Address, alt_ip: str | None, mapping_port: bool | int
) -> tuple[ServerAddresses, list[socket.socket]]:
    """Bind the primary socket, with ``alt_ip`` the three RFC 5780 ones,
    and the mapping port's unless one of those is it.

    With port 0 the kernel picks the primary port; port + 1 (or the
    mapping port asked for) must then be free too, so a few ports are
    tried.
    """
    extra = alt_ip is not None or mapping_port is not False
    tries = _BIND_TRIES if listen[1] == 0 and extra else 1
    last: OSError | None = None
    for _ in range(tries):
        socks: list[socket.socket] = []
        try:
            primary_sock = _bind(listen)
            socks.append(primary_sock)
            primary = (listen[0], int(primary_sock.getsockname()[1]))
            if mapping_port == 0 and not isinstance(mapping_port, bool):
                # any free port (never with alt_ip): the kernel's pick names it
                mapping_sock = _bind((listen[0], 0))
                socks.append(mapping_sock)
                return ServerAddresses(primary,
                                       mapping_port=int(mapping_sock.getsockname()[1])), socks
            addresses = _addresses(primary, alt_ip, mapping_port)
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
    mapping_port: bool | int = True,
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

    ``mapping_port`` is the port of the NAT mapping check on the primary
    IP: True (the default) for the primary port + 1, False for none, or a
    port number (0: any free one; not the primary port; not with
    ``alt_ip``: with one, the mapping port is the RFC 5780 alternate port,
    port + 1).
    Raises :class:`BindError` when a socket cannot be bound, and
    ValueError for a ``mapping_port`` that cannot be (or a primary port
    65535 that leaves no port + 1).
    """
    if not isinstance(mapping_port, bool) and (
        alt_ip is not None or not 0 <= mapping_port <= 0xFFFF
        or (mapping_port != 0 and mapping_port == listen[1])
    ):
        raise ValueError(f"mapping_port {mapping_port}: a port 0-65535 other than the "
                         "primary's, and not with alt_ip")
    if listen[1] == 0xFFFF and (alt_ip is not None or mapping_port is True):
        raise ValueError("the primary port 65535 leaves no port + 1")
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
    addresses, socks = _bind_all(listen, alt_ip, mapping_port)
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
            await server._attach(local, sock)
    except BaseException:
        server.close()
        for sock in socks:
            sock.close()
        raise
    logger.info("rendezvous serving on %s; mapping port %s",
                ", ".join(format_address(h, p) for h, p in addresses.sockets()),
                addresses.mapping_port or "none")
    return server
