"""The ``dtx`` command.

Subcommands: ``keygen``, ``fingerprint``, ``vcard``, ``listen``, ``send``,
``ping`` and ``pin``. With ``--json`` a command prints one JSON object on
stdout (``listen`` prints one per line, per event). Errors go to stderr with
a message a person can act on, and a non-zero exit code:

====  =========================================================
code  meaning
====  =========================================================
1     other dtx error
2     bad usage, bad key file, bad vCard
3     trust or authentication refused (either side)
4     could not connect (no answer, timeout)
====  =========================================================
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import stanza as st
from .errors import (
    AuthenticationError,
    ConnectError,
    DtxError,
    JIDError,
    KeyFileError,
    SessionClosedError,
    TrustError,
    VCardError,
)
from .identity import generate_identity, load_identity, save_identity
from .natcheck import add_cli as add_natcheck_cli
from .xmpp.cli import add_cli as add_xmpp_cli
from .trust import PinStore, VCardDirectory, Verifier, add_key, new_vcard

EXIT_ERROR, EXIT_USAGE, EXIT_TRUST, EXIT_CONNECT = 1, 2, 3, 4


class UsageError(DtxError):
    """The command line does not say enough to act on."""


def default_pins_path() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "share"
    )
    return Path(base) / "dtx" / "pins.json"


def parse_hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def percentile(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of non-empty ``samples``."""
    ordered = sorted(samples)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


# -- key and vCard commands ----------------------------------------------------------


def cmd_keygen(args: argparse.Namespace) -> int:
    identity = generate_identity(args.jid)
    save_identity(identity, args.out, overwrite=args.force)
    if args.json:
        emit({"jid": str(identity.jid), "fingerprint": identity.fingerprint,
              "keyfile": str(args.out)})
    else:
        print(f"{identity.jid}  {identity.fingerprint}")
    return 0


def cmd_fingerprint(args: argparse.Namespace) -> int:
    identity = load_identity(args.keyfile)
    if args.json:
        emit({"jid": str(identity.jid), "fingerprint": identity.fingerprint})
    else:
        print(f"{identity.jid}  {identity.fingerprint}")
    return 0


def cmd_vcard(args: argparse.Namespace) -> int:
    identity = load_identity(args.keyfile)
    if args.merge is not None:
        base = Path(args.merge).read_bytes()
    else:
        base = new_vcard(str(identity.jid.bare))
    sys.stdout.write(add_key(base, identity.public_key).decode("utf-8"))
    if not sys.stdout.isatty():
        sys.stdout.write("\n")
    return 0


def cmd_pin(args: argparse.Namespace) -> int:
    pins = PinStore(args.pins)
    if args.action == "forget":
        if not args.jid:
            raise DtxError("pin forget needs a JID")
        removed = pins.forget(args.jid)
        print(f"removed {removed} pin(s) for {args.jid}", file=sys.stderr)
        return 0
    from .identity import fingerprint

    entries = pins.entries()
    if args.json:
        emit({jid: fingerprint(key) for jid, key in sorted(entries.items())})
    else:
        for jid, key in sorted(entries.items()):
            print(f"{jid}  {fingerprint(key)}")
    return 0


# -- session commands ---------------------------------------------------------------


def make_verifier(args: argparse.Namespace) -> Verifier:
    sources = []
    if args.vcards is not None:
        if not Path(args.vcards).is_dir():
            raise DtxError(f"--vcards {args.vcards}: not a directory")
        sources.append(VCardDirectory(args.vcards))
    pins = PinStore(None if args.no_pins else args.pins)
    return Verifier(sources, pins, trust_on_first_use=args.tofu)


def peer_config(args: argparse.Namespace) -> Any:
    from .aio.peer import PeerConfig

    return PeerConfig(connect_timeout=getattr(args, "timeout", 10.0),
                      rendezvous=getattr(args, "rendezvous", None),
                      lan=getattr(args, "lan", False))


async def _connect(args: argparse.Namespace) -> tuple[Any, Any, float]:
    from .aio.peer import Peer

    if args.addr is None and args.rendezvous is None and not args.lan:
        raise UsageError("give --addr HOST:PORT, --rendezvous HOST:PORT or --lan")
    identity = load_identity(args.keyfile)
    peer = Peer(identity, make_verifier(args), config=peer_config(args))
    loop = asyncio.get_running_loop()
    start = loop.time()
    await peer.start(args.bind, 0, listen=False)
    try:
        session = await peer.connect(args.to, args.addr, timeout=args.timeout)
    except BaseException:
        await peer.close()
        raise
    return peer, session, start


def path_report(session: Any, start: float) -> dict[str, Any]:
    """The path keys of the JSON output; times in ms from ``start``."""
    offset = (session.started_at - start) * 1000
    history = [{"at_ms": round(offset + at * 1000, 3), "path": kind}
               for at, kind in session.path_history()]
    direct = session.direct_after()
    return {
        "path": session.path,
        "direct_after_ms": None if direct is None else round(offset + direct * 1000, 3),
        "paths": history,
    }


