"""STUN and TURN services by XEP-0215 (dtx.xmpp.services).

The decoder is checked on answers shaped as Prosody and ejabberd send them
and on broken ones (no server needed). Then a real Prosody on loopback with
``mod_turn_external`` answers: the TURN credentials are TURN REST ones made
with the configured secret, ``expires`` is the configured TTL ahead on the
loop's clock, ``<credentials/>`` renews them, and a server without the
module says so with a typed error. Last, a coturn with the same secret
grants an allocation to the credentials exactly as discovered.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import random
import socket
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dtx.aio.socket import UdpSocket
from dtx.lab.coturn import CoturnServer, coturn_missing
from dtx.lab.prosody import ProsodyServer, TurnExternal, prosody_missing
from dtx.proto.turn import AllocationFailed, Allocated, TurnClient, TurnEvent
from dtx.xmpp.client import XmppConfig, open_xmpp_client
from dtx.xmpp.services import (
    EXTDISCO_NS,
    MAX_SERVICES,
    BadServicesError,
    ExternalServices,
    IgnoredService,
    ServiceDiscoveryError,
    ServicesNotOfferedError,
    StunService,
    TurnService,
    decode_credentials,
    decode_services,
    discover_services,
    encode_credentials_request,
    refresh_credentials,
    resolve_address,
)

SECRET = "dtx-test-turn-secret"
TTL = 60  # the lab's TTL for credential-expiry tests: one minute
TURN_HOST = "203.0.113.10"
TURN_PORT = 3479
TURN_USER = "dtx-lab"
DEADLINE = 10.0

# -- the decoder, on answers as servers send them ------------------------------

NOW = 1000.0   # the loop's clock
WALL = 1_700_000_000.0  # time.time() at the same instant: 2023-11-14T22:13:20Z

PROSODY_ANSWER = f"""<iq xmlns="jabber:client" type="result" from="example.org" id="1">
<services xmlns="{EXTDISCO_NS}">
<service type="stun" transport="udp" host="203.0.113.10" port="3478"/>
<service expires="2023-11-14T22:14:20Z" restricted="1" type="turn" transport="udp"
 host="203.0.113.10" password="s7rRZseBmD4azdw3uielsoBWX7w=" username="1700000060:dtx"
 port="3478"/>
