"""Device identity: one Ed25519 key per device, its key file and fingerprint.

Key file (see docs/identity.md): UTF-8 text, explanatory header lines
``name: value`` before an unencrypted PKCS#8 PEM block (RFC 7468 allows text
before the BEGIN line). The ``dtx-jid`` header records the device's JID::

    dtx-jid: tv@example.org/living-room

    -----BEGIN PRIVATE KEY-----
    MC4CAQAwBQYDK2VwBCIEI...
    -----END PRIVATE KEY-----

The file is created with mode 0600 and never exists with a wider mode; a
file that group or others may read or write is refused on load.

Fingerprint: SHA-256 of the raw 32-byte public key, as ``SHA256:`` and the
unpadded lower-case RFC 4648 base32 digest in 13 groups of 4 characters
joined by ``-``. :func:`parse_fingerprint` ignores case, grouping and
whitespace.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import stat
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from dtx.errors import FingerprintError, JIDError, KeyFileError
from dtx.jid import JID

__all__ = [
    "FINGERPRINT_PREFIX",
    "JID_HEADER",
    "MAX_KEY_FILE_BYTES",
    "PUBLIC_KEY_BYTES",
    "DeviceIdentity",
    "decode_key_file",
    "encode_key_file",
    "fingerprint",
    "fingerprint_matches",
    "fingerprints_equal",
    "generate_identity",
    "load_identity",
    "parse_fingerprint",
    "save_identity",
    "verify_signature",
]

logger = logging.getLogger(__name__)

PUBLIC_KEY_BYTES = 32
FINGERPRINT_PREFIX = "SHA256:"
JID_HEADER = "dtx-jid"
MAX_KEY_FILE_BYTES = 64 * 1024
_GROUP = 4
_DIGEST_BYTES = 32
_PEM_BEGIN = "-----BEGIN "


# -- fingerprints -------------------------------------------------------------


def fingerprint(public_key: bytes) -> str:
    """The fingerprint people compare: ``SHA256:`` + grouped base32 digest.

    Any bytes are accepted (a malformed key presented by a peer still needs
    a name in an error message); for a device key, pass the raw 32 bytes.
    """
    digest = hashlib.sha256(public_key).digest()
    text = base64.b32encode(digest).decode("ascii").rstrip("=").lower()
    groups = [text[i : i + _GROUP] for i in range(0, len(text), _GROUP)]
    return FINGERPRINT_PREFIX + "-".join(groups)


def parse_fingerprint(text: str) -> bytes:
    """The 32-byte SHA-256 digest a fingerprint stands for.

    Case, the ``SHA256:`` prefix, and grouping (``-``, ``:``, spaces) are
    ignored, so what a person types back is accepted. Raises
    :class:`FingerprintError`.
    """
    s = text.strip()
    if s[: len(FINGERPRINT_PREFIX)].upper() == FINGERPRINT_PREFIX:
        s = s[len(FINGERPRINT_PREFIX) :]
    s = "".join(ch for ch in s if ch not in "-: \t\r\n").upper()
    if len(s) != 52 or any(ch not in "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567" for ch in s):
        raise FingerprintError(f"not a dtx key fingerprint: {text!r}")
    digest = base64.b32decode(s + "====")
    if base64.b32encode(digest).decode("ascii").rstrip("=") != s:
        # Non-canonical trailing bits: not something dtx ever printed.
        raise FingerprintError(f"not a dtx key fingerprint: {text!r}")
    return digest


def fingerprints_equal(a: str, b: str) -> bool:
    """True when two fingerprints name the same key, whatever their grouping
    or case. Raises :class:`FingerprintError` if either is malformed."""
    return hmac.compare_digest(parse_fingerprint(a), parse_fingerprint(b))


def fingerprint_matches(text: str, public_key: bytes) -> bool:
    """True when ``text`` is the fingerprint of ``public_key``."""
    return hmac.compare_digest(parse_fingerprint(text), hashlib.sha256(public_key).digest())


def verify_signature(public_key: bytes, signature: bytes, data: bytes) -> bool:
    """Check an Ed25519 signature made with the key whose raw bytes are given."""
    if len(public_key) != PUBLIC_KEY_BYTES:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


# -- the identity -------------------------------------------------------------


@dataclass(frozen=True)
class DeviceIdentity:
    """A device's JID and its Ed25519 private key."""

    jid: JID
    private_key: Ed25519PrivateKey = field(repr=False, compare=False)
    public_key: bytes = field(init=False)
    """Raw 32-byte public key."""

    def __post_init__(self) -> None:
        raw = self.private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        object.__setattr__(self, "public_key", raw)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public_key)

    def sign(self, data: bytes) -> bytes:
        """An Ed25519 signature of ``data``."""
        return self.private_key.sign(data)

    @classmethod
    def from_private_bytes(cls, jid: JID | str, seed: bytes) -> DeviceIdentity:
        """Build from a 32-byte Ed25519 seed (tests, fixed identities)."""
        if len(seed) != 32:
            raise KeyFileError(f"an Ed25519 private key is 32 bytes, not {len(seed)}")
        return cls(_as_jid(jid), Ed25519PrivateKey.from_private_bytes(seed))


def _as_jid(jid: JID | str) -> JID:
    return jid if isinstance(jid, JID) else JID.parse(jid)


