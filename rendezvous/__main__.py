"""``dtx-rendezvous`` / ``python -m rendezvous``: run the rendezvous server.

Prints one line, ``rendezvous listening on HOST:PORT ...`` (with the
event loop it runs on, ``--loop``), once every socket is bound, and exits
cleanly (0) on SIGTERM or SIGINT.

Arguments are checked by the shared types of :mod:`dtx.cliargs` and fail
with the exit codes of every dtx command: 2 bad usage (an argument, a
password file, a name that does not resolve, an address that cannot be
bound), 3 the XMPP login refused, 4 no XMPP server, 1 anything else.
``docs/cli.md`` has the table of bad arguments, which the tests run.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import signal
import sys
from collections.abc import Sequence

from dtx.aio.loop import running_loop_name
from dtx.cliargs import (
    UsageError,
    add_loop_option,
    bind_failure,
    configure_logging,
    family_of,
    format_address,
    parse_directory,
    parse_file,
    parse_hostport,
    parse_ip,
    parse_jid,
    parse_listen_hostport,
    parse_port,
    parse_timeout,
    resolve_hostport,
    run_command,
    run_loop,
)
from rendezvous.core import RendezvousConfig
from rendezvous.server import BindError, serve

logger = logging.getLogger("rendezvous")

MAX_SECONDS = 0xFFFFFFFF
"""``--lifetime`` and ``--keepalive`` are sent to devices as whole seconds
in 32 bits (docs/protocol.md 7.2)."""

DEFAULT_VCARD_TTL = 60.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dtx-rendezvous",
        description="dtx rendezvous server: STUN, signed registration, introductions, relay.",
    )
    parser.add_argument("--listen", type=parse_listen_hostport, default=("0.0.0.0", 3478),
                        metavar="HOST:PORT",
                        help="primary address (default 0.0.0.0:3478; port 0: any free port)")
    parser.add_argument("--alt-address", type=parse_ip, metavar="IP",
                        help="second IP for RFC 5780 NAT tests (STUN also on port+1 of both)")
    parser.add_argument("--mapping-port", type=parse_port, metavar="PORT",
                        help="port on the --listen IP where devices show whether their NAT "
                             "maps per destination (default: the listen port + 1, which is "
                             "the alternate port with --alt-address; 0: any free port)")
    parser.add_argument("--no-mapping-port", action="store_true",
                        help="no NAT mapping check (devices are not told of one)")
    parser.add_argument("--vcards", metavar="DIR", type=parse_directory,
                        help="folder of account vCards, <bare JID>.xml")
    parser.add_argument("--xmpp-account", metavar="JID", type=parse_jid,
                        help="check registrations against live vCards, fetched over XMPP "
                             "as this account (instead of --vcards)")
    parser.add_argument("--password-file", metavar="FILE", type=parse_file,
                        help="with --xmpp-account: file whose first line is its password "
                             "(mode 0600)")
    parser.add_argument("--server", type=parse_hostport, metavar="HOST:PORT",
                        help="with --xmpp-account: the XMPP server (default: the JID's domain)")
    parser.add_argument("--allow-plaintext", action="store_true",
                        help="with --xmpp-account: log in without TLS (test servers only)")
    parser.add_argument("--vcard-ttl", type=parse_timeout, default=None,
                        help="with --xmpp-account: seconds a fetched vCard is trusted "
                             f"(default {DEFAULT_VCARD_TTL:g})")
    parser.add_argument("--no-relay", action="store_true", help="do not relay traffic")
    defaults = RendezvousConfig()
    parser.add_argument("--relay-frames-per-s", type=parse_timeout, metavar="N",
                        default=defaults.relay_frames_per_s,
                        help="relayed frames a device may send per second, with a burst of "
                             f"a quarter second's (default {defaults.relay_frames_per_s:g})")
    parser.add_argument("--relay-bytes-per-s", type=parse_timeout, metavar="N",
                        default=defaults.relay_bytes_per_s,
                        help="relayed bytes a device may send per second, with a burst of "
                             f"a quarter second's (default {defaults.relay_bytes_per_s:g})")
    parser.add_argument("--lifetime", type=parse_timeout, default=90.0,
                        help="registration lifetime, seconds (default 90)")
    parser.add_argument("--keepalive", type=parse_timeout, default=25.0,
                        help="keepalive interval asked of devices, seconds, less than the "
                             "lifetime (default 25)")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="-v: log every registration and introduction; -vv: every packet")
    add_loop_option(parser)
    return parser


def check_arguments(args: argparse.Namespace) -> None:
    """What argparse's types cannot see: options that go together, and the
    ``--listen`` name resolved (in place). Raises :class:`UsageError`."""
    if args.xmpp_account is None:
        for flag, value in (("--password-file", args.password_file),
                            ("--server", args.server),
                            ("--allow-plaintext", args.allow_plaintext or None),
                            ("--vcard-ttl", args.vcard_ttl)):
            if value is not None:
                raise UsageError(f"{flag} is for --xmpp-account, which is not given")
    elif args.password_file is None:
        raise UsageError("--xmpp-account needs --password-file")
    elif args.vcards is not None:
        raise UsageError("give --vcards or --xmpp-account, not both")
    for flag in ("--lifetime", "--keepalive"):
        value = getattr(args, flag[2:])
        if not 1 <= value <= MAX_SECONDS:
            raise UsageError(f"{flag} {value:g}: must be from 1 to {MAX_SECONDS} seconds "
                             "(it is sent to devices in whole seconds)")
    if args.keepalive >= args.lifetime:
        raise UsageError(f"--keepalive {args.keepalive:g} must be less than --lifetime "
                         f"{args.lifetime:g} (a registration would expire between keepalives)")
    _check_mapping_port(args)
    args.listen = resolve_hostport(args.listen, "--listen")
    if args.alt_address is not None:
        ip = args.listen[0]
        if ipaddress.ip_address(ip).is_unspecified:
            raise UsageError("--alt-address needs --listen with a concrete IP "
                             "(RFC 5780 names it)")
        if family_of(args.alt_address) != family_of(ip):
            raise UsageError(f"--alt-address {args.alt_address}: not of the family of "
                             f"--listen {ip}")
        if ipaddress.ip_address(args.alt_address) == ipaddress.ip_address(ip):
            raise UsageError(f"--alt-address {args.alt_address}: the --listen IP itself; "
                             "RFC 5780 needs a second one")


def _check_mapping_port(args: argparse.Namespace) -> None:
    port, listen_port = args.mapping_port, args.listen[1]
    if port is None:
        if listen_port == 0xFFFF and args.alt_address is not None:
            raise UsageError("--listen port 65535 leaves no port + 1 for --alt-address")
        if listen_port == 0xFFFF and not args.no_mapping_port:
            raise UsageError("--listen port 65535 leaves no port + 1 for the mapping port: "
                             "give --mapping-port PORT or --no-mapping-port")
        return
    if args.no_mapping_port:
        raise UsageError("give --mapping-port or --no-mapping-port, not both")
    if args.alt_address is not None:
        raise UsageError("--mapping-port is for a server without --alt-address: with it, the "
                         "mapping port is the alternate port, the listen port + 1")
    if port != 0 and port == listen_port:
        raise UsageError(f"--mapping-port {port}: the --listen port itself; it needs a "
                         "second port")


def _mapping_port(args: argparse.Namespace) -> bool | int:
    """``serve``'s ``mapping_port`` for the command line."""
    if args.no_mapping_port:
        return False
    return True if args.mapping_port is None else int(args.mapping_port)


