"""Summaries of raw samples: percentiles per run, then median over runs.

Each run is summarised on its own (p50, p90, p99, max of its round trips;
the value of a throughput batch); the figure reported is the median of the
runs' summaries, with their minimum and maximum, so one noisy run shows as
a wide range instead of moving the headline number.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .scenarios.common import Metric, Result

RTT_STATS: tuple[str, ...] = ("p50", "p90", "p99", "max")
VALUE_STATS: tuple[str, ...] = ("median",)
"""Connect time, throughput and CPU are reported by their median per run."""


def percentile(samples: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) by the nearest-rank method.

    Nearest rank always returns an observed sample, so p99 of 300 round
    trips is a round trip that happened, not an interpolation.
    """
    if not samples:
        raise ValueError("percentile of no samples")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile {q} outside 0..100")
    ordered = sorted(samples)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[rank - 1]


def summarise_samples(metric: Metric, samples: Sequence[float]) -> dict[str, float]:
    """One run's summary statistics of ``samples``."""
    if metric is Metric.RTT:
        return {
            "p50": percentile(samples, 50),
            "p90": percentile(samples, 90),
            "p99": percentile(samples, 99),
            "max": max(samples),
        }
    if metric is Metric.TAKEOVER:
        return {"median": statistics.median(samples), "p90": percentile(samples, 90)}
    return {"median": statistics.median(samples)}


@dataclass(frozen=True, kw_only=True)
class Range:
    """The median of per-run values, with their minimum and maximum."""

    median: float
    min: float
    max: float

    @classmethod
    def of(cls, values: Iterable[float]) -> Range:
        vals = list(values)
        return cls(median=statistics.median(vals), min=min(vals), max=max(vals))


@dataclass(frozen=True, kw_only=True)
class Summary:
    """Every run of one metric of one system, summarised."""

    scenario: str
    system: str
    metric: Metric
    unit: str
    runs: int
    samples: int
    """Samples over all runs."""
    lost: int
    stats: dict[str, Range]
    note: str = ""


def summarise(results: Iterable[Result]) -> list[Summary]:
    """Group results by (scenario, system, metric) and summarise each group.

    Groups keep the order in which they first appear; runs without samples
    (everything lost) are skipped rather than counted as zero.
    """
    groups: dict[tuple[str, str, Metric], list[Result]] = {}
    for r in results:
        groups.setdefault((r.scenario, r.system, r.metric), []).append(r)
    out: list[Summary] = []
    for (scenario, system, metric), rs in groups.items():
        per_run = [summarise_samples(metric, r.samples) for r in rs if r.samples]
        if not per_run:
            continue
        keys = per_run[0].keys()
        out.append(Summary(
            scenario=scenario,
            system=system,
            metric=metric,
            unit=rs[0].unit,
            runs=len(per_run),
            samples=sum(len(r.samples) for r in rs),
            lost=sum(r.lost for r in rs),
            stats={k: Range.of(s[k] for s in per_run) for k in keys},
            note=rs[0].note,
        ))
    return out


def find(summaries: Iterable[Summary], system: str, metric: Metric) -> Summary | None:
    """The summary of ``system``'s ``metric``, if it was measured."""
    for s in summaries:
        if s.system == system and s.metric is metric:
            return s
    return None


RTT_RATIO_TARGET = 1.25
"""dtx stanza RTT at most this many times the bare aioquic stream RTT."""
THROUGHPUT_TARGET = 60_000.0
"""One-way dtx stanzas per second, one ``send()`` per stanza."""


@dataclass(frozen=True, kw_only=True)
class Target:
    """A figure set against its target; shown, never asserted."""

    name: str
    value: float
    target: float
    higher_is_better: bool
    met: bool


def targets(summaries: Sequence[Summary]) -> list[Target]:
    """The project's targets, for whichever of their inputs were measured."""
    out: list[Target] = []
    dtx_rtt = find(summaries, "dtx", Metric.RTT)
    quic_rtt = find(summaries, "aioquic", Metric.RTT)
    if dtx_rtt is not None and quic_rtt is not None:
        for stat in ("p50", "p99"):
            ratio = dtx_rtt.stats[stat].median / quic_rtt.stats[stat].median
            out.append(Target(
                name=f"dtx stanza RTT {stat} / bare aioquic stream RTT {stat}",
                value=ratio, target=RTT_RATIO_TARGET, higher_is_better=False,
                met=ratio <= RTT_RATIO_TARGET,
            ))
    for system, label in (("dtx", "dtx one-way stanzas/s (both ends in one process)"),
                          ("dtx-2proc", "dtx one-way stanzas/s (receiver in its own process)")):
        rate = find(summaries, system, Metric.THROUGHPUT)
        if rate is not None:
            value = rate.stats["median"].median
            out.append(Target(
                name=label, value=value, target=THROUGHPUT_TARGET,
                higher_is_better=True, met=value >= THROUGHPUT_TARGET,
            ))
    return out


# -- NAT-lab targets ------------------------------------------------------------------

