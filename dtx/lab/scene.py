"""Set-up every lab scene shares: vCards, a rendezvous process, lab peers.

Used by the demo, the NAT-lab tests and the bench, so each says once how to
write an account's vCard, start ``python -m rendezvous`` (on a lab host or on
loopback) and make a device whose socket lives in a lab namespace.
"""

from __future__ import annotations

import dataclasses
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any, Protocol

from ..errors import LabError
from ..identity import DeviceIdentity
from ..trust import add_key, new_vcard
from ..wire.address import Address, format_address


RDV_PORT = 3478
"""The port a lab rendezvous listens on."""
READY_TIMEOUT = 20.0
"""How long a server process gets to say it is listening."""


class Runs(Protocol):
    """A place that starts processes: a lab host (``Host.popen``)."""

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[str]: ...


def write_vcards(folder: Path, *identities: DeviceIdentity) -> None:
    """One vCard per account in ``folder``, listing the keys of that
    account's devices among ``identities`` (the trust source of the
    rendezvous and of the devices)."""
    folder.mkdir(parents=True, exist_ok=True)
    cards: dict[str, bytes] = {}
    for ident in identities:
        bare = str(ident.jid.bare)
        cards[bare] = add_key(cards.get(bare) or new_vcard(bare), ident.public_key)
    for bare, card in cards.items():
        (folder / f"{bare}.xml").write_bytes(card)


def server_address(server: Any) -> Address:
    """Where the rendezvous on lab host ``server`` listens."""
    addresses = getattr(server, "addresses", None)
    return (addresses[0] if addresses else server.ip, RDV_PORT)


def rendezvous_argv(listen: Address, vcards: Path | None, *extra: str,
                    alt_address: str | None = None) -> list[str]:
    """The command line of ``python -m rendezvous``."""
    argv = [sys.executable, "-m", "rendezvous", "--listen", format_address(*listen), *extra]
    if vcards is not None:
        argv += ["--vcards", str(vcards)]
    if alt_address is not None:
        argv += ["--alt-address", alt_address]
    return argv


def start_rendezvous(server: Runs | None, vcards: Path | None, *extra: str,
                     listen: Address | None = None,
                     **popen: Any) -> tuple[subprocess.Popen[str], Address]:
    """``python -m rendezvous`` on lab host ``server`` (with its second
    address for RFC 5780 when it has one), or on loopback when ``server``
    is None; returns the process, once it said it is listening, and the
    address it listens on. Its output is drained in a thread so a chatty
    server never blocks on a full pipe. Raises :class:`LabError`."""
    alt = None
    if server is None:
        listen = listen or ("127.0.0.1", 0)
    else:
        listen = listen or server_address(server)
        addresses: list[str] = list(getattr(server, "addresses", None) or [])
        alt = addresses[1] if len(addresses) > 1 else None
    argv = rendezvous_argv(listen, vcards, *extra, alt_address=alt)
    kwargs: dict[str, Any] = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT,
                              "text": True, **popen}
    proc: subprocess.Popen[str] = (subprocess.Popen(argv, **kwargs) if server is None
                                   else server.popen(argv, **kwargs))
    line = wait_line(proc, "listening", "the rendezvous")
    # "rendezvous listening on HOST:PORT ..."
    for word in line.split():
        host, sep, port = word.rpartition(":")
        if sep and port.isdigit() and host:
            return proc, (host.strip("[]"), int(port))
    return proc, listen


def wait_line(proc: subprocess.Popen[str], word: str, what: str,
              timeout: float = READY_TIMEOUT) -> str:
    """Read ``proc``'s output until a line containing ``word`` and return
    it; then keep draining the output in a thread. Raises :class:`LabError`
    (after killing ``proc``) when it exits or says nothing of the kind."""
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=remaining)
        except queue.Empty:
            break
        if line is None:
            break
        seen.append(line)
        if word in line:
            return line
    proc.kill()
    raise LabError(f"{what} did not start: " + "".join(seen)[-2000:])


def _pump(stream: IO[str] | None, lines: queue.Queue[str | None]) -> None:
    if stream is None:
        lines.put(None)
        return
    for line in stream:
        lines.put(line)
    lines.put(None)


def lab_peer_config(base: Any, *, rendezvous: Address | None, host_ip: str) -> Any:
    """``base`` (a :class:`~dtx.aio.peer.PeerConfig`) for a device on a lab
    host: registered at ``rendezvous`` with the host's address as its one
    host candidate, every other option kept."""
    return dataclasses.replace(base, rendezvous=rendezvous, host_addresses=(host_ip,))


__all__ = [
    "RDV_PORT",
    "lab_peer_config",
    "rendezvous_argv",
    "server_address",
    "start_rendezvous",
    "wait_line",
    "write_vcards",
]
