"""One UDP socket of the rendezvous server on the event loop.

:class:`ServerSocket` hands each datagram straight to the core's
``receive_datagram`` and calls ``on_batch_end`` once per batch, so the
server transmits, and looks at its timer, once per batch, not per
datagram. Two ways of reading, the same to the layers above:

* where the loop has ``add_reader`` (the selector loops, uvloop): the
  socket is non-blocking and each wake-up reads every waiting datagram,
  up to ``batch``, with the loop's clock read once for all of them, and
  the sender's address passed on as the socket reports it (the core
  rebuilds only what is not plain IPv4);
* elsewhere (the proactor loop on Windows): asyncio's
  :class:`~asyncio.DatagramProtocol`, one datagram per call, the batch
  ending on the next loop turn.

Sends go straight to the socket; a failure (a full buffer, an unroutable
address) is counted in ``send_errors``, never raised. Nothing is logged
per datagram (at DEBUG, a failed read or send).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any, cast

from dtx.aio.socket import UdpSocket
from dtx.wire.address import Address

__all__ = ["ServerSocket", "TransportSocket", "open_server_socket"]

DEFAULT_BATCH = 256

Receive = Callable[[bytes, Address, Address, float], None]
"""``receive_datagram(data, src, local, now)`` of the core."""


class ServerSocket(UdpSocket):
    """A bound UDP socket serving the core on a loop with ``add_reader``.

    The device's :class:`~dtx.aio.socket.UdpSocket` (its sends, counters,
    buffer sizes, closing and batch reads), delivering differently: the
    device's hands ``(data, (host, port))`` to a callback; this one calls
    the core with the address as the socket reports it and one
    ``loop.time()`` for the whole batch.
    """

    def __init__(self, sock: socket.socket, local: Address, receive: Receive,
                 on_batch_end: Callable[[], None], *, batch: int = DEFAULT_BATCH) -> None:
        self._local = local
        self._receive = receive
        super().__init__(sock, self._unused, on_batch_end, batch=batch)

    @staticmethod
    def _unused(data: bytes, addr: Address) -> None:  # pragma: no cover - never called
        raise AssertionError("ServerSocket delivers in _read_ready")

    def _read_ready(self) -> None:
        receive, local, now = self._receive, self._local, self._loop.time()
        self._read_batch(lambda data, addr: receive(data, addr, local, now))


class TransportSocket(asyncio.DatagramProtocol):
    """The same on a loop without ``add_reader`` (the proactor loop on
    Windows): asyncio's datagram transport, one datagram per call, the
    batch ending on the next loop turn."""

    def __init__(self, local: Address, receive: Receive,
                 on_batch_end: Callable[[], None]) -> None:
        self._local = local
        self._receive = receive
        self._on_batch_end = on_batch_end
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.DatagramTransport | None = None
        self._flush_scheduled = False
        self.sent = 0
        self.received = 0
        self.send_errors = 0
        self.receive_errors = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, ...]) -> None:
        self.received += 1
        self._receive(data, (str(addr[0]), int(addr[1])), self._local, self._loop.time())
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def error_received(self, exc: Exception) -> None:
        self.receive_errors += 1

    def _flush(self) -> None:
        self._flush_scheduled = False
        self._on_batch_end()

    def sendto(self, data: bytes, addr: Address) -> None:
        if self._transport is None or self._transport.is_closing():
            return
        self._transport.sendto(data, addr)  # failures come to error_received
        self.sent += 1

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


async def open_server_socket(sock: socket.socket, local: Address, receive: Receive,
                             on_batch_end: Callable[[], None]) -> ServerSocket | TransportSocket:
    """Serve the bound ``sock`` (``local`` its address): by a reader where
    the running loop has one, else by a datagram transport."""
    try:
        return ServerSocket(sock, local, receive, on_batch_end)
    except NotImplementedError:
        sock.setblocking(False)
        server_sock = TransportSocket(local, receive, on_batch_end)
        await asyncio.get_running_loop().create_datagram_endpoint(lambda: server_sock, sock=sock)
        return server_sock