DIRECT_RTT_OVER_FLOOR_MS = 1.0
"""dtx direct-path RTT p50 at most this many ms above raw UDP on the same path."""
LAN_VS_XMPP_RTT_RATIO = 100.0
"""Server-mediated XMPP RTT p50 at least this many times dtx's LAN RTT p50."""
FIRST_STANZA_VS_WEBRTC = 3.0
"""aiortc's connect time at least this many times dtx's, same pair."""
THROUGHPUT_VS_WEBRTC = 10.0
"""dtx one-way stanzas/s at least this many times aiortc's, same path."""
CONNECT_PUNCHABLE_MS = 300.0
CONNECT_RELAY_ONLY_MS = 600.0
CONNECT_COLD_MS = 600.0
TAKEOVER_MS = 1000.0
SEND_COLD_MS = 450.0
"""``dtx send`` from process start to the first stanza delivered, punchable
pair: Python and dtx's imports, one registration round trip to the server
(160 ms), the introduction (160 ms) and half a handshake."""
CONNECT_XMPP_PUNCHABLE_MS = 400.0
"""dtx signalled through the account's XMPP server, first stanza on a
punchable pair; the floor is about 360 ms in the standard WAN (the
signalling round trip through the server, 240 ms; one handshake round
trip, 80 ms; one way, 40 ms)."""
CONNECT_XMPP_RELAY_ONLY_MS = 650.0
"""The same on a relay-only pair (handshake and first stanza through coturn)."""
PLUGIN_RTT_OVER_FLOOR_MS = 2.0
"""The slixmpp plugin's direct-path (and LAN-path) RTT p50 at most this many
ms above raw UDP on the same path: dtx's own 1 ms, and 1 ms for slixmpp
building, serialising and parsing the stanza at both ends."""
PLUGIN_FIRST_VS_XMPP = 1.10
"""The plugin's first message (through the server, while the session is
made) at most this many times plain slixmpp's first message."""

THROUGHPUT_VS_XMPP = {"direct": 1.0, "relay": 0.5}
"""dtx one-way stanzas/s at least this share of two slixmpp clients' through
Prosody (XMPP over TCP) on the same lab, per dtx path."""

BIRTHDAY_SUCCESS_PERCENT = 95.0
"""Symmetric × port-restricted-cone trials that end direct within 15 s."""

TIME_TARGETS: tuple[tuple[str, Metric, str, float], ...] = (
    ("dtx-send-cold", Metric.CONNECT,
     "dtx send from process start to first stanza, punchable pair", SEND_COLD_MS),
    ("dtx-direct", Metric.CONNECT, "dtx first stanza, registered device, punchable pair",
     CONNECT_PUNCHABLE_MS),
    ("dtx-relay", Metric.CONNECT, "dtx first stanza, registered device, relay-only pair",
     CONNECT_RELAY_ONLY_MS),
    ("dtx-direct-cold", Metric.CONNECT, "cold dtx device to first stanza, punchable pair",
     CONNECT_COLD_MS),
    ("dtx-direct", Metric.TAKEOVER, "direct path takes over after", TAKEOVER_MS),
    ("dtx-xmpp-direct", Metric.CONNECT,
     "dtx over XMPP first stanza, logged-in device, punchable pair", CONNECT_XMPP_PUNCHABLE_MS),
    ("dtx-xmpp-relay", Metric.CONNECT,
     "dtx over XMPP first stanza, logged-in device, relay-only pair", CONNECT_XMPP_RELAY_ONLY_MS),
    ("dtx-xmpp-direct", Metric.TAKEOVER, "dtx over XMPP, direct path takes over after",
     TAKEOVER_MS),
)
"""Targets on a median time, per scenario: (system, metric, what, ms at most)."""


def _find_in(summaries: Sequence[Summary], scenario: str, system: str,
             metric: Metric) -> Summary | None:
    for s in summaries:
        if s.scenario == scenario and s.system == system and s.metric is metric:
            return s
    return None


