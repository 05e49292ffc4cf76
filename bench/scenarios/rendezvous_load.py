"""The rendezvous under load beside coturn, in one run
(``python -m bench --scenario rendezvous_load``).

The server under test runs alone on CPU 0 (``taskset``; every thread of
coturn's too); load generators, several processes, run on CPU 1. Measured
for ``python -m rendezvous`` and for coturn (``turnserver``, a throwaway
process on loopback, :class:`dtx.lab.coturn.CoturnServer`), one after the
other in the same run:

* STUN Binding answers/s: every generator process sends dtx's Binding
  request (28 bytes, with FINGERPRINT) on a few sockets connected to the
  server and counts the answers;
* relayed 200-byte messages/s: for dtx, pairs of registered and
  introduced devices, A sending relay frames on its channel, the server
  forwarding each once to B; for coturn, pairs of TURN allocations with a
  channel bound each way, A sending ChannelData, coturn forwarding it from
  A's relayed address to B's and from there to B (twice per message):
  coturn's figure is end to end, as dtx's is.

Each figure is the highest rate found with at most 1% loss: one unpaced
run estimates the capacity, then paced runs from just below it, lower by
a step each time, until one loses at most 1% (bounded in count and time).
The generator is :mod:`bench.loadgen`'s C one when there is a compiler
(sendmmsg / recvmmsg), its Python one otherwise; the notes say which.

Then the ``load`` scenario's rendezvous part (its code, not a copy) with
10,000 devices: memory per registered device and introduction latency.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import random
import select
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.loadgen import Generator, GeneratorRun, Spec, find_generator
from dtx.lab.coturn import CoturnServer, coturn_missing
from dtx.proto.turn import Allocated, ChannelBound, TurnClient, TurnEvent
from dtx.wire.relay import encode_relay
from dtx.wire.stun import binding_request

from .common import Metric, Options, Result
from .load import DESCRIPTIONS as LOAD_DESCRIPTIONS
from .load import LoadConfig, load_figures, load_results, make_devices, rendezvous_load, \
    start_rendezvous, stop_process

NAME = "rendezvous_load"
SERVER_CPU = 0
GENERATOR_CPU = 1
LOOPBACK = "127.0.0.1"
SECRET = "rendezvous-load-secret"
SYSTEMS = ["rendezvous STUN", "coturn STUN", "rendezvous relay", "coturn relay",
           "rendezvous keepalive", "rendezvous introduction", "relay, 100 sessions"]
DESCRIPTIONS = {
    **{k: v for k, v in LOAD_DESCRIPTIONS.items() if k in SYSTEMS},
    "rendezvous STUN": "STUN Binding answers/s, python -m rendezvous on one core",
    "coturn STUN": "STUN Binding answers/s, coturn on one core",
    "rendezvous relay": "200-byte messages/s relayed A to B through the rendezvous (1 forward)",
    "coturn relay": "200-byte messages/s A to B through two TURN allocations (2 forwards)",
}


@dataclass(frozen=True, kw_only=True)
class RendezvousLoadConfig:
    generators: int = 3
    """Load generator processes, all on CPU 1; one relayed pair each."""
    stun_sockets: int = 4
    """Sockets per generator process sending STUN."""
    payload_bytes: int = 200
    step: float = 2.0
    """Seconds each rate is offered for."""
    steps: int = 8
    """Paced rates tried per figure at most."""
    slower: float = 0.85
    """Each paced rate tried after a lossy one is this times it."""
    max_loss: float = 0.01
    load: LoadConfig = field(default_factory=lambda: LoadConfig(duration=8.0))
    """The ``load`` scenario's part (memory per device, introductions)."""

    @staticmethod
    def for_options(opts: Options) -> RendezvousLoadConfig:
        if opts.rtt_samples < 1000:  # --quick
            return RendezvousLoadConfig(step=1.0, steps=5,
                                        load=LoadConfig(devices=2000, duration=4.0))
        return RendezvousLoadConfig()


@dataclass(frozen=True)
class RateFound:
    """The best paced run within the loss bound (or the last one tried),
    and the unpaced run that estimated the capacity."""

    paced: GeneratorRun
    unpaced: GeneratorRun
    within_loss: bool


