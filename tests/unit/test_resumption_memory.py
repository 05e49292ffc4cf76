"""Sessions that outlive their QUIC connection, on the memory network.

The production endpoint on both devices (real QUIC, real XML streams, the
real rendezvous core), with ``EndpointConfig.resume_timeout``: the network
between the two homes and the server goes away for longer than the idle
timeout, so both QUIC connections die; the initiating device finds the
peer again and a new connection resumes the session (docs/protocol.md
3.5). Stanzas sent before, during and after arrive exactly once, in order,
on the same connection objects. A device that restarted, a stolen
resumption id, and a peer gone for good are the other cases.
"""

from __future__ import annotations

import dataclasses

from dtx.proto.endpoint import EndpointConfig, SessionEnded, SessionResumed, SessionSuspended
from dtx.proto.paths import PathKind
from tests.fakes import MemoryNetwork, MemoryPeer, Packet, add_device, identity_for

from .test_traversal_memory import REMOTE, SETTLE, TV, introduce

RESUMING = EndpointConfig(resume_timeout=180.0)
OUTAGE = 45.0
"""Longer than the idle timeout (30 s): both QUIC connections die."""


class Outage:
    """A route hook that drops every packet while on."""

    def __init__(self) -> None:
        self.on = False
        self.dropped = 0

    def __call__(self, net: MemoryNetwork, packet: Packet) -> None:
        if self.on:
            self.dropped += 1
        else:
            net.deliver(packet)


def events_of(device: MemoryPeer, kind: type) -> list[object]:
    return [ev for ev in device.events if isinstance(ev, kind)]


def send_bodies(device: MemoryPeer, peer: str, bodies: list[str]) -> None:
    for body in bodies:
        device.send(peer, body)


def test_ten_thousand_stanzas_across_a_45_s_outage_arrive_once_in_order() -> None:
    outage = Outage()
    scene = introduce("port-restricted-cone", "port-restricted-cone", route=outage,
                      config=RESUMING, session_within=5.0)
    remote, tv, net = scene.remote, scene.tv, scene.net
    net.run(SETTLE)
    assert remote.path(TV) is PathKind.DIRECT
    remote_conn, tv_conn = remote.sessions[TV], tv.sessions[REMOTE]
    bodies = [f"s{i}" for i in range(10_000)]
    send_bodies(remote, TV, bodies[:2000])
    tv.send(REMOTE, "before")
    net.run(1.0)
    outage.on = True
    for start in range(2000, 8000, 100):  # 6,000 while the network is gone
        send_bodies(remote, TV, bodies[start:start + 100])
        net.run(OUTAGE / 60)
    assert outage.dropped > 0
    assert events_of(remote, SessionSuspended) and events_of(tv, SessionSuspended), \
        "both connections died (idle timeout) and both sessions wait"
    tv.send(REMOTE, "during")
    outage.on = False
    send_bodies(remote, TV, bodies[8000:])
    assert net.run_until(lambda: len(tv.bodies(REMOTE)) >= len(bodies) + 1, 120.0), \
        f"only {len(tv.bodies(REMOTE))} arrived"
    net.run(2.0)
    assert tv.bodies(REMOTE) == ["pause", *bodies], "exactly once, in order"
    assert remote.bodies(TV) == ["before", "during"]
    assert remote.sessions[TV] is remote_conn and tv.sessions[REMOTE] is tv_conn, \
        "the same session objects go on"
    for device in (remote, tv):
        assert len(events_of(device, SessionResumed)) == 1
        assert not events_of(device, SessionEnded), "no session ended"
        assert device.endpoint.counters["sessions_resumed"] == 1
    assert remote_conn.is_open and not remote_conn.unacknowledged
    # and it goes on, both ways
    remote.send(TV, "after")
    tv.send(REMOTE, "after")
    net.run(1.0)
    assert tv.bodies(REMOTE)[-1] == "after" and remote.bodies(TV)[-1] == "after"


def test_without_resume_timeout_the_session_ends_with_its_stanzas() -> None:
    outage = Outage()
    scene = introduce("port-restricted-cone", "port-restricted-cone", route=outage,
                      config=EndpointConfig(resume_timeout=None))
    remote, net = scene.remote, scene.net
    net.run(SETTLE)
    outage.on = True
    send_bodies(remote, TV, ["lost 1", "lost 2"])
    net.run(OUTAGE)
    ended = events_of(remote, SessionEnded)
    assert ended and not events_of(remote, SessionSuspended)
    assert [el.findtext("{jabber:client}body") for el in ended[0].ended.unacknowledged] \
        == ["lost 1", "lost 2"]  # type: ignore[attr-defined]


def test_a_peer_gone_for_good_ends_the_session_after_resume_timeout() -> None:
    outage = Outage()
    config = dataclasses.replace(RESUMING, resume_timeout=60.0)
    scene = introduce("port-restricted-cone", "port-restricted-cone", route=outage,
                      config=config)
    remote, net = scene.remote, scene.net
    net.run(SETTLE)
    outage.on = True
    start = net.clock.now
    send_bodies(remote, TV, ["a", "b"])
    net.run(35.0)
    assert events_of(remote, SessionSuspended) and not events_of(remote, SessionEnded)
    send_bodies(remote, TV, ["c"])  # while suspended: it waits with the others
    assert net.run_until(lambda: bool(events_of(remote, SessionEnded)), 120.0)
    ended = events_of(remote, SessionEnded)[0]
    assert isinstance(ended, SessionEnded)
    suspended_at = events_of(remote, SessionSuspended)[0]
    assert net.clock.now - start <= 30.0 + 60.0 + 11.0  # idle timeout, resume_timeout
    assert [el.findtext("{jabber:client}body") for el in ended.ended.unacknowledged] \
        == ["a", "b", "c"], "exactly the unacknowledged stanzas"
    assert suspended_at is not None
    assert remote.endpoint.counters["resume_expired"] == 1
    assert remote.endpoint.counters["resume_attempts"] >= 3, "it kept trying, bounded"


