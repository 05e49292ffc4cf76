"""Shared set-up for traversal tests in the NAT lab: a real rendezvous
process on the lab's server host, and in-process devices whose UDP sockets
live inside the lab's namespaces."""

from __future__ import annotations

import asyncio
import queue
import subprocess
import sys
import threading
import time
from typing import IO
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from dtx.aio.peer import Peer, PeerConfig
from dtx.identity import DeviceIdentity, generate_identity
from dtx.lab import Lab
from dtx.lab.topology import Host
from dtx.trust import PinStore, VCardDirectory, Verifier, add_key, new_vcard

RDV_PORT = 3478
READY_TIMEOUT = 20.0


@dataclass
class Device:
    identity: DeviceIdentity
    host: Host


def write_vcards(folder: Path, *identities: DeviceIdentity) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    accounts: dict[str, bytes | None] = {}
    for ident in identities:
        bare = str(ident.jid.bare)
        accounts[bare] = add_key(accounts.get(bare) or new_vcard(bare), ident.public_key)
    for bare, card in accounts.items():
        assert card is not None
        (folder / f"{bare}.xml").write_bytes(card)


def start_rendezvous(server: Host, vcards: Path | None, *extra: str) -> subprocess.Popen[str]:
    """``python -m rendezvous`` on the lab's server host; returns once it
    printed that it is listening."""
    addr = server.addresses[0] if hasattr(server, "addresses") else server.ip
    argv = [sys.executable, "-m", "rendezvous", "--listen", f"{addr}:{RDV_PORT}", *extra]
    if vcards is not None:
        argv += ["--vcards", str(vcards)]
    if len(getattr(server, "addresses", ())) > 1:
        argv += ["--alt-address", server.addresses[1]]
    proc = server.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
    deadline = time.monotonic() + READY_TIMEOUT
    seen: list[str] = []
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=remaining)
        except queue.Empty:
            break
        if line is None:
            break
        seen.append(line)
        if "listening" in line:
            return proc
    proc.kill()
    raise RuntimeError("rendezvous did not start: " + "".join(seen)[-2000:])


def _pump(stream: IO[str] | None, lines: queue.Queue[str | None]) -> None:
    """Read the server's output to the end (so a chatty server never blocks
    on a full pipe), handing each line over."""
    assert stream is not None
    for line in stream:
        lines.put(line)
    lines.put(None)


def server_address(server: Host) -> tuple[str, int]:
    addr = server.addresses[0] if hasattr(server, "addresses") else server.ip
    return (addr, RDV_PORT)


@asynccontextmanager
async def device_peer(
    device: Device,
    vcards: Path,
    rendezvous: tuple[str, int] | None,
    *,
    listen: bool,
    config: PeerConfig | None = None,
) -> AsyncIterator[Peer]:
    """A started Peer whose socket is inside the device's namespace."""
    base = config or PeerConfig()
    cfg = PeerConfig(
        session=base.session,
        idle_timeout=base.idle_timeout,
        connect_timeout=base.connect_timeout,
        rendezvous=rendezvous,
        host_addresses=(device.host.ip,),
        paths=base.paths,
        keepalive_interval=base.keepalive_interval,
    )
    peer = Peer(device.identity, Verifier([VCardDirectory(vcards)], PinStore(None)), config=cfg)
    await peer.start(sock=device.host.udp_socket(), listen=listen)
    try:
        yield peer
    finally:
        await peer.close()


def make_devices(lab: Lab, a_host: Host, b_host: Host) -> tuple[Device, Device]:
    del lab
    return (
        Device(generate_identity("remote@example.org/phone"), a_host),
        Device(generate_identity("tv@example.org/living-room"), b_host),
    )
