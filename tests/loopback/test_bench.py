"""The benchmark runs end to end on loopback and writes well-formed results.

No figure is asserted against a number: these tests check that every figure
is there, positive and in the documented shape, never how fast it is.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.report import markdown
from bench.run import available_scenarios, build_document, load_scenario, main, ScenarioError
from bench.scenarios import loopback
from bench.scenarios.common import Metric, Options, Result
from bench.scenarios.loopback import (SYSTEMS, framed_message, left_out, quic_missing,
                                      quic_package, sized_stanza)
from bench.stats import percentile, summarise, targets
from dtx.proto.xmlstream import encode_stanza

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ROOT = Path(__file__).resolve().parents[2]
PLOTS = ("rtt_cdf.png", "throughput.png", "cpu.png", "connect.png")
QH3_MISSING = quic_missing("qh3")
"""Why the quick run leaves ``qh3`` out here (not installed), or None."""
BARE_QUIC = ("aioquic",) if QH3_MISSING else ("aioquic", "qh3")
"""The bare QUIC systems the quick run measures here."""
MEASURED = tuple(s for s in SYSTEMS if s != "qh3" or not QH3_MISSING)
"""Every system the quick run has figures for here."""


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("bench-out")
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--samples", "40", "--stanzas", "2000",
         "--connects", "2", "--runs", "2", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return out, proc.stderr


def _load(out: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((out / "results.json").read_text(encoding="utf-8"))
    return doc


def test_json_has_conditions_and_options(quick_run: tuple[Path, str]) -> None:
    doc = _load(quick_run[0])
    c = doc["conditions"]
    for key in ("date", "command", "python", "aioquic", "cpu_count", "platform"):
        assert c[key], key
    assert c["command"].startswith("python -m bench --quick")
    assert doc["options"]["runs"] == 2
    assert doc["options"]["rtt_samples"] == 40
    assert doc["options"]["prosody_nagle"] is False  # the lab's servers as docs/xmpp-server.md
    assert doc["scenarios"] == ["loopback"]
    assert [s["name"] for s in doc["systems"]] == list(SYSTEMS)
    assert doc["left_out"] == ({"qh3": QH3_MISSING} if QH3_MISSING else {})
    assert c["qh3"] or QH3_MISSING


def test_json_raw_samples_are_positive_and_complete(quick_run: tuple[Path, str]) -> None:
    doc = _load(quick_run[0])
    seen = {(r["system"], r["metric"], r["run"]) for r in doc["results"]}
    for run in (0, 1):
        for system in ("udp", *BARE_QUIC, "dtx", "dtx-ping", "dtx-datagram"):
            assert (system, "rtt", run) in seen
        for system in (*BARE_QUIC, "aioquic-flush", "dtx"):
            assert (system, "throughput", run) in seen
            assert (system, "cpu_per_message", run) in seen
        for system in (*BARE_QUIC, "dtx"):
            assert (system, "connect", run) in seen
    assert {r["system"] for r in doc["results"]} == set(MEASURED)
    for r in doc["results"]:
        assert r["samples"], r
        assert all(isinstance(v, float) and v > 0 and math.isfinite(v)
                   for v in r["samples"]), r
        if r["metric"] == "rtt" and r["system"] != "dtx-datagram":
            assert len(r["samples"]) == 40
            assert r["lost"] == 0
        if r["metric"] == "connect":
            assert len(r["samples"]) == 2


def test_json_summaries_are_ordered_ranges(quick_run: tuple[Path, str]) -> None:
    doc = _load(quick_run[0])
    # rtt, throughput, cpu, connect, packets per exchange; each bare QUIC
    # system adds one of the first four
    quic = len(BARE_QUIC)
    assert len(doc["summaries"]) == (4 + quic) + (3 + quic) * 2 + (1 + quic) + 4
    packets = {s["system"]: s["stats"]["median"]["median"] for s in doc["summaries"]
               if s["metric"] == "packets_per_exchange"}
    assert packets["udp"] == 2.0, "raw UDP: one datagram each way"
    assert all(2.0 <= packets[system] < 6.0 for system in ("dtx", "dtx-ping", "dtx-datagram"))
    for s in doc["summaries"]:
        assert s["runs"] == 2
        for name, rng in s["stats"].items():
            assert 0 < rng["min"] <= rng["median"] <= rng["max"], (s["system"], name)
        if s["metric"] == "rtt":
            p = s["stats"]
            assert p["p50"]["median"] <= p["p90"]["median"] <= p["p99"]["median"] \
                <= p["max"]["median"]
    names = [t["name"] for t in doc["targets"]]
    assert "dtx one-way stanzas/s (both ends in one process)" in names
    assert "dtx one-way stanzas/s (receiver in its own process)" in names
    assert all(t["value"] > 0 and isinstance(t["met"], bool) for t in doc["targets"])


def test_markdown_tables(quick_run: tuple[Path, str]) -> None:
    md = (quick_run[0] / "results.md").read_text(encoding="utf-8")
    assert "| System | What | p50 | p90 | p99 | max | p50 / floor | Samples | Lost |" in md
    assert "| System | Packets | Note |" in md
    # each system's p50 as a multiple of the raw UDP floor of the same run
    assert "\n| udp | raw asyncio UDP echo (the floor) |" in md
    udp_row = next(line for line in md.splitlines() if line.startswith("| udp |"))
    assert "| ×1.00 |" in udp_row
    dtx_row = next(line for line in md.splitlines() if line.startswith("| dtx |"))
    ratio = float(dtx_row.split("| ×")[1].split(" |")[0])
    assert ratio > 1.0, dtx_row
    assert "| System | Messages/s | CPU µs per message | How it sends |" in md
    assert "## Connect time" in md
    assert "## Targets" in md
    for system in MEASURED:
        assert f"\n| {system} |" in md, system
    if QH3_MISSING:
        assert "\n| qh3 |" not in md
        assert "Left out: `qh3`, qh3 is not installed" in md
    else:
        assert "Left out" not in md
    assert "python -m bench --quick" in md


def test_png_plots(quick_run: tuple[Path, str]) -> None:
    for name in PLOTS:
        data = (quick_run[0] / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE), name
        assert len(data) > 1000, name


def test_progress_on_stderr(quick_run: tuple[Path, str]) -> None:
    stderr = quick_run[1]
    assert "loopback run 1/2: udp rtt x40" in stderr
    assert "loopback run 2/2: dtx connect x2" in stderr
    if QH3_MISSING:
        assert "loopback: qh3 left out: qh3 is not installed" in stderr
    else:
        assert "loopback run 2/2: qh3 one-way x2000" in stderr


def test_unknown_scenario_is_refused(tmp_path: Path) -> None:
    assert main(["--scenario", "nowhere", "--out", str(tmp_path)]) == 2
    assert not (tmp_path / "results.json").exists()
    with pytest.raises(ScenarioError):
        load_scenario("common")
    assert "loopback" in available_scenarios()
    assert "common" not in available_scenarios()


def test_qh3_is_left_out_with_a_note_when_it_is_not_installed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Without qh3 the loopback scenario measures the rest and the results
    say why ``qh3`` has no figures (here qh3 is made unimportable)."""
    for name in ["qh3", *(m for m in sys.modules if m.startswith("qh3."))]:
        monkeypatch.setitem(sys.modules, name, None)
    quic_package.cache_clear()
    try:
        missing = left_out()
        assert list(missing) == ["qh3"]
        assert missing["qh3"].startswith("qh3 is not installed (the bench extra")
        with pytest.raises(ImportError):
            quic_package("qh3")
        assert quic_package("aioquic").name == "aioquic"
        doc = build_document(["--scenario", "loopback"], Options.quick(), ["loopback"],
                             [loopback], [])
    finally:
        quic_package.cache_clear()
    assert doc["left_out"] == missing
    assert "qh3" in [s["name"] for s in doc["systems"]]
    assert f"\nLeft out: `qh3`, {missing['qh3']}.\n" in markdown(doc)


