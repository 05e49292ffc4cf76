"""dtx: end-to-end encrypted XMPP streams between devices, over UDP.

The public API. Everything else is importable but may change. The asyncio
names (:class:`Peer`, :class:`Session`, :func:`open_peer` ...) load their
driver on first use, so importing the sans-IO layer (``dtx.wire``,
``dtx.proto``) never loads asyncio.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import _lazy  # noqa: F401  (first: before anything imports aioquic)
from . import stanza
from .errors import (
    AuthenticationError,
    ConnectError,
    DtxError,
    IqError,
    IqTimeout,
    LinkLocalError,
    PinMismatchError,
    SessionClosedError,
    StanzaTooLargeError,
    StreamError,
    TrustError,
    UnknownPeerError,
    UntrustedKeyError,
)
from .identity import DeviceIdentity, generate_identity, load_identity, save_identity
from .jid import JID
from .proto.linklocal import LinkLocalConfig
from .proto.paths import PathKind
from .proto.sessiontypes import SessionConfig, SessionEnded

if TYPE_CHECKING:
    from .aio.linklocal import LinkLocal, LinkLocalStream
    from .aio.peer import Peer, PeerConfig, PeerStatistics, open_peer
    from .aio.session import Session
    from .proto.endpoint import SessionStatistics
    from .trust import PinStore, StaticKeys, VCardDirectory, Verifier

__version__ = "0.1.0"

_LAZY = {
    "Peer": "dtx.aio.peer",
    "PeerConfig": "dtx.aio.peer",
    "PeerStatistics": "dtx.aio.peer",
    "open_peer": "dtx.aio.peer",
    "Session": "dtx.aio.session",
    "LinkLocal": "dtx.aio.linklocal",
    "LinkLocalStream": "dtx.aio.linklocal",
    "SessionStatistics": "dtx.proto.endpoint",
    "PinStore": "dtx.trust",
    "StaticKeys": "dtx.trust",
    "VCardDirectory": "dtx.trust",
    "Verifier": "dtx.trust",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'dtx' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "AuthenticationError",
    "ConnectError",
    "DeviceIdentity",
    "DtxError",
    "IqError",
    "IqTimeout",
    "JID",
    "LinkLocal",
    "LinkLocalConfig",
    "LinkLocalError",
    "LinkLocalStream",
    "PathKind",
    "Peer",
    "PeerConfig",
    "PeerStatistics",
    "PinMismatchError",
    "PinStore",
    "Session",
    "SessionClosedError",
    "SessionConfig",
    "SessionEnded",
    "SessionStatistics",
    "StanzaTooLargeError",
    "StaticKeys",
    "StreamError",
    "TrustError",
    "UnknownPeerError",
    "UntrustedKeyError",
    "VCardDirectory",
    "Verifier",
    "generate_identity",
    "load_identity",
    "open_peer",
    "save_identity",
    "stanza",
]
