"""``python -m dtx.aio.mdns advertise|resolve|browse|lookup``: LAN discovery
from the command line, for people and for the namespace tests. One JSON
object per line on stdout; every error is one line on stderr and an exit
code (2 for a bad argument or a name that cannot be announced, 1 when a
lookup or resolve finds nothing), never a traceback.

XEP-0174 presence is announced by ``dtx listen --lan --presence``, which
runs the TCP listener the record names; ``advertise`` announces only
``_dtx._udp``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import re
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from zeroconf import BadTypeInNameException, IPVersion
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from dtx.aio.mdns import (
    DEFAULT_RESOLVE_SETTLE,
    MAX_LABEL_BYTES,
    PRESENCE_TYPE,
    DeviceFound,
    LanAdvertiser,
    LanBrowser,
    LanEvent,
    SERVICE_TYPE,
)
from dtx.cliargs import add_loop_option, run_loop
from dtx.errors import DiscoveryError, FingerprintError, JIDError, LoopUnavailableError

__all__ = ["main", "normal_service_type"]

# RFC 6763 section 7: "_" and a service name of 1 to 15 letters, digits and
# inner hyphens (at least one letter), then _tcp or _udp; here in .local.
_SERVICE_TYPE = re.compile(r"_(?=[a-z0-9-]*[a-z])[a-z0-9](?:[a-z0-9-]{0,13}[a-z0-9])?"
                           r"\._(?:tcp|udp)\.local\.", re.ASCII | re.IGNORECASE)


def normal_service_type(text: str) -> str:
    """A DNS-SD service type in the form zeroconf wants: ``_presence._tcp``,
    ``_presence._tcp.local`` and ``_presence._tcp.local.`` all give
    ``_presence._tcp.local.``. Raises :class:`DiscoveryError` for anything
    that is not ``_name._tcp`` or ``_name._udp`` (RFC 6763 section 7)."""
    name = text.strip().rstrip(".")
    if not name.endswith(".local"):
        name += ".local"
    name += "."
    if "--" in name or not _SERVICE_TYPE.fullmatch(name):
        raise DiscoveryError(f"{text!r} is not a DNS-SD service type such as _presence._tcp")
    return name


def _service_type(text: str) -> str:
    try:
        return normal_service_type(text)
    except DiscoveryError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _instance(text: str) -> str:
    if not text or len(text.encode("utf-8")) > MAX_LABEL_BYTES or "." in text:
        raise argparse.ArgumentTypeError(
            f"{text!r}: an instance name is one DNS label (1 to {MAX_LABEL_BYTES} bytes, "
            "no dots)")
    return text


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a finite number of seconds > 0")
    return value


def _port(text: str) -> int:
    if not (text.isascii() and text.isdigit() and 0 < int(text) < 65536):
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (1 to 65535)")
    return int(text)


def _emit(obj: Mapping[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def _advertise(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    started = time.monotonic()
    async with LanAdvertiser(args.jid, args.fingerprint, args.port,
                             addresses=args.address or None) as adv:
        _emit({"event": "announced", "jid": adv.jid, "fingerprint": adv.fingerprint,
               "instance": adv.instance, "addresses": adv.addresses, "port": adv.port,
               "seconds": round(time.monotonic() - started, 3)})
        await stop.wait()
    return 0


async def _resolve(args: argparse.Namespace) -> int:
    started = time.monotonic()
    async with LanBrowser() as browser:
        if args.count is not None:
            found = await browser.wait_records(args.jid, count=args.count,
                                               timeout=args.timeout, trusted=args.trusted)
        else:
            found = await browser.resolve(args.jid, timeout=args.timeout,
                                          settle=args.settle, trusted=args.trusted)
        elapsed = time.monotonic() - started
        _emit({"jid": args.jid, "records": [r.to_json() for r in found],
               "seconds": round(elapsed, 3)})
    return 0 if found else 1


async def _browse(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    started = time.monotonic()

    def show(event: LanEvent) -> None:
        kind = "found" if isinstance(event, DeviceFound) else "lost"
        _emit({"event": kind, "record": event.record.to_json(),
               "seconds": round(time.monotonic() - started, 3)})

    async with LanBrowser(on_event=show):
        _emit({"event": "browsing", "type": SERVICE_TYPE})
        await stop.wait()
    return 0


async def _lookup(args: argparse.Namespace) -> int:
    started = time.monotonic()
    async with AsyncZeroconf(ip_version=IPVersion.V4Only) as zc:
        try:
            info = AsyncServiceInfo(args.type, f"{args.instance}.{args.type}")
        except BadTypeInNameException as exc:
            raise DiscoveryError(f"cannot look up {args.instance!r}: {exc}") from None
        ok = await info.async_request(zc.zeroconf, args.timeout * 1000)
        text = info.text or b""
        strings: list[str] = []
        pos = 0
        while pos < len(text):
            length = text[pos]
            strings.append(text[pos + 1 : pos + 1 + length].decode("utf-8", "replace"))
            pos += 1 + length
        _emit({"found": ok, "port": info.port, "server": info.server,
               "addresses": info.parsed_addresses(IPVersion.V4Only), "txt": strings,
               "seconds": round(time.monotonic() - started, 3)})
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dtx.aio.mdns",
                                     description="dtx LAN discovery (mDNS/DNS-SD)")
    add_loop_option(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    adv = sub.add_parser("advertise", help="announce a device until SIGTERM/SIGINT")
    adv.add_argument("--jid", required=True)
    adv.add_argument("--fingerprint", required=True)
    adv.add_argument("--port", type=_port, required=True)
    adv.add_argument("--address", action="append", help="IPv4 address to announce (repeatable)")
    res = sub.add_parser("resolve", help="find the devices announcing a JID")
    res.add_argument("jid")
    res.add_argument("--timeout", type=_seconds, default=5.0)
    res.add_argument("--settle", type=_seconds, default=DEFAULT_RESOLVE_SETTLE)
    res.add_argument("--count", type=int, help="wait for this many records instead of settling")
    res.add_argument("--trusted", action="append", default=[], help="fingerprint to list first")
    sub.add_parser("browse", help="print devices as they come and go, until SIGTERM/SIGINT")
    look = sub.add_parser("lookup", help="resolve one service instance, print its raw TXT")
    look.add_argument("--type", type=_service_type, default=PRESENCE_TYPE,
                      help="service type, e.g. _presence._tcp (.local. may be left out)")
    look.add_argument("--instance", type=_instance, required=True)
    look.add_argument("--timeout", type=_seconds, default=5.0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (JSON lines out); returns the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    runner = {"advertise": _advertise, "resolve": _resolve, "browse": _browse,
              "lookup": _lookup}[args.command]
    try:
        return run_loop(args, runner(args))
    except KeyboardInterrupt:
        return 130
    except (DiscoveryError, JIDError, FingerprintError, LoopUnavailableError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    except OSError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
