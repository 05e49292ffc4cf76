"""XML stream serialiser: stanzas, stream header, footer and stream errors.

Writes what :mod:`dtx.proto.xmlstream` reads. Stanzas are written for a
stream whose default namespace is ``jabber:client``: the stanza element
carries no ``xmlns``; a child in another namespace carries ``xmlns='...'``;
an unqualified child inherits its parent's namespace. Never ``ns0:``
prefixes. Stanza attributes use single quotes (``'``), the stream header
double quotes, as RFC 6120's examples do.

Anything that would not come back unchanged from a conforming reader is
refused with :class:`~dtx.errors.LocalProtocolError`: names that are not
XML names, and characters XML 1.0 cannot carry (C0 controls other than
tab, newline and carriage return; U+FFFE, U+FFFF; lone surrogates).
"""

from __future__ import annotations

import enum
import re
from typing import Final
from xml.etree.ElementTree import Element

from dtx.errors import LocalProtocolError

__all__ = [
    "NS_CLIENT",
    "NS_STREAM",
    "NS_STREAMS_ERR",
    "NS_XML",
    "Condition",
    "MAX_COUNT",
    "decode_count",
    "encode_stanza",
    "encode_stream_error",
    "encode_stream_footer",
    "encode_stream_header",
]

NS_CLIENT: Final = "jabber:client"
NS_STREAM: Final = "http://etherx.jabber.org/streams"
NS_STREAMS_ERR: Final = "urn:ietf:params:xml:ns:xmpp-streams"
NS_XML: Final = "http://www.w3.org/XML/1998/namespace"


class Condition(enum.StrEnum):
    """Defined stream error conditions (RFC 6120 section 4.9.3)."""

    BAD_FORMAT = "bad-format"
    BAD_NAMESPACE_PREFIX = "bad-namespace-prefix"
    CONFLICT = "conflict"
    CONNECTION_TIMEOUT = "connection-timeout"
    HOST_GONE = "host-gone"
    HOST_UNKNOWN = "host-unknown"
    IMPROPER_ADDRESSING = "improper-addressing"
    INTERNAL_SERVER_ERROR = "internal-server-error"
    INVALID_FROM = "invalid-from"
    INVALID_NAMESPACE = "invalid-namespace"
    INVALID_XML = "invalid-xml"
    NOT_AUTHORIZED = "not-authorized"
    NOT_WELL_FORMED = "not-well-formed"
    POLICY_VIOLATION = "policy-violation"
    REMOTE_CONNECTION_FAILED = "remote-connection-failed"
    RESET = "reset"
    RESOURCE_CONSTRAINT = "resource-constraint"
    RESTRICTED_XML = "restricted-xml"
    SEE_OTHER_HOST = "see-other-host"
    SYSTEM_SHUTDOWN = "system-shutdown"
    UNDEFINED_CONDITION = "undefined-condition"
    UNSUPPORTED_ENCODING = "unsupported-encoding"
    UNSUPPORTED_FEATURE = "unsupported-feature"
    UNSUPPORTED_STANZA_TYPE = "unsupported-stanza-type"
    UNSUPPORTED_VERSION = "unsupported-version"


_CONDITIONS: Final = frozenset(c.value for c in Condition)

#: The largest number a peer may write in a numeric attribute (XEP-0198
#: ``h`` counts modulo 2**32, so no count is larger).
MAX_COUNT: Final = 2**32 - 1
_MAX_COUNT_DIGITS: Final = len(str(MAX_COUNT))


def decode_count(text: str | None, max_value: int = MAX_COUNT) -> int | None:
    """The value of a numeric attribute written by a peer, or None.

    Only ASCII digits, ``[0-9]+``, up to ``max_value`` (at most
    :data:`MAX_COUNT`): no sign, no whitespace, no ``_`` separators and no
    other Unicode digits, all of which :func:`int` would accept. Leading
    zeros are allowed, as in XML Schema's ``unsignedInt``. Never raises,
    whatever the length of ``text`` (``int`` refuses strings over 4,300
    digits with a ValueError).
    """
    if not text or not (text.isascii() and text.isdigit()):
        return None
    digits = text.lstrip("0") or "0"
    if len(digits) > _MAX_COUNT_DIGITS:
        return None
    value = int(digits)
    return value if value <= min(max_value, MAX_COUNT) else None

#: Bound on the name cache, so endless distinct names cannot grow memory.
_NAME_CACHE_MAX: Final = 4096

