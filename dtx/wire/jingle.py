"""Jingle signalling payloads (XEP-0166) ⇄ frozen dataclasses.

What dtx writes inside an ``<iq/>`` to a peer's full JID, through the
account's own XMPP server, to set up a session (``docs/protocol.md``,
section 12):

* ``<jingle xmlns='urn:xmpp:jingle:1' action=… sid=…>`` (XEP-0166) with one
  ``<content>``: the application ``urn:xmpp:jingle:apps:xmlstream:0``
  (XEP-0247, an XML stream between two full JIDs) and the ICE-UDP transport
  ``urn:xmpp:jingle:transports:ice-udp:1`` (XEP-0176);
* in the transport: ``ufrag``/``pwd`` (the key material of dtx's PROBE
  frames, :func:`derive_probe_material`), ``<candidate/>`` elements (host,
  server-reflexive, relay), the QUIC certificate's fingerprint as XEP-0320
  writes it, and dtx's own ``<device xmlns='urn:xmpp:dtx:0'/>``: the ALPN
  and an Ed25519 signature by the device key binding the fingerprint to the
  device (:func:`device_signing_input`);
* in a ``session-terminate``: a ``<reason/>``.

Elements are :mod:`xml.etree.ElementTree` elements in Clark notation, as
:mod:`dtx.stanza` builds stanzas. :func:`decode_jingle` raises only
:class:`~dtx.errors.DecodeError`; unknown attributes and foreign children
are ignored (XMPP's extensibility), known ones must be well-formed. JIDs are
carried as strings here: the signalling machine parses and checks them.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Final
from xml.etree.ElementTree import Element, SubElement

from dtx.errors import DecodeError
from dtx.wire.xml import decode_count

__all__ = [
    "NS_DTLS",
    "NS_DTX",
    "NS_ICE_UDP",
    "NS_JINGLE",
    "NS_JINGLE_ERRORS",
    "NS_STANZAS",
    "NS_XMLSTREAM",
    "Action",
    "CandidateType",
    "Content",
    "Creator",
    "DeviceProof",
    "Fingerprint",
    "IceCandidate",
    "IceUdpTransport",
    "Jingle",
    "JingleCondition",
    "JingleReason",
    "Reason",
    "Setup",
    "StanzaError",
    "candidate_priority",
    "decode_fingerprint_text",
    "decode_jingle",
    "decode_stanza_error",
    "derive_probe_material",
    "device_signing_input",
    "encode_fingerprint_text",
    "encode_jingle",
    "encode_stanza_error",
    "jingle_child",
]

NS_JINGLE: Final = "urn:xmpp:jingle:1"
NS_JINGLE_ERRORS: Final = "urn:xmpp:jingle:errors:1"
NS_ICE_UDP: Final = "urn:xmpp:jingle:transports:ice-udp:1"
NS_DTLS: Final = "urn:xmpp:jingle:apps:dtls:0"
NS_XMLSTREAM: Final = "urn:xmpp:jingle:apps:xmlstream:0"
NS_DTX: Final = "urn:xmpp:dtx:0"
NS_STANZAS: Final = "urn:ietf:params:xml:ns:xmpp-stanzas"
_NS_CLIENT: Final = "jabber:client"

JINGLE: Final = f"{{{NS_JINGLE}}}jingle"
_CONTENT: Final = f"{{{NS_JINGLE}}}content"
_REASON: Final = f"{{{NS_JINGLE}}}reason"
_TEXT: Final = f"{{{NS_JINGLE}}}text"
_SID: Final = f"{{{NS_JINGLE}}}sid"
_TRANSPORT: Final = f"{{{NS_ICE_UDP}}}transport"
_CANDIDATE: Final = f"{{{NS_ICE_UDP}}}candidate"
_FINGERPRINT: Final = f"{{{NS_DTLS}}}fingerprint"
_DEVICE: Final = f"{{{NS_DTX}}}device"

MAX_CONTENTS: Final = 4
MAX_CANDIDATES: Final = 32
"""Candidates one ``<transport/>`` may hold; more do not decode."""
MAX_JID_CHARS: Final = 3071
MAX_TEXT_CHARS: Final = 1024
MAX_FOREIGN: Final = 8
"""Foreign children of ``<jingle/>`` whose names are kept (the rest are
ignored all the same)."""

_SIGNING_CONTEXT: Final = b"dtx-jingle-device-v1\x00"
_INTRO_CONTEXT: Final = b"dtx-jingle-intro-v1\x00"
_PROBE_KEY_CONTEXT: Final = b"dtx-jingle-probe-key-v1\x00"

_SID_RE: Final = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_ID_RE: Final = re.compile(r"[A-Za-z0-9._-]{1,64}")
_ICE_CHARS: Final = r"A-Za-z0-9+/"
_UFRAG_RE: Final = re.compile(f"[{_ICE_CHARS}]{{4,256}}")
_PWD_RE: Final = re.compile(f"[{_ICE_CHARS}]{{22,256}}")
_FOUNDATION_RE: Final = re.compile(f"[{_ICE_CHARS}]{{1,32}}")
_TOKEN_RE: Final = re.compile(r"[A-Za-z0-9._+-]{1,64}")
_ALPN_RE: Final = re.compile(r"[\x21-\x7e]{1,255}")
_HEX_BYTE_RE: Final = re.compile(r"[0-9A-Fa-f]{2}")


class Action(StrEnum):
    """The actions XEP-0166 defines; any other value does not decode."""

    CONTENT_ACCEPT = "content-accept"
    CONTENT_ADD = "content-add"
    CONTENT_MODIFY = "content-modify"
    CONTENT_REJECT = "content-reject"
    CONTENT_REMOVE = "content-remove"
    DESCRIPTION_INFO = "description-info"
    SECURITY_INFO = "security-info"
    SESSION_ACCEPT = "session-accept"
    SESSION_INFO = "session-info"
    SESSION_INITIATE = "session-initiate"
    SESSION_TERMINATE = "session-terminate"
    TRANSPORT_ACCEPT = "transport-accept"
    TRANSPORT_INFO = "transport-info"
    TRANSPORT_REJECT = "transport-reject"
    TRANSPORT_REPLACE = "transport-replace"


class Reason(StrEnum):
    """The defined conditions of a ``<reason/>`` (XEP-0166 section 7.4)."""

    ALTERNATIVE_SESSION = "alternative-session"
    BUSY = "busy"
    CANCEL = "cancel"
    CONNECTIVITY_ERROR = "connectivity-error"
    DECLINE = "decline"
    EXPIRED = "expired"
    FAILED_APPLICATION = "failed-application"
    FAILED_TRANSPORT = "failed-transport"
    GENERAL_ERROR = "general-error"
    GONE = "gone"
    INCOMPATIBLE_PARAMETERS = "incompatible-parameters"
    MEDIA_ERROR = "media-error"
    SECURITY_ERROR = "security-error"
    SUCCESS = "success"
    TIMEOUT = "timeout"
    UNSUPPORTED_APPLICATIONS = "unsupported-applications"
    UNSUPPORTED_TRANSPORTS = "unsupported-transports"


class JingleCondition(StrEnum):
    """Jingle-specific error conditions (``urn:xmpp:jingle:errors:1``)."""

    OUT_OF_ORDER = "out-of-order"
    TIE_BREAK = "tie-break"
    UNKNOWN_SESSION = "unknown-session"
    UNSUPPORTED_INFO = "unsupported-info"


class CandidateType(StrEnum):
    """ICE candidate types (RFC 8445); XEP-0176's ``type`` attribute."""

    HOST = "host"
    PRFLX = "prflx"
    SRFLX = "srflx"
    RELAY = "relay"


