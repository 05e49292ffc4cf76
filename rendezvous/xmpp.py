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

When the XMPP connection drops (the server restarted, the network went
away), the next lookup logs back in first, with back-off between failed
attempts (``relogin_delay`` doubling up to ``relogin_max_delay``, with
jitter); lookups in between answer "no answer" at once (cached keys still
count). A refused password stops the attempts. Registrations already made
are not touched.
"""

from __future__ import annotations

import asyncio
import logging
import random

from dtx.errors import AuthenticationError, ConnectError, DtxError, XmppError
from dtx.trust.xmpp import XmppKeySource, XmppKeySourceConfig
from dtx.xmpp.client import XmppClient, XmppConfig

logger = logging.getLogger(__name__)

DEFAULT_TTL = 60.0
RELOGIN_DELAY = 1.0
RELOGIN_MAX_DELAY = 60.0


class _LoggedIn:
    """The key fetcher of the lookup: the XMPP client, logged back in first
    when its connection dropped (bounded by back-off between attempts)."""

    def __init__(self, client: XmppClient, *, delay: float, max_delay: float,
                 rng: random.Random) -> None:
        self._client = client
        self._first_delay = delay
        self._delay = delay
        self._max_delay = max_delay
        self._rng = rng
        self._next_try = 0.0
        self._refused: str | None = None
        self._lock = asyncio.Lock()
        self.relogins = 0

    def _up(self) -> bool:
        xmpp = self._client.xmpp
        return xmpp is not None and xmpp.is_connected()

    async def ensure(self) -> None:
        if self._up():
            return
        async with self._lock:
            if self._up():
                return
            if self._refused is not None:
                raise XmppError(f"not logged in: {self._refused}")
            loop = asyncio.get_running_loop()
            if loop.time() < self._next_try:
                raise XmppError("the XMPP connection dropped; logging back in within "
                                f"{self._next_try - loop.time():.0f} s")
            await self._client.drop()
            try:
                await self._client.connect()
            except AuthenticationError as exc:
                self._refused = str(exc)
                logger.error("logging back in to the XMPP server refused, not trying "
                             "again: %s", exc)
                raise
            except (ConnectError, XmppError, OSError, TimeoutError) as exc:
                self._next_try = loop.time() + self._delay * self._rng.uniform(0.5, 1.0)
                self._delay = min(self._delay * 2, self._max_delay)
                logger.warning("not logged back in to the XMPP server (%s); next try "
                               "within %.0f s", exc, self._next_try - loop.time())
                raise XmppError(f"not logged back in: {exc}") from exc
            self._delay = self._first_delay
            self.relogins += 1
            logger.info("logged back in to the XMPP server")

    async def fetch_keys(self, bare_jid: str) -> frozenset[bytes] | None:
        await self.ensure()
        return await self._client.fetch_keys(bare_jid)


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
        relogin_delay: float = RELOGIN_DELAY,
        relogin_max_delay: float = RELOGIN_MAX_DELAY,
    ) -> None:
        self._client = XmppClient(
            account,
            password,
            config=XmppConfig(server=server, allow_plaintext=allow_plaintext,
                              ca_file=ca_file, timeout=timeout),
        )
        self._fetcher = _LoggedIn(self._client, delay=relogin_delay,
                                  max_delay=relogin_max_delay,
                                  rng=random.Random(random.SystemRandom().getrandbits(64)))
        self._source = XmppKeySource(
            self._fetcher,
            config=XmppKeySourceConfig(ttl=ttl, fetch_timeout=timeout, retry_interval=5.0),
        )

    @property
    def relogins(self) -> int:
        """Times it logged back in after the connection dropped."""
        return self._fetcher.relogins

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
