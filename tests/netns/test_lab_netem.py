"""The forwarder's scheduling core and the NAT rule renderer, without root:
pure functions of ``now``, a seeded generator and a profile."""

from __future__ import annotations

import random

import pytest

from dtx.errors import LabError
from dtx.lab import PROFILES, LinkSpec, NatProfile
from dtx.lab.nat import Mapping, render_ruleset
from dtx.lab.netem import Direction, direction_rng


def deadlines(spec: LinkSpec, count: int, step: float = 0.001) -> list[list[float]]:
    d = Direction(spec, direction_rng(spec.seed, 0, 0))
    return [d.schedule(i * step) for i in range(count)]


def test_plain_delay_is_exact() -> None:
    out = deadlines(LinkSpec(delay=0.02), 10)
    assert out == [[pytest.approx(i * 0.001 + 0.02)] for i in range(10)]


def test_jitter_varies_delay_but_keeps_order() -> None:
    flat = [d[0] for d in deadlines(LinkSpec(delay=0.02, jitter=0.01, seed=3), 500)]
    assert flat == sorted(flat)
    waits = [t - i * 0.001 for i, t in enumerate(flat)]
    assert min(waits) >= 0.0099 and max(waits) <= 0.0301
    assert len({round(w, 6) for w in waits}) > 100


def test_loss_is_seeded_and_roughly_right() -> None:
    a = deadlines(LinkSpec(loss=0.3, seed=1), 1000)
    assert a == deadlines(LinkSpec(loss=0.3, seed=1), 1000)
    assert a != deadlines(LinkSpec(loss=0.3, seed=2), 1000)
    lost = sum(1 for d in a if not d)
    assert 240 <= lost <= 360


def test_duplicate_and_reorder() -> None:
    assert all(len(d) == 2 for d in deadlines(LinkSpec(duplicate=1.0), 20))
    out = deadlines(LinkSpec(delay=0.05, reorder=0.5, seed=4), 200)
    immediate = sum(1 for i, d in enumerate(out) if d[0] == pytest.approx(i * 0.001))
    assert 60 <= immediate <= 140


def test_bad_specs_raise_lab_error() -> None:
    for kw in ({"delay": -1.0}, {"loss": 1.5}, {"duplicate": -0.1}):
        with pytest.raises(LabError):
            LinkSpec(**kw)  # type: ignore[arg-type]
    with pytest.raises(LabError):
        NatProfile.named("cone-ish")
    with pytest.raises(LabError):
        NatProfile(mapping=Mapping.ADDRESS_DEPENDENT)   # port preservation needs EIM


def test_rulesets_name_the_mechanism_of_each_profile() -> None:
    def rules(name: str) -> str:
        return render_ruleset(PROFILES[name], wan="wan", lan="br0",
                              public_ip="198.51.100.10", lan_cidr="10.1.0.0/24")
    assert "dnat ip addr . port to udp dport map @mappings" in rules("full-cone")
    assert "@contacted dnat" in rules("restricted-cone")
    assert "@contacted dnat" not in rules("port-restricted-cone")
    assert "masquerade fully-random" in rules("symmetric")
    assert "masquerade" not in rules("none")
    for name in PROFILES:
        assert "reject" not in rules(name)        # unsolicited inbound: silent drop


def test_direction_rng_differs_per_direction() -> None:
    assert direction_rng(0, 1, 0).random() != direction_rng(0, 1, 1).random()
    assert isinstance(direction_rng(0, 0, 0), random.Random)