</services></iq>"""


def answer(*services: str, payload: str = "services") -> ET.Element:
    body = "".join(services)
    return ET.fromstring(f'<iq xmlns="jabber:client" type="result" id="1">'
                         f'<{payload} xmlns="{EXTDISCO_NS}">{body}</{payload}></iq>')


def rest_password(username: str, secret: str = SECRET) -> str:
    """TURN REST: base64(HMAC-SHA1(secret, username))."""
    mac = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return base64.b64encode(mac).decode()


def test_decode_prosody_answer() -> None:
    found = decode_services(ET.fromstring(PROSODY_ANSWER), now=NOW, wall=WALL)
    assert found.stun == (StunService("203.0.113.10", 3478, "udp"),)
    (turn,) = found.turn
    assert turn == TurnService("203.0.113.10", 3478, "udp", "1700000060:dtx",
                               "s7rRZseBmD4azdw3uielsoBWX7w=", NOW + 60, restricted=True)
    assert found.ignored == ()
    assert found.first_turn() is turn and found.first_turn("tcp") is None
    assert "s7rR" not in repr(turn)  # the password stays out of logs


def test_defaults_and_tls_types() -> None:
    found = decode_services(answer(
        '<service type="stun" host="stun.example.org"/>',
        '<service type="turns" host="turn.example.org" username="u" password="p"/>',
        '<service type="turn" host="2001:db8::3" transport="tcp" username="u" password="p"/>',
    ), now=NOW, wall=WALL)
    assert found.stun == (StunService("stun.example.org", 3478, "udp"),)
    assert found.turn == (
        TurnService("turn.example.org", 5349, "tcp", "u", "p", None, tls=True),
        TurnService("2001:db8::3", 3478, "tcp", "u", "p", None),
    )
    assert found.first_turn("tcp", tls=True) == found.turn[0]


GOOD_TURN = '<service type="turn" host="198.51.100.7" port="3478" username="u" password="p"/>'


@pytest.mark.parametrize(("entry", "reason"), [
    ('<service type="turn" host="h" port="0" username="u" password="p"/>', "port"),
    ('<service type="turn" host="h" port="65536" username="u" password="p"/>', "port"),
    ('<service type="turn" host="h" port="34x" username="u" password="p"/>', "port"),
    ('<service type="turn" host="h" port="\uff13" username="u" password="p"/>', "port"),
    ('<service type="turn" host="h" transport="sctp" username="u" password="p"/>', "transport"),
    ('<service type="turn" username="u" password="p"/>', "host"),
    ('<service type="turn" host="a host" username="u" password="p"/>', "host"),
    ('<service type="turn" host="h" username="u" password="p" expires="tomorrow"/>', "expires"),
    ('<service type="turn" host="h" username="u" password="p" '
     'expires="2023-11-14T22:14:20"/>', "expires"),  # no time zone
    ('<service type="turn" host="h" username="u" password="p" '
     'expires="2023-13-14T22:14:20Z"/>', "expires"),
    ('<service type="turn" host="h" username="u" password="p" restricted="yes"/>', "restricted"),
    ('<service type="turn" host="h" username="u"/>', "no username or password"),
    ('<service type="turn" host="h" restricted="1"/>', "restricted"),
    ('<service type="turn" host="h" username="' + "u" * 2000 + '" password="p"/>', "longer"),
    ('<service type="ftp" host="h" port="21"/>', "not a STUN or TURN"),
    ('<service host="h"/>', "not a STUN or TURN"),
])
def test_bad_entries_are_ignored_with_the_reason(entry: str, reason: str) -> None:
    found = decode_services(answer(entry, GOOD_TURN), now=NOW, wall=WALL)
    assert [s.host for s in found.turn] == ["198.51.100.7"]  # the good one survives
    (ignored,) = found.ignored
    assert isinstance(ignored, IgnoredService) and reason in ignored.reason, ignored


@pytest.mark.parametrize("bad", [
    '<iq xmlns="jabber:client" type="result" id="1"/>',
    '<iq xmlns="jabber:client" type="result" id="1"><services xmlns="urn:xmpp:extdisco:1">'
    '<service type="stun" host="h"/></services></iq>',
    '<iq xmlns="jabber:client" type="result" id="1"><credentials xmlns="urn:xmpp:extdisco:2"/>'
    '</iq>',
])
def test_bad_answers_raise(bad: str) -> None:
    with pytest.raises(BadServicesError):
        decode_services(ET.fromstring(bad), now=NOW, wall=WALL)


def test_ignored_names_are_bounded() -> None:
    found = decode_services(answer(f'<service type="turn" host="{"h" * 5000}"/>'),
                            now=NOW, wall=WALL)
    (ignored,) = found.ignored
    assert ignored.host == "h" * 255 and "longer" in ignored.reason


def test_too_many_services() -> None:
    entries = ['<service type="stun" host="h"/>'] * (MAX_SERVICES + 1)
    with pytest.raises(BadServicesError, match="at most"):
        decode_services(answer(*entries), now=NOW, wall=WALL)
    assert len(decode_services(answer(*entries[:-1]), now=NOW, wall=WALL).stun) == MAX_SERVICES


def test_restricted_without_credentials_waits_for_them() -> None:
    found = decode_services(answer('<service type="turn" host="h" restricted="true"/>'),
                            now=NOW, wall=WALL)
    assert found.turn == ()
    assert found.ignored == (IgnoredService("turn", "h", "restricted, and no credentials "
                                                         "were asked for"),)


def test_decode_credentials_both_shapes() -> None:
    service = TurnService("h", 3478, "udp", "", "", None, restricted=True)
    request = encode_credentials_request(service)
    assert request.tag == f"{{{EXTDISCO_NS}}}credentials"
    assert [dict(s.attrib) for s in request] == [{"type": "turn", "host": "h", "port": "3478"}]
    entry = ('<service type="turn" host="h" port="3478" username="1700000600:x" password="pw" '
             'expires="2023-11-14T22:23:20Z"/>')
    other = '<service type="turn" host="h" port="3479" username="no" password="no"/>'
    for payload in ("credentials", "services"):  # XEP-0215 and Prosody; ejabberd
        fresh = decode_credentials(answer(other, entry, payload=payload), service,
                                   now=NOW, wall=WALL)
        assert (fresh.username, fresh.password, fresh.expires) == ("1700000600:x", "pw",
                                                                   NOW + 600)
    with pytest.raises(BadServicesError, match="no credentials for turn:h:3478"):
        decode_credentials(answer(other), service, now=NOW, wall=WALL)
    with pytest.raises(BadServicesError, match="expires"):
        decode_credentials(answer(entry.replace("Z", "")), service, now=NOW, wall=WALL)


_text = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=30)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.dictionaries(
    st.sampled_from(["type", "host", "port", "transport", "username", "password",
                     "expires", "restricted", "name"]),
    st.one_of(_text, st.sampled_from(["stun", "turn", "turns", "udp", "tcp", "1", "3478",
                                      "2023-11-14T22:14:20Z"]))), max_size=5))
def test_decoder_raises_nothing_else(entries: list[dict[str, str]]) -> None:
    services = ET.Element(f"{{{EXTDISCO_NS}}}services")
    for attrs in entries:
        ET.SubElement(services, f"{{{EXTDISCO_NS}}}service", attrs)
    iq = ET.Element("{jabber:client}iq")
    iq.append(services)
    found = decode_services(iq, now=NOW, wall=WALL)
    assert len(found.stun) + len(found.turn) + len(found.ignored) == len(entries)
    for service in found.turn:
        assert service.username and service.password and 0 < service.port < 65536


# -- a real Prosody ---------------------------------------------------------------------


def _skip_without_prosody() -> None:
    reason = prosody_missing()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def turn_prosody() -> Iterator[ProsodyServer]:
    """Prosody with mod_turn_external: STUN and TURN on TURN_HOST:TURN_PORT,
    TURN REST credentials with SECRET, valid for TTL seconds."""
    _skip_without_prosody()
    turn = TurnExternal(secret=SECRET, host=TURN_HOST, port=TURN_PORT, ttl=TTL, user=TURN_USER)
    with ProsodyServer("vcard4", turn=turn) as server:
        yield server


@pytest.fixture(scope="module")
def plain_prosody() -> Iterator[ProsodyServer]:
    """Prosody as the other tests run it: no external services."""
    _skip_without_prosody()
    with ProsodyServer("vcard4") as server:
        yield server


_accounts = iter(range(1, 1000))


def login(server: ProsodyServer) -> tuple[str, str, XmppConfig]:
    user = f"turnuser{next(_accounts)}"
    password = f"pw-{user}"
    jid = server.register(user, password)
    return jid, password, XmppConfig(server=server.address(), allow_plaintext=True,
                                     timeout=DEADLINE)


def clock_pair(loop: asyncio.AbstractEventLoop) -> tuple[float, float, float]:
    """The loop's clock and the wall clock at one instant, and how far apart
    the two readings may be: the wall clock read between two readings of
    the loop's, whose midpoint is taken."""
    t1 = loop.time()
    wall = time.time()
    t2 = loop.time()
    return (t1 + t2) / 2, wall, (t2 - t1) / 2