class Setup(StrEnum):
    """RFC 4145's setup role, XEP-0320's ``setup`` attribute. dtx's
    initiator is the QUIC client (``active``), its responder the QUIC server
    (``passive``)."""

    ACTIVE = "active"
    PASSIVE = "passive"
    ACTPASS = "actpass"


class Creator(StrEnum):
    INITIATOR = "initiator"
    RESPONDER = "responder"


_TYPE_PREFERENCE: Final = {CandidateType.HOST: 126, CandidateType.PRFLX: 110,
                           CandidateType.SRFLX: 100, CandidateType.RELAY: 0}


def candidate_priority(type_: CandidateType, local_preference: int, component: int = 1) -> int:
    """RFC 8445 section 5.1.2.1: ``2^24·type + 2^8·local + (256 − component)``,
    with the recommended type preferences (host 126, prflx 110, srflx 100,
    relay 0); ``local_preference`` is 0–65535."""
    local = max(0, min(0xFFFF, local_preference))
    return (_TYPE_PREFERENCE[type_] << 24) | (local << 8) | (256 - component)


# -- the dataclasses ------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class IceCandidate:
    """One XEP-0176 ``<candidate/>``."""

    component: int = 1
    foundation: str
    generation: int = 0
    id: str
    ip: str
    port: int
    priority: int
    protocol: str = "udp"
    type: CandidateType
    network: int | None = None
    rel_addr: str | None = None
    rel_port: int | None = None


