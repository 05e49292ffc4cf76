"""What every dtx command line shares: argument types, name resolution,
the errors of binding a local address, logging and exit codes.

Used by ``dtx`` (:mod:`dtx.cli`), ``dtx nat-check`` and ``python -m
dtx.natcheck`` (:mod:`dtx.natcheck`), ``dtx vcard publish|fetch``
(:mod:`dtx.xmpp.cli`) and ``dtx-rendezvous`` / ``python -m rendezvous``
(:mod:`rendezvous.__main__`), so that one bad value gets one message and
one exit code whichever command it was given to. ``docs/cli.md`` lists
them, with a table of bad arguments that the tests run.

The ``parse_*`` functions are argparse ``type=`` functions: a bad value
raises :class:`argparse.ArgumentTypeError` with a one-line message, which
argparse prints after the usage, exiting 2 before anything starts. They
check syntax only; host names are resolved afterwards, once, by
:func:`resolve_host` and :func:`resolve_endpoints`, to an address of the
local socket's family. What cannot be known from the text (a name that
does not resolve, a port in use) is a :class:`UsageError`, which
:func:`run_command` turns into exit 2 as well.

Importing this module loads no asyncio driver and not :mod:`dtx.cli`.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import logging
import math
import os
import socket
import sys
from collections.abc import Callable, Coroutine, Iterable
from pathlib import Path
from typing import Any, TypeVar

from .errors import (
    AuthenticationError,
    ConnectError,
    DtxError,
    JIDError,
    KeyFileError,
    LoopUnavailableError,
    TrustError,
    VCardError,
)
from .jid import JID
from .wire.address import format_address

__all__ = [
    "BIND_ERRNOS",
    "EXIT_CONNECT",
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_TRUST",
    "EXIT_USAGE",
    "UsageError",
    "add_loop_option",
    "bind_failure",
    "configure_logging",
    "family_of",
    "format_address",
    "parse_bind_host",
    "parse_count",
    "parse_delay",
    "parse_directory",
    "parse_file",
    "parse_hostport",
    "parse_ip",
    "parse_jid",
    "parse_listen_hostport",
    "parse_loop",
    "parse_output_directory",
    "parse_port",
    "parse_sessions",
    "parse_timeout",
    "resolve_endpoints",
    "resolve_host",
    "resolve_hostport",
    "run_command",
    "run_loop",
]

EXIT_ERROR, EXIT_USAGE, EXIT_TRUST, EXIT_CONNECT = 1, 2, 3, 4
EXIT_INTERRUPTED = 130

BIND_ERRNOS = frozenset({errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES,
                         errno.EPERM, errno.EAFNOSUPPORT, errno.EINVAL})
"""Errors of binding a UDP socket that the command line can fix (exit 2)."""

logger = logging.getLogger(__name__)

T = TypeVar("T")


class UsageError(DtxError):
    """The command line does not say enough to act on, or names something
    that cannot be used (a name that does not resolve, a port in use)."""


# -- argument types (argparse ``type=``: a bad value is exit 2 with its message) -----


def _ascii_digits(text: str, most: int) -> bool:
    return 0 < len(text) <= most and text.isascii() and text.isdigit()


def _check_host_text(host: str, text: str, empty: str) -> None:
    if not host:
        raise argparse.ArgumentTypeError(f"{text!r} {empty}")
    if not host.isprintable() or any(c.isspace() for c in host):
        raise argparse.ArgumentTypeError(f"{text!r}: the host has spaces or control characters")


def _split_hostport(text: str, lowest: int) -> tuple[str, int]:
    """``HOST:PORT`` with the port from ``lowest`` to 65535."""
    host, sep, port_text = text.rpartition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r} has no port; expected HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if not _is_ipv6(host):
            raise argparse.ArgumentTypeError(f"{text!r}: [{host}] is not an IPv6 address")
    elif ":" in host:
        raise argparse.ArgumentTypeError(
            f"{text!r}: write an IPv6 address in brackets, as [::1]:5300")
    _check_host_text(host, text, "has no host; expected HOST:PORT")
    if not _ascii_digits(port_text, 5) or not lowest <= int(port_text) <= 65535:
        any_port = " (0 picks any free port)" if lowest == 0 else ""
        raise argparse.ArgumentTypeError(
            f"{text!r}: the port must be a number from {lowest} to 65535{any_port}")
    return host, int(port_text)


def parse_hostport(text: str) -> tuple[str, int]:
    """A remote ``HOST:PORT``, an IPv6 address in brackets (``[::1]:5300``);
    port 1-65535.

    Only the syntax: a host name is resolved later (:func:`resolve_host`)."""
    return _split_hostport(text, 1)


def parse_listen_hostport(text: str) -> tuple[str, int]:
    """A local ``HOST:PORT`` to listen on, as :func:`parse_hostport` but
    port 0 (any free port) allowed."""
    return _split_hostport(text, 0)


def parse_bind_host(text: str) -> str:
    """A local address to bind: an IP address or a host name (``[::1]`` too)."""
    host = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    _check_host_text(host, text, "is not an address or host name")
    return host


def parse_ip(text: str) -> str:
    """An IP address (no name), normalised (``2001:DB8::1`` → ``2001:db8::1``)."""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IP address") from None


def parse_ipv4(text: str) -> str:
    """An IPv4 address (no name): what PCP and NAT-PMP gateways have."""
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IPv4 address") from None


def parse_port(text: str) -> int:
    """A local UDP port, 0 (any free port) to 65535."""
    if not _ascii_digits(text, 5) or int(text) > 65535:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a port (0 to 65535; 0 picks any free port)")
    return int(text)


def parse_count(text: str) -> int:
    """A whole number of at least 1."""
    if not _ascii_digits(text, 18) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number of at least 1")
    return int(text)


def parse_sessions(text: str) -> int:
    """A whole number, 0 or more."""
    if not _ascii_digits(text, 18):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number, 0 or more")
    return int(text)


def _seconds(text: str, *, zero: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        bound = ">= 0" if zero else "> 0"
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected a finite number of seconds {bound}")
    return value


def parse_timeout(text: str) -> float:
    """Seconds, finite and > 0 (``nan``, ``inf`` refused)."""
    return _seconds(text, zero=False)


def parse_delay(text: str) -> float:
    """Seconds, finite and >= 0."""
    return _seconds(text, zero=True)


def parse_jid(text: str) -> str:
    """A JID (RFC 7622, as dtx accepts them); returned as given."""
    try:
        JID.parse(text)
    except JIDError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a JID: {exc}") from None
    return text


def parse_directory(text: str) -> str:
    """An existing folder."""
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text}: no such folder")
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: not a folder")
    return text


def parse_output_directory(text: str) -> str:
    """A folder to write into: an existing one, or a path where one can be
    made (nothing there yet); an existing file is refused."""
    if not text:
        raise argparse.ArgumentTypeError("'' is not a folder name")
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: not a folder")
    return text


def parse_file(text: str) -> str:
    """An existing regular file (whether it can be read is found when it is)."""
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text}: not a regular file")
    return text


def parse_loop(text: str) -> str:
    """An event loop (:mod:`dtx.aio.loop`): ``auto``, ``uvloop`` (installed)
    or ``asyncio``."""
    from .aio.loop import LOOP_ENV, LOOPS, uvloop_missing

    if text not in LOOPS:
        source = f" (from {LOOP_ENV})" if os.environ.get(LOOP_ENV) == text else ""
        raise argparse.ArgumentTypeError(
            f"{text!r}{source}: expected {', '.join(LOOPS[:-1])} or {LOOPS[-1]}")
    missing = uvloop_missing() if text == "uvloop" else None
    if missing is not None:
        raise argparse.ArgumentTypeError(f"{missing}; give --loop auto or --loop asyncio")
    return text


def add_loop_option(parser: argparse.ArgumentParser) -> None:
    """``--loop {auto,uvloop,asyncio}`` on ``parser``; the default is
    ``$DTX_LOOP``, else ``auto`` (checked as a given value is)."""
    from .aio.loop import LOOP_ENV, LOOPS, default_loop

    parser.add_argument("--loop", type=parse_loop, default=default_loop(),
                        metavar="{" + ",".join(LOOPS) + "}",
                        help="event loop: auto (uvloop where installed, else asyncio's), "
                        f"uvloop or asyncio (default: ${LOOP_ENV}, else auto)")


def run_loop(args: argparse.Namespace, main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on the event loop ``args.loop`` names (the option of
    :func:`add_loop_option`; its default for a command registered on a
    parser without it) and return its result."""
    from .aio.loop import default_loop, run

    return run(main, loop=getattr(args, "loop", None) or default_loop())


