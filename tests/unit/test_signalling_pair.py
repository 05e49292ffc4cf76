"""Jingle signalling machines in pairs, through an in-memory XMPP server.

The server routes each iq by its ``to``, stamps ``from`` (as a real one
does), serialises it with dtx's own writer and parses it back, and delivers
it after a one-way delay per direction; time is a fake clock that jumps to
the next delivery or timer.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from xml.etree.ElementTree import Element, SubElement, fromstring

import pytest

from dtx.errors import ConnectError
from dtx.identity import DeviceIdentity
from dtx.proto.paths import PathKind
from dtx.proto.signalling import (
    CandidatesAdded,
    JingleSignalling,
    KeysWanted,
    LocalCandidate,
    PeerIntroduced,
    RemoteCandidate,
    SessionState,
    SessionTerminated,
    SignallingConfig,
    SignallingEvent,
    SignallingFailed,
)
from dtx.stanza import iq
from dtx.wire.jingle import (
    NS_DTLS,
    NS_DTX,
    NS_ICE_UDP,
    NS_STANZAS,
    NS_XMLSTREAM,
    Action,
    CandidateType,
    Content,
    DeviceProof,
    Fingerprint,
    IceUdpTransport,
    Jingle,
    JingleCondition,
    Reason,
    Setup,
    decode_jingle,
    decode_stanza_error,
    encode_jingle,
    jingle_child,
)
from dtx.wire.xml import encode_stanza

ROMEO = "romeo@montague.example/orchard"
JULIET = "juliet@capulet.example/balcony"
TYBALT = "tybalt@capulet.example/street"

FP = {ROMEO: bytes([0xA1]) * 32, JULIET: bytes([0xB2]) * 32, TYBALT: bytes([0xC3]) * 32}
SEED = {ROMEO: bytes(range(32)), JULIET: bytes(range(32, 64)), TYBALT: bytes(range(64, 96))}
CANDIDATES = {
    ROMEO: [LocalCandidate(("192.168.1.20", 40000)),
            LocalCandidate(("203.0.113.7", 61002), CandidateType.SRFLX, ("192.168.1.20", 40000))],
    JULIET: [LocalCandidate(("10.9.8.7", 50000)),
             LocalCandidate(("198.51.100.23", 3478), CandidateType.SRFLX, ("10.9.8.7", 50000)),
             LocalCandidate(("198.51.100.9", 49170), CandidateType.RELAY,
                            ("198.51.100.23", 3478))],
    TYBALT: [LocalCandidate(("172.16.0.5", 41000))],
}
SECRET_MARKS = {jid: [c.addr[0] for c in cs] + [str(c.addr[1]) for c in cs]
                for jid, cs in CANDIDATES.items()}


def identity(jid: str) -> DeviceIdentity:
    return DeviceIdentity.from_private_bytes(jid, SEED[jid])


def bare(jid: str) -> str:
    return jid.split("/")[0]


@dataclass
class Device:
    """One machine and what it was told."""

    sig: JingleSignalling
    permitted: set[str]
    keys: dict[str, frozenset[bytes] | None]
    events: list[SignallingEvent] = field(default_factory=list)
    candidates_asked: int = 0


class Server:
    """The XMPP server between the devices: routing, ``from`` stamping, delay."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now
        self.devices: dict[str, Device] = {}
        self.delay: dict[tuple[str, str], float] = {}
        self.default_delay = 0.05
        self.queue: list[tuple[float, int, str, str, bytes]] = []
        self.seq = 0
        self.wire: list[tuple[str, str, bytes]] = []
        """(from, to, bytes) of every stanza the server carried."""
        self.hook: Callable[[str, str, Element], Element | None] | None = None
        self.offline: set[str] = set()

    def add(self, jid: str, *, permitted: set[str] | None = None,
            keys: dict[str, frozenset[bytes] | None] | None = None,
            config: SignallingConfig | None = None, seed: int = 1) -> Device:
        ident = identity(jid)
        holder: list[Device] = []

        def local_candidates() -> list[LocalCandidate]:
            holder[0].candidates_asked += 1
            return CANDIDATES[jid]

        sig = JingleSignalling(
            ident, fingerprint=FP[jid],
            may_contact=lambda peer: peer in holder[0].permitted,
            keys_for=lambda b: holder[0].keys.get(b),
            local_candidates=local_candidates, rng=random.Random(seed), config=config)
        if keys is None:
            keys = {bare(j): frozenset({identity(j).public_key}) for j in SEED}
        dev = Device(sig, set(permitted or ()), keys)
        holder.append(dev)
        self.devices[jid] = dev
        return dev

    def collect(self) -> None:
        for jid, dev in self.devices.items():
            for stanza in dev.sig.stanzas_to_send():
                self.submit(jid, stanza)
            while (ev := dev.sig.next_event()) is not None:
                dev.events.append(ev)

    def submit(self, sender: str, stanza: Element) -> None:
        to = stanza.get("to") or ""
        stanza.set("from", sender)  # the server stamps the sender
        if self.hook is not None:
            changed = self.hook(sender, to, stanza)
            if changed is None:
                return
            stanza = changed
        data = encode_stanza(stanza)
        self.wire.append((sender, to, data))
        self.seq += 1
        heapq.heappush(self.queue, (self.now + self.delay.get((sender, to), self.default_delay),
                                    self.seq, sender, to, data))

    def deliver(self, sender: str, to: str, data: bytes) -> None:
        stanza = fromstring(f"<s xmlns='jabber:client'>{data.decode()}</s>")[0]
        dev = self.devices.get(to)
        if dev is None or to in self.offline:
            if stanza.get("type") in ("set", "get"):  # RFC 6120 10.5.3.2
                err = iq("error", stanza.get("id", ""), to=sender, from_=to)
                e = SubElement(err, "{jabber:client}error", {"type": "cancel"})
                SubElement(e, f"{{{NS_STANZAS}}}service-unavailable")
                self.submit(to, err)
            return
        handled = dev.sig.receive_iq(stanza, self.now)
        assert handled, data

    def next_time(self) -> float | None:
        times = [self.queue[0][0]] if self.queue else []
        times += [t for d in self.devices.values() if (t := d.sig.get_timer()) is not None]
        return min(times) if times else None

    def run(self, until: float | None = None, *, steps: int = 10_000) -> None:
        """Deliver and fire timers until nothing is left (or ``until``)."""
        self.collect()
        for _ in range(steps):
            when = self.next_time()
            if when is None or (until is not None and when > until):
                if until is not None:
                    self.now = max(self.now, until)
                return
            self.now = max(self.now, when)
            while self.queue and self.queue[0][0] <= self.now:
                _, _, sender, to, data = heapq.heappop(self.queue)
                self.deliver(sender, to, data)
                self.collect()
            for dev in self.devices.values():
                t = dev.sig.get_timer()
                if t is not None and t <= self.now:
                    dev.sig.handle_timer(self.now)
            self.collect()
        raise AssertionError("the exchange did not settle")

    def sent_by(self, jid: str) -> list[bytes]:
        return [data for frm, _, data in self.wire if frm == jid]


