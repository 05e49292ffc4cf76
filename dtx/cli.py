"""The ``dtx`` command.

Subcommands: ``keygen``, ``fingerprint``, ``vcard``, ``listen``, ``send``,
``ping`` and ``pin`` (and ``nat-check``, ``vcard publish``, ``vcard fetch``,
defined beside their code). With ``--json`` a command prints one JSON object
on stdout (``listen`` prints one per line, per event). Errors go to stderr
as one line a person can act on, never a traceback, with a non-zero exit
code:

====  =========================================================
code  meaning
====  =========================================================
1     other dtx error
2     bad usage: a bad argument, key file, vCard or pin store, or a
      local address that cannot be used (port in use, not this host's)
3     trust or authentication refused (either side)
4     could not connect (no answer, timeout)
====  =========================================================

Arguments are checked by argparse ``type=`` functions (exit 2 before
anything starts); host names in ``HOST:PORT`` are resolved once, before the
device starts, to an address of the local socket's family (IPv4 first).
The argument types, the resolution and the exit codes are shared with the
other command lines (:mod:`dtx.cliargs`). ``docs/cli.md`` is the
reference, with every refused argument.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any
from xml.etree.ElementTree import Element, SubElement

from . import stanza as st
from .aio.loop import running_loop_name
from .cliargs import (
    UsageError,
    add_loop_option,
    bind_failure,
    configure_logging,
    format_address,
    parse_bind_host,
    parse_count,
    parse_delay,
    parse_directory,
    parse_hostport,
    parse_ipv4,
    parse_jid,
    parse_port,
    parse_sessions,
    parse_timeout,
    resolve_endpoints,
    run_command,
    run_loop,
)
from .cli_presence import link_local_config, listening_fields, serve_link_local
from .errors import ConnectError, LocalProtocolError, SessionClosedError, TrustError
from .identity import generate_identity, load_identity, save_identity
from .logs import LogLimiter
from .natcheck import add_cli as add_natcheck_cli
from .proto.xmlstream import DEFAULT_MAX_STANZA_BYTES, encode_stanza
from .xmpp.cli import add_cli as add_xmpp_cli
from .xmpp.cli import add_signalling_options, check_signalling_options, read_password_file
from .trust import PinStore, VCardDirectory, Verifier, add_key, new_vcard

MESSAGE_TYPES = ("chat", "normal", "headline", "groupchat")
"""``--type`` values: RFC 6120's message types but ``error`` (an error
message is an answer, not something to send on its own)."""

logger = logging.getLogger(__name__)


def default_pins_path() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "share"
    )
    return Path(base) / "dtx" / "pins.json"


# -- argument types (the shared ones are in dtx.cliargs) -----------------------------


def parse_body(text: str) -> str:
    """Message text that XML can carry (no control characters but tab and
    newlines, no lone surrogates, no U+FFFE/U+FFFF)."""
    try:
        encode_stanza(st.message(text))
    except LocalProtocolError as exc:
        raise argparse.ArgumentTypeError(f"cannot be sent: {exc}") from None
    return text


async def start_peer(peer: Any, host: str, port: int, *, listen: bool) -> None:
    """``peer.start``; a socket this host cannot bind is a :class:`UsageError`
    naming the address and port."""
    try:
        await peer.start(host, port, listen=listen)
    except OSError as exc:
        usage = bind_failure(exc, host, port, listen=listen)
        if usage is None:
            raise
        raise usage from None


def percentile(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of non-empty ``samples``."""
    ordered = sorted(samples)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


# -- key and vCard commands ----------------------------------------------------------


