"""The `dtx` command, run as a person would: real processes on loopback."""

from __future__ import annotations

import json
import os
import queue
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

TV = "tv@example.org/living-room"
REMOTE = "remote@example.org/phone"


def dtx(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dtx.cli", *args], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    files = {"tv": tmp_path / "tv.key", "remote": tmp_path / "remote.key",
             "vcards": tmp_path / "vcards"}
    files["vcards"].mkdir()
    for name, jid in (("tv", TV), ("remote", REMOTE)):
        done = dtx("keygen", "--jid", jid, "--out", str(files[name]))
        assert done.returncode == 0, done.stderr
        card = dtx("vcard", str(files[name]))
        assert card.returncode == 0, card.stderr
        (files["vcards"] / f"{jid.split('/')[0]}.xml").write_text(card.stdout)
    return files


class Listener:
    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def next_event(self, timeout: float = 20) -> dict[str, object]:
        line = self.lines.get(timeout=timeout)
        assert line is not None, "listener exited"
        return json.loads(line)  # type: ignore[no-any-return]


@pytest.fixture
def listener(keys: dict[str, Path]) -> Iterator[tuple[Listener, int]]:
    port = free_udp_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "dtx.cli", "listen", str(keys["tv"]), "--port", str(port),
         "--vcards", str(keys["vcards"]), "--no-pins", "--echo", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, stdin=subprocess.DEVNULL)
    lst = Listener(proc)
    try:
        assert lst.next_event()["event"] == "listening"
        yield lst, port
    finally:
        proc.kill()
        proc.wait(10)


def test_keygen_writes_a_private_key_file(keys: dict[str, Path]) -> None:
    mode = stat.S_IMODE(os.stat(keys["tv"]).st_mode)
    assert mode == 0o600
    shown = dtx("fingerprint", str(keys["tv"]), "--json")
    info = json.loads(shown.stdout)
    assert info["jid"] == TV and info["fingerprint"].startswith("SHA256:")
    card = (keys["vcards"] / "tv@example.org.xml").read_text()
    assert "application/x-dtx-ed25519" in card


def test_a_key_file_readable_by_others_is_refused(keys: dict[str, Path]) -> None:
    os.chmod(keys["tv"], 0o644)
    done = dtx("fingerprint", str(keys["tv"]))
    assert done.returncode == 2
    assert "chmod 600" in done.stderr


def test_send_and_ping_print_json(keys: dict[str, Path], listener: tuple[Listener, int]) -> None:
    lst, port = listener
    common = ["--to", "tv@example.org", "--addr", f"127.0.0.1:{port}",
              "--vcards", str(keys["vcards"]), "--no-pins", "--json"]
    sent = dtx("send", str(keys["remote"]), *common, "--body", "pause")
    assert sent.returncode == 0, sent.stderr
    result = json.loads(sent.stdout)
    assert result["to"] == "tv@example.org" and result["peer"] == TV
    assert result["path"] == "direct" and result["connect_ms"] > 0
    assert lst.next_event()["event"] == "session"
    stanza = lst.next_event()
    assert stanza["body"] == "pause" and stanza["from"] == REMOTE

    pinged = dtx("ping", str(keys["remote"]), *common, "--count", "5")
    assert pinged.returncode == 0, pinged.stderr
    result = json.loads(pinged.stdout)
    assert result["sent"] == 5 and result["received"] == 5
    assert 0 < result["rtt_ms"]["p50"] <= result["rtt_ms"]["p99"]


def test_an_untrusted_peer_is_refused_with_exit_code_3(keys: dict[str, Path],
                                                      listener: tuple[Listener, int],
                                                      tmp_path: Path) -> None:
    _, port = listener
    stranger = tmp_path / "stranger.key"
    assert dtx("keygen", "--jid", REMOTE, "--out", str(stranger)).returncode == 0
    done = dtx("send", str(stranger), "--to", "tv@example.org", "--addr", f"127.0.0.1:{port}",
               "--vcards", str(keys["vcards"]), "--no-pins", "--body", "x", "--timeout", "5")
    assert done.returncode == 3, done.stderr
    assert "refused" in done.stderr


def test_no_answer_is_exit_code_4(keys: dict[str, Path]) -> None:
    port = free_udp_port()  # nobody listens there
    done = dtx("send", str(keys["remote"]), "--to", "tv@example.org",
               "--addr", f"127.0.0.1:{port}", "--vcards", str(keys["vcards"]), "--no-pins",
               "--body", "x", "--timeout", "1")
    assert done.returncode == 4, done.stderr
    assert "could not connect" in done.stderr


def test_send_without_a_way_to_reach_the_peer_is_a_usage_error(keys: dict[str, Path]) -> None:
    done = dtx("send", str(keys["remote"]), "--to", "tv@example.org", "--body", "x")
    assert done.returncode == 2
    assert "--addr" in done.stderr
