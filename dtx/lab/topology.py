"""The NAT lab: hosts in network namespaces, an emulated internet, homes
behind real nftables NATs, and impaired links.

Shape (see docs/nat-lab.md)::

    server ──┐                      ┌── router a ══ br0 ── a-h0, a-h1
    public ──┤── core (routes) ─────┤── router b ══ br0 ── b-h0
             │                      └── cgn ══ br0 ── router d ══ br0 ── d-h0

Every line to the core is a point-to-point link: the core holds 192.0.2.1 on
each of them and a /32 route per public address; a device holds its public
addresses as /32 with ``default via 192.0.2.1 onlink``. A link with a
:class:`LinkSpec` goes through the user-space forwarder (TAP pair), others
are veth pairs. Nothing is created in the namespace of the caller.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
import os
import re
import secrets
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Callable

from dtx.errors import LabError
from dtx.lab import nat, ns
from dtx.lab import nat as nat_mod
from dtx.lab.miniupnpd import MiniUpnpd
from dtx.lab.nat import NatProfile
from dtx.lab.netem import LinkSpec

logger = logging.getLogger(__name__)
Socket = socket.socket

CORE_GATEWAY = "192.0.2.1"
PUBLIC_HOST_BASE = ipaddress.IPv4Address("192.0.2.10")
NO_NAT_LAN_BASE = ipaddress.IPv4Address("192.0.2.128")   # /28 blocks up to .255
ROUTER_BASE = ipaddress.IPv4Address("198.51.100.10")
#: WAN addresses of routers with port mapping (miniupnpd refuses every
#: documentation, private or reserved address as its external address; see
#: docs/nat-lab.md). Outside the lab this /24 is someone's, but no lab
#: packet can reach the real one: it is only a label inside the lab.
MAPPING_ROUTER_BASE = ipaddress.IPv4Address("1.2.3.10")
SERVER_BASE = ipaddress.IPv4Address("203.0.113.10")
PREFIX_RE = re.compile(r"^dtx[0-9a-f]{6}$")
NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,23}$")
READY_TIMEOUT = 10.0


def state_dir() -> str:
    """Where each live lab records its owner pid and namespaces."""
    return os.path.join(tempfile.gettempdir(), "dtx-lab")


@dataclass(frozen=True)
class WanProfile:
    """Default impairment of the links to the core, by kind of device."""

    home: LinkSpec | None = None
    server: LinkSpec | None = None
    public: LinkSpec | None = None


#: Each home 20 ms one way from the core, the server 40 ms beyond it:
#: home<->home RTT 80 ms, home<->server RTT 120 ms.
STANDARD_WAN = WanProfile(home=LinkSpec(delay=0.020), server=LinkSpec(delay=0.040),
                          public=LinkSpec(delay=0.020))


@dataclass(eq=False)
class Host:
    """One network namespace of the lab (a LAN host, router, server...)."""

    lab: Lab
    name: str
    netns: str
    addresses: list[str]

    @property
    def ip(self) -> str:
        """The primary address."""
        return self.addresses[0]

    def _argv(self, argv: Sequence[str]) -> list[str]:
        self.lab._require_up()
        return ["ip", "netns", "exec", self.netns, *argv]

    def run(self, argv: Sequence[str], *, timeout: float = 30.0, check: bool = False,
            **kw: Any) -> subprocess.CompletedProcess[str]:
        """Run a command inside this host and wait for it (output captured)."""
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        result: subprocess.CompletedProcess[str] = subprocess.run(
            self._argv(argv), timeout=timeout, check=check, **kw)
        return result

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start a command inside this host; the lab kills it at teardown."""
        proc: subprocess.Popen[Any] = subprocess.Popen(self._argv(argv), **kw)
        self.lab._processes.append(proc)
        return proc

    def socket(self, family: int = socket.AF_INET,
               type_: int = socket.SOCK_DGRAM) -> Socket:
        """A socket inside this host's namespace, usable from this process.
        The lab closes it at teardown."""
        self.lab._require_up()
        sock = ns.socket_in(self.netns, family, type_)
        self.lab._sockets.append(sock)
        return sock

    def udp_socket(self, bind_port: int = 0, bind_ip: str = "0.0.0.0") -> Socket:
        """A bound UDP socket inside this host."""
        sock = self.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((bind_ip, bind_port))
        return sock

    def tcp_socket(self) -> Socket:
        """An unbound TCP socket inside this host."""
        return self.socket(socket.AF_INET, socket.SOCK_STREAM)

    def __repr__(self) -> str:
        return f"Host({self.name!r}, {self.netns!r}, {self.addresses!r})"


