"""Key sources, the pin store and the verifier (dtx.trust.store)."""

from __future__ import annotations

import base64
import json
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

import pytest

from dtx.errors import (
    PinMismatchError,
    TrustError,
    UnknownPeerError,
    UntrustedKeyError,
)
from dtx.identity import fingerprint
from dtx.trust import (
    KeySource,
    PinStore,
    StaticKeys,
    VCardDirectory,
    Verifier,
    add_key,
    remove_key,
)

DATA = Path(__file__).resolve().parent.parent / "data" / "vcards"
K1 = bytes([1]) * 32
K2 = bytes([2]) * 32
K3 = bytes([3]) * 32
TV = "tv@example.org/living-room"
# Keys of the devices in the sample vCards (see test_vcard.py).
ALICE_PHONE = bytes.fromhex("bc7cbcb5636375fa1d82434d466724d92377f53b980695dd49d26d0ce12205a5")


class Unknown:
    """A source that knows nothing."""

    def keys_for(self, bare_jid: str) -> frozenset[bytes] | None:
        return None


@dataclass(frozen=True)
class Case:
    name: str
    pin: bytes | None
    sources: tuple[frozenset[bytes] | None, ...]
    tofu: bool
    presented: bytes
    expect: type[Exception] | None  # None: accepted


