"""What the NAT-lab scenarios share: the lab, its servers, the floor, the
alternatives.

One lab per scenario (``Lab(wan=...)``) holds a server host ``rdv``
(the rendezvous, Prosody and coturn; in ``wan``, also the account's own
XMPP server with its TURN server, for dtx signalled through XMPP), two
port-restricted-cone homes ``a`` and ``b`` (a punchable pair) and a
symmetric home ``c`` (with ``b``, a relay-only pair); the ``lan`` scenario
adds a home with two hosts. dtx devices (:mod:`bench.scenarios.lab_dtx`)
and the raw UDP floor run in this process with sockets inside the lab's
namespaces, measured one round trip at a time; the XMPP and WebRTC
alternatives run as worker processes (:mod:`bench.lab_worker`), one per
end, so neither shares a core with its peer.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import os
import queue
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from dtx.errors import DecodeError
from dtx.identity import DeviceIdentity, generate_identity, save_identity
from dtx.lab import Lab, ns
from dtx.lab.coturn import CoturnServer
from dtx.lab.prosody import NO_NAGLE, ProsodyServer, TurnExternal
from dtx.lab.topology import Host
from dtx.wire.stun import binding_request, decode_stun
from dtx.xmpp.client import XmppConfig, open_xmpp_client

from .common import Metric, Options, Result

from dtx.lab.scene import RDV_PORT, write_vcards
from dtx.lab.scene import start_rendezvous as start_lab_rendezvous

logger = logging.getLogger(__name__)

PROSODY_PORT = 5222
TURN_PORT = 3490
"""coturn's port (the rendezvous holds 3478 and its RFC 5780 port 3479)."""
TURN_USER = "bench"
TURN_PASSWORD = "bench-turn"
XMPP_PASSWORD = "bench-xmpp"
DOMAIN = "example.org"
TV_JID = "tv@example.org/living-room"
TV_BARE = "tv@example.org"
ACCOUNT_PORT = 5223
"""Prosody for dtx's XMPP signalling (:func:`start_account_server`), beside
the plain one of the ``xmpp`` systems on :data:`PROSODY_PORT`."""
ACCOUNT_TURN_PORT = 3491
"""The coturn that Prosody on :data:`ACCOUNT_PORT` hands out by XEP-0215."""
ACCOUNT_TURN_SECRET = "bench-turn-secret"
READY_TIMEOUT = 20.0
PLUGIN = "xmpp+dtx"
"""The systems of the slixmpp plugin (:class:`PluginDevices`): ``xmpp+dtx-<path>``;
``--skip`` leaves them out."""
ROOT = Path(__file__).resolve().parents[2]


def alternatives_missing() -> str | None:
    """Why the XMPP / WebRTC alternatives cannot run, or None."""
    for tool, package in (("prosody", "prosody"), ("prosodyctl", "prosody"),
                          ("turnserver", "coturn")):
        if shutil.which(tool) is None:
            return f"needs the {tool} command (Debian package {package}; run scripts/setup)"
    try:
        importlib.import_module("aiortc")
    except ImportError:
        return "needs aiortc (the bench extra: pip install -e '.[bench]')"
    return None


# -- processes ------------------------------------------------------------------


