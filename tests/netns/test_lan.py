"""The remote finds the TV on the LAN (mDNS), in the NAT lab, with the real
`dtx` command in each host's namespace."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dtx.identity import generate_identity, save_identity
from dtx.lab import Lab
from dtx.lab.topology import Host

from .traversal_helpers import server_address, start_rendezvous, write_vcards

pytestmark = pytest.mark.netns

TV = "tv@example.org/living-room"
REMOTE = "remote@example.org/phone"


def dtx(*args: str) -> list[str]:
    return [sys.executable, "-m", "dtx.cli", *args]


class JsonLines:
    """JSON lines from a process's stdout, read by a thread (a select()
    loop over a buffered pipe can miss lines already read ahead)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def wait(self, want: str, timeout: float) -> dict[str, object]:
        """The next JSON line whose "event" is ``want`` (bounded in time)."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                line = self._lines.get(timeout=remaining)
            except queue.Empty:
                break
            if line is None:
                break
            event = json.loads(line)
            if event.get("event") == want:
                return event  # type: ignore[no-any-return]
        raise AssertionError(f"no {want!r} event within {timeout} s")

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


def listen(host: Host, keyfile: Path, vcards: Path, *extra: str) -> JsonLines:
    proc = host.popen(dtx("listen", str(keyfile), "--port", "5300", "--lan", "--vcards",
                          str(vcards), "--no-pins", "--json", *extra),
                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    lines = JsonLines(proc)
    lines.wait("listening", 20)
    return lines


def send(host: Host, keyfile: Path, vcards: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return host.run(dtx("send", str(keyfile), "--to", "tv@example.org", "--lan",
                        "--vcards", str(vcards), "--no-pins", "--json", "--body", "pause",
                        "--timeout", "10", *extra),
                    timeout=40, capture_output=True, text=True)


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    tv, remote = generate_identity(TV), generate_identity(REMOTE)
    impostor = generate_identity(TV)  # the TV's JID, another key
    vcards = tmp_path / "vcards"
    write_vcards(vcards, tv, remote)
    files = {"vcards": vcards}
    for name, ident in (("tv", tv), ("remote", remote), ("impostor", impostor)):
        files[name] = tmp_path / f"{name}.key"
        save_identity(ident, files[name])
    return files


def test_remote_finds_the_tv_on_the_lan(netns_ready: None, keys: dict[str, Path]) -> None:
    with Lab() as lab:
        room = lab.add_lan("living-room", hosts=3)
        lab.up()
        tv_host, remote_host, impostor_host = room.hosts
        vcards = keys["vcards"]
        tv = listen(tv_host, keys["tv"], vcards)
        impostor = listen(impostor_host, keys["impostor"], vcards)

        done = send(remote_host, keys["remote"], vcards)
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout)
        assert result["path"] == "lan"
        assert result["peer"] == TV
        got = tv.wait("stanza", 10)
        assert got["body"] == "pause" and got["from"] == REMOTE

        # Without the real TV, only the impostor answers: refused, not trusted.
        tv.kill()
        refused = send(remote_host, keys["remote"], vcards)
        assert refused.returncode == 3, refused.stdout + refused.stderr
        assert "refused" in refused.stderr and "not trusted" in refused.stderr
        impostor.kill()


def test_lan_is_preferred_over_the_rendezvous(netns_ready: None, keys: dict[str, Path]) -> None:
    with Lab() as lab:
        server = lab.add_server("rdv")
        room = lab.add_lan("living-room", hosts=2)
        lab.up()
        tv_host, remote_host = room.hosts
        vcards = keys["vcards"]
        start_rendezvous(server, vcards)
        rdv = "%s:%d" % server_address(server)
        listen(tv_host, keys["tv"], vcards, "--rendezvous", rdv)
        done = send(remote_host, keys["remote"], vcards, "--rendezvous", rdv)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["path"] == "lan"
