"""dtx in the NAT lab: its devices, and every figure of one pair of hosts.

The calling device (on host ``a``) finds the TV (on host ``b``) one of two
ways, and one function, :func:`measure_system`, measures both:

- through the dtx rendezvous (:func:`measure_dtx`): both devices register
  with it and the caller connects by JID (``Peer.connect("tv@example.org")``);
- through the account's own XMPP server (:func:`measure_dtx_xmpp`): both
  devices are logged in with :class:`~dtx.aio.xmpp.XmppSignalling` (STUN
  and TURN from the server by XEP-0215, the relay is coturn) and the caller
  connects to the TV's full JID by Jingle; no dtx rendezvous is involved.

A system is measured over ``Options.lab_connects`` connections, each from a
fresh device (a new socket, so new NAT mappings) to the same TV: the time
from the connect call to the first stanza delivered, the path at the end
and when the direct path took over. The first session, once on its final
path, also carries the round trips (with ``DtxSystem.extras``, also
XEP-0199 pings, the DATAGRAM echo, one-way throughput and bytes on the
wire), as the XMPP and WebRTC alternatives take theirs on their first
connection.
"""

from __future__ import annotations

import asyncio
import compileall
import dataclasses
import logging
import random
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import dtx
from dtx.aio.peer import Peer, PeerConfig
from dtx.aio.session import Session
from dtx.aio.xmpp import XmppSignalling, XmppSignallingConfig
from dtx.identity import DeviceIdentity, save_identity
from dtx.lab.topology import Host
from dtx.trust import PinStore, VCardDirectory, Verifier
from dtx.wire.address import format_address
from dtx.xmpp.client import XmppConfig

from .common import Metric, Options, Result
from .lab_common import (TV_BARE, TV_JID, XMPP_PASSWORD, LabWorld, Pair, counting,
                         guarded_async)
from .loopback import dtx_datagram_rtt, dtx_ping_rtt, dtx_stanza_rtt, dtx_throughput, \
    sized_stanza, warmup

logger = logging.getLogger(__name__)

RELAY_SETTLE = 4.0
"""Seconds a relay-only pair's session is watched for the direct path:
past the quick punch attempts (up to 2 s after the introduction)."""
LOGIN_SETTLE = 1.0
"""Seconds logged-in devices are left before the first connection. In the
lab a connection begun within a moment of a login on the account (the
caller's own, or another device's) takes one server round trip longer,
about 120 ms: most likely a Jingle stanza held in Prosody's Nagle buffer
behind the presence it just wrote for the login. That is not the state
of a device logged in for a while."""


# -- devices ---------------------------------------------------------------------------


@asynccontextmanager
async def lab_peer(identity: DeviceIdentity, host: Host, vcards: Path,
                   rendezvous: tuple[str, int], *, listen: bool,
                   rng: random.Random | None = None,
                   resume_timeout: float | None = PeerConfig.resume_timeout,
                   ) -> AsyncIterator[Peer]:
    """A started :class:`Peer` of the rendezvous at ``rendezvous``, trusting
    the vCards in ``vcards``, its sockets (a birthday search's too) in
    ``host``'s namespace."""
    cfg = PeerConfig(rendezvous=rendezvous, host_addresses=(host.ip,),
                     side_sockets=host.udp_socket, resume_timeout=resume_timeout)
    peer = Peer(identity, Verifier([VCardDirectory(vcards)], PinStore(None)), config=cfg,
                rng=rng)
    await peer.start(sock=host.udp_socket(), listen=listen)
    try:
        yield peer
    finally:
        await peer.close()


def open_lab_peer(world: LabWorld, identity: DeviceIdentity, host: Host, *,
                  listen: bool) -> AbstractAsyncContextManager[Peer]:
    """:func:`lab_peer` of the world's rendezvous and vCards."""
    return lab_peer(identity, host, world.vcards, world.rendezvous, listen=listen)