def find_rate(generator: Generator, specs: list[Spec], cfg: RendezvousLoadConfig) -> RateFound:
    """The highest rate found at which at most ``cfg.max_loss`` is lost.

    From just below the unpaced run's answered rate: up by ``1 / slower``
    while the loss stays within the bound, or down by ``slower`` until it
    does; once a rate within and one above it are known, halving the gap
    between them. At most ``cfg.steps`` paced runs.
    """
    unpaced = _settled(generator.run(specs, 0.0, cfg.step), specs)
    if unpaced.loss <= cfg.max_loss:  # the server kept up with all the generator offers
        return RateFound(unpaced, unpaced, True)
    rate = unpaced.received_per_s * 0.95
    best: GeneratorRun | None = None
    too_high: float | None = None
    last = unpaced
    for _ in range(cfg.steps):
        last = _settled(generator.run(specs, rate, cfg.step), specs)
        if last.loss <= cfg.max_loss:
            if best is None or last.received_per_s > best.received_per_s:
                best = last
            ok = rate
        else:
            too_high = rate if too_high is None else min(too_high, rate)
        if best is None:
            rate *= cfg.slower
        elif too_high is None:
            rate = ok / cfg.slower
        else:
            rate = (ok + too_high) / 2
    if best is None:
        return RateFound(last, unpaced, False)
    return RateFound(best, unpaced, True)


def _settled(run: GeneratorRun, specs: list[Spec], quiet: float = 0.3,
             limit: float = 10.0) -> GeneratorRun:
    """``run``, once the server's backlog has drained: what still comes
    back is read (and not counted) until ``quiet`` seconds pass without a
    datagram, for at most ``limit`` seconds, so that the next run counts
    only its own answers."""
    socks = [s for spec in specs for s in spec.receive]
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        ready, _, _ = select.select(socks, [], [], quiet)
        if not ready:
            break
        for sock in ready:
            for _ in range(1024):
                try:
                    sock.recv(2048, socket.MSG_DONTWAIT)
                except OSError:
                    break
    return run


def _connected(server: tuple[str, int], count: int) -> list[socket.socket]:
    socks = []
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((LOOPBACK, 0))
        sock.connect(server)
        socks.append(sock)
    return socks


def stun_specs(server: tuple[str, int], cfg: RendezvousLoadConfig) -> list[Spec]:
    request = binding_request(os.urandom(12))
    specs = []
    for _ in range(cfg.generators):
        socks = tuple(_connected(server, cfg.stun_sockets))
        specs.append(Spec(send=socks, data=request, receive=socks))
    return specs


# -- dtx: registered, introduced pairs ----------------------------------------------


def dtx_relay_specs(server: tuple[str, int], vcards: Path,
                    cfg: RendezvousLoadConfig) -> list[Spec]:
    """Register ``2 * pairs`` devices per generator, introduce them in
    pairs (B accepts), and hand over their sockets: A's sends relay frames
    on A's channel, B's counts what the server forwards."""
    import asyncio

    from bench.load_worker import Worker

    count = 2 * cfg.generators
    devices = make_devices(count, vcards, count)
    worker = Worker({"server": list(server), "devices": devices, "interval": 1.0,
                     "duration": 0.0, "pairs": 0, "frames_per_s": 1.0})

    async def setup() -> list[tuple[socket.socket, socket.socket, bytes]]:
        await worker.open()
        try:
            await worker.register_all()
            pairs = []
            for i in range(0, count, 2):
                a, b = worker.devs[i], worker.devs[i + 1]
                await worker.introduce(a, b)
                assert a.sock is not None and b.sock is not None and a.channel is not None
                frame = encode_relay(a.channel, bytes(cfg.payload_bytes))
                pairs.append((a.sock.dup(), b.sock.dup(), frame))
            return pairs
        finally:
            for dev in worker.devs:
                if dev.transport is not None:
                    dev.transport.close()

    pairs = asyncio.run(setup())
    for a, _, _ in pairs:
        a.connect(server)
    return [Spec(send=(a,), data=data, receive=(b,)) for a, b, data in pairs]


