"""Two XMPP domains federated in the NAT lab, for the tests that need them.

example.org and example.net, each on a server host of its own running
Prosody (server-to-server links by dialback) and coturn (its own TURN REST
secret, whose credentials that Prosody hands out by XEP-0215); a third
host runs dnsmasq (:mod:`dtx.lab.dns`), the only resolver either Prosody
asks, answering for these two domains and nothing else.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from dtx.lab import Home, Host, Lab
from dtx.lab.coturn import CoturnServer, coturn_missing
from dtx.lab.dns import dnsmasq_missing, start_dnsmasq
from dtx.lab.prosody import (
    Federation,
    ProsodyServer,
    TurnExternal,
    prosody_missing,
    unbound_missing,
)

DOMAINS = ("example.org", "example.net")


@dataclass(frozen=True)
class Domain:
    """One domain's server host and what runs there."""

    host: Host
    prosody: ProsodyServer
    coturn: CoturnServer


@dataclass(frozen=True)
class Federated:
    dns: Host
    dns_log: Path
    """dnsmasq's log of every question, with who asked."""
    domains: dict[str, Domain]
    homes: dict[str, Home]


@contextmanager
def federated_domains(lab: Lab, tmp_path: Path, homes: dict[str, str], *, ttl: int,
                      turn_user: str | None = None) -> Iterator[Federated]:
    """Build ``lab`` (not up yet) with the DNS host, one server host per
    domain and the ``homes`` (name -> NAT profile), bring it up and start
    dnsmasq, then each domain's coturn and Prosody; Prosody stops after
    (each coturn too: its ``stop()`` returns the log, again)."""
    for reason in (prosody_missing(), coturn_missing(), dnsmasq_missing(), unbound_missing()):
        if reason:
            pytest.skip(reason)
    dns = lab.add_server("dns", addresses=1)
    hosts = {domain: lab.add_server(domain.split(".")[1], addresses=1) for domain in DOMAINS}
    added = {name: lab.add_home(name, nat=nat) for name, nat in homes.items()}
    lab.up()
    dns_log = start_dnsmasq(dns, {d: h.ip for d, h in hosts.items()}, tmp_path / "dns")
    domains: dict[str, Domain] = {}
    try:
        for domain, host in hosts.items():
            secret = f"secret-of-{domain}"
            coturn = CoturnServer(secret, realm=domain, host=host,
                                  folder=str(tmp_path / f"turn-{domain}"))
            coturn.start()
            prosody = ProsodyServer(
                "vcard4", host=host, domain=domain, folder=str(tmp_path / domain),
                turn=TurnExternal(secret=secret, host=host.ip, port=coturn.port, ttl=ttl,
                                  user=turn_user),
                federation=Federation(nameserver=dns.ip))
            domains[domain] = Domain(host, prosody, coturn)
            prosody.start()
        yield Federated(dns, dns_log, domains, added)
    finally:
        for d in domains.values():
            d.prosody.stop()
            d.coturn.stop()