def cmd_keygen(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.is_dir():
        raise UsageError(f"--out {args.out}: is a folder; give a key file name")
    if not out.absolute().parent.is_dir():
        raise UsageError(f"--out {args.out}: no such folder {out.parent}")
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
        try:
            base = Path(args.merge).read_bytes()
        except OSError as exc:
            raise UsageError(f"--merge {args.merge}: {exc.strerror or exc}") from None
    else:
        base = new_vcard(str(identity.jid.bare))
    sys.stdout.write(add_key(base, identity.public_key).decode("utf-8"))
    if not sys.stdout.isatty():
        sys.stdout.write("\n")
    return 0


def open_pins(path: str | None) -> PinStore:
    """The pin store at ``path`` (None: in memory); one that cannot be read
    is a :class:`UsageError` (the file is the user's to fix)."""
    try:
        return PinStore(path)
    except TrustError as exc:
        raise UsageError(f"--pins: {exc}") from None


def cmd_pin(args: argparse.Namespace) -> int:
    pins = open_pins(args.pins)
    if args.action == "forget":
        if args.jid is None:
            raise UsageError("pin forget needs a JID: dtx pin forget JID")
        try:
            removed = pins.forget(args.jid)
        except TrustError as exc:
            raise UsageError(f"--pins: {exc}") from None
        if args.json:
            emit({"jid": args.jid, "removed": removed})
        else:
            print(f"removed {removed} pin(s) for {args.jid}", file=sys.stderr)
        return 0
    if args.jid is not None:
        raise UsageError(f"pin list takes no JID (got {args.jid!r})")
    from .identity import fingerprint

    entries = pins.entries()
    if args.json:
        emit({jid: fingerprint(key) for jid, key in sorted(entries.items())})
    else:
        for jid, key in sorted(entries.items()):
            print(f"{jid}  {fingerprint(key)}")
    return 0


# -- session commands ---------------------------------------------------------------


def make_verifier(args: argparse.Namespace, sources: list[Any] | None = None) -> Verifier:
    """The verifier of a session command: ``sources`` (the XMPP account's
    keys with ``--xmpp``), the ``--vcards`` folder, the pin store."""
    sources = list(sources or ())
    if args.vcards is not None:
        if not Path(args.vcards).is_dir():
            raise UsageError(f"--vcards {args.vcards}: not a folder")
        sources.append(VCardDirectory(args.vcards))
    pins = open_pins(None if args.no_pins else args.pins)
    return Verifier(sources, pins, trust_on_first_use=args.tofu)


RESUME_TIMEOUT = 120.0
"""``--resume-timeout``'s default, PeerConfig's."""

PORT_MAPPING_WAIT = 2.0
"""How long a command waits for the router's port mapping before it goes on
without (the router answers on the LAN in milliseconds)."""


def add_port_mapping_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--port-mapping", action="store_true",
                   help="ask the home router to forward a public port to this device "
                   "(PCP, NAT-PMP) and offer it to peers: hard NATs go direct")
    p.add_argument("--gateway", type=parse_ipv4, metavar="IP",
                   help="the router to ask (implies --port-mapping; default: the default "
                   "route's gateway)")
    p.add_argument("--resume-timeout", type=parse_delay, default=RESUME_TIMEOUT, metavar="S",
                   help="a session whose connection dies waits this long to be resumed on a "
                   f"new one (default {RESUME_TIMEOUT:g}; 0: it ends at once)")


def peer_config(args: argparse.Namespace) -> Any:
    from .aio.peer import PeerConfig

    gateway = getattr(args, "gateway", None)
    resume = getattr(args, "resume_timeout", RESUME_TIMEOUT)
    return PeerConfig(connect_timeout=getattr(args, "timeout", 10.0),
                      resume_timeout=resume or None,
                      rendezvous=getattr(args, "rendezvous", None),
                      lan=getattr(args, "lan", False), link_local=link_local_config(args),
                      port_mapping=getattr(args, "port_mapping", False) or gateway is not None,
                      gateway=gateway)


def session_command(run: Callable[[argparse.Namespace], Coroutine[Any, Any, int]],
                    local_flag: str) -> Callable[[argparse.Namespace], int]:
    """A session command: its addresses resolved (:func:`resolve_endpoints`)
    before the event loop starts, then ``run``."""
    def go(args: argparse.Namespace) -> int:
        check_signalling_options(args)
        if local_flag == "--host":
            local = args.host or ("0.0.0.0" if args.lan or args.rendezvous or args.xmpp
                                  else "127.0.0.1")
        else:
            local = args.bind
        resolve_endpoints(args, local_flag, local)
        return run_loop(args, run(args))
    return go


