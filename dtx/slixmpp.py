"""The slixmpp plugin: an XMPP application's own stanzas go peer to peer.

Register it the slixmpp way, with the device's key file (its JID is the
client's full JID)::

    xmpp = ClientXMPP("alice@example.org/tv", password)
    xmpp.register_plugin("xep_0030")
    xmpp.register_plugin("dtx", {"key_file": "tv.key"}, module="dtx.slixmpp")

and the application goes on calling ``send_message``, ``msg.reply().send()``
and its handlers. What the plugin does (``docs/slixmpp.md``):

- at ``session_start`` it starts a dtx :class:`~dtx.aio.peer.Peer` on a UDP
  socket and :class:`~dtx.aio.xmpp.XmppSignalling` *over the application's
  own connection* (Jingle, STUN/TURN by XEP-0215), publishes the device key
  in the account's vCard if it is not there, and advertises the
  ``urn:xmpp:dtx:0`` disco feature (entity capabilities follow when
  ``xep_0115`` is loaded);
- when an available presence comes from another device of the account or
  a subscribed contact that has the feature, it opens a session in the
  background (the device with the smaller full JID asks, so the two do not
  both); ``await xmpp.plugin["dtx"].connect(jid)`` does it at once;
- an outgoing stanza to a full JID with a live session goes over it (an
  ``out`` filter); to a bare JID, or a JID without a session, through the
  server as always;
- stanzas from the session are handled as if the server had delivered
  them, ``from`` set to the peer's authenticated JID; XEP-0198's count of
  what the *server* sent is left as it was.

No reordering at the switch: when a session comes up, a ``<switch/>`` iq
goes to the peer *through the server*, queued behind every stanza the
application sent before; the plugin's own filter moves the peer to the
session only when that iq passes it, so everything earlier went to the
server. The receiving plugin holds the session's stanzas until the
``<switch/>`` of that session (by stream id) arrives through the server,
behind every earlier server stanza (XMPP keeps the order between two full
JIDs), bounded by ``switch_timeout`` and ``max_held``.

Nothing lost, nothing twice: when a session ends, the stanzas the peer had
not acknowledged are sent again through the server, once, and later ones
go through the server until a new session is made; the receiving plugin
drops a server stanza whose id it already delivered from that peer over
dtx (a window of ``dedupe_window`` ids per peer).

Events (data: the peer's full JID; ``dtx_path_changed``: a dict with
``jid`` and ``path``): ``dtx_session_start`` (from now on stanzas to the
peer go over the session), ``dtx_path_changed``, ``dtx_session_end`` (back
to the server); ``dtx_ready`` once the peer and signalling run.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from xml.etree.ElementTree import Element

from slixmpp import JID as SlixJID
from slixmpp import ClientXMPP, Iq
from slixmpp.plugins.base import BasePlugin
from slixmpp.stanza import Message, Presence
from slixmpp.xmlstream import ET, StanzaBase
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath

from .errors import ConnectError, DtxError
from .identity import load_identity
from .jid import JID
from .proto.paths import PathChanged

__all__ = ["NS_DTX", "DtxPlugin", "dtx"]

logger = logging.getLogger(__name__)

NS_DTX = "urn:xmpp:dtx:0"
"""The disco feature of a device that speaks dtx (and the namespace of
``<switch/>``)."""
_SWITCH = f"{{{NS_DTX}}}switch"
_KINDS = (Message, Presence, Iq)
_MAX_EARLY = 256
_AGAIN = (2.0, 10.0, 30.0)


@dataclass
class _Link:
    """One peer device (full JID): its session and the switch's state."""

    jid: str
    session: Any = None
    sending: bool = False
    """Our ``<switch/>`` passed the out filter: stanzas go over the session."""
    switch_id: str | None = None
    """The stream id of the session our ``<switch/>`` announced."""
    released: bool = False
    """The peer's ``<switch/>`` for this session came through the server:
    the session's stanzas are delivered as they come."""
    held: deque[Element] = field(default_factory=deque)
    delivered: OrderedDict[str, None] = field(default_factory=OrderedDict)
    """Ids of stanzas delivered from this peer over dtx (recent ones)."""
    release_timer: asyncio.TimerHandle | None = None
    connecting: asyncio.Task[Any] | None = None
    fallback: dict[int, StanzaBase] = field(default_factory=dict)
    """The ended session's unacknowledged stanzas, queued for the server and
    not yet past the out filter (by object id): everything else to this
    peer waits behind them."""
    behind: deque[StanzaBase] = field(default_factory=deque)
    """Later stanzas to this peer that met the filter before the resent
    ones were through, in order: queued again once they are."""
    requeued: set[int] = field(default_factory=set)
    """Those of ``behind`` in slixmpp's queue again (by object id)."""
    ending: list[Any] = field(default_factory=list)
    """Sessions ended here (aborted) or closing whose end, and so whose
    unacknowledged stanzas, are still to come: later stanzas wait."""


