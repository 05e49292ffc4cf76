"""TURN through the account's own server, in the NAT lab.

Prosody (``mod_turn_external``) and coturn (``use-auth-secret``, the same
secret) run on the lab's server host. Two devices, each in its own home
(a port-restricted cone and a symmetric NAT: the pair plain hole punching
cannot connect), log in from inside their namespaces and learn the STUN
and TURN services by XEP-0215. The second learns its public address from
the STUN service; the first allocates a relay with the production
:class:`~dtx.proto.turn.TurnClient` over a real UDP socket in its home,
permits the second's public address, and datagrams cross the relay both
ways. coturn's ``-v`` log shows the allocation under the username the
XMPP server minted.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest

from dtx.lab import STANDARD_WAN, Host, Lab, ns
from dtx.lab.coturn import CoturnServer, coturn_missing
from dtx.identity import generate_identity
from dtx.lab.dns import DNS_PORT, TYPE_A, TYPE_SRV, answer_count
from dtx.lab.prosody import ProsodyServer, TurnExternal, prosody_missing
from dtx.proto.turn import (
    AllocationClosed,
    AllocationFailed,
    Allocated,
    DataReceived,
    PermissionCreated,
    PermissionFailed,
)
from dtx.trust.vcard import VCARD_TEMP_NS
from dtx.wire.stun import binding_request, decode_stun
from dtx.xmpp.client import XmppConfig, open_xmpp_client
from dtx.xmpp.services import ExternalServices, TurnService, discover_services

from ..xmpp.test_services import TurnDriver, check_rest_credentials
from .xmpp_domains import federated_domains

pytestmark = pytest.mark.netns

SECRET = "dtx-lab-turn-secret"
DOMAIN = "example.org"
TTL = 600
TURN_USER = "dtx-lab"
DEADLINE = 10.0
ONE_WAY_HOME_TO_SERVER = 0.060  # STANDARD_WAN: 20 ms home-core, 40 ms core-server


def login_and_discover(host: Host, address: tuple[str, int], jid: str,
                       password: str) -> tuple[ExternalServices, float, float, float]:
    """Log in from inside ``host`` and discover the services; returns them,
    the wall clock before and after, and how long it took (login included)."""

    async def run() -> tuple[ExternalServices, float, float, float]:
        config = XmppConfig(server=address, allow_plaintext=True, timeout=DEADLINE)
        wall_before, started = time.time(), time.monotonic()
        async with open_xmpp_client(jid, password, config=config) as client:
            found = await discover_services(client)
        return found, wall_before, time.time(), time.monotonic() - started

    # A thread that entered the namespace: the XMPP connection is made
    # there, so it leaves the home through its NAT.
    return ns.in_netns(host.netns, lambda: asyncio.run(run()))


def stun_reflexive(sock: socket.socket, server: tuple[str, int]) -> tuple[str, int]:
    """The socket's public address as the STUN server sees it (a Binding
    request, sent again every RTO, bounded)."""
    sock.settimeout(0.5)
    for _ in range(6):
        tid = os.urandom(12)
        sock.sendto(binding_request(tid), server)
        try:
            data, _ = sock.recvfrom(2048)
        except TimeoutError:
            continue
        msg = decode_stun(data)
        if msg.transaction_id == tid and msg.reflexive_address is not None:
            return msg.reflexive_address
    raise AssertionError(f"no STUN answer from {server}")


def test_turn_relay_from_xep0215_credentials(netns_ready: None, tmp_path: Path) -> None:
    for reason in (prosody_missing(), coturn_missing()):
        if reason:
            pytest.skip(reason)
    with Lab(wan=STANDARD_WAN) as lab:
        server = lab.add_server("xmpp", addresses=1)
        home_a = lab.add_home("a", nat="port-restricted-cone")
        home_b = lab.add_home("b", nat="symmetric")
        lab.up()
        a, b = home_a.hosts[0], home_b.hosts[0]
        coturn = CoturnServer(SECRET, realm=DOMAIN, host=server, folder=str(tmp_path / "turn"))
        coturn.start()
        prosody = ProsodyServer(
            "vcard4", host=server, folder=str(tmp_path / "prosody"),
            turn=TurnExternal(secret=SECRET, host=server.ip, port=coturn.port, ttl=TTL,
                              user=TURN_USER))
        os.makedirs(prosody.folder)
        prosody.start()
        try:
            prosody.register("alice", "pw-alice")
            prosody.register("bob", "pw-bob")
            found_a, before, after, login_a = login_and_discover(
                a, prosody.address(), "alice@example.org", "pw-alice")
            found_b, _, _, login_b = login_and_discover(
                b, prosody.address(), "bob@example.org", "pw-bob")
        finally:
            prosody.stop()
        for found in (found_a, found_b):
            stun = found.first_stun()
            assert stun is not None and stun.address == coturn.address
        turn = found_a.first_turn()
        assert turn is not None and turn.address == coturn.address
        check_rest_credentials(turn, before, after, TTL, TURN_USER, SECRET)

        # The second device: its public address, from the STUN service.
        sock_b = b.udp_socket()
        stun_b = found_b.first_stun()
        assert stun_b is not None
        reflexive_b = stun_reflexive(sock_b, stun_b.address)
        assert reflexive_b[0] == home_b.public_ip

        timings = asyncio.run(relay_both_ways(a, sock_b, turn, reflexive_b, home_a.public_ip,
                                              server.ip))
        log = coturn.stop()
    sessions = coturn.sessions(log)
    assert [(s.event, s.realm, s.username) for s in sessions] == [
        ("new", DOMAIN, turn.username), ("refreshed", DOMAIN, turn.username)], log
    assert sessions[1].lifetime == 0  # released by close()
    assert "CREATE_PERMISSION processed, success" in log, log
    print(f"\nlogin + XEP-0215: {login_a:.3f} s / {login_b:.3f} s; " + "; ".join(
        f"{name} {seconds * 1000:.1f} ms" for name, seconds in timings.items()))


async def relay_both_ways(a: Host, sock_b: socket.socket, turn: TurnService,
                          reflexive_b: tuple[str, int], public_a: str,
                          server_ip: str) -> dict[str, float]:
    """Allocate on a, permit b, then one datagram each way through the
    relay; returns how long each step took."""
    loop = asyncio.get_running_loop()
    sock_b.setblocking(False)
    driver = TurnDriver(a.udp_socket(), turn)
    timings: dict[str, float] = {}
    try:
        started = loop.time()
        driver.call(driver.client.allocate)
        allocated = await driver.event(Allocated, AllocationFailed)
        assert isinstance(allocated, Allocated), allocated
        timings["allocate"] = loop.time() - started
        relayed = allocated.relayed
        assert relayed[0] == server_ip and relayed != turn.address
        assert allocated.mapped is not None and allocated.mapped[0] == public_a

        started = loop.time()
        driver.call(lambda now: driver.client.permit(reflexive_b, now))
        permitted = await driver.event(PermissionCreated, PermissionFailed)
        assert permitted == PermissionCreated(reflexive_b[0])
        timings["permission"] = loop.time() - started

        # b -> relay -> a (this also opens b's NAT towards the relayed address)
        sent_at = loop.time()
        await loop.sock_sendto(sock_b, b"hello from b", relayed)
        received = await driver.event(DataReceived)
        assert isinstance(received, DataReceived) and received.payload == b"hello from b"
        timings["b to a via relay"] = loop.time() - sent_at
        peer_b = received.peer
        # b's NAT is symmetric: towards the relayed address it maps another
        # (random) port than towards the STUN port, so a answers where the
        # relay saw b come from, never where STUN saw it
        assert peer_b[0] == reflexive_b[0]

        # a -> relay -> b, to the address the relay saw b's datagram come from
        sent_at = loop.time()
        driver.send(peer_b, b"hello from a")
        async with asyncio.timeout(DEADLINE):
            data, source = await loop.sock_recvfrom(sock_b, 2048)
        timings["a to b via relay"] = loop.time() - sent_at
        assert (data, (source[0], source[1])) == (b"hello from a", relayed)
        assert driver.others == []  # nothing reached a except through the relay

        driver.call(driver.client.close)
        assert await driver.event(AllocationClosed) == AllocationClosed()
    finally:
        driver.close()
    # Two server legs each way: at least the emulated WAN delay.
    assert timings["b to a via relay"] >= 2 * ONE_WAY_HOME_TO_SERVER
    assert timings["a to b via relay"] >= 2 * ONE_WAY_HOME_TO_SERVER
    return timings


# -- two domains, federated -----------------------------------------------------


@dataclass(frozen=True)
class Seen:
    """What one account learnt of another over XMPP."""

    source: str | None
    """``from`` of the answer to a vcard-temp get."""
    vcard: ET.Element | None
    keys: frozenset[bytes] | None
    first_iq: float
    """Seconds the first iq to it took (with the s2s set-up, if any)."""


def publish_and_discover(host: Host, prosody: ProsodyServer, jid: str, password: str,
                         fetch: list[str]) -> tuple[ExternalServices, dict[str, Seen]]:
    """From inside ``host``: log in, publish a device key in the account's
    vCard, discover the services, and read the vCards and keys of the
    accounts in ``fetch``."""

    async def run() -> tuple[ExternalServices, dict[str, Seen]]:
        config = XmppConfig(server=prosody.address(), allow_plaintext=True, timeout=DEADLINE)
        seen: dict[str, Seen] = {}
        async with open_xmpp_client(jid, password, config=config) as client:
            await client.publish_key(generate_identity(f"{jid}/dev").public_key)
            found = await discover_services(client)
            for other in fetch:
                started = time.monotonic()
                # vcard-temp: answered by the account's server to anyone
                # (disco#info on an account only to its contacts)
                card = await client.iq_get(ET.Element(f"{{{VCARD_TEMP_NS}}}vCard"), other)
                first = time.monotonic() - started
                seen[other] = Seen(card.get("from"), card.find(f"{{{VCARD_TEMP_NS}}}vCard"),
                                   await client.fetch_keys(other), first)
        return found, seen

    return ns.in_netns(host.netns, lambda: asyncio.run(run()))


async def allocate(host: Host, service: TurnService, at: tuple[str, int]) -> object:
    """Allocate on the TURN server at ``at`` with ``service``'s credentials:
    the Allocated or AllocationFailed event."""
    driver = TurnDriver(host.udp_socket(), dataclasses.replace(service, host=at[0], port=at[1]))
    try:
        driver.call(driver.client.allocate)
        return await driver.event(Allocated, AllocationFailed)
    finally:
        driver.close()


def test_two_domains_federated(netns_ready: None, tmp_path: Path) -> None:
    with Lab() as lab, federated_domains(lab, tmp_path, {"a": "port-restricted-cone",
                                                         "b": "port-restricted-cone"},
                                         ttl=TTL, turn_user=TURN_USER) as scene:
        dns, domains = scene.dns, scene.domains
        home_a, home_b = scene.homes["a"], scene.homes["b"]
        coturns = {domain: d.coturn for domain, d in domains.items()}
        prosodys = {domain: d.prosody for domain, d in domains.items()}
        # Each server finds the other through the lab's DNS.
        for domain, other in (("example.org", "example.net"), ("example.net", "example.org")):
            with domains[domain].host.udp_socket() as sock:
                assert answer_count(sock, (dns.ip, DNS_PORT), f"_xmpp-server._tcp.{other}",
                                    TYPE_SRV) == 1
                assert answer_count(sock, (dns.ip, DNS_PORT), f"xmpp.{other}", TYPE_A) == 1

        prosodys["example.org"].register("alice", "pw-alice")
        prosodys["example.net"].register("bob", "pw-bob")
        found_a, _ = publish_and_discover(home_a.hosts[0], prosodys["example.org"],
                                          "alice@example.org", "pw-alice", [])
        # bob (example.net) reads alice's account on example.org, then
        # alice reads bob's: an s2s link each way, dialback both times.
        found_b, seen_by_b = publish_and_discover(
            home_b.hosts[0], prosodys["example.net"], "bob@example.net", "pw-bob",
            ["alice@example.org"])
        _, seen_by_a = publish_and_discover(home_a.hosts[0], prosodys["example.org"],
                                            "alice@example.org", "pw-alice",
                                            ["bob@example.net"])
        for server in prosodys.values():
            server.stop()
        for seen, other in ((seen_by_b, "alice@example.org"), (seen_by_a, "bob@example.net")):
            got = seen[other]
            assert got.source == other and got.vcard is not None  # answered for the account
            assert got.keys is not None and len(got.keys) == 1  # the key it published
            print(f"\nfirst iq to {other}: {got.first_iq * 1000:.0f} ms")

        # Each domain hands out its own coturn, whose secret is its own.
        turn_a, turn_b = found_a.first_turn(), found_b.first_turn()
        assert turn_a is not None and turn_a.address == coturns["example.org"].address
        assert turn_b is not None and turn_b.address == coturns["example.net"].address

        async def allocations() -> list[object]:
            return list(await asyncio.gather(
                allocate(home_a.hosts[0], turn_a, coturns["example.org"].address),
                allocate(home_b.hosts[0], turn_b, coturns["example.net"].address),
                allocate(home_a.hosts[0], turn_a, coturns["example.net"].address)))

        outcomes = asyncio.run(allocations())
        assert [type(o) for o in outcomes[:2]] == [Allocated, Allocated], outcomes
        assert isinstance(outcomes[2], AllocationFailed) and outcomes[2].code == 401
        logs = {domain: server.stop() for domain, server in coturns.items()}
        dns_queries = scene.dns_log.read_text()
    assert [s.username for s in coturns["example.org"].sessions(logs["example.org"])] == [
        turn_a.username]
    assert [s.username for s in coturns["example.net"].sessions(logs["example.net"])] == [
        turn_b.username]
    for domain, other in (("example.org", "example.net"), ("example.net", "example.org")):
        assert (f"query[SRV] _xmpp-server._tcp.{other} from {domains[domain].host.ip}"
                in dns_queries), dns_queries
