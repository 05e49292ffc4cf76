"""Worker processes for the NAT-lab scenarios: the alternatives dtx is
measured against, each end in its own process inside a lab namespace.

``python -m bench.lab_worker xmpp-echo|xmpp-drive|webrtc-echo|webrtc-drive``

Every worker talks JSON lines: events on stdout, commands (signalling for
WebRTC, ``go`` between phases) on stdin. Times are ``time.monotonic()``,
one clock for every process on the machine, so the parent can subtract a
time taken in one worker from a time taken in another (connect time: the
driver's start to the echo side's first arrival).

* XMPP: two slixmpp clients logged in to a real Prosody at the server's
  place in the lab; stanzas go client → server → client, as a "pause"
  travels today. With ``--dtx-key`` the same clients register the dtx
  slixmpp plugin (:mod:`dtx.slixmpp`): their messages go over a dtx
  session once it is up, through the server before.
* WebRTC: aiortc data channels, ICE with the rendezvous's STUN and a coturn
  TURN relay; the offering side drives, the answering side echoes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

logger = logging.getLogger(__name__)

PHASE_TIMEOUT = 60.0
"""Upper bound on any one phase of a worker."""
PATH_SETTLE = 5.0
"""Seconds a plugin client waits, once its dtx session is up, for the path
it expects (a session starts on the relay; the direct or LAN path takes
over when its probe is answered); past it, it measures on the path it has."""
PLUGIN_WARMUP = 3
"""Unrecorded round trips before a plugin client's series: the first ones
over the session may wait at the peer for this side's ``<switch/>``,
which comes through the server."""
STOP_TIMEOUT = 3600.0
"""How long an echo side waits for the harness to stop it: the whole
measurement of its peer, which is long on a lossy relay path."""


def emit(**fields: Any) -> None:
    """One JSON event line on stdout."""
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


async def read_command(reader: asyncio.StreamReader,
                       timeout: float = PHASE_TIMEOUT) -> dict[str, Any]:
    """The next JSON line from stdin."""
    async with asyncio.timeout(timeout):
        line = await reader.readline()
    if not line:
        raise EOFError("stdin closed")
    value: dict[str, Any] = json.loads(line)
    return value


async def stdin_reader() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


def body_text(size: int, index: int) -> str:
    """A body that makes a ``<message/>`` of about ``size`` bytes."""
    head = f"{index:09d}:"
    return head + "x" * max(0, size - 110 - len(head))


# -- XMPP (slixmpp through Prosody) ---------------------------------------------


def _xmpp_client(jid: str, password: str, args: argparse.Namespace) -> Any:
    import slixmpp

    client = slixmpp.ClientXMPP(jid, password)
    client.register_plugin("xep_0199")
    if args.dtx_key:
        from dtx.aio.peer import PeerConfig

        # As an application registers it, with the host's address as its
        # only host candidate (the lab's hosts have one).
        client.register_plugin("xep_0030")
        client.register_plugin("dtx", {
            "key_file": args.dtx_key,
            "peer_config": PeerConfig(host_addresses=(args.host_ip,))}, module="dtx.slixmpp")
    client.whitespace_keepalive = False
    # Prosody in the lab serves plain TCP (no TLS): as a LAN client would.
    client.enable_starttls = False
    client.enable_direct_tls = False
    client.enable_plaintext = True
    client.plugin["feature_mechanisms"].unencrypted_plain = True
    return client


def _dtx_events(client: Any, args: argparse.Namespace) -> asyncio.Event:
    """With the plugin: presence and the roster at login, as an
    application of the plugin sends them (the plugin finds its peers by
    presence); the event returned is set once dtx is ready."""
    ready = asyncio.Event()
    if args.dtx_key:
        client.add_event_handler("session_start", lambda _: (
            client.get_roster(), client.send_presence()))
        client.add_event_handler("dtx_ready", lambda _=None: ready.set())
    else:
        ready.set()
    return ready


async def _close(client: Any, args: argparse.Namespace) -> None:
    if args.dtx_key:
        await client.plugin["dtx"].close()
    client.disconnect()


async def xmpp_echo(args: argparse.Namespace) -> int:
    """Echo ``chat`` messages; count ``normal`` ones (the one-way batch).
    With the plugin, a ``session`` event for each peer whose stanzas now
    come over dtx (its ``dtx_session_start``)."""
    client = _xmpp_client(args.jid, args.password, args)
    ready = asyncio.Event()
    dtx_ready = _dtx_events(client, args)
    sink = {"count": 0, "cpu0": 0.0, "t0": 0.0}
    sessions: set[str] = set()

    def on_start(_: Any) -> None:
        ready.set()

    def on_session(jid: Any) -> None:
        if str(jid) not in sessions:
            sessions.add(str(jid))
            emit(event="session", jid=str(jid), t=time.monotonic())

    def on_message(msg: Any) -> None:
        now = time.monotonic()
        if msg["id"] == "r-1":
            emit(event="first", t=now)
        if msg["type"] == "normal":
            if sink["count"] == 0:
                sink["cpu0"] = time.process_time()
                sink["t0"] = now
            sink["count"] += 1
            if msg["id"].endswith("-last"):
                emit(event="sunk", t=now, count=sink["count"],
                     cpu=time.process_time() - sink["cpu0"])
                sink["count"] = 0
            return
        reply = client.make_message(mto=msg["from"], mbody=msg["body"], mtype="chat")
        reply["id"] = msg["id"]
        reply.send()

    client.add_event_handler("session_start", on_start)
    client.add_event_handler("message", on_message)
    client.add_event_handler("dtx_session_start", on_session)
    host, port = args.server.rsplit(":", 1)
    client.connect(host, int(port))
    async with asyncio.timeout(PHASE_TIMEOUT):
        await ready.wait()
        await dtx_ready.wait()
    emit(event="ready")
    reader = await stdin_reader()
    await read_command(reader, STOP_TIMEOUT)  # "stop"
    await _close(client, args)
    return 0


async def xmpp_drive(args: argparse.Namespace) -> int:
    """Log in, send the first stanza, then round trips, pings, a batch.

    With the plugin, the first stanza goes once dtx is ready, right behind
    the plugin's first stanza to the peer (the disco#info query with which
    it begins a session by itself): logged in, no session yet, one being
    made, as an application's first messages meet it. Then,
    on the harness's ``session`` command (the peer's stanzas come over
    dtx), it waits for its own side of the session and the expected path,
    and the round trips and the batch go over the session. No pings: an iq
    takes the same way as a message."""
    t0 = time.monotonic()
    client = _xmpp_client(args.jid, args.password, args)
    started = asyncio.Event()
    dtx_ready = _dtx_events(client, args)
    moved = asyncio.Event()
    waiting: dict[str, asyncio.Future[float]] = {}

    def on_message(msg: Any) -> None:
        fut = waiting.pop(msg["id"], None)
        if fut is not None and not fut.done():
            fut.set_result(time.monotonic())

    begun = asyncio.Event()
    """Set when the plugin's first stanza to the peer (an iq) goes out."""

    def watch(stanza: Any) -> Any:
        if stanza.name == "iq" and str(stanza["to"]) == args.peer:
            begun.set()
        return stanza

    client.add_event_handler("session_start", lambda _: started.set())
    client.add_event_handler("message", on_message)
    for name in ("dtx_session_start", "dtx_path_changed", "dtx_session_end"):
        client.add_event_handler(name, lambda _: moved.set())
    client.add_filter("out", watch)
    reader = await stdin_reader()
    host, port = args.server.rsplit(":", 1)
    client.connect(host, int(port))
    async with asyncio.timeout(PHASE_TIMEOUT):
        await started.wait()
    t_login = time.monotonic()
    async with asyncio.timeout(PHASE_TIMEOUT):
        await dtx_ready.wait()
    if args.dtx_key:
        try:
            async with asyncio.timeout(PATH_SETTLE):
                await begun.wait()
        except TimeoutError:
            logger.warning("the plugin began no session with %s", args.peer)
    loop = asyncio.get_running_loop()

    def path() -> str:
        return str(client.plugin["dtx"].path(args.peer) or "server") if args.dtx_key \
            else "server"

    async def wait_path(done: Callable[[str], bool], timeout: float) -> None:
        try:
            async with asyncio.timeout(timeout):
                while not done(path()):
                    moved.clear()
                    await moved.wait()
        except TimeoutError:
            pass

    async def roundtrip(i: int) -> float:
        mid = f"r{i}"
        fut: asyncio.Future[float] = loop.create_future()
        waiting[mid] = fut
        start = time.monotonic()
        msg = client.make_message(mto=args.peer, mbody=body_text(args.size, i), mtype="chat")
        msg["id"] = mid
        msg.send()
        async with asyncio.timeout(PHASE_TIMEOUT):
            return await fut - start

    first = await roundtrip(-1)
    emit(event="login", t0=t0, login=t_login - t0, first=first, path=path())
    if args.dtx_key:
        if (await read_command(reader)).get("command") != "session":
            await _close(client, args)
            return 0
        await wait_path(lambda p: p != "server", PHASE_TIMEOUT)  # dtx_session_start
        await wait_path(lambda p: p == args.expect_path, PATH_SETTLE)
        for i in range(PLUGIN_WARMUP):
            await roundtrip(-2 - i)
    on = path()
    rtts = [await roundtrip(i) for i in range(args.samples)]
    pings: list[float] = []
    for _ in range(0 if args.dtx_key else args.samples):
        start = time.monotonic()
        await client.plugin["xep_0199"].send_ping(args.peer, timeout=PHASE_TIMEOUT)
        pings.append(time.monotonic() - start)
    emit(event="rtt", rtt=rtts, ping=pings, path=on, path_after=path())
    if (await read_command(reader, STOP_TIMEOUT)).get("command") != "go":
        await _close(client, args)
        return 0
    cpu0 = time.process_time()
    start = time.monotonic()
    for i in range(args.stanzas):
        msg = client.make_message(mto=args.peer, mbody=body_text(args.size, i), mtype="normal")
        msg["id"] = f"s{i}" + ("-last" if i == args.stanzas - 1 else "")
        msg.send()
        if i % 64 == 63:
            await asyncio.sleep(0)
    await roundtrip(10**8)
    emit(event="batch", t_start=start, cpu=time.process_time() - cpu0, path=path())
    await read_command(reader)  # "stop"
    await _close(client, args)
    return 0


