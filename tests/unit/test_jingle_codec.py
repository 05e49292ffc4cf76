"""Jingle codec (dtx.wire.jingle): golden XML, round trips, refusals, fuzz."""

from __future__ import annotations

import copy
from collections.abc import Callable
from xml.etree.ElementTree import Element, SubElement, fromstring

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dtx.errors import DecodeError
from dtx.identity import DeviceIdentity, verify_signature
from dtx.stanza import iq
from dtx.wire.jingle import (
    JINGLE,
    NS_DTLS,
    NS_DTX,
    NS_ICE_UDP,
    NS_JINGLE,
    NS_JINGLE_ERRORS,
    NS_STANZAS,
    NS_XMLSTREAM,
    Action,
    CandidateType,
    Content,
    Creator,
    DeviceProof,
    Fingerprint,
    IceCandidate,
    IceUdpTransport,
    Jingle,
    JingleCondition,
    JingleReason,
    Reason,
    Setup,
    StanzaError,
    candidate_priority,
    decode_fingerprint_text,
    decode_jingle,
    decode_stanza_error,
    derive_probe_material,
    device_signing_input,
    encode_fingerprint_text,
    encode_jingle,
    encode_stanza_error,
    jingle_child,
)
from dtx.wire.xml import encode_stanza
from tests.conftest import fuzz_examples

A = DeviceIdentity.from_private_bytes("romeo@montague.example/orchard", bytes(range(32)))
B = DeviceIdentity.from_private_bytes("juliet@capulet.example/balcony", bytes(range(32, 64)))
SID = "8f1c2a9e4b7d6035a1e2f3c4d5b6a798"
FP_A = bytes.fromhex("021acc5427abeb9c533f3e4b652e7d463f5442cd54f17a03a27df9b07f4619b2")
FP_B = bytes.fromhex("bde82cd3bdb69850457d5b368953311552258882069588a33da5438d5c212166")
UF_A, PW_A = "8hhyQ2k+", "asd88fgpdd777uzjYhagZg/F"
UF_B, PW_B = "9uB6x/Lp", "YH75Fviy6338Vbrhrlp8YhQ2"
FPR_A = Fingerprint("sha-256", Setup.ACTIVE, FP_A)
FPR_B = Fingerprint("sha-256", Setup.PASSIVE, FP_B)


def proof(ident: DeviceIdentity, role: Creator, fp: Fingerprint, ufrag: str, pwd: str) -> DeviceProof:
    data = device_signing_input(role=role, sid=SID, initiator=A.jid.full, responder=B.jid.full,
                                fingerprint=fp, alpn="dtx/1", ufrag=ufrag, pwd=pwd)
    return DeviceProof("dtx/1", ident.public_key, ident.sign(data))


HOST = IceCandidate(foundation="1d2a5b9c", id="8f1c2a9ec1", ip="192.168.1.20", port=40000,
                    priority=candidate_priority(CandidateType.HOST, 65534), type=CandidateType.HOST)
SRFLX = IceCandidate(foundation="7e3f0a12", id="8f1c2a9ec2", ip="203.0.113.7", port=61002,
                     priority=candidate_priority(CandidateType.SRFLX, 65533),
                     type=CandidateType.SRFLX, rel_addr="192.168.1.20", rel_port=40000)
RELAY = IceCandidate(foundation="55aa0c3d", id="8f1c2a9ec1", ip="198.51.100.9", port=49170,
                     priority=candidate_priority(CandidateType.RELAY, 65534),
                     type=CandidateType.RELAY, rel_addr="198.51.100.40", rel_port=53112)
HOST6 = IceCandidate(foundation="3c4d9e01", id="8f1c2a9ec3", ip="2001:db8::20", port=40000,
                     priority=candidate_priority(CandidateType.HOST, 65532), type=CandidateType.HOST)


def contents(t: IceUdpTransport, *, description: bool = True) -> tuple[Content, ...]:
    return (Content(name="xmlstream", senders="both" if description else None,
                    description=NS_XMLSTREAM if description else None, transport_ns=NS_ICE_UDP,
                    transport=t),)


