"""Publish, fetch and revoke device keys in an account's vCard over XMPP.

One :class:`XmppClient` is one logged-in XMPP connection (slixmpp), used
for three things:

- reading any account's vCards (:meth:`XmppClient.fetch_vcards`,
  :meth:`XmppClient.fetch_keys`): both forms are read, vCard4 from the
  account's PEP node ``urn:xmpp:vcard4`` (XEP-0292) and vcard-temp
  (XEP-0054), and the keys of both are merged;
- adding this device's key to the logged-in account's own vCard
  (:meth:`XmppClient.publish_key`), keeping every other field and every
  other device's key;
- removing it again (:meth:`XmppClient.revoke_key`).

Where the key is written: into the vCard the server really keeps. A server
that announces ``urn:ietf:params:xml:ns:vcard-4.0`` on the account
(Prosody with ``mod_vcard4``) stores vCard4 on PEP, and its vcard-temp is a
translation (``mod_vcard_legacy``) that drops ``KEY``; there the key goes
into vCard4, published with the access model ``open`` so that peers and the
rendezvous read it without a roster relation. Elsewhere (``mod_vcard``,
ejabberd) vcard-temp is stored as sent, and the key goes there. Writing
vcard-temp on a translating server is refused: it would replace the vCard4
with a key-less translation, wiping every device's key.

Security of the connection: TLS whenever the server offers it (STARTTLS,
certificate checked against the system's CAs or ``ca_file``); a server
that does not offer TLS is refused unless ``allow_plaintext`` is set (for
test servers only). The login uses the bare JID, so the server picks a
fresh resource and no live session of the same account is displaced.

Writes are read-modify-write: two devices of one account publishing at the
same instant can lose one update; publishing again repairs it.
"""

from __future__ import annotations

import asyncio
import logging
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from slixmpp import ClientXMPP
from slixmpp.exceptions import IqError, IqTimeout
from slixmpp.stanza import Iq

from dtx.errors import AuthenticationError, ConnectError, VCardError, XmppError
from dtx.errors import IqError as StanzaError
from dtx.jid import JID
from dtx.xmpp.config import PUBLISH_FORMATS, PublishFormat, XmppConfig
from dtx.trust.vcard import (
    VCARD4_NS,
    VCARD_TEMP_NS,
    VCardFormat,
    add_key,
    extract_keys,
    new_vcard,
    remove_key,
)

__all__ = [
    "PUBLISH_FORMATS",
    "VCARD4_NODE",
    "FetchedVCards",
    "KeyChange",
    "PublishFormat",
    "XmppClient",
    "XmppConfig",
    "open_xmpp_client",
]

logger = logging.getLogger(__name__)

VCARD4_NODE = "urn:xmpp:vcard4"
"""PEP node holding the account's vCard4 (XEP-0292), item id ``current``."""


_PUBSUB_NS = "http://jabber.org/protocol/pubsub"
_PUBSUB_OWNER_NS = "http://jabber.org/protocol/pubsub#owner"
_DATA_NS = "jabber:x:data"
_DISCO_INFO_NS = "http://jabber.org/protocol/disco#info"
_STANZAS_NS = "urn:ietf:params:xml:ns:xmpp-stanzas"
_ABSENT = frozenset({"item-not-found", "service-unavailable", "feature-not-implemented"})


@dataclass(frozen=True)
class FetchedVCards:
    """An account's vCards as the server returned them; None where the
    account has none in that form (or the server has no such store)."""

    vcard_temp: bytes | None
    vcard4: bytes | None

    def keys(self) -> frozenset[bytes] | None:
        """The dtx keys of both forms, merged; None when there is no vCard
        at all. A vCard without dtx keys gives an empty set: the account
        is known and none of its devices is trusted."""
        if self.vcard_temp is None and self.vcard4 is None:
            return None
        keys: set[bytes] = set()
        for doc in (self.vcard_temp, self.vcard4):
            if doc is not None:
                keys.update(extract_keys(doc))
        return frozenset(keys)