def generate_identity(jid: JID | str) -> DeviceIdentity:
    """A new device identity with a fresh key from the OS random source."""
    return DeviceIdentity(_as_jid(jid), Ed25519PrivateKey.generate())


# -- key file -----------------------------------------------------------------


def encode_key_file(identity: DeviceIdentity) -> bytes:
    """The key file's bytes: explanatory header, blank line, PKCS#8 PEM."""
    pem = identity.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    header = (
        f"{JID_HEADER}: {identity.jid.full}\n"
        f"dtx-fingerprint: {identity.fingerprint}\n"
        "\n"
    )
    return header.encode("utf-8") + pem


def decode_key_file(data: bytes, *, source: str = "key file") -> DeviceIdentity:
    """Parse a key file's bytes. Raises :class:`KeyFileError` saying what is
    wrong; ``source`` (usually the path) names the file in messages."""
    if len(data) > MAX_KEY_FILE_BYTES:
        raise KeyFileError(f"{source}: larger than {MAX_KEY_FILE_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise KeyFileError(f"{source}: not UTF-8 text") from exc
    head, begin, _ = text.partition(_PEM_BEGIN)
    if not begin:
        raise KeyFileError(f"{source}: no PEM block (-----BEGIN PRIVATE KEY-----)")
    jid_text: str | None = None
    for line in head.splitlines():
        name, colon, value = line.partition(":")
        if colon and name.strip().lower() == JID_HEADER:
            if jid_text is not None:
                raise KeyFileError(f"{source}: more than one {JID_HEADER} line")
            jid_text = value.strip()
    if jid_text is None:
        raise KeyFileError(
            f"{source}: no '{JID_HEADER}: JID' line before the PEM block; "
            f"add one naming this device, e.g. '{JID_HEADER}: tv@example.org/living-room'"
        )
    try:
        jid = JID.parse(jid_text)
    except JIDError as exc:
        raise KeyFileError(f"{source}: bad {JID_HEADER}: {exc}") from exc
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError as exc:  # encrypted, and no password given
        raise KeyFileError(f"{source}: the key is encrypted; dtx needs an unencrypted key") from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise KeyFileError(f"{source}: not a PEM private key ({exc})") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{source}: the key is {type(key).__name__}, not Ed25519")
    return DeviceIdentity(jid, key)


def _mode_problem(mode: int) -> str | None:
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        return f"mode {stat.S_IMODE(mode):04o} lets group or others read or write it"
    return None


def load_identity(path: str | os.PathLike[str]) -> DeviceIdentity:
    """Read a key file. Refuses one that group or others may access (any of
    the 077 bits), with the ``chmod`` command that fixes it."""
    name = os.fspath(path)
    try:
        fd = os.open(name, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError as exc:
        raise KeyFileError(f"{name}: no such key file") from exc
    except OSError as exc:
        raise KeyFileError(f"{name}: cannot open key file: {exc.strerror}") from exc
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise KeyFileError(f"{name}: not a regular file")
    with os.fdopen(fd, "rb") as f:
        if os.name == "posix":
            problem = _mode_problem(st.st_mode)
            if problem is not None:
                raise KeyFileError(
                    f"{name}: refusing to use a private key file whose {problem}; "
                    f"run: chmod 600 {name}"
                )
        try:
            data = f.read(MAX_KEY_FILE_BYTES + 1)
        except OSError as exc:
            raise KeyFileError(f"{name}: cannot read key file: {exc.strerror}") from exc
    return decode_key_file(data, source=name)


def save_identity(
    identity: DeviceIdentity,
    path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
) -> None:
    """Write a key file with mode 0600 from the moment it exists.

    Without ``overwrite`` an existing file is never touched. With it, the
    new file is written beside the old one and renamed over it, so the path
    always holds a whole key.
    """
    name = os.fspath(path)
    data = encode_key_file(identity)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    if not overwrite:
        try:
            fd = os.open(name, flags, 0o600)
        except FileExistsError as exc:
            raise KeyFileError(f"{name}: exists; refusing to overwrite a key file") from exc
        except OSError as exc:
            raise KeyFileError(f"{name}: cannot create key file: {exc.strerror}") from exc
        try:
            _write_all(fd, data, name)
        except BaseException:
            _unlink_quietly(name)
            raise
        logger.info("wrote key file %s for %s (%s)", name, identity.jid, identity.fingerprint)
        return
    directory = os.path.dirname(os.path.abspath(name))
    tmp = os.path.join(directory, f".{os.path.basename(name)}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, flags, 0o600)
    except OSError as exc:
        raise KeyFileError(f"{tmp}: cannot create key file: {exc.strerror}") from exc
    try:
        _write_all(fd, data, tmp)
        os.replace(tmp, name)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    logger.info("wrote key file %s for %s (%s)", name, identity.jid, identity.fingerprint)


def _unlink_quietly(name: str) -> None:
    try:
        os.unlink(name)
    except OSError:
        pass


def _write_all(fd: int, data: bytes, name: str) -> None:
    try:
        with os.fdopen(fd, "wb") as f:
            if os.name == "posix":
                os.fchmod(f.fileno(), 0o600)  # whatever the umask did
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise KeyFileError(f"{name}: cannot write key file: {exc.strerror}") from exc
