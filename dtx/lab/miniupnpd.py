"""A home router's port-mapping service: Debian's ``miniupnpd`` (package
``miniupnpd-nftables``: UPnP IGD, NAT-PMP and PCP in one daemon) inside
the router's namespace of a lab home.

:class:`MiniUpnpd` runs the daemon in the foreground (``-d``, its log on
stderr into a file) with a configuration written for the home into a
folder of the lab's own: listening on the LAN bridge, the WAN interface as
external, NAT-PMP and PCP on (``enable_natpmp=yes`` turns on both in
version 2.3), UPnP IGD on, secure mode (a client maps ports to its own
address only), one ``allow`` rule for the home's LAN (external ports
1024-65535, any internal port) and a final ``deny``. The internal range
is open on purpose: for an internal port that no rule allows, miniupnpd
2.3.1 tries every external port in turn, logging each, before it answers
NAT-PMP, and serves nobody meanwhile (no answer within 30 s, measured).
Its pid file, lease file and MiniSSDPd socket path are in that folder,
so nothing of the machine's is read or written; with ``-d`` its log goes
to a file there, not to the machine's syslog.

miniupnpd's nftables back end adds rules to chains it does not create, all
in one ``inet`` table (:data:`TABLE`); :func:`render_ruleset` creates them
and hooks them just before the lab's own chains (``dtx.lab.nat``), so an
explicit mapping wins over a learned full-cone entry for the same port:

* ``prerouting_miniupnpd`` (nat, priority ``dstnat - 10``): one DNAT rule
  per mapping, ``iif wan``, protocol, external port;
* ``miniupnpd`` (filter, forward, priority ``filter - 10``, policy accept):
  one accept rule per mapping; the lab's ``forward`` chain admits the
  DNATed flow anyway (``ct status dnat accept``);
* ``postrouting_miniupnpd`` (nat, priority ``srcnat - 10``): SNAT rules of
  PCP PEER requests.

miniupnpd refuses to map when the WAN address is private or reserved,
which every documentation address is (``addr_is_reserved()``: NAT-PMP
gets Network Failure, a PCP MAP No Resources); version 2.3.1 has no option to
allow such an address (``ext_allow_private_ipv4`` came in 2.3.9) and
rejects a reserved ``ext_ip=``. So a home with port mapping on the core
gets a WAN address outside those ranges (see ``topology.MAPPING_ROUTER_BASE``
and docs/nat-lab.md); one behind a CGN keeps its 10.x address and gets
the refusals a real double-NAT router gives.

``start()`` returns once the daemon answers a NAT-PMP external address
request on the router's LAN address, or raises
:class:`~dtx.errors.LabError` with the end of its log.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dtx.errors import DecodeError, LabError
from dtx.lab import ns
from dtx.wire.natpmp import (SERVER_PORT, ExternalAddressRequest, ExternalAddressResponse,
                             decode_natpmp_response, encode_natpmp)

if TYPE_CHECKING:
    from dtx.lab.topology import Home

__all__ = ["MiniUpnpd", "TABLE", "miniupnpd_missing", "render_config", "render_ruleset"]

TABLE = "miniupnpd"
FORWARD_CHAIN = "miniupnpd"
PREROUTING_CHAIN = "prerouting_miniupnpd"
POSTROUTING_CHAIN = "postrouting_miniupnpd"
#: The lowest port a LAN host may map (and have mapped to).
MIN_MAPPED_PORT = 1024
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
_PROBE_INTERVAL = 0.1
_PROGRAM = "miniupnpd"
_SBIN = "/usr/sbin/miniupnpd"


def _program() -> str | None:
    return shutil.which(_PROGRAM) or (_SBIN if os.access(_SBIN, os.X_OK) else None)


def miniupnpd_missing() -> str | None:
    """Why miniupnpd cannot be used here, or None when it can (its
    nftables build: the lab's rules are nftables)."""
    program = _program()
    if program is None:
        return ("needs miniupnpd (Debian package miniupnpd-nftables): "
                "run scripts/setup as root")
    try:
        version = subprocess.run([program, "--version"], capture_output=True, text=True,
                                 timeout=5.0, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{program} --version failed: {exc}"
    if "nftables" not in version.stdout + version.stderr:
        return (f"{program} is not the nftables build of miniupnpd "
                "(Debian package miniupnpd-nftables, not miniupnpd-iptables)")
    return None


def render_ruleset() -> str:
    """The ``inet`` table miniupnpd writes its rules into (for ``nft -f``),
    replacing any previous one (which also drops its mappings)."""
    return (
        f"table inet {TABLE} {{}}\ndelete table inet {TABLE}\n"
        f"table inet {TABLE} {{\n"
        f"  chain {FORWARD_CHAIN} {{\n  }}\n"
        f"  chain {PREROUTING_CHAIN} {{\n  }}\n"
        f"  chain {POSTROUTING_CHAIN} {{\n  }}\n"
        f"  chain forward {{\n"
        f"    type filter hook forward priority filter - 10; policy accept;\n"
        f"    jump {FORWARD_CHAIN}\n"
        f"  }}\n"
        f"  chain prerouting {{\n"
        f"    type nat hook prerouting priority dstnat - 10; policy accept;\n"
        f"    jump {PREROUTING_CHAIN}\n"
        f"  }}\n"
        f"  chain postrouting {{\n"
        f"    type nat hook postrouting priority srcnat - 10; policy accept;\n"
        f"    jump {POSTROUTING_CHAIN}\n"
        f"  }}\n"
        f"}}\n"
    )


def render_config(*, wan: str, lan: str, lan_cidr: str, folder: str, device_uuid: str) -> str:
    """The configuration file (``-f``) of one home's miniupnpd."""
    external = f"{MIN_MAPPED_PORT}-65535"
    lines = [
        f"ext_ifname={wan}",
        f"listening_ip={lan}",
        "ipv6_disable=yes",
        "enable_natpmp=yes",
        "enable_upnp=yes",
        "secure_mode=yes",
        "http_port=0",
        "system_uptime=no",
        f"upnp_table_name={TABLE}",
        f"upnp_nat_table_name={TABLE}",
        f"upnp_forward_chain={FORWARD_CHAIN}",
        f"upnp_nat_chain={PREROUTING_CHAIN}",
        f"upnp_nat_postrouting_chain={POSTROUTING_CHAIN}",
        f"lease_file={os.path.join(folder, 'leases')}",
        f"minissdpdsocket={os.path.join(folder, 'minissdpd.sock')}",
        f"uuid={device_uuid}",
        f"allow {external} {lan_cidr} 1-65535",
        "deny 0-65535 0.0.0.0/0 0-65535",
    ]
    return "\n".join(lines) + "\n"


@dataclass(eq=False)
class MiniUpnpd:
    """One home router's miniupnpd; ``start()`` then ``stop()``. The lab
    starts it in ``up()`` for a home added with ``port_mapping=True`` and
    stops it at teardown."""

    home: Home
    folder: str
    """Where its configuration, log, pid and lease files go."""
    device_uuid: str = field(default_factory=lambda: str(uuid.uuid4()))
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def config_path(self) -> str:
        return os.path.join(self.folder, "miniupnpd.conf")

    @property
    def log_path(self) -> str:
        return os.path.join(self.folder, "miniupnpd.log")

    @property
    def address(self) -> tuple[str, int]:
        """Where LAN hosts send NAT-PMP and PCP requests."""
        return (self.home.lan_gateway, SERVER_PORT)

    @property
    def pid(self) -> int | None:
        """The daemon's pid while it runs."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def start(self) -> None:
        program = _program()
        if program is None:
            raise LabError(miniupnpd_missing() or "no miniupnpd")
        if self._proc is not None:
            raise LabError(f"miniupnpd of {self.home.name} already started")
        os.makedirs(self.folder, exist_ok=True)
        router = self.home.router
        ns.nft_load(router.netns, render_ruleset())
        with open(self.config_path, "w", encoding="utf-8") as f:
            f.write(render_config(wan="wan", lan="br0", lan_cidr=self.home.lan_cidr,
                                  folder=self.folder, device_uuid=self.device_uuid))
        argv = [program, "-d", "-f", self.config_path,
                "-P", os.path.join(self.folder, "miniupnpd.pid")]
        options: dict[str, Any] = {"stdin": subprocess.DEVNULL, "stderr": subprocess.STDOUT}
        with open(self.log_path, "ab") as log:
            self._proc = router.popen(argv, stdout=log, **options)
        if not self._answers():
            why = "exited" if self._proc.poll() is not None else "did not answer NAT-PMP"
            tail = self.log_text()[-2000:]
            self.stop()
            raise LabError(f"miniupnpd of {self.home.name} {why} on "
                           f"{self.address[0]}:{self.address[1]}; log:\n{tail}")

    def _answers(self) -> bool:
        """Ready when it answers an external address request sent from the
        router itself to its LAN address (again every 0.1 s until the
        deadline); not when the process exits."""
        sock = ns.socket_in(self.home.router.netns, socket.AF_INET, socket.SOCK_DGRAM)
        with sock:
            sock.bind((self.home.lan_gateway, 0))
            sock.settimeout(_PROBE_INTERVAL)
            request = encode_natpmp(ExternalAddressRequest())
            deadline = time.monotonic() + START_TIMEOUT
            while time.monotonic() < deadline:
                if self._proc is None or self._proc.poll() is not None:
                    return False
                sock.sendto(request, self.address)
                try:
                    data, _ = sock.recvfrom(64)
                    if isinstance(decode_natpmp_response(data), ExternalAddressResponse):
                        return True
                except (TimeoutError, ConnectionRefusedError, DecodeError):
                    continue
        return False

    def log_text(self) -> str:
        """The log so far ("" before there is one)."""
        return ns.read_log(self.log_path)

    def stop(self) -> str:
        """SIGTERM (it removes nothing from the ruleset on the way out),
        SIGKILL after :data:`STOP_TIMEOUT`; returns the log. Safe to call
        twice."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=STOP_TIMEOUT)
        return self.log_text()
