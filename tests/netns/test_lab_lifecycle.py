"""The lab's footprint: nothing changes in the caller's namespace, nothing
is left after teardown (also when the body raises, also after a crash), and
a same-LAN topology passes multicast."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys

import pytest

from dtx.lab import STANDARD_WAN, Lab, LinkSpec
from dtx.lab import ns
from dtx.lab.topology import state_dir
from tests.netns.conftest import receive, wait_until


def root_view() -> tuple[str, str, str]:
    return (ns.run(["ip", "-o", "addr"]).stdout, ns.run(["ip", "-o", "route"]).stdout,
            ns.run(["ip", "-o", "link"]).stdout)


def build_everything(lab: Lab) -> None:
    lab.add_server("rdv")
    lab.add_home("a", nat="symmetric", link=LinkSpec(delay=0.005))
    lab.add_double_nat_home("d")
    lab.add_lan("lr", hosts=2)
    lab.add_public_host("c", link=LinkSpec())
    lab.add_home("open", nat="none")


def lab_namespaces(prefix: str) -> list[str]:
    return [n for n in ns.list_netns() if n.startswith(prefix + "-")]


def test_root_namespace_unchanged_and_all_gone_after(netns_ready: None) -> None:
    before = root_view()
    with Lab() as lab:
        build_everything(lab)
        lab.up()
        print(f"\nfull topology ({len(lab.hosts)} namespaces) up in {lab.bringup_seconds:.3f} s")
        assert len(lab_namespaces(lab.prefix)) == len(lab.hosts)
        assert root_view() == before
        child = lab.host("a-h0").popen(["sleep", "60"])
        forwarder = lab._forwarder
        assert forwarder is not None and forwarder.poll() is None
        for host in lab.hosts:       # IPv6 off everywhere: nothing but IPv4 can leak
            assert "inet6" not in host.run(["ip", "-o", "addr"]).stdout
    assert child.poll() is not None
    assert forwarder.poll() is not None
    assert lab_namespaces(lab.prefix) == []
    assert not os.path.exists(os.path.join(state_dir(), f"{lab.prefix}.json"))
    assert root_view() == before


def test_teardown_when_the_body_raises(netns_ready: None) -> None:
    with pytest.raises(RuntimeError, match="body failed"):
        with Lab() as lab:
            build_everything(lab)
            lab.up()
            child = lab.host("rdv").popen(["sleep", "60"])
            sock = lab.host("c").udp_socket()
            raise RuntimeError("body failed")
    assert child.poll() is not None
    assert sock.fileno() == -1
    assert lab_namespaces(lab.prefix) == []


def test_cleanup_stale_removes_a_crashed_run(netns_ready: None) -> None:
    prefix = "dtx" + os.urandom(3).hex()
    dead = subprocess.Popen(["true"])
    dead.wait()
    os.makedirs(state_dir(), exist_ok=True)
    with open(os.path.join(state_dir(), f"{prefix}.json"), "w", encoding="utf-8") as f:
        json.dump({"pid": dead.pid, "prefix": prefix, "hosts": {}}, f)
    ns.add_netns([f"{prefix}-x"])
    orphan = subprocess.Popen(["ip", "netns", "exec", f"{prefix}-x", "sleep", "60"],
                              start_new_session=True)
    try:
        assert wait_until(lambda: orphan.pid in ns.netns_pids(f"{prefix}-x"), timeout=5)
        assert prefix in Lab.cleanup_stale()
        assert orphan.wait(timeout=5) is not None
        assert lab_namespaces(prefix) == []
        assert not os.path.exists(os.path.join(state_dir(), f"{prefix}.json"))
    finally:
        if orphan.poll() is None:
            orphan.kill()
            orphan.wait()
        ns.delete_netns([f"{prefix}-x"])


def test_cleanup_stale_spares_live_labs(lab: Lab) -> None:
    lab.add_server("rdv")
    lab.up()
    assert lab.prefix not in Lab.cleanup_stale()
    assert lab_namespaces(lab.prefix)


def test_two_home_bringup_time_reported(netns_ready: None) -> None:
    with Lab(wan=STANDARD_WAN) as lab:
        lab.add_server("rdv")
        lab.add_home("a")
        lab.add_home("b")
        lab.up()
        print(f"\ntwo-home STANDARD_WAN lab up in {lab.bringup_seconds:.3f} s")
        assert lab.bringup_seconds is not None


def test_same_lan_multicast_reaches_every_host(lab: Lab) -> None:
    lan = lab.add_lan("lr", hosts=3)
    lab.up()
    group, port = "224.0.0.251", 5353
    receivers = []
    for host in lan.hosts[1:]:
        s = host.udp_socket(port)
        s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                     struct.pack("4s4s", socket.inet_aton(group), socket.inet_aton(host.ip)))
        receivers.append(s)
    sender = lan.hosts[0].udp_socket()
    sender.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 255)
    sender.sendto(b"mdns-ish", (group, port))
    for s in receivers:
        got = receive(s, 2.0)
        assert got is not None and got == (b"mdns-ish", (lan.hosts[0].ip, sender.getsockname()[1]))


def test_run_and_popen_inside_a_host(lab: Lab) -> None:
    server = lab.add_server("rdv")
    lab.up()
    out = server.run(["ip", "-o", "-4", "addr", "show", "dev", "eth0"], check=True).stdout
    assert all(a in out for a in server.addresses)
    proc = server.popen([sys.executable, "-c", "print('hi')"], stdout=subprocess.PIPE, text=True)
    assert proc.communicate(timeout=10)[0] == "hi\n"
