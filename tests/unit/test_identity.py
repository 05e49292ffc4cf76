"""Device keys, key files and fingerprints (dtx.identity)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dtx.errors import FingerprintError, KeyFileError
from dtx.identity import (
    DeviceIdentity,
    decode_key_file,
    encode_key_file,
    fingerprint,
    fingerprint_matches,
    fingerprints_equal,
    generate_identity,
    load_identity,
    parse_fingerprint,
    save_identity,
    verify_signature,
)
from dtx.jid import JID

# A fixed device key: seed 00 01 02 ... 1f.
SEED = bytes(range(32))
PUBLIC = bytes.fromhex("03a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8")
GOLDEN_FINGERPRINT = (
    "SHA256:kzdv-vj2u-mndu-yauf-35o3-6k6k-w462-mujv-ra46-tn3u-qgzo-vmih-ocga"
)
GOLDEN_KEY_FILE = b"""\
dtx-jid: tv@example.org/living-room
dtx-fingerprint: SHA256:kzdv-vj2u-mndu-yauf-35o3-6k6k-w462-mujv-ra46-tn3u-qgzo-vmih-ocga

-----BEGIN PRIVATE KEY-----
MC4CAQAwBQYDK2VwBCIEIAABAgMEBQYHCAkKCwwNDg8QERITFBUWFxgZGhscHR4f
-----END PRIVATE KEY-----
"""
JID_TEXT = "tv@example.org/living-room"


@pytest.fixture
def fixed() -> DeviceIdentity:
    return DeviceIdentity.from_private_bytes(JID_TEXT, SEED)


@pytest.fixture
def umask_zero() -> Iterator[None]:
    """The widest umask, so a 0600 result is the code's doing."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


# -- fingerprints ---------------------------------------------------------------


def test_golden_public_key_and_fingerprint(fixed: DeviceIdentity) -> None:
    assert fixed.public_key == PUBLIC
    assert fixed.fingerprint == GOLDEN_FINGERPRINT
    assert fingerprint(PUBLIC) == GOLDEN_FINGERPRINT


def test_fingerprint_grouping() -> None:
    fp = fingerprint(PUBLIC)
    prefix, _, body = fp.partition(":")
    assert prefix == "SHA256"
    groups = body.split("-")
    assert len(groups) == 13
    assert all(len(g) == 4 for g in groups)
    assert body == body.lower()


@pytest.mark.parametrize(
    "variant",
    [
        GOLDEN_FINGERPRINT,
        GOLDEN_FINGERPRINT.upper(),
        GOLDEN_FINGERPRINT.replace("-", ""),
        GOLDEN_FINGERPRINT.replace("-", " "),
        GOLDEN_FINGERPRINT.removeprefix("SHA256:"),
        "sha256:" + GOLDEN_FINGERPRINT.removeprefix("SHA256:").replace("-", "").upper(),
        "  " + GOLDEN_FINGERPRINT + "\n",
        "SHA256:kzdvvj2u mndu-yauf:35o3 6k6k w462 mujv ra46 tn3u qgzo vmih ocga",
    ],
)
def test_fingerprint_parse_ignores_grouping_and_case(variant: str) -> None:
    assert fingerprints_equal(variant, GOLDEN_FINGERPRINT)
    assert fingerprint_matches(variant, PUBLIC)
    assert parse_fingerprint(variant) == parse_fingerprint(GOLDEN_FINGERPRINT)


def test_fingerprints_of_different_keys_differ() -> None:
    other = fingerprint(bytes(32))
    assert not fingerprints_equal(other, GOLDEN_FINGERPRINT)
    assert not fingerprint_matches(GOLDEN_FINGERPRINT, bytes(32))


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "SHA256:",
        GOLDEN_FINGERPRINT[:-1],
        GOLDEN_FINGERPRINT + "a",
        GOLDEN_FINGERPRINT.replace("k", "1", 1),  # '1' is not base32
        "MD5:" + GOLDEN_FINGERPRINT.removeprefix("SHA256:"),
        # right length, but the last character carries bits a digest never has
        GOLDEN_FINGERPRINT[:-1] + "b",
    ],
)
def test_fingerprint_parse_refuses(bad: str) -> None:
    with pytest.raises(FingerprintError):
        parse_fingerprint(bad)


# -- identity -------------------------------------------------------------------


def test_sign_and_verify(fixed: DeviceIdentity) -> None:
    sig = fixed.sign(b"challenge")
    assert verify_signature(fixed.public_key, sig, b"challenge")
    assert not verify_signature(fixed.public_key, sig, b"other")
    assert not verify_signature(bytes(32), sig, b"challenge")
    assert not verify_signature(b"short", sig, b"challenge")


def test_generate_gives_distinct_keys() -> None:
    a = generate_identity("a@example.org/x")
    b = generate_identity(JID.parse("a@example.org/x"))
    assert a.jid == b.jid
    assert a.public_key != b.public_key
    assert len(a.public_key) == 32