@dataclass(frozen=True)
class Fingerprint:
    """XEP-0320's ``<fingerprint/>``: ``hash`` names the function (RFC 4572
    names: ``sha-256``), ``digest`` is the hash of the certificate's DER."""

    hash: str
    setup: Setup
    digest: bytes


@dataclass(frozen=True)
class DeviceProof:
    """dtx's ``<device xmlns='urn:xmpp:dtx:0'/>``: the ALPN the sender speaks,
    its device key (raw 32 bytes) and its signature over
    :func:`device_signing_input`."""

    alpn: str
    key: bytes
    signature: bytes


@dataclass(frozen=True, kw_only=True)
class IceUdpTransport:
    """XEP-0176's ``<transport/>`` with what dtx puts in it."""

    ufrag: str | None = None
    pwd: str | None = None
    candidates: tuple[IceCandidate, ...] = ()
    fingerprint: Fingerprint | None = None
    device: DeviceProof | None = None


@dataclass(frozen=True, kw_only=True)
class Content:
    """One ``<content/>``. ``description`` and ``transport_ns`` are the
    namespaces of its ``<description/>`` and ``<transport/>`` (None: absent);
    ``transport`` is decoded only when it is ICE-UDP."""

    creator: Creator = Creator.INITIATOR
    name: str
    senders: str | None = None
    description: str | None = None
    transport_ns: str | None = None
    transport: IceUdpTransport | None = None


@dataclass(frozen=True)
class JingleReason:
    condition: Reason
    text: str | None = None
    alternative_sid: str | None = None


@dataclass(frozen=True, kw_only=True)
class Jingle:
    """One ``<jingle/>`` element. ``foreign`` names (Clark notation) the
    first :data:`MAX_FOREIGN` children that are none of the known ones: a
    ``session-info`` payload dtx does not know, say."""

    action: Action
    sid: str
    initiator: str | None = None
    responder: str | None = None
    contents: tuple[Content, ...] = ()
    reason: JingleReason | None = None
    foreign: tuple[str, ...] = ()


# -- encoding ---------------------------------------------------------------------


def _set(el: Element, name: str, value: str | int | None) -> None:
    if value is not None:
        el.set(name, str(value))


def encode_fingerprint_text(digest: bytes) -> str:
    """``02:1A:CC:…``: upper-case hex bytes joined by ``:`` (RFC 4572)."""
    return ":".join(f"{b:02X}" for b in digest)


