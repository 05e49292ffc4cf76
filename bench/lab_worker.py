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
  travels today.
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
from collections.abc import Sequence
from typing import Any

logger = logging.getLogger(__name__)

PHASE_TIMEOUT = 60.0
"""Upper bound on any one phase of a worker."""
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


def _xmpp_client(jid: str, password: str) -> Any:
    import slixmpp

    client = slixmpp.ClientXMPP(jid, password)
    client.register_plugin("xep_0199")
    client.whitespace_keepalive = False
    # Prosody in the lab serves plain TCP (no TLS): as a LAN client would.
    client.enable_starttls = False
    client.enable_direct_tls = False
    client.enable_plaintext = True
    client.plugin["feature_mechanisms"].unencrypted_plain = True
    return client


async def xmpp_echo(args: argparse.Namespace) -> int:
    """Echo ``chat`` messages; count ``normal`` ones (the one-way batch)."""
    client = _xmpp_client(args.jid, args.password)
    ready = asyncio.Event()
    sink = {"count": 0, "cpu0": 0.0, "t0": 0.0}

    def on_start(_: Any) -> None:
        ready.set()

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
    host, port = args.server.rsplit(":", 1)
    client.connect(host, int(port))
    async with asyncio.timeout(PHASE_TIMEOUT):
        await ready.wait()
    emit(event="ready")
    reader = await stdin_reader()
    await read_command(reader, STOP_TIMEOUT)  # "stop"
    client.disconnect()
    return 0


async def xmpp_drive(args: argparse.Namespace) -> int:
    """Log in, send the first stanza, then round trips, pings, a batch."""
    t0 = time.monotonic()
    client = _xmpp_client(args.jid, args.password)
    started = asyncio.Event()
    waiting: dict[str, asyncio.Future[float]] = {}

    def on_message(msg: Any) -> None:
        fut = waiting.pop(msg["id"], None)
        if fut is not None and not fut.done():
            fut.set_result(time.monotonic())

    client.add_event_handler("session_start", lambda _: started.set())
    client.add_event_handler("message", on_message)
    host, port = args.server.rsplit(":", 1)
    client.connect(host, int(port))
    async with asyncio.timeout(PHASE_TIMEOUT):
        await started.wait()
    t_login = time.monotonic()
    loop = asyncio.get_running_loop()

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

    await roundtrip(-1)
    emit(event="login", t0=t0, login=t_login - t0)
    rtts = [await roundtrip(i) for i in range(args.samples)]
    pings: list[float] = []
    for _ in range(args.samples):
        start = time.monotonic()
        await client.plugin["xep_0199"].send_ping(args.peer, timeout=PHASE_TIMEOUT)
        pings.append(time.monotonic() - start)
    emit(event="rtt", rtt=rtts, ping=pings)
    reader = await stdin_reader()
    if (await read_command(reader, STOP_TIMEOUT)).get("command") != "go":
        client.disconnect()
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
    emit(event="batch", t_start=start, cpu=time.process_time() - cpu0)
    await read_command(reader)  # "stop"
    client.disconnect()
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