def check_message_fits(args: argparse.Namespace) -> Element:
    """The message ``send`` sends; one larger than a stanza may be is a
    :class:`UsageError` (found before connecting)."""
    message = st.message(args.body, to=args.to, type_=args.type)
    size = len(encode_stanza(message))
    if size > DEFAULT_MAX_STANZA_BYTES:
        raise UsageError(f"--body: the message would be {size} bytes, over the limit of "
                         f"{DEFAULT_MAX_STANZA_BYTES} bytes a stanza may have")
    return message


class Device:
    """A session command's started peer and, with ``--xmpp``, its
    signalling through the account's server."""

    def __init__(self, peer: Any, signalling: Any | None, args: argparse.Namespace) -> None:
        self.peer = peer
        self.signalling = signalling
        self.args = args

    def signalled_by(self, session: Any) -> str | None:
        """How the session was found: ``lan``, ``xmpp``, ``rendezvous``,
        or None (an address given, or a peer that came with one)."""
        if any(kind == "lan" for _, kind in session.path_history()[:1]):
            return "lan"
        if self.signalling is not None and self.signalling.introduced(session.peer_jid):
            return "xmpp"
        if self.args.rendezvous is not None and getattr(self.args, "addr", None) is None:
            return "rendezvous"
        return None

    def relay_of(self, session: Any, path: str | None = None) -> str | None:
        """On the relay path, whose relay: ``turn`` (the XMPP server's
        coturn) or ``rendezvous``; None on any other path."""
        if (path or session.path) != "relay":
            return None
        return "turn" if self.signalled_by(session) == "xmpp" else "rendezvous"

    async def close(self) -> None:
        try:
            if self.signalling is not None:
                await self.signalling.close()
        finally:
            await self.peer.close()


async def open_device(args: argparse.Namespace, host: str, port: int, *,
                      listen: bool) -> Device:
    """The key file's peer, started on ``host:port``; with ``--xmpp``
    logged in to the account as the key file's full JID."""
    from .aio.peer import Peer

    identity = load_identity(args.keyfile)
    xmpp = check_signalling_options(args)
    signalling = None
    if xmpp is not None:
        from .aio.xmpp import XmppSignalling, XmppSignallingConfig

        signalling = XmppSignalling(identity, read_password_file(args.password_file),
                                    config=XmppSignallingConfig(
                                        xmpp=xmpp, connect_timeout=getattr(args, "timeout",
                                                                           10.0)))
    sources = [] if signalling is None else [signalling.key_source]
    device = Device(Peer(identity, make_verifier(args, sources), config=peer_config(args)),
                    signalling, args)
    try:
        await start_peer(device.peer, host, port, listen=listen)
        if device.peer.config.port_mapping:
            # Before the candidates go out (Jingle; a REGISTER written once
            # the router answered takes it, or registers again).
            await device.peer.wait_port_mapped(min(PORT_MAPPING_WAIT,
                                                   getattr(args, "timeout", PORT_MAPPING_WAIT)))
        if signalling is not None:
            await signalling.start(device.peer)
    except BaseException:
        await device.close()
        raise
    return device


async def _connect(args: argparse.Namespace) -> tuple[Device, Any, float]:
    if args.addr is None and args.rendezvous is None and not args.lan and not args.xmpp:
        raise UsageError("give --addr HOST:PORT, --rendezvous HOST:PORT, --xmpp or --lan")
    loop = asyncio.get_running_loop()
    start = loop.time()
    device = await open_device(args, args.bind, 0, listen=False)
    deadline = start + args.timeout
    try:
        if device.signalling is None:
            session = await device.peer.connect(args.to, args.addr, timeout=args.timeout)
        else:
            session = None
            if args.lan:
                try:
                    session = await device.peer.connect(args.to, timeout=args.timeout)
                except (ConnectError, TrustError) as exc:
                    logger.info("not on the LAN (%s); signalling through the server", exc)
            if session is None:
                session = await device.signalling.connect(
                    args.to, timeout=max(0.0, deadline - loop.time()))
    except BaseException:
        await device.close()
        raise
    return device, session, start