CASES = [
    Case("unknown, no tofu", None, (None,), False, K1, UnknownPeerError),
    Case("no sources at all", None, (), False, K1, UnknownPeerError),
    Case("unknown, tofu", None, (None,), True, K1, None),
    Case("listed", None, (frozenset({K1}),), False, K1, None),
    Case("listed among several", None, (frozenset({K2, K1, K3}),), False, K1, None),
    Case("not listed", None, (frozenset({K2}),), False, K1, UntrustedKeyError),
    Case("not listed, tofu does not override", None, (frozenset({K2}),), True, K1,
         UntrustedKeyError),
    Case("known account without keys", None, (frozenset(),), True, K1, UntrustedKeyError),
    Case("union of sources", None, (None, frozenset({K2}), frozenset({K1})), False, K1, None),
    Case("pinned, unknown", K1, (None,), False, K1, None),
    Case("pinned, listed", K1, (frozenset({K1}),), False, K1, None),
    Case("pin differs", K2, (None,), True, K1, PinMismatchError),
    Case("pin differs though vCard lists new key", K2, (frozenset({K1, K2}),), True, K1,
         PinMismatchError),
    Case("pinned but removed from vCard", K1, (frozenset({K2}),), False, K1, UntrustedKeyError),
    Case("short key, tofu", None, (None,), True, b"\x01" * 31, UntrustedKeyError),
    Case("short key, listed account", None, (frozenset({K1}),), True, b"\x01" * 31,
         UntrustedKeyError),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_verifier_table(case: Case) -> None:
    pins = PinStore(None)
    if case.pin is not None:
        pins.pin(TV, case.pin)
    sources: list[KeySource] = [
        Unknown() if keys is None else StaticKeys({"tv@example.org": keys})
        for keys in case.sources
    ]
    verifier = Verifier(sources, pins, trust_on_first_use=case.tofu)
    if case.expect is None:
        verifier.verify(TV, case.presented)
        assert pins.get(TV) == case.presented  # accepted keys are pinned
        verifier.verify(TV, case.presented)  # and accepted again
    else:
        with pytest.raises(case.expect):
            verifier.verify(TV, case.presented)
        assert pins.get(TV) == case.pin  # a refusal changes no pin


def test_pin_mismatch_message_names_both_fingerprints() -> None:
    pins = PinStore(None)
    pins.pin(TV, K1)
    with pytest.raises(PinMismatchError) as info:
        Verifier([], pins).verify(TV, K2)
    err = info.value
    assert err.jid == TV
    assert err.pinned == fingerprint(K1)
    assert err.presented == fingerprint(K2)
    assert fingerprint(K1) in str(err) and fingerprint(K2) in str(err)
    assert "dtx pin forget" in str(err)


def test_untrusted_message_lists_trusted_fingerprints() -> None:
    verifier = Verifier([StaticKeys({"tv@example.org": [K2, K3]})], PinStore(None))
    with pytest.raises(UntrustedKeyError) as info:
        verifier.verify(TV, K1)
    assert info.value.fingerprint == fingerprint(K1)
    assert info.value.trusted == sorted([fingerprint(K2), fingerprint(K3)])


def test_pins_are_per_device() -> None:
    pins = PinStore(None)
    verifier = Verifier([], pins, trust_on_first_use=True)
    verifier.verify("tv@example.org/living-room", K1)
    verifier.verify("tv@example.org/kitchen", K2)  # another device, another key
    verifier.verify("TV@Example.org/living-room", K1)  # same device, normalised
    with pytest.raises(PinMismatchError):
        verifier.verify("tv@example.org/kitchen", K1)
    verifier.verify("tv@example.org", K3)  # a bare JID is pinned as itself
    assert pins.entries() == {
        "tv@example.org": K3,
        "tv@example.org/kitchen": K2,
        "tv@example.org/living-room": K1,
    }


def test_malformed_jid_is_trust_error() -> None:
    with pytest.raises(TrustError):
        Verifier([], PinStore(None), trust_on_first_use=True).verify("a@b@c", K1)


# -- pin store ------------------------------------------------------------------


def test_pins_persist_across_instances(tmp_path: Path) -> None:
    path = tmp_path / "state" / "pins.json"
    first = PinStore(path)
    first.pin(TV, K1)
    first.pin("tv@example.org/kitchen", K2)
    first.flush()  # written by the store's thread; flush waits for it
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == ["pins.json"]  # no temp left
    second = PinStore(path)
    assert second.get(TV) == K1
    assert second.entries() == first.entries()
    records = [json.loads(line) for line in path.read_text().splitlines()[1:]]
    assert {"pin": TV, "key": base64.b64encode(K1).decode(), "fingerprint": fingerprint(K1)} \
        in records


def test_pins_survive_a_restart_of_the_verifier(tmp_path: Path) -> None:
    path = tmp_path / "pins.json"
    Verifier([], PinStore(path), trust_on_first_use=True).verify(TV, K1)
    with pytest.raises(PinMismatchError):
        Verifier([], PinStore(path), trust_on_first_use=True).verify(TV, K2)


def test_forget(tmp_path: Path) -> None:
    pins = PinStore(tmp_path / "pins.json")
    pins.pin("tv@example.org/living-room", K1)
    pins.pin("tv@example.org/kitchen", K2)
    pins.pin("tv@example.org", K3)
    pins.pin("alice@example.org/phone", K3)
    assert pins.forget("tv@example.org/kitchen") == 1
    assert pins.forget("tv@example.org/kitchen") == 0
    assert pins.get("tv@example.org/living-room") == K1
    assert pins.forget("TV@example.org") == 2  # bare: every device of the account
    assert PinStore(tmp_path / "pins.json").entries() == {"alice@example.org/phone": K3}


def test_forget_then_new_key_accepted(tmp_path: Path) -> None:
    pins = PinStore(tmp_path / "pins.json")
    verifier = Verifier([], pins, trust_on_first_use=True)
    verifier.verify(TV, K1)
    with pytest.raises(PinMismatchError):
        verifier.verify(TV, K2)
    PinStore(tmp_path / "pins.json").forget(TV)  # as another process would
    pins.reload()  # else within PinStoreConfig.reload_interval
    verifier.verify(TV, K2)
    assert pins.get(TV) == K2


def test_store_sees_changes_by_other_instances(tmp_path: Path) -> None:
    a = PinStore(tmp_path / "pins.json")
    b = PinStore(tmp_path / "pins.json")
    a.pin(TV, K1)
    a.flush()
    b.reload()
    assert b.get(TV) == K1
    b.pin("x@example.org/y", K2)
    b.flush()
    a.reload()
    assert a.entries() == {TV: K1, "x@example.org/y": K2}
    (tmp_path / "pins.json").unlink()
    a.reload()
    assert a.entries() == {}


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not json",
        b"[]",
        b'{"version": 2, "pins": {}}',
        b'{"version": 1}',
        b'{"version": 1, "pins": {"tv@example.org": "AQ=="}}',
        b'{"version": 1, "pins": {"tv@example.org": {"key": "AQ=="}}}',
        b'{"version": 1, "pins": {"tv@example.org": {"key": "!!"}}}',
        b'{"version": 1, "pins": {"@bad": {"key": "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE="}}}',
        b"\xff\xfe",
        b'{"version": 1, "pins": {}} trailing',
        b'{"version": 3}\n{"pin": "tv@example.org/x", "key": "AQ=="}\n',
    ],
)
def test_corrupt_pin_file_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "pins.json"
    path.write_bytes(content)
    with pytest.raises(TrustError):
        PinStore(path)


