"""Trust: which Ed25519 device keys may speak for a JID (vCards, pins)."""

from dtx.trust.store import KeySource, PinStore, StaticKeys, VCardDirectory, Verifier
from dtx.trust.vcard import (
    KEY_TYPE,
    VCARD4_NS,
    VCARD_TEMP_NS,
    VCardFormat,
    add_key,
    extract_keys,
    new_vcard,
    remove_key,
    vcard_format,
)

__all__ = [
    "KEY_TYPE",
    "VCARD4_NS",
    "VCARD_TEMP_NS",
    "KeySource",
    "PinStore",
    "StaticKeys",
    "VCardDirectory",
    "VCardFormat",
    "Verifier",
    "add_key",
    "extract_keys",
    "new_vcard",
    "remove_key",
    "vcard_format",
]
