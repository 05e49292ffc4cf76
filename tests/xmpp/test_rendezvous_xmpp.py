"""The rendezvous in XMPP mode: registrations checked against live vCards on
a real Prosody."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from dtx.aio.peer import Peer, PeerConfig
from dtx.errors import AuthenticationError
from dtx.identity import generate_identity
from dtx.trust import PinStore, Verifier
from dtx.xmpp.client import open_xmpp_client
from rendezvous.server import serve
from rendezvous.xmpp import XmppKeyLookup
from tests.xmpp.conftest import Account

AccountMaker = Callable[[str], Account]


async def test_accepts_a_key_in_the_live_vcard_and_refuses_one_that_is_not(
    account: AccountMaker,
) -> None:
    alice, operator = account("alice"), account("rdv")
    tv = generate_identity(f"{alice.jid}/tv")
    impostor = generate_identity(f"{alice.jid}/tv")  # same JID, key not published
    async with open_xmpp_client(alice.jid, alice.password, config=alice.config()) as client:
        await client.publish_key(tv.public_key)

    cfg = operator.config()
    lookup = XmppKeyLookup(operator.jid, operator.password, server=cfg.server,
                           allow_plaintext=cfg.allow_plaintext, ttl=5.0)
    await lookup.start()
    server = await serve(("127.0.0.1", 0), vcards=None, key_lookup=lookup)
    try:
        rdv = PeerConfig(rendezvous=server.address)
        good = Peer(tv, Verifier([], PinStore(None)), config=rdv)
        await good.start("127.0.0.1", 0, listen=False)
        try:
            await good.wait_registered(15)
        finally:
            await good.close()

        bad = Peer(impostor, Verifier([], PinStore(None)), config=rdv)
        await bad.start("127.0.0.1", 0, listen=False)
        try:
            with pytest.raises(AuthenticationError, match="key not in vCard"):
                await bad.wait_registered(15)
        finally:
            await bad.close()
        stats = server.statistics()
        assert stats.get("registrations_total") == 1
    finally:
        server.close()
        await lookup.close()


async def test_the_lookup_logs_back_in_after_the_server_restarts(
    account: AccountMaker,
) -> None:
    alice, operator = account("alice"), account("rdv")
    tv = generate_identity(f"{alice.jid}/tv")
    async with open_xmpp_client(alice.jid, alice.password, config=alice.config()) as client:
        await client.publish_key(tv.public_key)
    cfg = operator.config()
    lookup = XmppKeyLookup(operator.jid, operator.password, server=cfg.server,
                           allow_plaintext=cfg.allow_plaintext, ttl=5.0)
    await lookup.start()
    server = await serve(("127.0.0.1", 0), vcards=None, key_lookup=lookup)
    try:
        alice.server.restart()  # the lookup's connection drops; nothing asked yet
        good = Peer(tv, Verifier([], PinStore(None)),
                    config=PeerConfig(rendezvous=server.address))
        await good.start("127.0.0.1", 0, listen=False)
        try:
            await good.wait_registered(20)  # the device's retries span the login
        finally:
            await good.close()
        assert lookup.relogins == 1
        assert server.statistics().get("registrations_total") == 1
    finally:
        server.close()
        await lookup.close()
