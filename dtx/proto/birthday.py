"""Birthday probing: a direct path between an endpoint-dependent NAT and an
endpoint-independent one, sans-IO.

Between a "symmetric" (endpoint-dependent mapping, random ports) NAT and a
port-restricted cone, ordinary punching cannot work: the hard side's NAT
gives its packets toward the easy side a port nobody has seen, and the easy
side's filter admits only addresses it has sent to. Birthday probing makes
the two meet by numbers (Tailscale's "How NAT traversal works" describes
it): the **hard** side opens many extra sockets, each sending one ping to the
easy side's public address, so its NAT holds that many random ports toward
it; the **easy** side pings random ports of the hard side's public IP. When
an easy ping lands on one of the hard side's ports, or a hard ping arrives
from a port the easy side already pinged, the two have a path: that socket
pair carries QUIC from then on. With ``sockets`` ports open and ``n``
probes over a range of ``R`` ports, P(found) = 1 − (1 − sockets/R)^n:
256 sockets, 1,100 probes over 64,512 ports: 98.7 %.

:class:`BirthdaySearch` is one search, for one introduced peer. Its
outputs are pings to send, each named by the local socket it must leave
from (0: the device's one socket; 1, 2, ...: the hard side's extra ones),
and the set of extra sockets it holds open; the traversal signs the pings
with the introduction's probe key, like every probe. Time is the ``now``
argument, randomness the ``rng``; every count, rate and time is a field of
:class:`BirthdayConfig`. Bounded: at most ``sockets`` extra sockets, at
most ``probes`` pings from the easy side at ``rate`` per second, only toward
the public address the introduction named, and the search gives up
``probes / rate + grace`` seconds after it began.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from enum import Enum

from ..wire.address import Address

__all__ = ["BirthdayConfig", "BirthdayRole", "BirthdaySearch", "SearchState"]


@dataclass(frozen=True, kw_only=True)
class BirthdayConfig:
    """Tunables of birthday probing. Times in seconds."""

    enabled: bool = True
    start_after: float = 1.0
    """Seconds after the introduction, with no direct path yet, before the
    search begins (ordinary punching gets its first round first)."""
    sockets: int = 256
    """Extra sockets the hard side opens (each one NAT mapping)."""
    probes: int = 1100
    """Pings the easy side sends at most, each to another port."""
    rate: float = 100.0
    """The easy side's pings per second."""
    refresh_interval: float = 10.0
    """The hard side pings again from every socket this often while it
    searches (keeps its NAT mappings, and the easy side's, alive)."""
    grace: float = 3.0
    """The search gives up this long after the easy side's last ping."""
    port_range: tuple[int, int] = (1024, 65535)
    """The ports the easy side guesses from (inclusive)."""
    max_searches: int = 2
    """Searches this device runs at once (over all its peers); another
    introduction that would need one waits for ordinary punching only."""

    def __post_init__(self) -> None:
        lo, hi = self.port_range
        if not 1 <= lo <= hi <= 65535:
            raise ValueError(f"port_range {self.port_range} is not within 1-65535")
        if self.sockets < 1 or self.probes < 1 or self.rate <= 0:
            raise ValueError("sockets, probes and rate must be positive")
        if self.probes > hi - lo + 1:
            raise ValueError("more probes than ports in port_range")

    @property
    def duration(self) -> float:
        """How long a search runs before it gives up."""
        return self.probes / self.rate + self.grace


class BirthdayRole(Enum):
    HARD = "hard"
    """This device's NAT is endpoint-dependent: it opens the sockets."""
    EASY = "easy"
    """This device's NAT is endpoint-independent: it guesses ports."""


class SearchState(Enum):
    WAITING = "waiting"
    SEARCHING = "searching"
    FOUND = "found"
    """A probe came through: ``winner`` names the socket (hard side)."""
    FAILED = "failed"
    """Gave up: no probe came through within the search's time."""
    STOPPED = "stopped"
    """Ended from outside: a direct path appeared another way, or the
    link was introduced again."""


