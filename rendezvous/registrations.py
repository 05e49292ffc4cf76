"""The registration table: who is registered, from where, with which key.

One registration per full JID and one per source address (one socket, one
device); the table indexes them by id, account (bare JID; a full JID is
found among its account's devices) and address, and keeps those indexes
consistent. It decides nothing: the
limits (table size, devices per account) and what ends with a
registration (its introductions) are the core's business.

Sans-IO: time and randomness are arguments.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dtx.jid import JID
from dtx.wire.control import Candidate, NatMapping
from dtx.wire.stun import Address
from rendezvous.config import RendezvousConfig
from rendezvous.ids import unique
from rendezvous.limits import TokenBucket

if TYPE_CHECKING:
    from rendezvous.introductions import Introduction

__all__ = ["NO_CHANNELS", "Registration", "RegistrationTable", "account_of"]

ID_BYTES = 8

NO_CHANNELS: dict[int, Introduction] = {}
"""The channel table of every registration that has none (most of them):
one shared empty dict, never written to; the introduction table gives a
registration a dict of its own with its first channel
(:mod:`rendezvous.introductions`)."""


def account_of(jid: JID) -> str:
    """The bare JID of ``jid`` as a string (``jid.bare.full``, without
    making the bare JID)."""
    return jid.domain if jid.local is None else f"{jid.local}@{jid.domain}"


def _no_channels() -> dict[int, Introduction]:
    return NO_CHANNELS


@dataclass(eq=False, slots=True)
class Registration:
    """A registered device, and the budgets it spends. Slotted and
    compact: the server holds up to ``max_registrations`` of them
    (tests/unit/test_rendezvous_memory.py). The device's JID is kept as its
    account (the bare JID as a string, the one object the table's account
    index is keyed by, shared by the account's devices) and its resource;
    :attr:`full_jid` and :attr:`jid` are made from them when asked."""

    id: bytes
    account: str
    resource: str
    key: bytes
    addr: Address
    candidates: tuple[Candidate, ...]
    refreshed: float
    expires: float
    byte_bucket: TokenBucket
    frame_bucket: TokenBucket
    control_bucket: TokenBucket
    nat_mapping: NatMapping = NatMapping.UNKNOWN
    """What the mapping check last found (docs/protocol.md 7.7)."""
    channels: dict[int, Introduction] = field(default_factory=_no_channels)
    """This device's relay channels, one per introduction it is in (owned
    by the introduction table; :data:`NO_CHANNELS` while there are none)."""

    @property
    def full_jid(self) -> str:
        return f"{self.account}/{self.resource}"

    @property
    def jid(self) -> JID:
        """The device's full JID (parsed anew: for the rare caller that
        needs the object; logs and messages use :attr:`full_jid`)."""
        return JID.parse(self.full_jid)

    def relay_allowed(self, size: int, now: float, cfg: RendezvousConfig) -> bool:
        """Charge one relayed frame of ``size`` payload bytes to the
        device's relay buckets; False when either is spent."""
        return self.frame_bucket.take(1, now, cfg.relay_frames_per_s,
                                      cfg.relay_burst_frames) and self.byte_bucket.take(
            size, now, cfg.relay_bytes_per_s, cfg.relay_burst_bytes)


class RegistrationTable:
    """Registrations by id, account (and resource) and address."""

    def __init__(self) -> None:
        self._by_id: dict[bytes, Registration] = {}
        self._by_account: dict[str, Registration | list[Registration]] = {}
        """An account's registrations, by bare JID: the registration itself
        while it is the account's only one (most accounts hold one device),
        a list from the second on. A full JID is found among its account's
        (at most ``max_devices_per_account``) devices."""
        self._by_addr: dict[Address, Registration] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def __contains__(self, reg_id: object) -> bool:
        return reg_id in self._by_id

    def get(self, reg_id: bytes) -> Registration | None:
        return self._by_id.get(reg_id)

    def at(self, addr: Address) -> Registration | None:
        """The registration whose address is ``addr``."""
        return self._by_addr.get(addr)

    def for_jid(self, jid: JID) -> Registration | None:
        """The registration of the full JID ``jid``."""
        for reg in self.account(jid):
            if reg.resource == jid.resource:
                return reg
        return None

    def account_size(self, bare: JID) -> int:
        """How many devices of the account ``bare`` are registered."""
        held = self._by_account.get(account_of(bare))
        if held is None:
            return 0
        return len(held) if isinstance(held, list) else 1

    def account(self, jid: JID) -> Iterator[Registration]:
        """The registered devices of ``jid``'s account."""
        held = self._by_account.get(account_of(jid))
        if isinstance(held, Registration):
            yield held
        elif held is not None:
            yield from held

    def new_id(self, rng: random.Random) -> bytes:
        return unique(lambda: rng.randbytes(ID_BYTES), self._by_id)

    def add(self, reg: Registration) -> None:
        """Index ``reg``; the caller has removed whatever held its JID or
        address before. The registration's account string and address IP
        become the objects already held for them (one per account, one per
        IP behind which several devices sit)."""
        reg.addr = (sys.intern(reg.addr[0]), reg.addr[1])
        self._by_id[reg.id] = reg
        held = self._by_account.get(reg.account)
        if held is None:
            self._by_account[reg.account] = reg
        elif isinstance(held, Registration):
            reg.account = held.account
            self._by_account[reg.account] = [held, reg]
        else:
            reg.account = held[0].account
            held.append(reg)
        self._by_addr[reg.addr] = reg

    def discard(self, reg: Registration) -> bool:
        """Forget ``reg``; False if it was not in the table."""
        if self._by_id.pop(reg.id, None) is None:
            return False
        held = self._by_account.get(reg.account)
        if held is reg:
            del self._by_account[reg.account]
        elif isinstance(held, list) and reg in held:
            held.remove(reg)
            if len(held) == 1:
                self._by_account[reg.account] = held[0]
        if self._by_addr.get(reg.addr) is reg:
            del self._by_addr[reg.addr]
        return True

    def find_target(self, target: JID, asker: Registration, now: float) -> Registration | None:
        """The device an INTRODUCE for ``target`` names: that full JID, or
        the account's most recently refreshed live device other than the
        asker."""
        if not target.is_bare:
            peer = self.for_jid(target)
            if peer is not None and peer.expires <= now:
                return None
            return peer
        best: Registration | None = None
        for reg in self.account(target):
            if reg is asker or reg.expires <= now:
                continue
            if best is None or reg.refreshed > best.refreshed:
                best = reg
        return best