# -- WebRTC (aiortc data channel) -------------------------------------------------


def _ice_servers(args: argparse.Namespace) -> Any:
    from aiortc import RTCConfiguration, RTCIceServer

    servers = [RTCIceServer(urls=f"stun:{args.stun}")]
    if args.turn:
        servers.append(RTCIceServer(urls=f"turn:{args.turn}?transport=udp",
                                    username=args.turn_user, credential=args.turn_password))
    return RTCConfiguration(iceServers=servers)


def _selected_path(pc: Any) -> str:
    """``relay`` when the nominated ICE pair uses a TURN candidate, else
    ``direct`` (or ``unknown`` when aiortc's internals moved)."""
    try:
        conn = pc.sctp.transport.transport._connection
        pair = next(iter(conn._nominated.values()))
        kinds = {pair.local_candidate.type, pair.remote_candidate.type}
    except (AttributeError, StopIteration):
        return "unknown"
    return "relay" if "relay" in kinds else "direct"


def _sdp(desc: Any) -> dict[str, str]:
    return {"sdp": desc.sdp, "type": desc.type}


async def webrtc_echo(args: argparse.Namespace) -> int:
    """Answer an offer from stdin; echo ``e`` messages, count ``s`` ones."""
    from aiortc import RTCPeerConnection, RTCSessionDescription

    reader = await stdin_reader()
    pc = RTCPeerConnection(_ice_servers(args))
    first: list[float] = []
    sink = {"count": 0, "cpu0": 0.0}

    def on_channel(channel: Any) -> None:
        def on_message(message: Any) -> None:
            now = time.monotonic()
            if not first:
                first.append(now)
                emit(event="first", t=now)
            text = str(message)
            if text.startswith("s"):
                if sink["count"] == 0:
                    sink["cpu0"] = time.process_time()
                sink["count"] += 1
                if text.startswith("slast"):
                    emit(event="sunk", t=now, count=sink["count"],
                         cpu=time.process_time() - sink["cpu0"])
                    sink["count"] = 0
                return
            channel.send(message)

        channel.on("message", on_message)

    pc.on("datachannel", on_channel)
    emit(event="ready")
    offer = await read_command(reader)
    await pc.setRemoteDescription(RTCSessionDescription(**offer))
    await pc.setLocalDescription(await pc.createAnswer())
    emit(event="answer", **_sdp(pc.localDescription))
    try:
        await read_command(reader, STOP_TIMEOUT)  # "stop"
    finally:
        await pc.close()
    return 0


