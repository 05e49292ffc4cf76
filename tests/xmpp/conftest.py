"""Fixtures: a real Prosody per server configuration, accounts on it."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from dtx.identity import DeviceIdentity, generate_identity, save_identity
from dtx.xmpp.client import XmppConfig
from dtx.lab.prosody import ProsodyServer, ServerKind, prosody_missing

_counter = itertools.count(1)


@dataclass(frozen=True)
class Account:
    """A registered account and what a test needs to log in as it."""

    jid: str
    password: str
    server: ProsodyServer

    def config(self, **overrides: object) -> XmppConfig:
        values: dict[str, object] = {
            "server": self.server.address(),
            "allow_plaintext": not self.server.tls,
            "ca_file": self.server.ca_file,
            "timeout": 10.0,
        }
        values.update(overrides)
        return XmppConfig(**values)  # type: ignore[arg-type]


def _start(kind: ServerKind, tls: bool) -> Iterator[ProsodyServer]:
    reason = prosody_missing()
    if reason is not None:
        pytest.skip(reason)
    server = ProsodyServer(kind, tls=tls)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module", params=["vcard4", "vcard-temp"])
def prosody(request: pytest.FixtureRequest) -> Iterator[ProsodyServer]:
    """Prosody as Debian ships it (vCard4 on PEP) and one storing vcard-temp."""
    yield from _start(request.param, tls=False)


@pytest.fixture(scope="module")
def prosody_tls() -> Iterator[ProsodyServer]:
    """The vCard4 configuration with STARTTLS required (self-signed cert)."""
    yield from _start("vcard4", tls=True)


def _account_factory(server: ProsodyServer) -> Callable[[str], Account]:
    def make(name: str = "user") -> Account:
        user = f"{name}{next(_counter)}"
        password = f"pw-{user}-secret"
        jid = server.register(user, password)
        return Account(jid, password, server)

    return make


@pytest.fixture
def account(prosody: ProsodyServer) -> Callable[[str], Account]:
    """Makes a fresh account on the server under test."""
    return _account_factory(prosody)


@pytest.fixture
def tls_account(prosody_tls: ProsodyServer) -> Callable[[str], Account]:
    return _account_factory(prosody_tls)


@pytest.fixture
def device(tmp_path: os.PathLike[str]) -> Callable[[Account, str], tuple[DeviceIdentity, str]]:
    """Makes a device key (and its key file) for an account."""

    def make(acct: Account, resource: str) -> tuple[DeviceIdentity, str]:
        identity = generate_identity(f"{acct.jid}/{resource}")
        path = os.path.join(os.fspath(tmp_path), f"{resource}-{next(_counter)}.key")
        save_identity(identity, path)
        return identity, path

    return make
