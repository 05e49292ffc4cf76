"""Markdown and PNG reports from the ``results.json`` document.

Everything here reads the JSON document (not live objects), so a report
can be drawn again from a saved run: ``python -m bench.report results.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RTT_COLUMNS: tuple[str, ...] = ("p50", "p90", "p99", "max")


def _summaries(doc: dict[str, Any], metric: str,
               scenario: str | None = None) -> list[dict[str, Any]]:
    order = [s["name"] for s in doc["systems"]]
    rows = [s for s in doc["summaries"] if s["metric"] == metric
            and (scenario is None or s["scenario"] == scenario)]
    return sorted(rows, key=lambda s: order.index(s["system"])
                  if s["system"] in order else len(order))


def _description(doc: dict[str, Any], system: str) -> str:
    for s in doc["systems"]:
        if s["name"] == system:
            return str(s["description"])
    return ""


def _fmt(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def cell(rng: dict[str, float], scale: float, runs: int) -> str:
    """``median`` alone for one run, else ``median (min–max)``."""
    med = _fmt(rng["median"] * scale)
    if runs <= 1:
        return med
    return f"{med} ({_fmt(rng['min'] * scale)}–{_fmt(rng['max'] * scale)})"


def _what(doc: dict[str, Any], s: dict[str, Any]) -> str:
    what = _description(doc, s["system"])
    note = s.get("note") or ""
    if note.startswith("path "):
        what += f" ({note.split(';')[0]})"
    return what


_FLOORS = {"direct": "udp-direct", "relay": "udp-relay", "lan": "udp-lan",
           "via the XMPP server": "udp-relay", "through the server": "udp-relay"}
"""The raw-UDP system measuring the floor of each path (a stanza through
the XMPP server crosses the server host as a relayed datagram does)."""


def _floor_of(rows: dict[str, dict[str, Any]], s: dict[str, Any]) -> dict[str, Any] | None:
    """The floor row for the row ``s`` of one scenario's RTT table: the
    raw UDP echo on the same path, or the scenario's one ``udp`` floor."""
    if "udp" in rows:
        return rows["udp"]
    note = s.get("note") or ""
    path = note.split(";")[0].removeprefix("path ").split(" (")[0].strip()
    floor = _FLOORS.get(path)
    return rows.get(floor) if floor is not None else None


def _ratio(s: dict[str, Any], floor: dict[str, Any] | None) -> str:
    """The row's p50 as a multiple of its floor's, measured in the same run."""
    if floor is None:
        return "–"
    base = floor["stats"]["p50"]["median"]
    if base <= 0:
        return "–"
    return f"×{s['stats']['p50']['median'] / base:.2f}"


