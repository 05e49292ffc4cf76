"""Device keys in vCards on a real Prosody, in both server configurations:
vCard4 on PEP (Debian's default) and vcard-temp storage (mod_vcard)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Callable

import pytest

from dtx.errors import AuthenticationError, ConnectError, XmppError
from dtx.identity import DeviceIdentity, generate_identity
from dtx.trust.vcard import (
    VCARD4_NS,
    VCARD_TEMP_NS,
    add_key,
    extract_keys,
    new_vcard,
)
from dtx.xmpp.client import XmppConfig, open_xmpp_client
from tests.xmpp.conftest import Account
from dtx.lab.prosody import ProsodyServer

AccountMaker = Callable[[str], Account]


def _key(acct: Account, resource: str) -> DeviceIdentity:
    return generate_identity(f"{acct.jid}/{resource}")


def _expected_form(server: ProsodyServer) -> str:
    return "vcard4" if server.kind == "vcard4" else "vcard-temp"


async def test_publish_then_fetch_round_trip(account: AccountMaker, prosody: ProsodyServer) -> None:
    alice = account("alice")
    tv = _key(alice, "tv")
    async with open_xmpp_client(alice.jid, alice.password, config=alice.config()) as c:
        assert await c.fetch_keys(alice.jid) is None
        change = await c.publish_key(tv.public_key)
        assert change.written == (_expected_form(prosody),)
        assert await c.fetch_keys(alice.jid) == frozenset({tv.public_key})


async def test_two_devices_listed_and_revoke_removes_only_one(account: AccountMaker) -> None:
    alice = account("alice")
    tv, phone = _key(alice, "tv"), _key(alice, "phone")
    async with open_xmpp_client(alice.jid, alice.password, config=alice.config()) as c:
        await c.publish_key(tv.public_key)
        await c.publish_key(phone.public_key)
        assert await c.fetch_keys(alice.jid) == frozenset({tv.public_key, phone.public_key})
        change = await c.revoke_key(tv.public_key)
        assert change.changed
        assert change.keys == frozenset({phone.public_key})
        assert await c.fetch_keys(alice.jid) == frozenset({phone.public_key})
        again = await c.revoke_key(tv.public_key)
        assert not again.changed
        assert await c.fetch_keys(alice.jid) == frozenset({phone.public_key})


async def test_publish_is_idempotent(account: AccountMaker) -> None:
    alice = account("alice")
    tv = _key(alice, "tv")
    async with open_xmpp_client(alice.jid, alice.password, config=alice.config()) as c:
        first = await c.publish_key(tv.public_key)
        before = await c.fetch_vcards(alice.jid)
        second = await c.publish_key(tv.public_key)
        after = await c.fetch_vcards(alice.jid)
    assert first.changed and not second.changed
    assert before == after
    doc = after.vcard4 if after.vcard4 is not None else after.vcard_temp
    assert doc is not None and extract_keys(doc) == [tv.public_key]


async def test_other_fields_are_kept(account: AccountMaker, prosody: ProsodyServer) -> None:
    alice = account("alice")
    tv, phone = _key(alice, "tv"), _key(alice, "phone")
    if prosody.kind == "vcard4":
        ns = VCARD4_NS
        doc = (
            f'<vcard xmlns="{ns}"><fn><text>Alice Example</text></fn>'
            f"<note><text>living room</text></note></vcard>"
        ).encode()
        fields = [f"{{{ns}}}fn/{{{ns}}}text", f"{{{ns}}}note/{{{ns}}}text"]
    else:
        ns = VCARD_TEMP_NS
        doc = (
            f'<vCard xmlns="{ns}"><FN>Alice Example</FN><NOTE>living room</NOTE>'
            f"<KEY><TYPE>application/pgp-keys</TYPE><CRED>not-ours</CRED></KEY></vCard>"
        ).encode()
        fields = [f"{{{ns}}}FN", f"{{{ns}}}NOTE", f"{{{ns}}}KEY/{{{ns}}}CRED"]
    async with open_xmpp_client(alice.jid, alice.password, config=alice.config()) as c:
        await c.put_vcard(add_key(doc, phone.public_key))
        await c.publish_key(tv.public_key)
        await c.revoke_key(phone.public_key)
        fetched = await c.fetch_vcards(alice.jid)
    stored = fetched.vcard4 if prosody.kind == "vcard4" else fetched.vcard_temp
    assert stored is not None
    root = ET.fromstring(stored)
    values = [root.findtext(path) for path in fields]
    original = ET.fromstring(doc)
    assert values == [original.findtext(path) for path in fields]
    assert extract_keys(stored) == [tv.public_key]


async def test_another_account_without_roster_relation_reads_the_keys(
    account: AccountMaker,
) -> None:
    alice, rendezvous = account("alice"), account("rendezvous")
    tv = _key(alice, "tv")
    async with open_xmpp_client(alice.jid, alice.password, config=alice.config()) as c:
        await c.publish_key(tv.public_key)
    cfg = rendezvous.config()
    async with open_xmpp_client(rendezvous.jid, rendezvous.password, config=cfg) as r:
        assert await r.fetch_keys(alice.jid) == frozenset({tv.public_key})
        assert await r.fetch_keys(rendezvous.jid) is None


async def test_vcard4_node_opened_when_created_with_another_access_model(
    account: AccountMaker, prosody: ProsodyServer
) -> None:
    if prosody.kind != "vcard4":
        pytest.skip("only a vCard4 server has the PEP node")
    alice, bob = account("alice"), account("bob")
    tv = _key(alice, "tv")
    async with open_xmpp_client(alice.jid, alice.password, config=alice.config()) as c:
        # A vCard4 client's IQ set (XEP-0292) creates the node with the
        # server's default access model ("presence" in Prosody).
        iq = c._session().make_iq_set()  # noqa: SLF001 - raw XEP-0292 set
        iq.append(ET.fromstring(new_vcard(alice.jid, "vcard4")))
        await iq.send(timeout=10)  # type: ignore[no-untyped-call]
    async with open_xmpp_client(bob.jid, bob.password, config=bob.config()) as b:
        with pytest.raises(XmppError, match="forbidden"):
            await b.fetch_keys(alice.jid)
    async with open_xmpp_client(alice.jid, alice.password, config=alice.config()) as c:
        await c.publish_key(tv.public_key)
    async with open_xmpp_client(bob.jid, bob.password, config=bob.config()) as b:
        assert await b.fetch_keys(alice.jid) == frozenset({tv.public_key})


async def test_vcard_temp_key_dropped_by_translating_server(
    account: AccountMaker, prosody: ProsodyServer
) -> None:
    """The measurement behind the choice of form: Prosody with
    mod_vcard_legacy keeps no vcard-temp KEY; mod_vcard keeps it."""
    alice = account("alice")
    tv = _key(alice, "tv")
    doc = add_key(new_vcard(alice.jid, "vcard-temp"), tv.public_key)
    async with open_xmpp_client(alice.jid, alice.password, config=alice.config()) as c:
        await c.put_vcard(doc)
        keys = await c.fetch_keys(alice.jid)
        if prosody.kind == "vcard4":
            assert not keys
            with pytest.raises(XmppError, match="would remove every device's key"):
                await c.publish_key(tv.public_key, fmt="vcard-temp")
        else:
            assert keys == frozenset({tv.public_key})


async def test_wrong_password_is_refused(account: AccountMaker) -> None:
    alice = account("alice")
    with pytest.raises(AuthenticationError):
        async with open_xmpp_client(alice.jid, "wrong", config=alice.config(timeout=5.0)):
            pass


async def test_plaintext_server_refused_without_opt_in(account: AccountMaker) -> None:
    alice = account("alice")
    with pytest.raises(XmppError, match="does not offer TLS"):
        async with open_xmpp_client(
            alice.jid, alice.password, config=alice.config(allow_plaintext=False)
        ):
            pass


async def test_tls_server_round_trip(
    tls_account: AccountMaker, prosody_tls: ProsodyServer
) -> None:
    alice, bob = tls_account("alice"), tls_account("bob")
    tv = _key(alice, "tv")
    cfg = alice.config(allow_plaintext=False)
    async with open_xmpp_client(alice.jid, alice.password, config=cfg) as c:
        assert (await c.publish_key(tv.public_key)).changed
    async with open_xmpp_client(bob.jid, bob.password, config=bob.config()) as b:
        assert await b.fetch_keys(alice.jid) == frozenset({tv.public_key})


async def test_tls_certificate_must_be_trusted(tls_account: AccountMaker) -> None:
    alice = tls_account("alice")
    with pytest.raises(ConnectError):
        async with open_xmpp_client(
            alice.jid, alice.password, config=alice.config(ca_file=None, timeout=5.0)
        ):
            pass


async def test_no_server_is_a_connect_error() -> None:
    config = XmppConfig(server=("127.0.0.1", 9), allow_plaintext=True, timeout=2.0)
    with pytest.raises(ConnectError):
        async with open_xmpp_client("nobody@example.org", "x", config=config):
            pass