def _encode_candidate(parent: Element, c: IceCandidate) -> None:
    el = SubElement(parent, _CANDIDATE)
    for name, value in (("component", c.component), ("foundation", c.foundation),
                        ("generation", c.generation), ("id", c.id), ("ip", c.ip),
                        ("network", c.network), ("port", c.port), ("priority", c.priority),
                        ("protocol", c.protocol), ("rel-addr", c.rel_addr),
                        ("rel-port", c.rel_port), ("type", c.type.value)):
        _set(el, name, value)


def _encode_transport(parent: Element, t: IceUdpTransport) -> None:
    el = SubElement(parent, _TRANSPORT)
    _set(el, "pwd", t.pwd)
    _set(el, "ufrag", t.ufrag)
    if t.fingerprint is not None:
        fp = SubElement(el, _FINGERPRINT, {"hash": t.fingerprint.hash,
                                           "setup": t.fingerprint.setup.value})
        fp.text = encode_fingerprint_text(t.fingerprint.digest)
    if t.device is not None:
        SubElement(el, _DEVICE, {
            "alpn": t.device.alpn,
            "key": base64.b64encode(t.device.key).decode("ascii"),
            "signature": base64.b64encode(t.device.signature).decode("ascii"),
        })
    for c in t.candidates:
        _encode_candidate(el, c)


def encode_jingle(j: Jingle) -> Element:
    """The ``<jingle/>`` element for ``j`` (put it in an iq with
    :func:`dtx.stanza.iq`)."""
    el = Element(JINGLE, {"action": j.action.value})
    _set(el, "initiator", j.initiator)
    _set(el, "responder", j.responder)
    el.set("sid", j.sid)
    for c in j.contents:
        content = SubElement(el, _CONTENT, {"creator": c.creator.value, "name": c.name})
        _set(content, "senders", c.senders)
        if c.description is not None:
            SubElement(content, f"{{{c.description}}}description")
        if c.transport is not None:
            _encode_transport(content, c.transport)
        elif c.transport_ns is not None:
            SubElement(content, f"{{{c.transport_ns}}}transport")
    if j.reason is not None:
        reason = SubElement(el, _REASON)
        cond = SubElement(reason, f"{{{NS_JINGLE}}}{j.reason.condition.value}")
        if j.reason.alternative_sid is not None:
            SubElement(cond, _SID).text = j.reason.alternative_sid
        if j.reason.text:
            SubElement(reason, _TEXT).text = j.reason.text
    return el


# -- decoding ---------------------------------------------------------------------


def _short(value: str) -> str:
    return repr(value[:40] + ("…" if len(value) > 40 else ""))


def _attr(el: Element, name: str) -> str:
    value = el.get(name)
    if value is None:
        raise DecodeError(f"<{_local(el.tag)}/> without {name}")
    return value


def _text(el: Element, name: str, pattern: re.Pattern[str] | None = None,
          *, max_chars: int = 256) -> str:
    value = _attr(el, name)
    if pattern is not None:
        if pattern.fullmatch(value) is None:
            raise DecodeError(f"<{_local(el.tag)}/> {name} {_short(value)} is malformed")
    elif not value or len(value) > max_chars:
        raise DecodeError(f"<{_local(el.tag)}/> {name} is empty or too long")
    return value


def _opt_text(el: Element, name: str, pattern: re.Pattern[str] | None = None,
              *, max_chars: int = 256) -> str | None:
    return None if el.get(name) is None else _text(el, name, pattern, max_chars=max_chars)


def _int(el: Element, name: str, low: int, high: int) -> int:
    value = _attr(el, name)
    n = decode_count(value, high)
    if n is None or n < low:
        raise DecodeError(f"<{_local(el.tag)}/> {name} {_short(value)} is not in {low}–{high}")
    return n


def _opt_int(el: Element, name: str, low: int, high: int) -> int | None:
    return None if el.get(name) is None else _int(el, name, low, high)


