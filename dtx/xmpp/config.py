"""What a command needs of the XMPP client without loading it (slixmpp):
its configuration and the vCard forms ``dtx vcard publish`` writes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["PUBLISH_FORMATS", "PublishFormat", "XmppConfig"]

PublishFormat = Literal["auto", "vcard-temp", "vcard4"]
PUBLISH_FORMATS: tuple[PublishFormat, ...] = ("auto", "vcard-temp", "vcard4")


@dataclass(frozen=True, kw_only=True)
class XmppConfig:
    """How to reach and talk to the XMPP server.

    ``server`` is (host, port) to connect to directly; None resolves the
    JID's domain (DNS SRV, then the domain on port 5222). ``ca_file`` adds
    a CA (PEM) to trust for the server's certificate. ``timeout`` bounds
    the login and each request, in seconds.
    """

    server: tuple[str, int] | None = None
    allow_plaintext: bool = False
    ca_file: str | None = None
    timeout: float = 10.0
