"""Device keys in real XMPP vCards: publish, fetch and revoke them over
XMPP (slixmpp), as ``dtx vcard publish`` and as a trust source."""

import importlib
from typing import TYPE_CHECKING, Any

from dtx.xmpp.config import XmppConfig

if TYPE_CHECKING:
    from dtx.xmpp.client import FetchedVCards, KeyChange, XmppClient, open_xmpp_client


def __getattr__(name: str) -> Any:
    """The client's names load slixmpp on first use, not on import."""
    if name not in ("FetchedVCards", "KeyChange", "XmppClient", "open_xmpp_client"):
        raise AttributeError(f"module 'dtx.xmpp' has no attribute {name!r}")
    value = getattr(importlib.import_module("dtx.xmpp.client"), name)
    globals()[name] = value
    return value


__all__ = ["FetchedVCards", "KeyChange", "XmppClient", "XmppConfig", "open_xmpp_client"]