def _ip(el: Element, name: str) -> str:
    value = _attr(el, name)
    if len(value) > 45 or "%" in value:
        raise DecodeError(f"<{_local(el.tag)}/> {name} {_short(value)} is not an IP address")
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise DecodeError(f"<{_local(el.tag)}/> {name} {_short(value)} is not an IP "
                          f"address") from None


def _opt_ip(el: Element, name: str) -> str | None:
    return None if el.get(name) is None else _ip(el, name)


def _local(tag: object) -> str:
    return str(tag).rpartition("}")[2]


def _namespace(tag: object) -> str | None:
    text = str(tag)
    if text[:1] != "{":
        return None
    return text[1:].partition("}")[0]


def _b64(el: Element, name: str, size: int) -> bytes:
    value = _text(el, name, max_chars=4 * size)
    try:
        data = base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        raise DecodeError(f"<{_local(el.tag)}/> {name} is not base64") from None
    if len(data) != size:
        raise DecodeError(f"<{_local(el.tag)}/> {name} is {len(data)} bytes, not {size}")
    return data


def decode_fingerprint_text(text: str) -> bytes:
    """The bytes of ``02:1A:…`` (hex, any case, surrounding whitespace
    ignored): 1–64 bytes."""
    parts = text.strip().split(":")
    if not 1 <= len(parts) <= 64 or any(_HEX_BYTE_RE.fullmatch(p) is None for p in parts):
        raise DecodeError("a fingerprint is 1–64 hex bytes joined by ':'")
    return bytes(int(p, 16) for p in parts)


def _decode_candidate(el: Element) -> IceCandidate:
    type_text = el.get("type")
    try:
        type_ = CandidateType(type_text or "")
    except ValueError:
        raise DecodeError(f"candidate type {_short(type_text or '')} is unknown") from None
    return IceCandidate(
        component=_int(el, "component", 1, 256),
        foundation=_text(el, "foundation", _FOUNDATION_RE),
        generation=_int(el, "generation", 0, 255),
        id=_text(el, "id", _ID_RE),
        ip=_ip(el, "ip"),
        port=_int(el, "port", 1, 65535),
        priority=_int(el, "priority", 1, 0xFFFFFFFF),
        protocol=_text(el, "protocol", _TOKEN_RE).lower(),
        type=type_,
        network=_opt_int(el, "network", 0, 255),
        rel_addr=_opt_ip(el, "rel-addr"),
        rel_port=_opt_int(el, "rel-port", 0, 65535),
    )


def _only(el: Element, tag: str) -> Element | None:
    found: Element | None = None
    for child in el:
        if child.tag == tag:
            if found is not None:
                raise DecodeError(f"more than one <{_local(tag)}/> in <{_local(el.tag)}/>")
            found = child
    return found


def _decode_transport(el: Element) -> IceUdpTransport:
    ufrag = _opt_text(el, "ufrag", _UFRAG_RE)
    pwd = _opt_text(el, "pwd", _PWD_RE)
    fingerprint: Fingerprint | None = None
    fp = _only(el, _FINGERPRINT)
    if fp is not None:
        hash_name = _text(fp, "hash", _TOKEN_RE)
        setup_text = fp.get("setup") or ""
        try:
            setup = Setup(setup_text)
        except ValueError:
            raise DecodeError(f"fingerprint setup {_short(setup_text)} is unknown") from None
        fingerprint = Fingerprint(hash_name.lower(), setup, decode_fingerprint_text(fp.text or ""))
    device: DeviceProof | None = None
    dev = _only(el, _DEVICE)
    if dev is not None:
        alpn = _text(dev, "alpn", _ALPN_RE)
        device = DeviceProof(alpn, _b64(dev, "key", 32), _b64(dev, "signature", 64))
    candidates: list[IceCandidate] = []
    for child in el:
        if child.tag == _CANDIDATE:
            if len(candidates) == MAX_CANDIDATES:
                raise DecodeError(f"more than {MAX_CANDIDATES} candidates")
            candidates.append(_decode_candidate(child))
    if candidates and (ufrag is None or pwd is None):
        raise DecodeError("candidates without the transport's ufrag and pwd (XEP-0176)")
    return IceUdpTransport(ufrag=ufrag, pwd=pwd, candidates=tuple(candidates),
                           fingerprint=fingerprint, device=device)