@dataclass(eq=False)
class _Link:
    """A link between an upper namespace (core, CGN, router) and a lower one."""

    id: int
    upper: str
    upper_if: str
    lower: str
    lower_if: str
    spec: LinkSpec | None


@dataclass(eq=False)
class Home:
    """A NAT router with a LAN bridge and the hosts on it. A home with no
    hosts made by :meth:`Lab.add_cgn` is a carrier-grade NAT other homes
    sit behind."""

    lab: Lab
    name: str
    nat: NatProfile
    router: Host
    hosts: list[Host]
    lan_cidr: str
    lan_gateway: str
    upstream: Home | None
    link: _Link
    children: list[Home] = field(default_factory=list)
    port_mapping: bool = False
    """Whether the router runs miniupnpd (UPnP IGD, NAT-PMP, PCP)."""
    miniupnpd: MiniUpnpd | None = None
    """The router's miniupnpd once the lab is up (``port_mapping`` only)."""

    @property
    def wan_ip(self) -> str:
        """The router's own outside address (inside the CGN for double NAT)."""
        return self.router.addresses[0]

    @property
    def public_ip(self) -> str:
        """The address the internet sees for this home."""
        if self.upstream is not None and self.upstream.nat.translate:
            return self.upstream.public_ip
        return self.wan_ip

    def flush_nat(self) -> None:
        """A NAT reboot: forget every conntrack entry and learned mapping."""
        self.lab._require_up()
        ns.run(["ip", "netns", "exec", self.router.netns, "conntrack", "-F"], check=False)
        if self.nat.translate:
            ns.run(["ip", "netns", "exec", self.router.netns, "nft", "-f", "-"],
                   input_text=f"flush map ip {nat.TABLE} mappings\n"
                              f"flush set ip {nat.TABLE} contacted\n")

    def conntrack(self) -> str:
        """The router's conntrack table as ``conntrack -L`` prints it."""
        return ns.run(["ip", "netns", "exec", self.router.netns, "conntrack", "-L"],
                      check=False).stdout

    def change_public_ip(self) -> str:
        """Roaming: give the router a new outside address; old mappings die.
        Returns the new address."""
        return self.lab._renumber(self)

    def load_rules(self) -> None:
        """(Re)load the router's nftables rules and conntrack timeouts."""
        ns.nft_load(self.router.netns, nat.render_ruleset(
            self.nat, wan="wan", lan="br0", public_ip=self.wan_ip, lan_cidr=self.lan_cidr))
        ns.write_sysctls(self.router.netns, nat.conntrack_sysctls(self.nat))


