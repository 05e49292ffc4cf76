"""Load: one rendezvous process holding many devices, and one device
holding many sessions (``python -m bench --scenario load``).

Part 1 runs ``python -m rendezvous`` pinned to one core, and client
processes (:mod:`bench.load_worker`, on the other core) that register
10,000 devices (each its own UDP socket; sources spread over 250 loopback
addresses, as devices behind many NATs would be, so the per-address
control limit sees 40 devices each), then send keepalives at a shortened
interval while 100 introduced pairs pump relay frames both ways. It
reports the server's resident memory per registered device, keepalive
and introduction latency, and relayed packets per second.

Part 2 opens 100 sessions from 100 client ``Peer`` objects to one
listening ``Peer`` and pings across all of them at once.

Results use the RTT metric for latencies (so they get p50/p99) and the
THROUGHPUT metric for relayed packets per second; memory goes in notes.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519

from dtx.aio.peer import Peer, PeerConfig, open_peer
from dtx.identity import generate_identity
from dtx.trust import PinStore, StaticKeys, Verifier, add_key, new_vcard

from .common import Metric, Options, Result

NAME = "load"
ROOT = Path(__file__).resolve().parents[2]
SYSTEMS = ["rendezvous keepalive", "rendezvous introduction", "relay, 100 sessions",
           "peer, 100 sessions"]
DESCRIPTIONS = {
    "rendezvous keepalive": "KEEPALIVE to KEEPALIVE_ACK while the server holds every device",
    "rendezvous introduction": "INTRODUCE sent until both INTRODUCTIONs reached their sockets",
    "relay, 100 sessions": "relay frames forwarded per second (100-byte payloads)",
    "peer, 100 sessions": "XEP-0199 ping on each of 100 concurrent sessions of one device",
}


@dataclass(frozen=True, kw_only=True)
class LoadConfig:
    devices: int = 10_000
    workers: int = 4
    source_ips: int = 250
    keepalive: float = 5.0
    """Keepalive interval asked of devices (25 s in production)."""
    duration: float = 20.0
    pairs: int = 100
    frames_per_s: float = 20.0
    """Relay frames per second from each side of each pair."""
    sessions: int = 100
    ping_rounds: int = 20

    @staticmethod
    def for_options(opts: Options) -> LoadConfig:
        if opts.rtt_samples < 1000:  # --quick
            return LoadConfig(devices=2000, duration=8.0, ping_rounds=5)
        return LoadConfig()


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _pin(pid: int, cpu: int) -> None:
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > cpu:
        os.sched_setaffinity(pid, {cpu})


def _readline(proc: subprocess.Popen[str], timeout: float) -> str:
    """One line of a child's stdout, within ``timeout`` (bounded wait)."""
    import select

    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise TimeoutError("no line from a child process")
    return proc.stdout.readline()


def make_devices(count: int, vcards: Path, source_ips: int) -> list[dict[str, str]]:
    """``count`` devices, each of its own account: a fresh key, its vCard
    written into ``vcards``, and a source IP among ``source_ips`` loopback
    addresses (127.0.1.x); what :mod:`bench.load_worker` takes."""
    devices = []
    for i in range(count):
        key = ed25519.Ed25519PrivateKey.generate()
        bare = f"dev{i}@load.example"
        pub = key.public_key().public_bytes_raw()
        (vcards / f"{bare}.xml").write_bytes(add_key(new_vcard(bare), pub))
        devices.append({"jid": f"{bare}/d", "key": key.private_bytes_raw().hex(),
                        "ip": f"127.0.1.{1 + i % source_ips}"})
    return devices


def start_rendezvous(vcards: Path, *args: str) -> tuple[subprocess.Popen[str], int]:
    """``python -m rendezvous`` on 127.0.0.1 (a free port) with ``args``,
    pinned to CPU 0 (every thread: ``taskset`` where there is one); the
    process and its port, once it listens (bounded wait)."""
    command = [sys.executable, "-m", "rendezvous", "--listen", "127.0.0.1:0", "--vcards",
               str(vcards), *args]
    pinned = shutil.which("taskset") is not None and (os.cpu_count() or 1) > 1
    if pinned:
        command = ["taskset", "-c", "0", *command]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT)
    try:
        if not pinned:
            _pin(server.pid, 0)
        line = _readline(server, 30)
        return server, int(line.split()[3].rsplit(":", 1)[1])
    except BaseException:
        stop_process(server)
        raise


