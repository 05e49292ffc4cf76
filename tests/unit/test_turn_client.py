"""The sans-IO TURN client against a scripted in-memory TURN server.

``FakeTurnServer`` is a small RFC 8656 server built on the same codec (its
own checks of what the client sends: credentials, nonces, integrity,
lifetimes), with switches for what real servers do to clients: stale
nonces, credentials bound to an allocation (441), silence, forgotten
allocations, broken integrity. ``Harness`` moves datagrams between the two
and jumps a ``FakeClock`` from timer to timer; no sockets, no sleeps.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dtx.errors import LocalProtocolError
from dtx.proto.paths import RelayWrap
from dtx.proto.turn import (
    AllocationClosed,
    AllocationFailed,
    AllocationLost,
    AllocationRefreshed,
    AllocationState,
    Allocated,
    ChannelBindFailed,
    ChannelBound,
    CredentialsExpiring,
    DataReceived,
    PermissionCreated,
    PermissionFailed,
    TurnClient,
    TurnClientConfig,
    TurnEvent,
)
from dtx.wire.stun import (
    Attribute,
    AttrType,
    Integrity,
    IntegrityCheck,
    StunClass,
    StunMessage,
    StunMethod,
    check_integrity,
    decode_stun,
    encode_stun,
    error_code_attribute,
    xor_address_attribute,
)
from dtx.wire.turn import (
    CHANNEL_MAX,
    CHANNEL_MIN,
    NONCE_COOKIE,
    PasswordAlgorithm,
    data_attribute,
    decode_channel_data,
    encode_channel_data,
    is_channel_data,
    lifetime_attribute,
    long_term_key,
    nonce_attribute,
    password_algorithms_attribute,
    peer_address_attribute,
    realm_attribute,
    relayed_address_attribute,
)
from tests.fakes import FakeClock

Address = tuple[str, int]

SERVER: Address = ("198.51.100.1", 3478)
CLIENT: Address = ("203.0.113.10", 40000)  # the client as the server sees it
RELAYED: Address = ("198.51.100.1", 50000)
PEER: Address = ("192.0.2.20", 41000)
PEER2: Address = ("192.0.2.21", 41001)
REALM = b"dtx.test"
START = 1000.0
USER, PASSWORD = "1700003600:alice", "c2VjcmV0LXBhc3N3b3Jk"
USER2, PASSWORD2 = "1700090000:alice", "bmV3LXBhc3N3b3Jk"


# -- a TURN server, just enough of RFC 8656 -------------------------------------------


@dataclass
class ServerAllocation:
    username: str
    expires: float
    permissions: dict[str, float] = field(default_factory=dict)
    channels: dict[int, tuple[Address, float]] = field(default_factory=dict)


class FakeTurnServer:
    """One client, one allocation; answers and checks like a TURN server."""

    def __init__(self, *, passwords: dict[str, str] | None = None, max_lifetime: int = 3600,
                 pin_credentials: bool = True, sha256: bool = False) -> None:
        self.passwords = passwords if passwords is not None else {USER: PASSWORD, USER2: PASSWORD2}
        self.max_lifetime = max_lifetime
        self.pin_credentials = pin_credentials
        self.sha256 = sha256
        self.nonce_count = 1
        self.allocation: ServerAllocation | None = None
        self.requests: list[tuple[float, StunMessage]] = []
        self.to_peers: list[tuple[Address, bytes]] = []
        self.silent = False
        self.always_stale = False
        self.corrupt_next = 0
        self.unsigned_next = 0
        self.refuse_channels = False
        self.mismatch_next = 0
        self.error_for: dict[int, tuple[int, str]] = {}
        self.lapses: list[str] = []
        self._answers: dict[bytes, bytes] = {}

    @property
    def nonce(self) -> bytes:
        base = b"nonce-%d" % self.nonce_count
        return NONCE_COOKIE + b"AAAB" + base if self.sha256 else base

    def rotate_nonce(self) -> None:
        self.nonce_count += 1

    def key(self, username: str) -> bytes:
        alg = PasswordAlgorithm.SHA256 if self.sha256 else PasswordAlgorithm.MD5
        return long_term_key(username, REALM, self.passwords[username], alg)

    def tick(self, now: float) -> None:
        """Expire what was not refreshed, as a server does, and note it."""
        alloc = self.allocation
        if alloc is None:
            return
        if now > alloc.expires:
            self.lapses.append("allocation")
            self.allocation = None
            return
        for ip, until in list(alloc.permissions.items()):
            if now > until:
                self.lapses.append(f"permission {ip}")
                del alloc.permissions[ip]
        for number, (peer, until) in list(alloc.channels.items()):
            if now > until:
                self.lapses.append(f"channel {number}")
                del alloc.channels[number]

    # -- from the client ------------------------------------------------------------

    def handle(self, data: bytes, now: float) -> list[bytes]:
        self.tick(now)
        if self.silent:
            return []
        if is_channel_data(data):
            frame = decode_channel_data(data)
            alloc = self.allocation
            if alloc is not None and frame.channel in alloc.channels:
                self.to_peers.append((alloc.channels[frame.channel][0], frame.data))
            return []
        msg = decode_stun(data)
        self.requests.append((now, msg))
        if msg.cls is StunClass.INDICATION:
            if msg.method == StunMethod.SEND and self.allocation is not None:
                peer, payload = msg.xor_peer_address, msg.data
                assert peer is not None and payload is not None
                if peer[0] in self.allocation.permissions:
                    self.to_peers.append((peer, payload))
            return []
        assert msg.cls is StunClass.REQUEST
        if msg.transaction_id in self._answers:  # a retransmission
            return [self._deliver(self._answers[msg.transaction_id])]
        reply = self._answer(msg, data, now)
        self._answers[msg.transaction_id] = reply
        return [self._deliver(reply)]

    def _deliver(self, reply: bytes) -> bytes:
        if self.corrupt_next:
            self.corrupt_next -= 1
            msg = decode_stun(reply)
            attrs = tuple(
                Attribute(a.type, bytes(20)) if a.type == AttrType.MESSAGE_INTEGRITY else a
                for a in msg.attributes)
            return encode_stun(StunMessage(msg.method, msg.cls, msg.transaction_id, attrs))
        if self.unsigned_next:
            self.unsigned_next -= 1
            msg = decode_stun(reply)
            attrs = tuple(a for a in msg.attributes if a.type != AttrType.MESSAGE_INTEGRITY)
            return encode_stun(StunMessage(msg.method, msg.cls, msg.transaction_id, attrs))
        return reply

    def _error(self, msg: StunMessage, code: int, reason: str, key: bytes | None = None,
               challenge: bool = False) -> bytes:
        attrs = [error_code_attribute(code, reason)]
        if challenge:
            attrs += [realm_attribute(REALM), nonce_attribute(self.nonce)]
            if self.sha256:
                attrs.append(password_algorithms_attribute(
                    (PasswordAlgorithm.SHA256, PasswordAlgorithm.MD5)))
        return self._reply(msg, StunClass.ERROR, attrs, key)

    def _reply(self, msg: StunMessage, cls: StunClass, attrs: list[Attribute],
               key: bytes | None) -> bytes:
        out = StunMessage(msg.method, cls, msg.transaction_id, tuple(attrs))
        integrity = Integrity.SHA256 if self.sha256 else Integrity.SHA1
        return encode_stun(out, key=key, integrity=integrity)

    def _answer(self, msg: StunMessage, data: bytes, now: float) -> bytes:
        if msg.attribute(AttrType.MESSAGE_INTEGRITY) is None and \
                msg.attribute(AttrType.MESSAGE_INTEGRITY_SHA256) is None:
            return self._error(msg, 401, "Unauthorized", challenge=True)
        assert msg.realm == REALM and msg.username is not None and msg.nonce is not None
        username = msg.username.decode()
        if self.always_stale:
            self.rotate_nonce()
        if self.always_stale or msg.nonce != self.nonce:
            return self._error(msg, 438, "Stale Nonce", challenge=True)
        if username not in self.passwords:
            return self._error(msg, 401, "Unauthorized", challenge=True)
        key = self.key(username)
        if self.sha256:
            assert msg.attribute(AttrType.MESSAGE_INTEGRITY_SHA256) is not None
            assert msg.password_algorithm == PasswordAlgorithm.SHA256
            assert msg.password_algorithms == (PasswordAlgorithm.SHA256, PasswordAlgorithm.MD5)
        if check_integrity(data, key) is not IntegrityCheck.VALID:
            return self._error(msg, 401, "Unauthorized", challenge=True)
        if msg.method == StunMethod.ALLOCATE and self.mismatch_next:
            self.mismatch_next -= 1  # a released allocation not yet gone
            return self._error(msg, 437, "Mismatched allocation: wrong transaction ID\x00")
        if msg.method in self.error_for:
            code, reason = self.error_for[msg.method]
            return self._error(msg, code, reason)  # unsigned, as coturn sends many
        alloc = self.allocation
        if alloc is not None and alloc.username != username:
            if msg.method == StunMethod.ALLOCATE:
                return self._error(msg, 437, "Allocation Mismatch")
            if self.pin_credentials:
                return self._error(msg, 441, "Wrong Credentials")
            alloc.username = username
        tid = msg.transaction_id
        if msg.method == StunMethod.ALLOCATE:
            if alloc is not None:
                return self._error(msg, 437, "Allocation Mismatch", key)
            assert msg.requested_transport == 17
            lifetime = min(msg.lifetime or 600, self.max_lifetime)
            self.allocation = ServerAllocation(username, now + lifetime)
            return self._reply(msg, StunClass.SUCCESS, [
                relayed_address_attribute(RELAYED, tid), xor_address_attribute(CLIENT, tid),
                lifetime_attribute(lifetime)], key)
        if alloc is None:
            return self._error(msg, 437, "Allocation Mismatch", key)
        if msg.method == StunMethod.REFRESH:
            lifetime = min(msg.lifetime if msg.lifetime is not None else 600, self.max_lifetime)
            if lifetime == 0:
                self.allocation = None
            else:
                alloc.expires = now + lifetime
            return self._reply(msg, StunClass.SUCCESS, [lifetime_attribute(lifetime)], key)
        if msg.method == StunMethod.CREATE_PERMISSION:
            peers = msg.xor_peer_addresses
            assert peers
            for peer in peers:
                alloc.permissions[peer[0]] = now + 300
            return self._reply(msg, StunClass.SUCCESS, [], key)
        if msg.method == StunMethod.CHANNEL_BIND:
            number, target = msg.channel_number, msg.xor_peer_address
            assert number is not None and target is not None
            if self.refuse_channels or not CHANNEL_MIN <= number <= CHANNEL_MAX:
                return self._error(msg, 400, "Bad Request", key)
            bound = alloc.channels.get(number)
            if bound is not None and bound[0] != target:
                return self._error(msg, 400, "Bad Request", key)
            alloc.channels[number] = (target, now + 600)
            alloc.permissions[target[0]] = now + 300
            return self._reply(msg, StunClass.SUCCESS, [], key)
        return self._error(msg, 400, "Bad Request", key)

    # -- from a peer ------------------------------------------------------------------

    def from_peer(self, peer: Address, payload: bytes, *, pad: bool = False) -> bytes | None:
        """What the server sends the client for a peer's datagram to the
        relayed address (None: no permission, dropped)."""
        alloc = self.allocation
        if alloc is None or peer[0] not in alloc.permissions:
            return None
        for number, (bound, _) in alloc.channels.items():
            if bound == peer:
                return encode_channel_data(number, payload, pad=pad)
        tid = bytes(12)
        msg = StunMessage(StunMethod.DATA, StunClass.INDICATION, tid,
                          (peer_address_attribute(peer, tid), data_attribute(payload)))
        return encode_stun(msg, fingerprint=False)

    def sent(self, method: int, since: float = 0.0) -> list[StunMessage]:
        return [m for t, m in self.requests if m.method == method and t >= since
                and m.cls is StunClass.REQUEST]


# -- harness ---------------------------------------------------------------------------


class Harness:
    def __init__(self, server: FakeTurnServer | None = None, *,
                 config: TurnClientConfig | None = None, expires: float | None = None,
                 user: str = USER, password: str = PASSWORD) -> None:
        self.clock = FakeClock(START)
        self.server = server or FakeTurnServer()
        self.client = TurnClient(SERVER, user, password, expires, rng=random.Random(7),
                                 config=config)
        self.events: list[tuple[float, TurnEvent]] = []
        self.sent_at: list[float] = []

    def pump(self) -> None:
        for _ in range(1000):
            out = self.client.datagrams_to_send()
            if not out:
                break
            for data, addr in out:
                assert addr == SERVER
                self.sent_at.append(self.clock.now)
                for reply in self.server.handle(data, self.clock.now):
                    self.client.receive(reply, self.clock.now)
        else:
            raise AssertionError("client and server never went quiet")
        self.drain()

    def drain(self) -> None:
        while (ev := self.client.next_event()) is not None:
            self.events.append((self.clock.now, ev))

    def run_until(self, until: float) -> None:
        for _ in range(100_000):
            timer = self.client.get_timer()
            if timer is None or timer > until:
                break
            assert timer >= self.clock.now - 1e-9, "timer in the past"
            self.clock.advance_to(timer)
            self.server.tick(self.clock.now)
            self.client.handle_timer(self.clock.now)
            self.pump()
        else:
            raise AssertionError("timer loop did not settle")
        self.clock.advance_to(until)
        self.server.tick(self.clock.now)

    def of(self, kind: type[TurnEvent]) -> list[TurnEvent]:
        return [e for _, e in self.events if isinstance(e, kind)]

    def allocate(self) -> Allocated:
        self.client.allocate(self.clock.now)
        self.pump()
        got = self.of(Allocated)
        assert got, self.events
        ev = got[-1]
        assert isinstance(ev, Allocated)
        return ev

    def deliver(self, data: bytes | None) -> None:
        assert data is not None
        self.client.receive(data, self.clock.now)
        self.drain()


# -- allocation and authentication ---------------------------------------------------


def test_allocate_with_long_term_credentials() -> None:
    h = Harness()
    ev = h.allocate()
    assert ev == Allocated(RELAYED, CLIENT, 600)
    assert h.client.state is AllocationState.ALLOCATED
    assert h.client.relayed == RELAYED and h.client.mapped == CLIENT
    first, second = h.server.sent(StunMethod.ALLOCATE)
    # the first asks without credentials and gets the realm and nonce
    assert first.username is None and first.attribute(AttrType.MESSAGE_INTEGRITY) is None
    assert first.requested_transport == 17 and first.lifetime == 600
    assert first.has_fingerprint
    # the second signs with the long-term key, echoing realm and nonce
    assert second.username == USER.encode()
    assert second.realm == REALM and second.nonce == b"nonce-1"
    assert second.attribute(AttrType.MESSAGE_INTEGRITY) is not None
    assert second.transaction_id != first.transaction_id
    assert h.client.statistics().requests == 2
    assert h.client.statistics().retransmissions == 0


def test_wrong_password_fails_after_one_signed_try() -> None:
    h = Harness(password="wrong")
    h.client.allocate(h.clock.now)
    h.pump()
    assert h.of(AllocationFailed) == [AllocationFailed(401, "Unauthorized")]
    assert len(h.server.sent(StunMethod.ALLOCATE)) == 2
    assert h.client.state is AllocationState.IDLE
    assert h.client.get_timer() is None
    # another try is allowed (with better credentials)
    h.client.update_credentials(USER, PASSWORD, None, h.clock.now)
    assert h.allocate().relayed == RELAYED


def test_stale_nonce_is_retried_with_the_new_one() -> None:
    h = Harness()
    h.allocate()
    h.server.rotate_nonce()
    h.run_until(START + 600)
    refreshes = h.server.sent(StunMethod.REFRESH)
    assert [m.nonce for m in refreshes] == [b"nonce-1", b"nonce-2"]
    assert h.of(AllocationRefreshed) == [AllocationRefreshed(600)]
    assert h.server.lapses == []


def test_a_server_that_is_always_stale_ends_the_attempt() -> None:
    h = Harness()
    h.server.always_stale = True
    h.client.allocate(h.clock.now)
    h.pump()
    # unsigned, then signed twice (max_auth_retries = 2), then it stops
    assert len(h.server.sent(StunMethod.ALLOCATE)) == 3
    assert h.of(AllocationFailed) == [AllocationFailed(438, "Stale Nonce")]


def test_retransmission_schedule_and_timeout() -> None:
    h = Harness()
    h.server.silent = True
    h.client.allocate(h.clock.now)
    h.pump()
    h.run_until(START + 100)
    # RFC 8489 section 6.2.1: 0, RTO, 3 RTO, 7 RTO ... (Rc = 7), then Rm RTO
    assert [t - START for t in h.sent_at] == [0.0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5]
    assert h.events == [(START + 39.5, AllocationFailed(408, "no answer from the TURN server"))]
    assert h.client.statistics().retransmissions == 6
    assert h.client.get_timer() is None


def test_retransmission_is_configurable() -> None:
    cfg = TurnClientConfig(initial_rto=0.1, max_transmissions=3, last_wait_factor=4)
    h = Harness(config=cfg)
    h.server.silent = True
    h.client.allocate(h.clock.now)
    h.pump()
    h.run_until(START + 10)
    assert [round(t - START, 6) for t in h.sent_at] == [0.0, 0.1, 0.3]
    assert [round(t - START, 6) for t, _ in h.events] == [0.7]


def test_response_with_bad_integrity_is_dropped_and_retransmission_continues() -> None:
    h = Harness()
    h.server.corrupt_next = 2  # the 401 (not checked) and the success (checked)
    h.client.allocate(h.clock.now)
    h.pump()
    assert h.of(Allocated) == []
    assert h.client.statistics().integrity_failures == 1
    h.run_until(START + 1)
    assert h.of(Allocated) == [Allocated(RELAYED, CLIENT, 600)]
    assert h.client.statistics().retransmissions == 1


def test_success_without_integrity_is_dropped() -> None:
    h = Harness()
    h.server.unsigned_next = 2
    h.client.allocate(h.clock.now)
    h.pump()
    assert h.of(Allocated) == [] and h.client.statistics().integrity_failures == 1
    h.run_until(START + 1)
    assert len(h.of(Allocated)) == 1


def test_unsigned_error_is_believed() -> None:
    h = Harness()
    h.server.error_for[StunMethod.ALLOCATE] = (486, "Allocation Quota Reached")
    h.client.allocate(h.clock.now)
    h.pump()
    assert h.of(AllocationFailed) == [AllocationFailed(486, "Allocation Quota Reached")]


@pytest.mark.parametrize(("mismatches", "allocated"), [(1, True), (2, True), (3, False)])
def test_allocate_mismatch_is_asked_again_later(mismatches: int, allocated: bool) -> None:
    h = Harness()
    h.server.mismatch_next = mismatches
    h.client.allocate(h.clock.now)
    h.pump()
    h.run_until(START + 60)
    signed = [t - START for t, m in h.server.requests
              if m.method == StunMethod.ALLOCATE and m.username is not None]
    assert signed == [0.0, 2.0, 6.0][: min(mismatches + 1, 3)]
    if allocated:
        assert [e for _, e in h.events] == [Allocated(RELAYED, CLIENT, 600)]
    else:
        # the reason as sent, without the NUL coturn counts into it
        assert h.events == [(START + 6.0, AllocationFailed(
            437, "Mismatched allocation: wrong transaction ID"))]


def test_sha256_when_the_server_offers_it() -> None:
    h = Harness(FakeTurnServer(sha256=True))
    assert h.allocate().relayed == RELAYED
    signed = h.server.sent(StunMethod.ALLOCATE)[1]
    assert signed.attribute(AttrType.MESSAGE_INTEGRITY) is None
    assert signed.attribute(AttrType.MESSAGE_INTEGRITY_SHA256) is not None
    assert signed.password_algorithm == PasswordAlgorithm.SHA256
    h.client.permit(PEER, h.clock.now)
    h.pump()
    assert h.of(PermissionCreated) == [PermissionCreated(PEER[0])]
    # a stale nonce keeps the algorithm (the server asserts it on every request)
    h.server.rotate_nonce()
    h.run_until(START + 600)
    assert h.of(AllocationRefreshed) == [AllocationRefreshed(600)]
    assert all(m.attribute(AttrType.MESSAGE_INTEGRITY_SHA256) is not None
               for m in h.server.sent(StunMethod.REFRESH))


def test_no_common_password_algorithm() -> None:
    class Exotic(FakeTurnServer):
        def _error(self, msg: StunMessage, code: int, reason: str, key: bytes | None = None,
                   challenge: bool = False) -> bytes:
            attrs = [error_code_attribute(code, reason)]
            if challenge:
                attrs += [realm_attribute(REALM), nonce_attribute(self.nonce),
                          password_algorithms_attribute((0x7777,))]
            return self._reply(msg, StunClass.ERROR, attrs, key)

    h = Harness(Exotic(sha256=True))
    h.client.allocate(h.clock.now)
    h.pump()
    assert h.of(AllocationFailed) == [AllocationFailed(401, "Unauthorized")]
    assert len(h.server.sent(StunMethod.ALLOCATE)) == 1


def test_allocation_without_relayed_address_fails() -> None:
    h = Harness()

    class NoRelayed(FakeTurnServer):
        def _reply(self, msg: StunMessage, cls: StunClass, attrs: list[Attribute],
                   key: bytes | None) -> bytes:
            kept = [a for a in attrs if a.type != AttrType.XOR_RELAYED_ADDRESS]
            return super()._reply(msg, cls, kept, key)

    h.server = NoRelayed()
    h.client.allocate(h.clock.now)
    h.pump()
    assert h.of(AllocationFailed) == [
        AllocationFailed(500, "Allocate success without XOR-RELAYED-ADDRESS")]


# -- refreshing ----------------------------------------------------------------------------


def test_everything_is_refreshed_before_it_expires() -> None:
    h = Harness()
    h.allocate()
    h.client.permit(PEER, h.clock.now)
    h.client.bind_channel(PEER2, h.clock.now)
    h.pump()
    h.run_until(START + 2 * 3600)
    assert h.server.lapses == []
    assert h.client.state is AllocationState.ALLOCATED
    # allocation every 540 s (600 - 60), permissions 240 s, channels 540 s
    assert len(h.server.sent(StunMethod.REFRESH)) == 13
    assert len(h.of(AllocationRefreshed)) == 13
    def times(method: int, ip: str | None = None) -> list[float]:
        return [t for t, m in h.server.requests if m.method == method
                and (ip is None or m.xor_peer_address is not None
                     and m.xor_peer_address[0] == ip)]

    def gaps(ts: list[float]) -> list[float]:
        return [b - a for a, b in zip([START, *ts], ts)]

    assert set(gaps(times(StunMethod.REFRESH))) == {540}
    assert set(gaps(times(StunMethod.CREATE_PERMISSION, PEER[0]))[1:]) == {240}
    assert len(times(StunMethod.CREATE_PERMISSION, PEER[0])) == 1 + 7200 // 240
    # PEER2's permission comes with its channel: each ChannelBind refreshes
    # it too, and CreatePermission keeps it within 240 s in between
    both = sorted(times(StunMethod.CREATE_PERMISSION, PEER2[0])
                  + times(StunMethod.CHANNEL_BIND, PEER2[0]))
    assert max(gaps(both)) <= 240
    assert set(gaps(times(StunMethod.CHANNEL_BIND))[1:]) == {540}
    assert {m.channel_number for m in h.server.sent(StunMethod.CHANNEL_BIND)} == {CHANNEL_MIN}
    # events are for the first grant only
    assert h.of(PermissionCreated) == [PermissionCreated(PEER[0]), PermissionCreated(PEER2[0])]
    assert h.of(ChannelBound) == [ChannelBound(PEER2, CHANNEL_MIN)]


def test_short_lifetime_is_refreshed_half_way() -> None:
    h = Harness(FakeTurnServer(max_lifetime=30))
    assert h.allocate().lifetime == 30
    h.run_until(START + 100)
    times = [t - START for t, m in h.server.requests if m.method == StunMethod.REFRESH]
    assert times == [15.0, 30.0, 45.0, 60.0, 75.0, 90.0]
    assert h.server.lapses == []


def test_refresh_unanswered_until_the_lifetime_ends() -> None:
    h = Harness()
    h.allocate()
    h.server.silent = True
    h.run_until(START + 3600)
    lost = [(t, e) for t, e in h.events if isinstance(e, AllocationLost)]
    assert lost == [(START + 600, AllocationLost(
        "the allocation's lifetime ended without a refresh"))]
    # the refresh at 540 s timed out at 579.5 s and was tried again
    refresh_starts = sorted({round(t - START, 3) for t in h.sent_at if t > START})
    assert refresh_starts[0] == 540.0 and 579.5 in refresh_starts
    assert h.client.state is AllocationState.IDLE and h.client.get_timer() is None


def test_a_forgotten_allocation_is_lost_on_the_next_refresh() -> None:
    h = Harness()
    h.allocate()
    h.server.allocation = None  # a server restart
    h.run_until(START + 600)
    assert h.of(AllocationLost) == [AllocationLost(
        "Refresh answered 437 Allocation Mismatch: the server has no allocation")]
    assert h.client.state is AllocationState.IDLE


def test_allocating_again_as_before_uses_the_lost_allocations_credentials() -> None:
    """After a loss, ``allocate(as_before=True)`` signs with the username
    the lost allocation had (a restarted coturn ties the socket to the
    username of the Refresh that found nothing), even when newer
    credentials came; a plain ``allocate`` takes the newest."""
    h = Harness(FakeTurnServer(pin_credentials=True), expires=START + 3600)
    h.allocate()
    h.client.update_credentials(USER2, PASSWORD2, START + 7200, h.clock.now)
    h.pump()  # 441: this allocation keeps USER
    h.server.allocation = None
    h.run_until(START + 600)
    assert len(h.of(AllocationLost)) == 1
    h.client.allocate(h.clock.now, as_before=True)
    h.pump()
    assert h.server.allocation is not None and h.server.allocation.username == USER
    h.client.close(h.clock.now)
    h.pump()
    h.allocate()
    assert h.server.allocation is not None and h.server.allocation.username == USER2


def test_a_lapsed_permission_is_asked_for_again() -> None:
    h = Harness()
    h.allocate()
    h.client.permit(PEER, h.clock.now)
    h.pump()
    assert h.client.permitted(PEER[0])
    # the host sleeps past the permission's five minutes, not the allocation's ten
    h.clock.advance_to(START + 320)
    h.server.tick(h.clock.now)
    assert h.server.lapses == [f"permission {PEER[0]}"]
    h.client.handle_timer(h.clock.now)
    assert not h.client.permitted(PEER[0])
    h.pump()
    assert h.client.permitted(PEER[0])
    assert h.of(PermissionCreated) == [PermissionCreated(PEER[0])] * 2


# -- credentials -------------------------------------------------------------------------


def test_credentials_expire_without_replacement() -> None:
    expires = START + 3600
    h = Harness(expires=expires)
    h.allocate()
    h.run_until(START + 4000)
    assert (expires - 300, CredentialsExpiring(expires)) in h.events
    lost = [(t, e) for t, e in h.events if isinstance(e, AllocationLost)]
    assert lost == [(expires, AllocationLost(
        "the TURN credentials expired and no new ones came"))]
    # the allocation is released on the server, not left to time out
    assert h.server.sent(StunMethod.REFRESH)[-1].lifetime == 0
    assert h.server.allocation is None
    assert h.client.get_timer() is None


def test_new_credentials_on_a_server_that_keeps_the_first() -> None:
    expires = START + 3600
    h = Harness(expires=expires)
    h.allocate()
    h.run_until(expires - 300)
    assert h.of(CredentialsExpiring) == [CredentialsExpiring(expires)]
    h.client.update_credentials(USER2, PASSWORD2, START + 90000, h.clock.now)
    h.pump()
    # tried at once on the live allocation: 441, so the first ones stay
    reauth = h.server.sent(StunMethod.REFRESH, since=h.clock.now)
    assert [m.username for m in reauth] == [USER2.encode()]
    h.run_until(START + 4 * 3600)
    assert h.of(AllocationLost) == []
    assert h.server.lapses == []
    later = h.server.sent(StunMethod.REFRESH, since=expires)
    assert later and {m.username for m in later} == {USER.encode()}
    # the next Allocate uses the new ones
    h.client.close(h.clock.now)
    h.pump()
    assert h.of(AllocationClosed) == [AllocationClosed()]
    h.allocate()
    assert h.server.allocation is not None and h.server.allocation.username == USER2


def test_new_credentials_on_a_server_that_takes_them() -> None:
    h = Harness(FakeTurnServer(pin_credentials=False), expires=START + 3600)
    h.allocate()
    h.client.update_credentials(USER2, PASSWORD2, START + 7200, h.clock.now)
    h.pump()
    assert h.server.allocation is not None and h.server.allocation.username == USER2
    h.client.permit(PEER, h.clock.now)
    h.run_until(START + 7000)
    assert {m.username for m in h.server.sent(StunMethod.REFRESH, since=START + 1)} \
        == {USER2.encode()}
    assert {m.username for m in h.server.sent(StunMethod.CREATE_PERMISSION)} == {USER2.encode()}
    # the new expiry is the one that counts
    assert h.of(CredentialsExpiring) == [CredentialsExpiring(START + 7200)]
    h.run_until(START + 7300)
    assert [t for t, e in h.events if isinstance(e, AllocationLost)] == [START + 7200]


def test_short_lived_credentials_are_renewed_at_half_life_not_at_once() -> None:
    """Credentials minted for a minute (a lab's TTL) with the default
    five-minute margin: the warning comes at half their life, once per
    set of credentials, never in a loop."""
    h = Harness(FakeTurnServer(pin_credentials=False), expires=START + 60)
    h.allocate()
    h.run_until(START + 29.9)
    assert h.of(CredentialsExpiring) == []
    h.run_until(START + 30.1)
    assert [t for t, e in h.events if isinstance(e, CredentialsExpiring)] == [START + 30]
    h.client.update_credentials(USER2, PASSWORD2, h.clock.now + 60, h.clock.now)
    h.run_until(START + 59.9)
    assert len(h.of(CredentialsExpiring)) == 1 and h.of(AllocationLost) == []
    h.run_until(START + 61)
    assert [t for t, e in h.events if isinstance(e, CredentialsExpiring)] == [
        START + 30, pytest.approx(START + 60.1)]
    assert h.of(AllocationLost) == []  # the first ones expired at START + 60: replaced


def test_credentials_arriving_while_allocating() -> None:
    h = Harness(FakeTurnServer(pin_credentials=False))
    h.server.silent = True
    h.client.allocate(h.clock.now)
    h.pump()
    h.client.update_credentials(USER2, PASSWORD2, None, h.clock.now)
    h.server.silent = False
    h.run_until(START + 1)
    assert h.of(Allocated)
    assert h.server.allocation is not None and h.server.allocation.username == USER2


# -- permissions, channels and data -----------------------------------------------------


def test_send_and_data_indications() -> None:
    h = Harness()
    h.allocate()
    h.client.permit(PEER, h.clock.now)
    h.client.permit(("192.0.2.20", 9), h.clock.now)  # same IP: one permission
    h.pump()
    assert h.of(PermissionCreated) == [PermissionCreated(PEER[0])]
    assert len(h.server.sent(StunMethod.CREATE_PERMISSION)) == 1
    data, to = h.client.wrap(PEER, b"\xc0quic")
    assert to == SERVER
    send = decode_stun(data)
    assert send.method == StunMethod.SEND and send.cls is StunClass.INDICATION
    assert send.xor_peer_address == PEER and send.data == b"\xc0quic"
    assert not send.has_fingerprint
    h.server.handle(data, h.clock.now)
    assert h.server.to_peers == [(PEER, b"\xc0quic")]
    h.deliver(h.server.from_peer(PEER, b"\xc1back"))
    assert h.of(DataReceived) == [DataReceived(PEER, b"\xc1back")]
    assert h.client.statistics().data_in == 1 and h.client.statistics().data_out == 1


def test_channel_data_both_ways() -> None:
    h = Harness()
    h.allocate()
    number = h.client.bind_channel(PEER, h.clock.now)
    assert number == CHANNEL_MIN
    assert h.client.bind_channel(PEER, h.clock.now) == number
    # until the server confirms, data goes in Send indications
    assert decode_stun(h.client.wrap(PEER, b"x")[0]).method == StunMethod.SEND
    assert h.client.channel(PEER) is None
    h.pump()
    assert h.of(ChannelBound) == [ChannelBound(PEER, number)]
    assert h.of(PermissionCreated) == [PermissionCreated(PEER[0])]  # ChannelBind installs it
    data, to = h.client.wrap(PEER, b"\xc0quic")
    assert data == encode_channel_data(number, b"\xc0quic") and to == SERVER
    h.server.handle(data, h.clock.now)
    assert h.server.to_peers == [(PEER, b"\xc0quic")]
    h.deliver(h.server.from_peer(PEER, b"\xc1abc"))
    h.deliver(h.server.from_peer(PEER, b"\xc1abc", pad=True))
    assert h.of(DataReceived) == [DataReceived(PEER, b"\xc1abc")] * 2
    # a second peer gets the next channel
    assert h.client.bind_channel(PEER2, h.clock.now) == CHANNEL_MIN + 1


def test_padded_channel_data_from_the_client() -> None:
    h = Harness(config=TurnClientConfig(pad_channel_data=True))
    h.allocate()
    h.client.bind_channel(PEER, h.clock.now)
    h.pump()
    data, _ = h.client.wrap(PEER, b"abcde")
    assert len(data) == 12 and decode_channel_data(data).data == b"abcde"


def test_relay_wrap_is_a_path_layer_relay() -> None:
    h = Harness()
    h.allocate()
    relay: RelayWrap = h.client.relay_wrap(PEER)
    frame, to = relay(b"\xc0")
    assert to == SERVER and decode_stun(frame).xor_peer_address == PEER


def test_channel_bind_refused() -> None:
    h = Harness()
    h.allocate()
    h.server.refuse_channels = True
    number = h.client.bind_channel(PEER, h.clock.now)
    h.pump()
    assert h.of(ChannelBindFailed) == [ChannelBindFailed(PEER, 400, "Bad Request")]
    assert h.client.channel(PEER) is None
    assert decode_stun(h.client.wrap(PEER, b"x")[0]).method == StunMethod.SEND
    # ChannelData on that number is not accepted either
    h.client.receive(encode_channel_data(number, b"x"), h.clock.now)
    assert h.of(DataReceived) == [] and h.client.statistics().dropped == 1


def test_permission_refused() -> None:
    h = Harness()
    h.allocate()
    h.server.error_for[StunMethod.CREATE_PERMISSION] = (403, "Forbidden")
    h.client.permit(PEER, h.clock.now)
    h.pump()
    assert h.of(PermissionFailed) == [PermissionFailed(PEER[0], 403, "Forbidden")]
    assert not h.client.permitted(PEER[0])


def test_forget_stops_the_refreshes() -> None:
    h = Harness()
    h.allocate()
    h.client.permit(PEER, h.clock.now)
    h.client.bind_channel(PEER2, h.clock.now)
    h.pump()
    h.run_until(START + 100)
    h.client.forget(PEER, h.clock.now)
    h.client.forget(PEER2, h.clock.now)
    h.run_until(START + 3600)
    assert h.server.sent(StunMethod.CREATE_PERMISSION, since=START + 100) == []
    assert h.server.sent(StunMethod.CHANNEL_BIND, since=START + 100) == []
    assert h.client.channel(PEER2) is None
    assert len(h.server.sent(StunMethod.REFRESH)) == 6  # the allocation itself goes on


def test_a_forgotten_channel_number_waits_before_reuse() -> None:
    h = Harness()
    h.allocate()
    first = h.client.bind_channel(PEER, h.clock.now)
    h.pump()
    h.client.forget(PEER, h.clock.now)
    # the server keeps the binding for 600 s, then 300 s more for the number
    assert h.client.bind_channel(PEER2, h.clock.now) == first + 1
    h.pump()
    h.run_until(START + 901)
    assert h.client.bind_channel(("192.0.2.30", 1), h.clock.now) == first
    h.pump()
    assert h.of(ChannelBindFailed) == []


def test_close_releases_the_allocation() -> None:
    h = Harness()
    h.allocate()
    h.client.bind_channel(PEER, h.clock.now)
    h.pump()
    h.client.close(h.clock.now)
    h.pump()
    assert h.server.sent(StunMethod.REFRESH)[-1].lifetime == 0
    assert h.server.allocation is None
    assert h.of(AllocationClosed) == [AllocationClosed()]
    assert h.client.state is AllocationState.IDLE and h.client.get_timer() is None
    assert h.client.channel(PEER) is None
    h.client.close(h.clock.now)  # again: nothing
    assert h.client.datagrams_to_send() == []


def test_close_before_any_challenge() -> None:
    h = Harness()
    h.server.silent = True
    h.client.allocate(h.clock.now)
    h.pump()
    h.client.close(h.clock.now)
    h.drain()
    assert h.of(AllocationClosed) == [AllocationClosed()]
    assert h.client.get_timer() is None


def test_misuse_is_a_local_error() -> None:
    h = Harness()
    with pytest.raises(LocalProtocolError):
        h.client.permit(PEER, h.clock.now)
    with pytest.raises(LocalProtocolError):
        h.client.bind_channel(PEER, h.clock.now)
    h.allocate()
    with pytest.raises(LocalProtocolError):
        h.client.allocate(h.clock.now)
    small = Harness(config=TurnClientConfig(max_permissions=1))
    small.allocate()
    small.client.permit(PEER, small.clock.now)
    with pytest.raises(LocalProtocolError):
        small.client.permit(PEER2, small.clock.now)


def test_every_channel_number_then_none() -> None:
    h = Harness()
    h.allocate()
    numbers = {h.client.bind_channel((f"192.0.{i // 250}.{i % 250 + 1}", 1), h.clock.now)
               for i in range(CHANNEL_MAX - CHANNEL_MIN + 1)}
    assert numbers == set(range(CHANNEL_MIN, CHANNEL_MAX + 1))
    with pytest.raises(LocalProtocolError):
        h.client.bind_channel(("198.51.100.99", 1), h.clock.now)


# -- hostile or broken input ---------------------------------------------------------------


def test_what_the_client_drops() -> None:
    h = Harness()
    h.allocate()
    tid = bytes(12)
    junk = [
        b"",
        b"\x00\x01",
        bytes.fromhex("40000005abcd"),  # ChannelData longer than the datagram
        encode_channel_data(CHANNEL_MAX, b"nobody bound this"),
        encode_stun(StunMessage(StunMethod.DATA, StunClass.INDICATION, tid,
                                (data_attribute(b"no peer"),))),
        encode_stun(StunMessage(StunMethod.DATA, StunClass.INDICATION, tid,
                                (peer_address_attribute(PEER, tid),))),
        encode_stun(StunMessage(StunMethod.REFRESH, StunClass.SUCCESS, tid)),  # unknown txid
        encode_stun(StunMessage(StunMethod.BINDING, StunClass.REQUEST, tid)),
        encode_stun(StunMessage(StunMethod.BINDING, StunClass.REQUEST, bytes(16), classic=True)),
        b"\xc0" + bytes(40),
    ]
    for data in junk:
        h.client.receive(data, h.clock.now)
    h.drain()
    assert h.client.statistics().dropped == len(junk)
    assert [e for _, e in h.events if not isinstance(e, Allocated)] == []


def test_response_for_another_method_is_ignored() -> None:
    h = Harness()
    h.allocate()
    h.client.permit(PEER, h.clock.now)
    (data, _), = h.client.datagrams_to_send()
    txid = decode_stun(data).transaction_id
    wrong = StunMessage(StunMethod.CHANNEL_BIND, StunClass.SUCCESS, txid)
    h.client.receive(encode_stun(wrong, key=h.server.key(USER)), h.clock.now)
    assert not h.client.permitted(PEER[0])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_property_mutated_responses_never_forge_an_allocation(data: st.DataObject) -> None:
    """Each byte of the server's answers flipped, cut or extended: the client
    never raises, and an Allocated it reports carries the real address."""
    h = Harness()
    h.client.allocate(h.clock.now)
    for _ in range(4):
        out = h.client.datagrams_to_send()
        if not out:
            break
        for request, _ in out:
            for reply in h.server.handle(request, h.clock.now):
                mutated = bytearray(reply)
                how = data.draw(st.sampled_from(["flip", "cut", "extend", "keep"]))
                if how == "flip":
                    i = data.draw(st.integers(0, len(mutated) - 1))
                    mutated[i] ^= 1 << data.draw(st.integers(0, 7))
                elif how == "cut":
                    del mutated[data.draw(st.integers(0, len(mutated) - 1)):]
                elif how == "extend":
                    mutated += data.draw(st.binary(min_size=1, max_size=8))
                h.client.receive(bytes(mutated), h.clock.now)
    h.drain()
    for ev in h.of(Allocated):
        assert isinstance(ev, Allocated)
        assert ev.relayed == RELAYED and ev.mapped == CLIENT


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=80), max_size=10))
def test_property_garbage_never_raises(datagrams: list[bytes]) -> None:
    h = Harness()
    h.allocate()
    before = h.client.statistics().dropped
    for d in datagrams:
        h.client.receive(d, h.clock.now)
    h.drain()
    assert h.client.state is AllocationState.ALLOCATED
    assert h.client.statistics().dropped >= before