def of(dev: Device, kind: type) -> list:  # type: ignore[type-arg]
    return [e for e in dev.events if isinstance(e, kind)]


def pair(**kw: object) -> tuple[Server, Device, Device]:
    server = Server()
    a = server.add(ROMEO, permitted={JULIET}, **kw)  # type: ignore[arg-type]
    b = server.add(JULIET, permitted={ROMEO}, seed=2, **kw)  # type: ignore[arg-type]
    return server, a, b


def actions(server: Server, sender: str) -> list[str]:
    out = []
    for data in server.sent_by(sender):
        stanza = fromstring(f"<s xmlns='jabber:client'>{data.decode()}</s>")[0]
        payload = jingle_child(stanza)
        out.append(stanza.get("type", "") if payload is None
                   else decode_jingle(payload).action.value)
    return out


# -- the exchange ---------------------------------------------------------------------


def test_success_both_introduced_with_each_others_candidates() -> None:
    server, a, b = pair()
    sid = a.sig.connect(JULIET, CANDIDATES[ROMEO], server.now)
    server.run()
    [ia] = of(a, PeerIntroduced)
    [ib] = of(b, PeerIntroduced)
    assert ia.sid == ib.sid == sid
    assert (ia.peer_jid, ib.peer_jid) == (JULIET, ROMEO)
    assert ia.initiator and not ib.initiator
    assert ia.peer_key == identity(JULIET).public_key
    assert ib.peer_key == identity(ROMEO).public_key
    assert ia.peer_fingerprint == FP[JULIET] and ib.peer_fingerprint == FP[ROMEO]
    assert (ia.intro, ia.probe_key) == (ib.intro, ib.probe_key)
    assert len(ia.intro) == 8 and len(ia.probe_key) == 32
    assert [c.addr for c in ia.candidates] == [c.addr for c in CANDIDATES[JULIET]]
    assert [c.type for c in ia.candidates] == [CandidateType.HOST, CandidateType.SRFLX,
                                               CandidateType.RELAY]
    assert [c.addr for c in ib.candidates] == [c.addr for c in CANDIDATES[ROMEO]]
    assert ia.rtt == pytest.approx(0.1) and ib.rtt is None
    # Juliet probes as her session-accept leaves, Romeo as it arrives.
    assert ia.probe_at == pytest.approx(ib.probe_at + 0.05, abs=1e-9)
    assert a.sig.session_state(sid) is b.sig.session_state(sid) is SessionState.ACTIVE
    assert not of(a, SignallingFailed) and not of(b, SignallingFailed)
    assert actions(server, ROMEO) == ["session-initiate", "result"]
    assert actions(server, JULIET) == ["result", "session-accept"]
    assert server.next_time() is None  # nothing left pending: no request, no timer


def test_the_introduction_seam() -> None:
    server, a, b = pair()
    a.sig.connect(JULIET, CANDIDATES[ROMEO], server.now)
    server.run()
    [ia] = of(a, PeerIntroduced)
    intro = ia.introduction()
    assert intro.source == "xmpp" and intro.initiator and intro.relay is None
    assert intro.peer_jid == JULIET and intro.peer_key == ia.peer_key
    assert intro.candidates == (
        (("10.9.8.7", 50000), PathKind.LAN), (("198.51.100.23", 3478), PathKind.DIRECT),
        (("198.51.100.9", 49170), PathKind.DIRECT))
    assert RemoteCandidate(("10.0.0.1", 1), CandidateType.PRFLX).kind is PathKind.DIRECT


@pytest.mark.parametrize("there,back", [(0.03, 0.09), (0.2, 0.02), (0.5, 0.5)])
def test_the_responder_probes_first_by_the_way_back(there: float, back: float) -> None:
    """The responder's probes leave one signalling one-way (responder to
    initiator) before the initiator's: its NAT is open towards the
    initiator, and its link exists, when the initiator's first probe and
    QUIC Initial arrive."""
    server, a, b = pair()
    server.delay = {(ROMEO, JULIET): there, (JULIET, ROMEO): back}
    start = server.now
    a.sig.connect(JULIET, CANDIDATES[ROMEO], server.now)
    server.run()
    [ia], [ib] = of(a, PeerIntroduced), of(b, PeerIntroduced)
    assert ia.rtt == pytest.approx(there + back)
    assert ib.probe_at == pytest.approx(start + there)
    assert ia.probe_at - ib.probe_at == pytest.approx(back)
    # Both probe at their event's moment: the event is the signal to probe.
    assert ib.probe_at <= server.now and ia.probe_at <= server.now


