"""Device keys in real XMPP vCards: publish, fetch and revoke them over
XMPP (slixmpp), as ``dtx vcard publish`` and as a trust source."""

from dtx.xmpp.client import (
    FetchedVCards,
    KeyChange,
    XmppClient,
    XmppConfig,
    open_xmpp_client,
)

__all__ = ["FetchedVCards", "KeyChange", "XmppClient", "XmppConfig", "open_xmpp_client"]
