"""``dtx listen --lan --presence``: the XEP-0174 side of the listener.

With ``--presence`` the device also runs a XEP-0174 TCP listener, announced
as ``_presence._tcp`` (port, status, XEP-0115 caps), so that the XMPP
clients people have on the LAN (Pidgin's Bonjour) list it and talk to it.
Their streams are unauthenticated: each is reported with the name it
*claims* and ``"authenticated": false``, in events of their own
(``link_local``, ``link_local_stanza``, ``link_local_closed``), never as a
``session`` or ``stanza`` event, whatever JID it claims.

``dtx.cli`` calls :func:`link_local_config` for the peer's configuration,
:func:`listening_fields` for the ``listening`` event and
:func:`serve_link_local` beside its session loop. Nothing is printed here:
``report(obj, text)`` is the command's own ``say``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Callable
from typing import Any

from . import stanza as st
from .cliargs import UsageError
from .errors import LinkLocalError, LocalProtocolError, SessionClosedError
from .logs import LogLimiter
from .proto.linklocal import LinkLocalConfig

__all__ = ["link_local_config", "listening_fields", "serve_link_local"]

logger = logging.getLogger(__name__)

Report = Callable[[dict[str, Any], str], None]


def link_local_config(args: argparse.Namespace) -> LinkLocalConfig | None:
    """The XEP-0174 listener's options for ``--presence`` (None without it).
    Raises :class:`UsageError` for ``--presence`` without ``--lan``."""
    if not getattr(args, "presence", False):
        return None
    if not getattr(args, "lan", False):
        raise UsageError("--presence needs --lan (the _presence._tcp record is announced "
                         "over mDNS)")
    return LinkLocalConfig()


def listening_fields(peer: Any) -> dict[str, Any]:
    """What the ``listening`` event adds with ``--presence``: the TCP port
    and the XEP-0174 instance name."""
    ll = getattr(peer, "link_local", None)
    if ll is None:
        return {}
    return {"presence_port": ll.port, "presence_name": ll.name}


async def serve_link_local(peer: Any, *, echo: bool, report: Report) -> None:
    """Serve every XEP-0174 stream until the listener closes: report what
    arrives, and with ``echo`` send message bodies back on the same stream."""
    ll = peer.link_local
    if ll is None:
        return
    limiter = LogLimiter(logger)
    tasks: set[asyncio.Task[None]] = set()

    async def serve(stream: Any) -> None:
        claimed = stream.peer_name
        report({"event": "link_local", "claimed": claimed,
                "address": f"{stream.address[0]}:{stream.address[1]}", "authenticated": False},
               f"XEP-0174 stream from {stream.address[0]}, claiming {claimed} "
               "(unauthenticated)")
        async for el in stream:
            body = st.body_of(el)
            tag = el.tag.rpartition("}")[2]
            report({"event": "link_local_stanza", "claimed": claimed, "kind": tag,
                    "from": el.get("from"), "body": body, "authenticated": False},
                   f"{tag} from {el.get('from')} (unauthenticated): "
                   f"{body if body is not None else ''}")
            if echo and el.tag == st.MESSAGE and body is not None \
                    and el.get("type") != "error":
                try:
                    stream.send(st.message(body, to=el.get("from"), type_=el.get("type")))
                except SessionClosedError:
                    break
                except LocalProtocolError as exc:  # too large, or the peer is not reading
                    limiter.warning("echo-refused", claimed, "echo to %r not sent: %s",
                                    claimed, exc)
        ended = await stream.wait_closed()
        report({"event": "link_local_closed", "claimed": claimed,
                "error": None if ended.error is None else str(ended.error)},
               f"XEP-0174 stream from {claimed} closed"
               + ("" if ended.error is None else f": {ended.error}"))

    async def serve_logged(stream: Any) -> None:
        try:
            await serve(stream)
        except Exception as exc:  # noqa: BLE001 - one stream's fault ends only it
            logger.error("XEP-0174 stream from %r failed: %s: %s", stream.peer_name,
                         type(exc).__name__, exc)
            stream.abort()

    try:
        while True:
            try:
                stream = await ll.accept()
            except LinkLocalError:  # the listener closed
                break
            task = asyncio.create_task(serve_logged(stream))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
    finally:
        for task in list(tasks):
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
