"""The NAT lab: emulated homes behind real kernel NATs (Linux network
namespaces, veth and TAP links, nftables), for tests, ``bench/`` and demos.

Needs root. See docs/nat-lab.md.
"""

import os
import shutil

from dtx.lab.nat import Filtering, Mapping, NatProfile, PROFILES
from dtx.lab.netem import LinkSpec
from dtx.lab.topology import STANDARD_WAN, Home, Host, Lab, WanProfile


def lab_missing() -> str | None:
    """Why the NAT lab cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return ("needs root: the NAT lab creates network namespaces, veth/TAP links "
                "and nftables rules (CI runs as root)")
    for tool, package in (("ip", "iproute2"), ("nft", "nftables"), ("conntrack", "conntrack")):
        if shutil.which(tool) is None:
            return f"needs the {tool} command (package {package}; scripts/setup installs it)"
    if not os.path.exists("/dev/net/tun"):
        return "needs /dev/net/tun: impaired lab links are TAP devices"
    return None


__all__ = [
    "Filtering",
    "Home",
    "Host",
    "Lab",
    "LinkSpec",
    "Mapping",
    "NatProfile",
    "PROFILES",
    "STANDARD_WAN",
    "WanProfile",
    "lab_missing",
]
