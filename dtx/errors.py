"""The one error tree of dtx.

Every error dtx raises derives from :class:`DtxError`. Errors that describe
a fault of *this* side (bad arguments, sending on a closed session) derive
from :class:`LocalProtocolError`; faults of the *remote* side (malformed
input, a wrong key) derive from :class:`RemoteProtocolError`, in the manner
of h11. Decoders raise :class:`DecodeError` and nothing else.
"""

from __future__ import annotations

from xml.etree.ElementTree import Element


class DtxError(Exception):
    """Base of every error dtx raises."""


class LocalProtocolError(DtxError):
    """This side did something the protocol does not allow."""


class RemoteProtocolError(DtxError):
    """The remote side sent something the protocol does not allow."""


class DecodeError(RemoteProtocolError):
    """Bytes that do not decode as the expected wire format."""


# -- identity and trust -----------------------------------------------------


class KeyFileError(DtxError):
    """A device key file is missing, malformed or readable by others."""


class VCardError(DtxError):
    """A vCard could not be parsed or does not have the expected shape."""


class JIDError(DtxError):
    """A string is not a JID dtx accepts (RFC 7622, in a simplified form)."""


class FingerprintError(DtxError):
    """A string is not a key fingerprint in the form dtx prints."""


class TrustError(DtxError):
    """A peer's key is not one that may speak for the JID it claims."""


class UnknownPeerError(TrustError):
    """No trusted key is known for the JID (no vCard, no pin)."""


class UntrustedKeyError(TrustError):
    """The peer's key is not among the keys trusted for its JID."""

    def __init__(self, jid: str, fingerprint: str, trusted: list[str]) -> None:
        self.jid = jid
        self.fingerprint = fingerprint
        self.trusted = trusted
        listed = ", ".join(trusted) if trusted else "none"
        super().__init__(
            f"key {fingerprint} is not trusted for {jid} (trusted: {listed})"
        )


class PinMismatchError(TrustError):
    """The peer's key differs from the key pinned for its JID."""

    def __init__(self, jid: str, pinned: str, presented: str) -> None:
        self.jid = jid
        self.pinned = pinned
        self.presented = presented
        super().__init__(
            f"key for {jid} changed: pinned {pinned}, presented {presented}; "
            f"if the device really has a new key, remove the pin "
            f"(dtx pin forget {jid}) and connect again"
        )


# -- sessions -----------------------------------------------------------------


class AuthenticationError(RemoteProtocolError):
    """The session handshake failed: the peer's key or proof was refused,
    or the peer refused ours."""


class StreamError(RemoteProtocolError):
    """An XML stream error (RFC 6120 section 4.9), sent or received.

    ``condition`` is the defined condition's element name, for example
    ``not-well-formed`` or ``policy-violation``.
    """

    def __init__(self, condition: str, text: str = "") -> None:
        self.condition = condition
        self.text = text
        super().__init__(f"{condition}: {text}" if text else condition)


class StanzaTooLargeError(LocalProtocolError):
    """A stanza does not fit where the application asked to send it."""


class SessionClosedError(DtxError):
    """The session is closed; nothing more can be sent or received on it."""


class ConnectError(DtxError):
    """A session could not be established (timeout, no route, refused)."""


class IqError(RemoteProtocolError):
    """The peer answered an iq request with an error (RFC 6120 section 8.3).

    ``stanza`` is the error reply; ``condition`` its defined condition
    (``item-not-found``, ``service-unavailable`` ...) and ``error_type``
    its type (``cancel``, ``modify`` ...), empty when the reply had none."""

    def __init__(self, stanza: Element) -> None:
        self.stanza = stanza
        self.condition = ""
        self.error_type = ""
        self.text = ""
        for error in stanza:
            if error.tag.rsplit("}", 1)[-1] != "error":
                continue
            self.error_type = error.get("type", "")
            for child in error:
                name = child.tag.rsplit("}", 1)[-1]
                if name == "text":
                    self.text = child.text or ""
                elif not self.condition:
                    self.condition = name
        detail = f": {self.text}" if self.text else ""
        super().__init__(f"iq {stanza.get('id', '')!r} answered with an error "
                         f"({self.condition or 'no condition'}{detail})")


class IqTimeout(DtxError, TimeoutError):
    """No answer to an iq request within its timeout."""


# -- running ------------------------------------------------------------------


class LoopUnavailableError(DtxError):
    """The event loop asked for cannot be used: ``uvloop`` (``--loop
    uvloop``) when it is not installed."""


# -- NAT lab ----------------------------------------------------------------


class LabError(DtxError):
    """The network lab could not be built, changed or torn down."""


# -- LAN discovery ----------------------------------------------------------


class DiscoveryError(DtxError):
    """LAN discovery (mDNS/DNS-SD) could not advertise or browse: no address
    to announce, a name already taken on the link, a TXT entry too long."""


# -- XMPP server ----------------------------------------------------------------


class XmppError(DtxError):
    """An XMPP server could not be used as asked: login refused, a vCard
    request failed, or the connection would not be encrypted."""


class UnacknowledgedLimitError(LocalProtocolError):
    """Sending would leave more stanzas, or more bytes, waiting for the
    peer's acknowledgement than the session allows
    (``SessionConfig.max_unacknowledged_stanzas`` / ``_bytes``). Nothing was
    queued: wait until the peer acknowledges (``wait_acknowledged``) and
    send again."""


# -- XEP-0174 link-local streams --------------------------------------------


class LinkLocalError(DtxError):
    """A XEP-0174 link-local stream could not be opened or used as asked: no
    ``_presence._tcp`` record for the name, outgoing streams not enabled, or
    the listener not running. Link-local streams are unauthenticated; see
    ``docs/lan-discovery.md``."""


class SendBufferFullError(LocalProtocolError):
    """The peer of a link-local stream is not reading: sending would hold
    more than ``LinkLocalConfig.send_buffer_bytes`` unsent. Nothing was
    queued."""