INITIATE = Jingle(action=Action.SESSION_INITIATE, sid=SID, initiator=A.jid.full, contents=contents(
    IceUdpTransport(ufrag=UF_A, pwd=PW_A, candidates=(HOST, SRFLX), fingerprint=FPR_A,
                    device=proof(A, Creator.INITIATOR, FPR_A, UF_A, PW_A))))
ACCEPT = Jingle(action=Action.SESSION_ACCEPT, sid=SID, responder=B.jid.full, contents=contents(
    IceUdpTransport(ufrag=UF_B, pwd=PW_B, candidates=(RELAY,), fingerprint=FPR_B,
                    device=proof(B, Creator.RESPONDER, FPR_B, UF_B, PW_B))))
PING = Jingle(action=Action.SESSION_INFO, sid=SID)
TRICKLE = Jingle(action=Action.TRANSPORT_INFO, sid=SID, contents=contents(
    IceUdpTransport(ufrag=UF_A, pwd=PW_A, candidates=(HOST6,)), description=False))
TERMINATE = Jingle(action=Action.SESSION_TERMINATE, sid=SID, reason=JingleReason(
    Reason.SECURITY_ERROR, "fingerprint not bound to a published device key"))

_HEAD_AB = ("<iq type='set' id='{id}' to='juliet@capulet.example/balcony' "
            "from='romeo@montague.example/orchard'>")
_HEAD_BA = ("<iq type='set' id='{id}' to='romeo@montague.example/orchard' "
            "from='juliet@capulet.example/balcony'>")