# C0 controls XML 1.0 forbids; checked on the UTF-8 output with translate().
_FORBIDDEN_C0: Final = bytes(c for c in range(0x20) if c not in (0x09, 0x0A, 0x0D))
_NONCHARS_UTF8: Final = ("\ufffe".encode(), "\uffff".encode())

_NAME_START = (
    "A-Z_a-z\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u02ff\u0370-\u037d"
    "\u037f-\u1fff\u200c-\u200d\u2070-\u218f\u2c00-\u2fef\u3001-\ud7ff"
    "\uf900-\ufdcf\ufdf0-\ufffd\U00010000-\U000effff"
)
#: NCName: an XML name without colons.
_NCNAME: Final = re.compile(
    f"[{_NAME_START}][{_NAME_START}\\-.0-9\u00b7\u0300-\u036f\u203f-\u2040]*"
)
_ATTR_SPECIAL: Final = re.compile("[&<>'\n\r\t]")

# Clark-notation name -> (namespace or None, local name), validated once.
_split_cache: dict[str, tuple[str | None, str]] = {}


# Attribute name without a namespace (or in xml:) -> " local='", once validated.
_attr_heads: dict[str, str] = {}


def _split(name: str) -> tuple[str | None, str]:
    """Split and validate a Clark-notation name (``{ns}local``)."""
    if not isinstance(name, str):
        raise LocalProtocolError(f"name {name!r} is not text")
    if name[:1] == "{":
        ns, brace, local = name[1:].partition("}")
        if not brace or not ns:
            raise LocalProtocolError(f"bad qualified name {name!r}")
        result: tuple[str | None, str] = (ns, local)
    else:
        result = (None, name)
    if _NCNAME.fullmatch(result[1]) is None:
        raise LocalProtocolError(f"not an XML name: {result[1]!r}")
    if len(_split_cache) >= _NAME_CACHE_MAX:
        _split_cache.clear()
    _split_cache[name] = result
    return result


def _escape_text(text: str) -> str:
    if "&" in text:
        text = text.replace("&", "&amp;")
    if "<" in text:
        text = text.replace("<", "&lt;")
    if ">" in text:
        text = text.replace(">", "&gt;")
    if "\r" in text:  # a literal CR would be normalised away by the reader
        text = text.replace("\r", "&#13;")
    return text


def _escape_attr(value: str) -> str:
    """Escape for a single-quoted attribute; whitespace survives normalisation."""
    if _ATTR_SPECIAL.search(value) is None:
        return value
    return (
        value.replace("&", "&amp;")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
        .replace("'", "&apos;")
        .replace("\n", "&#10;")
        .replace("\r", "&#13;")
        .replace("\t", "&#9;")
    )


def _attributes(attrib: dict[str, str]) -> str:
    heads = _attr_heads
    out = ""
    for key, value in attrib.items():
        head = heads.get(key)
        if head is None:
            return _qualified_attributes(attrib)
        if _ATTR_SPECIAL.search(value) is not None:
            value = _escape_attr(value)
        out += head + value + "'"
    return out


def _qualified_attributes(attrib: dict[str, str]) -> str:
    """:func:`_attributes` when an attribute is namespaced or not yet seen."""
    parts = []
    prefixes: dict[str, str] | None = None
    for key, value in attrib.items():
        ns, local = _split_cache.get(key) or _split(key)
        if ns is None or ns == NS_XML:
            head = (" " if ns is None else " xml:") + local + "='"
            if len(_attr_heads) >= _NAME_CACHE_MAX:
                _attr_heads.clear()
            _attr_heads[key] = head
            parts.append(head + _escape_attr(value) + "'")
        else:
            if prefixes is None:
                prefixes = {}
            prefix = prefixes.get(ns)
            if prefix is None:
                prefix = prefixes[ns] = f"ns{len(prefixes)}"
                parts.append(" xmlns:" + prefix + "='" + _escape_attr(ns) + "'")
            parts.append(" " + prefix + ":" + local + "='" + _escape_attr(value) + "'")
    return "".join(parts)


