"""Shared set-up for traversal tests in the NAT lab: a real rendezvous
process on the lab's server host, and in-process devices whose UDP sockets
live inside the lab's namespaces."""

from __future__ import annotations

import dataclasses
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from dtx.aio.peer import Peer, PeerConfig
from dtx.identity import DeviceIdentity, generate_identity
from dtx.lab import Lab
from dtx.lab import scene
from dtx.lab.scene import RDV_PORT, lab_peer_config, server_address, write_vcards
from dtx.lab.topology import Host
from dtx.trust import PinStore, VCardDirectory, Verifier

__all__ = ["RDV_PORT", "Device", "device_peer", "make_devices", "rendezvous_scene",
           "server_address", "start_rendezvous", "write_vcards"]


@dataclass
class Device:
    identity: DeviceIdentity
    host: Host


def start_rendezvous(server: Host, vcards: Path | None, *extra: str) -> subprocess.Popen[str]:
    """``python -m rendezvous`` on the lab's server host; returns once it
    printed that it is listening."""
    proc, _ = scene.start_rendezvous(server, vcards, *extra)
    return proc


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
    cfg = lab_peer_config(config or PeerConfig(), rendezvous=rendezvous,
                          host_ip=device.host.ip)
    if cfg.side_sockets is None:  # a birthday search's sockets, in the device's namespace
        cfg = dataclasses.replace(cfg, side_sockets=device.host.udp_socket)
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


def rendezvous_scene(lab: Lab, server: Host, a_host: Host, b_host: Host, folder: Path,
                     *extra: str) -> tuple[Device, Device, Path, tuple[str, int]]:
    """The remote on ``a_host``, the TV on ``b_host``, their vCards in
    ``folder``, a rendezvous (given ``extra`` arguments) on ``server``:
    (remote, TV, vCard folder, rendezvous address)."""
    a, b = make_devices(lab, a_host, b_host)
    vcards = folder / "vcards"
    write_vcards(vcards, a.identity, b.identity)
    start_rendezvous(server, vcards, *extra)
    return a, b, vcards, server_address(server)