async def run_send(args: argparse.Namespace) -> int:
    peer, session, start = await _connect(args)
    loop = asyncio.get_running_loop()
    try:
        handshake_ms = (loop.time() - start) * 1000
        session.send(st.message(args.body, to=args.to, type_=args.type))
        await session.wait_acknowledged(timeout=args.timeout)
        connect_ms = (loop.time() - start) * 1000
        if args.linger:
            await asyncio.sleep(args.linger)
        report = path_report(session, start)
        ended = await session.close()
        result = {
            "to": args.to,
            "peer": session.peer_jid,
            "connect_ms": round(connect_ms, 3),
            "handshake_ms": round(handshake_ms, 3),
            **report,
            "delivered": True,
            "closed": "graceful" if ended.error is None else str(ended.error),
        }
    finally:
        await peer.close()
    if args.json:
        emit(result)
    else:
        print(f"delivered to {result['peer']} over {result['path']} "
              f"in {result['connect_ms']:.1f} ms")
    return 0


async def run_ping(args: argparse.Namespace) -> int:
    peer, session, start = await _connect(args)
    loop = asyncio.get_running_loop()
    rtts: list[float] = []
    connect_ms = 0.0
    try:
        first = True
        for i in range(args.count):
            try:
                rtt = await session.ping(timeout=args.timeout)
            except TimeoutError:
                continue
            if first:
                connect_ms = (loop.time() - start) * 1000
                first = False
            rtts.append(rtt * 1000)
            if not args.json:
                print(f"pong from {session.peer_jid}: seq={i} time={rtt * 1000:.2f} ms")
            if args.interval and i + 1 < args.count:
                await asyncio.sleep(args.interval)
        report = path_report(session, start)
        await session.close()
    finally:
        await peer.close()
    if not rtts:
        raise ConnectError(f"no answer to {args.count} pings")
    result = {
        "to": args.to,
        "peer": session.peer_jid,
        "connect_ms": round(connect_ms, 3),
        **report,
        "sent": args.count,
        "received": len(rtts),
        "rtt_ms": {
            "p50": round(percentile(rtts, 50), 3),
            "p99": round(percentile(rtts, 99), 3),
            "min": round(min(rtts), 3),
            "max": round(max(rtts), 3),
            "mean": round(statistics.fmean(rtts), 3),
        },
    }
    if args.json:
        emit(result)
    else:
        r = result["rtt_ms"]
        print(f"{len(rtts)}/{args.count} answered; rtt p50 {r['p50']:.2f} ms, "
              f"p99 {r['p99']:.2f} ms")
    return 0


async def run_listen(args: argparse.Namespace) -> int:
    from .aio.peer import Peer, Session

    identity = load_identity(args.keyfile)
    peer = Peer(identity, make_verifier(args), config=peer_config(args))
    host = args.host or ("0.0.0.0" if args.lan or args.rendezvous else "127.0.0.1")
    await peer.start(host, args.port)
    if args.rendezvous is not None:
        await peer.wait_registered(10.0)
    host, port = peer.address
    say(args, {"event": "listening", "jid": peer.jid, "address": f"{host}:{port}",
               "fingerprint": identity.fingerprint},
        f"listening as {peer.jid} on {host}:{port} ({identity.fingerprint})")

    async def serve(session: Session) -> None:
        say(args, {"event": "session", "peer": session.peer_jid, "path": session.path},
            f"session with {session.peer_jid} over {session.path}")
        session.on_path_change(lambda change: say(
            args, {"event": "path", "peer": session.peer_jid, "path": change.kind.value},
            f"path to {session.peer_jid}: {change.kind.value}"))
        async for el in session:
            body = st.body_of(el)
            tag = el.tag.rpartition("}")[2]
            say(args, {"event": "stanza", "peer": session.peer_jid, "kind": tag,
                       "from": el.get("from"), "body": body},
                f"{tag} from {el.get('from')}: {body if body is not None else ''}")
            if args.echo and el.tag == st.MESSAGE and body is not None:
                try:
                    session.send(st.message(body, to=el.get("from"), type_=el.get("type")))
                except SessionClosedError:
                    break
        ended = await session.wait_closed()
        say(args, {"event": "closed", "peer": session.peer_jid, "path": session.path,
                   "error": None if ended.error is None else str(ended.error)},
            f"session with {session.peer_jid} closed"
            + ("" if ended.error is None else f": {ended.error}"))

    served = 0
    tasks: set[asyncio.Task[None]] = set()
    try:
        while args.sessions == 0 or served < args.sessions:
            session = await peer.accept()
            served += 1
            task = asyncio.create_task(serve(session))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)
    finally:
        await peer.close()
    return 0


def say(args: argparse.Namespace, obj: dict[str, Any], text: str) -> None:
    if args.json:
        emit(obj)
    else:
        print(text, flush=True)


