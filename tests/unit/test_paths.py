"""Path selection (a pure function, by table) and the path manager's
punching, fall-back and healing, driven by a fake clock."""

from __future__ import annotations

import random

import pytest

from dtx.proto.paths import (
    PathChanged,
    PathConfig,
    PathKind,
    PathManager,
    PathView,
    choose_path,
)

LAN = PathKind.LAN
DIRECT = PathKind.DIRECT
RELAY = PathKind.RELAY
A = ("10.0.0.2", 5000)
B = ("198.51.100.7", 6000)
C = ("198.51.100.8", 6001)


def v(key, kind, rtt):  # type: ignore[no-untyped-def]
    return PathView(key, kind, rtt)


# (candidates, current, expected choice)
CHOICES = [
    ([], None, None),
    ([v(None, RELAY, None)], None, v(None, RELAY, None)),
    # a usable direct path beats the relay, whatever the RTT
    ([v(None, RELAY, 0.01), v(B, DIRECT, 0.08)], v(None, RELAY, 0.01), v(B, DIRECT, 0.08)),
    # LAN beats direct
    ([v(B, DIRECT, 0.02), v(A, LAN, 0.03)], v(B, DIRECT, 0.02), v(A, LAN, 0.03)),
    # same kind: stay unless the other is better by more than the margin
    ([v(B, DIRECT, 0.080), v(C, DIRECT, 0.075)], v(B, DIRECT, 0.080), v(B, DIRECT, 0.080)),
    ([v(B, DIRECT, 0.080), v(C, DIRECT, 0.050)], v(B, DIRECT, 0.080), v(C, DIRECT, 0.050)),
    # tiny RTTs: the absolute margin keeps the current path
    ([v(B, DIRECT, 0.0010), v(C, DIRECT, 0.0002)], v(B, DIRECT, 0.0010), v(B, DIRECT, 0.0010)),
    # the current path vanished: best of the rest
    ([v(C, DIRECT, 0.05), v(None, RELAY, None)], v(B, DIRECT, 0.04), v(C, DIRECT, 0.05)),
    # never move from a better kind to a worse one
    ([v(A, LAN, 0.5), v(B, DIRECT, 0.01)], v(A, LAN, 0.5), v(A, LAN, 0.5)),
    # no current: lowest RTT of the best kind
    ([v(B, DIRECT, 0.09), v(C, DIRECT, 0.03)], None, v(C, DIRECT, 0.03)),
]


@pytest.mark.parametrize("candidates, current, expected", CHOICES)
def test_choose_path(candidates, current, expected) -> None:  # type: ignore[no-untyped-def]
    assert choose_path(candidates, current) == expected


class Clock:
    def __init__(self) -> None:
        self.now = 100.0


def relay(payload: bytes) -> tuple[bytes, tuple[str, int]]:
    return b"R" + payload, ("203.0.113.10", 3478)


def manager(clock: Clock, **cfg: object) -> PathManager:
    pm = PathManager(PathConfig(**cfg), random.Random(1), clock.now, relay=relay)  # type: ignore[arg-type]
    pm.add_candidate(B, DIRECT)
    pm.restart_punching(clock.now)
    return pm


def advance(pm: PathManager, clock: Clock, until: float) -> None:
    """Jump from timer to timer up to ``until`` (bounded)."""
    for _ in range(10_000):
        t = pm.get_timer()
        if t is None or t > until:
            break
        clock.now = max(clock.now, t)
        pm.handle_timer(clock.now)
    clock.now = until


def events(pm: PathManager) -> list[PathChanged]:
    out = []
    while (e := pm.next_event()) is not None:
        out.append(e)
    return out


def answer_pings(pm: PathManager, clock: Clock, rtt: float = 0.04) -> int:
    """Play the peer: answer every ping sent so far."""
    pings = [p for p in pm.probes_to_send() if p.ping]
    clock.now += rtt
    for p in pings:
        pm.on_pong(p.txid, p.dest, clock.now)
    return len(pings)


def test_starts_on_the_relay_and_sprays_during_the_window() -> None:
    clock = Clock()
    pm = manager(clock)
    assert [e.kind for e in events(pm)] == [RELAY]
    out = pm.route(b"quic", clock.now)
    assert (b"Rquic", ("203.0.113.10", 3478)) in out
    assert (b"quic", B) in out  # sprayed to the candidate too
    clock.now += 5.0  # past the spray window: relay only
    assert pm.route(b"quic", clock.now) == [(b"Rquic", ("203.0.113.10", 3478))]