def test_probe_delay_is_each_sides_own() -> None:
    server, a, b = pair(config=SignallingConfig(probe_delay=0.25))
    start = server.now
    a.sig.connect(JULIET, CANDIDATES[ROMEO], server.now)
    server.run()
    [ia], [ib] = of(a, PeerIntroduced), of(b, PeerIntroduced)
    assert ib.probe_at == pytest.approx(start + 0.05 + 0.25)
    assert ia.probe_at == pytest.approx(start + 0.1 + 0.25)
    assert "session-info" not in actions(server, ROMEO) + actions(server, JULIET)


def test_wire_carries_the_xep_elements() -> None:
    server, a, b = pair()
    a.sig.connect(JULIET, CANDIDATES[ROMEO], server.now)
    server.run()
    initiate = server.sent_by(ROMEO)[0]
    for part in (b"urn:xmpp:jingle:apps:xmlstream:0", b"urn:xmpp:jingle:transports:ice-udp:1",
                 f"<fingerprint xmlns='{NS_DTLS}' hash='sha-256' setup='active'>A1:A1".encode(),
                 b"alpn='dtx/1'", b"type='srflx'", b"rel-addr='192.168.1.20'"):
        assert part in initiate
    accept = [d for d in server.sent_by(JULIET) if b"session-accept" in d][0]
    assert b"setup='passive'" in accept and b"type='relay'" in accept
    assert f"responder='{JULIET}'".encode() in accept


# -- who learns what --------------------------------------------------------------------


def test_a_stranger_gets_service_unavailable_and_no_address() -> None:
    server = Server()
    a = server.add(ROMEO, permitted={JULIET})
    b = server.add(JULIET, permitted=set(), seed=2)  # Romeo is no contact of Juliet's
    a.sig.connect(JULIET, CANDIDATES[ROMEO], server.now)
    server.run()
    [failed] = of(a, SignallingFailed)
    assert failed.remote and failed.condition == "service-unavailable"
    assert b.events == [] and b.candidates_asked == 0
    [reply] = server.sent_by(JULIET)
    stanza = fromstring(f"<s xmlns='jabber:client'>{reply.decode()}</s>")[0]
    assert stanza.get("type") == "error"
    [error] = list(stanza)
    assert [child.tag for child in error] == [f"{{{NS_STANZAS}}}service-unavailable"]
    assert not any(mark.encode() in reply for mark in SECRET_MARKS[JULIET])
    assert b.sig.session_state(failed.sid) is None and b.sig.counters["refused_unknown"] == 1


def test_a_stranger_learns_nothing_more_than_from_a_device_without_jingle() -> None:
    """Juliet's answer to a stranger has the same shape as the server's for a
    device that is not there (or speaks no Jingle): one condition, no text."""
    server = Server()
    a = server.add(ROMEO, permitted={JULIET, TYBALT})
    server.add(JULIET, permitted=set(), seed=2)
    a.sig.connect(JULIET, CANDIDATES[ROMEO], server.now)
    a.sig.connect(TYBALT, CANDIDATES[ROMEO], server.now)  # Tybalt is not online at all
    server.run()
    failures = {f.peer_jid: f for f in of(a, SignallingFailed)}
    assert failures[JULIET].condition == failures[TYBALT].condition == "service-unavailable"
    assert failures[JULIET].reason is failures[TYBALT].reason


@pytest.mark.parametrize("action", [Action.TRANSPORT_INFO, Action.SESSION_TERMINATE,
                                    Action.SESSION_ACCEPT, Action.CONTENT_ADD])
def test_a_stranger_gets_service_unavailable_for_every_action(action: Action) -> None:
    server = Server()
    b = server.add(JULIET, permitted={ROMEO})
    request = iq("set", "x1", to=JULIET, from_=TYBALT,
                 payload=encode_jingle(Jingle(action=action, sid="abc")))
    assert b.sig.receive_iq(request, server.now)
    [reply] = b.sig.stanzas_to_send()
    err = decode_stanza_error(reply)
    assert (err.condition, err.jingle) == ("service-unavailable", None)
    assert reply.get("to") == TYBALT and len(reply) == 1


def test_connect_to_a_stranger_is_refused_locally() -> None:
    server = Server()
    a = server.add(ROMEO, permitted={JULIET})
    for target in (TYBALT, bare(JULIET), ROMEO, "not a jid@@"):
        with pytest.raises(ConnectError):
            a.sig.connect(target, CANDIDATES[ROMEO], server.now)
    assert a.sig.stanzas_to_send() == [] and a.sig.next_event() is None


def test_accept_sessions_off_answers_like_a_stranger() -> None:
    server = Server()
    a = server.add(ROMEO, permitted={JULIET})
    b = server.add(JULIET, permitted={ROMEO}, config=SignallingConfig(accept_sessions=False))
    a.sig.connect(JULIET, CANDIDATES[ROMEO], server.now)
    server.run()
    assert of(a, SignallingFailed)[0].condition == "service-unavailable"
    assert b.candidates_asked == 0


# -- keys -----------------------------------------------------------------------------------


def test_a_forged_initiator_key_is_refused_on_both_sides() -> None:
    server, a, b = pair()
    b.keys[bare(ROMEO)] = frozenset({identity(TYBALT).public_key})  # not Romeo's device key
    a.sig.connect(JULIET, CANDIDATES[ROMEO], server.now)
    server.run()
    [fa], [fb] = of(a, SignallingFailed), of(b, SignallingFailed)
    assert fa.reason is fb.reason is Reason.SECURITY_ERROR
    assert fa.remote and not fb.remote
    assert not of(a, PeerIntroduced) and not of(b, PeerIntroduced)
    assert b.candidates_asked == 0
    assert not any(m.encode() in d for d in server.sent_by(JULIET) for m in SECRET_MARKS[JULIET])
    assert actions(server, JULIET) == ["result", "session-terminate"]
    assert b.sig.counters["refused_security"] == 1


