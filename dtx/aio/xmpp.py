"""The account's own XMPP server as the rendezvous: the asyncio driver.

:class:`XmppSignalling` runs, for one started :class:`~dtx.aio.peer.Peer`,
everything a device needs to reach another device by JID with no dtx
rendezvous at all (``docs/xmpp-server.md``):

- it logs in with slixmpp as the device's full JID (the key file's: the
  Jingle signature covers it), TLS whenever the server offers it, plaintext
  only where ``XmppConfig.allow_plaintext`` allows it (test servers), reads
  the roster and sends presence;
- it asks the server for its STUN and TURN services (XEP-0215,
  :func:`~dtx.xmpp.services.discover_services`) and allocates a TURN relay
  on the peer's one UDP socket (:meth:`Endpoint.use_turn
  <dtx.proto.endpoint.Endpoint.use_turn>`), renewing the credentials over
  XMPP when the TURN client says they are about to expire;
- its local candidates are the socket's host addresses, the reflexive
  address the TURN server saw (the Allocate's XOR-MAPPED-ADDRESS) and the
  relayed address;
- it drives the sans-IO :class:`~dtx.proto.signalling.JingleSignalling`:
  every incoming iq goes to ``receive_iq`` before slixmpp's dispatch (an
  ``in`` filter; what it takes never reaches slixmpp, which would otherwise
  answer Jingle itself), what it wants sent leaves as raw stanzas, its
  timer is one ``call_at``; an account's keys are fetched from its vCards
  (:class:`~dtx.trust.xmpp.XmppKeySource`, which the peer's verifier
  should use too: :attr:`XmppSignalling.key_source`);
- when both sides are verified (:class:`~dtx.proto.signalling.PeerIntroduced`)
  it hands the endpoint an :class:`~dtx.proto.traversal.Introduction`
  whose relay is this device's TURN allocation towards the peer's relayed
  address (or its reflexive one, when the peer has no relay), and permits
  the peer on the allocation.

The contact policy (who may learn this device's addresses): the account's
own other devices always; a roster contact only with a presence
subscription ``from`` (or ``both``): one this account lets see its presence.
Anyone else gets ``service-unavailable`` and nothing else. Subscription
requests are left to the user (slixmpp's automatic approval is off).

:meth:`XmppSignalling.connect` returns a dtx :class:`~dtx.aio.session.Session`
(this device is the QUIC client); incoming sessions come from
``peer.accept()`` as always. When the XMPP connection drops, established
dtx sessions go on (they never touch the server); it logs back in by
itself (``XmppSignallingConfig.relogin``: back-off from ``relogin_delay``
to ``relogin_max_delay``, for up to ``relogin_for``), then answers Jingle
again, says it is available, reads the roster and renews the TURN
credentials. A refused password ends the attempts at once.

Without a TURN allocation (no service listed, or none made within
``allocate_timeout``) the reflexive candidate comes from a STUN Binding on
the peer's socket to the first UDP STUN service listed
(:meth:`Endpoint.use_stun <dtx.proto.endpoint.Endpoint.use_stun>`); with
neither, only host candidates are offered.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import socket
from collections import OrderedDict, deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from slixmpp import ClientXMPP
from slixmpp.xmlstream.tostring import tostring

from ..errors import AuthenticationError, ConnectError, DtxError, LocalProtocolError, XmppError
from ..identity import DeviceIdentity
from ..jid import JID
from ..proto import turn as tp
from ..proto.binding import BindingClient, ReflexiveFailed, ReflexiveFound
from ..proto.paths import RelayWrap
from ..proto.signalling import (
    CandidatesAdded,
    JingleSignalling,
    KeysWanted,
    LocalCandidate,
    PeerIntroduced,
    RemoteCandidate,
    SessionTerminated,
    SignallingConfig,
    SignallingEvent,
    SignallingFailed,
    certificate_fingerprint,
)
from ..trust.xmpp import XmppKeySource, XmppKeySourceConfig
from ..wire.address import Address
from ..wire.jingle import CandidateType, Reason
from ..xmpp.client import XmppClient, XmppConfig, _Xmpp
from ..xmpp.services import (
    ExternalServices,
    ServiceDiscoveryError,
    StunService,
    TurnService,
    discover_services,
    refresh_credentials,
    resolve_address,
)
from .netif import host_candidates
from .peer import Peer
from .session import Session

__all__ = ["XmppSignalling", "XmppSignallingConfig", "XmppSignallingStatistics"]

logger = logging.getLogger(__name__)

E = TypeVar("E", bound=SignallingEvent)


@dataclass(frozen=True, kw_only=True)
class XmppSignallingConfig:
    """Options of :class:`XmppSignalling`. Times in seconds."""

    xmpp: XmppConfig = XmppConfig()
    """How to reach the server (``timeout`` bounds the login and each iq)."""
    signalling: SignallingConfig = SignallingConfig()
    keys: XmppKeySourceConfig = XmppKeySourceConfig()
    use_turn: bool = True
    """Allocate a relay on the first UDP TURN service the server lists."""
    use_stun: bool = True
    """Without a TURN allocation, ask the first UDP STUN service the server
    lists for the reflexive candidate (a STUN Binding on the peer's socket)."""
    turn: tp.TurnClientConfig = tp.TurnClientConfig()
    """The TURN client's tunables (``credential_margin``: how long before
    the credentials expire they are renewed over XMPP)."""
    allocate_timeout: float = 5.0
    """How long :meth:`XmppSignalling.start` waits for the allocation
    (without one the device goes on with host candidates only)."""
    connect_timeout: float = 15.0
    """The default deadline of :meth:`XmppSignalling.connect`, whole call."""
    max_tasks: int = 64
    """Bound on background fetches (keys, credentials) in flight."""
    relogin: bool = True
    """Log back in by itself after the XMPP connection dropped."""
    relogin_delay: float = 1.0
    """The first wait before logging back in; doubled (with jitter) after
    each failed attempt, up to ``relogin_max_delay``."""
    relogin_max_delay: float = 60.0
    relogin_for: float = 86400.0
    """How long to keep trying after one drop before giving up (then
    :attr:`XmppSignalling.online` stays False and the log says so)."""

    def __post_init__(self) -> None:
        for name in ("allocate_timeout", "connect_timeout", "relogin_delay",
                     "relogin_max_delay", "relogin_for"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 < value < float("inf")):
                raise ValueError(f"XmppSignallingConfig.{name} must be a finite number > 0, "
                                 f"not {value!r}")
        if self.relogin_max_delay < self.relogin_delay:
            raise ValueError("XmppSignallingConfig.relogin_max_delay is below relogin_delay")
        if self.max_tasks < 1:
            raise ValueError("XmppSignallingConfig.max_tasks must be at least 1")


@dataclass(frozen=True)
class XmppSignallingStatistics:
    online: bool
    relayed: Address | None
    reflexive: Address | None
    candidates: int
    signalling: dict[str, int]


class _DeviceClient(XmppClient):
    """An :class:`XmppClient` logged in as one full JID (the device's
    resource, which the Jingle signature names), not as the bare JID with
    a resource the server picks. The same security settings as
    ``XmppClient.connect``; it then reads vCards and asks for services as
    any XmppClient does.

    It is ``XmppClient``'s login with three things changed: the JID it logs
    in as, no automatic subscription approval, and the bound JID checked."""

    def __init__(self, jid: JID, password: str, config: XmppConfig) -> None:
        super().__init__(jid, password, config=config)
        self.full = jid

    def _login_jid(self) -> str:
        return self.full.full

    def _prepare(self, xmpp: _Xmpp) -> None:
        # A subscription decides who may learn this device's addresses: it
        # is the user's to grant, never slixmpp's (which by default
        # approves every request, and asks back).
        xmpp.auto_authorize = None
        xmpp.auto_subscribe = False

    def _logged_in(self, xmpp: _Xmpp, where: str) -> None:
        if str(xmpp.boundjid) != self.full.full:
            raise XmppError(f"{where} bound {xmpp.boundjid}, not {self.full}")


class XmppSignalling:
    """Jingle signalling through the account's own XMPP server for one
    :class:`~dtx.aio.peer.Peer` (module docs). ``password`` is the
    account's; the JID is the peer identity's full JID.

    With ``xmpp`` (an application's own slixmpp client, logged in as that
    full JID: the slixmpp plugin's) it logs in to nothing: it signals over
    that connection, sends no presence (the application's), does not log
    back in (the application reconnects; every ``session_start`` brings it
    back online) and leaves the connection open on :meth:`close`."""

    def __init__(self, identity: DeviceIdentity, password: str = "", *,
                 config: XmppSignallingConfig | None = None,
                 rng: random.Random | None = None,
                 xmpp: ClientXMPP | None = None) -> None:
        self.identity = identity
        self.config = config or XmppSignallingConfig()
        self._rng = rng or random.Random(random.SystemRandom().getrandbits(64))
        self._client: XmppClient = (
            _DeviceClient(identity.jid, password, self.config.xmpp) if xmpp is None
            else XmppClient.adopt(xmpp, identity.jid, config=self.config.xmpp))
        self.key_source = XmppKeySource(self._client, config=self.config.keys)
        """The accounts' published keys; give it to the peer's verifier."""
        self._peer: Peer | None = None
        self._signalling: JingleSignalling | None = None
        self._turn: tp.TurnClient | None = None
        self._service: TurnService | None = None
        self._hosts: list[Address] = []
        self._waiters: dict[str, asyncio.Future[PeerIntroduced]] = {}
        self._introduced: OrderedDict[str, list[RemoteCandidate]] = OrderedDict()
        """Full JIDs introduced by Jingle, with their candidates (trickled
        ones appended), latest last (bounded)."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._allocated = asyncio.Event()
        self._stunned = asyncio.Event()
        self._reflexive: Address | None = None
        """The STUN Binding's answer, without a TURN allocation."""
        self._renewed = asyncio.Event()
        self.counters: dict[str, int] = {"credentials_renewed": 0, "credentials_failed": 0,
                                         "relogins": 0, "relogin_attempts": 0,
                                         "reallocations": 0}
        self._recent: deque[SignallingEvent] = deque(maxlen=_MAX_RECENT)
        self._event_seen = asyncio.Event()
        self._remove_listener: Callable[[], None] | None = None
        self._online = False
        self._online_changed = asyncio.Event()
        self._online_listeners: list[Callable[[bool], None]] = []
        self._relogin_task: asyncio.Task[None] | None = None
        self._closed = False

    # -- lifecycle ----------------------------------------------------------------

    async def start(self, peer: Peer) -> None:
        """Log in, discover the services, allocate the relay, and begin
        answering Jingle, for the started ``peer``. Raises
        :class:`~dtx.errors.ConnectError`, :class:`~dtx.errors.AuthenticationError`
        or :class:`~dtx.errors.XmppError` when the login fails."""
        if self._peer is not None:
            raise DtxError("XmppSignalling.start() called twice")
        if str(peer.identity.jid) != str(self.identity.jid):
            raise DtxError("the peer's identity is not this signalling's")
        self._peer = peer
        endpoint = peer.endpoint
        await self._client.connect()
        xmpp = self._client.xmpp
        assert xmpp is not None
        if self._client.adopted:
            if str(xmpp.boundjid) != self.identity.jid.full:
                raise DtxError(f"the XMPP client is logged in as {xmpp.boundjid}, not as the "
                               f"key's {self.identity.jid}")
            xmpp.add_event_handler("session_start", self._on_session_start)
        xmpp.add_event_handler("disconnected", self._on_disconnected)
        loop = asyncio.get_running_loop()
        await self._read_roster(xmpp)
        self._signalling = JingleSignalling(
            self.identity, fingerprint=certificate_fingerprint(endpoint.device_certificate()),
            may_contact=self._may_contact, keys_for=self.key_source.keys_for,
            local_candidates=self.local_candidates, rng=random.Random(self._rng.getrandbits(64)),
            config=self.config.signalling)
        self.key_source.start()
        try:
            await self.key_source.refresh(self.identity.jid.bare.full)
        except (DtxError, TimeoutError) as exc:
            logger.warning("own account's keys not fetched: %s", exc)
        server: Address = self.config.xmpp.server or (self.identity.jid.domain, 5222)
        if self.config.use_turn or self.config.use_stun:
            await self._start_services(peer, loop)
        if self._turn is not None and self._turn.relayed is not None:
            server = self._turn.server
        bound = peer.address
        self._hosts = ([(a, bound[1]) for a in peer.config.host_addresses]
                       if peer.config.host_addresses is not None
                       else host_candidates(bound, _ip_of(server)))
        # Jingle is answered from here on, with every candidate known
        # (before, slixmpp answers a session-initiate with an error).
        self._attach(xmpp)
        self._pump()
        logger.info("signalling over XMPP as %s: %d candidates", self.identity.jid,
                    len(self.local_candidates()))

    async def _read_roster(self, xmpp: ClientXMPP) -> None:
        try:
            await asyncio.wait_for(xmpp.get_roster(), self.config.xmpp.timeout)
        except (TimeoutError, Exception) as exc:  # noqa: BLE001 - no roster: own devices only
            logger.warning("no roster from the server (%s): only own devices may connect", exc)

    def _attach(self, xmpp: ClientXMPP) -> None:
        """Take Jingle from the connection, say this device is available
        (an adopted connection's presence is its owner's)."""
        xmpp.add_filter("in", self._incoming)
        if not self._client.adopted:
            xmpp.send_presence()
        self._set_online(True)

    def _on_session_start(self, _event: object) -> None:
        """An adopted connection logged in again (its owner reconnected)."""
        if self._closed or self._signalling is None or self._online:
            return
        self._set_online(True)
        if self._turn is not None:
            self._spawn(self._refresh_credentials())

    def _set_online(self, online: bool) -> None:
        if online == self._online:
            return
        self._online = online
        self._online_changed.set()
        for listener in list(self._online_listeners):
            try:
                listener(online)
            except Exception:  # noqa: BLE001 - a listener's bug is not the connection's
                logger.exception("online listener failed")

    async def _start_services(self, peer: Peer, loop: asyncio.AbstractEventLoop) -> None:
        """XEP-0215: a TURN allocation (relayed and reflexive candidates);
        without one, a STUN Binding for the reflexive candidate alone."""
        try:
            found = await discover_services(self._client)
        except ServiceDiscoveryError as exc:
            logger.info("no external services: %s", exc)
            return
        self._remove_listener = peer.add_event_listener(self._on_endpoint_event)
        if self.config.use_turn:
            await self._start_turn(peer, loop, found)
        if self.config.use_stun and (self._turn is None or self._turn.relayed is None):
            await self._start_stun(peer, loop, found)

    async def _start_stun(self, peer: Peer, loop: asyncio.AbstractEventLoop,
                          found: ExternalServices) -> None:
        address = await _usable(found.first_stun(), "STUN")
        if address is None:
            return
        client = BindingClient(address, rng=random.Random(self._rng.getrandbits(64)))
        peer.endpoint.use_stun(client, loop.time())
        peer._wake()
        await self._bounded_wait(self._stunned)
        if client.mapped is None:
            logger.warning("no answer from STUN at %s:%d: no reflexive candidate", *address)
        else:
            self._reflexive = client.mapped
            peer.endpoint.traversal.reflexive = client.mapped

    async def _start_turn(self, peer: Peer, loop: asyncio.AbstractEventLoop,
                          found: ExternalServices) -> None:
        service = found.first_turn()
        address = await _usable(service, "TURN")
        if service is None or address is None:
            return
        self._service = service
        self._turn = tp.TurnClient(address, service.username, service.password, service.expires,
                                   rng=random.Random(self._rng.getrandbits(64)),
                                   config=self.config.turn)
        peer.endpoint.use_turn(self._turn, loop.time())
        peer._wake()
        await self._bounded_wait(self._allocated)  # Allocated sets the reflexive address
        if self._turn.relayed is None:
            logger.warning("no TURN allocation at %s:%d; going on without a relay", *address)

    async def _bounded_wait(self, event: asyncio.Event) -> None:
        """Wait for ``event``, ``allocate_timeout`` at most."""
        try:
            await asyncio.wait_for(event.wait(), self.config.allocate_timeout)
        except TimeoutError:
            pass

    async def close(self) -> None:
        """End the Jingle sessions (``gone``), release the relay, log out.
        The peer and its sessions stay as they are (the relay path of a
        session that used it goes with the allocation)."""
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        if self._signalling is not None and self._online:
            self._signalling.close(loop.time())
            self._send_out()
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_exception(ConnectError("signalling closed"))
                fut.exception()
        tasks = list(self._tasks)
        if self._relogin_task is not None:
            tasks.append(self._relogin_task)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=1.0)
        if self._timer is not None:
            self._timer.cancel()
        peer = self._peer
        if self._turn is not None and peer is not None and peer._endpoint is not None:
            self._turn.close(loop.time())
            peer._wake()
        if self._remove_listener is not None:
            self._remove_listener()
        xmpp = self._client.xmpp
        if self._client.adopted and xmpp is not None:
            xmpp.del_filter("in", self._incoming)
            xmpp.del_event_handler("session_start", self._on_session_start)
            xmpp.del_event_handler("disconnected", self._on_disconnected)
        await self.key_source.close()
        await self._client.close()
        self._set_online(False)

    # -- user calls -------------------------------------------------------------------

    @property
    def online(self) -> bool:
        """Logged in (False after the XMPP connection dropped, until it is
        back: ``XmppSignallingConfig.relogin``)."""
        return self._online

    async def wait_online(self, online: bool = True, *, timeout: float) -> None:
        """Wait until :attr:`online` is ``online``; :class:`TimeoutError`
        past ``timeout``."""
        async with asyncio.timeout(timeout):
            while self._online != online:
                self._online_changed.clear()
                await self._online_changed.wait()

    def add_online_listener(self, listener: Callable[[bool], None]) -> Callable[[], None]:
        """Call ``listener(online)`` whenever the XMPP connection goes or
        comes back; returns the function that removes it."""
        self._online_listeners.append(listener)
        return lambda: self._online_listeners.remove(listener) \
            if listener in self._online_listeners else None

    @property
    def xmpp(self) -> ClientXMPP | None:
        """The slixmpp client of the connection (None when not logged in),
        for what else the application says over it (presence,
        subscriptions, messages). Jingle iqs never reach its handlers."""
        return self._client.xmpp

    @property
    def turn(self) -> tp.TurnClient | None:
        """The TURN allocation relaying for this device, if any."""
        return self._turn

    @property
    def signalling(self) -> JingleSignalling:
        if self._signalling is None:
            raise DtxError("XmppSignalling not started")
        return self._signalling

    def local_candidates(self) -> list[LocalCandidate]:
        """This device's candidates now: host, reflexive (and port-mapped),
        relayed. A host
        address that the STUN or TURN server saw as it is (a device with a
        public address, no NAT) is offered as server-reflexive only: a peer
        probes a host candidate only when it can be on its own network, and
        this one is on the internet's."""
        turn = self._turn
        allocated = turn is not None and turn.state is tp.AllocationState.ALLOCATED
        mapped = turn.mapped if turn is not None and allocated else self._reflexive
        hosts = [a for a in self._hosts if a != mapped]
        out = [LocalCandidate(a) for a in hosts]
        if mapped is not None:
            out.append(LocalCandidate(mapped, CandidateType.SRFLX,
                                      self._hosts[0] if self._hosts else None))
        # A port mapping on the router (PeerConfig.port_mapping) is a public
        # address too; Jingle has no type of its own for it (XEP-0176).
        port_mapped = self._peer.port_mapped if self._peer is not None else None
        if port_mapped is not None and port_mapped != mapped:
            out.append(LocalCandidate(port_mapped, CandidateType.SRFLX,
                                      self._hosts[0] if self._hosts else None))
        if turn is not None and allocated and turn.relayed is not None:
            out.append(LocalCandidate(turn.relayed, CandidateType.RELAY, turn.mapped))
        return out

    def introduced(self, full_jid: str) -> bool:
        """Whether the device ``full_jid`` was introduced to this one by
        Jingle (of the last few hundred introduced): how a session with
        it was signalled."""
        return full_jid in self._introduced

    def devices(self, bare_jid: str) -> list[str]:
        """The full JIDs of ``bare_jid``'s resources that are available now
        (by presence), highest priority first; never this device."""
        xmpp = self._client.xmpp
        if xmpp is None:
            return []
        bare = JID.parse(bare_jid).bare.full
        resources = xmpp.client_roster[bare].resources
        ranked = sorted(resources.items(), key=lambda kv: -int(kv[1].get("priority") or 0))
        out = [f"{bare}/{res}" for res, _ in ranked]
        return [j for j in out if j != self.identity.jid.full]

    async def connect(self, jid: str, *, timeout: float | None = None) -> Session:
        """A dtx session with the device ``jid``, signalled through the
        server. A bare JID means any of the account's available devices
        (by presence; waited for, within the deadline, when none is known
        yet), tried highest priority first. ``timeout`` (default
        ``connect_timeout``) is a deadline for the whole call. Raises
        :class:`~dtx.errors.ConnectError` (refused, no answer, not a
        contact, offline), or what :meth:`Peer.connect
        <dtx.aio.peer.Peer.connect>` raises for the QUIC handshake
        (:class:`~dtx.errors.TrustError`, :class:`~dtx.errors.AuthenticationError`)."""
        self._started()
        if not self._online:
            raise ConnectError("not connected to the XMPP server")
        loop = asyncio.get_running_loop()
        budget = self.config.connect_timeout if timeout is None else timeout
        deadline = loop.time() + budget
        if JID.parse(jid).resource is not None:
            return await self._connect_device(jid, deadline)
        targets = await self._wait_devices(jid, deadline)
        failure: DtxError | None = None
        for target in targets:
            try:
                return await self._connect_device(target, deadline)
            except ConnectError as exc:
                logger.info("%s: %s", target, exc)
                failure = exc
        raise failure or ConnectError(f"no device of {jid} is available (no presence)")

    async def _wait_devices(self, bare: str, deadline: float) -> list[str]:
        found = self.devices(bare)
        xmpp = self._client.xmpp
        if found or xmpp is None:
            return found
        arrived = asyncio.Event()

        def seen(presence: Any) -> None:
            if str(presence["from"].bare) == JID.parse(bare).bare.full:
                arrived.set()

        xmpp.add_event_handler("presence_available", seen)
        try:
            async with asyncio.timeout_at(deadline):
                while not (found := self.devices(bare)):
                    arrived.clear()
                    await arrived.wait()
        except TimeoutError:
            raise ConnectError(f"no device of {bare} is available (no presence)") from None
        finally:
            xmpp.del_event_handler("presence_available", seen)
        return found

    async def _connect_device(self, jid: str, deadline: float) -> Session:
        peer, sig = self._started()
        loop = asyncio.get_running_loop()
        budget = deadline - loop.time()
        sid = sig.connect(jid, self.local_candidates(), loop.time())
        fut = self._waiters.get(sid)
        if fut is None or fut.done():
            fut = self._waiters[sid] = loop.create_future()
        self._pump()
        try:
            async with asyncio.timeout_at(deadline):
                intro = await asyncio.shield(fut)
        except TimeoutError:
            if sig.terminate(sid, loop.time(), Reason.TIMEOUT):
                self._pump()
            raise ConnectError(f"no Jingle answer from {jid} within {budget:.1f} s") from None
        finally:
            if self._waiters.get(sid) is fut and fut.done():
                del self._waiters[sid]
        # The responder took its introduction as its session-accept left,
        # half a signalling round trip ago: the QUIC Initial sprayed on the
        # direct candidates now finds its link (and its NAT open).
        return await peer.connect(intro.peer_jid, timeout=max(0.0, deadline - loop.time()))

    @property
    def turn_service(self) -> TurnService | None:
        """The TURN service in use, with the latest credentials."""
        return self._service

    async def wait_credentials_renewed(self, timeout: float) -> None:
        """Wait until the TURN credentials were renewed over XMPP (at least
        once since the last call); :class:`TimeoutError` past ``timeout``."""
        await asyncio.wait_for(self._renewed.wait(), timeout)
        self._renewed.clear()

    def add_candidates(self, candidates: Sequence[LocalCandidate]) -> int:
        """Trickle addresses found later (transport-info) to every Jingle
        session that has this side's transport; returns how many got some."""
        _, sig = self._started()
        sent = sig.add_candidates(candidates, asyncio.get_running_loop().time())
        self._pump()
        return sent

    async def wait_event(self, kind: type[E], timeout: float) -> E:
        """The oldest signalling event of ``kind`` not yet taken (of the
        last few hundred), waiting up to ``timeout`` for one; for watching
        sessions end, candidates arrive and the like."""
        async with asyncio.timeout(timeout):
            while True:
                for ev in self._recent:
                    if isinstance(ev, kind):
                        self._recent.remove(ev)
                        return ev
                self._event_seen.clear()
                await self._event_seen.wait()

    def statistics(self) -> XmppSignallingStatistics:
        turn = self._turn
        sig = self._signalling
        return XmppSignallingStatistics(
            self._online, None if turn is None else turn.relayed,
            self._reflexive if turn is None or turn.mapped is None else turn.mapped,
            len(self.local_candidates()),
            {} if sig is None else sig.statistics().counters)

    # -- the driver -----------------------------------------------------------------

    def _started(self) -> tuple[Peer, JingleSignalling]:
        if self._peer is None or self._signalling is None:
            raise DtxError("XmppSignalling not started")
        return self._peer, self._signalling

    def _may_contact(self, full_jid: str) -> bool:
        bare = JID.parse(full_jid).bare.full
        if bare == self.identity.jid.bare.full:
            return True
        xmpp = self._client.xmpp
        if xmpp is None:
            return False
        roster = xmpp.client_roster
        return bool(roster.has_jid(bare) and roster[bare]["from"])

    def _incoming(self, stanza: Any) -> Any:
        """slixmpp's ``in`` filter: signalling is taken here, the rest goes on."""
        sig = self._signalling
        if sig is None or self._closed:
            return stanza
        if sig.receive_iq(stanza.xml, asyncio.get_running_loop().time()):
            self._pump()
            return None
        return stanza

    def _send_out(self) -> None:
        sig, xmpp = self._signalling, self._client.xmpp
        if sig is None:
            return
        stanzas = sig.stanzas_to_send()
        if stanzas and xmpp is not None and self._online:
            # One write for the batch (an iq result and the session-accept
            # behind it, say): written one by one, the second can wait a
            # whole round trip in the server's Nagle buffer on its way on
            # (Prosody leaves Nagle on by default).
            xmpp.send_raw("".join(tostring(elem, xmlns=xmpp.default_ns, stream=xmpp,
                                           top_level=True) for elem in stanzas))

    def _pump(self) -> None:
        """Send what the signalling wants sent, act on its events, re-arm its timer."""
        sig = self._signalling
        if sig is None:
            return
        self._send_out()
        while (ev := sig.next_event()) is not None:
            self._on_event(ev)
        self._send_out()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        when = sig.get_timer()
        if when is not None and not self._closed:
            self._timer = asyncio.get_running_loop().call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._signalling is not None and not self._closed:
            self._signalling.handle_timer(asyncio.get_running_loop().time())
            self._pump()

    def _on_event(self, ev: SignallingEvent) -> None:
        peer, sig = self._started()
        now = asyncio.get_running_loop().time()
        self._recent.append(ev)
        self._event_seen.set()
        if isinstance(ev, KeysWanted):
            self._spawn(self._fetch_keys(ev.bare_jid))
        elif isinstance(ev, PeerIntroduced):
            relay, relay_peer = self._relay_to(ev.candidates, now)
            intro = ev.introduction(relay=relay, channel=None)
            intro = dataclasses.replace(intro, relay_peer=relay_peer)
            self._introduced[ev.peer_jid] = list(ev.candidates)
            self._introduced.move_to_end(ev.peer_jid)
            while len(self._introduced) > _MAX_RECENT:
                self._introduced.popitem(last=False)
            peer.endpoint.introduced(intro, now)
            peer._wake()
            fut = self._waiters.get(ev.sid)
            if fut is not None and not fut.done():
                fut.set_result(ev)
        elif isinstance(ev, CandidatesAdded):
            self._permit(ev.candidates, now)
            traversal = peer.endpoint.traversal
            traversal.add_candidates(ev.peer_jid, [(c.addr, c.kind) for c in ev.candidates], now)
            known = self._introduced.get(ev.peer_jid)
            if known is not None:
                known.extend(ev.candidates)
                del known[:-_MAX_KNOWN_CANDIDATES]
                if any(c.type is CandidateType.RELAY for c in ev.candidates):
                    # The peer allocated again (its TURN server restarted):
                    # relay to its new address from now on.
                    traversal.update_relay(ev.peer_jid, *self._relay_to(known, now), now)
            peer._wake()
        elif isinstance(ev, SignallingFailed):
            fut = self._waiters.get(ev.sid)
            if fut is not None and not fut.done():
                why = ev.condition or ev.reason.value
                fut.set_exception(ConnectError(
                    f"{ev.peer_jid} {'refused' if ev.remote else 'could not be reached'}: "
                    f"{why}{' (' + ev.text + ')' if ev.text else ''}"))
                fut.exception()
        elif isinstance(ev, SessionTerminated):
            logger.info("Jingle session %s with %s ended: %s", ev.sid, ev.peer_jid,
                        ev.reason.value)

    def _relay_to(self, candidates: Sequence[RemoteCandidate],
                  now: float) -> tuple[RelayWrap | None, Address | None]:
        """How to reach the peer on the relay path, and where relayed
        datagrams from it come from: through this device's allocation to
        the peer's relayed address (or its reflexive one); without an
        allocation, straight to the peer's relayed address. The latest of
        each kind counts (a trickled one replaces the first)."""
        peer_relay = next((c.addr for c in reversed(candidates)
                           if c.type is CandidateType.RELAY), None)
        peer_srflx = next((c.addr for c in reversed(candidates)
                           if c.type is CandidateType.SRFLX), None)
        turn = self._turn
        if turn is not None and turn.state is tp.AllocationState.ALLOCATED:
            self._permit(candidates, now)
            target = peer_relay or peer_srflx
            if target is None:
                return None, None
            try:
                turn.bind_channel(target, now)
            except LocalProtocolError as exc:
                logger.warning("no TURN channel to %s:%d: %s", *target, exc)
            return turn.relay_wrap(target), target
        if peer_relay is not None:
            relayed = peer_relay
            return (lambda payload: (payload, relayed)), relayed
        return None, None

    def _permit(self, candidates: Any, now: float) -> None:
        """Permissions for the peer's public addresses on the allocation."""
        turn = self._turn
        if turn is None or turn.state is not tp.AllocationState.ALLOCATED:
            return
        for c in candidates:
            if c.type in (CandidateType.SRFLX, CandidateType.RELAY) \
                    and not turn.permitted(c.addr[0]):
                try:
                    turn.permit(c.addr, now)
                except LocalProtocolError as exc:
                    logger.warning("no TURN permission for %s: %s", c.addr[0], exc)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        if len(self._tasks) >= self.config.max_tasks:
            coro.close()
            logger.warning("too many XMPP fetches in flight; one dropped")
            return
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _fetch_keys(self, bare: str) -> None:
        try:
            await self.key_source.refresh(bare)
        except (DtxError, TimeoutError) as exc:
            logger.info("keys of %s not fetched: %s", bare, exc)
        if self._signalling is not None and not self._closed:
            self._signalling.keys_changed(bare, asyncio.get_running_loop().time())
            self._pump()

    def _on_endpoint_event(self, ev: object) -> None:
        """TURN and STUN events of the peer's endpoint."""
        if isinstance(ev, (ReflexiveFound, ReflexiveFailed)):
            if isinstance(ev, ReflexiveFailed):
                logger.info("STUN at %s:%d: %s", *ev.server, ev.reason)
            self._stunned.set()
        elif isinstance(ev, tp.Allocated):
            self._allocated.set()
            if self._peer is not None:
                self._peer.endpoint.traversal.reflexive = ev.mapped
        elif isinstance(ev, tp.AllocationFailed):
            logger.warning("TURN allocation refused: %d %s", ev.code, ev.reason)
            self._allocated.set()
        elif isinstance(ev, tp.AllocationLost):
            logger.warning("TURN allocation lost: %s; allocating again", ev.reason)
            if not self._closed:
                self._spawn(self._reallocate())
        elif isinstance(ev, tp.CredentialsExpiring):
            self._spawn(self._refresh_credentials())

    async def _reallocate(self) -> None:
        """The allocation is gone (its TURN server restarted, say): fresh
        credentials, a new allocation on the same client (tried again
        after 5, 15, 45 and 120 s), permissions and channels for the
        introduced peers again, and the new addresses trickled to them
        (transport-info), which relay to the new one from then on."""
        loop = asyncio.get_running_loop()
        turn, peer = self._turn, self._peer
        if turn is None or peer is None:
            return
        for pause in (0.0, *_REALLOCATE_RETRIES):
            if pause:
                await asyncio.sleep(pause)
            if self._closed or peer._endpoint is None \
                    or _state(turn) is not tp.AllocationState.IDLE:
                return
            service = self._service
            if service is not None and self._online:
                try:
                    fresh = await refresh_credentials(self._client, service)
                except (DtxError, TimeoutError) as exc:
                    logger.info("no fresh TURN credentials (%s): the last ones it is", exc)
                else:
                    self._service = fresh
                    turn.update_credentials(fresh.username, fresh.password, fresh.expires,
                                            loop.time())
            if _state(turn) is not tp.AllocationState.IDLE:
                return
            self._allocated.clear()
            turn.allocate(loop.time(), as_before=True)
            peer._wake()
            await self._bounded_wait(self._allocated)
            if _state(turn) is tp.AllocationState.ALLOCATED:
                break
            if _state(turn) is tp.AllocationState.ALLOCATING:
                return  # still going: its own outcome decides
        else:
            logger.error("no new TURN allocation at %s:%d; going on without a relay",
                         *turn.server)
            return
        self.counters["reallocations"] += 1
        now = loop.time()
        traversal = peer.endpoint.traversal
        traversal.reflexive = turn.mapped
        for jid, candidates in self._introduced.items():
            if traversal.link_for(jid) is not None:
                traversal.update_relay(jid, *self._relay_to(candidates, now), now)
        logger.info("TURN allocated again: relayed %s:%d", *(turn.relayed or ("?", 0)))
        if self._signalling is not None:
            self._signalling.add_candidates(self.local_candidates(), now)
            self._pump()
        peer._wake()

    async def _refresh_credentials(self) -> None:
        """New TURN credentials over XMPP; a failed request is tried again
        after 5, 15 and 45 s while logged in (logging back in asks again)."""
        fresh: TurnService | None = None
        for pause in (*_RENEW_RETRIES, None):
            service, turn = self._service, self._turn
            if service is None or turn is None or not self._online:
                return
            try:
                fresh = await refresh_credentials(self._client, service)
                break
            except (DtxError, TimeoutError) as exc:
                self.counters["credentials_failed"] += 1
                logger.warning("TURN credentials not renewed: %s%s", exc,
                               "" if pause is None else f"; again in {pause:.0f} s")
                if pause is None:
                    return
                await asyncio.sleep(pause)
        if fresh is None or turn is None:
            return
        self._service = fresh
        self.counters["credentials_renewed"] += 1
        self._renewed.set()
        turn.update_credentials(fresh.username, fresh.password, fresh.expires,
                                asyncio.get_running_loop().time())
        if self._peer is not None:
            self._peer._wake()

    def _on_disconnected(self, _reason: object) -> None:
        if not self._online:
            return
        self._set_online(False)
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_exception(ConnectError("the XMPP connection dropped"))
                fut.exception()
        if self._closed:
            return
        if self.config.relogin and self._relogin_task is None and not self._client.adopted:
            logger.warning("the XMPP connection dropped; established dtx sessions go on; "
                           "logging back in")
            self._relogin_task = asyncio.ensure_future(self._relogin())
        else:
            logger.warning("the XMPP connection dropped; established dtx sessions go on")

    async def _relogin(self) -> None:
        """Log back in with back-off, within ``relogin_for``; then take
        Jingle again, say this device is available, read the roster again
        and renew the TURN credentials (the allocation itself never needed
        the XMPP connection)."""
        cfg = self.config
        loop = asyncio.get_running_loop()
        give_up = loop.time() + cfg.relogin_for
        delay = cfg.relogin_delay
        try:
            await self._client.drop()
            while not self._closed:
                wait = min(delay * self._rng.uniform(0.5, 1.0), give_up - loop.time())
                if wait < 0:
                    break
                await asyncio.sleep(wait)
                self.counters["relogin_attempts"] += 1
                try:
                    await self._client.connect()
                except AuthenticationError as exc:
                    logger.error("logging back in refused, not trying again: %s", exc)
                    return
                except (ConnectError, XmppError) as exc:
                    delay = min(delay * 2, cfg.relogin_max_delay)
                    logger.info("not logged back in (%s); next try within %.0f s", exc, delay)
                    continue
                xmpp = self._client.xmpp
                assert xmpp is not None
                xmpp.add_event_handler("disconnected", self._on_disconnected)
                await self._read_roster(xmpp)
                self.counters["relogins"] += 1
                self._attach(xmpp)
                logger.info("logged back in to the XMPP server as %s", self.identity.jid)
                if self._turn is not None:
                    self._spawn(self._refresh_credentials())
                return
            logger.error("not logged back in within %.0f s; giving up", cfg.relogin_for)
        finally:
            self._relogin_task = None


_MAX_RECENT = 256
_RENEW_RETRIES = (5.0, 15.0, 45.0)
_REALLOCATE_RETRIES = (5.0, 15.0, 45.0, 120.0)
_MAX_KNOWN_CANDIDATES = 32


async def _usable(service: StunService | TurnService | None, what: str) -> Address | None:
    """Where to send to ``service`` (the first UDP one of its kind the
    server lists), or None, logged, when there is none or it does not
    resolve."""
    if service is None:
        logger.info("the server lists no UDP %s service", what)
        return None
    try:
        return await resolve_address(service, family=socket.AF_INET)
    except ServiceDiscoveryError as exc:
        logger.warning("%s service not usable: %s", what, exc)
        return None


def _state(turn: tp.TurnClient) -> tp.AllocationState:
    """The allocation's state now (read afresh after an ``await``)."""
    return turn.state


def _ip_of(addr: Address) -> Address:
    """``addr`` if its host is an address, else a stand-in public one (only
    whether it is loopback matters to :func:`host_candidates`)."""
    try:
        socket.inet_aton(addr[0])
    except OSError:
        return ("192.0.2.1", addr[1])
    return addr
