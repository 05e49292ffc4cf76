"""A throwaway DNS server for the NAT lab: dnsmasq answering for test domains only.

Federated XMPP servers find each other by DNS (RFC 6120 3.2: the
``_xmpp-server._tcp`` SRV record, then the target's A record). In the lab,
:func:`start_dnsmasq` runs dnsmasq on one host, answering for the domains
it is given and for nothing else: A and SRV records for each domain, an
empty answer or NXDOMAIN for every other name in them, and no forwarding
anywhere (``--no-resolv``, ``--no-hosts``), so no query ever leaves the
lab nor reaches this machine's resolvers. A lab Prosody is pointed at it
with :class:`~dtx.lab.prosody.Federation` (``nameserver=``).

:func:`answer_count` asks a question from a lab socket (so a test can
check that a server host resolves what it needs); :func:`encode_query` is
the query it sends (RFC 1035 4.1).
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

from dtx.errors import LabError

if TYPE_CHECKING:
    from dtx.lab.topology import Host

__all__ = ["DNS_PORT", "TYPE_A", "TYPE_SRV", "answer_count", "dnsmasq_missing",
           "encode_query", "start_dnsmasq"]

DNS_PORT = 53
TYPE_A = 1
TYPE_SRV = 33
START_TIMEOUT = 5.0
"""How long :func:`start_dnsmasq` waits for dnsmasq's first answer."""
_RETRY_INTERVAL = 0.2
_HEADER = struct.Struct("!HHHHHH")


def dnsmasq_missing() -> str | None:
    """Why dnsmasq cannot be used here, or None when it can."""
    if shutil.which("dnsmasq") is None and not os.path.exists("/usr/sbin/dnsmasq"):
        return "needs dnsmasq (Debian package dnsmasq-base): run scripts/setup as root"
    return None


def encode_query(name: str, qtype: int, qid: int) -> bytes:
    """A DNS query for ``name`` (RFC 1035 4.1), recursion desired, class IN."""
    labels = b"".join(bytes([len(p)]) + p.encode("ascii") for p in name.split("."))
    return _HEADER.pack(qid, 0x0100, 1, 0, 0, 0) + labels + b"\0" + struct.pack("!HH", qtype, 1)


def answer_count(sock: socket.socket, server: tuple[str, int], name: str, qtype: int,
                 *, timeout: float = START_TIMEOUT) -> int:
    """How many answers ``server`` gives for ``name`` (asked again every
    0.2 s, for ``timeout`` at most). Raises :class:`~dtx.errors.LabError`
    on an error answer (NXDOMAIN, REFUSED...) or none at all."""
    sock.settimeout(_RETRY_INTERVAL)
    for qid in range(1, max(1, round(timeout / _RETRY_INTERVAL)) + 1):
        sock.sendto(encode_query(name, qtype, qid), server)
        try:
            data, _ = sock.recvfrom(4096)
        except TimeoutError:
            continue
        if len(data) < _HEADER.size:
            continue
        got_id, flags, _, count, _, _ = _HEADER.unpack_from(data)
        if got_id != qid:
            continue
        if flags & 0x000F:
            raise LabError(f"DNS {server[0]} answers {name} with rcode {flags & 0xF}")
        return int(count)
    raise LabError(f"no DNS answer from {server[0]} for {name} within {timeout} s")


def start_dnsmasq(host: Host, zone: dict[str, str], folder: Path) -> Path:
    """dnsmasq on ``host`` (port 53 of its address; the lab stops it at
    teardown) answering for the domains of ``zone`` (domain -> server
    address) only: A for the domain and ``xmpp.<domain>``, SRV for
    ``_xmpp-client._tcp`` (port 5222) and ``_xmpp-server._tcp`` (5269).
    Returns the path of its log (``--log-queries``: every question, with
    who asked), once it answers; :class:`~dtx.errors.LabError` if it does
    not within :data:`START_TIMEOUT`."""
    if not zone:
        raise LabError("dnsmasq needs at least one domain to answer for")
    folder.mkdir(parents=True)
    log = folder / "dnsmasq.log"
    argv = ["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv",
            "--no-hosts", "--bind-interfaces", f"--listen-address={host.ip}",
            f"--port={DNS_PORT}", "--user=root", f"--pid-file={folder / 'dnsmasq.pid'}",
            f"--log-facility={log}", "--log-queries"]
    for domain, address in zone.items():
        argv += [f"--local=/{domain}/", f"--host-record={domain},{address}",
                 f"--host-record=xmpp.{domain},{address}",
                 f"--srv-host=_xmpp-client._tcp.{domain},xmpp.{domain},5222,0,5",
                 f"--srv-host=_xmpp-server._tcp.{domain},xmpp.{domain},5269,0,5"]
    proc = host.popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                      stderr=subprocess.DEVNULL)
    with host.udp_socket() as sock:
        try:
            answer_count(sock, (host.ip, DNS_PORT), next(iter(zone)), TYPE_A)
        except LabError as exc:
            why = "exited" if proc.poll() is not None else "did not answer"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else "(no log)"
            raise LabError(f"dnsmasq {why}: {exc}; log:\n{tail}") from None
    return log
