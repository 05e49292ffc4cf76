"""XmppKeySource on a real Prosody: a key removed from the vCard stops
being trusted within the TTL."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from dtx.errors import DtxError, UntrustedKeyError, XmppError
from dtx.identity import generate_identity
from dtx.trust import PinStore, Verifier
from dtx.trust.xmpp import XmppKeySource, XmppKeySourceConfig
from dtx.xmpp.client import XmppClient, open_xmpp_client
from tests.xmpp.conftest import Account

AccountMaker = Callable[[str], Account]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_revoked_key_untrusted_within_ttl(account: AccountMaker) -> None:
    alice, rendezvous = account("alice"), account("rendezvous")
    tv = generate_identity(f"{alice.jid}/tv")
    phone = generate_identity(f"{alice.jid}/phone")
    clock = FakeClock()
    async with open_xmpp_client(alice.jid, alice.password, config=alice.config()) as a, \
            open_xmpp_client(rendezvous.jid, rendezvous.password,
                             config=rendezvous.config()) as r:
        await a.publish_key(tv.public_key)
        await a.publish_key(phone.public_key)
        source = XmppKeySource(r, config=XmppKeySourceConfig(ttl=60.0), clock=clock)
        verifier = Verifier([source], PinStore(None))
        assert source.keys_for(alice.jid) is None
        await source.prefetch([alice.jid])
        assert source.keys_for(alice.jid) == frozenset({tv.public_key, phone.public_key})
        verifier.verify(f"{alice.jid}/tv", tv.public_key)

        await a.revoke_key(tv.public_key)
        clock.now += 59.0
        assert source.keys_for(alice.jid) == frozenset({tv.public_key, phone.public_key})
        clock.now += 1.0  # the TTL has passed: the old answer is not used
        assert source.keys_for(alice.jid) is None
        assert await source.refresh(alice.jid) == frozenset({phone.public_key})
        with pytest.raises(UntrustedKeyError):
            verifier.verify(f"{alice.jid}/tv", tv.public_key)
        verifier.verify(f"{alice.jid}/phone", phone.public_key)


async def test_failed_refresh_does_not_extend_the_ttl(account: AccountMaker) -> None:
    alice = account("alice")
    tv = generate_identity(f"{alice.jid}/tv")
    clock = FakeClock()
    client = XmppClient(alice.jid, alice.password, config=alice.config())
    await client.connect()
    try:
        await client.publish_key(tv.public_key)
        source = XmppKeySource(client, config=XmppKeySourceConfig(ttl=30.0), clock=clock)
        await source.refresh(alice.jid)
    finally:
        await client.close()
    clock.now += 20.0
    with pytest.raises(XmppError, match="not connected"):
        await source.refresh(alice.jid)
    assert source.keys_for(alice.jid) == frozenset({tv.public_key})
    clock.now += 10.0
    assert source.keys_for(alice.jid) is None


async def test_background_refresh_drops_a_revoked_key(account: AccountMaker) -> None:
    alice, rendezvous = account("alice"), account("rendezvous")
    tv = generate_identity(f"{alice.jid}/tv")
    phone = generate_identity(f"{alice.jid}/phone")
    config = XmppKeySourceConfig(ttl=2.0, refresh_ahead=0.5, retry_interval=0.5)
    async with open_xmpp_client(alice.jid, alice.password, config=alice.config()) as a, \
            open_xmpp_client(rendezvous.jid, rendezvous.password,
                             config=rendezvous.config()) as r:
        await a.publish_key(tv.public_key)
        await a.publish_key(phone.public_key)
        source = XmppKeySource(r, config=config)
        source.start()
        try:
            # keys_for on an unknown account asks the refresher to fetch it.
            waiter = source.wait_updated(alice.jid, timeout=10.0)
            assert source.keys_for(alice.jid) is None
            assert await waiter == frozenset({tv.public_key, phone.public_key})
            await a.revoke_key(tv.public_key)
            keys = None
            for _ in range(5):  # each round is one background refresh
                keys = await source.wait_updated(alice.jid, timeout=10.0)
                if keys == frozenset({phone.public_key}):
                    break
            assert keys == frozenset({phone.public_key})
            assert source.keys_for(alice.jid) == frozenset({phone.public_key})
        finally:
            await source.close()


def test_config_rejects_nonsense() -> None:
    with pytest.raises(DtxError):
        XmppKeySourceConfig(ttl=0)
    with pytest.raises(DtxError):
        XmppKeySourceConfig(refresh_ahead=1.0)