class Worker:
    """A :mod:`bench.lab_worker` process in a lab host: JSON lines both ways."""

    def __init__(self, host: Host, args: list[str], timeout: float) -> None:
        self.timeout = timeout
        self.command = args[0]
        self.proc: subprocess.Popen[str] = host.popen(
            [sys.executable, "-m", "bench.lab_worker", *args], cwd=ROOT,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self._err: list[str] = []
        assert self.proc.stderr is not None
        self._reader = threading.Thread(target=self._collect, args=(self.proc.stderr,),
                                        daemon=True)
        self._reader.start()
        self._events: queue.Queue[str | None] = queue.Queue()
        assert self.proc.stdout is not None
        threading.Thread(target=self._lines, args=(self.proc.stdout,), daemon=True).start()

    def _collect(self, stream: IO[str]) -> None:
        for line in stream:
            if len(self._err) < 200:
                self._err.append(line)

    def _lines(self, stream: IO[str]) -> None:
        for line in stream:
            self._events.put(line)
        self._events.put(None)

    def expect(self, event: str) -> dict[str, Any]:
        """The next event line, which must be ``event``."""
        try:
            line = self._events.get(timeout=self.timeout)
        except queue.Empty:
            line = None
        if line is not None:
            msg: dict[str, Any] = json.loads(line)
            if msg.get("event") != event:
                raise RuntimeError(f"worker sent {msg.get('event')!r}, not {event!r}")
            return msg
        try:
            self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            pass
        self._reader.join(timeout=2)
        raise RuntimeError(f"worker {self.command} gave no {event!r} "
                           f"(exit status {self.proc.poll()}): " + "".join(self._err)[-2000:])

    def send(self, **fields: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(fields) + "\n")
        self.proc.stdin.flush()

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send(command="stop")
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(timeout=10)


def wire_bytes(*hosts: Host, packets: bool = False) -> int:
    """Bytes (or, with ``packets``, packets) sent by ``hosts`` on their lab
    interfaces (all but ``lo``), from each namespace's ``/proc/net/dev``: IP
    and UDP/TCP headers included, as on a wire."""
    total = 0
    for host in hosts:
        text = host.run(["cat", "/proc/net/dev"], check=True).stdout
        for line in text.splitlines()[2:]:
            name, _, rest = line.partition(":")
            if name.strip() == "lo":
                continue
            cols = rest.split()
            total += int(cols[9 if packets else 8])  # transmit packets, bytes
    return total


@contextmanager
def counting(*hosts: Host, packets: bool = False) -> Iterator[Callable[[], int]]:
    """Bytes (or packets) the hosts sent on the wire inside the block."""
    before = wire_bytes(*hosts, packets=packets)
    box = [0]
    yield lambda: box[0]
    box[0] = wire_bytes(*hosts, packets=packets) - before


# -- the servers ------------------------------------------------------------------


def start_rendezvous(server: Host, vcards: Path, *, mapping_check: bool = False) -> None:
    """The rendezvous on the server host; without its NAT mapping check
    unless ``mapping_check`` (without it, no birthday search starts, and
    the symmetric home ``c`` with ``b`` stays a relay-only pair)."""
    start_lab_rendezvous(server, vcards, *([] if mapping_check else ["--no-mapping-port"]),
                         listen=(server.ip, RDV_PORT), cwd=ROOT)


def _lua(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def start_prosody(server: Host, folder: Path, users: list[str], *,
                  nagle: bool) -> tuple[str, int]:
    """Prosody (client connections only, no TLS) on the server host;
    returns its address. Accounts ``users`` get :data:`XMPP_PASSWORD`;
    ``nagle`` as :attr:`ProsodyServer.nagle`."""
    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True, mode=0o700)
    cfg = folder / "prosody.cfg.lua"
    cfg.write_text("\n".join([
        "run_as_root = true",
        f"data_path = {_lua(str(data))}",
        f"pidfile = {_lua(str(folder / 'prosody.pid'))}",
        f"log = {{ warn = {_lua(str(folder / 'prosody.log'))} }}",
        f"interfaces = {{ {_lua(server.ip)} }}",
        f"c2s_ports = {{ {PROSODY_PORT} }}",
        "c2s_direct_tls_ports = { }", "legacy_ssl_ports = { }", "s2s_ports = { }",
        "component_ports = { }", "http_ports = { }", "https_ports = { }",
        'modules_disabled = { "s2s" }',
        'modules_enabled = { "roster"; "saslauth"; "disco"; "ping" }',
        'authentication = "internal_plain"', 'storage = "internal"',
        "allow_registration = false", "use_libevent = false",
        f"certificates = {_lua(str(folder))}",
        "c2s_require_encryption = false", "allow_unencrypted_plain_auth = true",
        *(() if nagle else (NO_NAGLE,)),
        f"VirtualHost {_lua(DOMAIN)}", "",
    ]), encoding="utf-8")
    for user in users:
        subprocess.run(["prosodyctl", "--config", str(cfg), "register", user, DOMAIN,
                        XMPP_PASSWORD], stdin=subprocess.DEVNULL, capture_output=True,
                       timeout=30, check=True)
    server.popen(["prosody", "--config", str(cfg), "-F"], stdin=subprocess.DEVNULL,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        probe = server.tcp_socket()
        probe.settimeout(1.0)
        try:
            probe.connect((server.ip, PROSODY_PORT))
            return (server.ip, PROSODY_PORT)
        except OSError:
            # Polling a port that is not open yet: nothing to await on.
            time.sleep(0.1)
        finally:
            probe.close()
    raise RuntimeError("prosody did not listen: " + (folder / "prosody.log").read_text()[-2000:])


def start_turn(server: Host, folder: Path) -> tuple[str, int]:
    """A coturn instance of our own (throwaway config, no service) on the
    server host; returns its address once it answers a STUN request."""
    conf = folder / "turnserver.conf"
    conf.write_text("\n".join([
        f"listening-ip={server.ip}", f"relay-ip={server.ip}", f"listening-port={TURN_PORT}",
        "min-port=50000", "max-port=50999", "lt-cred-mech", f"user={TURN_USER}:{TURN_PASSWORD}",
        f"realm={DOMAIN}", "fingerprint", "no-tls", "no-dtls", "no-cli", "no-rfc5780",
        "no-stun-backward-compatibility", f"pidfile={folder / 'turnserver.pid'}",
        "log-file=stdout", "simple-log", "allow-loopback-peers", "",
    ]), encoding="utf-8")
    server.popen(["turnserver", "-c", str(conf)],
                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sock = server.udp_socket()
    sock.settimeout(0.2)
    deadline = time.monotonic() + READY_TIMEOUT
    try:
        for i in range(1000):
            sock.sendto(binding_request(i.to_bytes(12, "big")), (server.ip, TURN_PORT))
            try:
                sock.recvfrom(2048)
                return (server.ip, TURN_PORT)
            except OSError:
                pass
            if time.monotonic() > deadline:
                break
    finally:
        sock.close()
    raise RuntimeError("coturn did not answer STUN")


def start_account_server(server: Host, folder: Path, devices: Sequence[DeviceIdentity], *,
                         nagle: bool) -> tuple[str, int]:
    """The account's own XMPP server as dtx's signalling needs it, with
    the lab helpers: Prosody as Debian ships it (PEP, vCard4) handing out
    STUN and TURN by XEP-0215 (``mod_turn_external``) on
    :data:`ACCOUNT_PORT`, and a coturn beside it on
    :data:`ACCOUNT_TURN_PORT` that checks the credentials Prosody mints
    with the secret both share. The account of ``devices`` (one account)
    is registered with :data:`XMPP_PASSWORD` and their keys published in
    its vCard; ``nagle`` as :attr:`ProsodyServer.nagle`. Returns
    Prosody's address."""
    accounts = {d.jid.bare for d in devices}
    if len(accounts) != 1:
        raise ValueError(f"the devices of one account, not {sorted(map(str, accounts))}")
    account = accounts.pop()
    coturn = CoturnServer(ACCOUNT_TURN_SECRET, realm=DOMAIN, host=server, port=ACCOUNT_TURN_PORT,
                          folder=str(folder / "turn"),
                          extra_args=("--min-port", "51000", "--max-port", "51999"))
    coturn.start()
    prosody = ProsodyServer("vcard4", host=server, folder=str(folder / "prosody"),
                            port=ACCOUNT_PORT, nagle=nagle,
                            turn=TurnExternal(secret=ACCOUNT_TURN_SECRET, host=server.ip,
                                              port=coturn.port))
    prosody.start()
    prosody.register(str(account.local), XMPP_PASSWORD)
    config = XmppConfig(server=prosody.address(), allow_plaintext=True, timeout=READY_TIMEOUT)

    async def publish() -> None:
        async with open_xmpp_client(account.full, XMPP_PASSWORD, config=config) as client:
            for device in devices:
                await client.publish_key(device.public_key)

    ns.in_netns(server.netns, lambda: asyncio.run(publish()))
    return prosody.address()


# -- the lab with its servers ---------------------------------------------------


@dataclass
class LabWorld:
    """A lab that is up, with its servers started."""

    lab: Lab
    server: Host
    folder: Path
    vcards: Path
    rendezvous: tuple[str, int]
    identities: dict[str, DeviceIdentity] = field(default_factory=dict)
    prosody: tuple[str, int] | None = None
    turn: tuple[str, int] | None = None
    account_server: tuple[str, int] | None = None
    """The account's own XMPP server (:func:`start_account_server`), for
    dtx signalled through it."""


# -- raw UDP: the floor -------------------------------------------------------------


class _Echo(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.transport is not None and data[:1] == b"E":
            self.transport.sendto(data, addr)


class _Client(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.queue.put_nowait((data, addr))


async def stun_mapped(sock: socket.socket, server: tuple[str, int]) -> tuple[str, int]:
    """The public address of ``sock`` as the rendezvous's STUN sees it."""
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    for attempt in range(10):
        txid = os.urandom(12)
        await loop.sock_sendto(sock, binding_request(txid), server)
        try:
            async with asyncio.timeout(0.5):
                while True:
                    data, _ = await loop.sock_recvfrom(sock, 2048)
                    try:
                        msg = decode_stun(data)
                    except DecodeError:
                        continue
                    mapped = msg.reflexive_address
                    if msg.transaction_id == txid and mapped is not None:
                        return (str(mapped[0]), int(mapped[1]))
        except TimeoutError:
            logger.debug("STUN attempt %d unanswered", attempt)
    raise RuntimeError("no STUN answer from the rendezvous")


class _Relay(asyncio.DatagramProtocol):
    """A bare UDP forwarder: the first two sources are paired; every
    datagram from one goes to the other. The floor of any relay path."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.ends: list[tuple[str, int]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if addr not in self.ends and len(self.ends) < 2:
            self.ends.append(addr)
        if len(self.ends) == 2 and addr in self.ends and self.transport is not None:
            other = self.ends[1] if addr == self.ends[0] else self.ends[0]
            if data[:1] != b"H":
                self.transport.sendto(data, other)


def _warmup(count: int) -> int:
    return max(3, count // 10)


async def _rtt_loop(client: _Client, transport: asyncio.DatagramTransport,
                    dest: tuple[str, int], count: int, size: int) -> tuple[list[float], int]:
    samples: list[float] = []
    lost = 0
    for i in range(-_warmup(count), count):
        tag = f"E{i:09d}".encode()
        payload = tag + b"x" * max(0, size - len(tag))
        start = time.perf_counter()
        transport.sendto(payload, dest)
        try:
            async with asyncio.timeout(1.0):
                while (await client.queue.get())[0][:10] != tag:
                    pass
        except TimeoutError:
            lost += 1 if i >= 0 else 0
            continue
        if i >= 0:
            samples.append(time.perf_counter() - start)
    return samples, lost


async def udp_rtt(world: LabWorld, a: Host, b: Host, *, relay: bool, count: int,
                  size: int, lan: bool = False,
                  packets: list[float] | None = None) -> tuple[list[float], int]:
    """Raw UDP echo between ``a`` and ``b``: punched through both NATs
    (each learns its public address by STUN, then both send), through a
    bare forwarder on the server host, or (``lan``) straight to the LAN
    address. ``packets`` gets the packets both hosts sent per round trip
    appended (warm-up included, the set-up's not counted)."""
    loop = asyncio.get_running_loop()
    sa, sb = a.udp_socket(), b.udp_socket()
    closers: list[asyncio.BaseTransport] = []
    try:
        if relay:
            rsock = world.server.udp_socket(bind_port=RDV_PORT + 20, bind_ip=world.server.ip)
            rt, _ = await loop.create_datagram_endpoint(_Relay, sock=rsock)
            closers.append(rt)
            target_a = target_b = (world.server.ip, RDV_PORT + 20)
        elif lan:
            target_a, target_b = (b.ip, sb.getsockname()[1]), (a.ip, sa.getsockname()[1])
        else:
            ma = await stun_mapped(sa, world.rendezvous)
            mb = await stun_mapped(sb, world.rendezvous)
            target_a, target_b = mb, ma
        et, _ = await loop.create_datagram_endpoint(_Echo, sock=sb)
        ct, cp = await loop.create_datagram_endpoint(_Client, sock=sa)
        closers += [et, ct]
        # Open the NAT bindings (or register with the relay) both ways.
        for _ in range(5):
            ct.sendto(b"H", target_a)
            et.sendto(b"H", target_b)
            await asyncio.sleep(0.02)
        with counting(a, b, packets=True) as sent:
            result = await _rtt_loop(cp, ct, target_a, count, size)
        if packets is not None:
            packets.append(sent() / (count + _warmup(count)))
        return result
    finally:
        for t in closers:
            t.close()


# -- the alternatives (worker processes) -----------------------------------------------


def _adder(results: list[Result], scenario: str, run: int) -> Callable[..., None]:
    def add(system: str, metric: Metric, samples: list[float], lost: int = 0,
            note: str = "") -> None:
        if samples:
            results.append(Result(scenario=scenario, system=system, metric=metric, run=run,
                                  samples=tuple(samples), lost=lost, note=note))
    return add


@dataclass(frozen=True)
class PluginDevices:
    """The devices of one ``xmpp+dtx`` system: the two slixmpp clients of
    ``xmpp`` with the dtx plugin registered, both of the account
    :data:`TV_BARE` (the plugin drops down to its own account's devices by
    itself), its key in the account's vCard beforehand
    (:func:`start_account_server`): the echo, and a fresh driver per
    connection."""

    echo: DeviceIdentity
    drivers: tuple[DeviceIdentity, ...]
    expect: str
    """The path the session should settle on: ``direct``, ``relay`` or ``lan``."""

    @classmethod
    def make(cls, expect: str, connects: int) -> PluginDevices:
        # The driver's full JID sorts first: it is the one that asks.
        return cls(echo=generate_identity(f"{TV_BARE}/{expect}-echo"),
                   drivers=tuple(generate_identity(f"{TV_BARE}/{expect}-drive{i}")
                                 for i in range(connects)),
                   expect=expect)

    @property
    def identities(self) -> tuple[DeviceIdentity, ...]:
        return (self.echo, *self.drivers)


def _key_file(world: LabWorld, identity: DeviceIdentity) -> str:
    folder = world.folder / "plugin-keys"
    folder.mkdir(mode=0o700, exist_ok=True)
    path = folder / f"{identity.jid.resource}.key"
    if not path.exists():
        save_identity(identity, str(path))
    return str(path)


def measure_xmpp(world: LabWorld, opts: Options, run: int, scenario: str, system: str,
                 a: Host, b: Host, *, plugin: PluginDevices | None = None) -> list[Result]:
    """:func:`_measure_xmpp`; a failure keeps the figures already taken."""
    results: list[Result] = []
    guarded(opts, f"{scenario} run {run + 1}/{opts.runs}: {system}",
            lambda: _measure_xmpp(world, opts, run, scenario, system, a, b, plugin, results))
    return results


def _measure_xmpp(world: LabWorld, opts: Options, run: int, scenario: str, system: str,
                  a: Host, b: Host, plugin: PluginDevices | None,
                  results: list[Result]) -> list[Result]:
    """Two slixmpp clients through Prosody on the server host: ``a`` drives,
    ``b`` echoes. Connect time is login plus the first stanza delivered;
    the first message, the first stanza to its echo.

    With ``plugin`` the same clients register the dtx plugin and log in to
    the account's own server (its Prosody hands out coturn by XEP-0215):
    the first message is sent once the driver's plugin is ready, right
    behind its first stanza to the peer (through the server: no session
    yet, one being made), the round trips and the batch once both sides
    have seen ``dtx_session_start``. Its connect and login
    times are not reported (the plugin's start is not the figure here),
    nor pings."""
    server_address = world.prosody if plugin is None else world.account_server
    if server_address is None:
        return results
    add = _adder(results, scenario, run)
    server = f"{server_address[0]}:{server_address[1]}"
    common = ["--password", XMPP_PASSWORD, "--server", server,
              "--size", str(opts.message_bytes)]
    tag = f"{scenario} run {run + 1}/{opts.runs}"
    echo_jid = "tv@example.org/echo" if plugin is None else plugin.echo.jid.full
    echo_args = [] if plugin is None else ["--dtx-key", _key_file(world, plugin.echo),
                                           "--host-ip", b.ip]
    echo = Worker(b, ["xmpp-echo", "--jid", echo_jid, *echo_args, *common],
                  opts.timeout + opts.lab_stanzas / 20)
    try:
        echo.expect("ready")
        connects: list[float] = []
        logins: list[float] = []
        firsts: list[float] = []
        for i in range(opts.lab_connects):
            measure = i == 0
            n = opts.lab_rtt_samples if measure else 0
            if measure:
                opts.progress.step(f"{tag}: {system} login, first message, "
                                   + ("rtt" if plugin else "rtt and ping") + f" x{n}")
            if plugin is None:
                jid, extra = f"remote@example.org/drive{i}", []
            else:
                jid = plugin.drivers[i].jid.full
                extra = ["--dtx-key", _key_file(world, plugin.drivers[i]), "--host-ip", a.ip,
                         "--expect-path", plugin.expect]
            drive = Worker(a, ["xmpp-drive", "--jid", jid, "--peer", echo_jid,
                               "--samples", str(n), "--stanzas", str(opts.lab_stanzas),
                               *extra, *common], opts.timeout + 2 * n)
            try:
                login = drive.expect("login")
                first = echo.expect("first")
                connects.append(first["t"] - login["t0"])
                logins.append(login["login"])
                firsts.append(login["first"])
                if plugin is not None:
                    if login["path"] != "server":
                        logger.warning("%s: the first message went over %s, not the server",
                                       system, login["path"])
                    started = echo.expect("session")
                    if started["jid"] != jid:
                        raise RuntimeError(f"a dtx session with {started['jid']}, not {jid}")
                    drive.send(command="session")
                rtt = drive.expect("rtt")
                if not measure:
                    continue
                path = "via the XMPP server" if plugin is None else rtt["path"]
                if rtt["path_after"] != rtt["path"]:
                    logger.warning("%s moved from %s to %s during its round trips", system,
                                   rtt["path"], rtt["path_after"])
                add(system, Metric.RTT, rtt["rtt"], note=f"path {path}")
                add(f"{system}-ping", Metric.RTT, rtt["ping"], note=f"path {path}")
                opts.progress.step(f"{tag}: {system} one-way x{opts.lab_stanzas}")
                with counting(a, b) as sent:
                    drive.send(command="go")
                    sunk = echo.expect("sunk")
                    batch = drive.expect("batch")
                if plugin is not None:
                    path = batch["path"]
                note = f"path {path}; each client in its own process"
                add(system, Metric.THROUGHPUT, [sunk["count"] / (sunk["t"] - batch["t_start"])],
                    note=note)
                add(system, Metric.CPU, [(batch["cpu"] + sunk["cpu"]) / sunk["count"]],
                    note=note + (" (clients only, not Prosody)" if plugin is None else ""))
                add(system, Metric.BYTES, [sent() / opts.lab_stanzas], note=note)
            finally:
                drive.stop()
        add(system, Metric.FIRST_MESSAGE, firsts,
            note="through the server" if plugin is None else
            "through the server while the plugin makes the session")
        if plugin is None:
            add(system, Metric.CONNECT, connects, note="login plus first stanza")
            add(f"{system}-login", Metric.CONNECT, logins, note="TCP connect, SASL, bind")
    finally:
        echo.stop()
    return results


def measure_webrtc(world: LabWorld, opts: Options, run: int, scenario: str, system: str,
                   a: Host, b: Host) -> list[Result]:
    """:func:`_measure_webrtc`; a failure keeps the figures already taken."""
    results: list[Result] = []
    guarded(opts, f"{scenario} run {run + 1}/{opts.runs}: {system}",
            lambda: _measure_webrtc(world, opts, run, scenario, system, a, b, results))
    return results


def _measure_webrtc(world: LabWorld, opts: Options, run: int, scenario: str, system: str,
                    a: Host, b: Host, results: list[Result]) -> list[Result]:
    """aiortc data channels, ``a`` offers and drives, ``b`` answers and
    echoes; ICE with the rendezvous's STUN and coturn's TURN."""
    add = _adder(results, scenario, run)
    ice = ["--stun", f"{world.rendezvous[0]}:{world.rendezvous[1]}",
           "--size", str(opts.message_bytes)]
    if world.turn is not None:
        ice += ["--turn", f"{world.turn[0]}:{world.turn[1]}", "--turn-user", TURN_USER,
                "--turn-password", TURN_PASSWORD]
    tag = f"{scenario} run {run + 1}/{opts.runs}"
    connects: list[float] = []
    paths: set[str] = set()
    for i in range(opts.lab_connects):
        measure = i == 0
        n = opts.lab_rtt_samples if measure else 0
        if measure:
            opts.progress.step(f"{tag}: {system} open and rtt x{n}")
        # The echo side waits through its peer's whole measurement.
        echo = Worker(b, ["webrtc-echo", *ice], opts.timeout + 2 * n + opts.lab_stanzas / 20)
        drive = Worker(a, ["webrtc-drive", *ice, "--samples", str(n),
                           "--stanzas", str(opts.lab_stanzas)], opts.timeout + 2 * n)
        try:
            echo.expect("ready")
            offer = drive.expect("offer")
            echo.send(sdp=offer["sdp"], type=offer["type"])
            answer = echo.expect("answer")
            drive.send(sdp=answer["sdp"], type=answer["type"])
            opened = drive.expect("open")
            first = echo.expect("first")
            connects.append(first["t"] - opened["t0"])
            paths.add(opened["path"])
            rtt = drive.expect("rtt")
            if not measure:
                continue
            note = f"path {opened['path']}"
            add(system, Metric.RTT, rtt["rtt"], note=note)
            opts.progress.step(f"{tag}: {system} one-way x{opts.lab_stanzas}")
            with counting(a, b) as sent:
                drive.send(command="go")
                sunk = echo.expect("sunk")
                batch = drive.expect("batch")
            note += "; each end in its own process"
            add(system, Metric.THROUGHPUT, [sunk["count"] / (sunk["t"] - batch["t_start"])],
                note=note)
            add(system, Metric.CPU, [(batch["cpu"] + sunk["cpu"]) / sunk["count"]], note=note)
            add(system, Metric.BYTES, [sent() / opts.lab_stanzas], note=note)
        finally:
            drive.stop()
            echo.stop()
    add(system, Metric.CONNECT, connects,
        note="offer to first message delivered; path " + "/".join(sorted(paths)))
    return results


# -- a whole scenario -------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    """Two hosts measured against each other and what to call them."""

    system: str
    a: Host
    b: Host
    expect: str
    """The path dtx should end on: ``lan``, ``direct`` or ``relay``."""


def start_world(lab: Lab, server: Host, folder: Path, identities: dict[str, DeviceIdentity],
                *, alternatives: bool, account: Sequence[DeviceIdentity] = (),
                nagle: bool = False) -> LabWorld:
    """Start the rendezvous (and Prosody and coturn with ``alternatives``;
    and, for the devices of one ``account``, that account's own XMPP
    server with its TURN server: :func:`start_account_server`). Both
    Prosodys run with Nagle's algorithm off, as docs/xmpp-server.md
    recommends, unless ``nagle`` (Options.prosody_nagle)."""
    vcards = folder / "vcards"
    write_vcards(vcards, *identities.values())
    start_rendezvous(server, vcards)
    world = LabWorld(lab=lab, server=server, folder=folder, vcards=vcards,
                     rendezvous=(server.ip, RDV_PORT), identities=identities)
    if alternatives:
        pdir = folder / "prosody"
        pdir.mkdir()
        world.prosody = start_prosody(server, pdir, ["tv", "remote"], nagle=nagle)
        tdir = folder / "turn"
        tdir.mkdir()
        world.turn = start_turn(server, tdir)
    if alternatives and account:
        try:
            world.account_server = start_account_server(server, folder / "account", account,
                                                        nagle=nagle)
        except Exception as exc:  # noqa: BLE001 - its systems are left out, the rest runs
            logger.warning("no XMPP server for dtx's signalling (its systems are left "
                           "out): %r", exc, exc_info=True)
    return world


def guarded(opts: Options, what: str, fn: Callable[[], list[Result]]) -> list[Result]:
    """``fn()``, or no results (with a warning on the progress line and in
    the log) when it fails: one system that breaks does not lose a run."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - reported, and the run goes on
        logger.warning("%s failed: %r", what, exc, exc_info=True)
        opts.progress.step(f"{what} FAILED: {exc!r}"[:300])
        return []


async def guarded_async(opts: Options, what: str,
                        coro: Any) -> list[Result]:
    """:func:`guarded` for a coroutine."""
    try:
        result: list[Result] = await coro
        return result
    except Exception as exc:  # noqa: BLE001 - reported, and the run goes on
        logger.warning("%s failed: %r", what, exc, exc_info=True)
        opts.progress.step(f"{what} FAILED: {exc!r}"[:300])
        return []


def scratch() -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix="dtx-bench-")