def path_report(device: Device, session: Any, start: float) -> dict[str, Any]:
    """The path keys of the JSON output; times in ms from ``start``."""
    offset = (session.started_at - start) * 1000
    history = [{"at_ms": round(offset + at * 1000, 3), "path": kind}
               for at, kind in session.path_history()]
    direct = session.direct_after()
    mapped = device.peer.port_mapped
    return {
        "port_mapped": None if mapped is None else format_address(*mapped),
        "path": session.path,
        "signalling": device.signalled_by(session),
        "relay": device.relay_of(session),
        "direct_after_ms": None if direct is None else round(offset + direct * 1000, 3),
        "paths": history,
    }


async def run_send(args: argparse.Namespace) -> int:
    message = check_message_fits(args)
    device, session, start = await _connect(args)
    loop = asyncio.get_running_loop()
    try:
        handshake_ms = (loop.time() - start) * 1000
        session.send(message)
        await session.wait_acknowledged(timeout=args.timeout)
        connect_ms = (loop.time() - start) * 1000
        if args.linger:
            await asyncio.sleep(args.linger)
        report = path_report(device, session, start)
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
        await device.close()
    if args.json:
        emit(result)
    else:
        print(f"delivered to {result['peer']} over {result['path']} "
              f"in {result['connect_ms']:.1f} ms")
    return 0