def test_a_forged_responder_key_is_refused_on_both_sides() -> None:
    server, a, b = pair()
    a.keys[bare(JULIET)] = frozenset({identity(TYBALT).public_key})
    a.sig.connect(JULIET, CANDIDATES[ROMEO], server.now)
    server.run()
    [fa], [tb] = of(a, SignallingFailed), of(b, SessionTerminated)
    # Juliet had introduced Romeo as her answer left; his refusal ends it.
    assert fa.reason is tb.reason is Reason.SECURITY_ERROR
    assert not fa.remote and tb.remote
    assert not of(a, PeerIntroduced) and len(of(b, PeerIntroduced)) == 1
    assert actions(server, ROMEO) == ["session-initiate", "result", "session-terminate"]


@pytest.mark.parametrize("what", ["digest", "setup", "signature", "key", "ufrag"])
def test_a_fingerprint_changed_on_the_way_is_refused(what: str) -> None:
    """The server (or anyone between) rewrites part of the session-initiate:
    the signature no longer covers it."""
    server, a, b = pair()

    def tamper(sender: str, to: str, stanza: Element) -> Element:
        payload = jingle_child(stanza)
        if payload is None or payload.get("action") != "session-initiate":
            return stanza
        transport = next(payload.iter("{urn:xmpp:jingle:transports:ice-udp:1}transport"))
        fp = next(payload.iter(f"{{{NS_DTLS}}}fingerprint"))
        device = next(payload.iter(f"{{{NS_DTX}}}device"))
        if what == "digest":
            fp.text = ":".join(["C3"] * 32)
        elif what == "setup":
            fp.set("setup", "actpass")
        elif what == "signature":
            device.set("signature", "A" * 86 + "==")
        elif what == "key":  # another published key of the same account
            b.keys[bare(ROMEO)] = frozenset({identity(ROMEO).public_key,
                                            identity(TYBALT).public_key})
            device.set("key", __import__("base64").b64encode(
                identity(TYBALT).public_key).decode())
        else:
            transport.set("ufrag", "zzzz9999")
        return stanza

    server.hook = tamper
    a.sig.connect(JULIET, CANDIDATES[ROMEO], server.now)
    server.run()
    assert [f.reason for f in of(b, SignallingFailed)] == [Reason.SECURITY_ERROR]
    assert [f.reason for f in of(a, SignallingFailed)] == [Reason.SECURITY_ERROR]
    assert b.candidates_asked == 0


def test_an_account_with_no_keys_is_refused() -> None:
    server, a, b = pair()
    b.keys[bare(ROMEO)] = frozenset()
    a.sig.connect(JULIET, CANDIDATES[ROMEO], server.now)
    server.run()
    assert [f.reason for f in of(b, SignallingFailed)] == [Reason.SECURITY_ERROR]
    # known to have none; read once more (a device may have published since)
    assert [e for e in b.events if isinstance(e, KeysWanted)] == [KeysWanted(bare(ROMEO))]


def test_a_key_published_since_the_keys_were_read_is_found_by_reading_again() -> None:
    """The account's keys were read before this device published its own:
    the responder reads them again once, finds it, and accepts."""
    server, a, b = pair()
    b.keys[bare(ROMEO)] = frozenset({identity(TYBALT).public_key})  # stale
    a.sig.connect(JULIET, CANDIDATES[ROMEO], server.now)
    server.run(until=server.now + 0.2)
    assert of(b, KeysWanted) == [KeysWanted(bare(ROMEO))] and not of(b, PeerIntroduced)
    b.keys[bare(ROMEO)] = frozenset({identity(TYBALT).public_key, identity(ROMEO).public_key})
    b.sig.keys_changed(bare(ROMEO), server.now)
    server.run()
    assert len(of(a, PeerIntroduced)) == len(of(b, PeerIntroduced)) == 1


def test_a_key_still_missing_after_reading_again_is_refused_at_once() -> None:
    server, a, b = pair()
    b.keys[bare(ROMEO)] = frozenset({identity(TYBALT).public_key})
    a.sig.connect(JULIET, CANDIDATES[ROMEO], server.now)
    server.run(until=server.now + 0.2)
    asked = server.now
    b.sig.keys_changed(bare(ROMEO), server.now)  # read again: still not there
    server.run(until=server.now + 0.01)
    [f] = of(b, SignallingFailed)
    assert f.reason is Reason.SECURITY_ERROR and server.now - asked < 0.05


def test_unknown_keys_are_asked_for_and_the_session_goes_on() -> None:
    server, a, b = pair()
    b.keys.pop(bare(ROMEO))
    a.sig.connect(JULIET, CANDIDATES[ROMEO], server.now)
    server.run(until=server.now + 0.2)
    assert of(b, KeysWanted) == [KeysWanted(bare(ROMEO))]
    assert b.candidates_asked == 0 and not of(b, PeerIntroduced)
    b.keys[bare(ROMEO)] = frozenset({identity(ROMEO).public_key})  # the vCard arrived
    b.sig.keys_changed(bare(ROMEO), server.now)
    server.run()
    assert len(of(a, PeerIntroduced)) == len(of(b, PeerIntroduced)) == 1
    [ia], [ib] = of(a, PeerIntroduced), of(b, PeerIntroduced)
    # The wait is before Juliet's answer: the two still probe one way apart.
    assert ia.probe_at == pytest.approx(ib.probe_at + 0.05)


def test_keys_that_never_come_refuse_after_the_wait() -> None:
    server, a, b = pair(config=SignallingConfig(key_wait=3.0))
    b.keys.pop(bare(ROMEO))
    start = server.now
    a.sig.connect(JULIET, CANDIDATES[ROMEO], server.now)
    server.run(until=start + 3.04)
    assert not of(b, SignallingFailed)
    server.run(until=start + 3.06)
    assert [f.reason for f in of(b, SignallingFailed)] == [Reason.SECURITY_ERROR]
    server.run()
    assert [f.reason for f in of(a, SignallingFailed)] == [Reason.SECURITY_ERROR]