def test_pin_refuses_wrong_length(tmp_path: Path) -> None:
    with pytest.raises(TrustError):
        PinStore(None).pin(TV, b"\x00" * 16)


# -- sources --------------------------------------------------------------------


def test_static_keys() -> None:
    source = StaticKeys({"TV@example.org": [K1], "tv@example.org/kitchen": [K2]})
    assert isinstance(source, KeySource)
    assert source.keys_for("tv@example.org") == frozenset({K1, K2})
    assert source.keys_for("tv@example.org/anything") == frozenset({K1, K2})
    assert source.keys_for("other@example.org") is None
    with pytest.raises(TrustError):
        StaticKeys({"tv@example.org": [b"short"]})


def test_vcard_directory(tmp_path: Path) -> None:
    for name in ("alice@example.org.xml", "bob@example.org.xml"):
        shutil.copy(DATA / name, tmp_path / name)
    source = VCardDirectory(tmp_path)
    assert isinstance(source, KeySource)
    alice = source.keys_for("alice@example.org")
    assert alice is not None and len(alice) == 2 and ALICE_PHONE in alice
    assert source.keys_for("Alice@Example.org/phone") == alice
    bob = source.keys_for("bob@example.org")
    assert bob is not None and len(bob) == 2
    assert source.keys_for("carol@example.org") is None
    assert source.file_for("Alice@Example.org/x") == str(tmp_path / "alice@example.org.xml")


def test_vcard_directory_rereads_changed_files(tmp_path: Path) -> None:
    path = tmp_path / "alice@example.org.xml"
    shutil.copy(DATA / path.name, path)
    source = VCardDirectory(tmp_path)
    before = source.keys_for("alice@example.org")
    assert before is not None and K1 not in before
    path.write_bytes(add_key(path.read_bytes(), K1))
    after = source.keys_for("alice@example.org")
    assert after == before | {K1}
    path.write_bytes(remove_key(path.read_bytes(), ALICE_PHONE))
    assert source.keys_for("alice@example.org") == after - {ALICE_PHONE}
    path.unlink()
    assert source.keys_for("alice@example.org") is None


@pytest.mark.parametrize("name", ["billion-laughs.xml", "not-a-vcard.xml"])
def test_vcard_directory_fails_closed(tmp_path: Path, name: str) -> None:
    shutil.copy(DATA / name, tmp_path / "mallory@example.org.xml")
    verifier = Verifier([VCardDirectory(tmp_path)], PinStore(None), trust_on_first_use=True)
    with pytest.raises(TrustError, match="mallory@example.org.xml"):
        verifier.verify("mallory@example.org/x", K1)


def test_verifier_with_vcard_directory_and_revocation(tmp_path: Path) -> None:
    path = tmp_path / "alice@example.org.xml"
    shutil.copy(DATA / path.name, path)
    pins = PinStore(tmp_path / "pins.json")
    verifier = Verifier([VCardDirectory(tmp_path)], pins)
    verifier.verify("alice@example.org/phone", ALICE_PHONE)
    with pytest.raises(UntrustedKeyError):
        verifier.verify("alice@example.org/tablet", K1)
    path.write_bytes(remove_key(path.read_bytes(), ALICE_PHONE))
    with pytest.raises(UntrustedKeyError):  # pinned, but no longer published
        verifier.verify("alice@example.org/phone", ALICE_PHONE)
