"""Fixtures for sessions between real UDP sockets on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dtx.aio.peer import Peer, PeerConfig, open_peer
from dtx.identity import DeviceIdentity, generate_identity
from dtx.lab.coturn import CoturnServer, coturn_missing
from dtx.lab.prosody import ProsodyServer, TurnExternal, prosody_missing
from dtx.trust import PinStore, StaticKeys, Verifier

TURN_SECRET = "dtx-loopback-turn-secret"


@dataclass(frozen=True)
class Servers:
    """An account's own XMPP server (Prosody, ``mod_turn_external``) and
    the coturn beside it, on loopback; accounts alice, mallory and bob
    (password ``pw-<user>``)."""

    prosody: ProsodyServer
    coturn: CoturnServer


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    for reason in (prosody_missing(), coturn_missing()):
        if reason:
            pytest.skip(reason)
    folder: Path = tmp_path_factory.mktemp("xmpp-signalling")
    coturn = CoturnServer(TURN_SECRET, realm="example.org", folder=str(folder / "turn"))
    coturn.start()
    prosody = ProsodyServer("vcard4", folder=str(folder / "prosody"),
                            turn=TurnExternal(secret=TURN_SECRET, host=coturn.ip,
                                              port=coturn.port, ttl=600))
    try:
        prosody.start()
        for user in ("alice", "mallory", "bob"):
            prosody.register(user, f"pw-{user}")
        yield Servers(prosody, coturn)
    finally:
        prosody.stop()
        coturn.stop()


@dataclass
class Pair:
    tv_id: DeviceIdentity
    remote_id: DeviceIdentity
    tv: Peer
    remote: Peer


def trusting(*ids: DeviceIdentity) -> Verifier:
    keys: dict[str, list[bytes]] = {}
    for ident in ids:
        keys.setdefault(str(ident.jid.bare), []).append(ident.public_key)
    return Verifier([StaticKeys(keys)], PinStore(None))


@pytest.fixture
def tv_id() -> DeviceIdentity:
    return generate_identity("tv@example.org/living-room")


@pytest.fixture
def remote_id() -> DeviceIdentity:
    return generate_identity("remote@example.org/phone")


@pytest.fixture
async def pair(tv_id: DeviceIdentity, remote_id: DeviceIdentity) -> AsyncIterator[Pair]:
    config = PeerConfig()
    async with open_peer(tv_id, trusting(tv_id, remote_id), config=config) as tv, \
            open_peer(remote_id, trusting(tv_id, remote_id), config=config) as remote:
        yield Pair(tv_id, remote_id, tv, remote)