def test_the_initiator_prefetches_unknown_keys() -> None:
    server, a, b = pair()
    a.keys.pop(bare(JULIET))
    a.sig.connect(JULIET, CANDIDATES[ROMEO], server.now)
    server.collect()
    assert of(a, KeysWanted) == [KeysWanted(bare(JULIET))]
    server.run(until=server.now + 1)
    assert of(a, KeysWanted) == [KeysWanted(bare(JULIET))]  # once per key_wait
    a.keys[bare(JULIET)] = frozenset({identity(JULIET).public_key})
    a.sig.keys_changed(JULIET, server.now)
    server.run()
    assert of(a, PeerIntroduced) and of(b, PeerIntroduced)


# -- trickle --------------------------------------------------------------------------------


def test_trickled_candidates_after_the_introduction() -> None:
    server, a, b = pair()
    sid = a.sig.connect(JULIET, CANDIDATES[ROMEO], server.now)
    server.run()
    new = LocalCandidate(("198.51.100.77", 50123), CandidateType.RELAY, ("203.0.113.7", 61002))
    assert a.sig.add_candidates([new, *CANDIDATES[ROMEO]], server.now) == 1
    assert a.sig.add_candidates([new], server.now, sid=sid) == 0  # sent already
    server.run()
    [added] = of(b, CandidatesAdded)
    assert added.candidates == (RemoteCandidate(("198.51.100.77", 50123), CandidateType.RELAY),)
    assert b.sig.add_candidates([LocalCandidate(("2001:db8::9", 50000))], server.now) == 1
    server.run()
    assert of(a, CandidatesAdded)[0].candidates == (
        RemoteCandidate(("2001:db8::9", 50000), CandidateType.HOST),)
    info = [d for d in server.sent_by(ROMEO) if b"transport-info" in d][0]
    assert b"<description" not in info and b"fingerprint" not in info


def test_candidates_trickled_before_the_accept_join_the_introduction() -> None:
    server, a, b = pair()
    b.keys.pop(bare(ROMEO))  # Juliet waits for keys while Romeo trickles
    a.sig.connect(JULIET, CANDIDATES[ROMEO][:1], server.now)
    a.sig.add_candidates(CANDIDATES[ROMEO][1:], server.now)
    server.run(until=server.now + 0.5)
    b.keys[bare(ROMEO)] = frozenset({identity(ROMEO).public_key})
    b.sig.keys_changed(bare(ROMEO), server.now)
    server.run()
    [ib] = of(b, PeerIntroduced)
    assert [c.addr for c in ib.candidates] == [c.addr for c in CANDIDATES[ROMEO]]
    assert not of(b, CandidatesAdded)


def test_a_new_ufrag_in_transport_info_is_bad_request() -> None:
    server, a, b = pair()
    sid = a.sig.connect(JULIET, CANDIDATES[ROMEO], server.now)
    server.run()

    def restart(sender: str, to: str, stanza: Element) -> Element:
        for t in stanza.iter("{urn:xmpp:jingle:transports:ice-udp:1}transport"):
            t.set("ufrag", "rest4rt")
        return stanza

    server.hook = restart
    a.sig.add_candidates([LocalCandidate(("192.0.2.1", 9))], server.now, sid=sid)
    server.run()
    assert not of(b, CandidatesAdded)
    assert b"bad-request" in server.sent_by(JULIET)[-1]
    assert a.sig.counters["errors_ignored"] == 1  # the error ends nothing


def test_candidates_are_bounded_on_both_sides() -> None:
    server = Server()
    a = server.add(ROMEO, permitted={JULIET}, config=SignallingConfig(max_candidates=10))
    b = server.add(JULIET, permitted={ROMEO}, seed=2, config=SignallingConfig(max_candidates=4))
    sid = a.sig.connect(JULIET, CANDIDATES[ROMEO], server.now)
    server.run()
    many = [LocalCandidate((f"192.0.2.{i}", 1000 + i)) for i in range(1, 20)]
    assert a.sig.add_candidates(many, server.now, sid=sid) == 1
    server.run()
    sent = [d for d in server.sent_by(ROMEO) if b"transport-info" in d][0]
    assert sent.count(b"<candidate ") == 8  # Romeo sends at most 10 in all
    [added] = of(b, CandidatesAdded)
    assert len(added.candidates) == 2  # Juliet takes at most 4 in all
    assert b.sig.statistics().counters["candidates_dropped"] == 6


# -- timeouts ---------------------------------------------------------------------------------


def test_no_answer_fails_after_the_iq_timeout() -> None:
    server, a, b = pair(config=SignallingConfig(iq_timeout=4.0))
    server.hook = lambda sender, to, stanza: None if sender == ROMEO else stanza  # lost
    start = server.now
    a.sig.connect(JULIET, CANDIDATES[ROMEO], server.now)
    server.run(until=start + 3.99)
    assert not of(a, SignallingFailed)
    server.run(until=start + 4.0)
    [fa] = of(a, SignallingFailed)
    assert fa.reason is Reason.TIMEOUT and not fa.remote
    assert a.sig.session_state(fa.sid) is None
    server.run()  # the session-terminate sent after it is not waited for past its timeout
    assert a.sig.get_timer() is None and b.events == []


def test_acknowledged_but_never_accepted_fails_after_the_accept_timeout() -> None:
    server, a, b = pair(config=SignallingConfig(accept_timeout=7.0, key_wait=30.0))
    b.keys.pop(bare(ROMEO))  # Juliet keeps waiting for keys
    start = server.now
    a.sig.connect(JULIET, CANDIDATES[ROMEO], server.now)
    server.run(until=start + 7.5)
    [fa] = of(a, SignallingFailed)
    assert fa.reason is Reason.TIMEOUT
    server.run()
    [fb] = of(b, SignallingFailed)  # Romeo's session-terminate ended Juliet's wait
    assert fb.remote and fb.reason is Reason.TIMEOUT
    assert server.now < start + 8