class BirthdaySearch:
    """One birthday search toward one peer.

    ``target`` is the peer's public address as the introduction named it
    (its server-reflexive candidate): the hard side pings exactly that
    address from every socket; the easy side pings that IP only, at ports
    it draws from ``config.port_range``.
    """

    def __init__(self, role: BirthdayRole, target: Address, config: BirthdayConfig,
                 rng: random.Random, now: float, *, first_socket: int = 1) -> None:
        self.role = role
        self.first_socket = first_socket
        """The hard side's sockets are ``first_socket`` ... ``first_socket +
        config.sockets - 1`` (ids unique within the device)."""
        self.target = target
        self.config = config
        self._rng = rng
        self.state = SearchState.WAITING
        self.created_at = now
        self.start_at = now + config.start_after
        self.started_at: float | None = None
        self.ended_at: float | None = None
        self.winner: int | None = None
        """The hard side's socket whose mapping the easy side found."""
        self.probes_sent = 0
        self._ports: list[int] = []
        self._next_refresh: float | None = None
        self._due: list[tuple[int, Address]] = []

    # -- reading state ------------------------------------------------------------

    @property
    def active(self) -> bool:
        return self.state in (SearchState.WAITING, SearchState.SEARCHING)

    @property
    def sockets(self) -> range:
        """The extra sockets this search holds open: all of them while the
        hard side searches, none otherwise (the winner is the traversal's
        to keep)."""
        if self.role is BirthdayRole.HARD and self.state is SearchState.SEARCHING:
            return range(self.first_socket, self.first_socket + self.config.sockets)
        return range(0)

    def owns(self, socket: int) -> bool:
        return socket in self.sockets

    # -- inputs ---------------------------------------------------------------------

    def found(self, socket: int, now: float) -> None:
        """A verified probe from the peer arrived on ``socket``."""
        if not self.active:
            return
        self.state = SearchState.FOUND
        self.winner = socket if socket != 0 else None
        self.ended_at = now
        self._due.clear()

    def stop(self, now: float) -> None:
        """End the search (a direct path exists, or the link is reset)."""
        if self.active:
            self.state = SearchState.STOPPED
            self.ended_at = now
            self._due.clear()

    def get_timer(self) -> float | None:
        if self.state is SearchState.WAITING:
            return self.start_at
        if self.state is not SearchState.SEARCHING:
            return None
        assert self.started_at is not None
        end = self.started_at + self.config.duration
        if self.role is BirthdayRole.EASY and self.probes_sent < self.config.probes:
            return min(end, self.started_at + self.probes_sent / self.config.rate)
        if self._next_refresh is not None:
            return min(end, self._next_refresh)
        return end

    def handle_timer(self, now: float) -> None:
        cfg = self.config
        if self.state is SearchState.WAITING and now >= self.start_at:
            self.state = SearchState.SEARCHING
            self.started_at = now
            if self.role is BirthdayRole.EASY:
                lo, hi = cfg.port_range
                self._ports = self._rng.sample(range(lo, hi + 1), cfg.probes)
            else:
                self._ping_every_socket(now)
        if self.state is not SearchState.SEARCHING:
            return
        assert self.started_at is not None
        if now >= self.started_at + cfg.duration:
            self.state = SearchState.FAILED
            self.ended_at = now
            self._due.clear()
            return
        if self.role is BirthdayRole.EASY:
            # (the epsilon: at the very time the timer named, the probe
            # due then counts, whatever the float rounding)
            due = min(cfg.probes, math.floor((now - self.started_at) * cfg.rate + 1e-6) + 1)
            ip = self.target[0]
            while self.probes_sent < due:
                self._due.append((0, (ip, self._ports[self.probes_sent])))
                self.probes_sent += 1
        elif self._next_refresh is not None and now >= self._next_refresh:
            self._ping_every_socket(now)

    def _ping_every_socket(self, now: float) -> None:
        for socket in range(self.first_socket, self.first_socket + self.config.sockets):
            self._due.append((socket, self.target))
        self.probes_sent += self.config.sockets
        self._next_refresh = now + self.config.refresh_interval

    # -- outputs --------------------------------------------------------------------

    def pings_to_send(self) -> list[tuple[int, Address]]:
        """(socket, destination) of each ping due now."""
        out, self._due = self._due, []
        return out