# -- addresses --------------------------------------------------------------------------


def _is_ipv6(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).version == 6
    except ValueError:
        return False


def _family_name(family: int) -> str:
    return "IPv6" if family == socket.AF_INET6 else "IPv4"


def family_of(ip: str) -> int:
    """``AF_INET6`` for an IPv6 address, else ``AF_INET``."""
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def resolve_host(host: str, flag: str, family: int | None = None, *,
                 shown: str | None = None) -> str:
    """``host`` as an IP address: itself if it is one, else the first address
    the resolver gives of ``family`` (any family, IPv4 first, when None).
    Raises :class:`UsageError` naming ``flag`` and ``shown`` (the argument
    as given; ``host`` by default)."""
    where = f"{flag} {shown or host}"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        have = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        if family is not None and have != family:
            raise UsageError(
                f"{where}: an {_family_name(have)} address, but the local socket is "
                f"{_family_name(family)}; give an {_family_name(family)} address, or bind "
                f"an {_family_name(have)} one")
        return str(ip)
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM)
    except socket.gaierror as exc:
        raise UsageError(f"{where}: cannot resolve the name: {exc.strerror}") from None
    except (UnicodeError, ValueError) as exc:
        raise UsageError(f"{where}: not a host name: {exc}") from None
    wanted = [family] if family is not None else [socket.AF_INET, socket.AF_INET6]
    for fam in wanted:
        for info_family, _, _, _, sockaddr in infos:
            if info_family == fam:
                return str(sockaddr[0])
    raise UsageError(f"{where}: the name has no {_family_name(wanted[0])} address "
                     "(the local socket's family)")


