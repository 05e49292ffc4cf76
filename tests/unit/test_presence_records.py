"""XEP-0174 records as dtx reads them (dtx.aio.presence), the pure parts:
parsing a resolved _presence._tcp service, finding a name in the table,
and which dtx device a presence record is the twin of. zeroconf's
ServiceInfo is only built, never sent; the browser's table is fed directly."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as hst
from zeroconf import ServiceInfo

from dtx.aio.mdns import PRESENCE_TYPE, LanRecord, encode_txt, presence_txt_for
from dtx.aio.presence import (
    PresenceBrowser,
    PresenceRecord,
    presence_record_from_service_info,
    twin_of,
)
from dtx.identity import fingerprint
from dtx.proto.caps import caps_for

FP_A = fingerprint(b"a" * 32)
FP_B = fingerprint(b"b" * 32)
TV_NAME = "tv@dtx-tv-example-org-living-room-abcdefgh"


def info(txt: bytes, *, instance: str = TV_NAME, port: int | None = 41001,
         addresses: list[str] | None = None) -> ServiceInfo:
    return ServiceInfo(PRESENCE_TYPE, f"{instance}.{PRESENCE_TYPE}", port=port, properties=txt,
                       server="x.local.",
                       parsed_addresses=["10.1.0.10"] if addresses is None else addresses)


def test_a_dtx_presence_record_round_trips() -> None:
    caps = caps_for()
    txt = encode_txt(presence_txt_for("tv@example.org/living-room", 41001, caps=caps))
    record = presence_record_from_service_info(info(txt))
    assert record == PresenceRecord(instance=TV_NAME, addresses=(("10.1.0.10", 41001),),
                                    jid="tv@example.org", nick="living-room", status="avail",
                                    node=caps.node, hash="sha-1", ver=caps.ver)


def test_a_pidgin_record_has_no_jid_and_legacy_caps() -> None:
    # What libpurple 2.14 announces (seen with avahi-browse in the lab).
    txt = encode_txt([("txtvers", "1"), ("1st", "Alice"), ("last", "Lab"),
                      ("port.p2pj", "5298"), ("status", "avail"), ("node", "libpurple"),
                      ("ver", "2.14.12"), ("vc", "!")])
    record = presence_record_from_service_info(info(txt, instance="alice@pidgin-box", port=5298))
    assert record is not None and record.jid is None and record.hash is None
    assert record.names() == {"alice@pidgin-box"}


@pytest.mark.parametrize(("txt", "port", "addresses"), [
    (b"\x09txtvers=1", None, None),        # no port
    (b"\x09txtvers=1", 41001, []),         # no IPv4 address
    (b"\x20txtvers=1", 41001, None),       # a TXT string running past the end
])
def test_unusable_records_are_ignored(txt: bytes, port: int | None,
                                      addresses: list[str] | None) -> None:
    assert presence_record_from_service_info(info(txt, port=port, addresses=addresses)) is None


def test_a_jid_key_that_is_not_a_jid_is_dropped() -> None:
    record = presence_record_from_service_info(info(encode_txt({"jid": "@@@"})))
    assert record is not None and record.jid is None


@given(hst.binary(max_size=300))
def test_the_parser_never_raises(txt: bytes) -> None:
    presence_record_from_service_info(info(txt))


def device(jid: str, fp: str, host: str = "10.1.0.10") -> LanRecord:
    return LanRecord(jid=jid, fingerprint=fp, version="1", addresses=((host, 41000),),
                     instance=jid.replace("@", "-"))


@pytest.mark.parametrize(("devices", "trusted", "expected"), [
    ([device("tv@example.org/living-room", FP_A)], [FP_A], 0),
    ([device("tv@example.org/living-room", FP_A)], [FP_B], None),   # key not trusted
    ([device("tv@example.org/living-room", FP_A, "10.1.0.99")], [FP_A], None),  # elsewhere
    ([device("radio@example.org/x", FP_A)], [FP_A], None),          # another account
    ([device("tv@example.org/kitchen", FP_B, "10.1.0.11"),
      device("tv@example.org/living-room", FP_A)], [FP_A, FP_B], 1),
], ids=["trusted", "untrusted", "other-address", "other-account", "the-one-on-its-address"])
def test_twin_of(devices: list[LanRecord], trusted: list[str], expected: int | None) -> None:
    presence = PresenceRecord(instance=TV_NAME, addresses=(("10.1.0.10", 41001),),
                              jid="tv@example.org")
    twin = twin_of(presence, devices, trusted)
    assert twin == (None if expected is None else devices[expected])


async def test_the_browser_finds_an_instance_or_a_jid() -> None:
    browser = PresenceBrowser()  # never entered: no sockets
    tv = PresenceRecord(instance=TV_NAME, addresses=(("10.1.0.10", 41001),), jid="tv@example.org")
    pidgin = PresenceRecord(instance="alice@pidgin-box", addresses=(("10.1.0.11", 5298),))
    await browser.update(f"{TV_NAME}.{PRESENCE_TYPE}", tv)
    await browser.update(f"alice@pidgin-box.{PRESENCE_TYPE}", pidgin)
    assert browser.find("Alice@Pidgin-Box") == pidgin
    assert browser.find("tv@example.org") == tv and browser.find(TV_NAME) == tv
    assert browser.find("bob@elsewhere") is None
    assert await browser.wait_for("bob@elsewhere", timeout=0.01) is None
    await browser.update(f"alice@pidgin-box.{PRESENCE_TYPE}", None)
    assert browser.find("alice@pidgin-box") is None
