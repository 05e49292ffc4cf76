"""Fixtures for sessions between real UDP sockets on loopback.

A module marked ``pytestmark = BOTH_LOOPS`` runs each of its tests twice,
on asyncio's own event loop and on uvloop (test ids ``[asyncio]``,
``[uvloop]``); without uvloop installed the uvloop runs are skipped, saying
so. Every other test runs on asyncio's loop only, as before.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from dtx.aio.loop import uvloop_missing
from dtx.aio.peer import Peer, PeerConfig, open_peer
from dtx.identity import DeviceIdentity, generate_identity
from dtx.lab.coturn import CoturnServer, coturn_missing
from dtx.lab.prosody import ProsodyServer, TurnExternal, prosody_missing
from dtx.trust import PinStore, StaticKeys, Verifier

TURN_SECRET = "dtx-loopback-turn-secret"

BOTH_LOOPS = pytest.mark.asyncio(loop_factories=["asyncio", "uvloop"])
"""Run the marked tests once per event loop (a module's ``pytestmark``)."""


def new_uvloop() -> asyncio.AbstractEventLoop:
    """A uvloop event loop (the runs that would need one without uvloop
    installed are skipped before they start: :func:`pytest_collection_modifyitems`)."""
    import uvloop

    return uvloop.new_event_loop()


LOOP_FACTORIES: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop, "uvloop": new_uvloop}


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item
                                  ) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Both loops for a test marked :data:`BOTH_LOOPS`, asyncio's for the rest."""
    marker = item.get_closest_marker("asyncio")
    if marker is not None and "loop_factories" in marker.kwargs:
        return LOOP_FACTORIES
    return {"asyncio": asyncio.new_event_loop}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Without uvloop, its runs are skipped, saying so."""
    missing = uvloop_missing()
    if missing is None:
        return
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and any(v is new_uvloop for v in callspec.params.values()):
            item.add_marker(pytest.mark.skip(reason=f"the uvloop run: {missing}"))


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
