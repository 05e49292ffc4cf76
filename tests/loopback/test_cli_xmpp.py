"""``dtx listen|send|ping --xmpp``: the command line signals through the
account's own XMPP server, with no dtx rendezvous and no ``--vcards``.

A real Prosody (``mod_turn_external``) and coturn on loopback; the TV
listens as ``alice@example.org/tv``, the remote sends and pings, by full
JID and by the bare JID (any of the account's available devices). Keys
are published with ``dtx vcard publish`` and read back from the server by
both sides. The JSON says how the session was found (``signalling``) and,
on the relay path, whose relay carried it (``relay``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from .conftest import Servers
from .test_cli import DEADLINE, Listener, dtx

TV = "alice@example.org/tv"
REMOTE = "alice@example.org/remote"


@pytest.fixture(scope="module")
def account(servers: Servers, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Key files of the TV and the remote, both published in alice's vCard;
    the password file; the login options."""
    folder = tmp_path_factory.mktemp("cli-xmpp")
    password = folder / "alice.password"
    password.write_text("pw-alice\n")
    os.chmod(password, 0o600)
    host, port = servers.prosody.address()
    login = ["--password-file", str(password), "--server", f"{host}:{port}", "--allow-plaintext"]
    files = {"login": json.dumps(login)}
    for name, jid in (("tv", TV), ("remote", REMOTE)):
        key = folder / f"{name}.key"
        done = dtx("keygen", "--jid", jid, "--out", str(key))
        assert done.returncode == 0, done.stderr
        done = dtx("vcard", "publish", str(key), *login, "--json")
        assert done.returncode == 0, done.stderr
        files[name] = str(key)
    return files


def login(account: dict[str, str]) -> list[str]:
    return ["--xmpp", *json.loads(account["login"])]


@pytest.fixture
def tv(account: dict[str, str]) -> Iterator[Listener]:
    lst = Listener(subprocess.Popen(
        [sys.executable, "-m", "dtx.cli", "listen", account["tv"], *login(account),
         "--host", "127.0.0.1", "--echo", "--no-pins", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        stdin=subprocess.DEVNULL))
    try:
        listening = lst.next_event()
        assert listening["event"] == "listening", listening
        yield lst
    finally:
        lst.proc.kill()
        lst.proc.wait(10)


def test_listening_says_it_signals_through_the_server(account: dict[str, str]) -> None:
    lst = Listener(subprocess.Popen(
        [sys.executable, "-m", "dtx.cli", "listen", account["tv"], *login(account),
         "--host", "127.0.0.1", "--no-pins", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        stdin=subprocess.DEVNULL))
    try:
        listening = lst.next_event()
    finally:
        lst.proc.kill()
        lst.proc.wait(10)
    assert listening["event"] == "listening" and listening["jid"] == TV
    assert listening["signalling"] == "xmpp" and listening["online"] is True
    relayed = listening["relayed"]  # the coturn allocation, from XEP-0215 credentials
    assert isinstance(relayed, str) and relayed.startswith("127.0.0.1:")


def test_send_by_full_jid(account: dict[str, str], tv: Listener) -> None:
    done = dtx("send", account["remote"], *login(account), "--to", TV, "--body", "pause",
               "--no-pins", "--json", "--timeout", str(DEADLINE))
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["delivered"] is True and result["peer"] == TV
    assert result["signalling"] == "xmpp"
    assert result["relay"] == ("turn" if result["path"] == "relay" else None), result
    session = tv.next_event()
    assert session["event"] == "session" and session["peer"] == REMOTE
    assert session["signalling"] == "xmpp"
    stanza = tv.next_event()
    while stanza["event"] == "path":
        stanza = tv.next_event()
    assert stanza["event"] == "stanza" and stanza["body"] == "pause"


def test_ping_by_bare_jid_finds_the_available_device(account: dict[str, str],
                                                      tv: Listener) -> None:
    done = dtx("ping", account["remote"], *login(account), "--to", "alice@example.org",
               "--count", "3", "--no-pins", "--json", "--timeout", str(DEADLINE))
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["peer"] == TV and result["received"] == 3
    assert result["signalling"] == "xmpp"
