"""NAT behaviour discovery: RFC 5780 mapping and filtering, plus the classic class.

Three layers, in the usual dtx shape:

* :class:`NatCheck` — a sans-IO state machine running the RFC 5780 section
  4.3 (mapping) and 4.4 (filtering) tests against one STUN server, all from
  one local socket, with RFC 8489 style retransmission. Time comes in as
  ``now``, transaction ids from a ``random.Random``; it imports no sockets.
* :func:`nat_check` — the asyncio driver: sends what the machine asks for on
  one UDP socket, feeds it what arrives, re-arms its one timer. Optionally
  runs pystun3's RFC 3489 classification at the same time, in a thread, on
  a second socket (pystun3 is blocking and opens its own exchanges).
* :func:`add_cli` — the ``dtx nat-check`` subcommand; :func:`main` runs the
  same command as ``python -m dtx.natcheck``. Arguments are checked by the
  shared types of :mod:`dtx.cliargs` (exit 2), the local and server names
  resolved before any socket is made.

Test order matters on one socket. The mapping tests II and III send to the
server's other address, and an address-dependent filter then lets that
address in; so the filtering tests II and III run right after mapping test I,
while the NAT has only ever seen the primary address, and the mapping tests
II and III come after them. The hairpin check of RFC 5780 section 4.6 runs
last: a Binding request sent from a second local socket to the public address
of the first must arrive on the first.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import ipaddress
import json
import logging
import random
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

from .cliargs import (
    EXIT_CONNECT,
    add_loop_option,
    bind_failure,
    configure_logging,
    family_of,
    format_address,
    parse_bind_host,
    parse_hostport,
    parse_ipv4,
    parse_port,
    parse_timeout,
    resolve_endpoints,
    run_command,
    run_loop,
)
from .errors import DecodeError, LocalProtocolError
from .aio.netif import source_ip_towards
from .aio.socket import UdpSocket
from .wire.stun import Address, StunClass, StunMessage, binding_request, decode_stun, is_stun

if TYPE_CHECKING:
    from .aio.portmap import PortMappingReport, ProtocolAnswer

__all__ = [
    "Behaviour",
    "NatCheck",
    "NatCheckConfig",
    "NatReport",
    "Step",
    "add_cli",
    "classic_nat_type",
    "format_report",
    "main",
    "nat_check",
]

logger = logging.getLogger(__name__)


class Behaviour(str, Enum):
    """An RFC 4787 mapping or filtering class, or unknown."""

    ENDPOINT_INDEPENDENT = "endpoint-independent"
    ADDRESS_DEPENDENT = "address-dependent"
    ADDRESS_AND_PORT_DEPENDENT = "address-and-port-dependent"
    UNKNOWN = "unknown"


class Step(Enum):
    """The tests, in the order they may run (see the module docs)."""

    MAPPING_I = "mapping test I"
    FILTERING_II = "filtering test II"
    FILTERING_III = "filtering test III"
    MAPPING_II = "mapping test II"
    MAPPING_III = "mapping test III"
    HAIRPIN = "hairpin"
    DONE = "done"


@dataclass(frozen=True, kw_only=True)
class NatCheckConfig:
    """Tunables of one check.

    Each test sends its request up to ``max_transmissions`` times; after the
    n-th transmission it waits ``rto * 2**(n-1)`` (capped at ``max_rto``)
    for the answer. With the defaults an unanswered test gives up after
    0.1 + 0.2 + 0.4 + 0.8 = 1.5 s, and a whole check, in the worst case
    (two unanswered filtering tests and no hairpin) ends within about 5 s.
    """

    rto: float = 0.1
    max_rto: float = 1.6
    max_transmissions: int = 4
    hairpin: bool = True

    def __post_init__(self) -> None:
        if self.rto <= 0 or self.max_rto < self.rto:
            raise LocalProtocolError("need 0 < rto <= max_rto")
        if not 1 <= self.max_transmissions <= 16:
            raise LocalProtocolError("max_transmissions must be in 1..16")

    def wait_after(self, transmissions: int) -> float:
        """Seconds to wait after the ``transmissions``-th send."""
        return float(min(self.rto * 2 ** (transmissions - 1), self.max_rto))


@dataclass(frozen=True)
class NatReport:
    """What a check found.

    ``public`` is the server-reflexive address (None when the server never
    answered); ``nat`` is whether it differs from ``local`` (None when that
    cannot be told: no answer, or ``local`` is a wildcard address).
    ``hairpin`` is None when not tested (no NAT, disabled, no answer).
    ``classic`` is pystun3's RFC 3489 name, verbatim (it spells two of them
    "Restric NAT" and "Restric Port NAT"), or None when not run or failed.
    ``rfc5780`` says whether the server advertised a usable OTHER-ADDRESS
    (or, from an RFC 3489 server, CHANGED-ADDRESS): another IP *and* another
    port. Without one, mapping and filtering stay unknown.
    """

    mapping: Behaviour
    filtering: Behaviour
    public: Address | None
    local: Address
    nat: bool | None
    hairpin: bool | None
    classic: str | None
    rfc5780: bool
    server: Address
    other: Address | None = None
    port_mapping: PortMappingReport | None = None
    """What the gateway said to PCP, NAT-PMP and UPnP IGD
    (``--port-mapping``), or None when not asked."""

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (addresses as [ip, port])."""

        def addr(a: Address | None) -> list[Any] | None:
            return None if a is None else [a[0], a[1]]

        return {
            "mapping": self.mapping.value,
            "filtering": self.filtering.value,
            "public": addr(self.public),
            "local": addr(self.local),
            "nat": self.nat,
            "hairpin": self.hairpin,
            "classic": self.classic,
            "rfc5780": self.rfc5780,
            "server": addr(self.server),
            "other": addr(self.other),
            "port_mapping": None if self.port_mapping is None else self.port_mapping.to_json(),
        }


