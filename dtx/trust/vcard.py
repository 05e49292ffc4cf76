"""Device keys in an account's vCard: read, add and remove them.

Two vCard forms carry the keys (docs/identity.md has the details):

- vcard-temp (XEP-0054), ``<vCard xmlns="vcard-temp">``: one ``KEY`` element
  per device, ``<KEY><TYPE>application/x-dtx-ed25519</TYPE><CRED>BASE64</CRED></KEY>``,
  CRED being standard base64 (RFC 4648 section 4, padded) of the raw 32-byte
  Ed25519 public key;
- vCard4 (XEP-0292, RFC 6351), ``<vcard xmlns="urn:ietf:params:xml:ns:vcard-4.0">``:
  one ``key`` property per device,
  ``<key><uri>data:application/x-dtx-ed25519;base64,BASE64</uri></key>``.
  A ``<text>`` value holding the same data URI is read too, never written.

Other ``KEY``/``key`` elements (X.509, OpenPGP, ...) are left alone.

Parsing is done with expat directly: a document type declaration (and so
any entity definition) is refused outright, external entities are never
fetched, and size and depth are bounded. Everything inside the root
element except the dtx key elements that are added or removed is kept as
parsed (comments included); only the serialisation (namespace prefixes,
attribute quoting, the XML declaration, anything outside the root element)
may differ from the input.
"""

from __future__ import annotations

import base64
import binascii
import logging
import xml.etree.ElementTree as ET
from typing import Literal
from xml.parsers import expat

from dtx.errors import VCardError

__all__ = [
    "KEY_TYPE",
    "MAX_VCARD_BYTES",
    "MAX_VCARD_DEPTH",
    "VCARD4_NS",
    "VCARD_TEMP_NS",
    "VCardFormat",
    "add_key",
    "extract_keys",
    "new_vcard",
    "remove_key",
    "vcard_format",
]

logger = logging.getLogger(__name__)

KEY_TYPE = "application/x-dtx-ed25519"
"""Media type naming a dtx Ed25519 device key (vcard-temp TYPE, vCard4 data URI)."""

VCARD_TEMP_NS = "vcard-temp"
VCARD4_NS = "urn:ietf:params:xml:ns:vcard-4.0"
MAX_VCARD_BYTES = 1024 * 1024
"""Largest vCard accepted; room for a photo, bounded against abuse."""
MAX_VCARD_DEPTH = 32
"""Deepest element nesting accepted (vCards nest three or four levels)."""

VCardFormat = Literal["vcard-temp", "vcard4"]

_KEY_BYTES = 32
_DATA_URI_PREFIX = f"data:{KEY_TYPE};base64,"
_TEMP_ROOT = f"{{{VCARD_TEMP_NS}}}vCard"
_V4_ROOT = f"{{{VCARD4_NS}}}vcard"
_ROOT_FORMAT: dict[str, VCardFormat] = {_TEMP_ROOT: "vcard-temp", _V4_ROOT: "vcard4"}
_FORMAT_NS: dict[VCardFormat, str] = {"vcard-temp": VCARD_TEMP_NS, "vcard4": VCARD4_NS}
_WHITESPACE = " \t\r\n"


# -- safe parsing -------------------------------------------------------------


class _Refused(Exception):
    """Raised inside expat handlers to stop parsing a hostile document."""


def _qname(name: str) -> str:
    # expat with namespace_separator=" " reports "uri local" or "local".
    uri, sep, local = name.rpartition(" ")
    return f"{{{uri}}}{local}" if sep else local


