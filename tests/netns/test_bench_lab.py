"""The NAT-lab benchmark scenarios run end to end and write well-formed
results with every system present.

A tiny ``--quick`` run of ``wan`` and ``lan`` (a few round trips, one
connection per system). No figure is asserted against a number: these
tests check shape and presence, never speed.

The slixmpp plugin's systems (``xmpp+dtx-…``) are left out
(``--skip xmpp+dtx``): each pair is two more client processes logging in,
starting dtx and making a session, about 5 s a pair and 17 s for the
three here, where this test may grow by a few seconds at most.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.scenarios import lan, wan
from bench.scenarios.lab_common import alternatives_missing
from dtx.lab import lab_missing

pytestmark = pytest.mark.netns

ROOT = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SAMPLES = 3
SKIPPED = "xmpp+dtx"


def _systems(module: Any) -> set[str]:
    """The scenario's systems that this run measures."""
    return {s for s in module.SYSTEMS if not s.startswith(SKIPPED)}


@pytest.fixture(scope="module")
def lab_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str, Path]:
    reason = lab_missing() or alternatives_missing()
    if reason:
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("bench-lab")
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--scenario", "wan", "--scenario", "lan",
         "--lab-samples", str(SAMPLES), "--lab-stanzas", "100", "--lab-connects", "1",
         "--skip", SKIPPED, "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    doc: dict[str, Any] = json.loads((out / "results.json").read_text(encoding="utf-8"))
    return doc, proc.stderr, out


def _seen(doc: dict[str, Any]) -> set[tuple[str, str, str]]:
    return {(r["scenario"], r["system"], r["metric"]) for r in doc["results"]}


def test_every_system_is_measured(lab_run: tuple[dict[str, Any], str, Path]) -> None:
    doc = lab_run[0]
    seen = _seen(doc)
    assert doc["scenarios"] == ["wan", "lan"]
    assert doc["options"]["lab_rtt_samples"] == SAMPLES
    for scenario, module in (("wan", wan), ("lan", lan)):
        measured = {system for (scn, system, _) in seen if scn == scenario}
        assert measured == _systems(module), (scenario, _systems(module) ^ measured)
    for system in ("udp-direct", "udp-relay", "dtx-direct", "dtx-direct-ping",
                   "dtx-direct-datagram", "dtx-relay", "dtx-relay-ping", "dtx-relay-datagram",
                   "xmpp", "xmpp-ping", "webrtc-direct", "webrtc-relay"):
        assert ("wan", system, "rtt") in seen, system
    for system in ("dtx-direct", "dtx-relay", "xmpp", "webrtc-direct", "webrtc-relay"):
        for metric in ("throughput", "cpu_per_message", "bytes_per_message", "connect"):
            assert ("wan", system, metric) in seen, (system, metric)
    assert ("wan", "dtx-direct-cold", "connect") in seen
    assert ("wan", "xmpp-login", "connect") in seen
    assert ("wan", "xmpp", "first_message") in seen
    assert ("wan", "dtx-direct", "direct_after") in seen
    for system in ("udp-direct", "udp-relay", "dtx-direct", "dtx-relay"):
        assert ("wan", system, "packets_per_exchange") in seen, system
    assert ("lan", "dtx-lan", "rtt") in seen
    assert ("lan", "mdns", "discovery") in seen
    assert ("lan", "xmpp-lan", "rtt") in seen


def test_paths_are_the_expected_ones(lab_run: tuple[dict[str, Any], str, Path]) -> None:
    notes = {(r["scenario"], r["system"], r["metric"]): r["note"] for r in lab_run[0]["results"]}
    assert notes[("wan", "dtx-direct", "rtt")] == "path direct"
    assert notes[("wan", "dtx-relay", "rtt")] == "path relay"
    assert notes[("lan", "dtx-lan", "rtt")] == "path lan"
    assert notes[("wan", "webrtc-relay", "rtt")] == "path relay"
    assert notes[("wan", "webrtc-direct", "rtt")] == "path direct"


def test_samples_are_positive_and_counted(lab_run: tuple[dict[str, Any], str, Path]) -> None:
    for r in lab_run[0]["results"]:
        assert r["samples"], r
        # A session that starts on the LAN path took it over after 0 s.
        low = 0.0 if r["metric"] == "direct_after" else math.ulp(0.0)
        assert all(isinstance(v, float) and v >= low and math.isfinite(v)
                   for v in r["samples"]), r
        if r["metric"] == "rtt" and r["lost"] == 0:
            assert len(r["samples"]) == SAMPLES, r["system"]


def test_targets_are_reported(lab_run: tuple[dict[str, Any], str, Path]) -> None:
    names = [t["name"] for t in lab_run[0]["targets"]]
    for wanted in ("wan: dtx direct-path RTT p50 minus raw UDP p50 (ms)",
                   "wan: aiortc open / dtx first stanza, direct pair (×)",
                   "wan: aiortc open / dtx first stanza, relay pair (×)",
                   "wan: dtx / aiortc one-way messages/s, direct path (×)",
                   "wan: dtx first stanza, registered device, punchable pair (ms)",
                   "wan: direct path takes over after (ms)",
                   "lan: XMPP-via-server RTT p50 / dtx LAN RTT p50 (×)"):
        assert wanted in names, wanted
    assert all(isinstance(t["met"], bool) for t in lab_run[0]["targets"])


def test_markdown_and_plots(lab_run: tuple[dict[str, Any], str, Path]) -> None:
    doc, stderr, out = lab_run
    md = (out / "results.md").read_text(encoding="utf-8")
    assert "## Scenario `wan`" in md and "## Scenario `lan`" in md
    assert "### Round-trip time (ms)" in md
    assert "Bytes on the wire per message" in md
    assert "### Direct path takeover" in md
    assert "### LAN discovery" in md
    for system in (*_systems(wan), *_systems(lan)):
        assert f"\n| {system} |" in md, system
    for name in ("rtt_cdf.png", "rtt_cdf_wan.png", "rtt_cdf_lan.png", "throughput.png",
                 "cpu.png", "connect.png", "bytes.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000, name
    assert "wan run 1/1: dtx-relay connect x1" in stderr
    assert "lan run 1/1: mDNS discovery x1" in stderr