GOLDEN: dict[str, tuple[Jingle, DeviceIdentity, DeviceIdentity, str, str]] = {
    "session-initiate": (INITIATE, A, B, "dtxj-5f0e3c2b1a496887", (
        _HEAD_AB.format(id="dtxj-5f0e3c2b1a496887")
        + "<jingle xmlns='urn:xmpp:jingle:1' action='session-initiate' "
        "initiator='romeo@montague.example/orchard' sid='8f1c2a9e4b7d6035a1e2f3c4d5b6a798'>"
        "<content creator='initiator' name='xmlstream' senders='both'>"
        "<description xmlns='urn:xmpp:jingle:apps:xmlstream:0'/>"
        "<transport xmlns='urn:xmpp:jingle:transports:ice-udp:1' pwd='asd88fgpdd777uzjYhagZg/F' "
        "ufrag='8hhyQ2k+'>"
        "<fingerprint xmlns='urn:xmpp:jingle:apps:dtls:0' hash='sha-256' setup='active'>"
        "02:1A:CC:54:27:AB:EB:9C:53:3F:3E:4B:65:2E:7D:46:3F:54:42:CD:54:F1:7A:03:A2:7D:F9:B0:"
        "7F:46:19:B2</fingerprint>"
        "<device xmlns='urn:xmpp:dtx:0' alpn='dtx/1' "
        "key='A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg=' "
        "signature='G260vXu3Nnc7tQXxJLwwb2QaZsIeYb1lx3XYwhbhJdwrNKrECXPicE7yX1on4E/dF54aEVjU+ru1"
        "Gg2tTbCPDQ=='/>"
        "<candidate component='1' foundation='1d2a5b9c' generation='0' id='8f1c2a9ec1' "
        "ip='192.168.1.20' port='40000' priority='2130706175' protocol='udp' type='host'/>"
        "<candidate component='1' foundation='7e3f0a12' generation='0' id='8f1c2a9ec2' "
        "ip='203.0.113.7' port='61002' priority='1694498303' protocol='udp' "
        "rel-addr='192.168.1.20' rel-port='40000' type='srflx'/>"
        "</transport></content></jingle></iq>")),
    "session-accept": (ACCEPT, B, A, "dtxj-0c9d8e7f6a5b4c3d", (
        _HEAD_BA.format(id="dtxj-0c9d8e7f6a5b4c3d")
        + "<jingle xmlns='urn:xmpp:jingle:1' action='session-accept' "
        "responder='juliet@capulet.example/balcony' sid='8f1c2a9e4b7d6035a1e2f3c4d5b6a798'>"
        "<content creator='initiator' name='xmlstream' senders='both'>"
        "<description xmlns='urn:xmpp:jingle:apps:xmlstream:0'/>"
        "<transport xmlns='urn:xmpp:jingle:transports:ice-udp:1' pwd='YH75Fviy6338Vbrhrlp8YhQ2' "
        "ufrag='9uB6x/Lp'>"
        "<fingerprint xmlns='urn:xmpp:jingle:apps:dtls:0' hash='sha-256' setup='passive'>"
        "BD:E8:2C:D3:BD:B6:98:50:45:7D:5B:36:89:53:31:15:52:25:88:82:06:95:88:A3:3D:A5:43:8D:"
        "5C:21:21:66</fingerprint>"
        "<device xmlns='urn:xmpp:dtx:0' alpn='dtx/1' "
        "key='Kay64UG8yvCyLhqU000LxzYeUm0L/hLIl5S8kyKWbdc=' "
        "signature='IvyX8WVat3uE+ReZ8aiCYOU7hGbSlBTRz0rDNHyL8FO618NKShsy1Rz8uVdSHpVv4O6jBMtR4Rzn"
        "jHc84kMUBQ=='/>"
        "<candidate component='1' foundation='55aa0c3d' generation='0' id='8f1c2a9ec1' "
        "ip='198.51.100.9' port='49170' priority='16776959' protocol='udp' "
        "rel-addr='198.51.100.40' rel-port='53112' type='relay'/>"
        "</transport></content></jingle></iq>")),
    "session-info": (PING, A, B, "dtxj-77aa66bb55cc44dd", (
        _HEAD_AB.format(id="dtxj-77aa66bb55cc44dd")
        + "<jingle xmlns='urn:xmpp:jingle:1' action='session-info' "
        "sid='8f1c2a9e4b7d6035a1e2f3c4d5b6a798'/></iq>")),
    "transport-info": (TRICKLE, A, B, "dtxj-1029384756abcdef", (
        _HEAD_AB.format(id="dtxj-1029384756abcdef")
        + "<jingle xmlns='urn:xmpp:jingle:1' action='transport-info' "
        "sid='8f1c2a9e4b7d6035a1e2f3c4d5b6a798'><content creator='initiator' name='xmlstream'>"
        "<transport xmlns='urn:xmpp:jingle:transports:ice-udp:1' pwd='asd88fgpdd777uzjYhagZg/F' "
        "ufrag='8hhyQ2k+'>"
        "<candidate component='1' foundation='3c4d9e01' generation='0' id='8f1c2a9ec3' "
        "ip='2001:db8::20' port='40000' priority='2130705663' protocol='udp' type='host'/>"
        "</transport></content></jingle></iq>")),
    "session-terminate": (TERMINATE, B, A, "dtxj-a1b2c3d4e5f60718", (
        _HEAD_BA.format(id="dtxj-a1b2c3d4e5f60718")
        + "<jingle xmlns='urn:xmpp:jingle:1' action='session-terminate' "
        "sid='8f1c2a9e4b7d6035a1e2f3c4d5b6a798'><reason><security-error/>"
        "<text>fingerprint not bound to a published device key</text></reason></jingle></iq>")),
}


def parse_stanza(data: bytes | str) -> Element:
    """A stanza as written for a jabber:client stream, read back."""
    text = data.decode() if isinstance(data, bytes) else data
    return fromstring(f"<s xmlns='jabber:client'>{text}</s>")[0]


def golden_jingle(name: str) -> Element:
    el = jingle_child(parse_stanza(GOLDEN[name][4]))
    assert el is not None
    return el


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_xml(name: str) -> None:
    j, frm, to, rid, expected = GOLDEN[name]
    stanza = iq("set", rid, to=to.jid.full, from_=frm.jid.full, payload=encode_jingle(j))
    assert encode_stanza(stanza).decode() == expected
    assert decode_jingle(golden_jingle(name)) == j


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_round_trip_through_the_serialiser(name: str) -> None:
    j = GOLDEN[name][0]
    child = jingle_child(parse_stanza(encode_stanza(iq("set", "x", payload=encode_jingle(j)))))
    assert child is not None  # (an empty <jingle/> is a falsy Element: test for None)
    assert decode_jingle(child) == j


