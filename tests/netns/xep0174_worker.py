"""A dtx device for the XEP-0174 lab tests, run inside a lab host:
``python -m tests.netns.xep0174_worker KEYFILE VCARDS``.

It starts a Peer with the LAN and outgoing XEP-0174 streams on
(``PeerConfig(lan=True, link_local=LinkLocalConfig(outgoing=True))``),
prints ``{"event": "ready", ...}`` and then takes one JSON command a line
on stdin:

* ``{"op": "connect", "to": NAME}`` → ``LinkLocal.connect(NAME)``; prints
  ``connected`` with ``kind`` (``session``: the authenticated dtx path;
  ``link_local``: a XEP-0174 stream), ``authenticated`` and ``peer``; then
  one ``stanza`` line per stanza that arrives on it;
* ``{"op": "send", "to": NAME, "body": TEXT}`` sends a message on it;
* ``{"op": "status", "status": S, "msg": TEXT}`` → ``LinkLocal.set_status``;
* ``{"op": "quit"}``.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from dtx import stanza as st
from dtx.aio.linklocal import LinkLocalStream
from dtx.aio.peer import Peer, PeerConfig
from dtx.aio.session import Session
from dtx.errors import DtxError
from dtx.identity import load_identity
from dtx.proto.linklocal import LinkLocalConfig
from dtx.trust import PinStore, VCardDirectory, Verifier


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def run(keyfile: str, vcards: str) -> None:
    identity = load_identity(keyfile)
    peer = Peer(identity, Verifier([VCardDirectory(vcards)], PinStore(None)),
                config=PeerConfig(lan=True, link_local=LinkLocalConfig(outgoing=True)))
    await peer.start("0.0.0.0", 0)
    ll = peer.link_local
    assert ll is not None
    emit({"event": "ready", "jid": peer.jid, "name": ll.name, "presence_port": ll.port,
          "port": peer.address[1]})
    open_: dict[str, Session | LinkLocalStream] = {}
    readers: list[asyncio.Task[None]] = []

    async def read(to: str, conv: Session | LinkLocalStream) -> None:
        async for el in conv:
            emit({"event": "stanza", "to": to, "from": el.get("from"), "body": st.body_of(el)})

    loop = asyncio.get_running_loop()
    try:
        for _ in range(100):  # bounded: a test sends a handful of commands
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                break
            command = json.loads(line)
            if command["op"] == "quit":
                break
            if command["op"] == "status":
                await ll.set_status(command["status"], command.get("msg"))
                emit({"event": "status", "status": command["status"]})
                continue
            to = command["to"]
            if command["op"] == "connect":
                try:
                    conv = open_.get(to) or await ll.connect(to, timeout=10.0)
                except DtxError as exc:
                    emit({"event": "error", "to": to, "error": f"{type(exc).__name__}: {exc}"})
                    continue
                if to in open_:
                    emit({"event": "connected", "to": to, "kind": "session"
                          if isinstance(conv, Session) else "link_local", "again": True})
                    continue
                open_[to] = conv
                kind = "session" if isinstance(conv, Session) else "link_local"
                emit({"event": "connected", "to": to, "kind": kind,
                      "authenticated": kind == "session",
                      "peer": conv.peer_jid if isinstance(conv, Session) else conv.peer_name,
                      "path": conv.path.value if isinstance(conv, Session) else None})
                readers.append(asyncio.create_task(read(to, conv)))
            elif command["op"] == "send":
                open_[to].send(st.message(command["body"], type_="chat"))
                emit({"event": "sent", "to": to})
    finally:
        for task in readers:
            task.cancel()
        await peer.close()


if __name__ == "__main__":
    asyncio.run(run(sys.argv[1], sys.argv[2]))
