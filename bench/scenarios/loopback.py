"""The loopback scenario: dtx beside its floors, all on 127.0.0.1.

Systems, measured in the same process and event loop, one after another:

* ``udp`` — a raw asyncio UDP echo; the floor any UDP transport stands on;
* ``aioquic`` — a bare aioquic stream echo (``aioquic.asyncio.connect`` /
  ``serve``, throwaway self-signed certificate made in memory, one
  bidirectional stream, fixed-size newline-ended messages); what dtx adds
  its XML stream, acks and key checks to;
* ``aioquic-flush`` — the same, one-way, calling ``transmit()`` after every
  message instead of once per event-loop turn;
* ``qh3`` — the ``aioquic`` echo on qh3, aioquic's fork with its QUIC core
  in Rust and the same asyncio API (one piece of code drives both:
  :class:`QuicPackage`); measured when qh3 is installed (the bench extra),
  left out with a warning and a note in the results when not;
* ``dtx`` — a dtx session: ``<message/>`` stanzas of the same size, echoed
  back by the other side as new ``<message/>`` stanzas;
* ``dtx-ping`` — XEP-0199 pings on the same session (answered by the core);
* ``dtx-datagram`` — stanzas echoed over the QUIC DATAGRAM channel;
* ``dtx-2proc`` — one-way stanzas/s with the receiving device in a process
  of its own, as two devices would be (each side gets a core; the figures
  above share one process, so sender and receiver share one core).

Every message is ``Options.message_bytes`` long on the wire (the encoded
stanza for dtx, the framed message for the others). Both ends run in this
process, so arrival times and send times share one clock.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import logging
import ssl
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Protocol, cast
from xml.etree.ElementTree import Element

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from dtx import stanza as st
from dtx.aio.peer import Peer, Session, open_peer
from dtx.identity import DeviceIdentity, generate_identity
from dtx.lab.prosody import self_signed_certificate
from dtx.proto.xmlstream import encode_stanza
from dtx.trust import PinStore, StaticKeys, Verifier

from .common import Metric, Options, Result

logger = logging.getLogger(__name__)

NAME = "loopback"
HOST = "127.0.0.1"
TV_JID = "tv@example.org/living-room"
REMOTE_JID = "remote@example.org/phone"
ALPN = "dtx-bench-echo"

ECHO = b"E"
"""First byte of a stream the bare QUIC server echoes."""
SINK = b"S"
"""First byte of a stream the bare QUIC server only counts."""


# -- messages and certificates --------------------------------------------------


def framed_message(size: int, kind: bytes = ECHO) -> bytes:
    """A ``size``-byte message: a kind byte, filler, a newline."""
    if size < 2:
        raise ValueError("messages need at least 2 bytes")
    return kind + b"x" * (size - 2) + b"\n"


def stanza_id(index: int) -> str:
    """The id of the ``index``-th test stanza; fixed width, so fixed size."""
    return f"m{index:09d}"


@functools.lru_cache(maxsize=16)
def _filler(size: int, to: str) -> str:
    """Body filler that makes a test stanza to ``to`` exactly ``size`` bytes.

    Computed once per (size, to): every test stanza has the same length
    (fixed-width index), so timed loops do not pay for sizing.
    """
    probe = st.message(f"{0:09d}:", to=to, id_=stanza_id(0))
    return "x" * max(0, size - len(encode_stanza(probe)))


def sized_stanza(size: int, *, to: str, index: int = 0) -> Element:
    """A ``<message/>`` with a body, ``size`` bytes once encoded.

    The body starts with ``index`` so echoes can be matched; when the
    attributes alone exceed ``size`` the stanza is simply as small as it
    can be.
    """
    return st.message(f"{index:09d}:" + _filler(size, to), to=to, id_=stanza_id(index))


def self_signed(host: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A throwaway certificate for the bare QUIC servers, made in memory."""
    cert, key = self_signed_certificate(host)
    return cert, key


def _trusting(*ids: DeviceIdentity) -> Verifier:
    keys: dict[str, list[bytes]] = {}
    for ident in ids:
        keys.setdefault(str(ident.jid.bare), []).append(ident.public_key)
    return Verifier([StaticKeys(keys)], PinStore(None))