def test_an_error_to_the_session_accept_fails_the_responder() -> None:
    server, a, b = pair()

    def refuse_accept(sender: str, to: str, stanza: Element) -> Element | None:
        payload = jingle_child(stanza)
        if payload is not None and payload.get("action") == "session-accept":
            err = iq("error", stanza.get("id", ""), to=JULIET, from_=ROMEO)
            e = SubElement(err, "{jabber:client}error", {"type": "cancel"})
            SubElement(e, f"{{{NS_STANZAS}}}item-not-found")
            server.submit(ROMEO, err)
            return None
        return stanza

    server.hook = refuse_accept
    a.sig.connect(JULIET, CANDIDATES[ROMEO], server.now)
    server.run()
    [tb] = of(b, SessionTerminated)  # introduced as the answer left; now over
    assert tb.remote and tb.reason is Reason.GENERAL_ERROR
    assert b.sig.session_state(tb.sid) is None


# -- ending ------------------------------------------------------------------------------------


def test_terminate_reaches_the_peer() -> None:
    server, a, b = pair()
    sid = a.sig.connect(JULIET, CANDIDATES[ROMEO], server.now)
    server.run()
    assert a.sig.terminate(sid, server.now)
    assert not a.sig.terminate(sid, server.now)
    server.run()
    assert of(b, SessionTerminated) == [SessionTerminated(sid, ROMEO, Reason.SUCCESS, True)]
    assert not of(a, SessionTerminated)  # the caller knows
    assert b.sig.session_state(sid) is None and a.sig.session_state(sid) is None


def test_close_ends_every_session_with_gone() -> None:
    server = Server()
    a = server.add(ROMEO, permitted={JULIET, TYBALT})
    b = server.add(JULIET, permitted={ROMEO}, seed=2)
    t = server.add(TYBALT, permitted={ROMEO}, seed=3)
    a.sig.connect(JULIET, CANDIDATES[ROMEO], server.now)
    a.sig.connect(TYBALT, CANDIDATES[ROMEO], server.now)
    server.run()
    a.sig.close(server.now)
    server.run()
    for dev in (b, t):
        assert [e.reason for e in of(dev, SessionTerminated)] == [Reason.GONE]


def test_a_replayed_session_initiate_is_out_of_order() -> None:
    server, a, b = pair()
    captured: list[Element] = []

    def keep(sender: str, to: str, stanza: Element) -> Element:
        if b"session-initiate" in encode_stanza(stanza):
            captured.append(fromstring(f"<s xmlns='jabber:client'>"
                                       f"{encode_stanza(stanza).decode()}</s>")[0])
        return stanza

    server.hook = keep
    sid = a.sig.connect(JULIET, CANDIDATES[ROMEO], server.now)
    server.run()
    a.sig.terminate(sid, server.now)
    server.run()
    asked = b.candidates_asked
    assert b.sig.receive_iq(captured[0], server.now)
    [reply] = b.sig.stanzas_to_send()
    err = decode_stanza_error(reply)
    assert (err.condition, err.jingle) == ("unexpected-request", JingleCondition.OUT_OF_ORDER)
    assert b.candidates_asked == asked


# -- glare and replacement -----------------------------------------------------------------------


def test_glare_leaves_one_session_with_opposite_roles() -> None:
    server, a, b = pair()
    sid_a = a.sig.connect(JULIET, CANDIDATES[ROMEO], server.now)
    sid_b = b.sig.connect(ROMEO, CANDIDATES[JULIET], server.now)
    server.run()
    [ia], [ib] = of(a, PeerIntroduced), of(b, PeerIntroduced)
    winner = min(sid_a, sid_b)
    assert ia.sid == ib.sid == winner
    assert ia.initiator == (winner == sid_a) and ib.initiator == (winner == sid_b)
    assert ia.intro == ib.intro
    assert not of(a, SignallingFailed) and not of(b, SignallingFailed)
    assert a.sig.counters["tie_breaks"] + b.sig.counters["tie_breaks"] >= 2


def test_glare_with_the_winning_offer_refused_is_reported() -> None:
    """Juliet's session-initiate wins the tie-break, but Romeo's rate limit
    refuses it; Romeo's own offer then gets Juliet's tie-break error. Both
    must say so rather than vanish."""
    server = Server()
    a = server.add(ROMEO, permitted={JULIET}, config=SignallingConfig(initiate_burst=1))
    b = server.add(JULIET, permitted={ROMEO}, seed=3)  # seed 3 draws the lower sid
    a.sig._take_token(bare(JULIET), server.now)  # noqa: SLF001  (spend Juliet's one token)
    sid_a = a.sig.connect(JULIET, CANDIDATES[ROMEO], server.now)
    sid_b = b.sig.connect(ROMEO, CANDIDATES[JULIET], server.now)
    assert sid_b < sid_a
    server.run()
    [fa], [fb] = of(a, SignallingFailed), of(b, SignallingFailed)
    assert (fa.sid, fa.condition, fa.remote) == (sid_a, "conflict", True)
    assert (fb.sid, fb.condition, fb.reason) == (sid_b, "resource-constraint", Reason.BUSY)
    assert not of(a, PeerIntroduced) and not of(b, PeerIntroduced)


def test_connect_while_in_progress_returns_the_same_sid() -> None:
    server, a, b = pair()
    sid = a.sig.connect(JULIET, CANDIDATES[ROMEO], server.now)
    assert a.sig.connect(JULIET, CANDIDATES[ROMEO], server.now) == sid
    server.run()
    again = a.sig.connect(JULIET, CANDIDATES[ROMEO], server.now)  # a re-introduction
    assert again != sid and a.sig.session_state(sid) is None
    server.run()
    assert [e.sid for e in of(b, PeerIntroduced)] == [sid, again]
    assert b.sig.session_state(sid) is None  # the newer session replaced it


# -- bounds -----------------------------------------------------------------------------------