ROUND_TRIPS = [
    Jingle(action=Action.SESSION_TERMINATE, sid="a", reason=JingleReason(Reason.SUCCESS)),
    Jingle(action=Action.SESSION_TERMINATE, sid="a.b-c_d:e", reason=JingleReason(
        Reason.ALTERNATIVE_SESSION, None, "b84tkkwlmb48kgfb")),
    Jingle(action=Action.SESSION_INFO, sid="z"),
    Jingle(action=Action.CONTENT_ADD, sid="z", contents=(Content(
        creator=Creator.RESPONDER, name="other", description="urn:example:app",
        transport_ns="urn:example:transport"),)),
    Jingle(action=Action.SESSION_INITIATE, sid="q", initiator="a@b/c", contents=contents(
        IceUdpTransport(ufrag="abcd", pwd="a" * 22, candidates=(IceCandidate(
            component=2, foundation="x", generation=3, id="id", ip="::1", port=1, priority=1,
            type=CandidateType.PRFLX, network=7, rel_addr="10.0.0.1", rel_port=0),)))),
]


@pytest.mark.parametrize("j", ROUND_TRIPS, ids=lambda j: f"{j.action.value}-{j.sid}")
def test_round_trip_table(j: Jingle) -> None:
    assert decode_jingle(encode_jingle(j)) == j


def test_signatures_verify_and_cover_every_field() -> None:
    sig = proof(A, Creator.INITIATOR, FPR_A, UF_A, PW_A).signature
    base = dict(role=Creator.INITIATOR, sid=SID, initiator=A.jid.full, responder=B.jid.full,
                fingerprint=FPR_A, alpn="dtx/1", ufrag=UF_A, pwd=PW_A)
    assert verify_signature(A.public_key, sig, device_signing_input(**base))  # type: ignore[arg-type]
    changes: dict[str, object] = {
        "role": Creator.RESPONDER, "sid": SID + "0", "initiator": "romeo@montague.example/x",
        "responder": "juliet@capulet.example/y",
        "fingerprint": Fingerprint("sha-256", Setup.ACTIVE, bytes(32)), "alpn": "dtx/2",
        "ufrag": UF_B, "pwd": PW_B,
    }
    for name, value in changes.items():
        assert not verify_signature(A.public_key, sig, device_signing_input(
            **{**base, name: value})), name  # type: ignore[arg-type]
    assert not verify_signature(B.public_key, sig, device_signing_input(**base))  # type: ignore[arg-type]
    assert not verify_signature(A.public_key, sig, device_signing_input(**{  # type: ignore[arg-type]
        **base, "fingerprint": Fingerprint("sha-256", Setup.PASSIVE, FP_A)}))


def test_signing_input_layout() -> None:
    data = device_signing_input(role=Creator.RESPONDER, sid="s", initiator="a@b/c",
                                responder="d@e/f", fingerprint=Fingerprint("sha-256",
                                                                           Setup.PASSIVE, b"\x01\x02"),
                                alpn="dtx/1", ufrag="uuuu", pwd="p")
    assert data == (b"dtx-jingle-device-v1\x00" b"\x00\x09responder" b"\x00\x01s"
                    b"\x00\x05a@b/c" b"\x00\x05d@e/f" b"\x00\x07sha-256" b"\x00\x07passive"
                    b"\x00\x02\x01\x02" b"\x00\x05dtx/1" b"\x00\x04uuuu" b"\x00\x01p")


def test_probe_material_golden_and_order() -> None:
    intro, key = derive_probe_material(SID, (UF_A, PW_A), (UF_B, PW_B))
    assert intro.hex() == "682ed4fb9c8db7e3"
    assert key.hex() == "334a09e346978079d8d5a177c61f6312c3f2fae5c03bd1d57a45ae20822caf88"
    assert derive_probe_material(SID, (UF_B, PW_B), (UF_A, PW_A)) != (intro, key)
    other_pwd = derive_probe_material(SID, (UF_A, PW_A), (UF_B, PW_A))
    assert other_pwd[0] == intro and other_pwd[1] != key  # intro: ufrags only
    assert derive_probe_material(SID + "x", (UF_A, PW_A), (UF_B, PW_B))[0] != intro