def _scenario_tables(doc: dict[str, Any], scenario: str, heading: str) -> list[str]:
    """The tables of one scenario; RTT in ms when its round trips are."""
    lines: list[str] = []
    if heading == "###":
        lines += ["", f"## Scenario `{scenario}`"]
    rtts = _summaries(doc, "rtt", scenario)
    in_ms = any(s["stats"]["p50"]["median"] >= 1e-3 for s in rtts)
    unit, scale = ("ms", 1e3) if in_ms else ("µs", 1e6)
    if rtts:
        lines += [
            "",
            f"{heading} Round-trip time ({unit})",
            "",
            "| System | What | " + " | ".join(RTT_COLUMNS) + " | p50 / floor | Samples | Lost |",
            "|---|---|" + "---:|" * len(RTT_COLUMNS) + "---:|---:|---:|",
        ]
    by_system = {s["system"]: s for s in rtts}
    for s in rtts:
        cells = [cell(s["stats"][k], scale, s["runs"]) for k in RTT_COLUMNS]
        lines.append(f"| {s['system']} | {_what(doc, s)} | " + " | ".join(cells)
                     + f" | {_ratio(s, _floor_of(by_system, s))} | {s['samples']} "
                     f"| {s['lost']} |")

    rates = {s["system"]: s for s in _summaries(doc, "throughput", scenario)}
    cpus = {s["system"]: s for s in _summaries(doc, "cpu_per_message", scenario)}
    wire = {s["system"]: s for s in _summaries(doc, "bytes_per_message", scenario)}
    if rates:
        lines += ["", f"{heading} One-way throughput and CPU cost", ""]
        if wire:
            lines += ["| System | Messages/s | CPU µs per message | Bytes on the wire per "
                      "message | How it sends |", "|---|---:|---:|---:|---|"]
        else:
            lines += ["| System | Messages/s | CPU µs per message | How it sends |",
                      "|---|---:|---:|---|"]
        for system, s in rates.items():
            cpu = cpus.get(system)
            cpu_cell = cell(cpu["stats"]["median"], 1e6, cpu["runs"]) if cpu else "–"
            row = f"| {system} | {cell(s['stats']['median'], 1.0, s['runs'])} | {cpu_cell} | "
            if wire:
                w = wire.get(system)
                row += (cell(w["stats"]["median"], 1.0, w["runs"]) if w else "–") + " | "
            lines.append(row + f"{s['note']} |")

    packets = _summaries(doc, "packets_per_exchange", scenario)
    if packets:
        lines += ["", f"{heading} Packets per exchange: UDP datagrams both ends sent per "
                  "request and answer (raw UDP: 2)", "", "| System | Packets | Note |",
                  "|---|---:|---|"]
        for s in packets:
            lines.append(f"| {s['system']} | {cell(s['stats']['median'], 1.0, s['runs'])} "
                         f"| {s['note']} |")

    for metric, title, noted in (
            ("connect", "Connect time (ms): connect call to first message delivered", True),
            ("first_message", "First message (ms): an application's first message after "
             "login to its echo", True),
            ("direct_after", "Direct path takeover (ms): session start (birthday: first "
             "stanza) to the direct (or LAN) path carrying it", True),
            ("discovery", "LAN discovery (ms): fresh mDNS browser to the device resolved",
             False)):
        rows = _summaries(doc, metric, scenario)
        if rows:
            takeover = metric == "direct_after"
            head = ("| System | Median | p90 | Samples | Lost |" if takeover
                    else "| System | Median | Samples |")
            rule = "|---|---:|---:|---:|---:|" if takeover else "|---|---:|---:|"
            lines += ["", f"{heading} {title}", "", head + (" Note |" if noted else ""),
                      rule + ("---|" if noted else "")]
            for s in rows:
                row = f"| {s['system']} | {cell(s['stats']['median'], 1e3, s['runs'])} "
                if takeover:
                    p90 = s["stats"].get("p90")
                    row += f"| {cell(p90, 1e3, s['runs']) if p90 else '–'} "
                row += f"| {s['samples']} |"
                if takeover:
                    row += f" {s['lost']} |"
                lines.append(row + (f" {s['note']} |" if noted else ""))
    return lines


def markdown(doc: dict[str, Any]) -> str:
    """The results as Markdown: conditions, then one table per figure."""
    c = doc["conditions"]
    o = doc["options"]
    lines = [
        "# dtx benchmark results",
        "",
        f"Command: `{c['command']}` ({c['date']}"
        + (f", commit {c['git_commit']}" if c.get("git_commit") else "") + ").",
        "",
        f"Python {c['python']} ({c['python_implementation']}), aioquic {c['aioquic']}"
        + (f", qh3 {c['qh3']}" if c.get("qh3") and "loopback" in doc.get("scenarios", [])
           else "")
        + "".join(f", {name} {c[name]}" for name in ("slixmpp", "aiortc", "prosody", "coturn")
                  if c.get(name) and any(s != "loopback" for s in doc.get("scenarios", [])))
        + f", {c['cpus_usable']} of {c['cpu_count']} CPUs usable, {c['platform']}"
        + (f", load average {' / '.join(str(v) for v in c['load_average'])}"
           if c.get("load_average") else "") + ".",
        f"Runs: {o['runs']}; {o['message_bytes']}-byte messages; "
        f"{o['rtt_samples']} round trips, {o['stanzas']} one-way messages and "
        f"{o['connects']} connections per system per run"
        + (f" (NAT lab: {o['lab_rtt_samples']} round trips, {o['lab_stanzas']} one-way "
           f"messages, {o['lab_connects']} connections)" if "lab_rtt_samples" in o else "")
        + ". With several runs a cell reads `median (min–max)` over the runs.",
    ]
    for system, reason in (doc.get("left_out") or {}).items():
        lines += ["", f"Left out: `{system}`, {reason}."]
    scenarios = list(doc.get("scenarios") or [])
    for scenario in scenarios:
        lines += _scenario_tables(doc, scenario, heading="###" if len(scenarios) > 1 else "##")
    if doc.get("targets"):
        lines += [
            "",
            "## Targets (shown, not asserted)",
            "",
            "| Figure | Measured | Target | Met |",
            "|---|---:|---:|---|",
        ]
        for t in doc["targets"]:
            sign = "≥" if t["higher_is_better"] else "≤"
            lines.append(f"| {t['name']} | {_fmt(t['value'])} | {sign} {_fmt(t['target'])} "
                         f"| {'yes' if t['met'] else 'no'} |")
    return "\n".join(lines) + "\n"