def check_rest_credentials(service: TurnService, wall_before: float, wall_after: float,
                           ttl: int, user: str, secret: str = SECRET) -> None:
    """username = expiry:user with the expiry ttl ahead (Prosody counts in
    whole seconds), password = base64(HMAC-SHA1(secret, username))."""
    expiry, _, name = service.username.partition(":")
    assert name == user, service.username
    assert int(wall_before) + ttl <= int(expiry) <= wall_after + ttl
    assert service.password == rest_password(service.username, secret)
    assert service.password != rest_password(service.username, secret + "x")


async def test_prosody_turn_external_answer(turn_prosody: ProsodyServer) -> None:
    jid, password, config = login(turn_prosody)
    loop = asyncio.get_running_loop()
    async with open_xmpp_client(jid, password, config=config) as client:
        before, wall_before, slack_before = clock_pair(loop)
        found = await discover_services(client)
        after, wall_after, slack_after = clock_pair(loop)
    assert found.stun == (StunService(TURN_HOST, TURN_PORT, "udp"),)
    (turn,) = found.turn
    assert (turn.host, turn.port, turn.transport, turn.tls, turn.restricted) == (
        TURN_HOST, TURN_PORT, "udp", False, True)
    assert found.ignored == ()
    check_rest_credentials(turn, wall_before, wall_after, TTL, TURN_USER)
    # expires: TTL ahead on the loop's clock (Prosody rounds its clock down
    # to the second), and the same instant as the expiry in the username
    assert turn.expires is not None
    # (each clock pair is known to within its slack: a busy machine may
    # run something else between the two readings)
    jitter = 0.25  # the product's own pair of readings, on a busy machine
    assert before + TTL - 1 - slack_before - jitter <= turn.expires \
        <= after + TTL + slack_after + jitter
    assert abs((turn.expires - after + wall_after) - int(turn.username.split(":")[0])) \
        < 0.5 + slack_after + jitter


async def test_prosody_credentials_request(turn_prosody: ProsodyServer) -> None:
    jid, password, config = login(turn_prosody)
    async with open_xmpp_client(jid, password, config=config) as client:
        found = await discover_services(client)
        wall_before = time.time()
        fresh = await refresh_credentials(client, found.turn[0])
        wall_after = time.time()
        assert (fresh.host, fresh.port, fresh.restricted) == (TURN_HOST, TURN_PORT, True)
        check_rest_credentials(fresh, wall_before, wall_after, TTL, TURN_USER)
        assert fresh.expires is not None and found.turn[0].expires is not None
        assert fresh.expires >= found.turn[0].expires - 0.5
        # a service the server does not have: an empty <credentials/>
        unknown = TurnService("192.0.2.99", 3478, "udp", "", "", None, restricted=True)
        with pytest.raises(BadServicesError, match="no credentials for turn:192.0.2.99"):
            await refresh_credentials(client, unknown)