def test_fingerprint_text() -> None:
    assert encode_fingerprint_text(b"\x02\x1a\xff") == "02:1A:FF"
    assert decode_fingerprint_text("  02:1a:Ff\n") == b"\x02\x1a\xff"
    assert decode_fingerprint_text(encode_fingerprint_text(FP_A)) == FP_A
    for bad in ("", "02:1A:", "021A", "02:1A:G0", "2:1A", "02 :1A", ":".join(["00"] * 65),
                "٠٢:1A"):
        with pytest.raises(DecodeError):
            decode_fingerprint_text(bad)


def test_candidate_priority() -> None:
    assert candidate_priority(CandidateType.HOST, 65535) == 2130706431  # XEP-0176's example
    assert candidate_priority(CandidateType.SRFLX, 65535) == 1694498815
    assert candidate_priority(CandidateType.RELAY, 0) == 255
    assert candidate_priority(CandidateType.PRFLX, 1 << 20) == (110 << 24) | (0xFFFF << 8) | 255


# -- refusals: each a change to a golden message that must not decode ------------------


def _find(root: Element, tag: str) -> Element:
    for el in root.iter(tag):
        return el
    raise AssertionError(tag)


_T = f"{{{NS_ICE_UDP}}}transport"
_C = f"{{{NS_ICE_UDP}}}candidate"
_F = f"{{{NS_DTLS}}}fingerprint"
_D = f"{{{NS_DTX}}}device"
_CONTENT = f"{{{NS_JINGLE}}}content"


def _set(tag: str, name: str, value: str | None) -> Callable[[Element], None]:
    def change(root: Element) -> None:
        el = root if tag == JINGLE else _find(root, tag)
        if value is None:
            el.attrib.pop(name, None)
        else:
            el.set(name, value)
    return change


def _dup(tag: str) -> Callable[[Element], None]:
    def change(root: Element) -> None:
        for parent in root.iter():
            for child in list(parent):
                if child.tag == tag:
                    parent.append(copy.deepcopy(child))
                    return
    return change


def _text(tag: str, text: str) -> Callable[[Element], None]:
    def change(root: Element) -> None:
        _find(root, tag).text = text
    return change


def _many_candidates(root: Element) -> None:
    transport = _find(root, _T)
    for i in range(40):
        c = copy.deepcopy(_find(root, _C))
        c.set("port", str(1000 + i))
        transport.append(c)


REFUSALS: dict[str, Callable[[Element], None]] = {
    "no action": _set(JINGLE, "action", None),
    "undefined action": _set(JINGLE, "action", "session-explode"),
    "no sid": _set(JINGLE, "sid", None),
    "sid with a space": _set(JINGLE, "sid", "a b"),
    "sid too long": _set(JINGLE, "sid", "a" * 129),
    "empty initiator": _set(JINGLE, "initiator", ""),
    "creator unknown": _set(_CONTENT, "creator", "both"),
    "content without name": _set(_CONTENT, "name", None),
    "two transports": _dup(_T),
    "two fingerprints": _dup(_F),
    "two devices": _dup(_D),
    "ufrag too short": _set(_T, "ufrag", "abc"),
    "ufrag with =": _set(_T, "ufrag", "abcd="),
    "pwd too short": _set(_T, "pwd", "a" * 21),
    "candidates without pwd": _set(_T, "pwd", None),
    "port 0": _set(_C, "port", "0"),
    "port 65536": _set(_C, "port", "65536"),
    "port signed": _set(_C, "port", "+4000"),
    "port in Arabic digits": _set(_C, "port", "٤٠٠٠"),
    "port missing": _set(_C, "port", None),
    "ip a name": _set(_C, "ip", "host.example"),
    "ip with a zone": _set(_C, "ip", "fe80::1%eth0"),
    "rel-addr a name": _set(_C, "rel-addr", "router"),
    "type unknown": _set(_C, "type", "stun"),
    "component 0": _set(_C, "component", "0"),
    "generation 256": _set(_C, "generation", "256"),
    "priority 0": _set(_C, "priority", "0"),
    "priority 2^32": _set(_C, "priority", str(2**32)),
    "foundation empty": _set(_C, "foundation", ""),
    "id with a space": _set(_C, "id", "a b"),
    "too many candidates": _many_candidates,
    "setup unknown": _set(_F, "setup", "holdconn"),
    "fingerprint not hex": _text(_F, "zz:00"),
    "fingerprint hash missing": _set(_F, "hash", None),
    "key not base64": _set(_D, "key", "!!!!"),
    "key 31 bytes": _set(_D, "key", "A" * 42 + "="),
    "signature 63 bytes": _set(_D, "signature", "A" * 84),
    "alpn with a space": _set(_D, "alpn", "dtx 1"),
    "alpn missing": _set(_D, "alpn", None),
}