def lab_targets(summaries: Sequence[Summary]) -> list[Target]:
    """The NAT-lab targets (issues 4, 5, 6; dtx over XMPP), for whatever was measured."""
    out: list[Target] = []

    def value(scenario: str, system: str, metric: Metric, stat: str = "median") -> float | None:
        s = _find_in(summaries, scenario, system, metric)
        return None if s is None or stat not in s.stats else s.stats[stat].median

    def add(name: str, v: float | None, target: float, higher: bool) -> None:
        if v is not None:
            out.append(Target(name=name, value=v, target=target, higher_is_better=higher,
                              met=v >= target if higher else v <= target))

    scenarios = list(dict.fromkeys(s.scenario for s in summaries))
    for scn in scenarios:
        for path in ("direct", "relay", "lan"):
            floor = value(scn, f"udp-{path}", Metric.RTT, "p50")
            # dtx alone, and the slixmpp plugin's xmpp+dtx-<path>.
            for who, over in (("dtx", DIRECT_RTT_OVER_FLOOR_MS),
                              ("xmpp+dtx", PLUGIN_RTT_OVER_FLOOR_MS)):
                rtt = value(scn, f"{who}-{path}", Metric.RTT, "p50")
                if path != "relay" and rtt is not None and floor is not None:
                    add(f"{scn}: {who} {path}-path RTT p50 minus raw UDP p50 (ms)",
                        (rtt - floor) * 1e3, over, False)
            first = value(scn, f"xmpp+dtx-{path}", Metric.FIRST_MESSAGE)
            plain = value(scn, "xmpp-lan" if path == "lan" else "xmpp", Metric.FIRST_MESSAGE)
            if first is not None and plain is not None:
                add(f"{scn}: xmpp+dtx first message / xmpp's first message, {path} pair (×)",
                    first / plain, PLUGIN_FIRST_VS_XMPP, False)
            if path == "lan":
                continue
            dtx_conn = value(scn, f"dtx-{path}", Metric.CONNECT)
            rtc_conn = value(scn, f"webrtc-{path}", Metric.CONNECT)
            if dtx_conn is not None and rtc_conn is not None:
                add(f"{scn}: aiortc open / dtx first stanza, {path} pair (×)",
                    rtc_conn / dtx_conn, FIRST_STANZA_VS_WEBRTC, True)
            dtx_rate = value(scn, f"dtx-{path}", Metric.THROUGHPUT)
            rtc_rate = value(scn, f"webrtc-{path}", Metric.THROUGHPUT)
            if dtx_rate is not None and rtc_rate is not None:
                add(f"{scn}: dtx / aiortc one-way messages/s, {path} path (×)",
                    dtx_rate / rtc_rate, THROUGHPUT_VS_WEBRTC, True)
            xmpp_rate = value(scn, "xmpp", Metric.THROUGHPUT)
            if dtx_rate is not None and xmpp_rate:
                add(f"{scn}: dtx {path} / XMPP over TCP through Prosody, one-way stanzas/s (×)",
                    dtx_rate / xmpp_rate, THROUGHPUT_VS_XMPP[path], True)
            dtx_p99 = value(scn, f"dtx-{path}", Metric.RTT, "p99")
            xmpp_p99 = value(scn, "xmpp", Metric.RTT, "p99")
            if path == "relay" and dtx_p99 is not None and xmpp_p99:
                add(f"{scn}: dtx relayed stanza RTT p99 / XMPP's through Prosody (×)",
                    dtx_p99 / xmpp_p99, 1.0, False)
        for system, metric, label, target in TIME_TARGETS:
            v = value(scn, system, metric)
            add(f"{scn}: {label} (ms)", None if v is None else v * 1e3, target, False)
        birthday = _find_in(summaries, scn, "dtx-birthday", Metric.TAKEOVER)
        if birthday is not None and birthday.samples + birthday.lost:
            add(f"{scn}: birthday-probing trials direct within 15 s (%)",
                100.0 * birthday.samples / (birthday.samples + birthday.lost),
                BIRTHDAY_SUCCESS_PERCENT, True)
        lan = value(scn, "dtx-lan", Metric.RTT, "p50")
        xmpp = value(scn, "xmpp-lan", Metric.RTT, "p50")
        if lan is not None and xmpp is not None:
            add(f"{scn}: XMPP-via-server RTT p50 / dtx LAN RTT p50 (×)", xmpp / lan,
                LAN_VS_XMPP_RTT_RATIO, True)
    return out



# -- rendezvous_load targets ------------------------------------------------------------

STUN_VS_COTURN = 0.25
"""The rendezvous's STUN Binding answers/s at least this times coturn's, one core each."""
RELAY_VS_COTURN = 0.4
"""The rendezvous's relayed messages/s at least this times coturn's end to end."""
INTRODUCTION_P99_MS = 50.0
"""Introduction latency p99 with 10,000 devices registered."""


def rendezvous_targets(summaries: Sequence[Summary]) -> list[Target]:
    """The ``rendezvous_load`` targets, for whatever was measured."""
    out: list[Target] = []

    def median(system: str, metric: Metric, stat: str = "median") -> float | None:
        s = _find_in(summaries, "rendezvous_load", system, metric)
        return None if s is None else s.stats[stat].median

    for figure, target in (("STUN", STUN_VS_COTURN), ("relay", RELAY_VS_COTURN)):
        dtx = median(f"rendezvous {figure}", Metric.THROUGHPUT)
        turn = median(f"coturn {figure}", Metric.THROUGHPUT)
        if dtx is not None and turn:
            ratio = dtx / turn
            out.append(Target(name=f"rendezvous {figure} messages/s / coturn's (one core each)",
                              value=ratio, target=target, higher_is_better=True,
                              met=ratio >= target))
    p99 = median("rendezvous introduction", Metric.RTT, "p99")
    if p99 is not None:
        out.append(Target(name="rendezvous introduction p99 (ms), 10,000 devices registered",
                          value=p99 * 1000, target=INTRODUCTION_P99_MS,
                          higher_is_better=False, met=p99 * 1000 < INTRODUCTION_P99_MS))
    return out
