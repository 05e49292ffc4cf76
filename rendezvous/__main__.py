"""``dtx-rendezvous`` / ``python -m rendezvous``: run the rendezvous server.

Prints one line, ``rendezvous listening on HOST:PORT ...``, once every
socket is bound, and exits cleanly on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import signal
import sys
from collections.abc import Sequence

from dtx.errors import DtxError
from rendezvous.core import RendezvousConfig
from rendezvous.server import serve

logger = logging.getLogger("rendezvous")


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, not {text!r}")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
        number = int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected IP:PORT, not {text!r}") from None
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"port {number} out of range")
    return host, number


def _ip(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an IP address: {text!r}") from None


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dtx-rendezvous",
        description="dtx rendezvous server: STUN, signed registration, introductions, relay.",
    )
    parser.add_argument("--listen", type=_host_port, default=("0.0.0.0", 3478),
                        metavar="HOST:PORT", help="primary address (default 0.0.0.0:3478)")
    parser.add_argument("--alt-address", type=_ip, metavar="IP",
                        help="second IP for RFC 5780 NAT tests (STUN also on port+1 of both)")
    parser.add_argument("--vcards", metavar="DIR",
                        help="folder of account vCards, <bare JID>.xml")
    parser.add_argument("--xmpp-account", metavar="JID",
                        help="check registrations against live vCards, fetched over XMPP "
                             "as this account (instead of --vcards)")
    parser.add_argument("--password-file", metavar="FILE",
                        help="with --xmpp-account: file whose first line is its password "
                             "(mode 0600)")
    parser.add_argument("--server", type=_host_port, metavar="HOST:PORT",
                        help="with --xmpp-account: the XMPP server (default: the JID's domain)")
    parser.add_argument("--allow-plaintext", action="store_true",
                        help="with --xmpp-account: log in without TLS (test servers only)")
    parser.add_argument("--vcard-ttl", type=_positive, default=60.0,
                        help="seconds a fetched vCard is trusted (default 60)")
    parser.add_argument("--no-relay", action="store_true", help="do not relay traffic")
    parser.add_argument("--lifetime", type=_positive, default=90.0,
                        help="registration lifetime, seconds (default 90)")
    parser.add_argument("--keepalive", type=_positive, default=25.0,
                        help="keepalive interval asked of devices, seconds (default 25)")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="-v: log every registration and introduction; -vv: every packet")
    return parser


async def _run(args: argparse.Namespace) -> int:
    config = RendezvousConfig(
        lifetime=args.lifetime, keepalive=args.keepalive, relay=not args.no_relay
    )
    lookup = None
    if args.xmpp_account is not None:
        from dtx.xmpp.cli import read_password_file

        from .xmpp import XmppKeyLookup

        lookup = XmppKeyLookup(
            args.xmpp_account,
            read_password_file(args.password_file),
            server=args.server,
            allow_plaintext=args.allow_plaintext,
            ttl=args.vcard_ttl,
        )
        await lookup.start()
    try:
        server = await serve(args.listen, alt_ip=args.alt_address, vcards=args.vcards,
                             config=config, key_lookup=lookup)
    except BaseException:
        if lookup is not None:
            await lookup.close()
        raise
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    host, port = server.address
    extra = ""
    if len(server.addresses.sockets()) > 1:
        extra = " (STUN also on " + ", ".join(
            f"{h}:{p}" for h, p in server.addresses.sockets()[1:]
        ) + ")"
    relay = "relay off" if args.no_relay else "relay on"
    print(f"rendezvous listening on {host}:{port} {relay}{extra}", flush=True)
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
    level = logging.WARNING if args.verbose == 0 else logging.INFO
    if args.verbose >= 2:
        level = logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.xmpp_account is not None and args.password_file is None:
        print("--xmpp-account needs --password-file", file=sys.stderr)
        return 2
    if args.xmpp_account is not None and args.vcards is not None:
        print("give --vcards or --xmpp-account, not both", file=sys.stderr)
        return 2
    if args.alt_address is not None and ipaddress.ip_address(args.listen[0]).is_unspecified:
        print("--alt-address needs --listen with a concrete IP (RFC 5780 names it)",
              file=sys.stderr)
        return 2
    try:
        return asyncio.run(_run(args))
    except (OSError, DtxError) as exc:
        print(f"dtx-rendezvous: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