@asynccontextmanager
async def open_xmpp_device(world: LabWorld, identity: DeviceIdentity, host: Host,
                           timeout: float) -> AsyncIterator[tuple[Peer, XmppSignalling]]:
    """A started :class:`Peer` (its socket in ``host``'s namespace, no
    rendezvous) logged in to the account's own XMPP server, with its TURN
    allocation. The XMPP connection is made where the calling thread is
    (a lab namespace: :func:`measure_dtx_xmpp`)."""
    if world.account_server is None:
        raise RuntimeError("the account's XMPP server is not running")
    xmpp = XmppConfig(server=world.account_server, allow_plaintext=True, timeout=timeout)
    signalling = XmppSignalling(identity, XMPP_PASSWORD, config=XmppSignallingConfig(
        xmpp=xmpp, connect_timeout=timeout))
    peer = Peer(identity, Verifier([signalling.key_source], PinStore(None)),
                config=PeerConfig(host_addresses=(host.ip,)))
    await peer.start(sock=host.udp_socket())
    try:
        await signalling.start(peer)
        yield peer, signalling
    finally:
        await signalling.close()
        await peer.close()


@asynccontextmanager
async def open_xmpp_devices(world: LabWorld, devices: Sequence[tuple[DeviceIdentity, Host]],
                            timeout: float) -> AsyncIterator[list[tuple[Peer, XmppSignalling]]]:
    """:func:`open_xmpp_device` for each (identity, host), all logging in
    at once and closed at once."""
    stacks = [AsyncExitStack() for _ in devices]
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(stack.enter_async_context(
                open_xmpp_device(world, identity, host, timeout)))
                for stack, (identity, host) in zip(stacks, devices)]
        yield [task.result() for task in tasks]
    finally:
        closed = await asyncio.gather(*(stack.aclose() for stack in stacks),
                                      return_exceptions=True)
        for failure in closed:
            if failure is not None:
                logger.warning("closing an XMPP-signalled device: %r", failure)


# -- one system, measured --------------------------------------------------------------


@dataclass(frozen=True)
class Caller:
    """A device ready to call the TV (registered, or logged in)."""

    connect: Callable[[], Awaitable[Session]]
    started: float | None = None
    """``time.perf_counter()`` when the device began to start for this
    connection (its ``-cold`` figure counts from there); None when it was
    started beforehand."""


@dataclass(frozen=True, kw_only=True)
class DtxSystem:
    """One dtx system on one pair of hosts: ``a`` calls the TV on ``b``."""

    name: str
    a: Host
    b: Host
    expect: str
    """The path the session should end on: ``lan``, ``direct`` or ``relay``."""
    tv: Peer
    """The TV's device, accepting sessions."""
    caller: Callable[[int], AbstractAsyncContextManager[Caller]]
    """The device for connection ``i``, a fresh one (a new socket) each time."""
    extras: bool = True
    """Pings, the DATAGRAM echo, one-way throughput and bytes on the wire
    on the first session too, not only the stanza echo."""


async def session_figures(opts: Options, tag: str, system: DtxSystem, client: Session,
                          srv: Session, add: Callable[..., None]) -> None:
    """The round trips on one open session (and with ``system.extras``
    pings, the DATAGRAM echo, one-way throughput, CPU and bytes)."""
    n = opts.lab_rtt_samples
    step = opts.progress.step
    name = system.name
    path = f"path {client.path}"
    ropts = dataclasses.replace(opts, rtt_samples=n)
    step(f"{tag}: {name} stanza rtt x{n}")
    with counting(system.a, system.b, packets=True) as packets:
        add(name, Metric.RTT, await dtx_stanza_rtt(ropts, client, srv), note=path)
    add(name, Metric.PACKETS, [packets() / (n + warmup(ropts))], note=path)
    if system.extras:
        step(f"{tag}: {name} ping rtt x{n}")
        add(f"{name}-ping", Metric.RTT, await dtx_ping_rtt(ropts, client), note=path)
        step(f"{tag}: {name} datagram rtt x{n}")
        samples, lost = await dtx_datagram_rtt(ropts, client, srv)
        add(f"{name}-datagram", Metric.RTT, samples, lost=lost, note=path)
        step(f"{tag}: {name} one-way x{opts.lab_stanzas}")
        # A lossy relay path needs far more than one phase's usual bound.
        topts = dataclasses.replace(opts, stanzas=opts.lab_stanzas,
                                    timeout=max(opts.timeout, opts.lab_stanzas / 20))
        with counting(system.a, system.b) as sent:
            rate, cpu = await dtx_throughput(topts, client, srv)
            await client.wait_acknowledged(timeout=opts.timeout)
        note = f"{path}; both ends in one process"
        add(name, Metric.THROUGHPUT, [rate], note=note)
        add(name, Metric.CPU, [cpu], note=note)
        add(name, Metric.BYTES, [sent() / opts.lab_stanzas], note=note)
    if client.path != path.split()[-1]:
        logger.warning("%s moved from %s to %s during the run", name, path, client.path)


