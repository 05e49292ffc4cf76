"""Which real path carries a remote device's packets: the sans-IO path manager.

QUIC talks to one stable, made-up *mapped address* per remote device
(iroh's idea); the :class:`PathManager` of that device decides, packet by
packet, where the datagram really goes:

* ``lan`` — one of the peer's host addresses answered our probes;
* ``direct`` — a server-reflexive or peer-reflexive address answered
  (a punched hole through the NATs);
* ``relay`` — the rendezvous server's relay, always available once
  introduced.

A session starts on the relay at once; while no direct path is known, QUIC
packets are also *sprayed* to every candidate for a short window (so a
handshake that can go direct does, without waiting for probes). Both sides
probe all candidates at the same moment (right after the introduction),
retry a few well-timed times, then back off. The first pong on a direct
path moves the session there; a direct path that stops answering is dropped
back to the relay within a few seconds, and probed again with back-off so the
session returns when it heals.

Path choice is :func:`choose_path`, a pure function with a stickiness margin
so sessions do not flap between two similar paths.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from ..wire.address import Address



HISTORY = 256
"""Path changes remembered per peer (oldest forgotten first)."""


class PathKind(StrEnum):
    """A path's kind; its value is the name used in JSON and logs."""

    LAN = "lan"
    DIRECT = "direct"
    RELAY = "relay"

    @property
    def rank(self) -> int:
        return _RANK[self]


_RANK = {PathKind.LAN: 0, PathKind.DIRECT: 1, PathKind.RELAY: 2}


@dataclass(frozen=True, kw_only=True)
class PathConfig:
    """Tunables of the path manager. Times in seconds."""

    punch_schedule: tuple[float, ...] = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 15.0, 30.0, 60.0)
    """When (seconds after the introduction) to send probes to every
    candidate not yet confirmed: one well-timed attempt at once, a few quick
    retries, then a few upgrade attempts with back-off, then none."""
    upgrade_interval: float | None = 60.0
    """After the punch schedule, while no direct path answered, punch
    again this often (a relayed session moves to direct when a path opens
    later: a NAT rebooted into a friendlier mode, a firewall rule lifted);
    None: stop at the end of the schedule."""
    upgrade_for: float = 3600.0
    """... for this long after the introduction (a new one starts again)."""
    spray_window: float = 2.0
    """While no direct path is confirmed, QUIC packets also go to every
    candidate during this long after the introduction."""
    keepalive_interval: float = 25.0
    """A path we sent nothing on for this long gets a probe (NAT bindings)."""
    liveness_timeout: float = 1.0
    """Sent on the active direct path, heard nothing back for this long:
    probe it."""
    probe_timeout: float = 0.5
    dead_after_failures: int = 3
    """Unanswered probes (one per probe_timeout) before a path is dead."""
    heal_schedule: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0)
    """Probing a dead path again, so the session returns when it heals."""
    margin_ratio: float = 0.2
    margin_abs: float = 0.002
    max_candidates: int = 8
    max_pings_in_flight: int = 64


@dataclass
class PathState:
    addr: Address
    kind: PathKind
    rtt: float | None = None
    confirmed_at: float | None = None
    last_heard: float | None = None
    last_sent: float | None = None
    failures: int = 0
    dead: bool = False
    heal_step: int = 0
    next_heal: float | None = None

    @property
    def usable(self) -> bool:
        return self.confirmed_at is not None and not self.dead


@dataclass(frozen=True)
class PathView:
    """What :func:`choose_path` looks at."""

    key: Address | None  # None: the relay
    kind: PathKind
    rtt: float | None


