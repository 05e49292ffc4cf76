"""Trust: which Ed25519 device keys may speak for a JID (vCards, pins)."""

from dtx.trust.pins import PinLimitError, PinStore, PinStoreConfig, PinStoreStatistics
from dtx.trust.store import KeySource, StaticKeys, VCardDirectory, Verifier
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
    "PinLimitError",
    "PinStore",
    "PinStoreConfig",
    "PinStoreStatistics",
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
