"""Which link a datagram the TURN server relayed belongs to
(``Traversal.map_relayed``): by the peer's address, or by its IP alone
when only one link is relayed from that IP."""

from __future__ import annotations

import random

from dtx.identity import generate_identity
from dtx.proto.traversal import Introduction, Traversal

COTURN_IP = "192.0.2.9"


def _traversal() -> Traversal:
    me = generate_identity("tv@example.org/living-room")
    return Traversal(jid=str(me.jid), key=me.public_key, sign=me.sign, server=None,
                     host_candidates=(), accept_introductions=True, rng=random.Random(1))


def _introduce(traversal: Traversal, name: str, relay_peer: tuple[str, int]) -> tuple[str, int]:
    peer = generate_identity(f"{name}@example.org/phone")
    link = traversal.introduced(Introduction(
        str(peer.jid), peer.public_key, name.encode().ljust(8, b"-"), b"k" * 32, False, (),
        lambda payload: (payload, relay_peer), None, "test", relay_peer=relay_peer), now=0.0)
    assert link is not None
    return link.mapped


def test_the_exact_relay_peer_picks_its_link_and_a_new_port_the_only_one_from_its_ip() -> None:
    traversal = _traversal()
    mapped = _introduce(traversal, "alice", (COTURN_IP, 50001))
    assert traversal.map_relayed((COTURN_IP, 50001)) == mapped
    # The peer's NAT gave it another port toward the relay: one link from that IP.
    assert traversal.map_relayed((COTURN_IP, 50777)) == mapped
    assert traversal.map_relayed(("198.51.100.3", 50001)) is None
    assert traversal.counters["relay_unknown"] == 1


def test_two_peers_relayed_by_one_turn_server_are_never_mixed_up() -> None:
    traversal = _traversal()
    alice = _introduce(traversal, "alice", (COTURN_IP, 50001))
    bob = _introduce(traversal, "bob", (COTURN_IP, 50002))
    assert traversal.map_relayed((COTURN_IP, 50001)) == alice
    assert traversal.map_relayed((COTURN_IP, 50002)) == bob
    # From that IP, at a port neither has: which one is it? Neither is guessed.
    assert traversal.map_relayed((COTURN_IP, 50003)) is None
    assert traversal.counters["relay_ambiguous"] == 1
