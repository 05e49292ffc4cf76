"""``connect(timeout=T)`` is one deadline for the whole call: the LAN try,
the registration, the introduction and the handshake share it.

A TV registers, then its home drops everything (its public address is cut
off from the server and from the remote's home, as a router that hangs
would). ``dtx send --lan --rendezvous --timeout 3`` looks on the LAN (no
answer), is introduced (the rendezvous still holds the TV's registration),
and knocks on the relay and on the TV's addresses (nothing comes back). It
must give up with exit code 4 within 3.5 s of starting to connect, not
after 1.5 s of LAN plus 3 s of introduction plus 3 s of handshake.
"""

from __future__ import annotations

import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dtx.identity import generate_identity, save_identity
from dtx.lab import STANDARD_WAN, Lab

from .test_lan import JsonLines
from .traversal_helpers import server_address, start_rendezvous, write_vcards

pytestmark = pytest.mark.netns

TV = "tv@example.org/living-room"
REMOTE = "remote@example.org/phone"
BUDGET = 3.0
SLACK = 0.5
"""What the issue allows beyond the deadline: closing the peer and leaving."""


def dtx(*args: str) -> list[str]:
    return [sys.executable, "-m", "dtx.cli", *args]


def test_connect_gives_up_at_its_deadline(netns_ready: None, tmp_path: Path) -> None:
    tv, remote = generate_identity(TV), generate_identity(REMOTE)
    vcards = tmp_path / "vcards"
    write_vcards(vcards, tv, remote)
    keys = {}
    for name, ident in (("tv", tv), ("remote", remote)):
        keys[name] = tmp_path / f"{name}.key"
        save_identity(ident, keys[name])
    with Lab(wan=STANDARD_WAN) as lab:
        server = lab.add_server("rdv")
        home_a = lab.add_home("a", nat="port-restricted-cone")
        home_b = lab.add_home("b", nat="port-restricted-cone")
        lab.up()
        start_rendezvous(server, vcards)
        rdv = "%s:%d" % server_address(server)
        listener = JsonLines(home_b.hosts[0].popen(
            dtx("listen", str(keys["tv"]), "--rendezvous", rdv, "--vcards", str(vcards),
                "--no-pins", "--json"),
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True))
        listener.wait("listening", 20)  # registered
        lab.block(home_b, server)
        lab.block(home_b, home_a)

        proc = home_a.hosts[0].popen(
            dtx("-v", "send", str(keys["remote"]), "--to", "tv@example.org", "--rendezvous", rdv,
                "--lan", "--vcards", str(vcards), "--no-pins", "--body", "pause",
                "--timeout", str(BUDGET)),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        started: queue.Queue[float] = queue.Queue()
        err: list[str] = []

        def read() -> None:
            assert proc.stderr is not None
            for line in proc.stderr:
                err.append(line)
                if "connecting to tv@example.org" in line:
                    started.put(time.monotonic())

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            code = proc.wait(timeout=60)
        finally:
            proc.kill()
        ended = time.monotonic()
        reader.join(10)
        assert code == 4, "".join(err)[-3000:]
        assert not started.empty(), "the command logs when it starts to connect"
        took = ended - started.get()
        assert took <= BUDGET + SLACK, f"gave up {took:.2f} s after it began to connect"
        listener.kill()
