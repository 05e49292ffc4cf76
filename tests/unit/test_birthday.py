"""The birthday search alone (:mod:`dtx.proto.birthday`): its schedule,
its bounds and its ends. The search against NATs is in
``tests/unit/test_traversal_memory.py`` (memory NATs) and
``tests/netns/test_birthday_lab.py`` (kernel NATs)."""

from __future__ import annotations

import random

import pytest

from dtx.proto.birthday import BirthdayConfig, BirthdayRole, BirthdaySearch, SearchState

TARGET = ("198.51.100.7", 40123)
T0 = 100.0


def run(search: BirthdaySearch, until: float) -> list[tuple[float, int, tuple[str, int]]]:
    """Drive the search's timer to ``until``: (time, socket, destination) of each ping."""
    sent: list[tuple[float, int, tuple[str, int]]] = []
    steps = 0
    while (when := search.get_timer()) is not None and when <= until:
        steps += 1
        assert steps < 100_000, "the timer does not advance"
        search.handle_timer(when)
        sent.extend((when, sock, dest) for sock, dest in search.pings_to_send())
    return sent


def test_the_easy_side_pings_distinct_ports_of_the_target_ip_at_the_rate_then_gives_up() -> None:
    cfg = BirthdayConfig(probes=300, rate=100.0, port_range=(2000, 2999))
    search = BirthdaySearch(BirthdayRole.EASY, TARGET, cfg, random.Random(1), T0)
    assert run(search, T0 + cfg.start_after - 0.001) == []
    sent = run(search, T0 + 60)
    assert len(sent) == 300 == search.probes_sent
    assert {sock for _, sock, _ in sent} == {0}, "from the device's own socket"
    assert {dest[0] for _, _, dest in sent} == {TARGET[0]}, "only toward the named IP"
    ports = [dest[1] for _, _, dest in sent]
    assert len(set(ports)) == 300 and all(2000 <= p <= 2999 for p in ports)
    start = T0 + cfg.start_after
    assert sent[0][0] == start and sent[-1][0] == pytest.approx(start + 299 / 100.0)
    in_first_second = [t for t, _, _ in sent if t < start + 1.0]
    assert len(in_first_second) == 100
    assert search.state is SearchState.FAILED
    assert search.ended_at == pytest.approx(start + cfg.duration)
    assert search.get_timer() is None and search.sockets == range(0)


def test_the_hard_side_pings_the_target_from_every_socket_and_refreshes() -> None:
    cfg = BirthdayConfig(sockets=8, probes=500, rate=100.0, refresh_interval=2.0, grace=1.0)
    search = BirthdaySearch(BirthdayRole.HARD, TARGET, cfg, random.Random(1), T0,
                            first_socket=17)
    assert search.sockets == range(0), "no socket before the search begins"
    sent = run(search, T0 + cfg.start_after)
    assert sorted(sock for _, sock, _ in sent) == list(range(17, 25))
    assert {dest for _, _, dest in sent} == {TARGET}
    assert search.sockets == range(17, 25)
    assert search.owns(17) and search.owns(24) and not search.owns(25) and not search.owns(0)
    sent = run(search, T0 + cfg.start_after + 2.0)
    assert len(sent) == 8, "every socket again after the refresh interval"
    run(search, T0 + 100)
    assert search.state is SearchState.FAILED and search.sockets == range(0)


def test_found_ends_the_search_and_names_the_winner() -> None:
    cfg = BirthdayConfig(sockets=4)
    search = BirthdaySearch(BirthdayRole.HARD, TARGET, cfg, random.Random(1), T0)
    run(search, T0 + cfg.start_after)
    search.found(3, T0 + 2)
    assert search.state is SearchState.FOUND and search.winner == 3
    assert search.sockets == range(0) and search.get_timer() is None
    search.stop(T0 + 3)
    assert search.state is SearchState.FOUND, "a found search stays found"


def test_stop_before_the_start_sends_nothing() -> None:
    search = BirthdaySearch(BirthdayRole.EASY, TARGET, BirthdayConfig(), random.Random(1), T0)
    search.stop(T0 + 0.5)
    assert search.state is SearchState.STOPPED
    assert run(search, T0 + 60) == []


@pytest.mark.parametrize("kwargs", [
    {"port_range": (0, 100)}, {"port_range": (5000, 4000)}, {"sockets": 0},
    {"rate": 0.0}, {"probes": 0}, {"probes": 11, "port_range": (1000, 1009)},
])
def test_bad_configurations_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        BirthdayConfig(**kwargs)  # type: ignore[arg-type]


def test_the_defaults_make_the_documented_odds() -> None:
    cfg = BirthdayConfig()
    lo, hi = cfg.port_range
    found = 1 - (1 - cfg.sockets / (hi - lo + 1)) ** cfg.probes
    assert found > 0.98
    assert cfg.duration < 15.0