# -- coturn: TURN client to client ----------------------------------------------------


def rest_credentials(user: str, secret: str, ttl: float = 3600.0) -> tuple[str, str]:
    """TURN REST credentials (``use-auth-secret``): ``expiry:user`` and
    base64(HMAC-SHA1(secret, username))."""
    username = f"{int(time.time() + ttl)}:{user}"
    mac = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return username, base64.b64encode(mac).decode()


class _Allocation:
    """One :class:`TurnClient` on a blocking socket, driven step by step."""

    def __init__(self, server: tuple[str, int], user: str) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((LOOPBACK, 0))
        username, password = rest_credentials(user, SECRET)
        self.client = TurnClient(server, username, password, None, rng=random.Random())
        self.events: list[TurnEvent] = []

    def allocate(self) -> None:
        self.client.allocate(time.monotonic())
        self._flush()

    def bind_channel(self, peer: tuple[str, int]) -> None:
        self.client.bind_channel(peer, time.monotonic())
        self._flush()

    def _flush(self) -> None:
        for data, addr in self.client.datagrams_to_send():
            self.sock.sendto(data, addr)
        while (event := self.client.next_event()) is not None:
            self.events.append(event)

    def wait_for(self, kind: type[TurnEvent], deadline: float) -> TurnEvent:
        """Read answers (and run the client's timers) until ``kind`` comes."""
        while time.monotonic() < deadline:
            for event in self.events:
                if isinstance(event, kind):
                    return event
            when = self.client.get_timer()
            wait = 0.1 if when is None else max(0.001, min(0.1, when - time.monotonic()))
            self.sock.settimeout(wait)
            try:
                data, addr = self.sock.recvfrom(2048)
            except TimeoutError:
                self.client.handle_timer(time.monotonic())
            else:
                if addr == self.client.server:
                    self.client.receive(data, time.monotonic())
            self._flush()
        raise RuntimeError(f"coturn: no {kind.__name__} in time; events: {self.events}")


def coturn_relay_specs(server: tuple[str, int], cfg: RendezvousLoadConfig) -> list[Spec]:
    """Allocate two relayed addresses per pair, bind a channel each way,
    and hand over the sockets: A's sends ChannelData towards B's relayed
    address, B's counts what comes back from coturn."""
    deadline = time.monotonic() + 30.0
    specs = []
    for i in range(cfg.generators):
        a, b = _Allocation(server, f"a{i}"), _Allocation(server, f"b{i}")
        relayed = []
        for alloc in (a, b):
            alloc.allocate()
            event = alloc.wait_for(Allocated, deadline)
            assert isinstance(event, Allocated)
            relayed.append(event.relayed)
        for alloc, peer in ((a, relayed[1]), (b, relayed[0])):
            alloc.bind_channel(peer)
            alloc.wait_for(ChannelBound, deadline)
        data, _ = a.client.wrap(relayed[1], bytes(cfg.payload_bytes))
        a.sock.settimeout(None)
        b.sock.settimeout(None)
        a.sock.connect(server)
        specs.append(Spec(send=(a.sock,), data=data, receive=(b.sock,)))
    return specs


@contextmanager
def coturn_server(folder: Path) -> Iterator[CoturnServer]:
    """coturn on 127.0.0.1 (a free port), every thread pinned to CPU 0."""
    server = CoturnServer(secret=SECRET, realm="bench.example", folder=str(folder))
    server.start()
    try:
        pid = _coturn_pid(folder)
        if pid is not None and shutil.which("taskset"):
            subprocess.run(["taskset", "-a", "-p", "-c", str(SERVER_CPU), str(pid)],
                           capture_output=True, timeout=10, check=False)
        yield server
    finally:
        server.stop()


def _coturn_pid(folder: Path) -> int | None:
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        try:
            return int((folder / "turn.pid").read_text().strip())
        except (OSError, ValueError):
            time.sleep(0.05)
    return None


def _close(specs: list[Spec]) -> None:
    for spec in specs:
        for sock in (*spec.send, *spec.receive):
            sock.close()


# -- the scenario ---------------------------------------------------------------------


