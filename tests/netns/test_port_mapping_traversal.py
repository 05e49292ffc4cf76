"""Hard NATs go direct with a port mapping on either router, in the NAT lab.

Real kernel NAT in namespaces, Debian's miniupnpd on the routers that map
(NAT-PMP and PCP), a real rendezvous process, and devices whose sockets
live in the homes, with ``PeerConfig.port_mapping``: each device asks its
own router, from its own socket, and registers the mapped address as a
candidate. The table (also in docs/nat-traversal.md): without port
mapping and without birthday probing every pair is direct except
symmetric × port-restricted-cone and symmetric × symmetric
(``test_traversal.py``); with a mapping on either router, all 15 pairs are
direct. The rendezvous here runs without its mapping check
(``--no-mapping-port``), so no birthday search helps: what goes direct,
goes direct by the mapping.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dtx.aio.peer import PeerConfig
from dtx.identity import generate_identity, save_identity
from dtx.lab import STANDARD_WAN, Lab
from dtx.lab.miniupnpd import miniupnpd_missing
from dtx.lab.topology import Home

from .test_lan import JsonLines
from .test_traversal import PROFILES, exchange, expected_path
from .traversal_helpers import (
    device_peer,
    rendezvous_scene,
    server_address,
    start_rendezvous,
    write_vcards,
)

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(miniupnpd_missing() is not None,
                       reason=f"port mapping needs miniupnpd: {miniupnpd_missing()}"),
]

TV = "tv@example.org/living-room"
REMOTE = "remote@example.org/phone"
MAPPING_WITHIN = 5.0
"""Seconds for the router's answer (on the LAN: a few ms)."""


def dtx(*args: str) -> list[str]:
    return [sys.executable, "-m", "dtx.cli", *args]


def _mapping_side(nat_a: str, nat_b: str) -> str | None:
    """Which router maps: the TV's, unless it does not translate (a
    ``none`` home has no NAT to map on); None for none × none."""
    if nat_b != "none":
        return "b"
    return "a" if nat_a != "none" else None


PAIRS = [(a, b, _mapping_side(a, b))
         for a, b in itertools.combinations_with_replacement(PROFILES, 2)]
# The hard pairs with the mapping on the other side too.
PAIRS += [("symmetric", "symmetric", "a"), ("port-restricted-cone", "symmetric", "a"),
          ("symmetric", "port-restricted-cone", "a")]


def run_pair(lab: Lab, tmp_path: Path, nat_a: str, nat_b: str, mapping: str | None, *,
             double: bool = False) -> dict[str, object]:
    server = lab.add_server("rdv")
    home_a = (lab.add_double_nat_home("a", nat=nat_a, port_mapping=mapping == "a") if double
              else lab.add_home("a", nat=nat_a, port_mapping=mapping == "a"))
    home_b = lab.add_home("b", nat=nat_b, port_mapping=mapping == "b")
    lab.up()
    a, b, vcards, rdv = rendezvous_scene(lab, server, home_a.hosts[0], home_b.hosts[0],
                                         tmp_path, "--no-mapping-port")

    def config(home: Home) -> PeerConfig:
        return dataclasses.replace(PeerConfig(), port_mapping=home.port_mapping,
                                   gateway=home.lan_gateway)

    async def main() -> dict[str, object]:
        async with device_peer(b, vcards, rdv, listen=True, config=config(home_b)) as tv, \
                device_peer(a, vcards, rdv, listen=False, config=config(home_a)) as remote:
            mapper, home = (tv, home_b) if mapping == "b" else (remote, home_a)
            if mapping is not None and not double:
                mapped = await mapper.wait_port_mapped(MAPPING_WITHIN)
                assert mapped is not None and mapped[0] == home.public_ip
            await tv.wait_registered(10)
            await remote.wait_registered(10)
            # Behind the CGN, its symmetric NAT is the one peers meet.
            expect = "direct" if mapping is not None and not double \
                else expected_path("symmetric" if double else nat_a, nat_b, birthday=False)
            result = await exchange(remote, tv, expect=expect)
            result["port_mapped"] = mapper.port_mapped
        return result

    return asyncio.run(main())


@pytest.mark.parametrize("nat_a, nat_b, mapping", PAIRS,
                         ids=[f"{a}--{b}-map-{m}" for a, b, m in PAIRS])
def test_every_pair_goes_direct_with_a_port_mapping(netns_ready: None, tmp_path: Path,
                                                    nat_a: str, nat_b: str,
                                                    mapping: str | None) -> None:
    with Lab(wan=STANDARD_WAN) as lab:
        result = run_pair(lab, tmp_path, nat_a, nat_b, mapping)
    assert result["path"] == "direct"
    assert (result["port_mapped"] is not None) == (mapping is not None)


def test_double_nat_with_a_mapping_on_the_inner_router_only(netns_ready: None,
                                                            tmp_path: Path) -> None:
    """The home router behind a symmetric CGN refuses to map (its WAN
    address is private, as a real one's is), and a mapping there would
    forward a port of the CGN's inside anyway: the CGN still decides. So a
    home behind a symmetric CGN and a port-restricted home stay on the
    relay, as without the mapping (with the server's mapping check, a
    birthday search toward the CGN's address would find them a path:
    ``test_birthday_lab.py``)."""
    with Lab(wan=STANDARD_WAN) as lab:
        result = run_pair(lab, tmp_path, "port-restricted-cone", "port-restricted-cone", "a",
                          double=True)
    assert result["port_mapped"] is None
    assert result["path"] == "relay"


def test_the_cli_goes_direct_between_two_symmetric_homes_with_port_mapping(
        netns_ready: None, tmp_path: Path) -> None:
    """``dtx listen --port-mapping`` and ``dtx send --port-mapping`` as
    people run them, each in its own symmetric home whose router maps:
    both report the mapping, and the message goes direct."""
    tv, remote = generate_identity(TV), generate_identity(REMOTE)
    vcards = tmp_path / "vcards"
    write_vcards(vcards, tv, remote)
    keys = {}
    for name, ident in (("tv", tv), ("remote", remote)):
        keys[name] = tmp_path / f"{name}.key"
        save_identity(ident, keys[name])
    with Lab(wan=STANDARD_WAN) as lab:
        server = lab.add_server("rdv")
        home_a = lab.add_home("a", nat="symmetric", port_mapping=True)
        home_b = lab.add_home("b", nat="symmetric", port_mapping=True)
        lab.up()
        start_rendezvous(server, vcards)
        rdv = "%s:%d" % server_address(server)
        trust = ["--vcards", str(vcards), "--no-pins", "--json"]
        listener = JsonLines(home_b.hosts[0].popen(
            dtx("listen", str(keys["tv"]), "--rendezvous", rdv, "--port-mapping", *trust),
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True))
        try:
            listening = listener.wait("listening", 20)
            assert str(listening["port_mapped"]).startswith(home_b.public_ip + ":")
            sent = home_a.hosts[0].run(
                dtx("send", str(keys["remote"]), "--to", "tv@example.org", "--rendezvous", rdv,
                    "--port-mapping", "--body", "pause", "--linger", "3", *trust),
                timeout=30)
            assert sent.returncode == 0, sent.stderr
            report = json.loads(sent.stdout.strip().splitlines()[-1])
            assert report["delivered"] and report["path"] == "direct"
            assert report["port_mapped"].startswith(home_a.public_ip + ":")
        finally:
            listener.kill()
