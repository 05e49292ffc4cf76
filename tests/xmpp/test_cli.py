"""``dtx vcard publish`` (registered as ``vcard-publish``) against Prosody."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dtx.errors import XmppError
from dtx.identity import DeviceIdentity
from dtx.xmpp.cli import add_cli
from tests.xmpp.conftest import Account

AccountMaker = Callable[[str], Account]
DeviceMaker = Callable[[Account, str], tuple[DeviceIdentity, str]]


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="dtx")
    add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["vcard-publish", *argv])
    result: int = args.func(args)
    return result


def _password_file(tmp_path: Path, acct: Account, mode: int = 0o600) -> str:
    path = tmp_path / f"{acct.jid}.password"
    path.write_text(acct.password + "\n")
    os.chmod(path, mode)
    return str(path)


def _argv(acct: Account, keyfile: str, password_file: str, *extra: str) -> list[str]:
    host, port = acct.server.address()
    return [keyfile, "--password-file", password_file, "--server", f"{host}:{port}",
            "--timeout", "10", *extra]


def test_publish_two_devices_then_revoke_one(
    account: AccountMaker, device: DeviceMaker, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    alice = account("alice")
    tv, tv_file = device(alice, "tv")
    phone, phone_file = device(alice, "phone")
    pw = _password_file(tmp_path, alice)

    def run(keyfile: str, *extra: str) -> dict[str, Any]:
        assert _run(_argv(alice, keyfile, pw, "--allow-plaintext", "--json", *extra)) == 0
        out: dict[str, Any] = json.loads(capsys.readouterr().out)
        return out

    first = run(tv_file)
    assert first["changed"] is True and first["action"] == "publish"
    assert first["keys"] == [tv.fingerprint]
    both = run(phone_file)
    assert sorted(both["keys"]) == sorted([tv.fingerprint, phone.fingerprint])
    again = run(phone_file)
    assert again["changed"] is False and again["keys"] == both["keys"]
    revoked = run(tv_file, "--revoke")
    assert revoked["changed"] is True and revoked["keys"] == [phone.fingerprint]
    assert run(tv_file, "--revoke")["changed"] is False


def test_plaintext_refused_without_allow_plaintext(
    account: AccountMaker, device: DeviceMaker, tmp_path: Path,
) -> None:
    alice = account("alice")
    _, tv_file = device(alice, "tv")
    pw = _password_file(tmp_path, alice)
    with pytest.raises(XmppError, match="--allow-plaintext"):
        _run(_argv(alice, tv_file, pw))


def test_text_output(
    account: AccountMaker, device: DeviceMaker, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    alice = account("alice")
    tv, tv_file = device(alice, "tv")
    pw = _password_file(tmp_path, alice)
    assert _run(_argv(alice, tv_file, pw, "--allow-plaintext")) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{alice.jid}  {tv.fingerprint}  published in ")
    assert line.endswith("1 device key(s) listed")


def test_password_file_readable_by_others_refused(
    account: AccountMaker, device: DeviceMaker, tmp_path: Path,
) -> None:
    alice = account("alice")
    _, tv_file = device(alice, "tv")
    pw = _password_file(tmp_path, alice, mode=0o644)
    with pytest.raises(XmppError, match="chmod 600"):
        _run(_argv(alice, tv_file, pw, "--allow-plaintext"))