def emit(obj: Any) -> None:
    print(json.dumps(obj, sort_keys=False), flush=True)


# -- parser -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dtx",
        description="End-to-end encrypted XMPP streams between devices.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log more (-v info, -vv debug) to stderr")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--json", action="store_true", help="print JSON on stdout")

    def trust(p: argparse.ArgumentParser) -> None:
        p.add_argument("--vcards", metavar="DIR",
                       help="folder of vCards, one per bare JID (alice@example.org.xml)")
        p.add_argument("--pins", metavar="FILE", default=str(default_pins_path()),
                       help="pin store (default: %(default)s)")
        p.add_argument("--no-pins", action="store_true",
                       help="keep pins in memory only")
        p.add_argument("--tofu", action="store_true",
                       help="trust a JID's key on first use when no vCard lists it")

    p = sub.add_parser("keygen", help="make a device key")
    p.add_argument("--jid", required=True, help="the device's full JID")
    p.add_argument("--out", required=True, metavar="KEYFILE")
    p.add_argument("--force", action="store_true", help="replace an existing file")
    common(p)
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser("fingerprint", help="show a key file's JID and fingerprint")
    p.add_argument("keyfile")
    common(p)
    p.set_defaults(func=cmd_fingerprint)

    p = sub.add_parser("vcard", help="print a vCard carrying this device's key")
    p.add_argument("keyfile")
    p.add_argument("--merge", metavar="VCARD", help="add the key to this vCard")
    p.set_defaults(func=cmd_vcard)

    p = sub.add_parser("pin", help="list or forget pinned keys")
    p.add_argument("action", choices=["list", "forget"])
    p.add_argument("jid", nargs="?")
    p.add_argument("--pins", metavar="FILE", default=str(default_pins_path()))
    common(p)
    p.set_defaults(func=cmd_pin)

    p = sub.add_parser("listen", help="accept sessions")
    p.add_argument("keyfile")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default=None,
                   help="address to bind (default 127.0.0.1; 0.0.0.0 with --lan or --rendezvous)")
    p.add_argument("--rendezvous", type=parse_hostport, metavar="HOST:PORT",
                   help="register with this rendezvous server, so peers reach this device by JID")
    p.add_argument("--lan", action="store_true",
                   help="advertise this device on the LAN (mDNS/DNS-SD, _dtx._udp)")
    p.add_argument("--echo", action="store_true", help="send every message body back")
    p.add_argument("--sessions", type=int, default=0,
                   help="exit after this many sessions ended (0: never)")
    trust(p)
    common(p)
    p.set_defaults(func=lambda a: asyncio.run(run_listen(a)))

    for name, func, helptext in (("send", run_send, "send one message"),
                                 ("ping", run_ping, "XEP-0199 round trips")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("keyfile")
        p.add_argument("--to", required=True, help="JID to reach (bare or full)")
        p.add_argument("--addr", type=parse_hostport, metavar="HOST:PORT",
                       help="the peer's address (or use --rendezvous)")
        p.add_argument("--rendezvous", type=parse_hostport, metavar="HOST:PORT",
                       help="reach the peer by JID through this rendezvous server")
        p.add_argument("--lan", action="store_true",
                       help="look for the peer on the LAN first (mDNS/DNS-SD)")
        p.add_argument("--bind", default="0.0.0.0", help="local address (default %(default)s)")
        p.add_argument("--timeout", type=float, default=10.0, help="seconds (default %(default)s)")
        if name == "send":
            p.add_argument("--body", required=True)
            p.add_argument("--type", default="chat")
            p.add_argument("--linger", type=float, default=0.0,
                           help="seconds to stay connected after delivery (to see the path settle)")
        else:
            p.add_argument("--count", type=int, default=10)
            p.add_argument("--interval", type=float, default=0.0,
                           help="seconds between pings (default %(default)s)")
        trust(p)
        common(p)
        p.set_defaults(func=lambda a, f=func: asyncio.run(f(a)))
    add_natcheck_cli(sub)
    add_xmpp_cli(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # `dtx vcard publish|fetch ...` are spelled vcard-publish / vcard-fetch inside.
    for i, word in enumerate(argv):
        if not word.startswith("-"):
            if word == "vcard" and argv[i + 1 : i + 2] in (["publish"], ["fetch"]):
                argv[i : i + 2] = [f"vcard-{argv[i + 1]}"]
            break
    args = parser.parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except (TrustError, AuthenticationError) as exc:
        print(f"dtx: refused: {exc}", file=sys.stderr)
        return EXIT_TRUST
    except (ConnectError, TimeoutError) as exc:
        print(f"dtx: could not connect: {exc or 'timed out'}", file=sys.stderr)
        return EXIT_CONNECT
    except (KeyFileError, VCardError, JIDError, UsageError) as exc:
        print(f"dtx: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (DtxError, OSError) as exc:
        print(f"dtx: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())