def _decode_content(el: Element) -> Content:
    creator_text = el.get("creator") or ""
    try:
        creator = Creator(creator_text)
    except ValueError:
        raise DecodeError(f"content creator {_short(creator_text)} is unknown") from None
    name = _text(el, "name")
    description: str | None = None
    transport_el: Element | None = None
    for child in el:
        local = _local(child.tag)
        if local == "description":
            if description is not None:
                raise DecodeError("more than one <description/> in <content/>")
            description = _namespace(child.tag) or ""
        elif local == "transport":
            if transport_el is not None:
                raise DecodeError("more than one <transport/> in <content/>")
            transport_el = child
    transport_ns = None if transport_el is None else _namespace(transport_el.tag) or ""
    transport = _decode_transport(transport_el) if transport_el is not None \
        and transport_el.tag == _TRANSPORT else None
    return Content(creator=creator, name=name,
                   senders=_opt_text(el, "senders", _TOKEN_RE),
                   description=description, transport_ns=transport_ns, transport=transport)


def _decode_reason(el: Element) -> JingleReason:
    condition: Reason | None = None
    text: str | None = None
    alternative: str | None = None
    for child in el:
        if child.tag == _TEXT:
            text = (child.text or "")[:MAX_TEXT_CHARS] or None
            continue
        if _namespace(child.tag) != NS_JINGLE:
            continue
        try:
            found = Reason(_local(child.tag))
        except ValueError:
            continue
        if condition is not None:
            raise DecodeError("a <reason/> with two conditions")
        condition = found
        if found is Reason.ALTERNATIVE_SESSION:
            sid = child.find(_SID)
            if sid is not None:
                alternative = (sid.text or "").strip()
                if _SID_RE.fullmatch(alternative) is None:
                    raise DecodeError("alternative-session with a malformed sid")
    if condition is None:
        raise DecodeError("a <reason/> without a defined condition")
    return JingleReason(condition, text, alternative)


def decode_jingle(el: Element) -> Jingle:
    """The :class:`Jingle` an ``<jingle xmlns='urn:xmpp:jingle:1'/>``
    element holds; :class:`DecodeError` when it is not one, or a known part
    is malformed."""
    if not isinstance(el, Element) or el.tag != JINGLE:
        raise DecodeError("not a <jingle xmlns='urn:xmpp:jingle:1'/> element")
    action_text = el.get("action") or ""
    try:
        action = Action(action_text)
    except ValueError:
        raise DecodeError(f"jingle action {_short(action_text)} is not defined") from None
    sid = _text(el, "sid", _SID_RE)
    contents: list[Content] = []
    reason: JingleReason | None = None
    foreign: list[str] = []
    for child in el:
        if child.tag == _CONTENT:
            if len(contents) == MAX_CONTENTS:
                raise DecodeError(f"more than {MAX_CONTENTS} contents")
            contents.append(_decode_content(child))
        elif child.tag == _REASON:
            if reason is not None:
                raise DecodeError("more than one <reason/>")
            reason = _decode_reason(child)
        elif len(foreign) < MAX_FOREIGN:
            foreign.append(str(child.tag))
    return Jingle(
        action=action,
        sid=sid,
        initiator=_opt_text(el, "initiator", max_chars=MAX_JID_CHARS),
        responder=_opt_text(el, "responder", max_chars=MAX_JID_CHARS),
        contents=tuple(contents),
        reason=reason,
        foreign=tuple(foreign),
    )


def jingle_child(iq: Element) -> Element | None:
    """The ``<jingle/>`` child of an iq, or None."""
    for child in iq:
        if child.tag == JINGLE:
            return child
    return None