def crafted_initiate(sender: str, sid: str, to: str = JULIET, *, whole: bool = False) -> Element:
    """A session-initiate from ``sender``: bare, or (``whole``) with a
    transport, fingerprint and a device proof whose key nobody knows yet."""
    contents: tuple[Content, ...] = ()
    if whole:
        contents = (Content(name="xmlstream", description=NS_XMLSTREAM, transport_ns=NS_ICE_UDP,
                            transport=IceUdpTransport(
                                ufrag="abcd", pwd="p" * 22,
                                fingerprint=Fingerprint("sha-256", Setup.ACTIVE, bytes(32)),
                                device=DeviceProof("dtx/1", bytes(32), bytes(64)))),)
    return iq("set", f"f{sid}", to=to, from_=sender, payload=encode_jingle(
        Jingle(action=Action.SESSION_INITIATE, sid=sid, initiator=sender, contents=contents)))


def test_a_stranger_flood_leaves_no_state() -> None:
    server = Server()
    b = server.add(JULIET, permitted={ROMEO})
    for i in range(5000):
        b.sig.receive_iq(crafted_initiate(f"mob{i}@evil.example/x", f"s{i}"), server.now)
    replies = b.sig.stanzas_to_send()
    assert len(replies) == 5000
    assert {decode_stanza_error(r).condition for r in replies} == {"service-unavailable"}
    stats = b.sig.statistics()
    assert (stats.sessions, stats.requests, stats.rate_entries) == (0, 0, 0)
    assert stats.counters["refused_unknown"] == 5000
    assert b.sig.get_timer() is None and b.candidates_asked == 0


def test_session_initiates_from_one_account_are_rate_limited() -> None:
    server = Server()
    b = server.add(JULIET, permitted={f"romeo@montague.example/r{i}" for i in range(100)},
                   config=SignallingConfig(initiate_burst=3, initiate_interval=10.0))
    conditions = []
    for i in range(10):
        b.sig.receive_iq(crafted_initiate(f"romeo@montague.example/r{i}", f"s{i}"), server.now)
        replies = b.sig.stanzas_to_send()
        conditions.append(decode_stanza_error(replies[0]).condition
                          if replies[0].get("type") == "error" else "result")
    assert conditions == ["result"] * 3 + ["resource-constraint"] * 7
    b.sig.receive_iq(crafted_initiate("romeo@montague.example/r50", "late"), server.now + 10.0)
    assert b.sig.stanzas_to_send()[0].get("type") == "result"  # one token back


def test_sessions_per_account_and_pending_are_bounded() -> None:
    server = Server()
    cfg = SignallingConfig(max_sessions_per_account=4, max_pending=6, initiate_burst=100)
    b = server.add(JULIET, permitted={f"{n}@x.example/r{i}" for n in "ab" for i in range(10)},
                   config=cfg, keys={})  # no keys known: each waits in VERIFYING
    answers: dict[str, list[str]] = {"a": [], "b": []}
    for i in range(10):
        for n in "ab":
            b.sig.receive_iq(crafted_initiate(f"{n}@x.example/r{i}", f"{n}{i}", whole=True),
                             server.now)
            answers[n].append(b.sig.stanzas_to_send()[0].get("type", ""))
    # a0 b0 a1 b1 a2 b2 (6 pending) — then the pending bound refuses everyone
    assert answers["a"] == ["result"] * 3 + ["error"] * 7
    assert answers["b"] == ["result"] * 3 + ["error"] * 7
    assert b.sig.statistics().pending == 6
    assert of_events(b.sig, KeysWanted) == [KeysWanted("a@x.example"), KeysWanted("b@x.example")]
    b.sig.handle_timer(server.now + cfg.key_wait)  # no keys came: all refused, table empty
    assert len(of_events(b.sig, SignallingFailed)) == 6 and b.sig.statistics().sessions == 0
    # the per-account bound, with room for more pending
    c = server.add(TYBALT, permitted={f"a@x.example/r{i}" for i in range(10)}, seed=9, keys={},
                   config=SignallingConfig(max_sessions_per_account=4, initiate_burst=100))
    kinds = []
    for i in range(10):
        c.sig.receive_iq(crafted_initiate(f"a@x.example/r{i}", f"a{i}", TYBALT, whole=True),
                         server.now)
        kinds.append(c.sig.stanzas_to_send()[0].get("type", ""))
    assert kinds == ["result"] * 4 + ["error"] * 6


def of_events(sig: JingleSignalling, kind: type) -> list:  # type: ignore[type-arg]
    out = []
    while (ev := sig.next_event()) is not None:
        if isinstance(ev, kind):
            out.append(ev)
    return out


def test_a_full_table_ends_the_oldest_introduced_session(
        monkeypatch: pytest.MonkeyPatch) -> None:
    server = Server()
    peers = [f"friend{i}@x.example/d" for i in range(4)]
    a = server.add(ROMEO, permitted=set(peers), config=SignallingConfig(max_sessions=3))
    for i, peer in enumerate(peers):
        monkeypatch.setitem(SEED, peer, bytes([i + 100]) * 32)
        monkeypatch.setitem(FP, peer, bytes([i]) * 32)
        monkeypatch.setitem(CANDIDATES, peer, [LocalCandidate((f"192.0.2.{i + 1}", 5000))])
        server.add(peer, permitted={ROMEO}, seed=10 + i)
    a.keys.update({bare(p): frozenset({identity(p).public_key}) for p in peers})
    for peer in peers:
        a.sig.connect(peer, CANDIDATES[ROMEO], server.now)
        server.run()
    assert [e.peer_jid for e in of(a, SessionTerminated)] == [peers[0]]
    assert of(a, SessionTerminated)[0].reason is Reason.EXPIRED
    assert [e.reason for e in of(server.devices[peers[0]], SessionTerminated)] == [Reason.EXPIRED]
    assert a.sig.statistics().sessions == 3 and a.sig.statistics().counters["evicted"] == 1