def measure_servers(cfg: RendezvousLoadConfig, opts: Options,
                    generator: Generator) -> dict[str, RateFound]:
    """STUN and relay rates of the rendezvous and (when installed) coturn."""
    progress = opts.progress
    found: dict[str, RateFound] = {}
    with tempfile.TemporaryDirectory(prefix="dtx-rdvload-") as tmp:
        vcards = Path(tmp) / "vcards"
        vcards.mkdir()
        server, port = start_rendezvous(
            vcards, "--no-mapping-port", "--relay-frames-per-s", "1e9",
            "--relay-bytes-per-s", "1e12")
        try:
            addr = (LOOPBACK, port)
            progress.step(f"{NAME}: rendezvous STUN")
            specs = stun_specs(addr, cfg)
            found["rendezvous STUN"] = find_rate(generator, specs, cfg)
            _close(specs)
            progress.step(f"{NAME}: rendezvous relay")
            specs = dtx_relay_specs(addr, vcards, cfg)
            found["rendezvous relay"] = find_rate(generator, specs, cfg)
            _close(specs)
        finally:
            stop_process(server)
        if coturn_missing() is None:
            turn = Path(tmp) / "coturn"
            turn.mkdir()
            with coturn_server(turn) as coturn:
                progress.step(f"{NAME}: coturn STUN")
                specs = stun_specs(coturn.address, cfg)
                found["coturn STUN"] = find_rate(generator, specs, cfg)
                _close(specs)
                progress.step(f"{NAME}: coturn relay")
                specs = coturn_relay_specs(coturn.address, cfg)
                found["coturn relay"] = find_rate(generator, specs, cfg)
                _close(specs)
    return found


def _note(f: RateFound, generator: Generator, cfg: RendezvousLoadConfig) -> str:
    bound = "" if f.within_loss else f"; no rate tried lost under {cfg.max_loss:.0%}"
    kept_up = ("; the server kept up with everything offered: the generator's limit"
               if f.paced is f.unpaced else "")
    return (f"{generator.name}, {cfg.generators} processes on CPU {GENERATOR_CPU}; paced "
            f"{f.paced.offered_per_s:,.0f}/s offered, {f.paced.received_per_s:,.0f}/s back, "
            f"{f.paced.loss:.2%} lost; unpaced {f.unpaced.offered_per_s:,.0f}/s offered, "
            f"{f.unpaced.received_per_s:,.0f}/s back{bound}{kept_up}")


def ratios(found: dict[str, RateFound]) -> dict[str, float]:
    """dtx / coturn for each figure measured on both."""
    out = {}
    for figure in ("STUN", "relay"):
        dtx, turn = found.get(f"rendezvous {figure}"), found.get(f"coturn {figure}")
        if dtx is not None and turn is not None and turn.paced.received_per_s > 0:
            out[f"{figure.lower()}_ratio"] = (dtx.paced.received_per_s
                                              / turn.paced.received_per_s)
    return out


def run_config(cfg: RendezvousLoadConfig, opts: Options) -> tuple[list[Result], dict[str, Any]]:
    """Every run of the scenario with ``cfg``: the results, and the JSON
    figures of the last run."""
    results: list[Result] = []
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="dtx-loadgen-") as build:
        generator = find_generator(Path(build), GENERATOR_CPU)
        for run_no in range(opts.runs):
            found = measure_servers(cfg, opts, generator)
            for system, f in found.items():
                results.append(Result(scenario=NAME, system=system, metric=Metric.THROUGHPUT,
                                      run=run_no, samples=(f.paced.received_per_s,),
                                      note=_note(f, generator, cfg)))
            load = rendezvous_load(cfg.load, opts)
            results += load_results(load, cfg.load, NAME, run_no)
            figures = ({"generator": generator.name}
                       | {f"{k.replace(' ', '_').lower()}_per_s": v.paced.received_per_s
                          for k, v in found.items()}
                       | ratios(found) | load_figures(load))
            print(json.dumps(figures), flush=True)
    return results, figures


def run(opts: Options) -> list[Result]:
    return run_config(RendezvousLoadConfig.for_options(opts), opts)[0]
