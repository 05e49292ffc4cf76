"""QUIC Retry under load (RFC 9000 section 8.1): the tokens, and the
production endpoint on the memory network answering a flood of Initials
from sources that never come back with Retries, while a real client still
connects."""

from __future__ import annotations

import random

import pytest
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

from dtx.proto.endpoint import EndpointConfig
from dtx.proto.retry import RetryTokens
from dtx.trust import StaticKeys

from dtx.proto.paths import PathKind

from ..fakes import (FakeClock, MemoryNetwork, MemoryPeer, PublicAddresses, add_device,
                     identity_for, make_scene)

TV = "tv@example.org/living-room"
REMOTE = "remote@example.org/phone"
ADDR = ("198.51.100.7", 40000)
KEY = bytes(range(32))


# -- tokens ------------------------------------------------------------------------


def test_a_token_comes_back_with_its_original_connection_id() -> None:
    tokens = RetryTokens(KEY, lifetime=10)
    token = tokens.issue(ADDR, b"odcid-01", b"retry-id", now=100.0)
    assert tokens.validate(ADDR, token, b"retry-id", now=101.0) == b"odcid-01"


@pytest.mark.parametrize("addr, dcid, now", [
    (("198.51.100.8", 40000), b"retry-id", 101.0),   # another IP
    (("198.51.100.7", 40001), b"retry-id", 101.0),   # another port
    (ADDR, b"other-id", 101.0),                      # not the Retry's connection ID
    (ADDR, b"retry-id", 110.5),                      # expired
    (ADDR, b"retry-id", 99.0),                       # issued in the future
])
def test_a_token_is_refused_elsewhere_later_or_for_another_connection(
        addr: tuple[str, int], dcid: bytes, now: float) -> None:
    tokens = RetryTokens(KEY, lifetime=10)
    token = tokens.issue(ADDR, b"odcid-01", b"retry-id", now=100.0)
    assert tokens.validate(addr, token, dcid, now) is None


def test_a_forged_or_damaged_token_is_refused_and_never_raises() -> None:
    tokens = RetryTokens(KEY, lifetime=10)
    token = tokens.issue(ADDR, b"odcid-01", b"retry-id", now=100.0)
    assert RetryTokens(bytes(32), lifetime=10).validate(ADDR, token, b"retry-id", 101) is None
    for i in range(len(token)):
        damaged = token[:i] + bytes([token[i] ^ 1]) + token[i + 1:]
        assert tokens.validate(ADDR, damaged, b"retry-id", 101.0) is None
        assert tokens.validate(ADDR, token[:i], b"retry-id", 101.0) is None
    rng = random.Random(1)
    for _ in range(500):
        junk = rng.randbytes(rng.randrange(80))
        assert tokens.validate(ADDR, junk, b"retry-id", 101.0) is None
    assert tokens.validate(("not an ip", 1), token, b"retry-id", 101.0) is None


def test_token_settings_are_checked() -> None:
    with pytest.raises(ValueError):
        RetryTokens(b"short")
    with pytest.raises(ValueError):
        RetryTokens(KEY, lifetime=0)
    with pytest.raises(ValueError):
        RetryTokens(KEY).issue(ADDR, bytes(21), b"x", 0.0)


# -- the endpoint -----------------------------------------------------------------


def _pair(config: EndpointConfig) -> tuple[MemoryNetwork, MemoryPeer, MemoryPeer]:
    net = MemoryNetwork(FakeClock(), seed=3)
    ids = {jid: identity_for(jid, n) for n, jid in enumerate((TV, REMOTE), 1)}
    keys = StaticKeys({str(i.jid.bare): [i.public_key] for i in ids.values()})
    tv_ip, remote_ip = net.add_public_host("198.51.100.1"), net.add_public_host("198.51.100.2")
    tv = MemoryPeer(net, ids[TV], (tv_ip, 5000), None, keys, seed=1, config=config)
    remote = MemoryPeer(net, ids[REMOTE], (remote_ip, 5000), None, keys, seed=2,
                        listen=False)
    tv.start()
    remote.start()
    return net, tv, remote


def _connect(net: MemoryNetwork, tv: MemoryPeer, remote: MemoryPeer) -> None:
    remote.endpoint.connect(TV, net.clock.now, address=tv.addr)
    remote.flush()
    assert net.run_until(lambda: TV in remote.sessions and REMOTE in tv.sessions, 5.0)
    remote.send(TV, "pause")
    assert net.run_until(lambda: "pause" in tv.bodies(REMOTE), 5.0)