def test_one_echo_drives_both_quic_packages() -> None:
    """aioquic and qh3 share the echo code: the protocols differ only in
    the package's QuicConnectionProtocol and StreamDataReceived."""
    if QH3_MISSING:
        pytest.skip(QH3_MISSING)
    a, q = quic_package("aioquic"), quic_package("qh3")
    for pkg in (a, q):
        assert issubclass(pkg.server_protocol, pkg.aio.QuicConnectionProtocol)
        assert issubclass(pkg.client_protocol, pkg.aio.QuicConnectionProtocol)
        assert pkg.server_protocol.stream_data_received is pkg.events.StreamDataReceived
    assert a.server_protocol.quic_event_received is q.server_protocol.quic_event_received
    assert a.client_protocol.quic_event_received is q.client_protocol.quic_event_received


def test_messages_are_the_stated_size() -> None:
    assert len(framed_message(200)) == 200
    for i in (-10, 0, 7, 12345):
        assert len(encode_stanza(sized_stanza(200, to="tv@example.org/living-room",
                                              index=i))) == 200


def test_percentile_nearest_rank() -> None:
    samples = [float(v) for v in range(1, 101)]
    assert percentile(samples, 50) == 50.0
    assert percentile(samples, 99) == 99.0
    assert percentile(samples, 100) == 100.0
    assert percentile(samples, 0) == 1.0
    assert percentile([3.0], 99) == 3.0