def test_seed_length_checked() -> None:
    with pytest.raises(KeyFileError):
        DeviceIdentity.from_private_bytes(JID_TEXT, b"\x00" * 31)


# -- key file encoding ----------------------------------------------------------


def test_golden_key_file(fixed: DeviceIdentity) -> None:
    assert encode_key_file(fixed) == GOLDEN_KEY_FILE
    back = decode_key_file(GOLDEN_KEY_FILE)
    assert back.jid == JID.parse(JID_TEXT)
    assert back.public_key == PUBLIC


def test_cryptography_accepts_text_before_pem() -> None:
    """RFC 7468 explanatory text: the plain library loader reads our files."""
    key = serialization.load_pem_private_key(GOLDEN_KEY_FILE, password=None)
    assert isinstance(key, Ed25519PrivateKey)


def _pem(key: object, encryption: serialization.KeySerializationEncryption | None = None) -> bytes:
    assert isinstance(key, (Ed25519PrivateKey, ec.EllipticCurvePrivateKey))
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        encryption or serialization.NoEncryption(),
    )


ED_PEM = _pem(Ed25519PrivateKey.from_private_bytes(SEED))

MALFORMED = [
    # (file bytes, words the message must contain)
    (b"", "no PEM block"),
    (b"dtx-jid: tv@example.org/x\n", "no PEM block"),
    (ED_PEM, "dtx-jid"),
    (b"dtx-jid: not a jid@\n" + ED_PEM, "bad dtx-jid"),
    (b"dtx-jid: a@example.org\ndtx-jid: b@example.org\n" + ED_PEM, "more than one"),
    (b"dtx-jid: a@example.org\n-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
     "not a PEM private key"),
    (b"dtx-jid: a@example.org\n" + ED_PEM.replace(b"-----END", b"-----FIN"), "not a PEM"),
    (b"\xff\xfe" + ED_PEM, "not UTF-8"),
    (b"dtx-jid: a@example.org\n" + _pem(ec.generate_private_key(ec.SECP256R1())), "not Ed25519"),
    (
        b"dtx-jid: a@example.org\n"
        + _pem(
            Ed25519PrivateKey.from_private_bytes(SEED),
            serialization.BestAvailableEncryption(b"secret"),
        ),
        "encrypted",
    ),
    (b"dtx-jid: a@example.org\n" + b"#" * 70_000 + ED_PEM, "larger than"),
]


@pytest.mark.parametrize(("data", "words"), MALFORMED)
def test_malformed_key_file(data: bytes, words: str) -> None:
    with pytest.raises(KeyFileError, match=words):
        decode_key_file(data, source="f.key")


# -- key files on disk ----------------------------------------------------------


def test_save_creates_0600_and_reads_back(
    tmp_path: Path, fixed: DeviceIdentity, umask_zero: None
) -> None:
    path = tmp_path / "device.key"
    save_identity(fixed, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes() == GOLDEN_KEY_FILE
    back = load_identity(path)
    assert back.jid == fixed.jid
    assert back.public_key == fixed.public_key


def test_save_refuses_to_overwrite(tmp_path: Path, fixed: DeviceIdentity) -> None:
    path = tmp_path / "device.key"
    path.write_bytes(b"precious")
    with pytest.raises(KeyFileError, match="exists"):
        save_identity(fixed, path)
    assert path.read_bytes() == b"precious"


def test_save_overwrite_replaces_with_0600(
    tmp_path: Path, fixed: DeviceIdentity, umask_zero: None
) -> None:
    path = tmp_path / "device.key"
    path.write_bytes(b"old")
    path.chmod(0o644)
    save_identity(fixed, path, overwrite=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_identity(path).public_key == PUBLIC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["device.key"]


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o660])
def test_load_refuses_loose_mode(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "device.key"
    path.write_bytes(GOLDEN_KEY_FILE)
    path.chmod(mode)
    with pytest.raises(KeyFileError) as info:
        load_identity(path)
    message = str(info.value)
    assert f"chmod 600 {path}" in message
    assert f"{mode:04o}" in message


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_load_accepts_private_mode(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "device.key"
    path.write_bytes(GOLDEN_KEY_FILE)
    path.chmod(mode)
    assert load_identity(path).public_key == PUBLIC


def test_load_missing_and_directory(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="no such key file"):
        load_identity(tmp_path / "absent.key")
    sub = tmp_path / "dir"
    sub.mkdir(mode=0o700)
    with pytest.raises(KeyFileError):
        load_identity(sub)


def test_load_malformed_file_names_it(tmp_path: Path) -> None:
    path = tmp_path / "device.key"
    path.write_bytes(ED_PEM)
    path.chmod(0o600)
    with pytest.raises(KeyFileError, match=str(path)):
        load_identity(path)
