"""The story from the design brief, end to end in the NAT lab.

A remote control and a TV publish their keys in their accounts' vCards on a
real Prosody and learn each other's keys from there; the TV registers with a
rendezvous that checks it against the live vCard. Then Prosody and the
rendezvous go away; on the living-room LAN the remote finds the TV over mDNS
and a "pause" arrives, authenticated. An impostor announcing the TV's JID
on the same LAN is refused.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from dtx.identity import generate_identity, save_identity
from dtx.lab import Lab
from dtx.lab.prosody import ProsodyServer, prosody_missing

from .test_lan import JsonLines, dtx
from .traversal_helpers import server_address, start_rendezvous

pytestmark = pytest.mark.netns

TV = "tv@example.org/living-room"
REMOTE = "remote@example.org/phone"


def password_file(folder: Path, name: str, password: str) -> Path:
    path = folder / f"{name}.pw"
    path.write_text(password + "\n")
    os.chmod(path, 0o600)
    return path


def test_remote_and_tv(netns_ready: None, tmp_path: Path) -> None:
    reason = prosody_missing()
    if reason:
        pytest.skip(reason)
    with Lab() as lab:
        server = lab.add_server("xmpp")
        room = lab.add_lan("living-room", hosts=3)
        lab.up()
        tv_host, remote_host, impostor_host = room.hosts
        prosody = ProsodyServer("vcard4", host=server, folder=str(tmp_path / "prosody"))
        os.makedirs(prosody.folder)
        prosody.start()
        try:
            pw = {name: password_file(tmp_path, name, f"secret-{name}")
                  for name in ("tv", "remote", "rdv")}
            for name in ("tv", "remote", "rdv"):
                prosody.register(name, f"secret-{name}")
            xmpp = "%s:%d" % prosody.address()
            keys = {}
            for name, jid in (("tv", TV), ("remote", REMOTE), ("impostor", TV)):
                keys[name] = tmp_path / f"{name}.key"
                save_identity(generate_identity(jid), keys[name])

            # Each device publishes its key in its account's vCard ...
            for name, host in (("tv", tv_host), ("remote", remote_host)):
                done = host.run(dtx("vcard", "publish", str(keys[name]), "--password-file",
                                    str(pw[name]), "--server", xmpp, "--allow-plaintext",
                                    "--json"), timeout=60)
                assert done.returncode == 0, done.stderr
                assert json.loads(done.stdout)["changed"] is True
            # ... and learns the other's from there, into its vCard folder.
            folders = {"tv": tmp_path / "tv-vcards", "remote": tmp_path / "remote-vcards"}
            for name, host, other in (("tv", tv_host, "remote@example.org"),
                                      ("remote", remote_host, "tv@example.org")):
                done = host.run(dtx("vcard", "fetch", other, "--account-key", str(keys[name]),
                                    "--password-file", str(pw[name]), "--server", xmpp,
                                    "--allow-plaintext", "--out", str(folders[name]),
                                    "--json"), timeout=60)
                assert done.returncode == 0, done.stderr
                assert len(json.loads(done.stdout)["keys"]) == 1

            # The rendezvous checks registrations against the live vCards.
            rdv_proc = start_rendezvous(
                server, None, "--xmpp-account", "rdv@example.org",
                "--password-file", str(pw["rdv"]), "--server", xmpp, "--allow-plaintext")
            rdv = "%s:%d" % server_address(server)
            tv = JsonLines(tv_host.popen(
                dtx("listen", str(keys["tv"]), "--port", "5300", "--lan", "--rendezvous", rdv,
                    "--vcards", str(folders["tv"]), "--no-pins", "--json"),
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True))
            assert tv.wait("listening", 30)["jid"] == TV  # registered: key in the vCard
        finally:
            prosody.stop()
        rdv_proc.terminate()
        rdv_proc.wait(10)

        # Prosody and the rendezvous are gone: the LAN is enough.
        done = remote_host.run(dtx("send", str(keys["remote"]), "--to", "tv@example.org",
                                   "--lan", "--vcards", str(folders["remote"]), "--no-pins",
                                   "--body", "pause", "--json", "--timeout", "10"), timeout=60)
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout)
        assert result["path"] == "lan" and result["peer"] == TV
        got = tv.wait("stanza", 10)
        assert got["body"] == "pause" and got["from"] == REMOTE

        # An impostor announcing the TV's JID is refused, never trusted.
        impostor = JsonLines(impostor_host.popen(
            dtx("listen", str(keys["impostor"]), "--port", "5300", "--lan",
                "--vcards", str(folders["remote"]), "--no-pins", "--json"),
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True))
        impostor.wait("listening", 30)
        tv.kill()
        refused = remote_host.run(dtx("send", str(keys["remote"]), "--to", "tv@example.org",
                                      "--lan", "--vcards", str(folders["remote"]), "--no-pins",
                                      "--body", "pause", "--timeout", "10"), timeout=60)
        assert refused.returncode == 3, refused.stdout + refused.stderr
        assert "refused" in refused.stderr
        impostor.kill()