def relay_config(args: argparse.Namespace) -> RendezvousConfig:
    """The core's configuration from the command line."""
    return RendezvousConfig(
        lifetime=args.lifetime, keepalive=args.keepalive, relay=not args.no_relay,
        relay_frames_per_s=args.relay_frames_per_s,
        relay_burst_frames=args.relay_frames_per_s / 4,
        relay_bytes_per_s=args.relay_bytes_per_s,
        relay_burst_bytes=args.relay_bytes_per_s / 4,
    )


async def _run(args: argparse.Namespace) -> int:
    config = relay_config(args)
    lookup = None
    if args.xmpp_account is not None:
        from dtx.xmpp.cli import read_password_file

        from .xmpp import XmppKeyLookup

        lookup = XmppKeyLookup(
            args.xmpp_account,
            read_password_file(args.password_file),
            server=args.server,
            allow_plaintext=args.allow_plaintext,
            ttl=DEFAULT_VCARD_TTL if args.vcard_ttl is None else args.vcard_ttl,
        )
        await lookup.start()
    try:
        server = await serve(args.listen, alt_ip=args.alt_address,
                             mapping_port=_mapping_port(args), vcards=args.vcards,
                             config=config, key_lookup=lookup)
    except OSError as exc:
        if lookup is not None:
            await lookup.close()
        where = exc.address if isinstance(exc, BindError) else args.listen
        usage = bind_failure(exc, *where, listen=True)
        if usage is None:
            raise
        if args.alt_address is None and where[1] != args.listen[1]:
            # the only other socket is the mapping port's
            raise UsageError(f"{usage}; it is the mapping port: choose another with "
                             "--mapping-port, or none with --no-mapping-port") from None
        raise usage from None
    except BaseException:
        if lookup is not None:
            await lookup.close()
        raise
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    extra = ""
    if len(server.addresses.sockets()) > 1:
        extra = " (STUN also on " + ", ".join(
            format_address(h, p) for h, p in server.addresses.sockets()[1:]
        ) + ")"
    relay = "relay off" if args.no_relay else "relay on"
    mapping = server.addresses.mapping_port
    relay += ", no mapping port" if mapping is None else f", mapping port {mapping}"
    relay += f", {running_loop_name()} loop"
    print(f"rendezvous listening on {format_address(*server.address)} {relay}{extra}",
          flush=True)
    try:
        await stop.wait()
    finally:
        server.close()
        if lookup is not None:
            await lookup.close()
    stats = server.statistics()
    logger.info("stopped: %s", " ".join(f"{k}={v}" for k, v in sorted(stats.items())))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)

    def run() -> int:
        check_arguments(args)
        return run_loop(args, _run(args))

    return run_command("dtx-rendezvous", run)


if __name__ == "__main__":
    sys.exit(main())
