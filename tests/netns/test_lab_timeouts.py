"""NAT state over time: bindings expire after the configured UDP timeout,
a NAT flush breaks a flow until it is re-created, roaming kills mappings."""

from __future__ import annotations

import dataclasses

import pytest

from dtx.lab import Lab, NatProfile
from dtx.lab.probe import ProbeResponder, request
from tests.netns.conftest import receive, wait_until

PORT, ALT_PORT = 3478, 3479
TIMEOUT = 2


@pytest.mark.parametrize("profile", ["port-restricted-cone", "full-cone"])
def test_binding_expires_after_udp_timeout(lab: Lab, profile: str) -> None:
    nat = dataclasses.replace(NatProfile.named(profile), udp_timeout=TIMEOUT)
    server = lab.add_server("rdv")
    home = lab.add_home("a", nat=nat)
    lab.up()
    with ProbeResponder.open_on(server, PORT, ALT_PORT) as responder:
        sock = home.hosts[0].udp_socket()
        port = sock.getsockname()[1]
        mapped = request(sock, (server.ip, PORT), "same")[-1].observed
        entry = f"sport={port} dport={PORT}"
        assert entry in home.conntrack()
        # Before expiry the binding lets the server's packets in ...
        responder.send_from((0, 0), b"early", mapped)
        got = receive(sock, 2.0)
        assert got is not None and got[0] == b"early"
        # ... then, with no traffic, conntrack (and the learned map) drop it.
        assert wait_until(lambda: entry not in home.conntrack(), timeout=TIMEOUT + 8, interval=0.1)
        if profile == "full-cone":
            assert wait_until(
                lambda: f"{mapped[1]} expires" not in home.router.run(
                    ["nft", "list", "map", "ip", "lab", "mappings"]).stdout,
                timeout=TIMEOUT + 8, interval=0.1)
        responder.send_from((0, 0), b"late", mapped)
        responder.send_from((1, 1), b"late-other", mapped)
        assert receive(sock, 0.5) is None


def test_flush_breaks_flow_until_recreated(lab: Lab) -> None:
    server = lab.add_server("rdv")
    home = lab.add_home("a", nat="port-restricted-cone")
    lab.up()
    with ProbeResponder.open_on(server, PORT, ALT_PORT) as responder:
        sock = home.hosts[0].udp_socket()
        mapped = request(sock, (server.ip, PORT), "same")[-1].observed
        responder.send_from((0, 0), b"before", mapped)
        assert receive(sock, 2.0) is not None
        home.flush_nat()
        assert f"sport={sock.getsockname()[1]}" not in home.conntrack()
        responder.send_from((0, 0), b"after-flush", mapped)
        assert receive(sock, 0.5) is None
        again = request(sock, (server.ip, PORT), "same")[-1].observed
        assert again == mapped              # port preserved: the same mapping again
        responder.send_from((0, 0), b"recreated", mapped)
        got = receive(sock, 2.0)
        assert got is not None and got[0] == b"recreated"


def test_change_public_ip_kills_old_mappings(lab: Lab) -> None:
    server = lab.add_server("rdv")
    home = lab.add_home("a", nat="full-cone")
    lab.up()
    with ProbeResponder.open_on(server, PORT, ALT_PORT) as responder:
        sock = home.hosts[0].udp_socket()
        old = request(sock, (server.ip, PORT), "same")[-1].observed
        assert old[0] == home.public_ip
        new_ip = home.change_public_ip()
        assert new_ip != old[0] and home.public_ip == new_ip
        responder.send_from((1, 0), b"to-old", old)
        assert receive(sock, 0.5) is None
        new = request(sock, (server.ip, PORT), "same")[-1].observed
        assert new[0] == new_ip
