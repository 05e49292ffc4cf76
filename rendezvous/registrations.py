"""The registration table: who is registered, from where, with which key.

One registration per full JID and one per source address (one socket, one
device); the table indexes them by id, full JID, account (bare JID) and
address, and keeps those indexes consistent. It decides nothing: the
limits (table size, devices per account) and what ends with a
registration (its introductions) are the core's business.

Sans-IO: time and randomness are arguments.
"""

from __future__ import annotations

import random
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

__all__ = ["Registration", "RegistrationTable"]

ID_BYTES = 8


@dataclass(eq=False, slots=True)
class Registration:
    """A registered device, and the budgets it spends. Slotted: the server
    holds up to ``max_registrations`` of them."""

    id: bytes
    jid: JID
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
    channels: dict[int, Introduction] = field(default_factory=dict)
    """This device's relay channels, one per introduction it is in (owned
    by the introduction table)."""

    def relay_allowed(self, size: int, now: float, cfg: RendezvousConfig) -> bool:
        """Charge one relayed frame of ``size`` payload bytes to the
        device's relay buckets; False when either is spent."""
        return self.frame_bucket.take(1, now, cfg.relay_frames_per_s,
                                      cfg.relay_burst_frames) and self.byte_bucket.take(
            size, now, cfg.relay_bytes_per_s, cfg.relay_burst_bytes)


class RegistrationTable:
    """Registrations by id, full JID, account and address."""

    def __init__(self) -> None:
        self._by_id: dict[bytes, Registration] = {}
        self._by_jid: dict[JID, Registration] = {}
        self._by_account: dict[JID, list[bytes]] = {}
        """An account's registration ids (a list: most accounts hold one or
        two devices, and a list of one is a quarter of a set's size)."""
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
        return self._by_jid.get(jid)

    def account_size(self, bare: JID) -> int:
        """How many devices of the account ``bare`` are registered."""
        return len(self._by_account.get(bare, ()))

    def account(self, bare: JID) -> Iterator[Registration]:
        for reg_id in self._by_account.get(bare, ()):
            yield self._by_id[reg_id]

    def new_id(self, rng: random.Random) -> bytes:
        return unique(lambda: rng.randbytes(ID_BYTES), self._by_id)

    def add(self, reg: Registration) -> None:
        """Index ``reg``; the caller has removed whatever held its JID or
        address before."""
        self._by_id[reg.id] = reg
        self._by_jid[reg.jid] = reg
        self._by_account.setdefault(reg.jid.bare, []).append(reg.id)
        self._by_addr[reg.addr] = reg

    def discard(self, reg: Registration) -> bool:
        """Forget ``reg``; False if it was not in the table."""
        if self._by_id.pop(reg.id, None) is None:
            return False
        if self._by_jid.get(reg.jid) is reg:
            del self._by_jid[reg.jid]
        account = self._by_account.get(reg.jid.bare)
        if account is not None:
            if reg.id in account:
                account.remove(reg.id)
            if not account:
                del self._by_account[reg.jid.bare]
        if self._by_addr.get(reg.addr) is reg:
            del self._by_addr[reg.addr]
        return True

    def find_target(self, target: JID, asker: Registration, now: float) -> Registration | None:
        """The device an INTRODUCE for ``target`` names: that full JID, or
        the account's most recently refreshed live device other than the
        asker."""
        if not target.is_bare:
            peer = self._by_jid.get(target)
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