def resolve_hostport(addr: tuple[str, int], flag: str,
                     family: int | None = None) -> tuple[str, int]:
    """:func:`resolve_host` for the host of a ``(host, port)`` pair."""
    host, port = addr
    return resolve_host(host, flag, family, shown=format_address(host, port)), port


def resolve_endpoints(args: argparse.Namespace, local_flag: str, local: str,
                      remote_flags: Iterable[str] = ("--addr", "--rendezvous")) -> None:
    """Resolve the local address ``local`` (of ``local_flag``) and every
    remote ``HOST:PORT`` of ``remote_flags`` in ``args`` to IP addresses of
    the same family, in place. Raises :class:`UsageError`."""
    ip = resolve_host(local, local_flag)
    setattr(args, local_flag.lstrip("-").replace("-", "_"), ip)
    family = family_of(ip)
    for flag in remote_flags:
        name = flag.lstrip("-").replace("-", "_")
        value = getattr(args, name, None)
        if value is not None:
            setattr(args, name, resolve_hostport(value, flag, family))


def bind_failure(exc: OSError, host: str, port: int, *, listen: bool) -> UsageError | None:
    """The :class:`UsageError` for a local socket that could not be bound to
    ``(host, port)`` (port in use, not this host's address ...), naming the
    address; None for an error the command line cannot fix."""
    if exc.errno not in BIND_ERRNOS:
        return None
    hint = ""
    if exc.errno == errno.EADDRINUSE:
        hint = " (another program uses it; choose another port, or 0 for any free one)"
    elif exc.errno == errno.EADDRNOTAVAIL:
        hint = " (not an address of this host)"
    if listen:
        where = f"listen on {format_address(host, port)}"
    else:
        where = f"bind {format_address(host, port) if port else host}"
    return UsageError(f"cannot {where}: {exc.strerror or exc}{hint}")


# -- running a command ------------------------------------------------------------------


def configure_logging(verbose: int) -> None:
    """Log to stderr: warnings, ``-v`` (1) INFO, ``-vv`` (2 or more) DEBUG."""
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)]
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def run_command(prog: str, command: Callable[[], int]) -> int:
    """Run ``command`` and return its exit code; every failure becomes one
    line on stderr, ``PROG: ...``, and its code: 3 a key refused, 4 no
    connection, 2 bad usage (key file, vCard, JID, :class:`UsageError`, an
    event loop that is not installed),
    1 any other error (an unexpected one says ``internal error``, with its
    traceback logged at DEBUG), 130 interrupted."""
    try:
        return int(command())
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except (TrustError, AuthenticationError) as exc:
        print(f"{prog}: refused: {exc}", file=sys.stderr)
        return EXIT_TRUST
    except (ConnectError, TimeoutError) as exc:
        print(f"{prog}: could not connect: {str(exc) or 'timed out'}", file=sys.stderr)
        return EXIT_CONNECT
    except (KeyFileError, VCardError, JIDError, UsageError, LoopUnavailableError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (DtxError, OSError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:  # noqa: BLE001 - a bug: one line, the traceback with -vv
        logger.debug("unexpected error", exc_info=True)
        print(f"{prog}: internal error: {type(exc).__name__}: {exc} (run with -vv for details)",
              file=sys.stderr)
        return EXIT_ERROR
