"""LAN discovery, the pure parts: TXT codec, instance names, record parsing
and selection. No sockets: zeroconf's ServiceInfo is only built, never sent."""

from __future__ import annotations

import asyncio
import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st
from zeroconf import ServiceInfo

from dtx.aio.mdns import (
    MAX_LABEL_BYTES,
    PRESENCE_TYPE,
    PROTOCOL_VERSION,
    SERVICE_TYPE,
    DeviceFound,
    DeviceLost,
    LanAdvertiser,
    LanBrowser,
    LanRecord,
    PresenceAnnouncement,
    decode_txt,
    encode_txt,
    host_label,
    instance_name,
    jid_matches,
    presence_instance_name,
    presence_txt_for,
    record_from_service_info,
    select_records,
    txt_for,
)
from dtx.aio.mdns_cli import main as mdns_main
from dtx.aio.mdns_cli import normal_service_type
from dtx.errors import DecodeError, DiscoveryError, FingerprintError, JIDError
from dtx.proto.caps import caps_for
from dtx.identity import fingerprint

FP_A = fingerprint(b"a" * 32)
FP_B = fingerprint(b"b" * 32)
FP_C = fingerprint(b"c" * 32)
TV = "tv@example.org/living-room"


def service_info(txt: bytes, *, port: int | None = 41000,
                 addresses: list[str] | None = None, instance: str = "x") -> ServiceInfo:
    return ServiceInfo(SERVICE_TYPE, f"{instance}.{SERVICE_TYPE}", port=port, properties=txt,
                       server="x.local.",
                       parsed_addresses=["10.1.0.10"] if addresses is None else addresses)


def record(jid: str, fp: str, instance: str, version: str = PROTOCOL_VERSION) -> LanRecord:
    return LanRecord(jid=jid, fingerprint=fp, version=version,
                     addresses=(("10.1.0.10", 41000),), instance=instance)


# -- TXT ------------------------------------------------------------------------


def test_txt_for_lists_documented_keys_in_order() -> None:
    txt = txt_for(TV, FP_A)
    assert list(txt) == ["txtvers", "v", "jid", "fp"]
    assert txt == {"txtvers": "1", "v": PROTOCOL_VERSION, "jid": TV, "fp": FP_A}


def test_txt_for_normalises_jid_and_fingerprint() -> None:
    txt = txt_for("TV@Example.ORG/living-room", FP_A.upper().replace("-", ""))
    assert txt["jid"] == TV
    assert txt["fp"] == FP_A


def test_txt_round_trip_through_service_info() -> None:
    txt = txt_for(TV, FP_A, extra={"nick": "Wohnzimmer"})
    data = encode_txt(txt)
    assert decode_txt(data) == {k: v.encode() for k, v in txt.items()}
    info = service_info(data, addresses=["10.1.0.10", "10.9.0.3"],
                        instance=instance_name(TV, FP_A))
    rec = record_from_service_info(info)
    assert rec is not None
    assert rec.jid == TV
    assert rec.fingerprint == FP_A
    assert rec.version == PROTOCOL_VERSION
    assert rec.instance == instance_name(TV, FP_A)
    assert sorted(rec.addresses) == [("10.1.0.10", 41000), ("10.9.0.3", 41000)]


def test_encode_txt_exact_bytes() -> None:
    assert encode_txt({"txtvers": "1", "a": ""}) == b"\x09txtvers=1\x02a="


def test_presence_txt_has_txtvers_1_first() -> None:
    txt = presence_txt_for(TV, 41000)
    assert next(iter(txt.items())) == ("txtvers", "1")
    data = encode_txt(txt)
    assert data.startswith(b"\x09txtvers=1")  # first string on the wire, as XEP-0174 asks
    decoded = decode_txt(data)
    assert decoded["port.p2pj"] == b"41000"
    assert decoded["jid"] == b"tv@example.org"
    assert decoded["status"] == b"avail"


def test_presence_txt_carries_the_caps_and_the_status() -> None:
    caps = caps_for(("urn:example:remote",))
    txt = presence_txt_for(TV, 41001, status="away", msg="watching", caps=caps, nick="TV")
    assert list(txt) == ["txtvers", "port.p2pj", "status", "msg", "jid", "nick", "node",
                         "hash", "ver"]
    assert (txt["node"], txt["hash"], txt["ver"]) == (caps.node, "sha-1", caps.ver)
    assert txt["status"] == "away" and txt["msg"] == "watching"
    with pytest.raises(DiscoveryError):
        presence_txt_for(TV, 41001, status="busy")


@pytest.mark.parametrize(("text", "normal"), [
    ("_presence._tcp", "_presence._tcp.local."),
    ("_presence._tcp.local", "_presence._tcp.local."),
    ("_presence._tcp.local.", "_presence._tcp.local."),
    ("_dtx._udp", "_dtx._udp.local."),
    ("bad type", None), ("_presence", None), ("_a--b._tcp", None), ("_123._tcp", None),
    ("_presence._tcp.example.", None), ("_abcdefghijklmnop._tcp", None),
])
def test_lookup_service_types_are_normalised_or_refused(text: str, normal: str | None) -> None:
    if normal is None:
        with pytest.raises(DiscoveryError):
            normal_service_type(text)
    else:
        assert normal_service_type(text) == normal


