"""``dtx vcard publish``: put this device's key into the account's vCard.

:func:`add_cli` registers the command as ``vcard-publish`` on the ``dtx``
subparsers; ``dtx vcard publish KEYFILE ...`` routes to the same handler
(:func:`configure_publish_parser` fills any parser with its arguments).
The handler logs in as the key file's account, adds (or with ``--revoke``
removes) the device's key, and prints what it did. Errors are raised as
:class:`~dtx.errors.DtxError` subclasses for ``dtx``'s ``main`` to report
with its exit codes: 2 bad usage (an argument, a key file, a password file
or a vCard), 3 login refused, 4 no connection, 1 anything else (no TLS
without ``--allow-plaintext``, a server refusing the vCard). Arguments are
checked by the shared types of :mod:`dtx.cliargs`.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
from typing import TYPE_CHECKING, Any

from dtx.cliargs import (
    UsageError,
    parse_file,
    parse_hostport,
    parse_jid,
    parse_output_directory,
    parse_timeout,
    run_loop,
)
from dtx.errors import XmppError
from dtx.identity import DeviceIdentity, fingerprint, load_identity
from dtx.xmpp.config import PUBLISH_FORMATS, XmppConfig

if TYPE_CHECKING:
    from dtx.xmpp.client import KeyChange, XmppClient

__all__ = [
    "SIGNALLING_FLAGS",
    "PasswordFileError",
    "add_cli",
    "add_signalling_options",
    "check_signalling_options",
    "cmd_vcard_fetch",
    "cmd_vcard_publish",
    "configure_fetch_parser",
    "configure_publish_parser",
    "read_password_file",
]

MAX_PASSWORD_FILE_BYTES = 4096


class PasswordFileError(XmppError, UsageError):
    """A password file that cannot be used: unreadable, not a regular file,
    readable by others, too large, not UTF-8, empty. A usage error (exit 2:
    the file is the user's to fix), and still an :class:`XmppError` for
    callers that catch those."""


def read_password_file(path: str) -> str:
    """The first line of a password file that only its owner can read;
    raises :class:`PasswordFileError`."""
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            data = f.read(MAX_PASSWORD_FILE_BYTES + 1)
    except OSError as exc:
        raise PasswordFileError(f"cannot read password file {path}: {exc.strerror}") from exc
    if not stat.S_ISREG(mode):
        raise PasswordFileError(f"password file {path} is not a regular file")
    if mode & 0o077:
        raise PasswordFileError(
            f"password file {path} has mode {stat.S_IMODE(mode):04o}, readable by others; "
            f"run: chmod 600 {path}"
        )
    if len(data) > MAX_PASSWORD_FILE_BYTES:
        raise PasswordFileError(
            f"password file {path} is larger than {MAX_PASSWORD_FILE_BYTES} bytes")
    try:
        password = data.decode("utf-8").splitlines()[0] if data else ""
    except UnicodeDecodeError as exc:
        raise PasswordFileError(f"password file {path} is not UTF-8 text") from exc
    if not password:
        raise PasswordFileError(f"password file {path} is empty")
    return password


def _server_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", type=parse_hostport, metavar="HOST:PORT", default=None,
                   help="connect here (default: the JID's domain, DNS SRV)")
    p.add_argument("--allow-plaintext", action="store_true",
                   help="log in even if the server offers no TLS (test servers only)")
    p.add_argument("--ca-file", metavar="PEM", default=None, type=parse_file,
                   help="also trust this CA for the server's certificate")


SIGNALLING_FLAGS = ("--password-file", "--server", "--allow-plaintext", "--ca-file")
"""The login options of ``--xmpp``, which mean nothing without it."""


def add_signalling_options(p: argparse.ArgumentParser) -> None:
    """``--xmpp`` and its login options, for ``dtx listen``, ``send`` and
    ``ping`` (:func:`check_signalling_options` checks them together)."""
    p.add_argument("--xmpp", action="store_true",
                   help="log in to the key file's account as its full JID and signal "
                   "through the XMPP server (Jingle; STUN/TURN by XEP-0215) instead of "
                   "--rendezvous/--addr; keys come from the account's vCards")
    p.add_argument("--password-file", metavar="FILE", type=parse_file, default=None,
                   help="with --xmpp: file whose first line is the account's password "
                   "(mode 0600)")
    _server_options(p)


def check_signalling_options(args: argparse.Namespace) -> XmppConfig | None:
    """The :class:`XmppConfig` of ``--xmpp`` (None without it); a login
    option without ``--xmpp``, ``--xmpp`` without ``--password-file`` or
    beside ``--rendezvous``/``--addr`` is a :class:`UsageError`. The
    password file is read (and checked) by :func:`read_password_file`."""
    if not args.xmpp:
        given = [flag for flag in SIGNALLING_FLAGS
                 if getattr(args, flag.lstrip("-").replace("-", "_")) not in (None, False)]
        if given:
            raise UsageError(f"{', '.join(given)} only with --xmpp")
        return None
    if args.password_file is None:
        raise UsageError("--xmpp needs --password-file FILE (the account's password)")
    for flag in ("--rendezvous", "--addr"):
        if getattr(args, flag.lstrip("-"), None) is not None:
            raise UsageError(f"--xmpp signals through the XMPP server: give it or {flag}, "
                             "not both")
    return XmppConfig(server=args.server, allow_plaintext=bool(args.allow_plaintext),
                      ca_file=args.ca_file, timeout=float(getattr(args, "timeout", 10.0)))


def _login_options(p: argparse.ArgumentParser, password_help: str) -> None:
    """The options of logging in to the XMPP server, shared by publish and fetch."""
    p.add_argument("--password-file", required=True, metavar="FILE", type=parse_file,
                   help=password_help)
    _server_options(p)
    p.add_argument("--timeout", type=parse_timeout, default=10.0,
                   help="seconds for the login and each request, > 0 (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print JSON on stdout")


def configure_publish_parser(p: argparse.ArgumentParser) -> None:
    """Add the arguments of ``dtx vcard publish`` to ``p``."""
    p.add_argument("keyfile", help="the device's key file (its JID names the account)")
    _login_options(p, "file whose first line is the account's password (mode 0600)")
    p.add_argument("--revoke", action="store_true",
                   help="remove this device's key instead of adding it")
    p.add_argument("--format", dest="fmt", choices=PUBLISH_FORMATS, default="auto",
                   help="vCard form to write (default: the one the server keeps)")
    p.set_defaults(func=cmd_vcard_publish)


def configure_fetch_parser(p: argparse.ArgumentParser) -> None:
    """Add the arguments of ``dtx vcard fetch`` to ``p``."""
    p.add_argument("jid", type=parse_jid,
                   help="the account (bare JID) whose device keys to fetch")
    p.add_argument("--account-key", required=True, metavar="KEYFILE",
                   help="this device's key file: its JID names the account to log in as")
    p.add_argument("--out", required=True, metavar="DIR", type=parse_output_directory,
                   help="vCard folder to write JID.xml into, made if missing (the trust "
                        "source of listen/send --vcards)")
    _login_options(p, "file whose first line is that account's password (mode 0600)")
    p.set_defaults(func=cmd_vcard_fetch)


def add_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``vcard-publish`` and ``vcard-fetch`` on ``dtx``'s
    subparsers; returns the publish parser."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "vcard-publish", prog="dtx vcard publish",
        help="add (or --revoke) this device's key in the account's vCard",
    )
    configure_publish_parser(p)
    f: argparse.ArgumentParser = subparsers.add_parser(
        "vcard-fetch", prog="dtx vcard fetch",
        help="fetch an account's device keys into a vCard folder",
    )
    configure_fetch_parser(f)
    return p


def _client(args: argparse.Namespace, identity: DeviceIdentity) -> XmppClient:
    """A client for the key file's account, with the login options of
    ``args``; the password file is read (and checked) here, before connecting."""
    from dtx.xmpp.client import XmppClient

    password = read_password_file(args.password_file)
    config = XmppConfig(
        server=args.server,
        allow_plaintext=bool(args.allow_plaintext),
        ca_file=args.ca_file,
        timeout=float(args.timeout),
    )
    return XmppClient(identity.jid.bare, password, config=config)


async def _fetch(args: argparse.Namespace) -> frozenset[bytes] | None:
    client = _client(args, load_identity(args.account_key))
    await client.connect()
    try:
        return await client.fetch_keys(args.jid)
    finally:
        await client.close()


def cmd_vcard_fetch(args: argparse.Namespace) -> int:
    """Handler of ``dtx vcard fetch``: the account's dtx keys, written as a
    vCard into the folder, so they stay trusted when the server is away."""
    from pathlib import Path

    from dtx.jid import JID
    from dtx.trust import add_key, new_vcard

    bare = JID.parse(args.jid).bare.full
    keys = run_loop(args, _fetch(args))
    if not keys:
        raise XmppError(f"{bare} lists no dtx device key in its vCard")
    card = new_vcard(bare)
    for key in sorted(keys):
        card = add_key(card, key)
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{bare}.xml"
    tmp = target.with_suffix(".xml.tmp")
    tmp.write_bytes(card)
    os.replace(tmp, target)
    listed = sorted(fingerprint(k) for k in keys)
    if args.json:
        print(json.dumps({"jid": bare, "keys": listed, "file": str(target)}), flush=True)
    else:
        print(f"{bare}: {len(listed)} device key(s) written to {target}", flush=True)
        for fp in listed:
            print(f"  {fp}", flush=True)
    return 0


async def _run(args: argparse.Namespace) -> tuple[str, KeyChange]:
    identity = load_identity(args.keyfile)
    client = _client(args, identity)
    await client.connect()
    try:
        if args.revoke:
            change = await client.revoke_key(identity.public_key)
        else:
            change = await client.publish_key(identity.public_key, fmt=args.fmt)
    finally:
        await client.close()
    return identity.fingerprint, change


def cmd_vcard_publish(args: argparse.Namespace) -> int:
    """Handler of ``dtx vcard publish`` / ``dtx vcard-publish``."""
    fpr, change = run_loop(args, _run(args))
    action = "revoke" if args.revoke else "publish"
    listed = sorted(fingerprint(k) for k in change.keys)
    if args.json:
        print(json.dumps({
            "jid": change.jid,
            "fingerprint": fpr,
            "action": action,
            "changed": change.changed,
            "written": list(change.written),
            "keys": listed,
        }), flush=True)
    else:
        done = {"publish": "published", "revoke": "revoked"}[action]
        where = ", ".join(change.written)
        state = f"{done} in {where}" if change.changed else "unchanged (already so)"
        print(f"{change.jid}  {fpr}  {state}; {len(listed)} device key(s) listed", flush=True)
    return 0
