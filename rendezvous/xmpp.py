"""Registrations checked against live vCards over XMPP.

``dtx-rendezvous --xmpp-account JID --password-file FILE [--server HOST:PORT]``
logs in as its own account and, for each registration, fetches the
claimed account's vCard (vCard4 on PEP, or vcard-temp) to see whether the
registering key is listed. Answers are cached for a short TTL so a busy
device re-registering does not cost a round trip to the XMPP server each
time, and a key removed from the vCard stops being accepted within it.

The core runs with ``keys=None``: it asks for an account's keys with a
``VerificationNeeded`` event, and :class:`XmppKeyLookup` answers it
asynchronously through ``complete_verification``.
"""

from __future__ import annotations

import logging

from dtx.errors import DtxError
from dtx.trust.xmpp import XmppKeySource, XmppKeySourceConfig
from dtx.xmpp.client import XmppClient, XmppConfig

logger = logging.getLogger(__name__)

DEFAULT_TTL = 60.0


class XmppKeyLookup:
    """An account's dtx keys from its live vCard, cached for ``ttl`` seconds."""

    def __init__(
        self,
        account: str,
        password: str,
        *,
        server: tuple[str, int] | None = None,
        allow_plaintext: bool = False,
        ca_file: str | None = None,
        ttl: float = DEFAULT_TTL,
        timeout: float = 10.0,
    ) -> None:
        self._client = XmppClient(
            account,
            password,
            config=XmppConfig(server=server, allow_plaintext=allow_plaintext,
                              ca_file=ca_file, timeout=timeout),
        )
        self._source = XmppKeySource(
            self._client,
            config=XmppKeySourceConfig(ttl=ttl, fetch_timeout=timeout, retry_interval=5.0),
        )

    async def start(self) -> None:
        """Log in (raises :class:`~dtx.errors.XmppError` if it cannot)."""
        await self._client.connect()

    async def close(self) -> None:
        await self._source.close()
        await self._client.close()

    async def __call__(self, bare_jid: str) -> frozenset[bytes] | None:
        """The keys ``bare_jid``'s vCard lists (None: no vCard, or no answer)."""
        cached = self._source.keys_for(bare_jid)
        if cached is not None:
            return cached
        try:
            return await self._source.refresh(bare_jid)
        except (DtxError, TimeoutError) as exc:
            logger.warning("no vCard for %s: %s", bare_jid, exc)
            return None