def test_first_pong_moves_the_session_to_the_direct_path() -> None:
    clock = Clock()
    pm = manager(clock)
    events(pm)
    advance(pm, clock, clock.now)  # the first punch goes out now
    assert answer_pings(pm, clock) >= 1
    (change,) = events(pm)
    assert change.kind is DIRECT and change.addr == B and change.previous is RELAY
    assert pm.route(b"quic", clock.now) == [(b"quic", B)]


def test_unanswered_punching_slows_down_then_stops() -> None:
    """The schedule, then one punch per ``upgrade_interval`` while on the
    relay (a path that opens later is found), until ``upgrade_for``."""
    clock = Clock()
    schedule = (0.0, 0.1, 0.5)
    start = clock.now
    pm = manager(clock, punch_schedule=schedule, upgrade_interval=10.0, upgrade_for=35.0)
    advance(pm, clock, start + 100)
    pings = [p for p in pm.probes_to_send() if p.ping]
    assert len(pings) == len(schedule) + 3  # at 10.5, 20.5 and 30.5 s
    assert pm.kind is RELAY
    assert pm.get_timer() is None  # no probing forever


def test_punching_stops_at_the_schedule_without_upgrades() -> None:
    clock = Clock()
    schedule = (0.0, 0.1, 0.5)
    pm = manager(clock, punch_schedule=schedule, upgrade_interval=None)
    advance(pm, clock, clock.now + 100)
    assert len([p for p in pm.probes_to_send() if p.ping]) == len(schedule)
    assert pm.get_timer() is None


def test_dead_direct_path_falls_back_to_the_relay_then_heals() -> None:
    clock = Clock()
    pm = manager(clock)
    advance(pm, clock, clock.now)
    answer_pings(pm, clock)
    events(pm)
    start = clock.now
    # traffic goes out on the direct path and nothing comes back
    for _ in range(40):
        pm.route(b"quic", clock.now)
        pm.probes_to_send()
        advance(pm, clock, clock.now + 0.1)
    changes = events(pm)
    assert changes and changes[-1].kind is RELAY
    assert changes[-1].at - start < 4.0, "falls back within a few seconds"
    # the path heals: the next healing probe is answered
    advance(pm, clock, clock.now + 2.0)
    assert answer_pings(pm, clock) >= 1
    assert events(pm)[-1].kind is DIRECT


def test_ping_from_a_new_address_is_answered_and_probed() -> None:
    clock = Clock()
    pm = manager(clock)
    prflx = ("198.51.100.7", 40404)
    pm.on_ping(b"12345678", prflx, clock.now)
    probes = pm.probes_to_send()
    pong = [p for p in probes if not p.ping]
    assert pong and pong[0].dest == prflx and pong[0].observed == prflx
    assert any(p.ping and p.dest == prflx for p in probes), "triggered check"
    assert pm.knows(prflx)


def test_pong_from_the_wrong_address_is_ignored() -> None:
    clock = Clock()
    pm = manager(clock)
    advance(pm, clock, clock.now)
    (ping,) = [p for p in pm.probes_to_send() if p.ping]
    pm.on_pong(ping.txid, C, clock.now + 0.01)
    assert pm.kind is RELAY


def test_keepalive_probe_when_idle() -> None:
    clock = Clock()
    pm = manager(clock, keepalive_interval=25.0)
    advance(pm, clock, clock.now)
    answer_pings(pm, clock)
    pm.probes_to_send()
    advance(pm, clock, clock.now + 24.0)
    assert not [p for p in pm.probes_to_send() if p.ping]
    advance(pm, clock, clock.now + 2.0)
    assert [p for p in pm.probes_to_send() if p.ping and p.dest == B]


def test_reset_forgets_paths_the_new_introduction_does_not_list() -> None:
    clock = Clock()
    pm = manager(clock)
    advance(pm, clock, clock.now)
    answer_pings(pm, clock)
    assert pm.kind is DIRECT
    events(pm)
    # The peer restarted: a new introduction lists only its new address.
    pm.reset(relay, clock.now, keep=[C])
    pm.add_candidate(C, DIRECT)
    assert not pm.knows(B)
    (change,) = events(pm)
    assert change.kind is RELAY and change.previous is DIRECT
    assert pm.route(b"quic", clock.now + 10)[0][1] == ("203.0.113.10", 3478)


def test_reset_keeps_a_path_the_new_introduction_still_lists() -> None:
    clock = Clock()
    pm = manager(clock)
    advance(pm, clock, clock.now)
    answer_pings(pm, clock)
    events(pm)
    pm.reset(relay, clock.now, keep=[B])  # e.g. after a rendezvous restart
    assert pm.kind is DIRECT and events(pm) == []
