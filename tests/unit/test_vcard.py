"""Device keys in vCards: read, add, remove, refuse hostile XML (dtx.trust.vcard)."""

from __future__ import annotations

import base64
import logging
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dtx.errors import VCardError
from dtx.trust.vcard import (
    KEY_TYPE,
    MAX_VCARD_BYTES,
    MAX_VCARD_DEPTH,
    VCARD4_NS,
    VCARD_TEMP_NS,
    add_key,
    extract_keys,
    new_vcard,
    remove_key,
    vcard_format,
)

DATA = Path(__file__).resolve().parent.parent / "data" / "vcards"
ALICE = (DATA / "alice@example.org.xml").read_bytes()  # vcard-temp
BOB = (DATA / "bob@example.org.xml").read_bytes()  # vCard4


def b64(text: str) -> bytes:
    return base64.b64decode(text)


# Public keys of the sample devices (seeds 0xa1.., 0xa2.., 0xb1.., 0xb2.. x 32).
ALICE_PHONE = b64("vHy8tWNjdfodgkNNRmck2SN39TuYBpXdSdJtDOEiBaU=")
ALICE_LAPTOP = b64("Zej5sLxurhJBafBXb5c2LSlajPX3cLReFDV85kfTPuw=")
BOB_TV = b64("RyG1tjInLmWmjdp6wltBhfiwGRbbGFwUKH25Lit3D64=")
BOB_REMOTE = b64("VRVPQgZepaG+oFRjgmviaE65LfksEAAnqrquV8pVQgc=")
NEW = bytes(range(32))


def _is_dtx_key(elem: ET.Element) -> bool:
    if elem.tag == f"{{{VCARD_TEMP_NS}}}KEY":
        return elem.findtext(f"{{{VCARD_TEMP_NS}}}TYPE", "").strip().lower() == KEY_TYPE
    if elem.tag == f"{{{VCARD4_NS}}}key":
        return any(KEY_TYPE in (c.text or "") for c in elem if not c.tag.endswith("parameters"))
    return False


def others(xml: bytes) -> str:
    """Canonical XML of everything but the dtx key elements."""
    root = ET.fromstring(xml)
    for child in [c for c in root if _is_dtx_key(c)]:
        root.remove(child)
    return ET.canonicalize(
        ET.tostring(root, encoding="unicode"), strip_text=True, rewrite_prefixes=True
    )


# -- reading ----------------------------------------------------------------------


def test_extract_vcard_temp_ignores_foreign_keys() -> None:
    assert extract_keys(ALICE) == [ALICE_PHONE, ALICE_LAPTOP]
    assert vcard_format(ALICE) == "vcard-temp"


def test_extract_vcard4_uri_and_text() -> None:
    assert extract_keys(BOB) == [BOB_TV, BOB_REMOTE]
    assert vcard_format(BOB) == "vcard4"


def test_extract_skips_and_logs_malformed_dtx_keys(caplog: pytest.LogCaptureFixture) -> None:
    data = (DATA / "malformed-dtx-keys.xml").read_bytes()
    with caplog.at_level(logging.WARNING, logger="dtx.trust.vcard"):
        keys = extract_keys(data)
    # Only the whitespace-wrapped key with a mixed-case TYPE is valid.
    assert keys == [ALICE_PHONE]
    warnings = [r for r in caplog.records if "malformed dtx key" in r.getMessage()]
    assert len(warnings) == 3


def test_extract_deduplicates() -> None:
    doubled = add_key(new_vcard(), NEW).replace(b"</vCard>", b"") + (
        f"<KEY><TYPE>{KEY_TYPE}</TYPE><CRED>{base64.b64encode(NEW).decode()}</CRED></KEY></vCard>"
    ).encode()
    assert extract_keys(doubled) == [NEW]


def test_empty_vcards() -> None:
    assert extract_keys(new_vcard()) == []
    assert extract_keys(new_vcard(fmt="vcard4")) == []
    assert extract_keys(b'<vCard xmlns="vcard-temp"/>') == []


def test_new_vcard_names_jid() -> None:
    temp = ET.fromstring(new_vcard("alice@example.org"))
    assert temp.findtext(f"{{{VCARD_TEMP_NS}}}JABBERID") == "alice@example.org"
    v4 = ET.fromstring(new_vcard("alice@example.org", fmt="vcard4"))
    assert v4.findtext(f"{{{VCARD4_NS}}}impp/{{{VCARD4_NS}}}uri") == "xmpp:alice@example.org"
    with pytest.raises(VCardError):
        new_vcard(fmt="vcard3")  # type: ignore[arg-type]


# -- editing ----------------------------------------------------------------------