def choose_path(
    candidates: Sequence[PathView],
    current: PathView | None,
    *,
    margin_ratio: float = 0.2,
    margin_abs: float = 0.002,
) -> PathView | None:
    """The path to use: best kind (lan, then direct, then relay), then
    lowest RTT; the current path is kept unless another of the same kind is
    better by more than the margin, or one of a better kind is usable.
    ``candidates`` are usable paths only."""
    if not candidates:
        return None

    def sort_key(p: PathView) -> tuple[int, float]:
        return (p.kind.rank, p.rtt if p.rtt is not None else float("inf"))

    best = min(candidates, key=sort_key)
    if current is None:
        return best
    same = [p for p in candidates if p.key == current.key and p.kind == current.kind]
    if not same:
        return best
    cur = same[0]
    if best.kind.rank < cur.kind.rank:
        return best
    if best.kind.rank > cur.kind.rank:
        return cur
    if cur.rtt is None or best.rtt is None:
        return cur if best.rtt is None else best
    if best.rtt < cur.rtt - max(cur.rtt * margin_ratio, margin_abs):
        return best
    return cur


# -- events -------------------------------------------------------------------


@dataclass(frozen=True)
class PathChanged:
    """The path carrying this device's packets changed."""

    kind: PathKind
    addr: Address | None
    previous: PathKind | None
    at: float
    rtt: float | None = None


@dataclass(frozen=True)
class ProbeToSend:
    ping: bool
    txid: bytes
    dest: Address
    observed: Address | None = None


@dataclass
class _Ping:
    dest: Address
    sent_at: float


# -- the manager --------------------------------------------------------------


RelayWrap = Callable[[bytes], tuple[bytes, Address]]
"""Wraps a QUIC packet in a relay frame; returns (frame, server address)."""