def _parse(data: bytes) -> ET.Element:
    """Parse ``data`` into an element tree, refusing DTDs and entities."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise VCardError(f"a vCard is bytes, not {type(data).__name__}")
    data = bytes(data)
    if len(data) > MAX_VCARD_BYTES:
        raise VCardError(f"vCard is {len(data)} bytes; the limit is {MAX_VCARD_BYTES}")
    builder = ET.TreeBuilder(insert_comments=True, insert_pis=True)
    parser = expat.ParserCreate(namespace_separator=" ")
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    depth = 0

    def refuse_dtd(*_: object) -> None:
        raise _Refused("document type declarations are not allowed in a vCard")

    def refuse_entity(*_: object) -> None:
        raise _Refused("entity declarations are not allowed in a vCard")

    def refuse_external(*_: object) -> int:
        raise _Refused("external entities are not allowed in a vCard")

    def start(name: str, attrs: dict[str, str]) -> None:
        nonlocal depth
        depth += 1
        if depth > MAX_VCARD_DEPTH:
            raise _Refused(f"elements nested deeper than {MAX_VCARD_DEPTH}")
        builder.start(_qname(name), {_qname(k): v for k, v in attrs.items()})

    def end(name: str) -> None:
        nonlocal depth
        depth -= 1
        builder.end(_qname(name))

    parser.StartDoctypeDeclHandler = refuse_dtd
    parser.EntityDeclHandler = refuse_entity
    parser.UnparsedEntityDeclHandler = refuse_entity
    parser.ExternalEntityRefHandler = refuse_external
    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = builder.data
    parser.CommentHandler = builder.comment
    parser.ProcessingInstructionHandler = builder.pi
    parser.ordered_attributes = False
    try:
        parser.Parse(data, True)
        root = builder.close()
    except _Refused as exc:
        raise VCardError(f"hostile vCard refused: {exc}") from None
    except expat.ExpatError as exc:
        raise VCardError(f"vCard is not well-formed XML: {exc}") from None
    except (ValueError, LookupError, AssertionError) as exc:
        # ValueError/LookupError: encodings expat hands back to Python;
        # AssertionError: TreeBuilder.close() without a root element.
        raise VCardError(f"vCard could not be parsed: {exc}") from None
    if root.tag not in _ROOT_FORMAT:
        raise VCardError(
            f"not a vCard: root element is {root.tag!r}, expected "
            f"{_TEMP_ROOT!r} or {_V4_ROOT!r}"
        )
    return root


_XML_NS = "http://www.w3.org/XML/1998/namespace"


def _split(name: str) -> tuple[str, str]:
    if name.startswith("{"):
        uri, _, local = name[1:].partition("}")
        return uri, local
    return "", name


def _escape_text(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace(
        "\r", "&#13;"
    )


def _escape_attr(text: str) -> str:
    return (
        _escape_text(text)
        .replace('"', "&quot;")
        .replace("\n", "&#10;")
        .replace("\t", "&#9;")
    )


def _write(elem: ET.Element, default_ns: str | None, out: list[str]) -> None:
    """Serialise one element: each element whose namespace differs from its
    parent's declares it as the default namespace, so the output reads like
    hand-written XMPP XML (no ``ns0:`` prefixes) and unqualified attributes
    stay unqualified."""
    tag: object = elem.tag  # a str, or the Comment / PI factory
    if tag is ET.Comment:
        out.append(f"<!--{elem.text or ''}-->")
    elif tag is ET.ProcessingInstruction:
        out.append(f"<?{elem.text or ''}?>")
    else:
        uri, local = _split(str(elem.tag))
        parts = [local]
        if uri != default_ns:
            parts.append(f'xmlns="{_escape_attr(uri)}"')
        prefixes: dict[str, str] = {}
        for name, value in elem.attrib.items():
            a_uri, a_local = _split(name)
            if not a_uri:
                qname = a_local
            elif a_uri == _XML_NS:
                qname = f"xml:{a_local}"
            else:
                if a_uri not in prefixes:
                    prefixes[a_uri] = f"a{len(prefixes)}"
                    parts.append(f'xmlns:{prefixes[a_uri]}="{_escape_attr(a_uri)}"')
                qname = f"{prefixes[a_uri]}:{a_local}"
            parts.append(f'{qname}="{_escape_attr(value)}"')
        head = " ".join(parts)
        if elem.text or len(elem):
            out.append(f"<{head}>")
            if elem.text:
                out.append(_escape_text(elem.text))
            for child in elem:
                _write(child, uri, out)
            out.append(f"</{local}>")
        else:
            out.append(f"<{head}/>")
    if elem.tail:
        out.append(_escape_text(elem.tail))


def _serialize(root: ET.Element) -> bytes:
    out: list[str] = []
    tail, root.tail = root.tail, None
    try:
        _write(root, None, out)
    finally:
        root.tail = tail
    return "".join(out).encode("utf-8")


# -- reading keys -------------------------------------------------------------


def _decode_b64_key(text: str, where: str) -> bytes | None:
    compact = "".join(ch for ch in text if ch not in _WHITESPACE)
    try:
        raw = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        logger.warning("ignoring malformed dtx key in %s: not base64", where)
        return None
    if len(raw) != _KEY_BYTES:
        logger.warning(
            "ignoring malformed dtx key in %s: %d bytes, expected %d", where, len(raw), _KEY_BYTES
        )
        return None
    return raw


def _temp_key(elem: ET.Element) -> bytes | None | Literal[False]:
    """The dtx key in a vcard-temp KEY, None if malformed, False if foreign."""
    type_elem = elem.find(f"{{{VCARD_TEMP_NS}}}TYPE")
    if type_elem is None or (type_elem.text or "").strip().lower() != KEY_TYPE:
        return False
    cred = elem.find(f"{{{VCARD_TEMP_NS}}}CRED")
    if cred is None:
        logger.warning("ignoring malformed dtx key in vcard-temp KEY: no CRED")
        return None
    return _decode_b64_key(cred.text or "", "vcard-temp KEY/CRED")


def _v4_key(elem: ET.Element) -> bytes | None | Literal[False]:
    """The dtx key in a vCard4 key, None if malformed, False if foreign."""
    for child in elem:
        if child.tag not in (f"{{{VCARD4_NS}}}uri", f"{{{VCARD4_NS}}}text"):
            continue
        value = (child.text or "").strip()
        if value[: len(_DATA_URI_PREFIX)].lower() == _DATA_URI_PREFIX:
            return _decode_b64_key(value[len(_DATA_URI_PREFIX) :], "vCard4 key")
    return False


def _key_elements(root: ET.Element) -> list[tuple[ET.Element, bytes | None | Literal[False]]]:
    if root.tag == _TEMP_ROOT:
        return [(e, _temp_key(e)) for e in root.findall(f"{{{VCARD_TEMP_NS}}}KEY")]
    return [(e, _v4_key(e)) for e in root.findall(f"{{{VCARD4_NS}}}key")]


def vcard_format(vcard_xml: bytes) -> VCardFormat:
    """Which of the two forms a vCard is in; raises :class:`VCardError`."""
    return _ROOT_FORMAT[_parse(vcard_xml).tag]


def extract_keys(vcard_xml: bytes) -> list[bytes]:
    """All dtx Ed25519 keys (raw 32 bytes, in document order, without
    duplicates) in a vcard-temp or vCard4 vCard.

    Foreign keys are skipped silently; malformed dtx keys are skipped with
    a warning. Raises :class:`VCardError` for anything that is not a vCard
    or that tries DTD tricks.
    """
    root = _parse(vcard_xml)
    keys: list[bytes] = []
    for _, key in _key_elements(root):
        if key and key not in keys:
            keys.append(key)
    return keys


# -- editing ------------------------------------------------------------------


def _check_key(key: bytes) -> bytes:
    if not isinstance(key, (bytes, bytearray)) or len(key) != _KEY_BYTES:
        raise VCardError(f"a dtx device key is {_KEY_BYTES} raw bytes")
    return bytes(key)


def _key_element(fmt: VCardFormat, key: bytes) -> ET.Element:
    b64 = base64.b64encode(key).decode("ascii")
    if fmt == "vcard-temp":
        elem = ET.Element(f"{{{VCARD_TEMP_NS}}}KEY")
        ET.SubElement(elem, f"{{{VCARD_TEMP_NS}}}TYPE").text = KEY_TYPE
        ET.SubElement(elem, f"{{{VCARD_TEMP_NS}}}CRED").text = b64
    else:
        elem = ET.Element(f"{{{VCARD4_NS}}}key")
        ET.SubElement(elem, f"{{{VCARD4_NS}}}uri").text = _DATA_URI_PREFIX + b64
    return elem


def _append_child(root: ET.Element, child: ET.Element) -> None:
    """Append keeping the indentation of a pretty-printed vCard."""
    if len(root):
        last = root[-1]
        indent = root.text if root.text is not None and not root.text.strip(_WHITESPACE) else None
        child.tail = last.tail
        if indent is not None and (last.tail is None or not last.tail.strip(_WHITESPACE)):
            last.tail = indent
    root.append(child)


def _remove_child(root: ET.Element, child: ET.Element) -> None:
    """Remove keeping the text around it (and a sensible indentation)."""
    index = list(root).index(child)
    tail = child.tail or ""
    if index == 0:
        if tail.strip(_WHITESPACE):
            root.text = (root.text or "") + tail
    else:
        prev = root[index - 1]
        if tail.strip(_WHITESPACE):
            prev.tail = (prev.tail or "") + tail
        else:
            prev.tail = child.tail
    root.remove(child)


def new_vcard(jid: str | None = None, fmt: VCardFormat = "vcard-temp") -> bytes:
    """An empty vCard in the given form, naming ``jid`` if given
    (vcard-temp ``JABBERID``, vCard4 ``impp`` with an ``xmpp:`` URI)."""
    if fmt not in _FORMAT_NS:
        raise VCardError(f"unknown vCard format {fmt!r}")
    if fmt == "vcard-temp":
        root = ET.Element(_TEMP_ROOT)
        if jid is not None:
            ET.SubElement(root, f"{{{VCARD_TEMP_NS}}}JABBERID").text = jid
    else:
        root = ET.Element(_V4_ROOT)
        if jid is not None:
            impp = ET.SubElement(root, f"{{{VCARD4_NS}}}impp")
            ET.SubElement(impp, f"{{{VCARD4_NS}}}uri").text = f"xmpp:{jid}"
    return _serialize(root)


def add_key(
    vcard_xml: bytes | None,
    key: bytes,
    *,
    fmt: VCardFormat = "vcard-temp",
) -> bytes:
    """Add a device key to a vCard, keeping every other field and key.

    An existing vCard keeps its own form (``fmt`` only chooses the form of
    a new one, when ``vcard_xml`` is None). If the key is already there the
    input is returned unchanged, byte for byte.
    """
    key = _check_key(key)
    if vcard_xml is None:
        vcard_xml = new_vcard(fmt=fmt)
    root = _parse(vcard_xml)
    if any(k == key for _, k in _key_elements(root)):
        return bytes(vcard_xml)
    _append_child(root, _key_element(_ROOT_FORMAT[root.tag], key))
    return _serialize(root)


def remove_key(vcard_xml: bytes, key: bytes) -> bytes:
    """Remove every dtx key element holding ``key``; nothing else changes.
    Without such an element the input is returned unchanged."""
    key = _check_key(key)
    root = _parse(vcard_xml)
    doomed = [e for e, k in _key_elements(root) if k == key]
    if not doomed:
        return bytes(vcard_xml)
    for elem in doomed:
        _remove_child(root, elem)
    return _serialize(root)
