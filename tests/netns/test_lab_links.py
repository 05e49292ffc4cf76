"""Impaired links through the user-space forwarder: delay (STANDARD_WAN),
loss, duplication, run-time changes, blocking a path, and the forwarder's
own cost per crossing (reported, not asserted)."""

from __future__ import annotations

import logging
import socket
import time

from dtx.lab import STANDARD_WAN, Lab, LinkSpec
from dtx.lab.probe import ProbeResponder, request
from tests.netns.conftest import receive

logger = logging.getLogger(__name__)
PORT, ALT_PORT = 3478, 3479


def rtt(sock: socket.socket, dest: tuple[str, int], count: int) -> list[float]:
    """Round-trip times of ``count`` echo probes (each bounded by its timeout)."""
    samples = []
    for _ in range(count):
        start = time.monotonic()
        assert request(sock, dest, "same", timeout=2.0, tries=1)
        samples.append(time.monotonic() - start)
    return samples


def test_standard_wan_round_trip_times(netns_ready: None) -> None:
    with Lab(wan=STANDARD_WAN) as lab:
        server = lab.add_server("rdv")
        a = lab.add_home("a", nat="full-cone")
        b = lab.add_home("b", nat="full-cone")
        lab.up()
        print(f"\nSTANDARD_WAN two-home lab up in {lab.bringup_seconds:.3f} s")
        with ProbeResponder.open_on(server, PORT, ALT_PORT):
            sa = a.hosts[0].udp_socket()
            to_server = rtt(sa, (server.ip, PORT), 5)
            sb = b.hosts[0].udp_socket()
            b_mapped = request(sb, (server.ip, PORT), "same")[-1].observed
            home_home = []
            for i in range(5):
                start = time.monotonic()
                sa.sendto(b"ping %d" % i, b_mapped)
                got = receive(sb, 2.0)
                assert got is not None and got[0] == b"ping %d" % i
                sb.sendto(b"pong %d" % i, got[1])
                back = receive(sa, 2.0)
                assert back is not None and back[0] == b"pong %d" % i
                home_home.append(time.monotonic() - start)
    print(f"home<->server RTT min {min(to_server) * 1000:.1f} ms, "
          f"home<->home RTT min {min(home_home) * 1000:.1f} ms")
    assert 0.118 <= min(to_server) < 0.6
    assert 0.078 <= min(home_home) < 0.4


def test_loss_duplication_and_runtime_changes(netns_ready: None) -> None:
    with Lab() as lab:
        server = lab.add_server("rdv")
        host = lab.add_public_host("c", link=LinkSpec())
        lab.up()
        with ProbeResponder.open_on(server, PORT, ALT_PORT) as responder:
            sock = host.udp_socket()
            dest = (server.ip, PORT)
            assert request(sock, dest, "same")        # neighbours resolved while lossless

            def count_through(spec: LinkSpec, packets: int) -> int:
                lab.set_link(host, spec)
                before = responder.received
                for i in range(packets):
                    sock.sendto(b"dtxprobe c%d count" % i, dest)
                lab.set_link(host, LinkSpec())
                # In order behind the counted packets: once answered, all are in.
                assert request(sock, dest, "same")
                return responder.received - before - 1

            lost = count_through(LinkSpec(loss=0.5, seed=7), 200)
            doubled = count_through(LinkSpec(duplicate=1.0), 20)
            clean = count_through(LinkSpec(), 50)
    print(f"\nloss 0.5: {lost}/200 arrived; duplicate 1.0: {doubled}/20; clean: {clean}/50")
    assert 60 <= lost <= 140
    assert doubled == 40
    assert clean == 50


def test_forwarder_cost_per_crossing(netns_ready: None) -> None:
    """Idle RTT to the server over a forwarded 0 ms link and over a veth."""
    with Lab() as lab:
        server = lab.add_server("rdv")
        plain = lab.add_public_host("veth")
        tapped = lab.add_public_host("tap", link=LinkSpec())
        lab.up()
        with ProbeResponder.open_on(server, PORT, ALT_PORT):
            dest = (server.ip, PORT)
            s_plain, s_tap = plain.udp_socket(), tapped.udp_socket()
            rtt(s_plain, dest, 5)
            rtt(s_tap, dest, 5)
            veth = sorted(rtt(s_plain, dest, 50))
            tap = sorted(rtt(s_tap, dest, 50))
    per_crossing = (tap[25] - veth[25]) / 2
    print(f"\nmedian RTT veth {veth[25] * 1e6:.0f} us, forwarded {tap[25] * 1e6:.0f} us: "
          f"forwarder adds ~{per_crossing * 1e6:.0f} us per crossing")
    assert tap[0] > 0 and veth[0] > 0


def test_block_and_unblock_a_path(netns_ready: None) -> None:
    with Lab() as lab:
        server = lab.add_server("rdv")
        host = lab.add_public_host("c")
        home = lab.add_home("a")
        lab.up()
        with ProbeResponder.open_on(server, PORT, ALT_PORT):
            dest = (server.ip, PORT)
            sock = host.udp_socket()
            other = home.hosts[0].udp_socket()
            assert request(sock, dest, "same")
            lab.block(host, server)
            assert request(sock, dest, "same", timeout=0.5, tries=1) == []
            assert request(other, dest, "same")        # only that path is cut
            lab.unblock(host, server)
            assert request(sock, dest, "same")