async def measure_system(opts: Options, run: int, scenario: str, system: DtxSystem,
                         results: list[Result]) -> list[Result]:
    """Every figure of ``system`` (module docs), appended to ``results``
    as each is measured (so a later failure keeps the figures already
    taken)."""
    tag = f"{scenario} run {run + 1}/{opts.runs}"

    def add(name: str, metric: Metric, samples: list[float], lost: int = 0,
            note: str = "") -> None:
        results.append(Result(scenario=scenario, system=name, metric=metric, run=run,
                              samples=tuple(samples), lost=lost, note=note))

    relay = system.expect == "relay"
    # A relay-only pair is watched past the quick punch attempts.
    settle = RELAY_SETTLE if relay else opts.timeout
    final = "direct" if relay else system.expect
    connects: list[float] = []
    colds: list[float] = []
    takeovers: list[float] = []
    sent_on: set[str] = set()
    paths: set[str] = set()
    opts.progress.step(f"{tag}: {system.name} connect x{opts.lab_connects}")
    for i in range(opts.lab_connects):
        async with system.caller(i) as caller:
            t1 = time.perf_counter()
            session = await caller.connect()
            session.send(sized_stanza(200, to=TV_JID, index=i))
            sent_on.add(session.path)
            async with asyncio.timeout(opts.timeout):
                srv = await system.tv.accept()
                await srv.receive()
            t2 = time.perf_counter()
            connects.append(t2 - t1)
            if caller.started is not None:
                colds.append(t2 - caller.started)
            if i == 0:
                # The figures on the final path: a relay-only pair is on
                # it already, and is watched while they are taken.
                if not relay:
                    await _wait_path(session, final, settle)
                await session_figures(opts, tag, system, session, srv, add)
            await _wait_path(session, final, t2 + settle - time.perf_counter())
            paths.add(session.path)
            took = session.direct_after()
            if took is not None and session.path != "relay":
                takeovers.append(took)
            await session.close(timeout=opts.timeout)
    pnote = (f"first stanza sent on the {'/'.join(sorted(sent_on))} path; "
             f"path at the end: {'/'.join(sorted(paths))}")
    add(system.name, Metric.CONNECT, connects, note=pnote)
    if colds:
        add(f"{system.name}-cold", Metric.CONNECT, colds, note=pnote)
    if takeovers:
        add(system.name, Metric.TAKEOVER, takeovers, note="session start to direct path")
    return results


async def _wait_path(session: Session, path: str, timeout: float) -> None:
    """Up to ``timeout`` seconds (none: a look) for ``session`` to run on ``path``."""
    try:
        await session.wait_path(path, timeout=max(0.0, timeout))
    except TimeoutError:
        pass


# -- the two ways of finding the TV ----------------------------------------------------


async def measure_dtx(world: LabWorld, opts: Options, run: int, scenario: str, system: str,
                      a: Host, b: Host, identity: DeviceIdentity, expect: str,
                      results: list[Result]) -> list[Result]:
    """:func:`measure_system` with both devices registered with the dtx
    rendezvous; each connection is a fresh device of ``identity`` (started,
    registered, then connecting by JID: its ``-cold`` figure)."""
    async with open_lab_peer(world, world.identities["tv"], b, listen=True) as tv:
        await tv.wait_registered(opts.timeout)

        @asynccontextmanager
        async def caller(index: int) -> AsyncIterator[Caller]:
            started = time.perf_counter()
            async with open_lab_peer(world, identity, a, listen=False) as rc:
                await rc.wait_registered(opts.timeout)
                yield Caller(lambda: rc.connect(TV_BARE, timeout=opts.timeout), started)

        return await measure_system(opts, run, scenario, DtxSystem(
            name=system, a=a, b=b, expect=expect, tv=tv, caller=caller), results)