class Lab:
    """A throwaway network of namespaces; a context manager that tears all
    of it down on exit, also when the body raises."""

    def __init__(self, prefix: str | None = None, *, wan: WanProfile | None = None) -> None:
        self.prefix = prefix or "dtx" + secrets.token_hex(3)
        if not re.fullmatch(r"[a-z][a-z0-9]{1,15}", self.prefix):
            raise LabError(f"bad lab prefix {self.prefix!r}")
        self.wan = wan or WanProfile()
        self.core = Host(self, "core", f"{self.prefix}-core", [CORE_GATEWAY])
        self.homes: list[Home] = []
        self.servers: list[Host] = []
        self.public_hosts: list[Host] = []
        self._uplinks: dict[str, _Link] = {}      # device netns -> link to its upper
        self._links: list[_Link] = []
        self._names: set[str] = set()
        self._next_router = 0
        self._next_mapping_router = 0
        self._next_public = 0
        self._next_server = 0
        self._next_lan = 1
        self._next_cgn = 100
        self._next_open_lan = 0
        self._is_up = False
        self._closed = False
        self._processes: list[subprocess.Popen[Any]] = []
        self._sockets: list[Socket] = []
        self._forwarder: subprocess.Popen[str] | None = None
        self._forwarder_lock = threading.Lock()
        self.bringup_seconds: float | None = None

    # -- building ------------------------------------------------------------

    def _claim(self, name: str) -> None:
        if self._is_up:
            raise LabError("add hosts before up(); the lab is already built")
        if not NAME_RE.match(name) or name in self._names or name == "core":
            raise LabError(f"bad or duplicate lab name {name!r}")
        self._names.add(name)

    def _netns(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    def _new_link(self, upper: str, upper_if: str, lower: str, lower_if: str,
                  spec: LinkSpec | None) -> _Link:
        link = _Link(len(self._links), upper, upper_if, lower, lower_if, spec)
        self._links.append(link)
        self._uplinks[lower] = link
        return link

    def _core_link(self, lower: str, spec: LinkSpec | None) -> _Link:
        return self._new_link(self.core.netns, f"l{len(self._links)}", lower, "eth0", spec)

    def add_server(self, name: str = "server", *, addresses: int = 2,
                   link: LinkSpec | None = None) -> Host:
        """A public host with ``addresses`` consecutive addresses in
        203.0.113.0/24 (two for RFC 5780 tests)."""
        self._claim(name)
        if not 1 <= addresses <= 8:
            raise LabError("a server has 1 to 8 addresses")
        first = SERVER_BASE + 8 * self._next_server
        self._next_server += 1
        host = Host(self, name, self._netns(name), [str(first + i) for i in range(addresses)])
        self._core_link(host.netns, link or self.wan.server)
        self.servers.append(host)
        return host

    def add_public_host(self, name: str, *, link: LinkSpec | None = None) -> Host:
        """A host on the internet with no NAT in front of it."""
        self._claim(name)
        addr = PUBLIC_HOST_BASE + self._next_public
        self._next_public += 1
        host = Host(self, name, self._netns(name), [str(addr)])
        self._core_link(host.netns, link or self.wan.public)
        self.public_hosts.append(host)
        return host

    def add_home(self, name: str, *, nat: str | NatProfile = "port-restricted-cone",
                 link: LinkSpec | None = None, hosts: int = 1,
                 upstream: Home | None = None, port_mapping: bool = False) -> Home:
        """A NAT router and ``hosts`` LAN hosts on its bridge. With
        ``upstream`` (a home made by :meth:`add_cgn`) the router sits
        behind that carrier-grade NAT: double NAT. With ``port_mapping``
        the router runs miniupnpd (UPnP IGD, NAT-PMP and PCP on the LAN
        address, port 5351 for the last two) and, on the core, has its
        WAN address from :data:`MAPPING_ROUTER_BASE`."""
        profile = nat_mod.resolve(nat)
        self._claim(name)
        if upstream is not None and not profile.translate:
            raise LabError("a home without NAT cannot sit behind a CGN")
        if not 0 <= hosts <= 12:
            raise LabError("a home has 0 to 12 hosts")
        if port_mapping and (not profile.translate or hosts == 0):
            raise LabError("port mapping needs a NAT router with LAN hosts "
                           "(not the none profile, not a CGN)")
        router = Host(self, f"{name}-router", self._netns(f"{name}-router"), [])
        spec = link or (self.wan.home if upstream is None else None)
        if upstream is None:
            router.addresses.append(self._alloc_router_ip(port_mapping))
            uplink = self._core_link(router.netns, spec)
            uplink.lower_if = "wan"
        else:
            if upstream.hosts:
                raise LabError(f"upstream {upstream.name!r} is a home with hosts, not a CGN")
            router.addresses.append(self._alloc_child_ip(upstream))
            uplink = self._new_link(upstream.router.netns, f"d{len(upstream.children)}",
                                    router.netns, "wan", spec)
        if profile.translate:
            if hosts == 0:
                octet, self._next_cgn = self._next_cgn, self._next_cgn + 1
            else:
                octet, self._next_lan = self._next_lan, self._next_lan + 1
            if octet > 250:
                raise LabError("out of 10.x LAN subnets")
            net = ipaddress.IPv4Network(f"10.{octet}.0.0/24")
        else:
            if self._next_open_lan >= 8:
                raise LabError("at most 8 homes without NAT")
            net = ipaddress.IPv4Network(f"{NO_NAT_LAN_BASE + 16 * self._next_open_lan}/28")
            self._next_open_lan += 1
        gateway = str(net.network_address + 1)
        home = Home(self, name, profile, router, [], str(net), gateway, upstream, uplink,
                    port_mapping=port_mapping)
        router.addresses.append(gateway)
        for i in range(hosts):
            addr = str(net.network_address + (10 if profile.translate else 2) + i)
            home.hosts.append(Host(self, f"{name}-h{i}", self._netns(f"{name}-h{i}"), [addr]))
        if upstream is not None:
            upstream.children.append(home)
        self.homes.append(home)
        return home

    def add_cgn(self, name: str, *, nat: str | NatProfile = "symmetric",
                link: LinkSpec | None = None) -> Home:
        """A carrier-grade NAT: pass it as ``upstream`` to :meth:`add_home`."""
        return self.add_home(name, nat=nat, link=link, hosts=0)

    def add_double_nat_home(self, name: str, *, nat: str | NatProfile = "port-restricted-cone",
                            cgn_nat: str | NatProfile = "symmetric",
                            link: LinkSpec | None = None, hosts: int = 1,
                            port_mapping: bool = False) -> Home:
        """A home behind its own carrier-grade NAT (named ``<name>-cgn``).
        With ``port_mapping`` the home's router (not the CGN) runs
        miniupnpd, which refuses to map: its WAN address is private."""
        cgn = self.add_cgn(f"{name}-cgn", nat=cgn_nat, link=link)
        return self.add_home(name, nat=nat, hosts=hosts, upstream=cgn,
                             port_mapping=port_mapping)

    def add_lan(self, name: str, *, hosts: int = 3, nat: str | NatProfile = "port-restricted-cone",
                link: LinkSpec | None = None, port_mapping: bool = False) -> Home:
        """Several hosts on one bridge (multicast floods: mDNS works), with a
        router to the internet."""
        return self.add_home(name, nat=nat, link=link, hosts=hosts, port_mapping=port_mapping)

    def _alloc_router_ip(self, port_mapping: bool = False) -> str:
        if port_mapping:
            addr = MAPPING_ROUTER_BASE + self._next_mapping_router
            self._next_mapping_router += 1
        else:
            addr = ROUTER_BASE + self._next_router
            self._next_router += 1
        if int(addr) & 0xFF > 250:
            raise LabError("out of router addresses")
        return str(addr)

    def _alloc_child_ip(self, cgn: Home) -> str:
        net = ipaddress.IPv4Network(cgn.lan_cidr)
        used = {h.wan_ip for h in cgn.children}
        for i in range(10, 250):
            candidate = str(net.network_address + i)
            if candidate not in used:
                return candidate
        raise LabError("CGN subnet full")

    @property
    def hosts(self) -> list[Host]:
        """Every namespace of the lab, core first."""
        out = [self.core, *self.servers, *self.public_hosts]
        for home in self.homes:
            out.append(home.router)
            out.extend(home.hosts)
        return out

    def host(self, name: str) -> Host:
        """The host called ``name``."""
        for h in self.hosts:
            if h.name == name:
                return h
        raise LabError(f"no host {name!r} in lab {self.prefix}")

    # -- lifecycle -----------------------------------------------------------

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    @property
    def folder(self) -> str:
        """Where the lab's daemons keep configuration and logs
        (``<state dir>/<prefix>/``); removed at teardown."""
        return os.path.join(state_dir(), self.prefix)

    def _require_up(self) -> None:
        if not self._is_up:
            self.up()

    def _write_state(self) -> None:
        os.makedirs(state_dir(), exist_ok=True)
        state = {
            "pid": os.getpid(),
            "prefix": self.prefix,
            "hosts": {h.name: {"netns": h.netns, "addresses": h.addresses} for h in self.hosts},
        }
        path = os.path.join(state_dir(), f"{self.prefix}.json")
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(state, f, indent=1)
        os.replace(tmp, path)

    def up(self) -> Lab:
        """Build every namespace, link, address, route and rule."""
        if self._is_up:
            return self
        if self._closed:
            raise LabError("lab already torn down")
        started = time.monotonic()
        self._is_up = True
        try:
            self._write_state()
            self._build()
        except BaseException:
            self.close()
            raise
        self.bringup_seconds = time.monotonic() - started
        logger.info("lab %s up in %.3f s (%d namespaces, %d links)", self.prefix,
                    self.bringup_seconds, len(self.hosts), len(self._links))
        return self

    def _build(self) -> None:
        all_ns = [h.netns for h in self.hosts]
        ns.add_netns(all_ns)
        routers = {self.core.netns} | {home.router.netns for home in self.homes}
        base = {
            "net.ipv6.conf.all.disable_ipv6": "1",
            "net.ipv6.conf.default.disable_ipv6": "1",
            "net.ipv4.conf.all.rp_filter": "0",
            "net.ipv4.conf.default.rp_filter": "0",
        }
        fwd = {"net.ipv4.ip_forward": "1", "net.ipv4.conf.all.send_redirects": "0",
               "net.ipv4.conf.default.send_redirects": "0"}
        for name in all_ns:
            ns.write_sysctls(name, {**base, **(fwd if name in routers else {})})
        impaired = [link for link in self._links if link.spec is not None]
        if impaired:
            self._start_forwarder(impaired)
        # 1. creators: bridges and veth pairs, from the upper side.
        create: dict[str, list[str]] = {}
        for home in self.homes:
            create.setdefault(home.router.netns, []).append(
                "link add br0 type bridge mcast_snooping 0")
            for i, h in enumerate(home.hosts):
                create[home.router.netns].append(
                    f"link add h{i} type veth peer name eth0 netns {h.netns}")
        for link in self._links:
            if link.spec is None:
                create.setdefault(link.upper, []).append(
                    f"link add {link.upper_if} type veth peer name {link.lower_if} "
                    f"netns {link.lower}")
        self._parallel([functools.partial(ns.ip_batch, n, c) for n, c in create.items()])
        # 2. addresses, routes, links up.
        conf: dict[str, list[str]] = {h.netns: ["link set lo up"] for h in self.hosts}
        core = conf[self.core.netns]
        for link in self._links:
            if link.upper == self.core.netns:
                core += [f"addr add {CORE_GATEWAY}/32 dev {link.upper_if}",
                         f"link set {link.upper_if} up"]
        for host in [*self.servers, *self.public_hosts]:
            link = self._uplinks[host.netns]
            c = conf[host.netns]
            c += [f"addr add {a}/32 dev eth0" for a in host.addresses]
            c += ["link set eth0 up", f"route add default via {CORE_GATEWAY} dev eth0 onlink"]
            core += [f"route add {a}/32 dev {link.upper_if}" for a in host.addresses]
        for home in self.homes:
            link = home.link
            r = conf[home.router.netns]
            plen = ipaddress.IPv4Network(home.lan_cidr).prefixlen
            r += [f"addr add {home.lan_gateway}/{plen} dev br0", "link set br0 up"]
            for i, h in enumerate(home.hosts):
                r += [f"link set h{i} master br0", f"link set h{i} up"]
                conf[h.netns] += [f"addr add {h.ip}/{plen} dev eth0", "link set eth0 up",
                                  f"route add default via {home.lan_gateway} dev eth0",
                                  "route add 224.0.0.0/4 dev eth0"]
            if home.upstream is None:
                r += [f"addr add {home.wan_ip}/32 dev wan", "link set wan up",
                      f"route add default via {CORE_GATEWAY} dev wan onlink"]
                core.append(f"route add {home.wan_ip}/32 dev {link.upper_if}")
                if not home.nat.translate:
                    core.append(f"route add {home.lan_cidr} via {home.wan_ip} "
                                f"dev {link.upper_if} onlink")
            else:
                up = home.upstream
                uplen = ipaddress.IPv4Network(up.lan_cidr).prefixlen
                r += [f"addr add {home.wan_ip}/{uplen} dev wan", "link set wan up",
                      f"route add default via {up.lan_gateway} dev wan"]
                conf[up.router.netns] += [f"link set {link.upper_if} master br0",
                                          f"link set {link.upper_if} up"]
        self._parallel([functools.partial(ns.ip_batch, n, c) for n, c in conf.items()])
        # 3. rules.
        jobs: list[Callable[[], None]] = [
            lambda: ns.nft_load(self.core.netns, nat.render_core_ruleset())]
        jobs += [home.load_rules for home in self.homes]
        self._parallel(jobs)
        # 4. daemons: miniupnpd in the routers with port mapping.
        for home in self.homes:
            if home.port_mapping:
                home.miniupnpd = MiniUpnpd(home, os.path.join(self.folder, home.name))
        self._parallel([home.miniupnpd.start for home in self.homes if home.miniupnpd])

    @staticmethod
    def _parallel(jobs: Sequence[Callable[[], object]]) -> None:
        if not jobs:
            return
        with ThreadPoolExecutor(max_workers=min(8, len(jobs))) as pool:
            for future in [pool.submit(j) for j in jobs]:
                future.result()

    def _start_forwarder(self, links: list[_Link]) -> None:
        config = {"links": [{"id": l.id, "a": [l.upper, l.upper_if], "b": [l.lower, l.lower_if],
                             "spec": (l.spec or LinkSpec()).to_json()} for l in links]}
        proc = subprocess.Popen(
            [sys.executable, "-m", "dtx.lab.forwarder", "--lab", self.prefix],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self._forwarder = proc
        assert proc.stdin is not None and proc.stdout is not None  # noqa: S101 (Popen with PIPE)
        proc.stdin.write(json.dumps(config) + "\n")
        proc.stdin.flush()
        self._await_line(proc, "ready")

    @staticmethod
    def _await_line(proc: subprocess.Popen[str], expected: str) -> None:
        if proc.stdout is None:
            raise LabError("forwarder has no stdout")
        ready, _, _ = select.select([proc.stdout], [], [], READY_TIMEOUT)
        line = proc.stdout.readline().strip() if ready else ""
        if line != expected:
            raise LabError(f"link forwarder did not answer {expected!r} "
                           f"(got {line!r}, exit code {proc.poll()})")

    def close(self) -> None:
        """Tear everything down: processes, sockets, forwarder, namespaces.
        Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for sock in self._sockets:
            sock.close()
        for home in self.homes:
            if home.miniupnpd is not None:
                home.miniupnpd.stop()
        live = [p for p in self._processes if p.poll() is None]
        ns.kill_pids([p.pid for p in live])
        for p in self._processes:
            try:
                p.wait(timeout=2)
            except subprocess.TimeoutExpired:
                logger.warning("process %d survived SIGKILL", p.pid)
        if self._forwarder is not None:
            fwd = self._forwarder
            if fwd.stdin is not None:
                fwd.stdin.close()
            try:
                fwd.wait(timeout=2)
            except subprocess.TimeoutExpired:
                fwd.kill()
                fwd.wait(timeout=2)
            if fwd.stdout is not None:
                fwd.stdout.close()
        if self._is_up:
            ns.delete_netns([h.netns for h in self.hosts])
        shutil.rmtree(self.folder, ignore_errors=True)
        try:
            os.unlink(os.path.join(state_dir(), f"{self.prefix}.json"))
        except FileNotFoundError:
            pass
        logger.info("lab %s torn down", self.prefix)

    @staticmethod
    def cleanup_stale() -> list[str]:
        """Remove what crashed labs left: namespaces, forwarders, daemons
        (miniupnpd), state files and folders of labs (``dtx`` + 6 hex)
        whose owner process is dead.
        Returns the prefixes removed."""
        prefixes: dict[str, list[str]] = {}
        for name in ns.list_netns():
            head = name.split("-", 1)[0]
            if PREFIX_RE.match(head):
                prefixes.setdefault(head, []).append(name)
        if os.path.isdir(state_dir()):
            for entry in os.listdir(state_dir()):
                head = entry.split(".", 1)[0]
                if PREFIX_RE.match(head):
                    prefixes.setdefault(head, [])
        removed = []
        for prefix, names in sorted(prefixes.items()):
            path = os.path.join(state_dir(), f"{prefix}.json")
            try:
                with open(path, encoding="utf-8") as f:
                    owner = int(json.load(f)["pid"])
            except (OSError, ValueError, KeyError):
                owner = 0
            if owner and ns.pid_alive(owner):
                continue
            ns.kill_pids(ns.processes_with_arg(prefix))
            ns.delete_netns(names)
            for suffix in (".json", ".json.tmp"):
                try:
                    os.unlink(os.path.join(state_dir(), prefix + suffix))
                except FileNotFoundError:
                    pass
            shutil.rmtree(os.path.join(state_dir(), prefix), ignore_errors=True)
            removed.append(prefix)
            logger.info("removed stale lab %s (%d namespaces)", prefix, len(names))
        return removed

    # -- changes at run time -------------------------------------------------

    def _link_of(self, target: Home | Host) -> _Link:
        netns = target.router.netns if isinstance(target, Home) else target.netns
        try:
            return self._uplinks[netns]
        except KeyError:
            raise LabError(f"{target.name} has no uplink") from None

    def set_link(self, target: Home | Host, spec: LinkSpec) -> None:
        """Change the impairment of ``target``'s uplink. Only links built
        with a LinkSpec (forwarded) can change; returns once applied."""
        self._require_up()
        link = self._link_of(target)
        if link.spec is None or self._forwarder is None:
            raise LabError(f"{target.name}'s uplink is a plain veth; give it a LinkSpec "
                           f"(even LinkSpec()) when adding it to change it later")
        with self._forwarder_lock:
            proc = self._forwarder
            if proc.stdin is None:
                raise LabError("forwarder has no stdin")
            proc.stdin.write(json.dumps({"id": link.id, "spec": spec.to_json()}) + "\n")
            proc.stdin.flush()
            self._await_line(proc, "ok")
        link.spec = spec

    def _public_addresses(self, target: Home | Host | str) -> list[str]:
        if isinstance(target, str):
            return [target]
        if isinstance(target, Home):
            return [target.public_ip]
        return list(target.addresses)

    def _block_elements(self, a: Home | Host | str, b: Home | Host | str) -> str:
        pairs = []
        for x in self._public_addresses(a):
            for y in self._public_addresses(b):
                pairs += [f"{x} . {y}", f"{y} . {x}"]
        return ", ".join(pairs)

    def block(self, a: Home | Host | str, b: Home | Host | str) -> None:
        """Drop UDP between the public addresses of ``a`` and ``b`` in the core."""
        self._require_up()
        ns.nft_load(self.core.netns, f"add element ip {nat.TABLE} blocked "
                                     f"{{ {self._block_elements(a, b)} }}\n")

    def unblock(self, a: Home | Host | str, b: Home | Host | str) -> None:
        """Undo :meth:`block`."""
        self._require_up()
        ns.nft_load(self.core.netns, f"delete element ip {nat.TABLE} blocked "
                                     f"{{ {self._block_elements(a, b)} }}\n")

    def _renumber(self, home: Home) -> str:
        self._require_up()
        old = home.wan_ip
        if home.upstream is None:
            new = self._alloc_router_ip(home.port_mapping)
            plen = 32
            link = home.link
            core = [f"route add {new}/32 dev {link.upper_if}", f"route del {old}/32"]
            if not home.nat.translate:
                core.append(f"route replace {home.lan_cidr} via {new} dev {link.upper_if} onlink")
        else:
            new = self._alloc_child_ip(home.upstream)
            plen = ipaddress.IPv4Network(home.upstream.lan_cidr).prefixlen
            core = []
        ns.ip_batch(home.router.netns, [f"addr add {new}/{plen} dev wan",
                                        f"addr del {old}/{plen} dev wan"])
        if home.upstream is None:
            ns.ip_batch(self.core.netns, core)
        else:
            ns.ip_batch(home.router.netns,
                        [f"route replace default via {home.upstream.lan_gateway} dev wan"])
        home.router.addresses[0] = new
        home.load_rules()
        home.flush_nat()
        self._write_state()
        logger.info("lab %s: %s moved from %s to %s", self.prefix, home.name, old, new)
        return new
