"""A UDP probe responder and the client side that classifies a NAT by probes.

The responder listens on every (address, port) pair of a server host and
answers a request ``dtxprobe <token> <via>`` with ``dtxprobe <token> <ip>:<port>
<via>`` giving the source it observed. ``via`` chooses the socket the answer
leaves from: ``same`` (the one asked), ``alt-addr`` (the second address, same
port), ``alt-port`` (same address, second port) or ``count`` (no answer; the
packet is only counted). Every ``alt-*`` answer is followed by a ``done``
answer from the socket asked, so a client knows an ``alt-*`` answer that
has not arrived by then never will (the lab's links keep order).
"""

from __future__ import annotations

import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from dtx.lab.nat import Filtering, Mapping

logger = logging.getLogger(__name__)

MAGIC = b"dtxprobe"
VIAS = ("same", "alt-addr", "alt-port", "count")


class ProbeResponder:
    """Answers probes on ``sockets[(address_index, port_index)]`` from a thread."""

    def __init__(self, sockets: dict[tuple[int, int], socket.socket]) -> None:
        self.sockets = sockets
        self.received = 0
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._serve, name="probe-responder", daemon=True)

    @staticmethod
    def open_on(host: "HostLike", port: int = 3478, alt_port: int = 3479) -> ProbeResponder:
        """A responder bound on every address of ``host`` at two ports."""
        socks = {}
        for addr_i, addr in enumerate(host.addresses[:2]):
            for port_i, p in enumerate((port, alt_port)):
                socks[(addr_i, port_i)] = host.udp_socket(p, addr)
        return ProbeResponder(socks)

    def __enter__(self) -> ProbeResponder:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop the serving thread (bounded wait)."""
        os.write(self._wake_w, b"x")
        self._thread.join(timeout=5)
        os.close(self._wake_r)
        os.close(self._wake_w)

    def send_from(self, index: tuple[int, int], data: bytes, dest: tuple[str, int]) -> None:
        """Send ``data`` from one of the responder's sockets (unsolicited)."""
        self.sockets[index].sendto(data, dest)

    def _serve(self) -> None:
        by_fd = {s.fileno(): (key, s) for key, s in self.sockets.items()}
        while True:
            readable, _, _ = select.select([self._wake_r, *by_fd], [], [])
            if self._wake_r in readable:
                return
            for fd in readable:
                key, sock = by_fd[fd]
                try:
                    data, src = sock.recvfrom(2048)
                except OSError:
                    continue
                self._answer(key, data, src)

    def _answer(self, key: tuple[int, int], data: bytes, src: tuple[str, int]) -> None:
        parts = data.split()
        if len(parts) != 3 or parts[0] != MAGIC or parts[2].decode(errors="replace") not in VIAS:
            return
        self.received += 1
        token, via = parts[1], parts[2].decode()
        observed = f"{src[0]}:{src[1]}".encode()
        if via == "count":
            return
        addr_i, port_i = key
        if via != "same":
            alt = (1 - addr_i, port_i) if via == "alt-addr" else (addr_i, 1 - port_i)
            if alt in self.sockets:
                self.sockets[alt].sendto(b" ".join([MAGIC, token, observed, via.encode()]), src)
            via = "done"
        self.sockets[key].sendto(b" ".join([MAGIC, token, observed, via.encode()]), src)


class HostLike(Protocol):
    """What :meth:`ProbeResponder.open_on` needs of a lab host."""

    addresses: list[str]

    def udp_socket(self, bind_port: int = 0, bind_ip: str = "0.0.0.0") -> socket.socket: ...


@dataclass(frozen=True)
class Reply:
    """One answer: who sent it and the source the server observed."""

    sender: tuple[str, int]
    observed: tuple[str, int]
    via: str


def request(sock: socket.socket, server: tuple[str, int], via: str, *,
            timeout: float = 2.0, tries: int = 3) -> list[Reply]:
    """Send one probe and collect the answers up to the final one (``same``
    or ``done``); resends up to ``tries`` times. Empty when nothing came."""
    for attempt in range(tries):
        token = os.urandom(4).hex().encode()
        sock.sendto(b" ".join([MAGIC, token, via.encode()]), server)
        replies: list[Reply] = []
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                data, sender = sock.recvfrom(2048)
            except (socket.timeout, BlockingIOError):
                break
            parts = data.split()
            if len(parts) != 4 or parts[0] != MAGIC or parts[1] != token:
                continue
            ip, _, port = parts[2].decode().rpartition(":")
            replies.append(Reply(sender, (ip, int(port)), parts[3].decode()))
            if parts[3] in (b"same", b"done"):
                return replies
        logger.debug("probe %s to %s: no final answer (try %d)", via, server, attempt + 1)
    return []


@dataclass(frozen=True)
class NatObservation:
    """What probes showed about the NAT in front of a socket."""

    mapping: Mapping
    filtering: Filtering
    observed: tuple[tuple[str, int], ...]   # towards (A1,P), (A2,P), (A1,P2)


def classify(new_socket: Callable[[], socket.socket], addresses: tuple[str, str],
             port: int, alt_port: int, *, timeout: float = 2.0) -> NatObservation:
    """Measure mapping and filtering (RFC 5780 style) with two fresh sockets
    made by ``new_socket``: one for mapping, one that only ever talks to the
    primary address and port, for filtering."""
    a1, a2 = addresses
    s = new_socket()
    observed = []
    for dest in ((a1, port), (a2, port), (a1, alt_port)):
        replies = request(s, dest, "same", timeout=timeout)
        if not replies:
            raise TimeoutError(f"no answer from {dest}")
        observed.append(replies[-1].observed)
    if observed[0] == observed[1]:
        mapping = Mapping.ENDPOINT_INDEPENDENT
    elif observed[0] == observed[2]:
        mapping = Mapping.ADDRESS_DEPENDENT
    else:
        mapping = Mapping.ADDRESS_AND_PORT_DEPENDENT
    f = new_socket()
    if not request(f, (a1, port), "same", timeout=timeout):
        raise TimeoutError(f"no answer from {(a1, port)}")
    by_addr = request(f, (a1, port), "alt-addr", timeout=timeout)
    by_port = request(f, (a1, port), "alt-port", timeout=timeout)
    if not by_addr or not by_port:
        raise TimeoutError("filtering probes got no final answer")
    if any(r.via == "alt-addr" and r.sender == (a2, port) for r in by_addr):
        filtering = Filtering.ENDPOINT_INDEPENDENT
    elif any(r.via == "alt-port" and r.sender == (a1, alt_port) for r in by_port):
        filtering = Filtering.ADDRESS_DEPENDENT
    else:
        filtering = Filtering.ADDRESS_AND_PORT_DEPENDENT
    return NatObservation(mapping, filtering, tuple(observed))
