"""dtx: end-to-end encrypted XMPP streams between devices, over UDP.

The public API. Everything else is importable but may change.
"""

from . import stanza
from .aio.peer import Peer, PeerConfig, open_peer
from .aio.session import Session
from .errors import (
    AuthenticationError,
    ConnectError,
    DtxError,
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
from .proto.session import SessionConfig, SessionEnded
from .trust import PinStore, StaticKeys, VCardDirectory, Verifier

__version__ = "0.1.0"

__all__ = [
    "AuthenticationError",
    "ConnectError",
    "DeviceIdentity",
    "DtxError",
    "JID",
    "Peer",
    "PeerConfig",
    "PinMismatchError",
    "PinStore",
    "Session",
    "SessionClosedError",
    "SessionConfig",
    "SessionEnded",
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