async def test_server_without_external_services(plain_prosody: ProsodyServer) -> None:
    jid, password, config = login(plain_prosody)
    async with open_xmpp_client(jid, password, config=config) as client:
        with pytest.raises(ServicesNotOfferedError) as caught:
            await discover_services(client)
    assert caught.value.condition == "service-unavailable"


# -- and coturn with the same secret ------------------------------------------


class TurnDriver:
    """A TurnClient on a real UDP socket: one UdpSocket, one timer, send
    what it returns. Datagrams from elsewhere than the TURN server are kept
    in ``others``."""

    def __init__(self, sock: socket.socket, service: TurnService) -> None:
        self.loop = asyncio.get_running_loop()
        self.client = TurnClient(service.address, service.username, service.password,
                                 service.expires, rng=random.Random(7))
        self.events: list[TurnEvent] = []
        self.others: list[tuple[bytes, tuple[str, int], float]] = []
        self._changed = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None
        self.sock = UdpSocket(sock, self._datagram, self._transmit)

    def _datagram(self, data: bytes, addr: tuple[str, int]) -> None:
        if addr == self.client.server:
            self.client.receive(data, self.loop.time())
        else:
            self.others.append((data, addr, self.loop.time()))

    def _transmit(self) -> None:
        for data, addr in self.client.datagrams_to_send():
            self.sock.sendto(data, addr)
        while (event := self.client.next_event()) is not None:
            self.events.append(event)
        self._changed.set()
        if self._timer is not None:
            self._timer.cancel()
        when = self.client.get_timer()
        self._timer = None if when is None else self.loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.client.handle_timer(self.loop.time())
        self._transmit()

    def call(self, fn: Callable[[float], object]) -> None:
        fn(self.loop.time())
        self._transmit()

    def send(self, peer: tuple[str, int], payload: bytes) -> None:
        self.sock.sendto(*self.client.wrap(peer, payload))

    async def wait(self, done: Callable[[], bool], timeout: float = DEADLINE) -> None:
        async with asyncio.timeout(timeout):
            while not done():
                self._changed.clear()
                await self._changed.wait()

    async def event(self, *kinds: type[TurnEvent]) -> TurnEvent:
        """The first event of one of ``kinds`` (already seen, or next)."""
        await self.wait(lambda: any(isinstance(e, kinds) for e in self.events))
        return next(e for e in self.events if isinstance(e, kinds))

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.sock.close()


async def test_coturn_accepts_the_discovered_credentials() -> None:
    _skip_without_prosody()
    reason = coturn_missing()
    if reason is not None:
        pytest.skip(reason)
    with CoturnServer(SECRET) as coturn:
        turn = TurnExternal(secret=SECRET, host=coturn.ip, port=coturn.port, ttl=TTL,
                            user=TURN_USER)
        with ProsodyServer("vcard4", turn=turn) as server:
            jid, password, config = login(server)
            async with open_xmpp_client(jid, password, config=config) as client:
                found = await discover_services(client)
        service = found.first_turn()
        assert service is not None and service.address == coturn.address
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        driver = TurnDriver(sock, service)
        try:
            driver.call(driver.client.allocate)
            allocated = await driver.event(Allocated, AllocationFailed)
        finally:
            driver.close()
        assert isinstance(allocated, Allocated), allocated
        assert allocated.relayed[0] == "127.0.0.1"
        log = coturn.stop()
    (session,) = coturn.sessions(log)
    assert (session.event, session.username, session.realm) == ("new", service.username,
                                                                "example.org")


async def test_resolve_address() -> None:
    stun = StunService("203.0.113.10", 3478)
    assert await resolve_address(stun) == ("203.0.113.10", 3478)
    turn = TurnService("[2001:db8::3]", 3479, "udp", "u", "p", None)
    assert await resolve_address(turn, family=socket.AF_INET6) == ("2001:db8::3", 3479)
    with pytest.raises(ServiceDiscoveryError, match="family"):
        await resolve_address(turn)
    # a name: from /etc/hosts, no DNS query leaves the machine
    assert await resolve_address(StunService("localhost", 3478)) == ("127.0.0.1", 3478)


def test_types_are_frozen() -> None:
    found = ExternalServices()
    with pytest.raises(AttributeError):
        found.stun = ()  # type: ignore[misc]
