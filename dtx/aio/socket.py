"""A UDP socket on the event loop, read in batches: the one wrapper the
device (:class:`~dtx.aio.peer.Peer`), the rendezvous server and
``nat-check`` share.

asyncio's datagram transport reads one datagram per event-loop iteration;
at tens of thousands of packets per second the loop's own overhead then
dominates. :class:`UdpSocket` registers a reader and drains up to
``batch`` datagrams per wake-up, then calls ``on_batch_end`` once, so the
layers above can coalesce their answers (ACKs, acknowledgements) into one
transmission per batch.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable
from typing import Any
from ..wire.address import Address

logger = logging.getLogger(__name__)


MAX_DATAGRAM_BYTES = 65535
DEFAULT_BATCH = 128
SOCKET_BUFFER_BYTES = 4 * 1024 * 1024


class UdpSocket:
    """A non-blocking UDP socket driven by the event loop's reader callback."""

    def __init__(
        self,
        sock: socket.socket,
        on_datagram: Callable[[bytes, Address], None],
        on_batch_end: Callable[[], None],
        *,
        batch: int = DEFAULT_BATCH,
    ) -> None:
        sock.setblocking(False)
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER_BYTES)
            except OSError:  # pragma: no cover - capped by the kernel
                pass
        self._sock = sock
        self._on_datagram = on_datagram
        self._on_batch_end = on_batch_end
        self._batch = batch
        self._loop = asyncio.get_running_loop()
        self._closed = False
        self.sent = 0
        """Datagrams handed to the kernel."""
        self.received = 0
        """Datagrams read."""
        self.send_errors = 0
        self.receive_errors = 0
        """Failed reads: an ICMP error reported on the socket (port
        unreachable for something sent earlier), or another ``recvfrom``
        error. Counted only; reading goes on."""
        self._loop.add_reader(sock.fileno(), self._read_ready)

    @classmethod
    def bind(
        cls,
        host: str,
        port: int,
        on_datagram: Callable[[bytes, Address], None],
        on_batch_end: Callable[[], None],
    ) -> UdpSocket:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.bind((host, port))
        except OSError:
            sock.close()
            raise
        return cls(sock, on_datagram, on_batch_end)

    @property
    def address(self) -> Address:
        name = self._sock.getsockname()
        return (name[0], name[1])

    @property
    def family(self) -> int:
        return self._sock.family

    def sendto(self, data: bytes, addr: Address) -> None:
        """Send one datagram; a full buffer or an unreachable address drops it
        (UDP semantics: QUIC and the probes retransmit)."""
        if self._closed:
            return
        try:
            self._sock.sendto(data, addr)
            self.sent += 1
        except (BlockingIOError, InterruptedError):
            self.send_errors += 1
        except OSError as exc:
            self.send_errors += 1
            if exc.errno not in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ECONNREFUSED,
                                 errno.EPERM, errno.EINVAL, errno.EAFNOSUPPORT):
                logger.warning("sendto %s failed: %s", addr, exc)
            else:
                logger.debug("sendto %s failed: %s", addr, exc)

    def _read_ready(self) -> None:
        handler = self._on_datagram
        self._read_batch(lambda data, addr: handler(data, (addr[0], addr[1])))

    def _read_batch(self, deliver: Callable[[bytes, Any], None]) -> None:
        """Read up to ``batch`` waiting datagrams, handing each to ``deliver``
        with the address as the socket reports it, then end the batch."""
        recvfrom = self._sock.recvfrom
        read = 0
        try:
            for _ in range(self._batch):
                try:
                    data, addr = recvfrom(MAX_DATAGRAM_BYTES)
                except (BlockingIOError, InterruptedError):
                    break
                except ConnectionRefusedError:
                    # An ICMP port unreachable for something we sent earlier.
                    self.receive_errors += 1
                    continue
                except OSError as exc:
                    self.receive_errors += 1
                    logger.debug("recvfrom failed: %s", exc)
                    break
                read += 1
                deliver(data, addr)
        finally:
            self.received += read
            self._on_batch_end()

    def detach(self) -> socket.socket:
        """Stop reading and hand the socket back, open (a borrowed socket)."""
        if not self._closed:
            self._closed = True
            self._loop.remove_reader(self._sock.fileno())
        return self._sock

    def close(self) -> None:
        if not self._closed:
            self.detach()
            self._sock.close()