def test_summary_is_median_of_runs_with_range() -> None:
    results = [
        Result(scenario="s", system="dtx", metric=Metric.THROUGHPUT, run=i, samples=(v,))
        for i, v in enumerate((30_000.0, 10_000.0, 70_000.0))
    ]
    (summary,) = summarise(results)
    rng = summary.stats["median"]
    assert (rng.median, rng.min, rng.max) == (30_000.0, 10_000.0, 70_000.0)
    (target,) = targets([summary])
    assert target.met is False and target.value == 30_000.0


def test_rendezvous_load_runs_small() -> None:
    """The rendezvous_load scenario with tiny counts: every figure there
    (coturn's when installed), positive, the ratios and the load part's keys."""
    from bench.scenarios.load import LoadConfig
    from bench.scenarios.rendezvous_load import RendezvousLoadConfig, run_config
    from dtx.lab.coturn import coturn_missing

    assert "rendezvous_load" in available_scenarios()
    cfg = RendezvousLoadConfig(
        generators=2, stun_sockets=1, step=0.2, steps=1,
        load=LoadConfig(devices=20, workers=1, source_ips=4, duration=0.5, pairs=2))
    results, figures = run_config(cfg, Options.quick())
    systems = {r.system for r in results}
    expected = {"rendezvous STUN", "rendezvous relay", "rendezvous keepalive",
                "rendezvous introduction", "relay, 100 sessions"}
    keys = {"generator", "rendezvous_stun_per_s", "rendezvous_relay_per_s",
            "bytes_per_device", "intro_p99_ms", "intro_client_p99_ms"}
    if coturn_missing() is None:
        expected |= {"coturn STUN", "coturn relay"}
        keys |= {"coturn_stun_per_s", "coturn_relay_per_s", "stun_ratio", "relay_ratio"}
    assert expected <= systems
    assert keys <= figures.keys()
    for r in results:
        assert r.scenario == "rendezvous_load"
        assert r.samples and all(v > 0 and math.isfinite(v) for v in r.samples), r
    for key in keys - {"generator"}:
        assert figures[key] > 0, key


@pytest.mark.parametrize("kind", ["c", "python"])
def test_load_generators_count_what_they_send(kind: str, tmp_path: Path) -> None:
    """Each load generator, paced, over a datagram socket pair: what one
    end sends, the other counts."""
    import socket
    import sys as _sys

    from bench.loadgen import Generator, Spec, find_generator

    gen = (find_generator(tmp_path, None) if kind == "c"
           else Generator((_sys.executable, "-m", "bench.loadgen"), "Python", None))
    if kind == "c" and not gen.name.startswith("C"):
        pytest.skip("no C compiler")
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with a, b:
        run = gen.run([Spec(send=(a,), data=b"x" * 200, receive=(b,))], 2000.0, 0.2)
    assert run.sent > 0
    assert run.received == run.sent
    assert run.send_errors == 0


def test_the_profile_files_each_sample_under_its_innermost_frames_layer() -> None:
    from bench.profile import OTHER, innermost, layer_of, tally

    raw = "\n".join([
        "thread (1): MainThread;Runner.run (asyncio/runners.py:118);"
        "UdpSocket.sendto (dtx/aio/socket.py:97) 7",
        "thread (1): MainThread;f (aioquic/quic/connection.py:609) 5",
        "thread (1): MainThread;g (aioquic/_crypto.py:50) 3",
        "thread (1): MainThread;h (dtx/proto/xmlstream.py:10) 2",
        "thread (2): dtx-import;_find_and_load (<frozen importlib._bootstrap>:1) 100",
        "thread (1): MainThread;k (somewhere/else.py:1) 1",
        "not a sample line",
    ])
    frames = innermost(raw)
    assert sum(frames.values()) == 18, "the other thread's samples are left out"
    layers = tally(frames)
    assert layers[layer_of("UdpSocket.sendto (dtx/aio/socket.py:97)")] == 7
    assert layers[layer_of("g (aioquic/_crypto.py:50)")] == 3
    assert layer_of("g (aioquic/_crypto.py:50)") != layer_of("f (aioquic/quic/connection.py:609)")
    assert layers[OTHER] == 1