async def run_ping(args: argparse.Namespace) -> int:
    device, session, start = await _connect(args)
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
        report = path_report(device, session, start)
        await session.close()
    finally:
        await device.close()
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
    from .aio.peer import Session

    echo_log = LogLimiter(logger)

    def echo(session: Session, el: Element, body: str) -> bool:
        """Send ``body`` back; False once the session is closed. An echo
        that cannot be sent (the added ``to`` or re-escaped text makes it
        larger than a stanza may be) is answered with a stanza error."""
        try:
            session.send(st.message(body, to=el.get("from"), type_=el.get("type")))
        except SessionClosedError:
            return False
        except LocalProtocolError as exc:
            reason = f"echo not sent: {exc}"
        else:
            return True
        echo_log.warning("echo-refused", session.peer_jid, "message %r from %s: %s",
                         el.get("id"), session.peer_jid, reason)
        say(args, {"event": "echo_refused", "peer": session.peer_jid, "id": el.get("id"),
                   "error": reason},
            f"echo to {session.peer_jid} refused: {reason}")
        try:
            session.send(stanza_error(el, "policy-violation", reason))
        except SessionClosedError:
            return False
        except LocalProtocolError as exc:  # an 'id' or 'from' too large to send back
            echo_log.warning("echo-error-refused", session.peer_jid,
                             "cannot answer %s with an error either: %s", session.peer_jid, exc)
        return True

    async def serve(session: Session) -> None:
        say(args, {"event": "session", "peer": session.peer_jid, "path": session.path,
                   "signalling": device.signalled_by(session),
                   "relay": device.relay_of(session)},
            f"session with {session.peer_jid} over {session.path}")
        session.on_path_change(lambda change: say(
            args, {"event": "path", "peer": session.peer_jid, "path": change.kind.value,
                   "relay": device.relay_of(session, change.kind.value)},
            f"path to {session.peer_jid}: {change.kind.value}"))
        async for el in session:
            body = st.body_of(el)
            tag = el.tag.rpartition("}")[2]
            say(args, {"event": "stanza", "peer": session.peer_jid, "kind": tag,
                       "from": el.get("from"), "body": body},
                f"{tag} from {el.get('from')}: {body if body is not None else ''}")
            if args.echo and el.tag == st.MESSAGE and body is not None \
                    and el.get("type") != "error":
                try:
                    # A peer that does not acknowledge its echoes gets no
                    # more of them (and, as nothing more is read, no credit).
                    await session.drain()
                except SessionClosedError:
                    break
                if not echo(session, el, body):
                    break
        ended = await session.wait_closed()
        say(args, {"event": "closed", "peer": session.peer_jid, "path": session.path,
                   "error": None if ended.error is None else str(ended.error)},
            f"session with {session.peer_jid} closed"
            + ("" if ended.error is None else f": {ended.error}"))

    async def serve_logged(session: Session) -> None:
        """``serve``, with any failure logged and that session ended: one
        session's fault never stops the listener or escapes unretrieved."""
        try:
            await serve(session)
        except Exception as exc:  # noqa: BLE001 - any fault of one session
            logger.error("session with %s failed: %s: %s", session.peer_jid,
                         type(exc).__name__, exc, exc_info=logger.isEnabledFor(logging.DEBUG))
            try:
                await session.close(timeout=2.0)
            except Exception as close_exc:  # noqa: BLE001 - ending it anyway
                logger.debug("closing the failed session: %s", close_exc)
                session.abort()
            say(args, {"event": "closed", "peer": session.peer_jid, "path": session.path,
                       "error": f"{type(exc).__name__}: {exc}"},
                f"session with {session.peer_jid} closed: {type(exc).__name__}: {exc}")

    served = 0
    tasks: set[asyncio.Task[None]] = set()
    device = await open_device(args, args.host, args.port, listen=True)
    peer, signalling = device.peer, device.signalling
    try:
        if args.rendezvous is not None:
            await peer.wait_registered(10.0)
        host, port = peer.address
        fields: dict[str, Any] = {}
        if signalling is not None:
            stats = signalling.statistics()
            fields = {"signalling": "xmpp", "online": stats.online,
                      "relayed": None if stats.relayed is None else format_address(*stats.relayed),
                      "reflexive": None if stats.reflexive is None
                      else format_address(*stats.reflexive)}
            signalling.add_online_listener(lambda online: say(
                args, {"event": "xmpp", "online": online},
                "logged back in to the XMPP server" if online
                else "the XMPP connection dropped; logging back in"))
        elif args.rendezvous is not None:
            fields = {"signalling": "rendezvous"}
        mapped = peer.port_mapped
        if peer.config.port_mapping:
            fields["port_mapped"] = None if mapped is None else format_address(*mapped)
        say(args, {"event": "listening", "jid": peer.jid, "address": format_address(host, port),
                   "host": host, "port": port, "fingerprint": peer.identity.fingerprint,
                   **fields, **listening_fields(peer), "loop": running_loop_name()},
            f"listening as {peer.jid} on {format_address(host, port)} "
            f"({peer.identity.fingerprint})"
            + (" signalling through the XMPP server" if signalling is not None else ""))
        link_local = asyncio.create_task(serve_link_local(
            peer, echo=args.echo, report=lambda obj, text: say(args, obj, text)))
        tasks.add(link_local)
        while args.sessions == 0 or served < args.sessions:
            session = await peer.accept()
            served += 1
            task = asyncio.create_task(serve_logged(session))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        link_local.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        await device.close()
    return 0