def test_lookup_with_a_bad_type_is_a_usage_error_before_any_socket(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        mdns_main(["lookup", "--type", "bad type", "--instance", "x"])
    assert exit_.value.code == 2
    assert "is not a DNS-SD service type" in capsys.readouterr().err


def test_decode_txt_rules() -> None:
    data = b"\x05JID=a" + b"\x05jid=b" + b"\x04flag" + b"\x02=x" + b"\x00" + b"\x04e=\xff\xfe"
    assert decode_txt(data) == {"jid": b"a", "flag": None, "e": b"\xff\xfe"}
    assert decode_txt(b"") == {}


def test_decode_txt_truncated_raises_decode_error() -> None:
    with pytest.raises(DecodeError):
        decode_txt(b"\x09txtvers=")


@pytest.mark.parametrize("key,value", [("", "x"), ("a=b", "x"), ("k\u00e9", "x"),
                                        ("k", "x" * 254)])
def test_encode_txt_refuses(key: str, value: str) -> None:
    with pytest.raises(DiscoveryError):
        encode_txt({key: value})


@pytest.mark.parametrize("key", ["jid", "FP", "v", "txtvers"])
def test_txt_for_refuses_reserved_extra_keys(key: str) -> None:
    with pytest.raises(DiscoveryError):
        txt_for(TV, FP_A, extra={key: "x"})


def test_txt_for_refuses_bad_input() -> None:
    with pytest.raises(JIDError):
        txt_for("not a jid@", FP_A)
    with pytest.raises(FingerprintError):
        txt_for(TV, "SHA256:nope")
    with pytest.raises(DiscoveryError):  # a JID that does not fit one TXT string
        txt_for("tv@example.org/" + "r" * 300, FP_A)


@pytest.mark.parametrize("txt", [
    pytest.param(encode_txt({"v": "1", "fp": FP_A}), id="no-jid"),
    pytest.param(encode_txt({"v": "1", "jid": TV}), id="no-fp"),
    pytest.param(encode_txt({"jid": TV, "fp": FP_A}), id="no-version"),
    pytest.param(encode_txt({"v": "1", "jid": "@example.org", "fp": FP_A}), id="bad-jid"),
    pytest.param(encode_txt({"v": "1", "jid": TV, "fp": "SHA256:abcd"}), id="bad-fp"),
    pytest.param(b"\x03v=1\x03jid" + encode_txt({"fp": FP_A}), id="jid-without-value"),
    pytest.param(b"\x03v=1\x06jid=\xff\xfe" + encode_txt({"fp": FP_A}), id="jid-not-utf8"),
    pytest.param(b"\x03v=1\x40jid=", id="truncated"),
    pytest.param(b"", id="empty"),
])
def test_malformed_txt_is_ignored(txt: bytes, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="dtx.aio.mdns"):
        assert record_from_service_info(service_info(txt)) is None
    assert any("ignoring" in r.getMessage() for r in caplog.records)


def test_record_without_ipv4_address_or_port_is_ignored() -> None:
    good = encode_txt(txt_for(TV, FP_A))
    assert record_from_service_info(service_info(good)) is not None
    assert record_from_service_info(service_info(good, addresses=[])) is None
    assert record_from_service_info(service_info(good, addresses=["fe80::1"])) is None
    assert record_from_service_info(service_info(good, port=None)) is None


@given(st.binary(max_size=300))
def test_decode_txt_raises_only_decode_error(data: bytes) -> None:
    try:
        decode_txt(data)
    except DecodeError:
        pass


@given(st.binary(max_size=300))
def test_record_parser_never_raises(data: bytes) -> None:
    record_from_service_info(service_info(data))


# -- names ---------------------------------------------------------------------


def test_instance_name_escapes_jid() -> None:
    name = instance_name(TV, FP_A)
    tag = FP_A[len("SHA256:"):].replace("-", "")[:8]
    assert name == f"tv-example-org-living-room-{tag}"


@pytest.mark.parametrize("jid", [
    TV,
    "Tv@Example.org/Wohnzimmer Fernseher.1",
    "tv@example.org/k\u00fcche\\\"<&>'",
    "example.org",
    "\u00e9t\u00e9@example.org/\u00e9",
    "x@" + ".".join(["a" * 60] * 4) + "/" + "r" * 200,
])
def test_instance_and_host_names_are_dns_safe(jid: str) -> None:
    for label in (instance_name(jid, FP_A), host_label(jid, FP_A)):
        assert 0 < len(label.encode()) <= MAX_LABEL_BYTES
        assert all(ch.isascii() and (ch.isalnum() or ch == "-") for ch in label), label
        assert label == label.lower()
        assert not label.startswith("-") and "--" not in label
        assert label.endswith("-" + FP_A[7:16].replace("-", ""))
    presence = presence_instance_name(jid, FP_A)
    assert len(presence.encode()) <= MAX_LABEL_BYTES
    assert presence.count("@") == 1 and "." not in presence


def test_same_jid_other_key_gets_another_name() -> None:
    assert instance_name(TV, FP_A) != instance_name(TV, FP_B)
    assert host_label(TV, FP_A) != host_label(TV, FP_B)
    assert instance_name(TV, FP_A) != instance_name("tv@example.org/kitchen", FP_A)


def test_presence_instance_is_user_at_machine() -> None:
    assert presence_instance_name(TV, FP_A) == "tv@" + host_label(TV, FP_A)
    assert presence_instance_name("example.org/x", FP_A).startswith("dtx@")


def test_type_constants() -> None:
    assert SERVICE_TYPE == "_dtx._udp.local."
    assert PRESENCE_TYPE == "_presence._tcp.local."


# -- selection ----------------------------------------------------------------


def test_full_jid_matches_exactly_bare_jid_matches_account() -> None:
    assert jid_matches(TV, TV)
    assert jid_matches("TV@example.org/living-room", TV)
    assert not jid_matches(TV, "tv@example.org/kitchen")
    assert not jid_matches(TV, "tv@example.org")
    assert jid_matches("tv@example.org", TV)
    assert jid_matches("tv@example.org", "tv@example.org")
    assert not jid_matches("tv@example.org", "radio@example.org/living-room")
    assert not jid_matches("tv@example.org", "not a jid@")


def test_select_records_table() -> None:
    living = record(TV, FP_A, "b-living")
    impostor = record(TV, FP_C, "a-impostor")
    kitchen = record("tv@example.org/kitchen", FP_B, "c-kitchen")
    other = record("radio@example.org/living-room", FP_A, "d-radio")
    future = record(TV, FP_A, "e-future", version="2")
    table = [living, impostor, kitchen, other, future]
    assert select_records(table, TV) == [impostor, living]  # by instance
    assert select_records(table, TV, trusted=[FP_A]) == [living, impostor]
    assert select_records(table, "tv@example.org", trusted=[FP_B]) == [kitchen, impostor, living]
    assert select_records(table, TV, version=None) == [impostor, living, future]
    assert select_records(table, "nobody@example.org") == []


def test_advertiser_checks_arguments_without_network() -> None:
    with pytest.raises(DiscoveryError):
        LanAdvertiser(TV, FP_A, 0)
    with pytest.raises(JIDError):
        LanAdvertiser("@example.org", FP_A, 41000)
    with pytest.raises(DiscoveryError):
        LanAdvertiser(TV, FP_A, 41000, presence=PresenceAnnouncement(port=0))
    adv = LanAdvertiser(TV, FP_A, 41000, presence=PresenceAnnouncement(port=41001))
    assert adv.presence_txt is not None and adv.presence_txt["port.p2pj"] == "41001"
    assert adv.presence_instance == presence_instance_name(TV, FP_A)


async def test_presence_updates_need_an_announced_presence() -> None:
    adv = LanAdvertiser(TV, FP_A, 41000, presence=PresenceAnnouncement(port=41001))
    with pytest.raises(DiscoveryError):  # not announced yet: nothing to update
        await adv.update_presence(PresenceAnnouncement(port=41001, status="dnd"))
    with pytest.raises(DiscoveryError):
        await LanAdvertiser(TV, FP_A, 41000).update_presence(PresenceAnnouncement(port=41001))
    assert adv.instance == instance_name(TV, FP_A)
    assert adv.server == host_label(TV, FP_A) + ".local."
    assert adv.txt == txt_for(TV, FP_A)


# -- the browser's table (fed directly: no zeroconf, no sockets) ----------------


async def test_browser_table_events_and_waiters() -> None:
    events: list[object] = []
    lan = LanBrowser(on_event=events.append)
    living = record(TV, FP_A, "living")
    impostor = record(TV, FP_C, "impostor")

    assert await lan.resolve(TV, timeout=0) == []
    waiter = asyncio.create_task(lan.wait_records("tv@example.org", count=2, timeout=10))
    await lan.update("Living._dtx._udp.local.", living)
    await lan.update("living._dtx._udp.local.", living)  # same answer again: no event
    assert not waiter.done()
    await lan.update("impostor._dtx._udp.local.", impostor)
    found = await asyncio.wait_for(waiter, 10)
    assert found == [impostor, living]
    assert events == [DeviceFound(living), DeviceFound(impostor)]

    assert await lan.resolve(TV, timeout=1, settle=0.01, trusted=[FP_A]) == [living, impostor]
    assert lan.records() == [impostor, living]

    await lan.update("impostor._dtx._udp.local.", None)
    await lan.update("nobody._dtx._udp.local.", None)  # unknown: no event
    assert events[2:] == [DeviceLost(impostor)]
    assert await lan.wait_records(TV, timeout=0) == [living]
