"""Birthday probing in the standard WAN: a symmetric home (``masquerade
fully-random``) and a port-restricted-cone home, the pair that plain hole
punching cannot open, with the rendezvous checking each device's NAT
mapping (docs/nat-traversal.md, "Birthday probing").

Each of ``--trials`` trials starts two fresh devices (new sockets, so new
NAT mappings; device randomness seeded with the trial's number; the
symmetric side calls in even trials, answers in odd ones) with the default
search (256 sockets, up to 1,100 probes at 100/s), connects by JID, and
sends a stanza every 100 ms from the first one on. Reported: the time from
the first stanza delivered until both sides run on the direct path
(``dtx-birthday``, one sample per trial that got there within 15 s; the
others counted as lost), the trials and stanzas in the note, and every
stanza checked delivered once, in order (the session rides the relay
meanwhile).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

from dtx import stanza as st
from dtx.identity import DeviceIdentity, generate_identity
from dtx.lab import STANDARD_WAN, Lab, lab_missing
from dtx.lab.scene import RDV_PORT, write_vcards
from dtx.lab.topology import Host

from .common import Metric, Options, Result
from .lab_common import TV_BARE, TV_JID, scratch, start_rendezvous
from .lab_dtx import lab_peer

logger = logging.getLogger(__name__)

NAME = "birthday"
WITHIN = 15.0
"""Seconds from the first stanza within which a trial must be direct."""
EVERY = 0.1
"""A stanza this often during a trial."""


@dataclass
class Trial:
    direct_after: float | None
    sent: int
    delivered: int
    in_order: bool


async def trial(seed: int, caller: tuple[DeviceIdentity, Host], tv: tuple[DeviceIdentity, Host],
                vcards: Path, rendezvous: tuple[str, int], timeout: float) -> Trial:
    """One trial: fresh devices, a session, stanzas until both sides are direct."""
    loop = asyncio.get_running_loop()
    async with lab_peer(*tv, vcards, rendezvous, listen=True,
                        rng=random.Random(2 * seed)) as tv_peer, \
            lab_peer(*caller, vcards, rendezvous, listen=False,
                     rng=random.Random(2 * seed + 1)) as remote:
        await tv_peer.wait_registered(timeout)
        await remote.wait_registered(timeout)
        session = await remote.connect(TV_BARE, timeout=timeout)
        async with asyncio.timeout(timeout):
            tv_side = await tv_peer.accept()
        received: list[str] = []

        async def drain() -> None:
            while True:
                received.append(st.body_of(await tv_side.receive()) or "")

        reader = asyncio.create_task(drain())
        sent: list[str] = []
        direct_after = None
        try:
            session.send(st.message("0", to=TV_BARE))
            sent.append("0")
            async with asyncio.timeout(timeout):
                while not received:
                    await asyncio.sleep(0.005)
            first = loop.time()
            while loop.time() - first < WITHIN:
                if (session.path, tv_side.path) == ("direct", "direct"):
                    direct_after = loop.time() - first
                    break
                await asyncio.sleep(EVERY)
                sent.append(str(len(sent)))
                session.send(st.message(sent[-1], to=TV_BARE))
            await session.wait_acknowledged(timeout=timeout)
            async with asyncio.timeout(timeout):
                while len(received) < len(sent):
                    await asyncio.sleep(0.005)
        finally:
            reader.cancel()
        await session.close(timeout=timeout)
        return Trial(direct_after, len(sent), len(received), received == sent)


def run(opts: Options) -> list[Result]:
    reason = lab_missing()
    if reason:
        raise RuntimeError(f"scenario {NAME} {reason}")
    results: list[Result] = []
    with scratch() as tmp, Lab(wan=STANDARD_WAN) as lab:
        opts.progress.step(f"{NAME}: building the lab")
        server = lab.add_server("rdv")
        sym = lab.add_home("s", nat="symmetric").hosts[0]
        prc = lab.add_home("p", nat="port-restricted-cone").hosts[0]
        lab.up()
        remote_id = generate_identity("remote@example.org/phone")
        tv_id = generate_identity(TV_JID)
        vcards = Path(tmp) / "vcards"
        write_vcards(vcards, remote_id, tv_id)
        start_rendezvous(server, vcards, mapping_check=True)
        rendezvous = (server.ip, RDV_PORT)
        for run_index in range(opts.runs):
            trials: list[Trial] = []
            started = time.perf_counter()
            for i in range(opts.trials):
                seed = run_index * opts.trials + i
                # The symmetric side calls in even trials, answers in odd ones.
                a, b = (sym, prc) if i % 2 == 0 else (prc, sym)
                opts.progress.step(f"{NAME} run {run_index + 1}/{opts.runs}: "
                                   f"trial {i + 1}/{opts.trials}")
                trials.append(asyncio.run(trial(seed, (remote_id, a), (tv_id, b), vcards,
                                                rendezvous, opts.timeout)))
            found = [t.direct_after for t in trials if t.direct_after is not None]
            sent = sum(t.sent for t in trials)
            delivered = sum(t.delivered for t in trials)
            bad = sum(1 for t in trials if not t.in_order)
            if bad or delivered != sent:
                raise RuntimeError(f"{NAME}: {sent} stanzas sent, {delivered} delivered, "
                                   f"{bad} trials out of order or doubled")
            note = (f"{len(found)}/{len(trials)} trials direct within {WITHIN:.0f} s; "
                    f"{sent} stanzas sent during them, {delivered} delivered once, in order; "
                    f"{time.perf_counter() - started:.0f} s")
            results.append(Result(scenario=NAME, system="dtx-birthday", metric=Metric.TAKEOVER,
                                  run=run_index, samples=tuple(found),
                                  lost=len(trials) - len(found), note=note))
    return results


SYSTEMS: tuple[str, ...] = ("dtx-birthday",)

DESCRIPTIONS: dict[str, str] = {
    "dtx-birthday": "symmetric × port-restricted cone, birthday probing: first stanza "
                    "to direct path (failed trials as lost)",
}