@dataclass
class PathManager:
    """Paths to one remote device.

    The driver feeds probes and observed traffic in and asks
    :meth:`route` where each QUIC datagram goes; :meth:`probes_to_send`
    returns probe requests (the driver encodes and signs them).
    """

    config: PathConfig
    rng: random.Random
    now: float
    relay: RelayWrap | None = None
    paths: dict[Address, PathState] = field(default_factory=dict)
    current: PathView | None = None
    introduced_at: float = 0.0
    history: deque[tuple[float, PathKind]] = field(
        default_factory=lambda: deque(maxlen=HISTORY))
    """(time, kind) of the latest path changes, at most :data:`HISTORY`."""
    _events: deque[PathChanged] = field(default_factory=deque)
    _pings: dict[bytes, _Ping] = field(default_factory=dict)
    _probes: list[ProbeToSend] = field(default_factory=list)
    _punch_step: int = 0
    _next_punch: float | None = None

    def __post_init__(self) -> None:
        self.introduced_at = self.now
        if self.relay is not None:
            self._set_current(PathView(None, PathKind.RELAY, None), self.now)

    # -- set-up -------------------------------------------------------------------

    def add_candidate(self, addr: Address, kind: PathKind) -> None:
        if addr in self.paths:
            return
        if len(self.paths) >= self.config.max_candidates:
            return
        self.paths[addr] = PathState(addr, kind)

    def restart_punching(self, now: float) -> None:
        """New candidates or new NAT mappings: punch again from the start."""
        self.introduced_at = now
        self._punch_step = 0
        self._next_punch = now
        for p in self.paths.values():
            p.failures = 0

    def reset(self, relay: RelayWrap | None, now: float, *, keep: Iterable[Address] = ()) -> None:
        """A new introduction: the peer's addresses may have changed (a
        restart, a new NAT mapping). Forget every path except those in
        ``keep`` (the new candidates: a path to one of them is still good),
        falling back to the relay if the current one goes; the new
        candidates are added and punched afresh by the caller."""
        kept = set(keep)
        for addr in [a for a in self.paths if a not in kept]:
            del self.paths[addr]
        self._pings = {t: p for t, p in self._pings.items() if p.dest in kept}
        self._probes.clear()
        self.relay = relay
        self._reselect(now)  # the current path may be gone

    def set_relay(self, relay: RelayWrap | None, now: float) -> None:
        self.relay = relay
        if relay is not None and self.current is None:
            self._set_current(PathView(None, PathKind.RELAY, None), now)

    # -- reading state ------------------------------------------------------------

    @property
    def kind(self) -> PathKind | None:
        return self.current.kind if self.current is not None else None

    def next_event(self) -> PathChanged | None:
        return self._events.popleft() if self._events else None

    def knows(self, addr: Address) -> bool:
        return addr in self.paths

    # -- traffic ------------------------------------------------------------------

    def route(self, datagram: bytes, now: float) -> list[tuple[bytes, Address]]:
        """Where a QUIC datagram for this device goes (possibly several
        places while spraying)."""
        cur = self.current
        out: list[tuple[bytes, Address]] = []
        if cur is not None and cur.key is not None:
            state = self.paths.get(cur.key)
            if state is not None and state.usable:
                state.last_sent = now
                out.append((datagram, cur.key))
                return out
        if self.relay is not None:
            out.append(self.relay(datagram))
        if now - self.introduced_at <= self.config.spray_window or self.relay is None:
            for state in self.paths.values():
                if not state.dead:
                    state.last_sent = now
                    out.append((datagram, state.addr))
        return out

    def on_heard(self, addr: Address, now: float) -> None:
        """A datagram (QUIC) arrived from ``addr`` directly."""
        state = self.paths.get(addr)
        if state is not None:
            state.last_heard = now

    # -- probes -------------------------------------------------------------------

    def on_ping(self, txid: bytes, src: Address, now: float) -> None:
        """A verified ping from ``src``: answer it; a new source is a
        peer-reflexive candidate, probed at once (triggered check)."""
        self._probes.append(ProbeToSend(False, txid, src, observed=src))
        state = self.paths.get(src)
        if state is None and len(self.paths) < self.config.max_candidates:
            kind = PathKind.DIRECT
            state = self.paths[src] = PathState(src, kind)
            self._send_ping(src, now)
        if state is not None:
            state.last_heard = now
            if state.confirmed_at is None or state.dead:
                self._send_ping(src, now)

    def on_pong(self, txid: bytes, src: Address, now: float) -> Address | None:
        """A verified pong. Returns the address the peer saw us at."""
        ping = self._pings.pop(txid, None)
        if ping is None or ping.dest != src:
            return None
        state = self.paths.get(src)
        if state is None:
            return None
        rtt = max(now - ping.sent_at, 1e-6)
        state.rtt = rtt if state.rtt is None else 0.75 * state.rtt + 0.25 * rtt
        state.last_heard = now
        state.failures = 0
        if state.confirmed_at is None or state.dead:
            state.confirmed_at = now
            state.dead = False
            state.heal_step = 0
            state.next_heal = None
        self._reselect(now)
        return None

    def ping_now(self, dest: Address, now: float) -> None:
        """Ping a known, not yet usable path at once (a birthday search
        just found it: the punch schedule may not ping again for seconds)."""
        state = self.paths.get(dest)
        if state is not None and not state.usable \
                and not any(p.dest == dest for p in self._pings.values()):
            self._send_ping(dest, now)

    def probes_to_send(self) -> list[ProbeToSend]:
        out, self._probes = self._probes, []
        return out

    def _send_ping(self, dest: Address, now: float) -> None:
        if len(self._pings) >= self.config.max_pings_in_flight:
            oldest = min(self._pings, key=lambda k: self._pings[k].sent_at)
            del self._pings[oldest]
        txid = self.rng.getrandbits(64).to_bytes(8, "big")
        self._pings[txid] = _Ping(dest, now)
        self._probes.append(ProbeToSend(True, txid, dest))
        state = self.paths.get(dest)
        if state is not None:
            state.last_sent = now

    # -- timers -------------------------------------------------------------------

    def get_timer(self) -> float | None:
        times: list[float] = []
        if self._next_punch is not None:
            times.append(self._next_punch)
        if self._pings:
            times.append(min(p.sent_at for p in self._pings.values()) + self.config.probe_timeout)
        for p in self.paths.values():
            if p.next_heal is not None:
                times.append(p.next_heal)
            if p.usable:
                times.append(self._keepalive_due(p))
                due = self._liveness_due(p)
                if due is not None:
                    times.append(due)
        return min(times) if times else None

    def _keepalive_due(self, p: PathState) -> float:
        last = max(p.last_sent or 0.0, p.confirmed_at or 0.0)
        return last + self.config.keepalive_interval

    def _liveness_due(self, p: PathState) -> float | None:
        if self.current is None or self.current.key != p.addr:
            return None
        if p.last_sent is None:
            return None
        heard = p.last_heard or 0.0
        if heard >= p.last_sent:
            return None
        if any(ping.dest == p.addr for ping in self._pings.values()):
            return None
        return max(heard, p.last_sent - self.config.liveness_timeout) + self.config.liveness_timeout

    def handle_timer(self, now: float) -> None:
        cfg = self.config
        # punching
        if self._next_punch is not None and now >= self._next_punch:
            for state in self.paths.values():
                if not state.usable:
                    self._send_ping(state.addr, now)
            self._punch_step += 1
            schedule = cfg.punch_schedule
            if self._has_direct():
                self._next_punch = None
            elif self._punch_step < len(schedule):
                self._next_punch = self.introduced_at + schedule[self._punch_step]
            elif cfg.upgrade_interval is not None \
                    and now + cfg.upgrade_interval <= self.introduced_at + cfg.upgrade_for:
                self._next_punch = now + cfg.upgrade_interval
            else:
                self._next_punch = None
        # timed-out pings
        for txid, ping in list(self._pings.items()):
            if now >= ping.sent_at + cfg.probe_timeout:
                del self._pings[txid]
                lost = self.paths.get(ping.dest)
                if lost is not None and lost.usable:
                    lost.failures += 1
                    if lost.failures >= cfg.dead_after_failures:
                        lost.dead = True
                        lost.heal_step = 0
                        lost.next_heal = now + cfg.heal_schedule[0]
                        self._reselect(now)
                    else:
                        self._send_ping(lost.addr, now)
        # liveness, keepalive, healing
        for state in self.paths.values():
            if state.usable:
                due = self._liveness_due(state)
                if due is not None and now >= due:
                    self._send_ping(state.addr, now)
                elif now >= self._keepalive_due(state):
                    self._send_ping(state.addr, now)
            if state.next_heal is not None and now >= state.next_heal:
                self._send_ping(state.addr, now)
                state.heal_step += 1
                if state.heal_step < len(cfg.heal_schedule):
                    state.next_heal = now + cfg.heal_schedule[state.heal_step]
                else:
                    state.next_heal = now + cfg.heal_schedule[-1]

    def _has_direct(self) -> bool:
        return any(p.usable for p in self.paths.values())

    @property
    def has_direct(self) -> bool:
        """Whether a direct (or LAN) path is confirmed and alive."""
        return self._has_direct()

    # -- selection ----------------------------------------------------------------

    def _views(self) -> list[PathView]:
        views = [PathView(p.addr, p.kind, p.rtt) for p in self.paths.values() if p.usable]
        if self.relay is not None:
            views.append(PathView(None, PathKind.RELAY, None))
        return views

    def _reselect(self, now: float) -> None:
        cfg = self.config
        choice = choose_path(
            self._views(), self.current, margin_ratio=cfg.margin_ratio, margin_abs=cfg.margin_abs
        )
        if choice is None:
            if self.current is not None:
                self.current = None
            return
        if self.current is None or (choice.key, choice.kind) != (self.current.key, self.current.kind):
            self._set_current(choice, now)
        else:
            self.current = choice

    def _set_current(self, view: PathView, now: float) -> None:
        previous = self.current.kind if self.current is not None else None
        self.current = view
        self.history.append((now, view.kind))
        self._events.append(PathChanged(view.kind, view.key, previous, now, view.rtt))

