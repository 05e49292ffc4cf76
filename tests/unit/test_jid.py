"""JID parsing, normalisation and refusal (dtx.jid)."""

from __future__ import annotations

import pytest

from dtx.errors import DtxError, JIDError
from dtx.jid import JID, MAX_PART_BYTES, parse_jid

PARSED = [
    # text, local, domain, resource
    ("alice@example.org", "alice", "example.org", None),
    ("tv@example.org/living-room", "tv", "example.org", "living-room"),
    ("example.org", None, "example.org", None),
    ("example.org/rendezvous", None, "example.org", "rendezvous"),
    ("Alice@Example.ORG/Phone", "alice", "example.org", "Phone"),
    ("alice@example.org./x", "alice", "example.org", "x"),
    # the resource starts at the first '/', and may hold '@', '/' and spaces
    ("a@b.example/c@d/e f", "a", "b.example", "c@d/e f"),
    ("juliet@[2001:db8::1]/balcony", "juliet", "[2001:db8::1]", "balcony"),
    ("ÉLODIE@exämple.org", "élodie", "exämple.org", None),
    ("a\\20b@example.org", "a\\20b", "example.org", None),
]


@pytest.mark.parametrize(("text", "local", "domain", "resource"), PARSED)
def test_parse(text: str, local: str | None, domain: str, resource: str | None) -> None:
    jid = JID.parse(text)
    assert (jid.local, jid.domain, jid.resource) == (local, domain, resource)
    assert JID.parse(str(jid)) == jid
    assert parse_jid(text) == jid


REFUSED = [
    "",
    "@example.org",
    "alice@",
    "alice@example.org/",
    "/resource",
    "al ice@example.org",
    "al\tice@example.org",
    "a:b@example.org",
    "a<b@example.org",
    "a>b@example.org",
    "a&b@example.org",
    "a'b@example.org",
    'a"b@example.org',
    "a@b@example.org",
    "alice@exa mple.org",
    "alice@example..org",
    "alice@.example.org",
    "alice@.",
    "alice@example.org:5222",
    "alice@[zzz]",
    "alice@example.org/res\x00",
    "al\x07ice@example.org",
    "x" * (MAX_PART_BYTES + 1) + "@example.org",
    "alice@" + "d" * (MAX_PART_BYTES + 1),
    "alice@example.org/" + "r" * (MAX_PART_BYTES + 1),
    "é" * 512 + "@example.org",  # 1024 bytes of UTF-8, 512 characters
    "\ud800@example.org",
]


@pytest.mark.parametrize("text", REFUSED)
def test_refused(text: str) -> None:
    with pytest.raises(JIDError):
        JID.parse(text)


def test_jid_error_is_a_dtx_error() -> None:
    assert issubclass(JIDError, DtxError)


def test_longest_parts_accepted() -> None:
    jid = JID.parse("l" * MAX_PART_BYTES + "@example.org/" + "r" * MAX_PART_BYTES)
    assert len(jid.local or "") == MAX_PART_BYTES
    assert len(jid.resource or "") == MAX_PART_BYTES


def test_non_string_refused() -> None:
    with pytest.raises(JIDError):
        JID.parse(b"alice@example.org")  # type: ignore[arg-type]


def test_bare_full_is_bare() -> None:
    full = JID.parse("tv@example.org/living-room")
    assert not full.is_bare
    assert full.bare == JID.parse("tv@example.org")
    assert full.bare.is_bare
    bare = full.bare
    assert bare.bare is bare
    assert full.full == "tv@example.org/living-room" == str(full)
    assert full.bare.full == "tv@example.org"
    assert full.bare.with_resource("kitchen") == JID.parse("tv@example.org/kitchen")


def test_comparison_ignores_case_of_local_and_domain_only() -> None:
    assert JID.parse("TV@EXAMPLE.org/room") == JID.parse("tv@example.org/room")
    assert hash(JID.parse("TV@EXAMPLE.org")) == hash(JID.parse("tv@example.org"))
    assert JID.parse("tv@example.org/Room") != JID.parse("tv@example.org/room")


def test_constructor_validates_and_normalises() -> None:
    assert JID("Alice", "Example.org", "r") == JID.parse("alice@example.org/r")
    with pytest.raises(JIDError):
        JID("a/b", "example.org")
    with pytest.raises(JIDError):
        JID("alice", "")


def test_frozen() -> None:
    jid = JID.parse("alice@example.org")
    with pytest.raises(AttributeError):
        jid.local = "mallory"  # type: ignore[misc]
