"""NAT behaviour of a lab router, named in RFC 4787's terms, and the
nftables rule set that produces it.

Linux conntrack already gives "address and port dependent filtering" (only
replies to a tracked flow come back) and, with port-preserving masquerade,
"endpoint independent mapping". The other behaviours need explicit rules:

* every router learns, after source NAT, ``public port -> LAN address . port``
  in a dynamic map (``@mappings``) and ``public port . remote address`` in a
  dynamic set (``@contacted``);
* endpoint independent filtering (full cone) DNATs any inbound UDP whose
  destination port is in ``@mappings``;
* address dependent filtering (restricted cone) does so only when the sender's
  address is in ``@contacted`` for that port;
* address dependent mapping, and endpoint independent mapping without port
  preservation, pick the public port by ``jhash`` of the flow's inside
  endpoint (and remote address) instead of masquerade's port preservation;
* hairpinning DNATs LAN packets sent to the public address by the same map.

Unsolicited inbound packets are dropped silently in the router's input
chain: letting the router's own stack answer them with ICMP port unreachable
confirms a conntrack entry that later forces a new port on the LAN host's
outgoing flow (see ``answer_unsolicited`` and docs/nat-lab.md).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from dtx.errors import LabError

TABLE = "lab"
#: Range from which hashed (non port-preserving) public ports are taken.
HASH_PORT_BASE = 40000
HASH_PORT_COUNT = 20000


class Mapping(enum.Enum):
    """RFC 4787 section 4.1 mapping behaviour."""

    ENDPOINT_INDEPENDENT = "endpoint-independent"
    ADDRESS_DEPENDENT = "address-dependent"
    ADDRESS_AND_PORT_DEPENDENT = "address-and-port-dependent"


class Filtering(enum.Enum):
    """RFC 4787 section 5 filtering behaviour."""

    ENDPOINT_INDEPENDENT = "endpoint-independent"
    ADDRESS_DEPENDENT = "address-dependent"
    ADDRESS_AND_PORT_DEPENDENT = "address-and-port-dependent"


@dataclass(frozen=True)
class NatProfile:
    """How one lab router translates and filters UDP.

    ``translate=False`` is the ``none`` profile: the router only routes and
    its LAN uses public addresses. ``udp_timeout`` (seconds) is the conntrack
    UDP timeout, both unreplied and "stream", and the lifetime of learned
    map entries (refreshed by outgoing packets only).
    """

    mapping: Mapping = Mapping.ENDPOINT_INDEPENDENT
    filtering: Filtering = Filtering.ADDRESS_AND_PORT_DEPENDENT
    port_preservation: bool = True
    hairpin: bool = True
    udp_timeout: int = 120
    translate: bool = True
    answer_unsolicited: bool = False

    def __post_init__(self) -> None:
        if self.udp_timeout < 1:
            raise LabError(f"udp_timeout must be at least 1 s, not {self.udp_timeout}")
        if self.port_preservation and self.mapping is not Mapping.ENDPOINT_INDEPENDENT:
            raise LabError("port preservation is only implemented with "
                           "endpoint-independent mapping")

    @staticmethod
    def named(name: str) -> NatProfile:
        """The preset called ``name`` (see :data:`PROFILES`)."""
        try:
            return PROFILES[name]
        except KeyError:
            known = ", ".join(sorted(PROFILES))
            raise LabError(f"unknown NAT profile {name!r}; known: {known}") from None

    def describe(self) -> str:
        """Short human-readable summary, e.g. for tables."""
        if not self.translate:
            return "no NAT"
        return (f"mapping {self.mapping.value}, filtering {self.filtering.value}, "
                f"ports {'preserved' if self.port_preservation else 'random'}, "
                f"hairpin {'on' if self.hairpin else 'off'}, udp timeout {self.udp_timeout} s")


PROFILES: dict[str, NatProfile] = {
    "none": NatProfile(translate=False, filtering=Filtering.ENDPOINT_INDEPENDENT),
    "full-cone": NatProfile(filtering=Filtering.ENDPOINT_INDEPENDENT),
    "restricted-cone": NatProfile(filtering=Filtering.ADDRESS_DEPENDENT),
    "port-restricted-cone": NatProfile(filtering=Filtering.ADDRESS_AND_PORT_DEPENDENT),
    "symmetric": NatProfile(mapping=Mapping.ADDRESS_AND_PORT_DEPENDENT,
                            filtering=Filtering.ADDRESS_AND_PORT_DEPENDENT,
                            port_preservation=False),
}


def resolve(nat: str | NatProfile) -> NatProfile:
    """A profile from a preset name or a profile."""
    return nat if isinstance(nat, NatProfile) else NatProfile.named(nat)


def conntrack_sysctls(profile: NatProfile) -> dict[str, str]:
    """Per-namespace conntrack sysctls that set the UDP binding timeout."""
    t = str(profile.udp_timeout)
    return {
        "net.netfilter.nf_conntrack_udp_timeout": t,
        "net.netfilter.nf_conntrack_udp_timeout_stream": t,
    }


def render_ruleset(profile: NatProfile, *, wan: str, lan: str, public_ip: str,
                   lan_cidr: str) -> str:
    """The whole nftables rule set (for ``nft -f``) of one router.

    It replaces any previous ``ip lab`` table atomically, which also empties
    the learned maps.
    """
    head = f"table ip {TABLE} {{}}\ndelete table ip {TABLE}\n"
    if not profile.translate:
        return head + f"table ip {TABLE} {{\n}}\n"
    t = profile.udp_timeout
    pre: list[str] = []
    if profile.filtering is Filtering.ENDPOINT_INDEPENDENT:
        pre.append(f'iifname "{wan}" meta l4proto udp '
                   f"dnat ip addr . port to udp dport map @mappings")
    elif profile.filtering is Filtering.ADDRESS_DEPENDENT:
        pre.append(f'iifname "{wan}" meta l4proto udp udp dport . ip saddr @contacted '
                   f"dnat ip addr . port to udp dport map @mappings")
    if profile.hairpin:
        pre.append(f'iifname "{lan}" ip daddr {public_ip} meta l4proto udp '
                   f"dnat ip addr . port to udp dport map @mappings")
    post: list[str] = []
    if profile.hairpin:
        post.append(f'oifname "{lan}" ip saddr {lan_cidr} ct status dnat snat ip to {public_ip}')
    hashed = f"mod {HASH_PORT_COUNT} offset {HASH_PORT_BASE}"
    if profile.mapping is Mapping.ENDPOINT_INDEPENDENT and profile.port_preservation:
        post.append(f'oifname "{wan}" masquerade')
    elif profile.mapping is Mapping.ENDPOINT_INDEPENDENT:
        post.append(f'oifname "{wan}" meta l4proto udp snat ip to {public_ip} : '
                    f"jhash ip saddr . udp sport {hashed}")
        post.append(f'oifname "{wan}" masquerade')
    elif profile.mapping is Mapping.ADDRESS_DEPENDENT:
        post.append(f'oifname "{wan}" meta l4proto udp snat ip to {public_ip} : '
                    f"jhash ip saddr . udp sport . ip daddr {hashed}")
        post.append(f'oifname "{wan}" masquerade')
    else:
        post.append(f'oifname "{wan}" masquerade fully-random')
    inp = [
        "ct state established,related accept",
        'iifname "lo" accept',
    ]
    if not profile.hairpin:
        inp.append(f'iifname "{lan}" ip daddr {public_ip} meta l4proto udp drop')
    inp.append(f'iifname "{lan}" accept')
    if profile.answer_unsolicited:
        inp.append(f'iifname "{wan}" meta l4proto udp accept')

    def chain(name: str, hook: str, body: list[str], policy: str = "accept") -> str:
        lines = "\n".join(f"    {r}" for r in body)
        return f"  chain {name} {{\n    {hook}; policy {policy};\n{lines}\n  }}\n"

    return head + (
        f"table ip {TABLE} {{\n"
        f"  map mappings {{ type inet_service : ipv4_addr . inet_service; "
        f"flags dynamic,timeout; timeout {t}s; }}\n"
        f"  set contacted {{ type inet_service . ipv4_addr; "
        f"flags dynamic,timeout; timeout {t}s; }}\n"
        + chain("prerouting", "type nat hook prerouting priority dstnat", pre)
        + chain("postrouting", "type nat hook postrouting priority srcnat", post)
        + chain("learn", "type filter hook postrouting priority 200", [
            f'oifname "{wan}" meta l4proto udp update @mappings '
            f"{{ udp sport : ct original ip saddr . ct original proto-src }}",
            f'oifname "{wan}" meta l4proto udp update @contacted {{ udp sport . ip daddr }}',
        ])
        + chain("forward", "type filter hook forward priority filter", [
            "ct state established,related accept",
            f'iifname "{lan}" accept',
            "ct status dnat accept",
        ], policy="drop")
        + chain("input", "type filter hook input priority filter", inp, policy="drop")
        + "}\n"
    )


def render_core_ruleset() -> str:
    """The core router's rules: a set of (source, destination) pairs whose
    UDP is dropped, used by ``Lab.block`` to cut a path mid-test."""
    return (
        f"table ip {TABLE} {{}}\ndelete table ip {TABLE}\n"
        f"table ip {TABLE} {{\n"
        f"  set blocked {{ type ipv4_addr . ipv4_addr; }}\n"
        f"  chain forward {{\n"
        f"    type filter hook forward priority filter; policy accept;\n"
        f"    meta l4proto udp ip saddr . ip daddr @blocked drop\n"
        f"  }}\n"
        f"}}\n"
    )