@dataclass
class _Transaction:
    step: Step
    transaction_id: bytes
    request: bytes
    dest: Address
    sent: int = 0
    deadline: float = 0.0
    due: bool = True  # a (re)transmission is waiting to be sent


def _same(a: Address, b: Address) -> bool:
    try:
        return ipaddress.ip_address(a[0]) == ipaddress.ip_address(b[0]) and a[1] == b[1]
    except ValueError:
        return a == b


def _same_ip(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return a == b


def _unspecified(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_unspecified
    except ValueError:
        return True


class NatCheck:
    """Sans-IO RFC 5780 behaviour discovery against ``server`` from ``local``.

    Drive it like aioquic's connection: send :meth:`datagrams_to_send`,
    feed every datagram the socket receives to :meth:`receive_datagram`,
    call :meth:`handle_timer` when :meth:`get_timer` passes, until
    :attr:`done`; then read :meth:`report`. ``server`` must be an IP
    literal and port. Bad or unrelated datagrams are ignored, never raised.
    """

    def __init__(
        self,
        server: Address,
        *,
        local: Address,
        rng: random.Random,
        config: NatCheckConfig | None = None,
    ) -> None:
        self.server = server
        self.local = local
        self.config = config or NatCheckConfig()
        self._rng = rng
        self.step = Step.MAPPING_I
        self.public: Address | None = None
        self.other: Address | None = None
        self.mapping = Behaviour.UNKNOWN
        self.filtering = Behaviour.UNKNOWN
        self.hairpin: bool | None = None
        self.rfc5780 = False
        self._mapped_ii: Address | None = None
        self._tx: _Transaction | None = None
        self._begin(Step.MAPPING_I)

    # -- driver interface -------------------------------------------------

    @property
    def done(self) -> bool:
        """Whether every test has ended (answered, refused or timed out)."""
        return self.step is Step.DONE

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Address]]:
        """The datagram due now, if any; arms the retransmission timer."""
        tx = self._tx
        if tx is None or not tx.due:
            return []
        tx.due = False
        tx.sent += 1
        tx.deadline = now + self.config.wait_after(tx.sent)
        logger.debug("%s: sending to %s (transmission %d)", tx.step.value, tx.dest, tx.sent)
        return [(tx.request, tx.dest)]

    @property
    def from_second_socket(self) -> bool:
        """Whether the datagram due now must leave from a second local socket
        (the hairpin test; what arrives still goes to the first one)."""
        return self.step is Step.HAIRPIN

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` should be called next, or None."""
        tx = self._tx
        if tx is None or tx.due:
            return None
        return tx.deadline

    def handle_timer(self, now: float) -> None:
        """Retransmit, or give the current test up after the last wait."""
        tx = self._tx
        if tx is None or tx.due or now < tx.deadline:
            return
        if tx.sent < self.config.max_transmissions:
            tx.due = True
            return
        logger.debug("%s: no answer after %d transmissions", tx.step.value, tx.sent)
        self._conclude(tx.step, None, None)

    def receive_datagram(self, data: bytes, addr: Address, now: float) -> None:
        """Handle one datagram that arrived on the socket from ``addr``."""
        tx = self._tx
        if tx is None or not is_stun(data):
            return
        try:
            msg = decode_stun(data)
        except DecodeError as exc:
            logger.debug("ignoring malformed STUN from %s: %s", addr, exc)
            return
        if msg.classic or msg.transaction_id != tx.transaction_id:
            return
        if tx.step is Step.HAIRPIN:
            if msg.cls is StunClass.REQUEST:
                self._conclude(tx.step, msg, addr)
            return
        if msg.cls in (StunClass.SUCCESS, StunClass.ERROR):
            self._conclude(tx.step, msg, addr)

    def report(self, classic: str | None = None) -> NatReport:
        """The findings so far (final once :attr:`done`)."""
        return NatReport(
            mapping=self.mapping,
            filtering=self.filtering,
            public=self.public,
            local=self.local,
            nat=self._nat(),
            hairpin=self.hairpin,
            classic=classic,
            rfc5780=self.rfc5780,
            server=self.server,
            other=self.other,
        )

    # -- the tests --------------------------------------------------------

    def _nat(self) -> bool | None:
        if self.public is None or _unspecified(self.local[0]):
            return None
        return not _same(self.public, self.local)

    def _begin(self, step: Step) -> None:
        self.step = step
        if step is Step.DONE:
            self._tx = None
            return
        tid = self._rng.randbytes(12)
        dest: Address | None = self.server
        change_ip = change_port = False
        if step is Step.FILTERING_II:
            change_ip = change_port = True
        elif step is Step.FILTERING_III:
            change_port = True
        elif step is Step.MAPPING_II:
            dest = None if self.other is None else (self.other[0], self.server[1])
        elif step is Step.MAPPING_III:
            dest = self.other
        elif step is Step.HAIRPIN:
            dest = self.public
        if dest is None:  # unreachable by the transitions; end rather than guess
            self.step = Step.DONE
            self._tx = None
            return
        request = binding_request(tid, change_ip=change_ip, change_port=change_port)
        self._tx = _Transaction(step=step, transaction_id=tid, request=request, dest=dest)

    def _after_filtering(self) -> Step:
        if self._nat() is False:
            return self._after_mapping()  # no NAT: nothing to map
        return Step.MAPPING_II

    def _after_mapping(self) -> Step:
        if self.config.hairpin and self._nat() is not False and self.public is not None:
            return Step.HAIRPIN
        return Step.DONE

    def _mapped(self, msg: StunMessage | None) -> Address | None:
        if msg is None or msg.cls is not StunClass.SUCCESS:
            return None
        try:
            return msg.reflexive_address
        except DecodeError:
            return None

    def _conclude(self, step: Step, msg: StunMessage | None, src: Address | None) -> None:
        """Record the outcome of ``step`` (``msg`` None: no answer) and move on."""
        if msg is not None and msg.cls is StunClass.ERROR:
            code = msg.error_code
            logger.info("%s: server answered error %s", step.value,
                        code.code if code is not None else "?")
        nxt = Step.DONE
        if step is Step.MAPPING_I:
            nxt = self._mapping_i(msg)
        elif step is Step.FILTERING_II:
            if msg is None:
                nxt = Step.FILTERING_III
            else:
                ok = (
                    msg.cls is StunClass.SUCCESS
                    and src is not None
                    and not _same_ip(src[0], self.server[0])
                    and src[1] != self.server[1]
                )
                if ok:
                    self.filtering = Behaviour.ENDPOINT_INDEPENDENT
                else:
                    logger.info("%s: server did not change IP and port (answer from %s)",
                                step.value, src)
                nxt = self._after_filtering()
        elif step is Step.FILTERING_III:
            if msg is None:
                self.filtering = Behaviour.ADDRESS_AND_PORT_DEPENDENT
            elif (
                msg.cls is StunClass.SUCCESS
                and src is not None
                and _same_ip(src[0], self.server[0])
                and src[1] != self.server[1]
            ):
                self.filtering = Behaviour.ADDRESS_DEPENDENT
            else:
                logger.info("%s: server did not change port only (answer from %s)",
                            step.value, src)
            nxt = self._after_filtering()
        elif step is Step.MAPPING_II:
            mapped = self._mapped(msg)
            if mapped is None:
                nxt = self._after_mapping()
            elif self.public is not None and _same(mapped, self.public):
                self.mapping = Behaviour.ENDPOINT_INDEPENDENT
                nxt = self._after_mapping()
            else:
                self._mapped_ii = mapped
                nxt = Step.MAPPING_III
        elif step is Step.MAPPING_III:
            mapped = self._mapped(msg)
            if mapped is not None and self._mapped_ii is not None:
                self.mapping = (
                    Behaviour.ADDRESS_DEPENDENT
                    if _same(mapped, self._mapped_ii)
                    else Behaviour.ADDRESS_AND_PORT_DEPENDENT
                )
            nxt = self._after_mapping()
        elif step is Step.HAIRPIN:
            self.hairpin = msg is not None
        logger.debug("%s done: %s", step.value, "answered" if msg is not None else "no answer")
        self._begin(nxt)

    def _mapping_i(self, msg: StunMessage | None) -> Step:
        mapped = self._mapped(msg)
        if mapped is None:
            logger.info("mapping test I: no usable answer from %s", self.server)
            return Step.DONE
        self.public = mapped
        if msg is None:
            return Step.DONE
        try:
            other = msg.other_address or msg.changed_address
        except DecodeError:
            other = None
        if (
            other is not None
            and not _same_ip(other[0], self.server[0])
            and other[1] != self.server[1]
        ):
            self.other = other
            self.rfc5780 = True
        else:
            logger.info("server %s gave no usable OTHER-ADDRESS (%s): "
                        "mapping and filtering stay unknown", self.server, other)
        if self._nat() is False:
            # RFC 5780 4.3: the mapped address is the local one, no NAT
            self.mapping = Behaviour.ENDPOINT_INDEPENDENT
        if self.rfc5780:
            return Step.FILTERING_II
        return self._after_mapping()


# -- the classic RFC 3489 class, by pystun3 -----------------------------------------


def classic_nat_type(sock: socket.socket, server: Address, *, source_ip: str) -> str:
    """pystun3's RFC 3489 class, asked from ``sock`` (blocking; a thread's job).

    ``sock`` must be a bound IPv4 UDP socket with a timeout set (pystun3
    sends each request four times, waiting that long each time).
    ``source_ip`` is the address pystun3 compares the mapped one with to
    spot "Open Internet". Returns pystun3's name verbatim, "Blocked" when
    the server never answered.
    """
    import stun as pystun3  # type: ignore[import-untyped]

    source_port = int(sock.getsockname()[1])
    nat_type, _ = pystun3.get_nat_type(
        sock, source_ip, source_port, stun_host=server[0], stun_port=server[1]
    )
    return str(nat_type)


async def _classic(
    server: Address,
    sock: socket.socket | None,
    local_ip: str,
    *,
    timeout: float,
    recv_timeout: float,
) -> str | None:
    """Run :func:`classic_nat_type` in a thread, bounded; None on failure."""
    owned = sock is None
    if sock is None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.bind((local_ip, 0))
        except OSError as exc:
            sock.close()
            logger.warning("classic (pystun3) check skipped: cannot bind %s: %s", local_ip, exc)
            return None
    sock.settimeout(recv_timeout)
    source_ip = sock.getsockname()[0]
    if _unspecified(source_ip):
        source_ip = local_ip
    the_sock = sock

    def run() -> str:
        try:
            return classic_nat_type(the_sock, server, source_ip=source_ip)
        finally:
            if owned:
                the_sock.close()

    try:
        return await asyncio.wait_for(asyncio.to_thread(run), timeout)
    except TimeoutError:
        logger.warning("classic (pystun3) check gave no result within %.1f s", timeout)
    except Exception as exc:  # third-party parser: any failure means "no class"
        logger.warning("classic (pystun3) check failed: %s: %s", type(exc).__name__, exc)
    return None


# -- the asyncio driver -----------------------------------------------------------


async def _resolve(host: str, port: int, family: int) -> Address:
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, family=family, type=socket.SOCK_DGRAM)
    if not infos:
        raise OSError(f"cannot resolve {host!r}")
    sockaddr = infos[0][4]
    return (str(sockaddr[0]), int(sockaddr[1]))


async def _drive(machine: NatCheck, sock: socket.socket, second: socket.socket | None) -> None:
    """Run ``machine`` on ``sock`` (and ``second``, for sending from another
    port) until it is done; both sockets are borrowed and left open."""
    loop = asyncio.get_running_loop()
    finished: asyncio.Future[None] = loop.create_future()
    timer: asyncio.TimerHandle | None = None

    def received(data: bytes, src: Address) -> None:
        machine.receive_datagram(data, src, loop.time())

    def transmit() -> None:
        nonlocal timer
        if timer is not None:
            timer.cancel()
            timer = None
        if finished.done():
            return
        machine.handle_timer(loop.time())
        via = seconds if machine.from_second_socket and seconds is not None else primary
        for data, dest in machine.datagrams_to_send(loop.time()):
            via.sendto(data, dest)  # a failed send counts as a lost packet
        when = machine.get_timer()
        if machine.done:
            finished.set_result(None)
        elif when is not None:
            timer = loop.call_at(when, transmit)

    def ignore(data: bytes, src: Address) -> None:
        logger.debug("ignored %d bytes from %s on the second socket", len(data), src)

    primary = UdpSocket(sock, received, transmit)
    seconds = None if second is None else UdpSocket(second, ignore, lambda: None)
    try:
        transmit()
        await finished
    finally:
        if timer is not None:
            timer.cancel()
        primary.detach()
        if seconds is not None:
            seconds.detach()


async def nat_check(
    stun: tuple[str, int],
    *,
    sock: socket.socket | None = None,
    local: tuple[str, int] = ("0.0.0.0", 0),
    classic: bool = True,
    classic_sock: socket.socket | None = None,
    hairpin_sock: socket.socket | None = None,
    timeout: float = 10.0,
    classic_timeout: float = 8.0,
    classic_recv_timeout: float = 0.25,
    config: NatCheckConfig | None = None,
    rng: random.Random | None = None,
) -> NatReport:
    """Discover the NAT between this host and the STUN server ``stun``.

    Runs the RFC 5780 tests on ``sock`` (borrowed: left open, made
    non-blocking) or on a new socket bound to ``local``. With ``classic``,
    pystun3 classifies at the same time from ``classic_sock`` (borrowed) or
    a new socket on the same local IP; it sends each request four times,
    ``classic_recv_timeout`` apart, and is given up after
    ``classic_timeout``. The hairpin test sends from ``hairpin_sock``
    (borrowed) or a new socket on the local IP; when none can be had it is
    skipped. The whole RFC 5780 part is bounded by ``timeout``
    (its own retransmission bound normally ends it much sooner).

    The extra sockets this makes are made in the calling thread's network
    namespace; with a ``sock`` from another one (the NAT lab), pass
    ``classic_sock`` and ``hairpin_sock`` too, or those parts are skipped.

    Raises ``OSError`` when the server name cannot be resolved or ``local``
    cannot be bound; an unanswering server gives a report with ``public``
    None.
    """
    owned = sock is None
    opened: list[socket.socket] = []
    if sock is None:
        family = socket.AF_INET6 if ":" in local[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.bind(local)
        except OSError:
            sock.close()
            raise
    try:
        sock.setblocking(False)
        family = sock.family
        server = await _resolve(stun[0], stun[1], family)
        here = sock.getsockname()
        local_addr: Address = (str(here[0]), int(here[1]))
        if _unspecified(local_addr[0]):
            routed = source_ip_towards(server, family)
            if routed is not None:
                local_addr = (routed, local_addr[1])
        config = config or NatCheckConfig()
        second = hairpin_sock
        if second is None and config.hairpin:
            try:
                second = socket.socket(family, socket.SOCK_DGRAM)
                second.bind((local_addr[0], 0))
            except OSError as exc:
                logger.info("hairpin test skipped: no second socket on %s: %s",
                            local_addr[0], exc)
                if second is not None:
                    second.close()
                second = None
                config = dataclasses.replace(config, hairpin=False)
            else:
                opened.append(second)
        if second is not None:
            second.setblocking(False)
        machine = NatCheck(
            server, local=local_addr, rng=rng or random.SystemRandom(), config=config
        )
        classic_task: asyncio.Task[str | None] | None = None
        if classic and family == socket.AF_INET:
            classic_task = asyncio.create_task(
                _classic(server, classic_sock, local_addr[0], timeout=classic_timeout,
                         recv_timeout=classic_recv_timeout)
            )
        elif classic:
            logger.info("classic (pystun3) check skipped: it speaks IPv4 only")
        try:
            await asyncio.wait_for(_drive(machine, sock, second), timeout)
        except TimeoutError:
            logger.warning("RFC 5780 check stopped after %.1f s at %s", timeout,
                           machine.step.value)
        finally:
            classic_name = await classic_task if classic_task is not None else None
        return machine.report(classic=classic_name)
    finally:
        for extra in opened:
            extra.close()
        if owned:
            sock.close()


# -- command line -----------------------------------------------------------------


def format_report(report: NatReport) -> str:
    """A short human summary, one finding per line."""

    def addr(a: Address | None) -> str:
        if a is None:
            return "-"
        return f"[{a[0]}]:{a[1]}" if ":" in a[0] else f"{a[0]}:{a[1]}"

    def yesno(v: bool | None) -> str:
        return "unknown" if v is None else ("yes" if v else "no")

    lines = [
        f"public address   {addr(report.public)}",
        f"local address    {addr(report.local)}",
        f"behind NAT       {yesno(report.nat)}",
        f"mapping          {report.mapping.value}",
        f"filtering        {report.filtering.value}",
        f"hairpin          {'not tested' if report.hairpin is None else yesno(report.hairpin)}",
        f"RFC 5780 server  {yesno(report.rfc5780)}"
        + (f" (other address {addr(report.other)})" if report.other else ""),
        f"classic (3489)   {report.classic or '-'}",
    ]
    pm = report.port_mapping
    if pm is not None:
        from .aio.upnp import UPNP_MISSING

        def answer(name: str, a: ProtocolAnswer | None) -> str:
            if a is None or a.reason == UPNP_MISSING:
                return f"{name} not probed" + (f" ({a.reason})" if a is not None else "")
            if a.external is not None:
                return f"{name} {addr(a.external)} " + (
                    f"for {a.lifetime} s" if a.lifetime else "with no expiry")
            return f"{name} {'refused' if a.answered else 'no answer'} ({a.reason})"
        lines.append(f"port mapping     gateway {pm.gateway or '-'}: "
                     + "; ".join((answer("PCP", pm.pcp), answer("NAT-PMP", pm.nat_pmp),
                                  answer("UPnP", pm.upnp))))
    return "\n".join(lines)


def _bind(host: str, port: int) -> socket.socket:
    """The UDP socket the RFC 5780 tests run on; one that cannot be bound
    (port in use, not this host's address) is a usage error."""
    sock = socket.socket(family_of(host), socket.SOCK_DGRAM)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        usage = bind_failure(exc, host, port, listen=False)
        if usage is None:
            raise
        raise usage from None
    return sock


def cmd_nat_check(args: argparse.Namespace) -> int:
    """``dtx nat-check``: print the report; exit 4 when the server never
    answered. ``--bind`` and ``--stun`` are resolved (to the bind address's
    family) and the socket bound before the event loop starts."""
    resolve_endpoints(args, "--bind", args.bind, ("--stun",))
    mapping = args.port_mapping or args.gateway is not None

    async def run(sock: socket.socket) -> NatReport:
        report = await nat_check(args.stun, sock=sock, classic=not args.no_classic,
                                 timeout=args.timeout)
        if mapping:
            from .aio.portmap import port_mapping_check

            found = await port_mapping_check(gateway=args.gateway, timeout=args.timeout)
            report = dataclasses.replace(report, port_mapping=found)
        return report

    with _bind(args.bind, args.port) as sock:
        report = run_loop(args, run(sock))
    if args.json:
        print(json.dumps(report.to_json()), flush=True)
    else:
        print(format_report(report), flush=True)
    if report.public is None:
        print(f"dtx: no answer from STUN server {format_address(*args.stun)}", file=sys.stderr)
        return EXIT_CONNECT
    return 0


def configure_parser(p: argparse.ArgumentParser) -> None:
    """Add the arguments of ``nat-check`` to ``p``."""
    p.add_argument("--stun", required=True, type=parse_hostport, metavar="HOST:PORT",
                   help="STUN server (RFC 5780 needs one with two addresses)")
    p.add_argument("--bind", default="0.0.0.0", type=parse_bind_host, metavar="HOST",
                   help="local address or host name (default %(default)s; its family is "
                   "the server's)")
    p.add_argument("--port", type=parse_port, default=0,
                   help="local UDP port (default 0: any free port)")
    p.add_argument("--no-classic", action="store_true",
                   help="skip the RFC 3489 classification (pystun3)")
    p.add_argument("--timeout", type=parse_timeout, default=10.0,
                   help="seconds for the RFC 5780 tests, > 0 (default %(default)s)")
    p.add_argument("--port-mapping", action="store_true",
                   help="also ask the gateway for a UDP port mapping by PCP, NAT-PMP and "
                   "UPnP IGD (then delete it): which it answers, and the public address")
    p.add_argument("--gateway", type=parse_ipv4, metavar="IP",
                   help="the gateway to ask (implies --port-mapping; default: the "
                   "default route's)")
    p.add_argument("--json", action="store_true", help="print JSON on stdout")
    p.set_defaults(func=cmd_nat_check)


def add_cli(subparsers: Any) -> None:
    """Register ``nat-check`` on an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "nat-check",
        help="report this host's NAT mapping and filtering (RFC 5780) and classic class",
    )
    configure_parser(p)


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m dtx.natcheck``: ``dtx nat-check``'s
    arguments, and ``-v``."""
    parser = argparse.ArgumentParser(
        prog="dtx nat-check",
        description="Report this host's NAT mapping and filtering (RFC 5780) and classic class.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log more (-v info, -vv debug) to stderr")
    add_loop_option(parser)
    configure_parser(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dtx.natcheck``: as ``dtx nat-check``, with its exit codes."""
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    return run_command("dtx", lambda: cmd_nat_check(args))


if __name__ == "__main__":
    sys.exit(main())
