"""The NAT lab: emulated homes behind real kernel NATs (Linux network
namespaces, veth and TAP links, nftables), for tests, ``bench/`` and demos.

Needs root. See docs/nat-lab.md.
"""

from dtx.lab.nat import Filtering, Mapping, NatProfile, PROFILES
from dtx.lab.netem import LinkSpec
from dtx.lab.topology import STANDARD_WAN, Home, Host, Lab, WanProfile

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
]