@dataclass(frozen=True)
class KeyChange:
    """What a publish or revoke did: which vCard forms it rewrote (empty
    when nothing needed to change) and the keys listed afterwards."""

    jid: str
    written: tuple[VCardFormat, ...]
    keys: frozenset[bytes]

    @property
    def changed(self) -> bool:
        return bool(self.written)


class _Xmpp(ClientXMPP):
    """slixmpp client that refuses an unencrypted stream unless allowed."""

    def __init__(self, jid: str, password: str, *, allow_plaintext: bool) -> None:
        super().__init__(jid, password)
        self.dtx_allow_plaintext = allow_plaintext
        self.dtx_refusal: str | None = None

    async def _handle_stream_features(self, features: Any) -> bool | None:
        offered = "starttls" in features["features"]
        secure = "starttls" in self.features
        if not secure and not offered and not self.dtx_allow_plaintext:
            self.dtx_refusal = (
                "the server does not offer TLS; refusing to log in over an "
                "unencrypted connection (--allow-plaintext allows it, for test servers only)"
            )
            self.event("dtx_refused", self.dtx_refusal)
            self.abort()
            return True
        result: bool | None = await super()._handle_stream_features(features)
        return result


def _el(tag: str, attrib: dict[str, str] | None = None, text: str | None = None) -> ET.Element:
    elem = ET.Element(tag, attrib or {})
    if text is not None:
        elem.text = text
    return elem


def _form(form_type: str, fields: dict[str, str]) -> ET.Element:
    x = _el(f"{{{_DATA_NS}}}x", {"type": "submit"})
    ft = ET.SubElement(x, f"{{{_DATA_NS}}}field", {"var": "FORM_TYPE", "type": "hidden"})
    ET.SubElement(ft, f"{{{_DATA_NS}}}value").text = form_type
    for var, value in fields.items():
        f = ET.SubElement(x, f"{{{_DATA_NS}}}field", {"var": var})
        ET.SubElement(f, f"{{{_DATA_NS}}}value").text = value
    return x


def _parse_own(xml: bytes) -> ET.Element:
    """Parse a vCard serialised by dtx.trust.vcard (already parsed safely
    once, no DTD possible) back into an element to send."""
    try:
        return ET.fromstring(xml)
    except ET.ParseError as exc:
        raise VCardError(f"vCard could not be re-read for sending: {exc}") from exc