def test_a_restarted_peer_refuses_and_the_session_ends_at_once() -> None:
    outage = Outage()
    scene = introduce("port-restricted-cone", "port-restricted-cone", route=outage,
                      config=RESUMING)
    remote, tv, net = scene.remote, scene.tv, scene.net
    net.run(SETTLE)
    outage.on = True
    send_bodies(remote, TV, ["x"])
    net.run(OUTAGE)
    assert events_of(remote, SessionSuspended)
    # The TV's process restarts (on another host of its home): same
    # identity, no sessions.
    tv.endpoint.close(net.clock.now)
    net.unbind(tv.addr)
    net.remove_node(tv)
    fresh = add_device(net, net.nats["b"], identity_for(TV, 2), scene.server, seed=99,
                       config=RESUMING)
    fresh.start()
    outage.on = False
    assert net.run_until(lambda: bool(events_of(remote, SessionEnded)), 60.0)
    ended = events_of(remote, SessionEnded)[0]
    assert isinstance(ended, SessionEnded) and ended.ended.error is not None
    assert "refused" in str(ended.ended.error)
    assert fresh.endpoint.counters["resume_refused"] == 1
    assert [el.findtext("{jabber:client}body") for el in ended.ended.unacknowledged] == ["x"]


def test_a_stolen_resumption_id_with_another_key_is_refused() -> None:
    outage = Outage()
    # Another device of the remote's account, which the TV trusts.
    thief_id = identity_for("remote@example.org/laptop", 7)
    scene = introduce("port-restricted-cone", "port-restricted-cone", route=outage,
                      config=RESUMING, trusted=[thief_id])
    remote, tv, net = scene.remote, scene.tv, scene.net
    net.run(SETTLE)
    outage.on = True
    net.run(OUTAGE)
    assert events_of(tv, SessionSuspended)
    state = remote.sessions[TV].core.export()  # what an eavesdropper could know
    outage.on = False
    # The other device tries to take the session over with the stolen id.
    thief = add_device(net, net.nats["a"], thief_id, scene.server, seed=77, config=RESUMING)
    thief.start()
    assert net.run_until(lambda: thief.endpoint.registered, 10.0)
    thief.introduce(TV)
    assert net.run_until(lambda: TV in thief.traversal.links, 10.0)
    thief.endpoint.connect(TV, net.clock.now, resume=dataclasses.replace(state))
    thief.flush()
    assert net.run_until(lambda: tv.endpoint.counters["resume_refused"] >= 1, 20.0)
    assert net.run_until(lambda: bool(events_of(thief, SessionEnded)), 20.0)
    assert not events_of(thief, SessionResumed)
    # The real remote still resumes its own session.
    assert net.run_until(lambda: bool(events_of(remote, SessionResumed)), 60.0)
    assert events_of(tv, SessionResumed)


def test_closing_a_suspended_session_ends_it_with_its_stanzas() -> None:
    outage = Outage()
    scene = introduce("port-restricted-cone", "port-restricted-cone", route=outage,
                      config=RESUMING)
    remote, tv, net = scene.remote, scene.tv, scene.net
    net.run(SETTLE)
    outage.on = True
    send_bodies(remote, TV, ["a"])
    net.run(35.0)
    conn = remote.sessions[TV]
    assert events_of(remote, SessionSuspended)
    remote.send(TV, "b")
    conn.close()
    remote.flush()
    ended = events_of(remote, SessionEnded)
    assert len(ended) == 1 and ended[0].connection is conn  # type: ignore[attr-defined]
    assert [el.findtext("{jabber:client}body") for el in ended[0].ended.unacknowledged] \
        == ["a", "b"]  # type: ignore[attr-defined]
    assert net.run_until(lambda: bool(events_of(tv, SessionSuspended)), 15.0)
    tv.endpoint.close(net.clock.now)
    tv.flush()
    assert events_of(tv, SessionEnded), "a device that shuts down ends its suspended sessions"
    net.run(60.0)
    assert len(events_of(remote, SessionEnded)) == 1, "once"


def test_repeated_resumptions_keep_no_old_connections() -> None:
    """Five outages, five resumptions: the QUIC connections they replaced
    are gone (nothing holds them)."""
    import gc
    import weakref

    outage = Outage()
    scene = introduce("port-restricted-cone", "port-restricted-cone", route=outage,
                      config=RESUMING)
    remote, tv, net = scene.remote, scene.tv, scene.net
    net.run(SETTLE)
    replaced = []
    for cycle in range(5):
        replaced += [weakref.ref(remote.sessions[TV].quic), weakref.ref(tv.sessions[REMOTE].quic)]
        send_bodies(remote, TV, [f"{cycle}-{i}" for i in range(50)])
        outage.on = True
        net.run(OUTAGE)
        outage.on = False
        assert net.run_until(
            lambda: len(events_of(remote, SessionResumed)) == cycle + 1, 60.0), cycle
        net.run(2.0)
    assert tv.bodies(REMOTE) == ["pause"] + [f"{c}-{i}" for c in range(5) for i in range(50)]
    remote.events.clear()
    tv.events.clear()
    gc.collect()
    assert [ref() for ref in replaced] == [None] * len(replaced), \
        "a replaced QUIC connection is still held"
    assert remote.endpoint.counters["resume_attempts"] >= 5