def test_add_key_keeps_everything_else() -> None:
    out = add_key(ALICE, NEW)
    assert extract_keys(out) == [ALICE_PHONE, ALICE_LAPTOP, NEW]
    assert others(out) == others(ALICE)
    root = ET.fromstring(out)
    assert root.findtext(f"{{{VCARD_TEMP_NS}}}DESC") == "Café owner & tea-party host. <3"
    photo = root.findtext(f"{{{VCARD_TEMP_NS}}}PHOTO/{{{VCARD_TEMP_NS}}}BINVAL")
    assert photo is not None and photo.startswith("iVBORw0KGgo")
    foreign = root.find("{urn:example:client}X-CLIENT")
    assert foreign is not None and foreign.get("version") == "2.1"
    x509 = [k for k in root.iter(f"{{{VCARD_TEMP_NS}}}KEY") if not _is_dtx_key(k)]
    assert len(x509) == 1 and "e+AMkn5g" in x509[0].findtext(f"{{{VCARD_TEMP_NS}}}CRED", "")


def test_add_key_follows_indentation_and_keeps_comments() -> None:
    out = add_key(ALICE, NEW)
    cred = base64.b64encode(NEW).decode()
    assert (
        f"\n  <KEY><TYPE>{KEY_TYPE}</TYPE><CRED>{cred}</CRED></KEY>\n</vCard>".encode()
        in out
    )
    assert b"<!-- device keys published by dtx -->" in out


def test_add_key_is_idempotent() -> None:
    assert add_key(ALICE, ALICE_PHONE) == ALICE  # present: input returned as is
    once = add_key(ALICE, NEW)
    assert add_key(once, NEW) == once
    assert extract_keys(add_key(add_key(None, NEW), NEW)) == [NEW]


@pytest.mark.parametrize("fmt", ["vcard-temp", "vcard4"])
def test_add_key_to_nothing(fmt: str) -> None:
    out = add_key(None, NEW, fmt=fmt)  # type: ignore[arg-type]
    assert vcard_format(out) == fmt
    assert extract_keys(out) == [NEW]


def test_add_key_keeps_existing_format() -> None:
    out = add_key(BOB, NEW, fmt="vcard-temp")
    assert vcard_format(out) == "vcard4"
    assert extract_keys(out) == [BOB_TV, BOB_REMOTE, NEW]
    assert others(out) == others(BOB)
    assert f"data:{KEY_TYPE};base64,{base64.b64encode(NEW).decode()}".encode() in out


def test_remove_key_removes_only_that_key() -> None:
    out = remove_key(ALICE, ALICE_LAPTOP)
    assert extract_keys(out) == [ALICE_PHONE]
    assert others(out) == others(ALICE)
    out = remove_key(out, ALICE_PHONE)
    assert extract_keys(out) == []
    assert others(out) == others(ALICE)


def test_remove_key_vcard4() -> None:
    out = remove_key(BOB, BOB_TV)
    assert extract_keys(out) == [BOB_REMOTE]
    assert others(out) == others(BOB)
    assert b"https://example.org/keys/bob.asc" in out


def test_remove_absent_key_returns_input() -> None:
    assert remove_key(ALICE, NEW) == ALICE


def test_remove_duplicated_key() -> None:
    v = add_key(new_vcard(), NEW)
    v = v.replace(b"</vCard>", b"") + v[v.index(b"<KEY>") : v.index(b"</vCard>")] + b"</vCard>"
    assert v.count(b"<KEY>") == 2
    out = remove_key(v, NEW)
    assert b"<KEY>" not in out


@pytest.mark.parametrize("key", [b"", b"\x00" * 31, b"\x00" * 33])
def test_wrong_key_length_refused(key: bytes) -> None:
    with pytest.raises(VCardError):
        add_key(ALICE, key)
    with pytest.raises(VCardError):
        remove_key(ALICE, key)


# -- refusing -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["billion-laughs.xml", "external-entity.xml", "external-dtd.xml"]
)
def test_hostile_vcards_refused(name: str) -> None:
    data = (DATA / name).read_bytes()
    with pytest.raises(VCardError, match="hostile"):
        extract_keys(data)
    with pytest.raises(VCardError):
        add_key(data, NEW)