def stanza_error(stanza: Element, condition: str, text: str, *,
                 type_: str = "modify") -> Element:
    """The error answering ``stanza`` (RFC 6120 section 8.3): same kind and
    'id', addressed back to its sender, ``condition`` in
    ``urn:ietf:params:xml:ns:xmpp-stanzas`` with ``text``."""
    attrs = {"type": "error"}
    for name, value in (("id", stanza.get("id")), ("to", stanza.get("from"))):
        if value is not None:
            attrs[name] = value
    el = Element(stanza.tag, attrs)
    err = SubElement(el, f"{{{st.NS_CLIENT}}}error", {"type": type_})
    SubElement(err, f"{{{st.NS_STANZAS}}}{condition}")
    SubElement(err, f"{{{st.NS_STANZAS}}}text").text = text
    return el


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
    add_loop_option(parser)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--json", action="store_true", help="print JSON on stdout")

    def trust(p: argparse.ArgumentParser) -> None:
        p.add_argument("--vcards", metavar="DIR", type=parse_directory,
                       help="folder of vCards, one per bare JID (alice@example.org.xml)")
        p.add_argument("--pins", metavar="FILE", default=str(default_pins_path()),
                       help="pin store (default: %(default)s)")
        p.add_argument("--no-pins", action="store_true",
                       help="keep pins in memory only")
        p.add_argument("--tofu", action="store_true",
                       help="trust a JID's key on first use when no vCard lists it")

    p = sub.add_parser("keygen", help="make a device key")
    p.add_argument("--jid", required=True, type=parse_jid, help="the device's full JID")
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
    p.add_argument("jid", nargs="?", type=parse_jid,
                   help="forget: a full JID forgets that device, a bare JID every device "
                   "of the account")
    p.add_argument("--pins", metavar="FILE", default=str(default_pins_path()),
                   help="pin store (default: %(default)s)")
    common(p)
    p.set_defaults(func=cmd_pin)

    p = sub.add_parser("listen", help="accept sessions")
    p.add_argument("keyfile")
    p.add_argument("--port", type=parse_port, default=0,
                   help="UDP port to listen on (default 0: any free port, printed when "
                   "listening)")
    p.add_argument("--host", default=None, type=parse_bind_host,
                   help="address or host name to bind (default 127.0.0.1; 0.0.0.0 with --lan "
                   "or --rendezvous)")
    p.add_argument("--rendezvous", type=parse_hostport, metavar="HOST:PORT",
                   help="register with this rendezvous server, so peers reach this device by JID")
    p.add_argument("--lan", action="store_true",
                   help="advertise this device on the LAN (mDNS/DNS-SD, _dtx._udp)")
    p.add_argument("--presence", action="store_true",
                   help="with --lan: also serve XEP-0174 clients (Pidgin's Bonjour) on a TCP "
                   "port announced as _presence._tcp; unauthenticated and unencrypted")
    add_signalling_options(p)
    add_port_mapping_options(p)
    p.add_argument("--echo", action="store_true", help="send every message body back")
    p.add_argument("--sessions", type=parse_sessions, default=0,
                   help="exit after this many sessions ended (0: never)")
    trust(p)
    common(p)
    p.set_defaults(func=session_command(run_listen, "--host"))

    for name, func, helptext in (("send", run_send, "send one message"),
                                 ("ping", run_ping, "XEP-0199 round trips")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("keyfile")
        p.add_argument("--to", required=True, type=parse_jid,
                       help="JID to reach (bare or full)")
        p.add_argument("--addr", type=parse_hostport, metavar="HOST:PORT",
                       help="the peer's address (or use --rendezvous)")
        p.add_argument("--rendezvous", type=parse_hostport, metavar="HOST:PORT",
                       help="reach the peer by JID through this rendezvous server")
        p.add_argument("--lan", action="store_true",
                       help="look for the peer on the LAN first (mDNS/DNS-SD)")
        add_signalling_options(p)
        add_port_mapping_options(p)
        p.add_argument("--bind", default="0.0.0.0", type=parse_bind_host,
                       help="local address or host name (default %(default)s)")
        p.add_argument("--timeout", type=parse_timeout, default=10.0,
                       help="seconds, > 0 (default %(default)s)")
        if name == "send":
            p.add_argument("--body", required=True, type=parse_body)
            p.add_argument("--type", default="chat", choices=MESSAGE_TYPES,
                           help="message type (default %(default)s)")
            p.add_argument("--linger", type=parse_delay, default=0.0,
                           help="seconds to stay connected after delivery (to see the path settle)")
        else:
            p.add_argument("--count", type=parse_count, default=10,
                           help="pings to send, at least 1 (default %(default)s)")
            p.add_argument("--interval", type=parse_delay, default=0.0,
                           help="seconds between pings (default %(default)s)")
        trust(p)
        common(p)
        p.set_defaults(func=session_command(func, "--bind"))
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
    configure_logging(args.verbose)
    return run_command("dtx", lambda: int(args.func(args)))


if __name__ == "__main__":
    sys.exit(main())