async def webrtc_drive(args: argparse.Namespace) -> int:
    """Offer, open a data channel, send the first message, then measure."""
    from aiortc import RTCPeerConnection, RTCSessionDescription

    reader = await stdin_reader()
    t0 = time.monotonic()
    pc = RTCPeerConnection(_ice_servers(args))
    channel = pc.createDataChannel("bench")
    opened = asyncio.Event()
    waiting: dict[str, asyncio.Future[float]] = {}
    channel.on("open", opened.set)

    def on_message(message: Any) -> None:
        key = str(message).split(":", 1)[0]
        fut = waiting.pop(key, None)
        if fut is not None and not fut.done():
            fut.set_result(time.monotonic())

    channel.on("message", on_message)

    await pc.setLocalDescription(await pc.createOffer())
    emit(event="offer", **_sdp(pc.localDescription))
    answer = await read_command(reader)
    await pc.setRemoteDescription(RTCSessionDescription(**answer))
    async with asyncio.timeout(PHASE_TIMEOUT):
        await opened.wait()
    t_open = time.monotonic()
    loop = asyncio.get_running_loop()
    filler = "x" * max(0, args.size - 12)

    async def roundtrip(i: int) -> float:
        key = f"e{i}"
        fut: asyncio.Future[float] = loop.create_future()
        waiting[key] = fut
        start = time.monotonic()
        channel.send(f"{key}:{filler}")
        async with asyncio.timeout(PHASE_TIMEOUT):
            return await fut - start

    await roundtrip(-1)
    emit(event="open", t0=t0, open=t_open - t0, path=_selected_path(pc))
    rtts = [await roundtrip(i) for i in range(args.samples)]
    emit(event="rtt", rtt=rtts)
    if (await read_command(reader, STOP_TIMEOUT)).get("command") != "go":
        await pc.close()
        return 0
    cpu0 = time.process_time()
    start = time.monotonic()
    for i in range(args.stanzas):
        channel.send(("slast:" if i == args.stanzas - 1 else f"s{i}:") + filler)
        if i % 64 == 63:
            await asyncio.sleep(0)
    await roundtrip(10**8)
    emit(event="batch", t_start=start, cpu=time.process_time() - cpu0, path=_selected_path(pc))
    await read_command(reader)  # "stop"
    await pc.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.lab_worker")
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("xmpp-echo", "xmpp-drive"):
        s = sub.add_parser(name)
        s.add_argument("--jid", required=True)
        s.add_argument("--password", required=True)
        s.add_argument("--server", required=True, help="IP:PORT of Prosody")
        s.add_argument("--peer", default="")
        s.add_argument("--samples", type=int, default=10)
        s.add_argument("--stanzas", type=int, default=100)
        s.add_argument("--size", type=int, default=200)
        s.add_argument("--dtx-key", help="register the dtx plugin with this key file")
        s.add_argument("--host-ip", help="the host's address (the plugin's host candidate)")
        s.add_argument("--expect-path", default="direct",
                       help="the path the plugin's session should settle on")
    for name in ("webrtc-echo", "webrtc-drive"):
        s = sub.add_parser(name)
        s.add_argument("--stun", required=True, help="IP:PORT")
        s.add_argument("--turn", help="IP:PORT of a TURN server")
        s.add_argument("--turn-user", default="bench")
        s.add_argument("--turn-password", default="bench")
        s.add_argument("--samples", type=int, default=10)
        s.add_argument("--stanzas", type=int, default=100)
        s.add_argument("--size", type=int, default=200)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    runner = {"xmpp-echo": xmpp_echo, "xmpp-drive": xmpp_drive,
              "webrtc-echo": webrtc_echo, "webrtc-drive": webrtc_drive}[args.command]
    return asyncio.run(runner(args))


if __name__ == "__main__":
    sys.exit(main())