@pytest.mark.parametrize("name", sorted(REFUSALS))
def test_refusals(name: str) -> None:
    root = copy.deepcopy(golden_jingle("session-initiate"))
    decode_jingle(root)  # the unchanged message decodes
    REFUSALS[name](root)
    with pytest.raises(DecodeError):
        decode_jingle(root)


@pytest.mark.parametrize("change", [
    lambda r: _find(r, f"{{{NS_JINGLE}}}reason").clear(),
    lambda r: SubElement(_find(r, f"{{{NS_JINGLE}}}reason"), f"{{{NS_JINGLE}}}busy"),
    lambda r: r.append(copy.deepcopy(_find(r, f"{{{NS_JINGLE}}}reason"))),
], ids=["no condition", "two conditions", "two reasons"])
def test_reason_refusals(change: Callable[[Element], None]) -> None:
    root = copy.deepcopy(golden_jingle("session-terminate"))
    change(root)
    with pytest.raises(DecodeError):
        decode_jingle(root)


def test_not_a_jingle_element() -> None:
    for el in (Element("jingle"), Element(f"{{{NS_ICE_UDP}}}jingle"), Element(f"{{{NS_JINGLE}}}x")):
        with pytest.raises(DecodeError):
            decode_jingle(el)
    with pytest.raises(DecodeError):
        decode_jingle("<jingle/>")  # type: ignore[arg-type]


def test_extensions_are_ignored_but_named() -> None:
    root = copy.deepcopy(golden_jingle("session-initiate"))
    root.set("extra", "1")
    _find(root, _C).set("tcptype", "active")
    SubElement(_find(root, _T), "{urn:example}hint")
    SubElement(root, "{urn:example}payload")
    j = decode_jingle(root)
    assert j.contents == INITIATE.contents
    assert j.foreign == ("{urn:example}payload",)


def test_foreign_transport_and_description() -> None:
    root = copy.deepcopy(golden_jingle("session-initiate"))
    transport = _find(root, _T)
    transport.tag = "{urn:xmpp:jingle:transports:ibb:1}transport"
    _find(root, f"{{{NS_XMLSTREAM}}}description").tag = "{urn:xmpp:jingle:apps:rtp:1}description"
    content = decode_jingle(root).contents[0]
    assert content.transport is None
    assert content.transport_ns == "urn:xmpp:jingle:transports:ibb:1"
    assert content.description == "urn:xmpp:jingle:apps:rtp:1"


def test_fingerprint_whitespace_and_case_accepted() -> None:
    root = copy.deepcopy(golden_jingle("session-initiate"))
    fp = _find(root, _F)
    fp.text = "\n  " + (fp.text or "").lower() + "\n"
    fp.set("hash", "SHA-256")
    t = decode_jingle(root).contents[0].transport
    assert t is not None and t.fingerprint == FPR_A