def warmup(opts: Options) -> int:
    """Unrecorded round trips before each RTT series: a tenth, 10 to 100.

    The first exchanges on a fresh connection pay one-off costs (lazy
    imports, caches, congestion window growth) that are not the steady
    state an RTT percentile should describe; connect time covers setup.
    """
    return min(100, max(10, opts.rtt_samples // 10))


async def _yield() -> None:
    """Give the event loop one turn (not a wait: nothing is timed by it)."""
    await asyncio.sleep(0)


# -- raw UDP ------------------------------------------------------------------


class _UdpEcho(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.sent = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if self.transport is not None:
            self.transport.sendto(data, addr)
            self.sent += 1


class _UdpClient(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.waiter: asyncio.Future[bytes] | None = None

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(data)


async def udp_rtt(opts: Options) -> tuple[list[float], float]:
    """Sequential round trips of a raw UDP echo; and the datagrams both
    ends sent per round trip."""
    loop = asyncio.get_running_loop()
    server_t, echo = await loop.create_datagram_endpoint(_UdpEcho, local_addr=(HOST, 0))
    client_t, client = await loop.create_datagram_endpoint(
        _UdpClient, remote_addr=server_t.get_extra_info("sockname"))
    payload = framed_message(opts.message_bytes)
    samples: list[float] = []
    sent = 0
    try:
        for i in range(-warmup(opts), opts.rtt_samples):
            client.waiter = loop.create_future()
            start = time.perf_counter()
            client_t.sendto(payload)
            sent += 1
            async with asyncio.timeout(opts.timeout):
                await client.waiter
            if i >= 0:
                samples.append(time.perf_counter() - start)
    finally:
        client_t.close()
        server_t.close()
    return samples, (sent + echo.sent) / (warmup(opts) + opts.rtt_samples)


# -- bare QUIC: aioquic and qh3 --------------------------------------------------


QUIC_PACKAGES: tuple[str, ...] = ("aioquic", "qh3")
"""The QUIC packages measured bare, by import name (and system name): aioquic,
dtx's own QUIC, and qh3, its fork with the QUIC core in Rust (its
``QuicConnectionCore``) and the same asyncio API. The functions below are
one piece of code for both; a :class:`QuicPackage` says which one they drive."""

FLUSHED_QUIC_PACKAGES = frozenset({"aioquic"})
"""Also measured one-way calling ``transmit()`` after every message, as the
system ``<name>-flush`` (``aioquic-flush``)."""

OPTIONAL_QUIC_PACKAGES = frozenset({"qh3"})
"""Measured only when installed (the bench extra); left out, with a warning
and a note in the results, when not."""


@dataclass(frozen=True)
class QuicPackage:
    """A QUIC package with aioquic's asyncio API, as module objects.

    ``aio`` is its ``asyncio`` package (``connect``, ``serve``,
    ``QuicConnectionProtocol``), ``configuration`` its
    ``quic.configuration`` (``QuicConfiguration``), ``events`` its
    ``quic.events`` (``StreamDataReceived``), ``tls`` its ``tls`` (the PEM
    loaders: qh3 wants certificates and keys of its own types, so the
    server's are handed over as PEM to either). The echo protocols are made
    on the package's ``QuicConnectionProtocol`` by :func:`quic_package`.
    """

    name: str
    aio: ModuleType
    configuration: ModuleType
    events: ModuleType
    tls: ModuleType
    server_protocol: type[Any]
    client_protocol: type[Any]


class _Quic(Protocol):
    """What the echo uses of either package's ``QuicConnection``."""

    def get_next_available_stream_id(self, is_unidirectional: bool = False) -> int: ...

    def send_stream_data(self, stream_id: int, data: bytes,
                         end_stream: bool = False) -> None: ...


class _QuicProtocol(Protocol):
    """What the echo uses of either package's ``QuicConnectionProtocol``."""

    _quic: _Quic

    def transmit(self) -> None: ...


@dataclass
class _SinkState:
    """What the bare QUIC server saw, shared by all its connections."""

    target_bytes: int = 0
    received_bytes: int = 0
    last_arrival: float = 0.0
    done: asyncio.Event = field(default_factory=asyncio.Event)
    first_arrivals: list[float] = field(default_factory=list)
    first_arrival: asyncio.Event = field(default_factory=asyncio.Event)


class _EchoServer:
    """Echoes ``E`` streams; counts ``S`` streams into a :class:`_SinkState`.

    Put before a package's ``QuicConnectionProtocol`` (:func:`quic_package`),
    whose ``_quic`` and ``transmit()`` these are.
    """

    _quic: _Quic
    transmit: Callable[[], None]
    stream_data_received: type[Any]
    """The package's ``StreamDataReceived``."""

    def __init__(self, *args: Any, state: _SinkState, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._state = state
        self._modes: dict[int, bytes] = {}
        self._seen_data = False

    def quic_event_received(self, event: Any) -> None:
        if not isinstance(event, self.stream_data_received) or not event.data:
            return
        state = self._state
        if not self._seen_data:
            self._seen_data = True
            state.first_arrivals.append(time.perf_counter())
            state.first_arrival.set()
        mode = self._modes.setdefault(event.stream_id, event.data[:1])
        if mode == ECHO:
            self._quic.send_stream_data(event.stream_id, event.data)
            self.transmit()
        else:
            state.received_bytes += len(event.data)
            if state.target_bytes and state.received_bytes >= state.target_bytes:
                state.last_arrival = time.perf_counter()
                state.done.set()


class _EchoClient:
    """Collects echoed bytes and wakes a waiter once enough came back
    (before a package's ``QuicConnectionProtocol``, as :class:`_EchoServer`)."""

    _quic: _Quic
    transmit: Callable[[], None]
    stream_data_received: type[Any]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.expect = 0
        self.got = 0
        self.waiter: asyncio.Future[None] | None = None

    def quic_event_received(self, event: Any) -> None:
        if isinstance(event, self.stream_data_received):
            self.got += len(event.data)
            if self.waiter is not None and not self.waiter.done() and self.got >= self.expect:
                self.waiter.set_result(None)


@functools.cache
def quic_package(name: str) -> QuicPackage:
    """QUIC package ``name`` (one of :data:`QUIC_PACKAGES`), imported, with
    the echo protocols made on its ``QuicConnectionProtocol``; ImportError
    when it is not installed."""
    aio = importlib.import_module(f"{name}.asyncio")
    events = importlib.import_module(f"{name}.quic.events")
    base = aio.QuicConnectionProtocol
    extra = {"stream_data_received": events.StreamDataReceived}
    return QuicPackage(
        name=name, aio=aio,
        configuration=importlib.import_module(f"{name}.quic.configuration"),
        events=events, tls=importlib.import_module(f"{name}.tls"),
        server_protocol=type("_EchoServerProtocol", (_EchoServer, base), extra),
        client_protocol=type("_EchoClientProtocol", (_EchoClient, base), extra))


def quic_missing(name: str) -> str | None:
    """Why QUIC package ``name`` cannot be measured, or None."""
    try:
        quic_package(name)
    except ImportError as exc:
        return f"{name} is not installed (the bench extra: pip install -e '.[bench]'; {exc})"
    return None


def left_out() -> dict[str, str]:
    """The systems this scenario leaves out here, each with the reason
    (``python -m bench`` notes them in the results)."""
    return {name: reason for name in sorted(OPTIONAL_QUIC_PACKAGES)
            if (reason := quic_missing(name)) is not None}


class _QuicServer:
    """A package's ``QuicServer`` on :data:`HOST`, and what it saw."""

    def __init__(self, package: QuicPackage, server: Any, state: _SinkState) -> None:
        self.package = package
        self.server = server
        self.state = state

    @property
    def port(self) -> int:
        transport = self.server._transport
        if transport is None:
            raise RuntimeError(f"{self.package.name} server closed")
        return int(transport.get_extra_info("sockname")[1])

    def connect(self, *, echo: bool = False) -> AbstractAsyncContextManager[Any]:
        """A new client connection to this server (``echo``: with an
        :class:`_EchoClient` protocol)."""
        pkg = self.package
        config = pkg.configuration.QuicConfiguration(is_client=True, alpn_protocols=[ALPN])
        config.verify_mode = ssl.CERT_NONE  # throwaway certificate; loopback only
        kwargs: dict[str, Any] = {"configuration": config}
        if echo:
            kwargs["create_protocol"] = pkg.client_protocol
        cm: AbstractAsyncContextManager[Any] = pkg.aio.connect(HOST, self.port, **kwargs)
        return cm


async def _start_quic_server(package: QuicPackage) -> _QuicServer:
    cert, key = self_signed("localhost")
    config = package.configuration.QuicConfiguration(is_client=False, alpn_protocols=[ALPN])
    config.certificate = package.tls.load_pem_x509_certificates(
        cert.public_bytes(serialization.Encoding.PEM))[0]
    config.private_key = package.tls.load_pem_private_key(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()), None)
    state = _SinkState()

    def factory(*args: Any, **kwargs: Any) -> Any:
        return package.server_protocol(*args, state=state, **kwargs)

    server = await package.aio.serve(HOST, 0, configuration=config, create_protocol=factory)
    return _QuicServer(package, server, state)


async def quic_rtt(opts: Options, server: _QuicServer) -> list[float]:
    """Sequential round trips on one bidirectional stream."""
    loop = asyncio.get_running_loop()
    payload = framed_message(opts.message_bytes, ECHO)
    samples: list[float] = []
    async with server.connect(echo=True) as proto:
        client = cast(_EchoClient, proto)
        stream = client._quic.get_next_available_stream_id()
        for i in range(-warmup(opts), opts.rtt_samples):
            client.expect += len(payload)
            client.waiter = loop.create_future()
            start = time.perf_counter()
            client._quic.send_stream_data(stream, payload)
            client.transmit()
            async with asyncio.timeout(opts.timeout):
                await client.waiter
            if i >= 0:
                samples.append(time.perf_counter() - start)
    return samples


async def quic_connect(opts: Options, server: _QuicServer) -> list[float]:
    """From ``connect()`` to the first message's arrival, new connection each."""
    samples: list[float] = []
    payload = framed_message(opts.message_bytes, SINK)
    state = server.state
    for _ in range(opts.connects):
        state.first_arrival.clear()
        count = len(state.first_arrivals)
        start = time.perf_counter()
        async with server.connect() as proto:
            client = cast(_QuicProtocol, proto)
            stream = client._quic.get_next_available_stream_id()
            client._quic.send_stream_data(stream, payload)
            client.transmit()
            async with asyncio.timeout(opts.timeout):
                while len(state.first_arrivals) == count:
                    await state.first_arrival.wait()
                    state.first_arrival.clear()
            samples.append(state.first_arrivals[count] - start)
    return samples


async def quic_throughput(opts: Options, server: _QuicServer, *,
                          flush_each: bool) -> tuple[float, float]:
    """One-way messages/s and CPU seconds per message on one stream."""
    payload = framed_message(opts.message_bytes, SINK)
    n = opts.stanzas
    state = server.state
    async with server.connect() as proto:
        client = cast(_QuicProtocol, proto)
        quic = client._quic
        stream = quic.get_next_available_stream_id()
        state.received_bytes = 0
        state.target_bytes = n * len(payload)
        state.done.clear()
        cpu0 = time.process_time()
        start = time.perf_counter()
        for i in range(n):
            quic.send_stream_data(stream, payload)
            if flush_each:
                client.transmit()
            if (i + 1) % opts.burst == 0:
                if not flush_each:
                    client.transmit()
                await _yield()
        client.transmit()
        async with asyncio.timeout(opts.timeout):
            await state.done.wait()
        cpu = time.process_time() - cpu0
        elapsed = state.last_arrival - start
        state.target_bytes = 0
    return n / elapsed, cpu / n


# -- dtx ----------------------------------------------------------------------


@dataclass
class _DtxPair:
    tv_id: DeviceIdentity
    remote_id: DeviceIdentity
    tv: Peer
    verifier: Verifier


async def _echo_stanzas(srv: Session, count: int) -> None:
    for _ in range(count):
        m = await srv.receive()
        srv.send(st.message(st.body_of(m), to=m.get("from"), id_=m.get("id")))


async def dtx_stanza_rtt(opts: Options, client: Session, srv: Session) -> list[float]:
    """Send a message, wait for the echoed message; sequentially."""
    warm = warmup(opts)
    echo = asyncio.create_task(_echo_stanzas(srv, warm + opts.rtt_samples))
    samples: list[float] = []
    try:
        for i in range(-warm, opts.rtt_samples):
            el = sized_stanza(opts.message_bytes, to=TV_JID, index=i)
            start = time.perf_counter()
            client.send(el)
            async with asyncio.timeout(opts.timeout):
                await client.receive()
            if i >= 0:
                samples.append(time.perf_counter() - start)
        async with asyncio.timeout(opts.timeout):
            await echo
    finally:
        echo.cancel()
    return samples


async def dtx_ping_rtt(opts: Options, client: Session) -> list[float]:
    """XEP-0199 pings, timed here with the same clock as the others."""
    samples: list[float] = []
    for i in range(-warmup(opts), opts.rtt_samples):
        start = time.perf_counter()
        await client.ping(timeout=opts.timeout)
        if i >= 0:
            samples.append(time.perf_counter() - start)
    return samples


async def _echo_datagrams(srv: Session) -> None:
    while True:
        m = await srv.receive_datagram()
        srv.send_datagram(st.message(st.body_of(m), to=m.get("from"), id_=m.get("id")))


async def dtx_datagram_rtt(opts: Options, client: Session,
                           srv: Session) -> tuple[list[float], int]:
    """Stanzas echoed over DATAGRAM frames; returns samples and losses.

    A datagram may be lost, so each round trip waits at most a second;
    a late answer to an earlier probe is recognised by its id and skipped.
    """
    echo = asyncio.create_task(_echo_datagrams(srv))
    samples: list[float] = []
    lost = 0
    try:
        for i in range(-warmup(opts), opts.rtt_samples):
            el = sized_stanza(opts.message_bytes, to=TV_JID, index=i)
            want = stanza_id(i)
            start = time.perf_counter()
            client.send_datagram(el)
            try:
                async with asyncio.timeout(1.0):
                    while (await client.receive_datagram()).get("id") != want:
                        pass
            except TimeoutError:
                lost += 1 if i >= 0 else 0
                continue
            if i >= 0:
                samples.append(time.perf_counter() - start)
    finally:
        echo.cancel()
    return samples, lost


async def dtx_throughput(opts: Options, client: Session,
                         srv: Session) -> tuple[float, float]:
    """One-way stanzas/s, one ``send()`` per stanza; and CPU s per stanza."""
    n = opts.stanzas
    done: asyncio.Future[float] = asyncio.get_running_loop().create_future()

    async def sink() -> None:
        got = 0
        while got < n:
            await srv.receive()
            got += 1
            while got < n and srv.receive_nowait() is not None:
                got += 1
        done.set_result(time.perf_counter())

    receiver = asyncio.create_task(sink())
    try:
        cpu0 = time.process_time()
        start = time.perf_counter()
        for i in range(n):
            client.send(sized_stanza(opts.message_bytes, to=TV_JID, index=i))
            if (i + 1) % opts.burst == 0:
                await _yield()
        async with asyncio.timeout(opts.timeout):
            end = await done
        cpu = time.process_time() - cpu0
    finally:
        receiver.cancel()
    return n / (end - start), cpu / n


def _receiver_process(seeds: tuple[bytes, bytes], n: int, timeout: float,
                      conn: Any) -> None:
    """The TV in its own process: accept one session, take ``n`` stanzas,
    report when the last one arrived (perf_counter is system-wide)."""
    tv_id = DeviceIdentity.from_private_bytes(TV_JID, seeds[0])
    remote_id = DeviceIdentity.from_private_bytes(REMOTE_JID, seeds[1])

    async def main() -> None:
        async with open_peer(tv_id, _trusting(tv_id, remote_id), host=HOST) as tv:
            conn.send(tv.address)
            async with asyncio.timeout(timeout):
                srv = await tv.accept()
                got = 0
                while got < n:
                    await srv.receive()
                    got += 1
                    while got < n and srv.receive_nowait() is not None:
                        got += 1
                conn.send(time.perf_counter())
                await srv.wait_closed()

    asyncio.run(main())


async def dtx_throughput_two_processes(opts: Options) -> tuple[float, float]:
    """One-way stanzas/s with the receiver in another process; and the
    sender's CPU s per stanza."""
    import multiprocessing

    seeds = (bytes(range(32)), bytes(range(32, 64)))
    remote_id = DeviceIdentity.from_private_bytes(REMOTE_JID, seeds[1])
    tv_id = DeviceIdentity.from_private_bytes(TV_JID, seeds[0])
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_receiver_process,
                       args=(seeds, opts.stanzas, opts.timeout, child), daemon=True)
    proc.start()
    loop = asyncio.get_running_loop()
    try:
        ready = await loop.run_in_executor(None, parent.poll, opts.timeout)
        if not ready:
            raise TimeoutError("the receiving process did not start")
        address = parent.recv()
        async with open_peer(remote_id, _trusting(tv_id, remote_id), host=HOST,
                             listen=False) as rc:
            client = await rc.connect(TV_JID, address, timeout=opts.timeout)
            await client.ping(timeout=opts.timeout)
            cpu0 = time.process_time()
            start = time.perf_counter()
            for i in range(opts.stanzas):
                client.send(sized_stanza(opts.message_bytes, to=TV_JID, index=i))
                if (i + 1) % opts.burst == 0:
                    await _yield()
            if not await loop.run_in_executor(None, parent.poll, opts.timeout):
                raise TimeoutError("the receiving process did not get every stanza")
            end = float(parent.recv())
            cpu = time.process_time() - cpu0
            await client.close(timeout=opts.timeout)
    finally:
        proc.join(opts.timeout)
        if proc.is_alive():
            proc.kill()
    return opts.stanzas / (end - start), cpu / opts.stanzas


async def dtx_connect(opts: Options, pair: _DtxPair) -> list[float]:
    """From ``Peer.connect()`` to the first stanza received, new peer each time.

    The listening side records the arrival time; the connecting device gets
    a fresh socket each time, so every sample is a full handshake.
    """
    samples: list[float] = []
    for i in range(opts.connects):
        async with open_peer(pair.remote_id, pair.verifier, host=HOST, listen=False) as rc:
            start = time.perf_counter()
            s = await rc.connect(TV_JID, pair.tv.address, timeout=opts.timeout)
            s.send(sized_stanza(opts.message_bytes, to=TV_JID, index=i))
            async with asyncio.timeout(opts.timeout):
                srv = await pair.tv.accept()
                await srv.receive()
                samples.append(time.perf_counter() - start)
            await s.close(timeout=opts.timeout)
    return samples


# -- the scenario -------------------------------------------------------------


async def _run_once(opts: Options, run: int,
                    packages: tuple[QuicPackage, ...]) -> list[Result]:
    results: list[Result] = []
    step = opts.progress.step
    tag = f"{NAME} run {run + 1}/{opts.runs}"

    def add(system: str, metric: Metric, samples: list[float], lost: int = 0,
            note: str = "") -> None:
        results.append(Result(scenario=NAME, system=system, metric=metric, run=run,
                              samples=tuple(samples), lost=lost, note=note))

    step(f"{tag}: udp rtt x{opts.rtt_samples}")
    samples, packets = await udp_rtt(opts)
    add("udp", Metric.RTT, samples)
    add("udp", Metric.PACKETS, [packets])

    for package in packages:
        name = package.name
        step(f"{tag}: {name} rtt x{opts.rtt_samples}")
        server = await _start_quic_server(package)
        try:
            add(name, Metric.RTT, await quic_rtt(opts, server))
            step(f"{tag}: {name} connect x{opts.connects}")
            add(name, Metric.CONNECT, await quic_connect(opts, server))
            for flush in (False, True) if name in FLUSHED_QUIC_PACKAGES else (False,):
                system = f"{name}-flush" if flush else name
                step(f"{tag}: {system} one-way x{opts.stanzas}")
                rate, cpu = await quic_throughput(opts, server, flush_each=flush)
                note = "transmit() after every message" if flush else \
                    f"transmit() every {opts.burst} messages"
                add(system, Metric.THROUGHPUT, [rate], note=note)
                add(system, Metric.CPU, [cpu], note=note)
        finally:
            server.server.close()

    tv_id = generate_identity(TV_JID)
    remote_id = generate_identity(REMOTE_JID)
    verifier = _trusting(tv_id, remote_id)
    async with open_peer(tv_id, verifier, host=HOST) as tv, \
            open_peer(remote_id, verifier, host=HOST, listen=False) as rc:
        pair = _DtxPair(tv_id, remote_id, tv, verifier)
        client = await rc.connect(TV_JID, tv.address, timeout=opts.timeout)
        async with asyncio.timeout(opts.timeout):
            srv = await tv.accept()
        exchanges = warmup(opts) + opts.rtt_samples

        def sent() -> int:
            return tv.statistics().packets_sent + rc.statistics().packets_sent

        step(f"{tag}: dtx stanza rtt x{opts.rtt_samples}")
        before = sent()
        add("dtx", Metric.RTT, await dtx_stanza_rtt(opts, client, srv))
        add("dtx", Metric.PACKETS, [(sent() - before) / exchanges])
        step(f"{tag}: dtx ping rtt x{opts.rtt_samples}")
        before = sent()
        add("dtx-ping", Metric.RTT, await dtx_ping_rtt(opts, client))
        add("dtx-ping", Metric.PACKETS, [(sent() - before) / exchanges])
        step(f"{tag}: dtx datagram rtt x{opts.rtt_samples}")
        before = sent()
        samples, lost = await dtx_datagram_rtt(opts, client, srv)
        add("dtx-datagram", Metric.RTT, samples, lost=lost)
        add("dtx-datagram", Metric.PACKETS, [(sent() - before) / exchanges])
        step(f"{tag}: dtx one-way x{opts.stanzas}")
        rate, cpu = await dtx_throughput(opts, client, srv)
        note = f"one send() per stanza, event loop turn every {opts.burst}"
        add("dtx", Metric.THROUGHPUT, [rate], note=note)
        add("dtx", Metric.CPU, [cpu], note=note)
        await client.close(timeout=opts.timeout)
        step(f"{tag}: dtx connect x{opts.connects}")
        add("dtx", Metric.CONNECT, await dtx_connect(opts, pair))
    step(f"{tag}: dtx one-way, receiver in its own process x{opts.stanzas}")
    rate, cpu = await dtx_throughput_two_processes(opts)
    note = "receiver in another process; CPU is the sender's"
    add("dtx-2proc", Metric.THROUGHPUT, [rate], note=note)
    add("dtx-2proc", Metric.CPU, [cpu], note=note)
    return results


def run(opts: Options) -> list[Result]:
    """Measure every loopback system ``opts.runs`` times (but those of
    :func:`left_out`, with a warning)."""
    missing = left_out()
    for name, reason in missing.items():
        logger.warning("scenario %s without %s: %s", NAME, name, reason)
        opts.progress.step(f"{NAME}: {name} left out: {reason}"[:300])
    packages = tuple(quic_package(name) for name in QUIC_PACKAGES if name not in missing)
    results: list[Result] = []
    for i in range(opts.runs):
        results.extend(asyncio.run(_run_once(opts, i, packages)))
    return results


SYSTEMS: tuple[str, ...] = (
    "udp", "aioquic", "aioquic-flush", "qh3", "dtx", "dtx-ping", "dtx-datagram", "dtx-2proc",
)
"""Every system this scenario reports, in display order."""

DESCRIPTIONS: dict[str, str] = {
    "udp": "raw asyncio UDP echo (the floor)",
    "aioquic": "bare aioquic, one bidirectional stream",
    "aioquic-flush": "bare aioquic, transmit() after every message",
    "qh3": "bare qh3 (aioquic's fork, QUIC core in Rust), one bidirectional stream",
    "dtx": "dtx session, `<message/>` stanzas",
    "dtx-ping": "dtx session, XEP-0199 ping",
    "dtx-datagram": "dtx DATAGRAM channel, stanza echo",
    "dtx-2proc": "dtx session, receiving device in its own process",
}

__all__ = ["NAME", "SYSTEMS", "DESCRIPTIONS", "QUIC_PACKAGES", "QuicPackage", "run", "left_out",
           "quic_package", "quic_missing", "framed_message", "sized_stanza", "stanza_id",
           "self_signed"]