class XmppClient:
    """One XMPP connection for reading and writing vCards; see the module
    docs. Use :func:`open_xmpp_client`, or :meth:`connect` and :meth:`close`."""

    def __init__(self, jid: str | JID, password: str, *, config: XmppConfig | None = None) -> None:
        self._jid = jid if isinstance(jid, JID) else JID.parse(jid)
        self._password = password
        self._config = config or XmppConfig()
        self._xmpp: ClientXMPP | None = None
        self._vcard4_offered: bool | None = None
        self._adopted = False

    @classmethod
    def adopt(cls, xmpp: ClientXMPP, jid: str | JID, *,
              config: XmppConfig | None = None) -> XmppClient:
        """An XmppClient over an application's own slixmpp connection,
        logged in as ``jid`` (the slixmpp plugin's): it reads and writes
        vCards and asks for services over that connection; :meth:`connect`,
        :meth:`drop` and :meth:`close` leave the connection to its owner."""
        client = cls(jid, "", config=config)
        client._xmpp = xmpp
        client._adopted = True
        return client

    @property
    def adopted(self) -> bool:
        """Over someone else's connection (:meth:`adopt`)."""
        return self._adopted

    @property
    def xmpp(self) -> ClientXMPP | None:
        """The slixmpp client of the connection (None when not logged in)."""
        return self._xmpp

    @property
    def jid(self) -> JID:
        """The account (bare JID) this client is logged in as."""
        return self._jid.bare

    @property
    def connected(self) -> bool:
        return self._xmpp is not None

    # -- connection ---------------------------------------------------------

    async def connect(self) -> None:
        """Log in, within ``config.timeout``; raises :class:`ConnectError`
        (no answer, TLS failed), :class:`AuthenticationError` (password
        refused) or :class:`XmppError` (no TLS and plaintext not allowed)."""
        if self._xmpp is not None:
            return
        cfg = self._config
        xmpp = _Xmpp(self._login_jid(), self._password, allow_plaintext=cfg.allow_plaintext)
        xmpp.enable_direct_tls = False
        xmpp.enable_starttls = True
        xmpp.enable_plaintext = False
        if cfg.ca_file is not None:
            xmpp.ca_certs = Path(cfg.ca_file)
        if cfg.allow_plaintext:
            mechs = xmpp.plugin["feature_mechanisms"]
            mechs.unencrypted_plain = True
            mechs.unencrypted_scram = True
        self._prepare(xmpp)
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def finish(exc: BaseException | None) -> None:
            if done.done():
                return
            if exc is None:
                done.set_result(None)
            else:
                done.set_exception(exc)

        where = "%s:%d" % cfg.server if cfg.server else self._jid.domain
        xmpp.add_event_handler("session_start", lambda _: finish(None))
        xmpp.add_event_handler(
            "failed_all_auth",
            lambda _: finish(AuthenticationError(f"{where} refused the login of {self.jid}")),
        )
        xmpp.add_event_handler(
            "dtx_refused", lambda reason: finish(XmppError(f"{where}: {reason}"))
        )
        xmpp.add_event_handler(
            "ssl_invalid_chain",
            lambda exc: finish(ConnectError(f"{where}: TLS certificate not trusted: {exc}")),
        )
        xmpp.add_event_handler(
            "connection_failed", lambda exc: finish(ConnectError(f"{where}: {exc}"))
        )
        xmpp.add_event_handler(
            "disconnected",
            lambda reason: finish(
                XmppError(f"{where}: {xmpp.dtx_refusal}")
                if xmpp.dtx_refusal
                else ConnectError(f"{where} closed the connection during login ({reason})")
            ),
        )
        if cfg.server is not None:
            xmpp.connect(cfg.server[0], cfg.server[1])
        else:
            xmpp.connect()
        try:
            await asyncio.wait_for(done, cfg.timeout)
        except TimeoutError:
            await self._abort(xmpp)
            raise ConnectError(f"no XMPP session with {where} within {cfg.timeout} s") from None
        except BaseException:
            await self._abort(xmpp)
            raise
        try:
            self._logged_in(xmpp, where)
        except BaseException:
            await self._abort(xmpp)
            raise
        self._xmpp = xmpp
        logger.info("logged in to %s as %s", where, xmpp.boundjid)

    # -- what a subclass logging in otherwise changes --------------------------

    def _login_jid(self) -> str:
        """The JID to log in as: the bare JID, so the server picks a fresh
        resource and no live session of the account is displaced."""
        return self._jid.bare.full

    def _prepare(self, xmpp: _Xmpp) -> None:
        """Configure the connection before it connects (plugins, filters)."""

    def _logged_in(self, xmpp: _Xmpp, where: str) -> None:
        """Check the session just opened; raise to refuse it."""

    @staticmethod
    async def _reap(xmpp: _Xmpp) -> None:
        """Stop slixmpp's outgoing-filter task, which outlives the stream
        (slixmpp only cancels it when the client object is collected)."""
        task = getattr(xmpp, "_run_out_filters", None)
        if isinstance(task, asyncio.Future) and not task.done():
            task.cancel()
            await asyncio.wait([task], timeout=1.0)

    async def _abort(self, xmpp: _Xmpp) -> None:
        xmpp.cancel_connection_attempt()
        xmpp.abort()
        await self._reap(xmpp)

    async def drop(self) -> None:
        """Forget a connection that is gone (the server closed it, the
        network dropped it) without closing a stream, so that
        :meth:`connect` logs in again."""
        if self._adopted:
            return
        xmpp, self._xmpp = self._xmpp, None
        if isinstance(xmpp, _Xmpp):
            await self._abort(xmpp)

    async def close(self) -> None:
        """Close the stream cleanly (bounded by ``config.timeout``); an
        adopted connection is only forgotten."""
        xmpp, self._xmpp = self._xmpp, None
        if xmpp is None or self._adopted or not isinstance(xmpp, _Xmpp):
            return
        try:
            await asyncio.wait_for(xmpp.disconnect(wait=self._config.timeout), self._config.timeout)
        except TimeoutError:
            logger.info("the server did not close the stream in time; dropping the connection")
            xmpp.abort()
        finally:
            xmpp.cancel_connection_attempt()
            await self._reap(xmpp)

    def _session(self) -> ClientXMPP:
        if self._xmpp is None:
            raise XmppError("not connected to the XMPP server")
        return self._xmpp

    async def _iq(self, kind: Literal["get", "set"], payload: ET.Element, to: str | None) -> Iq:
        xmpp = self._session()
        iq = xmpp.make_iq_get(ito=to) if kind == "get" else xmpp.make_iq_set(ito=to)
        iq.append(payload)
        try:
            result: Iq = await iq.send(timeout=self._config.timeout)  # type: ignore[no-untyped-call]
        except IqTimeout:
            raise XmppError(
                f"no answer from the server within {self._config.timeout} s "
                f"({payload.tag} to {to or 'own account'})"
            ) from None
        return result

    async def iq_get(self, payload: ET.Element, to: str | None = None) -> ET.Element:
        """Send an iq get carrying ``payload`` (to the own account when
        ``to`` is None) and return the answer's XML. An error answer raises
        :class:`dtx.errors.IqError`; no answer in time :class:`XmppError`."""
        try:
            answer = await self._iq("get", payload, to)
        except IqError as exc:
            raise StanzaError(exc.iq.xml) from None
        return answer.xml

    # -- reading ------------------------------------------------------------

    async def vcard4_offered(self) -> bool:
        """Whether the server keeps vCard4 for this account (it announces
        ``urn:ietf:params:xml:ns:vcard-4.0`` in the account's disco#info)."""
        if self._vcard4_offered is None:
            try:
                answer = await self._iq("get", _el(f"{{{_DISCO_INFO_NS}}}query"), self.jid.full)
            except IqError as exc:
                logger.info("disco#info on %s failed (%s); assuming no vCard4", self.jid,
                            exc.condition)
                self._vcard4_offered = False
            else:
                query = answer.xml.find(f"{{{_DISCO_INFO_NS}}}query")
                features = set() if query is None else {
                    f.get("var") for f in query.findall(f"{{{_DISCO_INFO_NS}}}feature")
                }
                self._vcard4_offered = VCARD4_NS in features
        return self._vcard4_offered

    async def _get_vcard_temp(self, bare: str) -> bytes | None:
        try:
            answer = await self._iq("get", _el(f"{{{VCARD_TEMP_NS}}}vCard"), bare)
        except IqError as exc:
            if exc.condition in _ABSENT:
                return None
            raise XmppError(f"cannot read the vcard-temp of {bare}: {exc.condition}") from None
        vcard = answer.xml.find(f"{{{VCARD_TEMP_NS}}}vCard")
        # A vcard-temp without any field is no vCard: servers answer so for
        # accounts that never stored one (Prosody's mod_vcard_legacy).
        if vcard is None or len(vcard) == 0:
            return None
        return ET.tostring(vcard)

    async def _get_vcard4(self, bare: str) -> bytes | None:
        pubsub = _el(f"{{{_PUBSUB_NS}}}pubsub")
        ET.SubElement(pubsub, f"{{{_PUBSUB_NS}}}items", {"node": VCARD4_NODE, "max_items": "1"})
        try:
            answer = await self._iq("get", pubsub, bare)
        except IqError as exc:
            if exc.condition in _ABSENT:
                return None
            raise XmppError(f"cannot read the vCard4 of {bare}: {exc.condition}") from None
        for item in answer.xml.iterfind(
            f"{{{_PUBSUB_NS}}}pubsub/{{{_PUBSUB_NS}}}items/{{{_PUBSUB_NS}}}item"
        ):
            vcard = item.find(f"{{{VCARD4_NS}}}vcard")
            if vcard is not None:
                return ET.tostring(vcard)
        return None

    async def fetch_vcards(self, bare_jid: str | JID) -> FetchedVCards:
        """Both vCard forms of an account. An absent vCard (or store) is
        None; a refusal (``forbidden``) or a timeout raises :class:`XmppError`."""
        bare = (bare_jid if isinstance(bare_jid, JID) else JID.parse(bare_jid)).bare.full
        # Both requests run to the end before an error is raised, so
        # neither is left behind with an exception nobody retrieves.
        outcomes = await asyncio.gather(
            self._get_vcard_temp(bare), self._get_vcard4(bare), return_exceptions=True
        )
        forms: list[bytes | None] = []
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
            forms.append(outcome)
        return FetchedVCards(vcard_temp=forms[0], vcard4=forms[1])

    async def fetch_keys(self, bare_jid: str | JID) -> frozenset[bytes] | None:
        """The dtx keys listed in the account's vCards; None when it has no
        vCard at all (see :meth:`FetchedVCards.keys`)."""
        fetched = await self.fetch_vcards(bare_jid)
        try:
            return fetched.keys()
        except VCardError as exc:
            raise XmppError(f"the vCard of {bare_jid} is unusable: {exc}") from exc

    # -- writing ------------------------------------------------------------

    async def put_vcard(self, vcard_xml: bytes) -> None:
        """Store this vCard as the account's own, as is, in its own form:
        vcard-temp with an IQ set, vCard4 on PEP (access model ``open``)."""
        elem = _parse_own(vcard_xml)
        if elem.tag == f"{{{VCARD_TEMP_NS}}}vCard":
            await self._put(elem, "vcard-temp")
        elif elem.tag == f"{{{VCARD4_NS}}}vcard":
            await self._publish_vcard4(elem)
        else:
            raise VCardError(f"not a vCard: {elem.tag!r}")

    async def _put(self, elem: ET.Element, what: str) -> None:
        try:
            await self._iq("set", elem, None)
        except IqError as exc:
            raise XmppError(f"the server refused the {what} of {self.jid}: {exc.condition}") from None

    def _publish_iq(self, elem: ET.Element) -> ET.Element:
        pubsub = _el(f"{{{_PUBSUB_NS}}}pubsub")
        publish = ET.SubElement(pubsub, f"{{{_PUBSUB_NS}}}publish", {"node": VCARD4_NODE})
        item = ET.SubElement(publish, f"{{{_PUBSUB_NS}}}item", {"id": "current"})
        item.append(elem)
        options = ET.SubElement(pubsub, f"{{{_PUBSUB_NS}}}publish-options")
        options.append(
            _form(f"{_PUBSUB_NS}#publish-options", {"pubsub#access_model": "open"})
        )
        return pubsub

    async def _publish_vcard4(self, elem: ET.Element) -> None:
        try:
            await self._iq("set", self._publish_iq(elem), None)
            return
        except IqError as exc:
            if str(exc.condition) not in ("conflict", "precondition-not-met"):
                raise XmppError(
                    f"the server refused the vCard4 of {self.jid}: {exc.condition}"
                ) from None
        # The node exists with another access model (a client created it
        # with the default, usually "presence"): open it, then publish.
        logger.info("setting the access model of %s's %s to open", self.jid, VCARD4_NODE)
        owner = _el(f"{{{_PUBSUB_OWNER_NS}}}pubsub")
        configure = ET.SubElement(owner, f"{{{_PUBSUB_OWNER_NS}}}configure", {"node": VCARD4_NODE})
        configure.append(_form(f"{_PUBSUB_NS}#node_config", {"pubsub#access_model": "open"}))
        try:
            await self._iq("set", owner, None)
            await self._iq("set", self._publish_iq(elem), None)
        except IqError as exc:
            raise XmppError(
                f"cannot publish the vCard4 of {self.jid} readable by all: {exc.condition}"
            ) from None

    async def _choose_format(self, fmt: PublishFormat) -> VCardFormat:
        offered = await self.vcard4_offered()
        if fmt == "auto":
            return "vcard4" if offered else "vcard-temp"
        if fmt == "vcard-temp" and offered:
            raise XmppError(
                "this server keeps vCard4 and translates vcard-temp into it, dropping "
                "KEY: writing vcard-temp would remove every device's key; use vcard4 "
                "(or auto)"
            )
        return fmt

    async def publish_key(self, key: bytes, *, fmt: PublishFormat = "auto") -> KeyChange:
        """Add ``key`` to the account's own vCard in the form the server
        keeps (``auto``), keeping every other field and key. Idempotent:
        nothing is written when the key is already there. The result is
        read back; a server that drops the key raises :class:`XmppError`."""
        target = await self._choose_format(fmt)
        bare = self.jid.full
        fetched = await self.fetch_vcards(bare)
        current = fetched.vcard4 if target == "vcard4" else fetched.vcard_temp
        base = current if current is not None else new_vcard(bare, target)
        updated = add_key(base, key, fmt=target)
        written: tuple[VCardFormat, ...] = ()
        if current is None or updated != current:
            await self.put_vcard(updated)
            written = (target,)
            fetched = await self.fetch_vcards(bare)
        keys = fetched.keys() or frozenset()
        if bytes(key) not in keys:
            raise XmppError(
                f"the server accepted the {target} of {bare} but the key is not in it when "
                f"read back: this server does not keep a {target} KEY"
            )
        logger.info("key %s for %s (%s)", "published" if written else "already present", bare,
                    target)
        return KeyChange(bare, written, keys)

    async def revoke_key(self, key: bytes) -> KeyChange:
        """Remove ``key`` from every vCard form of the own account that
        lists it; nothing else changes. Idempotent."""
        bare = self.jid.full
        fetched = await self.fetch_vcards(bare)
        written: list[VCardFormat] = []
        offered = await self.vcard4_offered()
        forms: list[tuple[VCardFormat, bytes | None]] = [("vcard4", fetched.vcard4)]
        # A translated vcard-temp (vCard4 server) is never written back: it
        # would replace the vCard4 (and it cannot hold a KEY anyway).
        if not offered:
            forms.append(("vcard-temp", fetched.vcard_temp))
        for form, doc in forms:
            if doc is None:
                continue
            updated = remove_key(doc, key)
            if updated != doc:
                await self.put_vcard(updated)
                written.append(form)
        if written:
            fetched = await self.fetch_vcards(bare)
        keys = fetched.keys() or frozenset()
        if bytes(key) in keys:
            raise XmppError(f"the key is still listed in a vCard of {bare} after revoking it")
        logger.info("key %s for %s", "revoked" if written else "was not listed", bare)
        return KeyChange(bare, tuple(written), keys)


@asynccontextmanager
async def open_xmpp_client(
    jid: str | JID, password: str, *, config: XmppConfig | None = None
) -> AsyncIterator[XmppClient]:
    """A logged-in :class:`XmppClient`, closed on leaving the block."""
    client = XmppClient(jid, password, config=config)
    await client.connect()
    try:
        yield client
    finally:
        await client.close()