def test_stanza_errors() -> None:
    err = StanzaError("cancel", "conflict", JingleCondition.TIE_BREAK)
    stanza = iq("error", "x")
    stanza.append(encode_stanza_error(err))
    assert encode_stanza(stanza) == (
        b"<iq type='error' id='x'><error type='cancel'>"
        b"<conflict xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/>"
        b"<tie-break xmlns='urn:xmpp:jingle:errors:1'/></error></iq>")
    assert decode_stanza_error(parse_stanza(encode_stanza(stanza))) == err
    assert decode_stanza_error(iq("error", "y")) == StanzaError("", "undefined-condition")
    odd = iq("error", "z")
    e = SubElement(odd, "{jabber:client}error", {"type": "wait"})
    SubElement(e, f"{{{NS_STANZAS}}}text").text = "hello"
    SubElement(e, f"{{{NS_STANZAS}}}resource-constraint")
    SubElement(e, f"{{{NS_JINGLE_ERRORS}}}no-such-condition")
    assert decode_stanza_error(odd) == StanzaError("wait", "resource-constraint", None)


# -- fuzz ----------------------------------------------------------------------------

FUZZ = settings(max_examples=max(200, fuzz_examples() // 4), deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

_TAGS = [JINGLE, _CONTENT, _T, _C, _F, _D, f"{{{NS_DTX}}}probe", f"{{{NS_JINGLE}}}reason",
         f"{{{NS_JINGLE}}}text", f"{{{NS_JINGLE}}}sid", f"{{{NS_JINGLE}}}busy",
         f"{{{NS_JINGLE}}}alternative-session", f"{{{NS_XMLSTREAM}}}description",
         "{urn:example}x", "plain"]
_ATTRS = ["action", "sid", "initiator", "responder", "creator", "name", "senders", "ufrag",
          "pwd", "component", "foundation", "generation", "id", "ip", "port", "priority",
          "protocol", "type", "network", "rel-addr", "rel-port", "hash", "setup", "alpn", "key",
          "signature", "in"]
_GOOD = ["session-initiate", "transport-info", "session-terminate", "session-info", "initiator",
         "1", "0", "65535", "udp", "host", "relay", "sha-256", "active", "dtx/1", "10.0.0.1",
         "::1", "abcd", "a" * 22, "A" * 43 + "=", "A" * 86 + "==", "x", ""]
_VALUES = st.one_of(st.sampled_from(_GOOD), st.text(max_size=24))


@st.composite
def _elements(draw: st.DrawFn, depth: int = 0) -> Element:
    el = Element(draw(st.sampled_from(_TAGS[1:] if depth else _TAGS[:1])))
    for name in draw(st.lists(st.sampled_from(_ATTRS), max_size=6, unique=True)):
        el.set(name, draw(_VALUES))
    if draw(st.booleans()):
        el.text = draw(_VALUES)
    if depth < 4:
        for _ in range(draw(st.integers(0, 4 if depth < 2 else 2))):
            el.append(draw(_elements(depth + 1)))
    return el


@FUZZ
@given(_elements())
def test_fuzz_generated_trees_raise_only_decode_error(el: Element) -> None:
    try:
        decode_jingle(el)
    except DecodeError:
        pass


@FUZZ
@given(st.sampled_from(sorted(GOLDEN)), st.lists(st.tuples(
    st.integers(0, 40), st.sampled_from(["set", "del", "text", "dup", "drop"]),
    st.sampled_from(_ATTRS), _VALUES), min_size=1, max_size=6))
def test_fuzz_mutated_golden_raise_only_decode_error(
        name: str, edits: list[tuple[int, str, str, str]]) -> None:
    root = copy.deepcopy(golden_jingle(name))
    for index, op, attr, value in edits:
        nodes = list(root.iter())
        el = nodes[index % len(nodes)]
        if op == "set":
            el.set(attr, value)
        elif op == "del":
            el.attrib.pop(attr, None)
        elif op == "text":
            el.text = value
        elif op == "dup" and len(el):
            el.append(copy.deepcopy(el[0]))
        elif op == "drop" and len(el):
            el.remove(el[0])
    try:
        decoded = decode_jingle(root)
    except DecodeError:
        return
    assert decode_jingle(encode_jingle(decoded)) == decoded  # what decodes re-encodes
