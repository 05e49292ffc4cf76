"""The soak: many sessions for ``--minutes`` under seeded faults, in the NAT lab.

Not a speed figure: what it measures is that nothing is lost, nothing is
delivered twice, and memory stays flat while the network misbehaves.
``SESSIONS`` sessions (remote devices in homes ``a`` (port-restricted
cone), ``c`` (restricted cone) and ``s`` (symmetric); TVs in ``b``
(port-restricted cone) and ``d`` (full cone): every pair punchable) with
``PeerConfig.resume_timeout``, each remote sending one numbered stanza a
second. Every ``FAULT_EVERY`` seconds a fault drawn from a seeded
``random.Random``: a path cut between two homes for a few seconds, a NAT
reboot (conntrack flushed), both ends of a pair changing public address at
once, 1 % loss on a home's link for 10 s, a restart of the rendezvous
process; and once, a sixth of the way in, a 45 s total outage (every home
cut from every other and from the server: every QUIC connection dies and
every session resumes). At the end the faults stop and every stanza gets
up to two minutes to arrive.

Reported (one ``dtx-soak`` result, figures in its note): stanzas sent,
delivered, duplicated (must be 0), lost (must be 0), out of order,
resumptions, path changes, faults by kind, and this process's resident
memory before the faults, after warm-up (a third of the way in: every kind
of fault and the outage have happened) and at the end, with a sample per
minute; the rendezvous's since its last restart.
"""

from __future__ import annotations

import asyncio
import logging
import random
import signal
import subprocess
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

from dtx import stanza as st
from dtx.aio.peer import Peer
from dtx.aio.session import Session
from dtx.identity import DeviceIdentity, generate_identity
from dtx.lab import STANDARD_WAN, Lab, LinkSpec, lab_missing
from dtx.lab.scene import RDV_PORT, write_vcards
from dtx.lab.scene import start_rendezvous as start_lab_rendezvous
from dtx.lab.topology import Home, Host

from .common import Metric, Options, Result
from .lab_common import ROOT, scratch
from .lab_dtx import lab_peer

logger = logging.getLogger(__name__)

NAME = "soak"
SESSIONS = 50
TVS = 10
FAULT_EVERY = 5.0
OUTAGE = 45.0
DRAIN = 120.0
RESUME_TIMEOUT = 300.0


def _rss_kib(pid: str = "self") -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


@dataclass
class Tally:
    sent: int = 0
    seen: dict[int, int] = field(default_factory=dict)
    out_of_order: int = 0
    last: int = -1

    def got(self, n: int) -> None:
        self.seen[n] = self.seen.get(n, 0) + 1
        if n < self.last:
            self.out_of_order += 1
        self.last = max(self.last, n)


