"""``python -m bench``: run scenarios, write ``results.json``, then the report.

Scenarios are modules under ``bench.scenarios``, each with
``run(opts: Options) -> list[Result]`` (and optionally ``SYSTEMS``, the
display order, ``DESCRIPTIONS``, one line per system, and ``left_out()``,
the systems it leaves out on this machine, each with the reason; the
document notes them under ``left_out``). Adding a
scenario means adding a module; ``--scenario NAME`` imports
``bench.scenarios.NAME``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import importlib.metadata
import json
import logging
import os
import pkgutil
import platform
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from . import scenarios as _scenarios_pkg
from .scenarios.common import Options, Progress, Result
from .stats import Summary, lab_targets, rendezvous_targets, summarise, targets

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
DEFAULT_OUT = Path(__file__).resolve().parent / "out"
DEFAULT_SCENARIOS: tuple[str, ...] = ("loopback",)
_NOT_SCENARIOS = frozenset({"common", "lab_common", "lab_dtx"})
SKIPPABLE: tuple[str, ...] = ("xmpp+dtx",)
"""What ``--skip`` can leave out."""


class ScenarioError(Exception):
    """A scenario name that names no usable module."""


def available_scenarios() -> list[str]:
    """Names of the modules under ``bench.scenarios`` that define ``run``."""
    names = []
    for info in pkgutil.iter_modules(_scenarios_pkg.__path__):
        if info.name.startswith("_") or info.name in _NOT_SCENARIOS:
            continue
        names.append(info.name)
    return sorted(names)


def load_scenario(name: str) -> ModuleType:
    """Import ``bench.scenarios.<name>`` and check it has ``run(opts)``."""
    if not name.isidentifier() or name in _NOT_SCENARIOS:
        raise ScenarioError(f"no scenario named {name!r}")
    try:
        module = importlib.import_module(f"{_scenarios_pkg.__name__}.{name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"{_scenarios_pkg.__name__}.{name}":
            raise ScenarioError(
                f"no scenario named {name!r} (have: {', '.join(available_scenarios())})"
            ) from None
        raise
    if not callable(getattr(module, "run", None)):
        raise ScenarioError(f"scenario {name!r} has no run(opts) function")
    return module


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _package_version(package: str) -> str | None:
    """A Debian package's version (Prosody, coturn), if dpkg knows it."""
    try:
        done = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", package],
                              capture_output=True, text=True, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def _git_commit() -> str | None:
    """The checked-out commit (``+dirty`` with local changes), if in git."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here,
                              capture_output=True, text=True, timeout=5, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=here, capture_output=True, text=True, timeout=5,
                               check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def conditions(argv: Sequence[str]) -> dict[str, Any]:
    """What the numbers depend on: versions, CPUs, date, command line.

    The load average (1, 5, 15 min, taken when the run ends) shows whether
    other work shared the CPUs: on a busy machine every figure gets worse.
    """
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        load = []
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "-m", "bench", *argv]),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "aioquic": _version("aioquic"),
        "qh3": _version("qh3"),
        "cryptography": _version("cryptography"),
        "matplotlib": _version("matplotlib"),
        "slixmpp": _version("slixmpp"),
        "aiortc": _version("aiortc"),
        "aioice": _version("aioice"),
        "prosody": _package_version("prosody"),
        "coturn": _package_version("coturn"),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "load_average": load,
        "git_commit": _git_commit(),
    }


def _result_json(r: Result) -> dict[str, Any]:
    return {
        "scenario": r.scenario, "system": r.system, "metric": str(r.metric),
        "unit": r.unit, "run": r.run, "lost": r.lost, "note": r.note,
        "samples": list(r.samples),
    }


def _summary_json(s: Summary) -> dict[str, Any]:
    return {
        "scenario": s.scenario, "system": s.system, "metric": str(s.metric),
        "unit": s.unit, "runs": s.runs, "samples": s.samples, "lost": s.lost,
        "note": s.note,
        "stats": {k: dataclasses.asdict(v) for k, v in s.stats.items()},
    }


def _options_json(opts: Options) -> dict[str, Any]:
    return {f.name: getattr(opts, f.name) for f in dataclasses.fields(opts)
            if f.name != "progress"}


def build_document(argv: Sequence[str], opts: Options, names: Sequence[str],
                   modules: Sequence[ModuleType], results: Sequence[Result]) -> dict[str, Any]:
    """The content of ``results.json``."""
    summaries = summarise(results)
    systems: dict[str, str] = {}
    order: list[str] = []
    left_out: dict[str, str] = {}
    for module in modules:
        systems.update(getattr(module, "DESCRIPTIONS", {}))
        left_out.update(getattr(module, "left_out", dict)())
        order.extend(s for s in getattr(module, "SYSTEMS", ()) if s not in order)
    for r in results:
        if r.system not in order:
            order.append(r.system)
    return {
        "schema": SCHEMA_VERSION,
        "conditions": conditions(argv),
        "options": _options_json(opts),
        "scenarios": list(names),
        "systems": [{"name": s, "description": systems.get(s, "")} for s in order],
        "left_out": left_out,
        "summaries": [_summary_json(s) for s in summaries],
        "targets": [dataclasses.asdict(t)
                    for t in [*targets(summaries), *lab_targets(summaries),
                              *rendezvous_targets(summaries)]],
        "results": [_result_json(r) for r in results],
    }


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Measure dtx beside its floors and write JSON, Markdown and PNG results.",
    )
    p.add_argument("--quick", action="store_true",
                   help="one run, small counts (well under two minutes)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, metavar="DIR",
                   help="where results go (default: bench/out/)")
    p.add_argument("--runs", type=int, metavar="N",
                   help="repetitions of every measurement (default 3; 1 with --quick)")
    p.add_argument("--scenario", action="append", metavar="NAME",
                   help="scenario to run (repeatable; default: loopback)")
    p.add_argument("--samples", type=int, metavar="N",
                   help="sequential round trips per system (default 2000; 300 with --quick)")
    p.add_argument("--stanzas", type=int, metavar="N",
                   help="messages per one-way batch (default 50000; 10000 with --quick)")
    p.add_argument("--connects", type=int, metavar="N",
                   help="connections timed per system (default 20; 5 with --quick)")
    p.add_argument("--lab-samples", type=int, metavar="N",
                   help="round trips per system in the NAT lab (default 100; 30 with --quick)")
    p.add_argument("--lab-stanzas", type=int, metavar="N",
                   help="one-way messages per batch in the NAT lab (default 5000; 1000 with --quick)")
    p.add_argument("--lab-connects", type=int, metavar="N",
                   help="connections timed per system in the NAT lab (default 5; 2 with --quick)")
    p.add_argument("--minutes", type=float, metavar="N",
                   help="how long the soak scenario runs (default 30; 1 with --quick)")
    p.add_argument("--trials", type=int, metavar="N",
                   help="seeded trials of the birthday scenario (default 50; 5 with --quick)")
    p.add_argument("--skip", action="append", choices=SKIPPABLE, metavar="SYSTEM",
                   help="leave out a family of systems (repeatable): "
                   + ", ".join(SKIPPABLE) + " (the slixmpp plugin's, NAT lab only)")
    p.add_argument("--prosody-nagle", action="store_true",
                   help="run the NAT lab's Prosody with Nagle's algorithm on, as Prosody ships "
                   "(default: off, as docs/xmpp-server.md recommends)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-progress", action="store_true", help="no progress display")
    p.add_argument("--list", action="store_true", help="list scenarios and exit")
    args = p.parse_args(list(argv))
    for name in ("runs", "samples", "stanzas", "connects", "lab_samples", "lab_stanzas",
                 "lab_connects", "trials", "minutes"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def make_options(args: argparse.Namespace, progress: Progress) -> Options:
    overrides: dict[str, Any] = {"progress": progress}
    for arg, field_name in (("runs", "runs"), ("samples", "rtt_samples"),
                            ("stanzas", "stanzas"), ("connects", "connects"),
                            ("lab_samples", "lab_rtt_samples"), ("lab_stanzas", "lab_stanzas"),
                            ("lab_connects", "lab_connects"), ("trials", "trials"),
                            ("minutes", "minutes")):
        value = getattr(args, arg)
        if value is not None:
            overrides[field_name] = value
    if args.prosody_nagle:
        overrides["prosody_nagle"] = True
    if args.skip:
        overrides["skip"] = tuple(dict.fromkeys(args.skip))
    if args.quick:
        return Options.quick(**overrides)
    return Options(**overrides)


def write_json(doc: dict[str, Any], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def main(argv: Sequence[str] | None = None,
         report: Callable[[dict[str, Any], Path, bool], list[Path]] | None = None) -> int:
    """Run the benchmark CLI; returns the process exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(args_list)
    if args.list:
        for name in available_scenarios():
            print(name)
        return 0
    names = args.scenario or list(DEFAULT_SCENARIOS)
    try:
        modules = [load_scenario(n) for n in names]
    except ScenarioError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    progress = Progress(enabled=not args.no_progress)
    opts = make_options(args, progress)
    results: list[Result] = []
    for name, module in zip(names, modules):
        progress.step(f"{name}: starting")
        results.extend(module.run(opts))
    doc = build_document(args_list, opts, names, modules, results)
    written = [write_json(doc, args.out)]
    if report is None:
        from .report import write_report
        report = write_report
    progress.step("writing the report")
    written.extend(report(doc, args.out, not args.no_plots))
    progress.done(f"done: {len(results)} result sets")
    for path in written:
        print(path)
    return 0