def _write(elem: Element, out: list[str], default_ns: str) -> None:
    """Append ``elem`` as XML to ``out``; ``default_ns`` is in scope."""
    tag = elem.tag
    ns, local = _split_cache.get(tag) or _split(tag)
    if ns is None or ns == default_ns:
        ns = default_ns
        head = "<" + local
    else:
        head = "<" + local + " xmlns='" + _escape_attr(ns) + "'"
    if elem.attrib:
        head += _attributes(elem.attrib)
    text = elem.text
    if len(elem):
        out.append(head + ">" + _escape_text(text) if text else head + ">")
        for child in elem:
            _write(child, out, ns)
            tail = child.tail
            if tail:
                out.append(_escape_text(tail))
        out.append("</" + local + ">")
    elif text:
        out.append(head + ">" + _escape_text(text) + "</" + local + ">")
    else:
        out.append(head + "/>")


def _to_utf8(xml: str) -> bytes:
    try:
        data = xml.encode("utf-8")
    except UnicodeEncodeError:
        raise LocalProtocolError("a lone surrogate cannot be carried in XML") from None
    if (
        len(data.translate(None, _FORBIDDEN_C0)) != len(data)
        or _NONCHARS_UTF8[0] in data
        or _NONCHARS_UTF8[1] in data
    ):
        raise LocalProtocolError("a control character or U+FFFE/U+FFFF in XML text")
    return data


def encode_stanza(element: Element) -> bytes:
    """Serialise a stanza for a ``jabber:client`` stream.

    The element's own namespace must be ``jabber:client`` (or none, meaning
    the stream's default). Its own tail is not written. Raises
    :class:`~dtx.errors.LocalProtocolError` for names that are not XML
    names, for non-text content and for characters XML 1.0 cannot carry.
    """
    tag = element.tag
    ns, _ = _split_cache.get(tag) or _split(tag)
    if ns is not None and ns != NS_CLIENT:
        raise LocalProtocolError(f"stanza {tag} is not in {NS_CLIENT}")
    out: list[str] = []
    try:
        _write(element, out, NS_CLIENT)
        xml = "".join(out)
    except (TypeError, AttributeError) as exc:  # bytes, None, numbers, ...
        raise LocalProtocolError(f"stanza holds non-text content: {exc}") from None
    except RecursionError:
        raise LocalProtocolError("stanza nested too deeply to write") from None
    return _to_utf8(xml)


def _header_attr(value: str) -> str:
    return _escape_attr(value).replace('"', "&quot;")


def encode_stream_header(
    *,
    from_: str,
    to: str,
    stream_id: str | None = None,
    version: str | None = "1.0",
    lang: str | None = None,
    resume: tuple[str, int] | None = None,
) -> bytes:
    """Serialise the XML declaration and the opening ``<stream:stream>`` tag
    (without ``version`` when it is None: the answer to a XEP-0174 peer
    that sent none, RFC 6120 section 4.7.5). ``resume`` (previous stream
    id, stanzas handled) asks to resume a session (docs/protocol.md 3.5):
    ``sm:previd`` and ``sm:h`` in the XEP-0198 namespace."""
    parts = [
        '<?xml version="1.0"?><stream:stream xmlns="jabber:client"'
        ' xmlns:stream="http://etherx.jabber.org/streams"',
        f' from="{_header_attr(from_)}" to="{_header_attr(to)}"',
    ]
    if stream_id is not None:
        parts.append(f' id="{_header_attr(stream_id)}"')
    if version is not None:
        parts.append(f' version="{_header_attr(version)}"')
    if lang is not None:
        parts.append(f' xml:lang="{_header_attr(lang)}"')
    if resume is not None:
        parts.append(f' xmlns:sm="urn:xmpp:sm:3" sm:previd="{_header_attr(resume[0])}"'
                     f' sm:h="{int(resume[1])}"')
    parts.append(">")
    return _to_utf8("".join(parts))


def encode_stream_footer() -> bytes:
    """Serialise the closing ``</stream:stream>`` tag."""
    return b"</stream:stream>"


def encode_stream_error(condition: str, text: str = "") -> bytes:
    """Serialise ``<stream:error>`` with a defined condition and optional text.

    Raises :class:`~dtx.errors.LocalProtocolError` for a condition that
    RFC 6120 section 4.9.3 does not define.
    """
    if condition not in _CONDITIONS:
        raise LocalProtocolError(f"not a defined stream error condition: {condition!r}")
    body = f"<{condition} xmlns='{NS_STREAMS_ERR}'/>"
    if text:
        body += f"<text xmlns='{NS_STREAMS_ERR}'>{_escape_text(text)}</text>"
    return _to_utf8(f"<stream:error>{body}</stream:error>")