def _initial(dest: tuple[str, int]) -> bytes:
    """A QUIC client's first datagram (an Initial, padded to 1,200 bytes)."""
    quic = QuicConnection(configuration=QuicConfiguration(is_client=True, alpn_protocols=["x"]))
    quic.connect(dest, now=0.0)
    return quic.datagrams_to_send(now=0.0)[0][0]


def test_below_the_threshold_there_is_no_retry() -> None:
    net, tv, remote = _pair(EndpointConfig())
    _connect(net, tv, remote)
    assert tv.endpoint.counters["retry_sent"] == 0
    assert tv.endpoint.counters["retry_validated"] == 0


def test_with_retry_always_on_a_client_connects_after_one_retry() -> None:
    net, tv, remote = _pair(EndpointConfig(retry_half_open=0))
    _connect(net, tv, remote)
    assert tv.endpoint.counters["retry_sent"] == 1
    assert tv.endpoint.counters["retry_validated"] == 1


def test_under_a_flood_of_initials_retries_keep_no_state_and_a_client_connects() -> None:
    threshold = 8
    net, tv, remote = _pair(EndpointConfig(retry_half_open=threshold))
    flooders = [net.add_public_host(f"198.51.100.{100 + i}") for i in range(4)]
    sent = 0
    for i, ip in enumerate(flooders):
        for port in range(20000, 20100):
            # Sources that never answer a Retry: as good as spoofed.
            net.send((ip, port), tv.addr, _initial(tv.addr))
            sent += 1
    net.run(0.2)
    stats = tv.endpoint.statistics()
    assert stats.half_open <= threshold, "no state beyond the threshold"
    assert tv.endpoint.counters["retry_sent"] == sent - threshold
    _connect(net, tv, remote)  # during the flood: its half-open ones are still there
    assert tv.endpoint.counters["retry_validated"] == 1
    assert tv.endpoint.counters["retry_token_invalid"] == 0


def test_an_initial_with_a_stolen_token_from_another_address_is_dropped() -> None:
    net, tv, remote = _pair(EndpointConfig(retry_half_open=0))
    thief = net.add_public_host("198.51.100.50")
    token = tv.endpoint._retry.issue(remote.addr, b"odcid-01", b"retry-id", net.clock.now)
    quic = QuicConnection(configuration=QuicConfiguration(is_client=True, alpn_protocols=["x"]))
    quic._peer_token = token
    quic._peer_cid.cid = b"retry-id"
    quic.connect(tv.addr, now=net.clock.now)
    net.send((thief, 7000), tv.addr, quic.datagrams_to_send(now=net.clock.now)[0][0])
    net.run(0.2)
    assert tv.endpoint.counters["retry_token_invalid"] == 1
    assert tv.endpoint.statistics().half_open == 0


@pytest.mark.parametrize("nat, path", [("port-restricted-cone", PathKind.DIRECT),
                                       ("symmetric", PathKind.RELAY)])
def test_a_retry_reaches_an_introduced_peer_over_its_path(nat: str, path: PathKind) -> None:
    """The Retry to a peer the rendezvous introduced goes where that peer's
    packets go: the relay first (and stays there between symmetric NATs)."""
    ids = [identity_for(REMOTE, 1), identity_for(TV, 2)]
    net, server = make_scene(ids, seed=5)
    public = PublicAddresses()
    home_a = net.add_nat("a", nat, public.take(), lan_prefix="10.1.0")
    home_b = net.add_nat("b", nat, public.take(), lan_prefix="10.2.0")
    remote = add_device(net, home_a, ids[0], server, seed=11, listen=False)
    tv = add_device(net, home_b, ids[1], server, seed=12,
                    config=EndpointConfig(retry_half_open=0))
    tv.start()
    remote.start()
    assert net.run_until(lambda: remote.endpoint.registered and tv.endpoint.registered, 10.0)
    remote.introduce(TV)
    assert net.run_until(lambda: TV in remote.traversal.links, 10.0)
    remote.connect(TV)
    assert net.run_until(lambda: TV in remote.sessions, 5.0)
    remote.send(TV, "pause")
    net.run(4.0)
    assert "pause" in tv.bodies(REMOTE)
    assert tv.endpoint.counters["retry_sent"] >= 1
    assert tv.endpoint.counters["retry_validated"] == 1
    assert remote.path(TV) is path and tv.path(REMOTE) is path
