"""The `dtx` command, run as a person would: real processes on loopback."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import re
import shlex
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO
from xml.etree.ElementTree import Element

import pytest

from dtx import stanza as st
from dtx.aio.loop import LOOP_ENV, uvloop_missing
from dtx.aio.peer import Session, open_peer
from dtx.identity import load_identity
from dtx.proto import xmlstream
from dtx.proto.xmlstream import DEFAULT_MAX_STANZA_BYTES, encode_stanza
from dtx.trust import PinStore, VCardDirectory, Verifier

TV = "tv@example.org/living-room"
REMOTE = "remote@example.org/phone"
DEADLINE = 30.0
CLI_DOC = Path(__file__).resolve().parents[2] / "docs" / "cli.md"


MODULES = {"dtx": "dtx.cli", "dtx-rendezvous": "rendezvous", "dtx nat-check": "dtx.natcheck"}
"""Each command, as the module ``python -m`` runs (this checkout's)."""


def run(command: str, *args: str, timeout: float = 60, cwd: Path | None = None,
        env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``command`` (a key of MODULES), from any folder, as a person would
    (``env``: the environment, default this one's)."""
    env = os.environ if env is None else env
    path = os.pathsep.join(p for p in (str(CLI_DOC.parents[1]), env.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-m", MODULES[command], *args], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL, cwd=cwd,
                          env={**env, "PYTHONPATH": path})


def dtx(*args: str, timeout: float = 60, cwd: Path | None = None,
        env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `dtx` (this checkout's, from any folder) as a person would."""
    return run("dtx", *args, timeout=timeout, cwd=cwd, env=env)


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
    """A `dtx listen --json` process; its stdout read line by line in a thread."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def next_event(self, timeout: float = DEADLINE) -> dict[str, object]:
        line = self.lines.get(timeout=timeout)
        assert line is not None, "listener exited"
        return json.loads(line)  # type: ignore[no-any-return]

    def rest(self, timeout: float = DEADLINE) -> list[dict[str, object]]:
        """Every event until the process closes its stdout."""
        events = []
        while (line := self.lines.get(timeout=timeout)) is not None:
            events.append(json.loads(line))
        return events


def spawn_listener(keys: dict[str, Path], *args: str,
                   stderr: IO[str] | int = subprocess.DEVNULL, options: Sequence[str] = (),
                   env: Mapping[str, str] | None = None) -> Listener:
    """`dtx [options] listen tv.key ... --json [args]`."""
    return Listener(subprocess.Popen(
        [sys.executable, "-m", "dtx.cli", *options, "listen", str(keys["tv"]),
         "--vcards", str(keys["vcards"]), "--no-pins", "--json", *args],
        stdout=subprocess.PIPE, stderr=stderr, text=True, stdin=subprocess.DEVNULL, env=env))


@pytest.fixture
def listener(keys: dict[str, Path]) -> Iterator[tuple[Listener, int]]:
    lst = spawn_listener(keys, "--echo")  # no --port: any free port, printed
    try:
        listening = lst.next_event()
        assert listening["event"] == "listening"
        port = listening["port"]
        assert isinstance(port, int) and port > 0
        assert listening["address"] == f"127.0.0.1:{port}"
        yield lst, port
    finally:
        lst.proc.kill()
        lst.proc.wait(10)


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


def test_send_resolves_a_host_name(keys: dict[str, Path],
                                   listener: tuple[Listener, int]) -> None:
    lst, port = listener
    sent = dtx("send", str(keys["remote"]), "--to", "tv@example.org", "--addr",
               f"localhost:{port}", "--vcards", str(keys["vcards"]), "--no-pins",
               "--body", "by name", "--json")
    assert sent.returncode == 0, sent.stderr
    assert json.loads(sent.stdout)["peer"] == TV
    assert lst.next_event()["event"] == "session"
    assert lst.next_event()["body"] == "by name"


def need_loop(loop: str) -> None:
    """Skip, saying why, a test of ``--loop uvloop`` without uvloop."""
    missing = uvloop_missing() if loop == "uvloop" else None
    if missing is not None:
        pytest.skip(f"--loop uvloop: {missing}")


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_listen_with_a_rendezvous_needs_no_port(keys: dict[str, Path], loop: str) -> None:
    """On each event loop: the server, the listener and the sender."""
    need_loop(loop)
    rdv = Listener(subprocess.Popen(
        [sys.executable, "-m", "rendezvous", "--listen", "127.0.0.1:0",
         "--vcards", str(keys["vcards"]), "--loop", loop],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, stdin=subprocess.DEVNULL))
    lst = None
    try:
        line = rdv.lines.get(timeout=DEADLINE)
        found = re.search(r"listening on 127\.0\.0\.1:(\d+)", line or "")
        assert found, line
        assert f", {loop} loop" in (line or ""), line
        server = f"localhost:{found[1]}"  # a name, resolved to 127.0.0.1
        lst = spawn_listener(keys, "--rendezvous", server, "--host", "127.0.0.1",
                             options=["--loop", loop])
        listening = lst.next_event()
        assert listening["event"] == "listening" and listening["loop"] == loop
        port = listening["port"]
        assert isinstance(port, int) and port > 0
        assert listening["address"] == f"127.0.0.1:{port}"
        sent = dtx("--loop", loop, "send", str(keys["remote"]), "--to", "tv@example.org",
                   "--rendezvous", server, "--bind", "127.0.0.1",
                   "--vcards", str(keys["vcards"]), "--no-pins", "--body", "by jid", "--json")
        assert sent.returncode == 0, sent.stderr
        assert json.loads(sent.stdout)["peer"] == TV
    finally:
        for proc in (rdv.proc, lst.proc if lst is not None else None):
            if proc is not None:
                proc.kill()
                proc.wait(10)


# -- --loop: the event loop, uvloop where installed ---------------------------------------

INSTALLED_LOOP = "asyncio" if uvloop_missing() else "uvloop"
"""What ``auto`` picks here."""


def environment(**changes: str) -> dict[str, str]:
    """This environment without ``DTX_LOOP``, with ``changes``."""
    return {**{k: v for k, v in os.environ.items() if k != LOOP_ENV}, **changes}


@pytest.mark.parametrize("options, env, expected", [
    (["--loop", "asyncio"], {}, "asyncio"),
    (["--loop", "uvloop"], {}, "uvloop"),
    (["--loop", "auto"], {}, INSTALLED_LOOP),
    ([], {}, INSTALLED_LOOP),
    ([], {LOOP_ENV: "asyncio"}, "asyncio"),
    (["--loop", "auto"], {LOOP_ENV: "asyncio"}, INSTALLED_LOOP),
], ids=["asyncio", "uvloop", "auto", "default", "DTX_LOOP", "given-wins-over-DTX_LOOP"])
def test_the_event_loop_asked_for_runs_the_listener_and_the_pinger(
        keys: dict[str, Path], options: list[str], env: dict[str, str], expected: str) -> None:
    need_loop(options[-1] if options else "auto")
    lst = spawn_listener(keys, "--echo", options=options, env=environment(**env))
    try:
        listening = lst.next_event()
        assert listening["event"] == "listening" and listening["loop"] == expected
        pinged = dtx(*options, "ping", str(keys["remote"]), "--to", "tv@example.org",
                     "--addr", f"127.0.0.1:{listening['port']}", "--vcards", str(keys["vcards"]),
                     "--no-pins", "--json", "--count", "3", env=environment(**env))
        assert pinged.returncode == 0, pinged.stderr
        result = json.loads(pinged.stdout)
        assert result["received"] == 3
        assert 0 < result["rtt_ms"]["p50"]  # timed apart from uvloop's millisecond clock
    finally:
        lst.proc.kill()
        lst.proc.wait(10)


def test_a_bad_dtx_loop_is_refused_as_a_bad_loop_is(tmp_path: Path) -> None:
    done = dtx("pin", "list", "--pins", str(tmp_path / "pins.json"),
               env=environment(**{LOOP_ENV: "fast"}))
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines()[-1] == (
        "dtx: error: argument --loop: 'fast' (from DTX_LOOP): expected auto, uvloop or asyncio")


def test_loop_uvloop_without_uvloop_is_exit_2_before_anything_starts(tmp_path: Path) -> None:
    """uvloop made unimportable in the command's process (as where it is not
    installed): ``--loop uvloop`` is refused, naming the extra."""
    hide = ("import sys; sys.modules['uvloop'] = None\n"
            "from dtx.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    done = subprocess.run([sys.executable, "-c", hide, "--loop", "uvloop", "pin", "list",
                           "--pins", str(tmp_path / "pins.json")],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
                          cwd=CLI_DOC.parents[1], env=environment())
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines()[-1] == (
        "dtx: error: argument --loop: uvloop is not installed (pip install 'dtx[uvloop]'); "
        "give --loop auto or --loop asyncio")


# -- D3: an echo that does not fit in a stanza ------------------------------------------


def sized_message(size: int, id_: str) -> Element:
    """A message to the TV whose encoding is exactly ``size`` bytes."""
    pad = size - len(encode_stanza(st.message("x", to="tv@example.org", id_=id_)))
    el = st.message("x" * (1 + pad), to="tv@example.org", id_=id_)
    assert len(encode_stanza(el)) == size
    return el


def write_gt_unescaped(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make this process write '>' in text as is, as XML allows and other
    XMPP software does (dtx writes '&gt;'); `dtx listen` is another process
    and keeps its own encoder, which re-escapes it."""
    real = xmlstream.encode_stanza

    def encode(element: Element) -> bytes:
        return real(element).replace(b"&gt;", b">")

    monkeypatch.setattr(xmlstream, "encode_stanza", encode)


async def next_stanza(session: Session) -> Element:
    async with asyncio.timeout(DEADLINE):
        return await session.receive()


def assert_stanza_error(reply: Element, id_: str) -> None:
    assert reply.tag == st.MESSAGE and reply.get("type") == "error", reply.attrib
    assert reply.get("id") == id_ and reply.get("to") == REMOTE
    error = reply.find(f"{{{st.NS_CLIENT}}}error")
    assert error is not None and error.get("type") == "modify"
    assert error.find(f"{{{st.NS_STANZAS}}}policy-violation") is not None
    text = error.find(f"{{{st.NS_STANZAS}}}text")
    assert text is not None and "262144" in (text.text or "")


async def test_an_echo_too_large_is_answered_with_a_stanza_error_and_the_session_goes_on(
        keys: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    errors_file = tmp_path / "listen.stderr"
    with open(errors_file, "w") as errors_out:
        lst = spawn_listener(keys, "--echo", "--sessions", "1", stderr=errors_out)
    try:
        listening = await asyncio.to_thread(lst.next_event)
        port = listening["port"]
        assert isinstance(port, int)
        trust = Verifier([VCardDirectory(keys["vcards"])], PinStore(None))
        async with open_peer(load_identity(keys["remote"]), trust) as peer:
            session = await peer.connect("tv@example.org", ("127.0.0.1", port),
                                         timeout=DEADLINE)
            # The largest stanza allowed: its echo, with to= added, is 30 bytes too large.
            session.send(sized_message(DEFAULT_MAX_STANZA_BYTES, "max"))
            assert_stanza_error(await next_stanza(session), "max")
            # 100 KB of '>' written as is: 400 KB once the echo escapes it.
            write_gt_unescaped(monkeypatch)
            session.send(st.message(">" * 100_000, to="tv@example.org", id_="gt"))
            monkeypatch.undo()
            assert_stanza_error(await next_stanza(session), "gt")
            # The same session is still served.
            session.send(st.message("still here", to="tv@example.org", id_="after"))
            echo = await next_stanza(session)
            assert echo.get("type") == "chat" and st.body_of(echo) == "still here"
            await session.close()
        events = await asyncio.to_thread(lst.rest)
        code = await asyncio.to_thread(lst.proc.wait, DEADLINE)
    finally:
        lst.proc.kill()
        lst.proc.wait(10)
    stderr = errors_file.read_text()
    assert code == 0, stderr  # --sessions 1: its one session ended normally
    assert "Traceback" not in stderr and "never retrieved" not in stderr, stderr
    assert stderr.count("echo not sent") == 2, stderr  # logged once each
    assert [e["id"] for e in events if e["event"] == "echo_refused"] == ["max", "gt"]
    assert [e["body"] for e in events if e["event"] == "stanza"][-1] == "still here"
    assert events[-1]["event"] == "closed" and events[-1]["error"] is None


# -- docs/cli.md: every bad argument, its message and its exit code -----------------------


def bad_argument_rows() -> list[tuple[str, str, int]]:
    """The rows of the tables under "## Bad arguments" in docs/cli.md
    (`dtx ...` and `dtx-rendezvous ...`)."""
    section = CLI_DOC.read_text(encoding="utf-8").split("\n## Bad arguments\n", 1)[1]
    section = section.split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        row = re.fullmatch(r"\| `(dtx[^`]*)` \| `([^`]+)` \| (\d+) \|", line.strip())
        if row:
            rows.append((row[1], row[2], int(row[3])))
    return rows


BAD_ARGUMENTS = bad_argument_rows()


def test_the_table_of_bad_arguments_covers_the_known_cases() -> None:
    commands = " ".join(command for command, _, _ in BAD_ARGUMENTS)
    for case in ("--port 70000", "--count 0", "--timeout 0", "--timeout -1", "--timeout nan",
                 "--timeout inf", "--vcards notes.txt", "dtx pin forget", "$BUSY",
                 "--addr 127.0.0.1 ", "--addr 127.0.0.1:70000", "--addr :5300",
                 "nat-check --stun 127.0.0.1:3478 --port 70000",
                 "nat-check --stun 127.0.0.1:3478 --timeout 0",
                 "nat-check --stun 127.0.0.1:3478 --timeout nan",
                 "nat-check --stun 127.0.0.1:3478 --bind nonsense.invalid",
                 "vcard publish tv.key --password-file secret.password --timeout -1",
                 "--out vcards --timeout -1", "vcard publish tv.key --password-file missing",
                 "dtx-rendezvous --lifetime nan", "dtx-rendezvous --lifetime inf",
                 "dtx-rendezvous --keepalive nan", "dtx-rendezvous --listen 127.0.0.1:$BUSY",
                 "dtx --loop bogus", "dtx-rendezvous --loop"):
        assert case in commands, case
    assert {command.split()[0] for command, _, _ in BAD_ARGUMENTS} == {"dtx", "dtx-rendezvous"}


@pytest.fixture(scope="module")
def bad_argument_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("cli-bad-arguments")
    (folder / "vcards").mkdir()
    for name, jid in (("tv", TV), ("remote", REMOTE)):
        made = dtx("keygen", "--jid", jid, "--out", f"{name}.key", cwd=folder)
        assert made.returncode == 0, made.stderr
        card = dtx("vcard", f"{name}.key", cwd=folder)
        assert card.returncode == 0, card.stderr
        (folder / "vcards" / f"{jid.split('/')[0]}.xml").write_text(card.stdout)
    (folder / "notes.txt").write_text("not a folder\n")
    (folder / "bad-pins.json").write_text("{not json\n")
    for name, mode in (("secret.password", 0o600), ("open.password", 0o644)):
        (folder / name).write_text("not the password\n")
        os.chmod(folder / name, mode)
    return folder


@pytest.mark.parametrize("command, message, code", BAD_ARGUMENTS,
                         ids=[command for command, _, _ in BAD_ARGUMENTS])
def test_a_bad_argument_is_one_line_on_stderr_and_its_exit_code(
        command: str, message: str, code: int, bad_argument_folder: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind(("127.0.0.1", 0))
        values = {"$BUSY": str(busy.getsockname()[1]), "$BIG": ">" * 100_000,
                  "$CTRL": "a\x01b"}

        def fill(text: str) -> str:
            for name, value in values.items():
                text = text.replace(name, value)
            return text

        argv = [fill(word) for word in shlex.split(command)]
        assert argv[0] in ("dtx", "dtx-rendezvous")
        done = run(argv[0], *argv[1:], cwd=bad_argument_folder)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == code, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert fill(message) in last, done.stderr
    assert last.startswith(f"{argv[0]} ") or last.startswith(f"{argv[0]}:"), done.stderr
    assert done.stdout == ""


# -- python -m dtx.natcheck: the same command as dtx nat-check ---------------------------


def test_nat_check_runs_alone_against_the_rendezvous_on_loopback(tmp_path: Path) -> None:
    rdv = Listener(subprocess.Popen(
        [sys.executable, "-m", "rendezvous", "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, stdin=subprocess.DEVNULL))
    try:
        line = rdv.lines.get(timeout=DEADLINE)
        found = re.search(r"listening on 127\.0\.0\.1:(\d+)", line or "")
        assert found, line
        port = int(found[1])
        done = run("dtx nat-check", "--stun", f"localhost:{port}", "--bind", "127.0.0.1",
                   "--no-classic", "--json", "--timeout", "20")
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        assert report["server"] == ["127.0.0.1", port]  # the name, resolved to IPv4
        assert report["public"] == report["local"] and report["local"][0] == "127.0.0.1"
        assert report["nat"] is False and report["rfc5780"] is False
        bad = run("dtx nat-check", "--stun", f"127.0.0.1:{port}", "--port", "70000")
        assert bad.returncode == 2 and bad.stdout == ""
        assert bad.stderr.strip().splitlines()[-1].startswith(
            "dtx nat-check: error: argument --port: '70000' is not a port")
    finally:
        rdv.proc.kill()
        rdv.proc.wait(10)