async def measure_dtx_send(world: LabWorld, opts: Options, run: int, scenario: str,
                           system: str, a: Host, b: Host, identity: DeviceIdentity,
                           results: list[Result]) -> list[Result]:
    """A home-automation script's "pause": ``python -m dtx.cli send`` started
    in ``a`` (a new process: Python's start-up and dtx's imports count),
    registering with the rendezvous and connecting by JID to the TV in
    ``b``, registered beforehand; from the process start to the stanza at
    the TV, ``opts.lab_connects`` times. dtx's bytecode is compiled first,
    as a pip install leaves it (an editable checkout run with
    ``PYTHONDONTWRITEBYTECODE`` would otherwise compile every module of
    dtx at each start, ~100 ms here)."""
    tag = f"{scenario} run {run + 1}/{opts.runs}"
    compileall.compile_dir(str(Path(dtx.__file__).parent), quiet=1)
    key = world.folder / f"{system}.key"
    save_identity(identity, key)
    argv = [sys.executable, "-m", "dtx.cli", "send", str(key), "--to", TV_BARE,
            "--rendezvous", format_address(*world.rendezvous), "--vcards", str(world.vcards),
            "--no-pins", "--body", "pause", "--timeout", str(opts.timeout)]
    samples: list[float] = []
    loop = asyncio.get_running_loop()
    opts.progress.step(f"{tag}: {system} x{opts.lab_connects}")
    async with open_lab_peer(world, world.identities["tv"], b, listen=True) as tv:
        await tv.wait_registered(opts.timeout)
        for _ in range(opts.lab_connects):
            started = time.perf_counter()
            proc = a.popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
            try:
                async with asyncio.timeout(opts.timeout):
                    srv = await tv.accept()
                    await srv.receive()
                samples.append(time.perf_counter() - started)
                _, err = await loop.run_in_executor(None, proc.communicate, None,
                                                    opts.timeout)
                if proc.returncode != 0:
                    raise RuntimeError(f"dtx send exited {proc.returncode}: {err[-500:]}")
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(5)
    results.append(Result(scenario=scenario, system=system, metric=Metric.CONNECT, run=run,
                          samples=tuple(samples),
                          note="process start to the first stanza at the TV"))
    return results


async def measure_dtx_xmpp(world: LabWorld, opts: Options, run: int, scenario: str,
                           pairs: Sequence[Pair], callers: Mapping[str, Sequence[DeviceIdentity]],
                           results: list[Result]) -> list[Result]:
    """:func:`measure_system` for each of ``pairs`` (one TV: the same
    ``b`` in all), both devices logged in to the account's own XMPP
    server. The TV and every calling device (``callers[system]``, one
    identity per connection) log in together first and are left
    :data:`LOGIN_SETTLE` seconds, so each connect time starts at
    ``XmppSignalling.connect()`` on a device that has been logged in, with
    its TURN allocation, for a while. Only the stanza echo is measured on
    the session besides: the rest is the same dtx session as through the
    rendezvous.

    Run it in a thread inside a lab namespace (:func:`dtx.lab.ns.in_netns`):
    every device's XMPP connection leaves from there, while their UDP
    sockets are in their own hosts."""
    tag = f"{scenario} run {run + 1}/{opts.runs}"
    n = opts.lab_connects
    homes = {pair.b.name for pair in pairs}
    if len(homes) != 1:
        raise ValueError(f"one TV for every pair, not {sorted(homes)}")
    short = [p.system for p in pairs if len(callers[p.system]) < n]
    if short:
        raise ValueError(f"fewer callers than {n} connections: {short}")
    who = [(world.identities["tv"], pairs[0].b),
           *((identity, p.a) for p in pairs for identity in callers[p.system][:n])]
    opts.progress.step(f"{tag}: dtx over XMPP: logging in {len(who)} devices")
    async with open_xmpp_devices(world, who, opts.timeout) as opened:
        tv = opened[0][0]
        await asyncio.sleep(LOGIN_SETTLE)
        for k, pair in enumerate(pairs):
            devices = [sig for _, sig in opened[1 + k * n:1 + (k + 1) * n]]
            await guarded_async(opts, f"{tag}: {pair.system}", measure_system(
                opts, run, scenario, DtxSystem(
                    name=pair.system, a=pair.a, b=pair.b, expect=pair.expect, tv=tv,
                    caller=_logged_in(devices, opts.timeout), extras=False), results))
    return results


def _logged_in(devices: Sequence[XmppSignalling],
               timeout: float) -> Callable[[int], AbstractAsyncContextManager[Caller]]:
    """Connection ``i`` from ``devices[i]``, started beforehand."""
    @asynccontextmanager
    async def caller(index: int) -> AsyncIterator[Caller]:
        signalling = devices[index]
        yield Caller(lambda: signalling.connect(TV_JID, timeout=timeout))
    return caller
