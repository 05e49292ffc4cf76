"""Stateless address validation: QUIC Retry tokens (RFC 9000 section 8.1).

Under a flood of Initials (spoofed sources cost the sender nothing), the
endpoint answers an Initial that carries no token with a Retry instead of
keeping a half-open connection: the client sends its Initial again with the
token, which proves that it receives at the address it claims. The token
holds what the new connection needs (the client's original Destination
Connection ID, the Retry's Source Connection ID, when it was issued) and a
MAC over it and the client's address, so nothing is kept between the two:

    token = 0x01 | issued (u64, ms) | len u8 | odcid | len u8 | retry scid
            | HMAC-SHA256(key, address | the bytes before)[:16]

``address`` is the IP's packed bytes and the port (u16). A token is good
for ``lifetime`` seconds, from the address it was issued to, for an Initial
whose Destination Connection ID is the Retry's Source Connection ID.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import struct

from ..wire.address import Address

__all__ = ["RetryTokens", "TOKEN_VERSION"]

TOKEN_VERSION = 1
_MAC_BYTES = 16
_MAX_CID = 20
"""RFC 9000 section 17.2: a connection ID has at most 20 bytes."""


def _address_bytes(addr: Address) -> bytes:
    return ipaddress.ip_address(addr[0]).packed + struct.pack("!H", addr[1])


class RetryTokens:
    """Issues and checks Retry tokens with one secret ``key`` (at least 16
    bytes; random per endpoint, so a restart invalidates old tokens)."""

    def __init__(self, key: bytes, *, lifetime: float = 10.0) -> None:
        if len(key) < 16:
            raise ValueError("a Retry token key needs at least 16 bytes")
        if lifetime <= 0:
            raise ValueError("a Retry token lifetime must be positive")
        self._key = key
        self.lifetime = lifetime

    def _mac(self, addr: Address, body: bytes) -> bytes:
        return hmac.new(self._key, _address_bytes(addr) + body, hashlib.sha256).digest()[
            :_MAC_BYTES]

    def issue(self, addr: Address, original_dcid: bytes, retry_scid: bytes,
              now: float) -> bytes:
        """The token for a Retry to ``addr`` (``now`` in seconds)."""
        if len(original_dcid) > _MAX_CID or len(retry_scid) > _MAX_CID:
            raise ValueError("a connection ID has at most 20 bytes")
        body = (struct.pack("!BQ", TOKEN_VERSION, max(0, int(now * 1000)))
                + bytes([len(original_dcid)]) + original_dcid
                + bytes([len(retry_scid)]) + retry_scid)
        return body + self._mac(addr, body)

    def validate(self, addr: Address, token: bytes, dcid: bytes, now: float) -> bytes | None:
        """The original Destination Connection ID when ``token`` is good
        for an Initial from ``addr`` to ``dcid`` now; None otherwise
        (forged, for another address or connection ID, expired, malformed)."""
        if len(token) < 9 + 2 + _MAC_BYTES:
            return None
        body, mac = token[:-_MAC_BYTES], token[-_MAC_BYTES:]
        try:
            expected = self._mac(addr, body)
        except ValueError:  # not an IP address
            return None
        if not hmac.compare_digest(mac, expected):
            return None
        version, issued = struct.unpack_from("!BQ", body)
        at = 9
        odcid_len = body[at]
        odcid = body[at + 1:at + 1 + odcid_len]
        at += 1 + odcid_len
        if version != TOKEN_VERSION or at >= len(body):
            return None
        scid_len = body[at]
        scid = body[at + 1:at + 1 + scid_len]
        if at + 1 + scid_len != len(body) or len(odcid) != odcid_len:
            return None
        age = now - issued / 1000
        if not 0 <= age <= self.lifetime or scid != dcid:
            return None
        return odcid
