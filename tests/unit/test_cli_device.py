"""How ``dtx send|ping|listen --json`` name the signalling and the relay
of a session (``signalling``, ``relay``)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import pytest

from dtx.cli import Device


@dataclass
class FakeSession:
    peer_jid: str
    path: str
    history: list[tuple[float, str]] = field(default_factory=list)

    def path_history(self) -> list[tuple[float, str]]:
        return self.history or [(0.0, self.path)]


class FakeSignalling:
    def __init__(self, introduced: set[str]) -> None:
        self._introduced = introduced

    def introduced(self, jid: str) -> bool:
        return jid in self._introduced


def args(**kw: object) -> argparse.Namespace:
    return argparse.Namespace(**{"rendezvous": None, "addr": None, **kw})


TV = "tv@example.org/living-room"


@pytest.mark.parametrize(("device", "session", "signalling", "relay"), [
    (Device(None, FakeSignalling({TV}), args()), FakeSession(TV, "relay"), "xmpp", "turn"),
    (Device(None, FakeSignalling({TV}), args()), FakeSession(TV, "direct"), "xmpp", None),
    (Device(None, None, args(rendezvous=("192.0.2.1", 3478))), FakeSession(TV, "relay"),
     "rendezvous", "rendezvous"),
    (Device(None, None, args(rendezvous=("192.0.2.1", 3478))),
     FakeSession(TV, "lan", [(0.0, "lan")]), "lan", None),
    (Device(None, None, args(addr=("192.0.2.1", 5300))), FakeSession(TV, "direct"), None, None),
    # introduced by the rendezvous, though XMPP signalling also runs
    (Device(None, FakeSignalling(set()), args(rendezvous=("192.0.2.1", 3478))),
     FakeSession(TV, "relay"), "rendezvous", "rendezvous"),
], ids=["xmpp-relay", "xmpp-direct", "rendezvous-relay", "lan", "addr", "rendezvous-too"])
def test_signalling_and_relay_keys(device: Device, session: FakeSession, signalling: str | None,
                                   relay: str | None) -> None:
    assert device.signalled_by(session) == signalling
    assert device.relay_of(session) == relay
    assert device.relay_of(session, "direct") is None


@pytest.mark.parametrize("argv, resume", [
    (["listen", "k"], 120.0),
    (["listen", "k", "--resume-timeout", "30"], 30.0),
    (["send", "k", "--to", "tv@example.org", "--body", "x", "--resume-timeout", "0"], None),
])
def test_resume_timeout_reaches_the_peer_config(argv: list[str], resume: float | None) -> None:
    from dtx.cli import build_parser, peer_config

    assert peer_config(build_parser().parse_args(argv)).resume_timeout == resume


def test_a_negative_resume_timeout_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    from dtx.cli import build_parser

    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["listen", "k", "--resume-timeout", "-1"])
    assert exit_.value.code == 2
    assert "--resume-timeout" in capsys.readouterr().err