class DtxPlugin(BasePlugin):
    """``xmpp.plugin["dtx"]``; see the module docs."""

    name = "dtx"
    description = "dtx: end-to-end encrypted peer-to-peer XML streams"
    dependencies = {"xep_0030"}
    default_config = {
        "key_file": None,
        "pins": None,
        "lan": False,
        "bind": "0.0.0.0",
        "port": 0,
        "drop_down": True,
        "peers": None,
        "publish_key": True,
        "connect_timeout": 15.0,
        "switch_timeout": 5.0,
        "liveness_timeout": 2.0,
        "max_held": 4096,
        "dedupe_window": 4096,
        "max_links": 1024,
        "signalling": None,
        "peer_config": None,
        "sock": None,
    }

    def plugin_init(self) -> None:
        if not self.key_file:
            raise DtxError('the dtx plugin needs {"key_file": "device.key"}')
        self.identity = load_identity(self.key_file)
        self.peer: Any = None
        self.signalling: Any = None
        self._links: dict[str, _Link] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ready = asyncio.Event()
        self._injecting = False
        self._closing = False
        self._filters = False
        self._ids = random.Random(random.SystemRandom().getrandbits(64))
        self._fallen: weakref.WeakSet[Any] = weakref.WeakSet()
        """Sessions whose stanzas went back to the server already."""
        self._early: OrderedDict[tuple[str, str], None] = OrderedDict()
        """``<switch/>``s that came before their session (bounded)."""
        self.xmpp.add_event_handler("session_start", self._on_session_start)
        self.xmpp.add_event_handler("presence_available", self._on_available)
        self.xmpp.add_event_handler("presence_unavailable", self._on_unavailable)
        # While the server connection is down, slixmpp holds every stanza
        # until it logs back in; one to a peer with a session need not wait.
        self._server_send = self.xmpp.send
        self.xmpp.send = self._send  # type: ignore[method-assign]
        self.xmpp.register_handler(Callback(
            "dtx switch", MatchXPath(f"{{{self.xmpp.default_ns}}}iq/{_SWITCH}"),
            self._on_switch))

    def plugin_end(self) -> None:
        self.xmpp.send = self._server_send  # type: ignore[method-assign]
        self.xmpp.del_event_handler("session_start", self._on_session_start)
        self.xmpp.del_event_handler("presence_available", self._on_available)
        self.xmpp.del_event_handler("presence_unavailable", self._on_unavailable)
        self.xmpp.remove_handler("dtx switch")
        if self._filters:
            self.xmpp.del_filter("out", self._outgoing)
            self.xmpp.del_filter("in", self._incoming)
        self._spawn(self.close())

    def session_bind(self, jid: Any) -> None:
        self.xmpp.plugin["xep_0030"].add_feature(NS_DTX)
        if "xep_0115" in self.xmpp.plugin:
            self._spawn(self.xmpp.plugin["xep_0115"].update_caps())

    # -- the application's calls ------------------------------------------------

    async def connect(self, jid: str, *, timeout: float | None = None) -> Any:
        """A dtx session with the device ``jid`` (full JID) now, or the one
        there is; raises :class:`~dtx.errors.ConnectError` (or what the
        signalling raises: a refused key, ...)."""
        await asyncio.wait_for(self._ready.wait(), timeout or self.connect_timeout)
        full = JID.parse(jid).full
        link = self._links.get(full)
        if link is not None and link.session is not None and link.session.is_open:
            return link.session
        session = await self.signalling.connect(full, timeout=timeout or self.connect_timeout)
        return self._adopt(session)

    def path(self, jid: str) -> str | None:
        """How a stanza to ``jid`` goes now: ``"lan"``, ``"direct"`` or
        ``"relay"`` over its session, None through the server (no session,
        or one whose switch has not passed yet)."""
        link = self._links.get(JID.parse(jid).full)
        if link is None or link.session is None or not link.session.is_open \
                or not link.sending:
            return None
        return str(link.session.path)

    def sessions(self) -> dict[str, Any]:
        """The live sessions, by the peer's full JID."""
        return {j: link.session for j, link in self._links.items()
                if link.session is not None and link.session.is_open}

    async def close(self) -> None:
        """End every session (their unacknowledged stanzas go through the
        server), the signalling and the peer."""
        self._closing = True
        for task in list(self._tasks):
            if task is not asyncio.current_task():
                task.cancel()
        for link in self._links.values():
            if link.session is not None and link.session.is_open:
                await link.session.close(timeout=2.0)
        if self.signalling is not None:
            await self.signalling.close()
        if self.peer is not None:
            await self.peer.close()
        self._ready.clear()

    # -- start ---------------------------------------------------------------------

    def _on_session_start(self, _event: object) -> None:
        if not self._filters:
            # After every other plugin's filters (XEP-0198 counts first).
            self.xmpp.add_filter("out", self._outgoing)
            self.xmpp.add_filter("in", self._incoming)
            self._filters = True
        if self.peer is None:
            self._spawn(self._start())

    async def _start(self) -> None:
        from .aio.peer import Peer, PeerConfig
        from .aio.xmpp import XmppSignalling, XmppSignallingConfig
        from .trust import PinStore, Verifier

        config = self.signalling_config or XmppSignallingConfig(
            connect_timeout=self.connect_timeout)
        if not isinstance(self.xmpp, ClientXMPP):
            raise DtxError("the dtx plugin needs a ClientXMPP")
        signalling = XmppSignalling(self.identity, config=config, xmpp=self.xmpp)
        # No resumption: when a session's connection dies its stanzas go
        # back to the server path at once (dtx_session_end), rather than
        # waiting in a suspended session (they would then arrive twice).
        peer_config = dataclasses.replace(
            self.config.get("peer_config") or PeerConfig(lan=bool(self.lan)), resume_timeout=None)
        peer = Peer(self.identity, Verifier([signalling.key_source], PinStore(self.pins)),
                    config=peer_config)
        try:
            sock = self.config.get("sock")
            if sock is not None:
                await peer.start(sock=sock, listen=True)
            else:
                await peer.start(self.bind, self.port, listen=True)
            await signalling.start(peer)
        except Exception as exc:  # noqa: BLE001 - the application goes on over the server
            logger.error("dtx not started (stanzas go through the server): %s", exc)
            await signalling.close()
            await peer.close()
            return
        self.peer, self.signalling = peer, signalling
        if self.publish_key:
            try:
                await signalling._client.publish_key(self.identity.public_key)
            except DtxError as exc:
                logger.warning("device key not published in the account's vCard: %s", exc)
        self._spawn(self._accept())
        self._ready.set()
        self.xmpp.event("dtx_ready")
        # Devices that were online before this one was ready.
        roster = self.xmpp.client_roster
        for bare in list(roster.keys()) + [self.identity.jid.bare.full]:
            for resource in list(roster[bare].resources):
                presence = self.xmpp.make_presence(pfrom=f"{bare}/{resource}")
                self._on_available(presence)

    @property
    def signalling_config(self) -> Any:
        return self.config.get("signalling")

    async def _accept(self) -> None:
        while True:
            session = await self.peer.accept()
            self._adopt(session)

    # -- sessions ------------------------------------------------------------------

    def _adopt(self, session: Any) -> Any:
        full = session.peer_jid
        link = self._link(full)
        old = link.session
        if old is not None and old is not session and old.is_open:
            # The peer made a new one: the old one is most likely dead (it
            # restarted, or lost its network); its stanzas come back.
            logger.info("a new dtx session with %s replaces the old one", full)
            self._end_session(link, old)
        link.session, link.sending, link.released = session, False, False
        if link.release_timer is not None:
            link.release_timer.cancel()
        link.release_timer = asyncio.get_running_loop().call_later(
            self.switch_timeout, self._release, link, "no <switch/> through the server in time")
        session.on_stanza(lambda el: self._from_session(link, session, el))
        session.on_path_change(lambda change: self._path_changed(link, change))
        self._spawn(self._watch(link, session))
        self._spawn(self._switch(link, session))
        return session

    async def _switch(self, link: _Link, session: Any) -> None:
        """Once the stream is open (its id known to both ends), the
        ``<switch/>``: through the server, behind what the application
        sent before."""
        try:
            await asyncio.wait_for(session.wait_opened(), self.connect_timeout)
        except (TimeoutError, DtxError):
            return
        if link.session is not session:
            return
        stream = session.stream_id or ""
        link.switch_id = stream
        iq = self.xmpp.make_iq_set(ito=link.jid)
        iq.xml.append(ET.Element(_SWITCH, {"stream": stream}))
        iq["id"] = f"dtx-switch-{self._ids.getrandbits(48):012x}"
        answer = iq.send(timeout=self.switch_timeout)  # type: ignore[no-untyped-call]
        answer.add_done_callback(lambda f: f.cancelled() or f.exception())
        if (link.jid, stream) in self._early:  # the peer's switch came first
            del self._early[(link.jid, stream)]
            self._release(link)

    async def _watch(self, link: _Link, session: Any) -> None:
        await session.wait_closed()
        self._fall_back(link, session)

    def _end_session(self, link: _Link, session: Any) -> None:
        """End ``session`` here; later stanzas to the peer wait for its
        unacknowledged ones (its watcher falls back once it is over)."""
        if session not in link.ending:
            link.ending.append(session)
        if link.session is session:
            link.session, link.sending = None, False
        session.abort()

    def _fall_back(self, link: _Link, session: Any) -> None:
        """The session is over: its unacknowledged stanzas go into slixmpp's
        send queue, for the server, and the peer goes back to the server
        path. Called by the out filter as soon as it meets the ended
        session (before any later stanza to the peer passes) or when the
        session's end is seen, whichever comes first; once."""
        ended = session.ended
        if ended is None or session in self._fallen:
            return
        self._fallen.add(session)
        if session in link.ending:
            link.ending.remove(session)
        if link.session is session:
            link.session, link.sending = None, False
        # The application's stanzas (addressed to the peer); not the
        # session's own (a dtx ping has no 'to': it means nothing elsewhere).
        back = [] if ended is None else [el for el in ended.unacknowledged
                                          if el.get("to") == link.jid]
        if back:
            logger.info("dtx session with %s ended; %d unacknowledged stanzas go through "
                        "the server", link.jid, len(back))
        for el in back:
            stanza = self.xmpp._build_stanza(el)
            link.fallback[id(stanza)] = stanza
            self._server_send(stanza)
        if not link.fallback and not link.ending:
            self._requeue(link)
        self.xmpp.event("dtx_session_end", link.jid)
        if self.drop_down and not self._closing:
            self._spawn(self._again(link))

    async def _again(self, link: _Link) -> None:
        """After a session ended, make a new one while the peer is online
        (the one with the smaller full JID asks): after 2, 10 and 30 s,
        then not again until its next presence or :meth:`connect`."""
        own, roster = str(self.xmpp.boundjid), self.xmpp.client_roster
        for pause in _AGAIN:
            await asyncio.sleep(pause)
            peer = SlixJID(link.jid)
            if self._closing or link.session is not None or link.connecting is not None \
                    or link.jid <= own or peer.resource not in roster[peer.bare].resources:
                return
            try:
                await self.connect(link.jid)
                return
            except (ConnectError, DtxError, TimeoutError) as exc:
                logger.info("no new dtx session with %s yet: %s", link.jid, exc)

    def _path_changed(self, link: _Link, change: PathChanged) -> None:
        self.xmpp.event("dtx_path_changed", {"jid": link.jid, "path": change.kind.value})

    def _from_session(self, link: _Link, session: Any, el: Element) -> None:
        if link.session is not session:
            return
        el.set("from", link.jid)
        el.set("to", str(self.xmpp.boundjid))
        if not link.released:
            if len(link.held) >= self.max_held:
                self._release(link, f"{self.max_held} stanzas held")
            else:
                link.held.append(el)
                return
        self._deliver(link, el)

    def _release(self, link: _Link, why: str | None = None) -> None:
        if link.released:
            return
        if why:
            logger.warning("dtx stanzas from %s delivered without the switch: %s", link.jid, why)
        link.released = True
        if link.release_timer is not None:
            link.release_timer.cancel()
            link.release_timer = None
        while link.held:
            self._deliver(link, link.held.popleft())

    def _deliver(self, link: _Link, el: Element) -> None:
        sid = el.get("id")
        if sid:
            link.delivered[sid] = None
            while len(link.delivered) > self.dedupe_window:
                link.delivered.popitem(last=False)
        sm = self.xmpp.plugin["xep_0198"] if "xep_0198" in self.xmpp.plugin else None
        handled = None if sm is None else sm.handled
        self._injecting = True
        try:
            self.xmpp._spawn_event(el)
        finally:
            self._injecting = False
            if sm is not None:
                sm.handled = handled  # what the server sent, not what dtx did

    # -- the server path ---------------------------------------------------------------

    def _on_switch(self, iq: StanzaBase) -> None:
        """The peer moved to the session of stream ``stream``: everything it
        sent through the server before is in; deliver the session's."""
        sender = str(iq["from"])
        switch = iq.xml.find(_SWITCH)
        stream = "" if switch is None else switch.get("stream", "")
        link = self._links.get(sender)
        if link is not None and link.session is not None \
                and stream == (link.session.stream_id or ""):
            self._release(link)
        else:  # before the session is ours (its handshake ends here later)
            self._early[(sender, stream)] = None
            while len(self._early) > _MAX_EARLY:
                self._early.popitem(last=False)
        iq.reply().send()

    def _send(self, data: Any, use_filters: bool = True) -> None:
        """slixmpp's ``send``, but while the server connection is down a
        stanza to a peer whose session carries its stanzas goes over it
        (up, everything goes through slixmpp's queue and the out filter,
        which keeps the order)."""
        if not getattr(self.xmpp, "_session_started", True) and isinstance(data, _KINDS):
            to = data["to"]
            link = self._links.get(str(to)) if to and to.resource else None
            if link is not None and link.sending and not link.fallback \
                    and link.session is not None and link.session.is_open:
                try:
                    link.session.send(data.xml)
                    return
                except DtxError as exc:
                    logger.info("not sent over dtx (%s): held for the server", exc)
        self._server_send(data, use_filters)

    def _outgoing(self, stanza: StanzaBase) -> StanzaBase | None:
        if not isinstance(stanza, _KINDS):
            return stanza
        to = stanza["to"]
        if not to or not to.resource:
            return stanza
        link = self._links.get(str(to))
        if link is None:
            return stanza
        if link.fallback or link.behind or link.ending:
            return self._in_turn(link, stanza)
        if link.session is None:
            return stanza
        if not link.session.is_open:
            # Over (or closing), not yet seen by the watcher: fall back
            # now, or wait for its end; this one goes behind what comes back.
            session = link.session
            if session.ended is None:
                link.ending.append(session)
                link.session, link.sending = None, False
            else:
                self._fall_back(link, session)
            if link.fallback or link.ending:
                return self._in_turn(link, stanza)
            return stanza
        if not link.sending:
            switch = stanza.xml.find(_SWITCH)
            if isinstance(stanza, Iq) and switch is not None \
                    and switch.get("stream") == (link.switch_id or ""):
                link.sending = True  # everything before went to the server
                self.xmpp.event("dtx_session_start", link.jid)
            return stanza
        if stanza.xml.find(_SWITCH) is not None:
            return stanza
        try:
            link.session.send(stanza.xml)
        except DtxError as exc:
            logger.info("not sent over dtx (%s): through the server", exc)
            return stanza
        return None

    def _in_turn(self, link: _Link, stanza: StanzaBase) -> StanzaBase | None:
        """Falling back: the resent stanzas go first, then the ones that
        met the filter meanwhile, in the order they met it (each queued
        again once, never round and round)."""
        if link.fallback.pop(id(stanza), None) is not None:
            if not link.fallback and not link.ending:
                self._requeue(link)
            return stanza  # a resent one, in its turn
        if link.behind and link.behind[0] is stanza and id(stanza) in link.requeued:
            link.behind.popleft()
            link.requeued.discard(id(stanza))
            return stanza  # queued again behind the resent ones: its turn
        link.behind.append(stanza)
        if not link.fallback and not link.ending:
            self._requeue(link)
        return None

    def _requeue(self, link: _Link) -> None:
        for stanza in link.behind:
            if id(stanza) not in link.requeued:
                link.requeued.add(id(stanza))
                self._server_send(stanza)

    def _incoming(self, stanza: StanzaBase) -> StanzaBase | None:
        if self._injecting or not isinstance(stanza, _KINDS):
            return stanza
        link = self._links.get(str(stanza["from"]))
        sid = stanza["id"]
        if link is not None and sid and sid in link.delivered:
            del link.delivered[sid]
            logger.debug("dropped %s from %s: delivered over dtx already", sid, link.jid)
            return None
        return stanza

    # -- dropping down by itself --------------------------------------------------------

    def _on_unavailable(self, presence: Presence) -> None:
        """The peer's XMPP session ended: the device may be gone (killed,
        off the network), or only its server connection (a server restart
        sends this too). Ask the session: no answer within
        ``liveness_timeout`` ends it now rather than at the idle timeout,
        and its stanzas go through the server."""
        link = self._links.get(str(presence["from"]))
        if link is not None and link.session is not None and link.session.is_open:
            self._spawn(self._check_alive(link, link.session))

    async def _check_alive(self, link: _Link, session: Any) -> None:
        try:
            await session.ping(timeout=self.liveness_timeout)
        except (TimeoutError, DtxError):
            if link.session is session:
                logger.info("%s went offline and its dtx session does not answer: ended",
                            link.jid)
                self._end_session(link, session)

    def _on_available(self, presence: Presence) -> None:
        if not self.drop_down or not self._ready.is_set():
            return
        full = str(presence["from"])
        own = str(self.xmpp.boundjid)
        if not presence["from"].resource or full <= own:
            return  # the device with the smaller full JID asks
        allowed: Callable[[str], bool] | None = self.peers
        if allowed is not None and not allowed(full):
            return
        link = self._links.get(full)
        if link is not None and (link.connecting is not None or link.session is not None):
            return
        link = self._link(full)
        link.connecting = self._spawn(self._drop_down(link))

    async def _drop_down(self, link: _Link) -> None:
        try:
            info = await self.xmpp.plugin["xep_0030"].get_info(
                jid=SlixJID(link.jid), timeout=self.connect_timeout)
            if NS_DTX not in info["disco_info"]["features"]:
                return
            await self.connect(link.jid)
        except (ConnectError, DtxError, TimeoutError) as exc:
            logger.info("no dtx session with %s: %s", link.jid, exc)
        except Exception as exc:  # noqa: BLE001 - disco errors: it does not speak dtx
            logger.info("%s: no dtx (%s)", link.jid, exc)
        finally:
            link.connecting = None

    def _link(self, full: str) -> _Link:
        """The peer's entry, made if new. Entries with nothing going on (no
        session, nothing held or waiting) are dropped, oldest first, past
        ``max_links``: devices come and go with new resources for ever."""
        link = self._links.get(full)
        if link is None:
            link = self._links[full] = _Link(full)
            if len(self._links) > self.max_links:
                for jid in [j for j, k in self._links.items() if _idle(k)]:
                    if len(self._links) <= self.max_links:
                        break
                    del self._links[jid]
        return link

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


def _idle(link: _Link) -> bool:
    return (link.session is None and link.connecting is None and not link.fallback
            and not link.behind and not link.ending and not link.held)


dtx = DtxPlugin
"""The name slixmpp's ``register_plugin("dtx", module="dtx.slixmpp")`` looks up."""
