"""What the TV and the remote share: their options, the login, the exit codes.

Both are ordinary slixmpp clients. The only dtx line is the plugin's
registration in :func:`make_client`; ``--no-dtx`` leaves it out and the
same application runs through the server alone, for comparison. Argument
checks and exit codes are dtx's own (:mod:`dtx.cliargs`): 2 a bad argument
(a password file readable by others, a key file of another JID), 3 the
login refused, 4 no connection to the server, 1 anything else, each as one
line on stderr.

These are command-line programs: what they print is their output, so they
``print`` (the library itself only logs).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from slixmpp import ClientXMPP

from dtx.cliargs import (
    UsageError,
    configure_logging,
    parse_file,
    parse_hostport,
    parse_jid,
    parse_timeout,
    run_command,
)
from dtx.errors import AuthenticationError, ConnectError, DtxError
from dtx.identity import load_identity
from dtx.jid import JID
from dtx.xmpp.cli import read_password_file


def add_options(p: argparse.ArgumentParser, device: str) -> None:
    """The options of logging in, with or without dtx."""
    p.add_argument("jid", type=parse_jid,
                   help=f"the {device}'s full JID (account/resource), e.g. alice@example.org/{device}")
    p.add_argument("--password-file", required=True, type=parse_file, metavar="FILE",
                   help="file whose first line is the account's password (mode 0600)")
    p.add_argument("--key-file", type=parse_file, metavar="KEYFILE",
                   help="the device's key, made by 'dtx keygen --jid JID --out KEYFILE' "
                   "(needed unless --no-dtx)")
    p.add_argument("--server", type=parse_hostport, metavar="HOST:PORT", default=None,
                   help="connect here (default: the JID's domain, DNS SRV)")
    p.add_argument("--allow-plaintext", action="store_true",
                   help="log in even if the server offers no TLS (test servers only)")
    p.add_argument("--no-dtx", action="store_true",
                   help="the same application without the dtx plugin: everything "
                   "through the server")
    p.add_argument("--timeout", type=parse_timeout, default=15.0, metavar="SECONDS",
                   help="for the login (and each answer, on the remote); default %(default)s")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="log: -v INFO, -vv DEBUG (on stderr)")


def check_options(args: argparse.Namespace, device: str) -> str:
    """The password; raises :class:`UsageError` (and the key file's
    errors) for what argparse could not see."""
    configure_logging(args.verbose)
    if not args.verbose:
        # The applications say themselves what went wrong, in one line.
        logging.getLogger("slixmpp").setLevel(logging.CRITICAL)
    jid = JID.parse(args.jid)
    if not jid.resource:
        raise UsageError(f"{args.jid}: give a full JID, with a resource "
                         f"(e.g. {jid.bare}/{device})")
    password = read_password_file(args.password_file)
    if args.no_dtx:
        return password
    if args.key_file is None:
        raise UsageError("--key-file KEYFILE is needed (or --no-dtx): make one with "
                         f"'dtx keygen --jid {args.jid} --out KEYFILE'")
    identity = load_identity(args.key_file)
    if identity.jid.full != jid.full:
        raise UsageError(f"--key-file {args.key_file} is the key of {identity.jid}, "
                         f"not of {jid.full}")
    return password


def make_client(args: argparse.Namespace, password: str) -> ClientXMPP:
    """A slixmpp client, with the dtx plugin unless ``--no-dtx``."""
    xmpp = ClientXMPP(args.jid, password)
    xmpp.register_plugin("xep_0030")
    if not args.no_dtx:
        xmpp.register_plugin("dtx", {"key_file": args.key_file}, module="dtx.slixmpp")
    # STARTTLS on the server's port; slixmpp logs in over an unencrypted
    # stream only when told to (a test server without TLS).
    xmpp.enable_direct_tls = False
    if args.allow_plaintext:
        mechs = xmpp.plugin["feature_mechanisms"]
        mechs.unencrypted_plain = True
        mechs.unencrypted_scram = True
    return xmpp


async def log_in(xmpp: ClientXMPP, args: argparse.Namespace) -> None:
    """Connect, send the first presence, and return when the application
    can run: once the session is up, and with dtx once the plugin is ready
    too (or after ``--timeout`` without it, the application then going
    through the server). Raises :class:`ConnectError`,
    :class:`AuthenticationError`, or :class:`DtxError` (no TLS)."""
    where = "%s:%d" % args.server if args.server else JID.parse(args.jid).domain
    loop = asyncio.get_running_loop()
    started: asyncio.Future[None] = loop.create_future()
    ready = asyncio.Event()

    def fail(exc: Exception) -> None:
        if not started.done():
            started.set_exception(exc)

    def on_session_start(_: Any) -> None:
        xmpp.get_roster()
        xmpp.send_presence()
        if not started.done():
            started.set_result(None)

    xmpp.add_event_handler("session_start", on_session_start)
    xmpp.add_event_handler("dtx_ready", lambda _=None: ready.set())
    xmpp.add_event_handler("no_auth", lambda _=None: fail(DtxError(
        f"{where} offers no way of logging in here: it offers no TLS "
        "(--allow-plaintext allows that, for test servers only)")))
    xmpp.add_event_handler("failed_auth", lambda _=None: fail(AuthenticationError(
        f"{where} refused the login of {JID.parse(args.jid).bare}")))
    xmpp.add_event_handler("connection_failed", lambda exc: fail(ConnectError(
        f"{where}: {exc}")))
    xmpp.add_event_handler("disconnected", lambda reason: fail(ConnectError(
        f"{where} closed the connection during the login ({reason})")))
    if args.server is not None:
        xmpp.connect(*args.server)
    else:
        xmpp.connect()
    try:
        await asyncio.wait_for(started, args.timeout)
    except TimeoutError:
        raise ConnectError(f"no session with {where} within {args.timeout} s") from None
    finally:
        if not started.done() or started.exception() is not None:
            xmpp.disconnect(wait=0)
    if "dtx" in xmpp.plugin:
        try:
            await asyncio.wait_for(ready.wait(), args.timeout)
        except TimeoutError:
            print(f"dtx did not start within {args.timeout} s: everything goes "
                  "through the server", file=sys.stderr, flush=True)


def path_of(xmpp: ClientXMPP, jid: str) -> str:
    """``lan``, ``direct`` or ``relay`` while a dtx session with ``jid`` is
    up, else ``server``."""
    if "dtx" not in xmpp.plugin:
        return "server"
    return xmpp.plugin["dtx"].path(jid) or "server"


async def log_out(xmpp: ClientXMPP) -> None:
    """End the dtx sessions (the peer learns it at once; see the README's
    known problems), then close the stream (what is queued goes first),
    within a few seconds."""
    if "dtx" in xmpp.plugin:
        try:
            await asyncio.wait_for(xmpp.plugin["dtx"].close(), 3.0)
        except TimeoutError:
            pass
    closed = xmpp.disconnect(wait=1.0)
    try:
        await asyncio.wait_for(closed, 2.0)
    except TimeoutError:
        pass


def stop_on_signals() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM (a clean stop, exit 0)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


def main(device: str, parser: argparse.ArgumentParser,
         run: Callable[[argparse.Namespace, str], Coroutine[Any, Any, int]]) -> int:
    """Parse ``sys.argv``, check, run ``run(args, password)``; one line
    and an exit code for every failure."""
    args = parser.parse_intermixed_args()
    return run_command(parser.prog,
                       lambda: asyncio.run(run(args, check_options(args, device))))
