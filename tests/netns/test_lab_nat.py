"""Self-checks of the lab's NATs: each profile's mapping and filtering,
measured with probes, and the conntrack pitfalls docs/nat-lab.md describes."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator

import pytest

from dtx.lab import Filtering, Home, Lab, Mapping, NatProfile, PROFILES
from dtx.lab.probe import ProbeResponder, classify, request
from tests.netns.conftest import receive

logger = logging.getLogger(__name__)
PORT, ALT_PORT = 3478, 3479
RESULTS: dict[str, tuple[str, str, str, str]] = {}


@dataclasses.dataclass
class NatLab:
    lab: Lab
    homes: dict[str, Home]
    responder: ProbeResponder


@pytest.fixture(scope="module")
def nat_lab(netns_ready: None) -> Iterator[NatLab]:
    with Lab() as lab:
        server = lab.add_server("rdv", addresses=2)
        homes = {name: lab.add_home(name.replace("-", ""), nat=name) for name in PROFILES}
        homes["double-nat"] = lab.add_double_nat_home("dbl", nat="port-restricted-cone",
                                                      cgn_nat="full-cone")
        homes["two-hosts"] = lab.add_home("two", nat="port-restricted-cone", hosts=2)
        homes["answers"] = lab.add_home("icmp", nat=dataclasses.replace(
            NatProfile.named("port-restricted-cone"), answer_unsolicited=True))
        homes["no-hairpin"] = lab.add_home("nohp", nat=dataclasses.replace(
            NatProfile.named("port-restricted-cone"), hairpin=False), hosts=2)
        lab.up()
        logger.info("NAT lab up in %.3f s", lab.bringup_seconds)
        with ProbeResponder.open_on(server, PORT, ALT_PORT) as responder:
            yield NatLab(lab, homes, responder)
    if RESULTS:
        rows = ["| profile | expected mapping | measured mapping | expected filtering "
                "| measured filtering |", "|---|---|---|---|---|"]
        for name, (em, mm, ef, mf) in RESULTS.items():
            rows.append(f"| {name} | {em} | {mm} | {ef} | {mf} |")
        print("\n" + "\n".join(rows))


def server_of(nl: NatLab) -> tuple[str, str]:
    a1, a2 = nl.lab.servers[0].addresses[:2]
    return a1, a2


@pytest.mark.parametrize("profile", list(PROFILES))
def test_profile_behaviour_measured_by_probes(nat_lab: NatLab, profile: str) -> None:
    home = nat_lab.homes[profile]
    host = home.hosts[0]
    obs = classify(host.udp_socket, server_of(nat_lab), PORT, ALT_PORT)
    expected = NatProfile.named(profile)
    RESULTS[profile] = (expected.mapping.value if expected.translate else "(no NAT)",
                        obs.mapping.value,
                        expected.filtering.value if expected.translate else "(open)",
                        obs.filtering.value)
    if expected.translate:
        assert {ip for ip, _ in obs.observed} == {home.public_ip}
    else:
        assert {ip for ip, _ in obs.observed} == {host.ip}
    assert obs.mapping is expected.mapping
    assert obs.filtering is expected.filtering


def test_double_nat_shows_the_outer_nat(nat_lab: NatLab) -> None:
    home = nat_lab.homes["double-nat"]
    assert home.upstream is not None
    assert home.public_ip == home.upstream.public_ip != home.wan_ip
    obs = classify(home.hosts[0].udp_socket, server_of(nat_lab), PORT, ALT_PORT)
    RESULTS["port-restricted behind full-cone CGN"] = (
        "endpoint-independent", obs.mapping.value, "address-and-port-dependent",
        obs.filtering.value)
    assert {ip for ip, _ in obs.observed} == {home.public_ip}
    # Both NATs preserve ports and map endpoint-independently; the inner one filters.
    assert obs.mapping is Mapping.ENDPOINT_INDEPENDENT
    assert obs.filtering is Filtering.ADDRESS_AND_PORT_DEPENDENT


def _unsolicited_then_outgoing(nl: NatLab, home: Home, port: int) -> int:
    """The server sends to ``home``'s public address at ``port`` before the
    LAN host ever used it; then the host sends from that port. Returns the
    public port the server sees."""
    a1, _ = server_of(nl)
    nl.responder.send_from((0, 0), b"unsolicited", (home.public_ip, port))
    # The answer to this probe crosses the same links right behind the
    # unsolicited packet, so when it is back the router has handled both.
    sync = home.hosts[0].udp_socket()
    assert request(sync, (a1, PORT), "same")
    sock = home.hosts[0].udp_socket(port)
    replies = request(sock, (a1, PORT), "same")
    assert replies
    return replies[-1].observed[1]


def test_unsolicited_inbound_dropped_silently_keeps_the_port(nat_lab: NatLab) -> None:
    home = nat_lab.homes["port-restricted-cone"]
    port = 41001
    assert _unsolicited_then_outgoing(nat_lab, home, port) == port
    assert "dport=41001 [UNREPLIED]" not in home.conntrack()


def test_icmp_answer_to_unsolicited_inbound_changes_the_port(nat_lab: NatLab) -> None:
    """Pitfall: a router that answers unsolicited packets (port unreachable)
    keeps a conntrack entry for them; the LAN host's next flow to the same
    remote endpoint then cannot have the same public port."""
    home = nat_lab.homes["answers"]
    port = 41002
    observed = _unsolicited_then_outgoing(nat_lab, home, port)
    RESULTS["pitfall: router answers unsolicited (ICMP)"] = (
        f"public port {port}", f"public port {observed}", "-", "-")
    assert observed != port


def test_port_preservation_is_a_cone_only_while_one_host_owns_a_port(nat_lab: NatLab) -> None:
    home = nat_lab.homes["two-hosts"]
    a1, a2 = server_of(nat_lab)
    port = 41003
    s0 = home.hosts[0].udp_socket(port)
    s1 = home.hosts[1].udp_socket(port)
    first = request(s0, (a1, PORT), "same")[-1].observed[1]
    other_dest = request(s1, (a2, PORT), "same")[-1].observed[1]
    same_dest = request(s1, (a1, PORT), "same")[-1].observed[1]
    RESULTS["pitfall: second LAN host on the same port"] = (
        "endpoint-independent",
        "address-dependent" if other_dest != same_dest else "endpoint-independent", "-", "-")
    assert first == port
    assert other_dest == port       # no clash towards another address: preserved
    assert same_dest != port        # clash with host 0's flow: a new port for host 1


def _hairpin(home: Home) -> bool:
    a1 = home.lab.servers[0].ip
    s0 = home.hosts[0].udp_socket()
    mapped = request(s0, (a1, PORT), "same")[-1].observed
    s1 = home.hosts[1].udp_socket()
    s1.sendto(b"hairpin", mapped)
    got = receive(s0, 0.5)
    if got is None:
        return False
    assert got[0] == b"hairpin"
    assert got[1][0] == home.public_ip   # the sender appears with its public address
    return True


def test_hairpinning_on(nat_lab: NatLab) -> None:
    assert _hairpin(nat_lab.homes["two-hosts"])


def test_hairpinning_off(nat_lab: NatLab) -> None:
    assert not _hairpin(nat_lab.homes["no-hairpin"])


def test_full_cone_needs_the_learned_map(nat_lab: NatLab) -> None:
    """Masquerade alone cannot be a full cone: the inbound DNAT comes from
    the map learned on egress; an unknown port still gets nothing."""
    home = nat_lab.homes["full-cone"]
    a1, a2 = server_of(nat_lab)
    sock = home.hosts[0].udp_socket()
    mapped = request(sock, (a1, PORT), "same")[-1].observed
    nat_lab.responder.send_from((1, 1), b"from elsewhere", mapped)
    got = receive(sock, 2.0)
    assert got is not None and got[1] == (a2, ALT_PORT)
    ruleset = home.router.run(["nft", "list", "map", "ip", "lab", "mappings"]).stdout
    assert f"{mapped[1]} expires" in ruleset