def stop_process(proc: subprocess.Popen[str]) -> None:
    """SIGTERM, then SIGKILL after 10 s."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def rendezvous_load(cfg: LoadConfig, opts: Options) -> dict[str, Any]:
    progress = opts.progress
    progress.step(f"{NAME}: generating {cfg.devices} device keys and vCards")
    with tempfile.TemporaryDirectory(prefix="dtx-load-") as tmp:
        vcards = Path(tmp)
        devices = make_devices(cfg.devices, vcards, cfg.source_ips)
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        server, port = start_rendezvous(vcards, "--keepalive", str(cfg.keepalive),
                                        "--lifetime", str(cfg.keepalive * 4))
        workers: list[subprocess.Popen[str]] = []
        try:
            rss_idle = _rss(server.pid)
            per = -(-cfg.devices // cfg.workers)
            for w in range(cfg.workers):
                chunk = devices[w * per : (w + 1) * per]
                proc = subprocess.Popen(
                    [sys.executable, "-m", "bench.load_worker"], stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
                assert proc.stdin is not None
                proc.stdin.write(json.dumps({
                    "server": ["127.0.0.1", port], "devices": chunk, "interval": cfg.keepalive,
                    "duration": cfg.duration, "pairs": cfg.pairs if w == 0 else 0,
                    "frames_per_s": cfg.frames_per_s, "cpu": 1,
                }) + "\n")
                proc.stdin.flush()
                workers.append(proc)
            progress.step(f"{NAME}: registering {cfg.devices} devices")
            start = time.monotonic()
            for proc in workers:
                line = _readline(proc, 300)
                if not line.startswith("registered"):
                    raise RuntimeError(f"worker failed: {line!r}")
            register_s = time.monotonic() - start
            rss_loaded = _rss(server.pid)
            cpu_before = _cpu_seconds(server.pid)
            progress.step(f"{NAME}: keepalives and relaying for {cfg.duration:.0f} s")
            for proc in workers:
                assert proc.stdin is not None
                proc.stdin.write("go\n")
                proc.stdin.flush()
            reports = [json.loads(_readline(proc, cfg.duration + 120)) for proc in workers]
            cpu_used = _cpu_seconds(server.pid) - cpu_before
            rss_end = _rss(server.pid)
        finally:
            for proc in workers:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
            stop_process(server)
    window = max(r["window_s"] for r in reports)
    return {
        "devices": cfg.devices,
        "register_s": register_s,
        "rss_idle": rss_idle, "rss_loaded": rss_loaded, "rss_end": rss_end,
        "bytes_per_device": (rss_loaded - rss_idle) / cfg.devices,
        "keepalive_s": [s for r in reports for s in r["keepalive_s"]],
        "lost_keepalives": sum(r["lost_keepalives"] for r in reports),
        "intro_s": [s for r in reports for s in r["intro_s"]],
        "intro_client_s": [s for r in reports for s in r.get("intro_client_s", [])],
        "relay_sent": sum(r["relay_sent"] for r in reports),
        "relay_received": sum(r["relay_received"] for r in reports),
        "window_s": window,
        "server_cpu_share": cpu_used / (cfg.duration + 2.0),
    }


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def many_sessions(cfg: LoadConfig) -> list[float]:
    """Ping RTTs over ``cfg.sessions`` concurrent sessions to one Peer."""
    tv_id = generate_identity("tv@load.example/living-room")
    clients = [generate_identity(f"remote{i}@load.example/phone") for i in range(cfg.sessions)]
    keys: dict[str, list[bytes]] = {str(tv_id.jid.bare): [tv_id.public_key]}
    for c in clients:
        keys[str(c.jid.bare)] = [c.public_key]
    verifier = Verifier([StaticKeys(keys)], PinStore(None))
    config = PeerConfig(max_half_open=cfg.sessions * 2, max_half_open_per_ip=cfg.sessions * 2)
    rtts: list[float] = []
    async with open_peer(tv_id, verifier, config=config) as tv:
        peers: list[Peer] = []
        try:
            for ident in clients:
                peer = Peer(ident, verifier)
                await peer.start(listen=False)
                peers.append(peer)
            sessions = await asyncio.gather(
                *(p.connect(tv_id.jid.full, tv.address, timeout=30) for p in peers))
            for _ in range(cfg.ping_rounds):
                rtts += await asyncio.gather(*(s.ping(timeout=30) for s in sessions))
            assert len(tv.sessions()) == cfg.sessions
        finally:
            await asyncio.gather(*(p.close() for p in peers), return_exceptions=True)
    return rtts


def run(opts: Options) -> list[Result]:
    cfg = LoadConfig.for_options(opts)
    results: list[Result] = []
    for run_no in range(opts.runs):
        load = rendezvous_load(cfg, opts)
        results += load_results(load, cfg, NAME, run_no)
        opts.progress.step(f"{NAME}: {cfg.sessions} sessions on one peer")
        rtts = asyncio.run(many_sessions(cfg))
        results.append(Result(scenario=NAME, system="peer, 100 sessions", metric=Metric.RTT,
                              run=run_no, samples=tuple(rtts)))
        print(json.dumps(load_figures(load)
                         | {"ping_p50_ms": _pct(rtts, 50) * 1000,
                            "ping_p99_ms": _pct(rtts, 99) * 1000}), flush=True)
    return results


def load_results(load: dict[str, Any], cfg: LoadConfig, scenario: str,
                 run_no: int) -> list[Result]:
    """The results of one :func:`rendezvous_load`: keepalive and
    introduction latency (memory per device in the note), relayed frames/s."""
    note = (f"{load['devices']} devices registered in {load['register_s']:.1f} s; server RSS "
            f"{load['rss_idle'] / 2**20:.1f} MiB idle, {load['rss_loaded'] / 2**20:.1f} MiB "
            f"loaded ({load['bytes_per_device']:.0f} B/device); keepalive every "
            f"{cfg.keepalive:g} s, {load['lost_keepalives']} unanswered; server CPU "
            f"{100 * load['server_cpu_share']:.0f}% of one core")
    pps = load["relay_received"] / load["window_s"]
    client = load.get("intro_client_s", [])
    return [
        Result(scenario=scenario, system="rendezvous keepalive", metric=Metric.RTT,
               run=run_no, samples=tuple(load["keepalive_s"]), lost=load["lost_keepalives"],
               note=note),
        Result(scenario=scenario, system="rendezvous introduction", metric=Metric.RTT,
               run=run_no, samples=tuple(load["intro_s"]),
               note=f"INTRODUCE sent to both INTRODUCTIONs in their sockets (kernel "
                    f"receive time); as the client processes' event loops saw them: p50 "
                    f"{_pct(client, 50) * 1000:.0f} ms, p99 {_pct(client, 99) * 1000:.0f} ms"),
        Result(scenario=scenario, system="relay, 100 sessions", metric=Metric.THROUGHPUT,
               run=run_no, samples=(pps,),
               note=f"offered {load['relay_sent'] / load['window_s']:.0f} frames/s, "
                    f"forwarded {pps:.0f}/s"),
    ]


def load_figures(load: dict[str, Any]) -> dict[str, Any]:
    """The JSON line of one :func:`rendezvous_load`: its counts, and
    latency percentiles in ms."""
    return ({k: v for k, v in load.items() if not isinstance(v, list)}
            | {"keepalive_p50_ms": _pct(load["keepalive_s"], 50) * 1000,
               "keepalive_p99_ms": _pct(load["keepalive_s"], 99) * 1000,
               "intro_p50_ms": _pct(load["intro_s"], 50) * 1000,
               "intro_p99_ms": _pct(load["intro_s"], 99) * 1000,
               "intro_client_p50_ms": _pct(load.get("intro_client_s", []), 50) * 1000,
               "intro_client_p99_ms": _pct(load.get("intro_client_s", []), 99) * 1000,
               "relay_pps": load["relay_received"] / load["window_s"]})


def _pct(samples: list[float], q: float) -> float:
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    return ordered[max(0, min(len(ordered) - 1, int(round(q / 100 * len(ordered))) - 1))]