class Soak:
    def __init__(self, lab: Lab, server: Host, folder: Path, opts: Options) -> None:
        self.lab, self.server, self.folder, self.opts = lab, server, folder, opts
        self.rng = random.Random(20261202)
        self.faults: dict[str, int] = {}
        self.rdv_proc: subprocess.Popen[str] | None = None
        self.homes: dict[str, Home] = {}
        self.tallies: list[Tally] = []
        self.sessions: list[Session] = []
        self.tv_sessions: list[Session] = []
        self.path_changes = 0

    def start_rendezvous(self) -> None:
        self.rdv_proc, _ = start_lab_rendezvous(self.server, self.folder / "vcards",
                                                "--no-mapping-port",
                                                listen=(self.server.ip, RDV_PORT), cwd=ROOT)

    def restart_rendezvous(self) -> None:
        proc = self.rdv_proc
        if proc is not None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        self.start_rendezvous()

    async def peer(self, stack: AsyncExitStack, identity: DeviceIdentity, host: Host, *,
                   listen: bool) -> Peer:
        return await stack.enter_async_context(lab_peer(
            identity, host, self.folder / "vcards", (self.server.ip, RDV_PORT),
            listen=listen, resume_timeout=RESUME_TIMEOUT))

    # -- faults ----------------------------------------------------------------------

    def _count(self, kind: str) -> None:
        self.faults[kind] = self.faults.get(kind, 0) + 1

    async def fault(self) -> None:
        """One fault, drawn from the seeded generator, undone before it returns."""
        lab, rng, homes = self.lab, self.rng, list(self.homes.values())
        kind = rng.choice(["cut", "cut", "nat-reboot", "both-move", "loss", "rendezvous"])
        if kind == "rendezvous" and self.faults.get("rendezvous", 0) >= 6:
            kind = "cut"
        self._count(kind)
        if kind == "cut":
            x, y = rng.sample(homes, 2)
            lab.block(x, y)
            await asyncio.sleep(rng.uniform(2.0, 8.0))
            lab.unblock(x, y)
        elif kind == "nat-reboot":
            rng.choice(homes).flush_nat()
        elif kind == "both-move":
            x, y = rng.sample(homes, 2)
            x.change_public_ip()
            y.change_public_ip()
        elif kind == "loss":
            home = rng.choice(homes)
            lab.set_link(home, LinkSpec(delay=0.020, loss=0.01, seed=rng.getrandbits(16)))
            await asyncio.sleep(10.0)
            lab.set_link(home, LinkSpec(delay=0.020))
        else:
            self.restart_rendezvous()

    async def outage(self) -> None:
        """Every home cut from every other and from the server for OUTAGE s."""
        self._count("outage-45s")
        homes = list(self.homes.values())
        pairs: list[tuple[Home | Host, Home | Host]] = [
            (x, y) for i, x in enumerate(homes) for y in homes[i + 1:]]
        pairs += [(x, self.server) for x in homes]
        for x, y in pairs:
            self.lab.block(x, y)
        await asyncio.sleep(OUTAGE)
        for x, y in pairs:
            self.lab.unblock(x, y)

    # -- traffic ---------------------------------------------------------------------

    async def send_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            for session, tally in zip(self.sessions, self.tallies):
                session.send(st.message(str(tally.sent), to=session.peer_jid))
                tally.sent += 1
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except TimeoutError:
                pass

    async def read_loop(self, session: Session, tally: Tally) -> None:
        while True:
            el = await session.receive()
            tally.got(int(st.body_of(el) or "-1"))

    async def run(self, minutes: float) -> str:
        lab = self.lab
        for name, nat in (("a", "port-restricted-cone"), ("b", "port-restricted-cone"),
                          ("c", "restricted-cone"), ("d", "full-cone"), ("s", "symmetric")):
            self.homes[name] = lab.add_home(name, nat=nat, link=LinkSpec(delay=0.020))
        lab.up()
        tv_ids = [generate_identity(f"tv{i}@example.org/tv") for i in range(TVS)]
        remote_ids = [generate_identity(f"remote{i}@example.org/r") for i in range(SESSIONS)]
        write_vcards(self.folder / "vcards", *tv_ids, *remote_ids)
        self.start_rendezvous()
        async with AsyncExitStack() as stack:
            tv_homes, remote_homes = ["b", "d"], ["a", "c", "s"]
            tvs = [await self.peer(stack, tv_id, self.homes[tv_homes[i % 2]].hosts[0],
                                   listen=True) for i, tv_id in enumerate(tv_ids)]
            for tv in tvs:
                await tv.wait_registered(30)
            readers: list[asyncio.Task[None]] = []
            for i, rid in enumerate(remote_ids):
                remote = await self.peer(stack, rid, self.homes[remote_homes[i % 3]].hosts[0],
                                         listen=False)
                await remote.wait_registered(30)
                tv = tvs[i % TVS]
                session = await remote.connect(str(tv_ids[i % TVS].jid.bare), timeout=30)
                accepted = await asyncio.wait_for(tv.accept(), 30)
                tally = Tally()
                self.sessions.append(session)
                self.tv_sessions.append(accepted)
                self.tallies.append(tally)
                readers.append(asyncio.create_task(self.read_loop(accepted, tally)))
            stop = asyncio.Event()
            sender = asyncio.create_task(self.send_loop(stop))
            await asyncio.sleep(30.0)
            rss_start = _rss_kib()
            loop = asyncio.get_running_loop()
            begin = loop.time()
            end = begin + minutes * 60
            # The outage a sixth of the way in; memory "after warm-up" is
            # taken a third of the way in, when every kind of fault, the
            # outage and its 50 resumptions at once have happened.
            outage_at = begin + minutes * 10
            warm_at = begin + minutes * 20
            rss0 = rdv0 = 0
            samples: list[tuple[float, int]] = []
            outage_done = False
            while loop.time() < end:
                minute = int((loop.time() - begin) // 60)
                if not samples or minute > samples[-1][0]:
                    samples.append((minute, _rss_kib()))
                if not rss0 and loop.time() >= warm_at:
                    rss0 = _rss_kib()
                    rdv0 = _rss_kib(str(self.rdv_proc.pid)) if self.rdv_proc else 0
                self.opts.progress.step(f"{NAME}: {int((end - loop.time()) / 60)} min left, "
                                        f"faults {sum(self.faults.values())}")
                if not outage_done and loop.time() >= outage_at:
                    await self.outage()
                    outage_done = True
                else:
                    await self.fault()
                await asyncio.sleep(FAULT_EVERY)
            stop.set()
            await sender
            deadline = loop.time() + DRAIN
            while loop.time() < deadline and any(
                    len(t.seen) < t.sent for t in self.tallies):
                await asyncio.sleep(1.0)
            for task in readers:
                task.cancel()
            rss1 = _rss_kib()
            rdv1 = _rss_kib(str(self.rdv_proc.pid)) if self.rdv_proc else 0
            sent = sum(t.sent for t in self.tallies)
            delivered = sum(len(t.seen) for t in self.tallies)
            duplicated = sum(c - 1 for t in self.tallies for c in t.seen.values() if c > 1)
            lost = sum(1 for t in self.tallies for n in range(t.sent) if n not in t.seen)
            disorder = sum(t.out_of_order for t in self.tallies)
            resumed = sum(s.resumptions for s in self.sessions)
            ended = sum(1 for s in self.sessions if not s.is_open)
            paths = sum(len(s.connection.path_history()) for s in self.sessions)
            faults = ", ".join(f"{k} {v}" for k, v in sorted(self.faults.items()))
            step = max(1, len(samples) // 10)
            trace = " ".join(f"{m}:{kib // 1024}" for m, kib in samples[::step])
            return (f"{len(self.sessions)} sessions, {minutes:g} min; sent {sent}, delivered "
                    f"{delivered}, duplicated {duplicated}, lost {lost}, out of order "
                    f"{disorder}; resumptions {resumed}, sessions ended {ended}, path changes "
                    f"{paths}; faults: {faults}; RSS this process {rss_start} KiB before "
                    f"the faults, {rss0} KiB after warm-up (a third in), {rss1} KiB at the "
                    f"end ({100 * (rss1 - rss0) / max(rss0, 1):+.1f} %); by minute (MiB): "
                    f"{trace}; rendezvous {rdv0} -> {rdv1} KiB (it restarts: its figure is "
                    f"since the last restart)")


def run(opts: Options) -> list[Result]:
    reason = lab_missing()
    if reason:
        raise RuntimeError(f"scenario {NAME} {reason}")
    results: list[Result] = []
    with scratch() as tmp, Lab(wan=STANDARD_WAN) as lab:
        opts.progress.step(f"{NAME}: building the lab")
        server = lab.add_server("rdv")
        soak = Soak(lab, server, Path(tmp), opts)
        started = time.perf_counter()
        note = asyncio.run(soak.run(opts.minutes))
        logger.info("soak: %s", note)
        delivered = sum(len(t.seen) for t in soak.tallies)
        results.append(Result(scenario=NAME, system="dtx-soak", metric=Metric.THROUGHPUT,
                              run=0, samples=(delivered / (time.perf_counter() - started),),
                              note=note))
    return results


SYSTEMS: tuple[str, ...] = ("dtx-soak",)

DESCRIPTIONS: dict[str, str] = {
    "dtx-soak": f"{SESSIONS} sessions under seeded faults, a stanza a second each "
                "(delivered stanzas/s; the counts in the note)",
}