BAD = [
    b"",
    b"not xml",
    b"<vCard xmlns='vcard-temp'>",  # truncated
    b"<vCard>no namespace</vCard>",
    b"<vcard xmlns='vcard-temp'/>",  # vCard4 name, vcard-temp namespace
    (DATA / "not-a-vcard.xml").read_bytes(),
    b"<vCard xmlns='vcard-temp'>&undefined;</vCard>",
    b"<?xml version='1.0' encoding='no-such-encoding'?><vCard xmlns='vcard-temp'/>",
    b"<vCard xmlns='vcard-temp'></vCard><vCard xmlns='vcard-temp'></vCard>",
    b"\xff\xfe\x00<",
    b"<vCard xmlns='vcard-temp'>" + b"<X>" * (MAX_VCARD_DEPTH + 1) + b"</X>" * (MAX_VCARD_DEPTH + 1)
    + b"</vCard>",
    b"<vCard xmlns='vcard-temp'><NOTE>" + b"a" * MAX_VCARD_BYTES + b"</NOTE></vCard>",
]


@pytest.mark.parametrize("data", BAD, ids=range(len(BAD)))
def test_not_a_vcard(data: bytes) -> None:
    with pytest.raises(VCardError):
        extract_keys(data)


def test_not_bytes_refused() -> None:
    with pytest.raises(VCardError):
        extract_keys("<vCard xmlns='vcard-temp'/>")  # type: ignore[arg-type]


# -- properties ---------------------------------------------------------------------

keys32 = st.binary(min_size=32, max_size=32)


@given(key=keys32, base=st.sampled_from([None, ALICE, BOB, new_vcard(fmt="vcard4")]))
def test_add_then_extract_contains_key(key: bytes, base: bytes | None) -> None:
    out = add_key(base, key)
    keys = extract_keys(out)
    assert key in keys
    before = [] if base is None else extract_keys(base)
    assert all(k in keys for k in before)
    removed = remove_key(out, key)
    assert key not in extract_keys(removed)
    assert [k for k in before if k != key] == extract_keys(removed)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=512))
def test_arbitrary_bytes_raise_only_vcard_error(data: bytes) -> None:
    try:
        extract_keys(data)
    except VCardError:
        pass


XMLISH = st.text(
    alphabet=list("<>/=\"' &;#!?[]-:vCardKEYTPRxmlnsvcard-temp0123456789abcdef\n\u00e9"),
    max_size=200,
)


@given(text=XMLISH)
def test_xmlish_text_raises_only_vcard_error(text: str) -> None:
    for data in (text.encode("utf-8"), b"<vCard xmlns='vcard-temp'>" + text.encode() + b"</vCard>"):
        try:
            extract_keys(data)
            add_key(data, NEW)
        except VCardError:
            pass


@given(pos=st.integers(min_value=0, max_value=len(ALICE) - 1), byte=st.integers(0, 255))
def test_mutated_vcard_raises_only_vcard_error(pos: int, byte: int) -> None:
    data = ALICE[:pos] + bytes([byte]) + ALICE[pos + 1 :]
    try:
        extract_keys(data)
        remove_key(add_key(data, NEW), NEW)
    except VCardError:
        pass


def test_serialisation_round_trips_awkward_content() -> None:
    awkward = (
        b"<vCard xmlns='vcard-temp' xmlns:e='urn:example:ext'>"
        b"<NOTE xml:lang='en' e:flag='a&quot;b&#10;c&#9;d&lt;'>x&#13;y &amp; z &gt; w]]&gt;</NOTE>"
        b"<plain xmlns=''><inner/></plain>"
        b"<e:ext><e:deep e:a='1'>t</e:deep></e:ext>"
        b"<?app some data?>"
        b"</vCard>"
    )
    out = add_key(awkward, NEW)
    assert others(out) == others(awkward)
    root = ET.fromstring(out)
    note = root.find(f"{{{VCARD_TEMP_NS}}}NOTE")
    assert note is not None
    assert note.text == "x\ry & z > w]]>"
    assert note.get("{urn:example:ext}flag") == 'a"b\nc\td<'
    assert note.get("{http://www.w3.org/XML/1998/namespace}lang") == "en"
    assert root.find("plain/inner") is not None
    assert b"<?app some data?>" in out
    assert extract_keys(remove_key(out, NEW)) == []


def test_golden_key_elements() -> None:
    """The encodings docs/identity.md specifies, for the seed 00..1f key."""
    public = bytes.fromhex("03a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8")
    cred = "A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg="
    assert add_key(None, public) == (
        '<vCard xmlns="vcard-temp"><KEY><TYPE>application/x-dtx-ed25519</TYPE>'
        f"<CRED>{cred}</CRED></KEY></vCard>"
    ).encode()
    assert add_key(None, public, fmt="vcard4") == (
        '<vcard xmlns="urn:ietf:params:xml:ns:vcard-4.0"><key>'
        f"<uri>data:application/x-dtx-ed25519;base64,{cred}</uri></key></vcard>"
    ).encode()
