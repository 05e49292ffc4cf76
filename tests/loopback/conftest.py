"""Fixtures for sessions between real UDP sockets on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from dtx.aio.peer import Peer, PeerConfig, open_peer
from dtx.identity import DeviceIdentity, generate_identity
from dtx.trust import PinStore, StaticKeys, Verifier


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