def _label(doc: dict[str, Any], scenario: str, system: str) -> str:
    return system if len(doc.get("scenarios") or []) <= 1 else f"{scenario}/{system}"


def _pooled(doc: dict[str, Any], metric: str,
            scenario: str | None = None) -> dict[str, list[float]]:
    pooled: dict[tuple[str, str], list[float]] = {}
    for r in doc["results"]:
        if r["metric"] == metric and (scenario is None or r["scenario"] == scenario):
            pooled.setdefault((r["scenario"], r["system"]), []).extend(r["samples"])
    order = [s["name"] for s in doc["systems"]]
    scenarios = list(doc.get("scenarios") or [])
    keys = sorted(pooled, key=lambda k: (scenarios.index(k[0]) if k[0] in scenarios else 0,
                                         order.index(k[1]) if k[1] in order else len(order)))
    return {_label(doc, *k): pooled[k] for k in keys}


def plots(doc: dict[str, Any], out: Path) -> list[Path]:
    """RTT CDF per system; bars of throughput, CPU and connect time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    title_tail = f"(Python {doc['conditions']['python']}, aioquic {doc['conditions']['aioquic']})"

    def cdf(rtts: dict[str, list[float]], title: str, name: str) -> None:
        if not rtts:
            return
        fig, ax = plt.subplots(figsize=(9, 5.5))
        for system, samples in rtts.items():
            xs = sorted(v * 1e6 for v in samples)
            ys = [(i + 1) / len(xs) for i in range(len(xs))]
            ax.step(xs, ys, where="post", label=system)
        ax.set_xscale("log")
        ax.set_xlabel("round-trip time (µs, log scale)")
        ax.set_ylabel("fraction of round trips")
        ax.set_title(f"{title} RTT CDF {title_tail}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / name
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)

    scenarios = list(doc.get("scenarios") or [])
    cdf(_pooled(doc, "rtt"), ", ".join(scenarios) or "all", "rtt_cdf.png")
    if len(scenarios) > 1:
        for scenario in scenarios:
            cdf(_pooled(doc, "rtt", scenario), scenario, f"rtt_cdf_{scenario}.png")

    def bars(metric: str, scale: float, ylabel: str, title: str, name: str) -> None:
        rows = _summaries(doc, metric)
        if not rows:
            return
        labels = [_label(doc, s["scenario"], s["system"]) for s in rows]
        meds = [s["stats"]["median"]["median"] * scale for s in rows]
        lows = [m - s["stats"]["median"]["min"] * scale for m, s in zip(meds, rows)]
        highs = [s["stats"]["median"]["max"] * scale - m for m, s in zip(meds, rows)]
        fig, ax = plt.subplots(figsize=(max(7.0, 0.6 * len(labels) + 2), 5))
        ax.bar(labels, meds, yerr=[lows, highs], capsize=6, color="tab:blue")
        for x, m in enumerate(meds):
            ax.annotate(_fmt(m), (x, m), ha="center", va="bottom",
                        xytext=(0, 3), textcoords="offset points")
        ax.set_ylabel(ylabel)
        ax.tick_params(axis="x", labelrotation=60 if len(labels) > 4 else 0, labelsize=7)
        ax.set_title(f"{title} {title_tail}", fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
        fig.tight_layout()
        path = out / name
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)

    bars("throughput", 1.0, "messages per second (median, min–max)",
         "One-way throughput, 200-byte messages", "throughput.png")
    bars("cpu_per_message", 1e6, "CPU µs per message (both ends)",
         "CPU time per message", "cpu.png")
    bars("connect", 1e3, "ms from connect call to first message delivered",
         "Connect time", "connect.png")
    bars("bytes_per_message", 1.0, "bytes both ends sent per one-way message",
         "Bytes on the wire per message", "bytes.png")
    return written


def write_report(doc: dict[str, Any], out: Path, with_plots: bool = True) -> list[Path]:
    """Write ``results.md`` and (with ``with_plots``) the PNG plots to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    md = out / "results.md"
    md.write_text(markdown(doc), encoding="utf-8")
    written = [md]
    if with_plots:
        written.extend(plots(doc, out))
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """Draw the report again from a saved ``results.json``."""
    p = argparse.ArgumentParser(prog="python -m bench.report",
                                description="Write results.md and plots from results.json.")
    p.add_argument("results", type=Path)
    p.add_argument("--out", type=Path, help="default: the folder of RESULTS")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    doc = json.loads(args.results.read_text(encoding="utf-8"))
    for path in write_report(doc, args.out or args.results.parent, not args.no_plots):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
