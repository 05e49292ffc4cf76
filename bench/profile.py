"""Where a stanza's microseconds go: the loopback ``<message/>`` echo of the
``loopback`` scenario (both devices in one process, one stanza in flight),
sampled from outside by py-spy, every sample filed under the layer its
innermost Python frame belongs to.

    python -m bench.profile [--echoes N] [--loop auto|uvloop|asyncio] [--rate HZ]

py-spy (``pip install py-spy``) samples the process without stopping it,
idle time included, so the layers' shares add up to the wall time of the
echoes; a layer's microseconds per echo are its share of that time. The
echo is the bench's own (``bench.scenarios.loopback.dtx_stanza_rtt``), run
in a child process (``--child``) that writes its wall time per echo.
Without py-spy the command says so and exits 2.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

LAYERS: tuple[tuple[str, str], ...] = (
    # (layer, regular expression on the innermost frame's file), first match wins
    ("QUIC packet protection (aioquic's C crypto, cryptography)",
     r"aioquic/quic/crypto\.py|aioquic/_crypto|cryptography/"),
    ("QUIC engine (aioquic's Python: packets, frames, recovery, streams)", r"aioquic/"),
    ("dtx congestion control and QUIC hooks", r"dtx/proto/(congestion|auth)\.py"),
    ("XML: parsing and writing stanzas", r"dtx/proto/xmlstream\.py|dtx/wire/xml\.py|"
                                         r"xml/etree|pyexpat|dtx/stanza\.py"),
    ("dtx session (XEP-0198 counts, stream state)", r"dtx/proto/session\.py"),
    ("dtx endpoint and traversal (routing, timers, paths)",
     r"dtx/proto/|dtx/wire/"),
    ("the kernel's sendto and recvfrom (dtx's socket driver)", r"dtx/aio/socket\.py"),
    ("dtx asyncio driver (wake-ups, transmit, Session)", r"dtx/aio/"),
    ("the echo itself (bench: making and timing stanzas)", r"bench/"),
    ("event loop (asyncio, uvloop; epoll)", r"asyncio/|uvloop|selectors"),
    ("no Python frame read (a sample between two)", r"^thread \("),
)
OTHER = "other"


def layer_of(frame: str) -> str:
    for name, pattern in LAYERS:
        if re.search(pattern, frame):
            return name
    return OTHER


def innermost(raw: str) -> Counter[str]:
    """Samples per innermost frame from py-spy's ``--threads --format raw``
    output (collapsed stacks, ``thread;outer;...;inner count`` per line):
    the main thread's only, where the event loop and both devices run."""
    out: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        if "MainThread" not in stack.split(";", 1)[0]:
            continue  # (the thread pool, a background import)
        out[stack.rsplit(";", 1)[-1]] += int(count)
    return out


def tally(frames: Counter[str]) -> Counter[str]:
    """Samples per layer."""
    out: Counter[str] = Counter()
    for frame, n in frames.items():
        out[layer_of(frame)] += n
    return out


def report(layers: Counter[str], us_per_echo: float, floor_us: float | None) -> str:
    total = sum(layers.values()) or 1
    lines = [f"{us_per_echo:.1f} µs per echo (wall)"
             + ("" if floor_us is None else f"; raw UDP echo in the same run {floor_us:.1f} µs"),
             "", "| layer | share | µs per echo |", "|---|---:|---:|"]
    for name, n in layers.most_common():
        lines.append(f"| {name} | {100 * n / total:.1f} % | {us_per_echo * n / total:.1f} |")
    return "\n".join(lines)


# -- the child: the bench's echo ------------------------------------------------------


async def _child(echoes: int, out: Path) -> None:
    from dtx import open_peer
    from dtx.identity import generate_identity

    from .scenarios.common import Options
    from .scenarios.loopback import (HOST, REMOTE_JID, TV_JID, _trusting, dtx_stanza_rtt,
                                     udp_rtt)

    opts = Options(runs=1, rtt_samples=echoes)
    floor, _ = await udp_rtt(Options(runs=1, rtt_samples=min(echoes, 2000)))
    tv_id, remote_id = generate_identity(TV_JID), generate_identity(REMOTE_JID)
    verifier = _trusting(tv_id, remote_id)
    async with open_peer(tv_id, verifier, host=HOST) as tv, \
            open_peer(remote_id, verifier, host=HOST, listen=False) as rc:
        client = await rc.connect(TV_JID, tv.address, timeout=opts.timeout)
        srv = await tv.accept()
        # Ready: the parent attaches the sampler, then says go (a line).
        out.write_text(json.dumps({"ready": True}))
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        began = time.perf_counter()
        samples = await dtx_stanza_rtt(opts, client, srv)
        wall = time.perf_counter() - began
    floor_us = 1e6 * sorted(floor)[len(floor) // 2]
    out.write_text(json.dumps({"us_per_echo": 1e6 * wall / (len(samples) or 1),
                               "p50_us": 1e6 * sorted(samples)[len(samples) // 2],
                               "floor_us": floor_us}))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--echoes", type=int, default=20_000, help="echoes sampled (default 20000)")
    p.add_argument("--loop", choices=("auto", "uvloop", "asyncio"), default="auto")
    p.add_argument("--rate", type=int, default=1000, help="py-spy samples per second")
    p.add_argument("--top", type=int, default=0, metavar="N",
                   help="also list the N innermost frames sampled most")
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    from dtx.aio.loop import run as run_loop

    if args.child is not None:
        run_loop(_child(args.echoes, args.child), loop=args.loop)
        return 0
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        print("py-spy is not installed (pip install py-spy)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        result, raw = Path(tmp) / "result.json", Path(tmp) / "raw.txt"
        child = subprocess.Popen(
            [sys.executable, "-m", "bench.profile", "--echoes", str(args.echoes),
             "--loop", args.loop, "--child", str(result)],
            stdin=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 120
            while not result.exists() and child.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)  # (start-up, not measured)
            if not result.exists():
                raise SystemExit("the echo did not start")
            # Only the echoes are sampled: not the imports, not the set-up.
            spy_proc = subprocess.Popen(
                [spy, "record", "--pid", str(child.pid), "--idle", "--threads", "--nonblocking", "--format", "raw",
                 "--rate", str(args.rate), "--output", str(raw)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.flush()
            child.wait(timeout=1800)
            spy_proc.wait(timeout=60)
        finally:
            if child.poll() is None:
                child.kill()
        figures = json.loads(result.read_text())
        frames = innermost(raw.read_text())
        print(report(tally(frames), figures["us_per_echo"], figures["floor_us"]))
        if args.top:
            total = sum(frames.values()) or 1
            print(f"\nthe {args.top} innermost frames sampled most:")
            for frame, n in frames.most_common(args.top):
                print(f"  {100 * n / total:5.1f} %  {frame}")
        print(f"\necho RTT p50 {figures['p50_us']:.1f} µs (under sampling)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
