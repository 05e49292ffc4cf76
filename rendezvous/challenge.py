"""Stateless, address-bound challenges, and the table of used ones.

A challenge is ``t ‖ n ‖ HMAC-SHA256(secret, "dtx-challenge" ‖ t ‖ n ‖
address)[:12]`` (docs/protocol.md 7.4): the server clock in whole seconds,
a random u32, and a MAC over both and the source address. Checking one
needs the secret and nothing else, so the server stores nothing for a
source before it has answered a challenge from the address it claims.

A challenge is recorded as used only once a registration with it has
succeeded (:class:`UsedChallenges`), so refused attempts cannot fill that
table; entries are kept just past the validity, after which the MAC check
refuses the challenge anyway.

Sans-IO: time and randomness are arguments.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import random
from collections import OrderedDict

from dtx.wire.control import CHALLENGE_BYTES
from dtx.wire.stun import Address

__all__ = ["Challenges", "UsedChallenges"]

_LABEL = b"dtx-challenge"
_MAC_BYTES = 12


def _address_bytes(addr: Address) -> bytes:
    """``family ‖ address ‖ port`` for the challenge MAC."""
    try:
        ip = ipaddress.ip_address(addr[0].split("%", 1)[0])
    except ValueError:
        return b"\x00" + addr[0].encode("utf-8", "replace") + addr[1].to_bytes(2, "big")
    return bytes([ip.version]) + ip.packed + (addr[1] & 0xFFFF).to_bytes(2, "big")


class Challenges:
    """Makes and checks challenges for normalised source addresses."""

    def __init__(self, secret: bytes, *, validity: float) -> None:
        self._secret = secret
        self._validity = validity

    def _mac(self, head: bytes, src: Address) -> bytes:
        data = _LABEL + head + _address_bytes(src)
        return hmac.new(self._secret, data, hashlib.sha256).digest()[:_MAC_BYTES]

    def make(self, src: Address, now: float, rng: random.Random) -> bytes:
        """The challenge for ``src`` at ``now``: the time in seconds and a
        random nonce (so two challenges are never equal, even within one
        second), authenticated with the source address."""
        t = int(now) & 0xFFFFFFFF
        head = t.to_bytes(4, "big") + rng.getrandbits(32).to_bytes(4, "big")
        return head + self._mac(head, src)

    def valid(self, challenge: bytes, src: Address, now: float) -> bool:
        """Whether ``challenge`` was made for ``src`` and is still fresh."""
        if len(challenge) != CHALLENGE_BYTES:
            return False
        t = int.from_bytes(challenge[:4], "big")
        age = (int(now) - t) & 0xFFFFFFFF
        if age > self._validity:
            return False
        return hmac.compare_digest(challenge[8:], self._mac(challenge[:8], src))


class UsedChallenges:
    """Challenges that registered, each until it expires; oldest first."""

    def __init__(self) -> None:
        self._expiry: OrderedDict[bytes, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._expiry)

    def __contains__(self, challenge: object) -> bool:
        return challenge in self._expiry

    def add(self, challenge: bytes, expiry: float) -> None:
        """Record ``challenge`` as used until ``expiry`` (which must not be
        earlier than any recorded before: the table is kept in that order)."""
        self._expiry[challenge] = expiry

    def next_expiry(self) -> float | None:
        """When the oldest entry expires, or None when the table is empty."""
        return next(iter(self._expiry.values()), None)

    def purge(self, now: float) -> None:
        """Forget every challenge whose time has come."""
        while self._expiry:
            challenge, expiry = next(iter(self._expiry.items()))
            if expiry > now:
                break
            del self._expiry[challenge]