def test_pending_connects_are_bounded_locally() -> None:
    server = Server()
    peers = [f"p{i}@x.example/d" for i in range(5)]
    a = server.add(ROMEO, permitted=set(peers), config=SignallingConfig(max_pending=3))
    for peer in peers[:3]:
        a.sig.connect(peer, CANDIDATES[ROMEO], server.now)
    with pytest.raises(ConnectError):
        a.sig.connect(peers[3], CANDIDATES[ROMEO], server.now)


# -- odd input -----------------------------------------------------------------------------------


def test_not_signalling_is_left_to_the_caller() -> None:
    server = Server()
    b = server.add(JULIET, permitted={ROMEO})
    ping = iq("get", "p1", to=JULIET, from_=ROMEO, payload=Element("{urn:xmpp:ping}ping"))
    assert not b.sig.receive_iq(ping, server.now)
    assert not b.sig.receive_iq(iq("result", "someone-else", from_=ROMEO), server.now)
    assert not b.sig.receive_iq(Element("{jabber:client}message"), server.now)
    assert b.sig.receive_iq(iq("result", "dtxj-0000000000000000", from_=ROMEO), server.now)
    assert b.sig.counters["answers_unmatched"] == 1
    assert b.sig.stanzas_to_send() == []


@pytest.mark.parametrize("build,condition,jingle", [
    (lambda: iq("set", "m", to=JULIET, from_=ROMEO,
                payload=Element("{urn:xmpp:jingle:1}jingle", {"action": "boom", "sid": "s"})),
     "bad-request", None),
    (lambda: iq("get", "g", to=JULIET, from_=ROMEO,
                payload=encode_jingle(Jingle(action=Action.SESSION_INFO, sid="s"))),
     "bad-request", None),
    (lambda: iq("set", "c", to=JULIET, from_=ROMEO,
                payload=encode_jingle(Jingle(action=Action.CONTENT_ADD, sid="s"))),
     "feature-not-implemented", None),
    (lambda: iq("set", "u", to=JULIET, from_=ROMEO,
                payload=encode_jingle(Jingle(action=Action.TRANSPORT_INFO, sid="nosuch"))),
     "item-not-found", JingleCondition.UNKNOWN_SESSION),
    (lambda: iq("set", "i", to=JULIET, from_=ROMEO, payload=encode_jingle(Jingle(
        action=Action.SESSION_INITIATE, sid="s", initiator=TYBALT))),
     "bad-request", None),
])
def test_refusals_to_a_contact(build: Callable[[], Element], condition: str,
                               jingle: JingleCondition | None) -> None:
    server = Server()
    b = server.add(JULIET, permitted={ROMEO})
    assert b.sig.receive_iq(build(), server.now)
    [reply] = b.sig.stanzas_to_send()
    assert reply.get("type") == "error" and reply.get("to") == ROMEO
    err = decode_stanza_error(reply)
    assert (err.condition, err.jingle) == (condition, jingle)
    assert b.sig.statistics().sessions == 0


def test_actions_out_of_order_and_from_another_device() -> None:
    server, a, b = pair()
    server.add(TYBALT, permitted={ROMEO, JULIET}, seed=3)
    b.permitted.add(TYBALT)
    sid = a.sig.connect(JULIET, CANDIDATES[ROMEO], server.now)
    server.run()
    accept = iq("set", "x", to=JULIET, from_=ROMEO,
                payload=encode_jingle(Jingle(action=Action.SESSION_ACCEPT, sid=sid)))
    assert b.sig.receive_iq(accept, server.now)  # Juliet is the responder
    err = decode_stanza_error(b.sig.stanzas_to_send()[0])
    assert err.jingle is JingleCondition.OUT_OF_ORDER
    steal = iq("set", "y", to=JULIET, from_=TYBALT,
               payload=encode_jingle(Jingle(action=Action.SESSION_TERMINATE, sid=sid)))
    assert b.sig.receive_iq(steal, server.now)
    err = decode_stanza_error(b.sig.stanzas_to_send()[0])
    assert err.jingle is JingleCondition.UNKNOWN_SESSION
    assert b.sig.session_state(sid) is SessionState.ACTIVE


def test_an_answer_from_the_wrong_jid_is_ignored() -> None:
    server, a, b = pair()
    sid = a.sig.connect(JULIET, CANDIDATES[ROMEO], server.now)
    [initiate] = a.sig.stanzas_to_send()
    forged = iq("error", initiate.get("id", ""), to=ROMEO, from_=TYBALT)
    e = SubElement(forged, "{jabber:client}error", {"type": "cancel"})
    SubElement(e, f"{{{NS_STANZAS}}}service-unavailable")
    assert a.sig.receive_iq(forged, server.now)
    assert a.sig.session_state(sid) is SessionState.AWAITING_ACCEPT
    assert a.sig.counters["answers_unmatched"] == 1


def test_an_unknown_session_info_payload_is_unsupported_info() -> None:
    server, a, b = pair()
    sid = a.sig.connect(JULIET, CANDIDATES[ROMEO], server.now)
    server.run()
    info = encode_jingle(Jingle(action=Action.SESSION_INFO, sid=sid))
    SubElement(info, "{urn:xmpp:jingle:apps:rtp:info:1}ringing")
    assert b.sig.receive_iq(iq("set", "r", to=JULIET, from_=ROMEO, payload=info), server.now)
    err = decode_stanza_error(b.sig.stanzas_to_send()[0])
    assert (err.condition, err.jingle) == ("feature-not-implemented",
                                           JingleCondition.UNSUPPORTED_INFO)
    ping = encode_jingle(Jingle(action=Action.SESSION_INFO, sid=sid))
    assert b.sig.receive_iq(iq("set", "p", to=JULIET, from_=ROMEO, payload=ping), server.now)
    assert b.sig.stanzas_to_send()[0].get("type") == "result"  # a session ping
