"""``examples/remote_control``: the TV and the remote as real processes.

Both log in to the loopback Prosody as devices of alice. The remote's
first command goes through the server; the dtx session opens by itself
once the two see each other's presence, and the later commands go over it.
``--no-dtx`` is the same application through the server alone; bad
arguments are one line and an exit code, no traceback.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from dtx.identity import generate_identity, save_identity

from .conftest import Servers

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "remote_control"
DEADLINE = 15.0
TV_JID, REMOTE_JID = "alice@example.org/tv", "alice@example.org/remote"
DTX_PATHS = {"lan", "direct", "relay"}

Process = asyncio.subprocess.Process
Start = Callable[..., Awaitable[Process]]


@pytest.fixture
def login(servers: Servers, tmp_path: Path) -> list[str]:
    """The login options of both: the password file, the server."""
    password = tmp_path / "alice.pw"
    password.write_text("pw-alice\n")
    password.chmod(0o600)
    host, port = servers.prosody.address()
    return ["--password-file", str(password), "--server", f"{host}:{port}",
            "--allow-plaintext"]


def key_file(folder: Path, jid: str) -> str:
    path = folder / f"{jid.rpartition('/')[2]}.key"
    save_identity(generate_identity(jid), str(path))
    return str(path)


@pytest.fixture
async def start() -> AsyncIterator[Start]:
    """Start ``examples/remote_control/<script>`` (killed at the end if
    still running)."""
    procs: list[Process] = []

    async def run(script: str, *argv: str, stdin: bool = False) -> Process:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(EXAMPLE / script), *argv,
            stdin=asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        procs.append(proc)
        return proc

    yield run
    for proc in procs:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def start_tv(start: Start, *argv: str) -> Process:
    """The TV, once it says it is ready."""
    tv = await start("tv.py", TV_JID, *argv)
    assert tv.stdout is not None
    async with asyncio.timeout(DEADLINE):
        line = (await tv.stdout.readline()).decode()
    assert line.startswith(f"tv {TV_JID} ready"), line
    return tv


async def stop(proc: Process) -> tuple[str, str]:
    """SIGTERM: a clean stop, exit 0; its output."""
    proc.send_signal(signal.SIGTERM)
    async with asyncio.timeout(DEADLINE):
        out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return out.decode(), err.decode()


async def test_the_first_command_goes_through_the_server_the_later_ones_over_dtx(
        start: Start, login: list[str], tmp_path: Path) -> None:
    tv = await start_tv(start, "--key-file", key_file(tmp_path, TV_JID), *login)
    remote = await start("remote.py", REMOTE_JID, "--key-file", key_file(tmp_path, REMOTE_JID),
                         *login, "--tv", TV_JID, "--json", "--wait-dtx", "5",
                         "pause", "volume 7", "play")
    async with asyncio.timeout(DEADLINE):
        out, err = await remote.communicate()
    assert remote.returncode == 0, err.decode()
    rows = [json.loads(line) for line in out.decode().splitlines()]
    assert [(r["command"], r["answer"]) for r in rows] == [
        ("pause", "paused"), ("volume 7", "volume 7"), ("play", "playing")]
    assert all(isinstance(r["rtt_ms"], float) and 0 < r["rtt_ms"] < DEADLINE * 1000
               for r in rows), rows
    assert rows[0]["path"] == "server", rows  # sent before any session could be made
    assert rows[-1]["path"] in DTX_PATHS, rows
    tv_out, _ = await stop(tv)
    said = tv_out.splitlines()
    assert f"'pause' from {REMOTE_JID} over server: paused" in said, tv_out
    assert any(line.startswith(f"'play' from {REMOTE_JID} over ") and line.endswith(": playing")
               and line.split(" over ")[1].split(":")[0] in DTX_PATHS for line in said), tv_out


async def test_without_dtx_the_same_commands_go_through_the_server(
        start: Start, login: list[str]) -> None:
    """``--no-dtx`` needs no key; the remote reads its commands from stdin."""
    tv = await start_tv(start, "--no-dtx", *login)
    remote = await start("remote.py", REMOTE_JID, "--no-dtx", *login, "--json", stdin=True)
    async with asyncio.timeout(DEADLINE):
        out, err = await remote.communicate(b"pause\nvolume 101\nvolume 3\n")
    assert remote.returncode == 0, err.decode()
    rows = [json.loads(line) for line in out.decode().splitlines()]
    assert [(r["answer"], r["path"]) for r in rows] == [
        ("paused", "server"), ("volume goes from 0 to 100", "server"),
        ("volume 3", "server")]
    tv_out, _ = await stop(tv)
    assert f"'volume 3' from {REMOTE_JID} over server: volume 3" in tv_out.splitlines()


@pytest.mark.parametrize(("argv", "code", "message"), [
    (["--password-file", "{open_pw}"], 2, "readable by others"),
    (["--password-file", "{pw}", "--key-file", "{tv_key}"], 2,
     f"is the key of {TV_JID}, not of {REMOTE_JID}"),
    (["--password-file", "{pw}"], 2, "--key-file KEYFILE is needed (or --no-dtx)"),
    (["--password-file", "{pw}", "--no-dtx", "--server", "127.0.0.1:99999"], 2,
     "the port must be a number"),
])
async def test_bad_arguments_are_one_line_and_an_exit_code(
        start: Start, tmp_path: Path, argv: list[str], code: int, message: str) -> None:
    files = {"pw": tmp_path / "pw", "open_pw": tmp_path / "open.pw"}
    for name, mode in (("pw", 0o600), ("open_pw", 0o644)):
        files[name].write_text("secret\n")
        files[name].chmod(mode)
    values = {**{k: str(v) for k, v in files.items()}, "tv_key": key_file(tmp_path, TV_JID)}
    remote = await start("remote.py", REMOTE_JID, *(a.format(**values) for a in argv), "pause")
    async with asyncio.timeout(DEADLINE):
        out, err = await remote.communicate()
    assert remote.returncode == code
    assert message in err.decode() and "Traceback" not in err.decode(), err.decode()
    assert out == b""