# -- stanza errors with Jingle conditions -------------------------------------------


@dataclass(frozen=True)
class StanzaError:
    """An iq error's ``<error/>``: its ``type``, its defined condition
    (``service-unavailable`` ...) and the Jingle condition, if any."""

    type: str
    condition: str
    jingle: JingleCondition | None = None


def encode_stanza_error(err: StanzaError) -> Element:
    """The ``<error/>`` element (RFC 6120 section 8.3) for ``err``; nothing
    else, no text: an error tells the other side only its condition."""
    el = Element(f"{{{_NS_CLIENT}}}error", {"type": err.type})
    SubElement(el, f"{{{NS_STANZAS}}}{err.condition}")
    if err.jingle is not None:
        SubElement(el, f"{{{NS_JINGLE_ERRORS}}}{err.jingle.value}")
    return el


def decode_stanza_error(iq: Element) -> StanzaError:
    """The error an iq of type ``error`` carries; an error without one reads
    as ``undefined-condition`` (never raises)."""
    for child in iq:
        if _local(child.tag) != "error":
            continue
        condition = "undefined-condition"
        jingle: JingleCondition | None = None
        for part in child:
            ns = _namespace(part.tag)
            if ns == NS_STANZAS and _local(part.tag) != "text" \
                    and condition == "undefined-condition":
                condition = _local(part.tag)[:64]
            elif ns == NS_JINGLE_ERRORS:
                try:
                    jingle = JingleCondition(_local(part.tag))
                except ValueError:
                    pass
        return StanzaError((child.get("type") or "")[:16], condition, jingle)
    return StanzaError("", "undefined-condition")


# -- what the signature covers, and the probe keys ------------------------------------


def _field(data: str | bytes) -> bytes:
    raw = data.encode("utf-8") if isinstance(data, str) else data
    if len(raw) > 0xFFFF:
        raise DecodeError("a signed field is longer than 65,535 bytes")
    return len(raw).to_bytes(2, "big") + raw


def _join(context: bytes, fields: Iterable[str | bytes]) -> bytes:
    return context + b"".join(_field(f) for f in fields)


def device_signing_input(*, role: Creator, sid: str, initiator: str, responder: str,
                         fingerprint: Fingerprint, alpn: str, ufrag: str, pwd: str) -> bytes:
    """What a ``<device/>`` signature covers: ``"dtx-jingle-device-v1" 0x00``
    then, each as ``u16 length ‖ UTF-8 bytes``, the signer's role, the sid,
    the initiator's and responder's full JIDs (normalised), the fingerprint's
    hash name, setup and digest (raw bytes), the ALPN, and the signer's own
    ufrag and pwd."""
    return _join(_SIGNING_CONTEXT, (role.value, sid, initiator, responder, fingerprint.hash,
                                    fingerprint.setup.value, fingerprint.digest, alpn,
                                    ufrag, pwd))


def derive_probe_material(sid: str, initiator: tuple[str, str],
                          responder: tuple[str, str]) -> tuple[bytes, bytes]:
    """``(intro, probe_key)`` of a session from the sid and each side's
    ``(ufrag, pwd)``, for dtx's PROBE frames (``docs/protocol.md`` section
    9): ``intro`` = SHA-256(``"dtx-jingle-intro-v1" 0x00`` ‖ fields)[:8] over
    sid, initiator ufrag, responder ufrag; ``probe_key`` = SHA-256(
    ``"dtx-jingle-probe-key-v1" 0x00`` ‖ fields) over sid, initiator ufrag
    and pwd, responder ufrag and pwd; fields as in
    :func:`device_signing_input`."""
    intro = hashlib.sha256(_join(_INTRO_CONTEXT, (sid, initiator[0], responder[0]))).digest()
    key = hashlib.sha256(_join(_PROBE_KEY_CONTEXT, (sid, *initiator, *responder))).digest()
    return intro[:8], key
