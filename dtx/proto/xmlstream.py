"""Sans-IO XML stream parser (RFC 6120 framing, XEP-0174 stream rules).

Two dtx peers run one XML stream over one bidirectional QUIC stream. Bytes
arrive split anywhere; :class:`XmlStreamParser` turns them into
:data:`XmlEvent` values and turns every hostile or malformed input into a
:class:`dtx.errors.StreamError` carrying the RFC 6120 condition to send back.

The parser drives ``xml.parsers.expat`` directly, with handlers that *reject*
everything RFC 6120 section 11.1 forbids (DTDs, entity declarations and
references beyond the five predefined ones, comments, processing
instructions). It does not rely on expat's own amplification protection:
a document type declaration is refused before any entity can be declared.

Memory is bounded by ``max_stanza_bytes``: input is handed to expat in
slices no longer than the limit, and after each slice the bytes of the
stanza (or pending token) in progress are counted, so a 64 MB text node
fails after about ``max_stanza_bytes``, not after buffering 64 MB.

The serialiser lives in :mod:`dtx.wire.xml` and is re-exported here, so
that one import gives both directions. See ``docs/xml-stream.md`` for the
limits and the error mapping.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, field
from typing import Final, Union
from xml.etree.ElementTree import Element, SubElement
from xml.parsers import expat

from dtx.errors import LocalProtocolError, StreamError
from dtx.wire.xml import (
    NS_CLIENT,
    NS_STREAM,
    NS_STREAMS_ERR,
    NS_XML,
    Condition,
    decode_count,
    encode_stanza,
    encode_stream_error,
    encode_stream_footer,
    encode_stream_header,
)

__all__ = [
    "DEFAULT_MAX_DEPTH",
    "DEFAULT_MAX_NAMES",
    "DEFAULT_MAX_STANZA_BYTES",
    "MIN_MAX_STANZA_BYTES",
    "NS_CLIENT",
    "NS_STREAM",
    "NS_STREAMS_ERR",
    "NS_XML",
    "Condition",
    "StanzaReceived",
    "StreamClosed",
    "StreamErrorReceived",
    "StreamOpened",
    "XmlEvent",
    "XmlStreamParser",
    "XmlStreamStatistics",
    "decode_count",
    "encode_stanza",
    "encode_stream_error",
    "encode_stream_footer",
    "encode_stream_header",
]

logger = logging.getLogger(__name__)

#: Default limit on one stanza, counted in input bytes from its ``<``.
DEFAULT_MAX_STANZA_BYTES: Final = 256 * 1024
#: RFC 6120 section 13.12 requires accepting stanzas of at least 10000 bytes.
MIN_MAX_STANZA_BYTES: Final = 10_000
#: Default limit on nesting inside a stanza; the stanza element is depth 1.
DEFAULT_MAX_DEPTH: Final = 32
#: Default limit on distinct element and attribute names (and namespace
#: prefixes) over the life of one stream; expat never forgets a name.
DEFAULT_MAX_NAMES: Final = 10_000


# -- events -----------------------------------------------------------------


@dataclass(frozen=True)
class StreamOpened:
    """The peer's stream header arrived.

    ``attrs`` holds the header's attributes in Clark notation: ``to``,
    ``from``, ``id``, ``version``, ``{http://www.w3.org/XML/1998/namespace}lang``.
    """

    attrs: dict[str, str]


@dataclass(slots=True)
class StanzaReceived:
    """One complete top-level stanza: ``{jabber:client}message|presence|iq``.

    Not frozen, as aioquic's events are not: one is made for every stanza
    and a frozen dataclass costs three times as much to make. Treat it as
    read-only."""

    element: Element


@dataclass(frozen=True)
class StreamErrorReceived:
    """The peer sent ``<stream:error>``; it will close the stream next."""

    condition: str
    text: str


@dataclass(frozen=True)
class StreamClosed:
    """The peer sent ``</stream:stream>``."""


XmlEvent = Union[StreamOpened, StanzaReceived, StreamErrorReceived, StreamClosed]


@dataclass(frozen=True)
class XmlStreamStatistics:
    """Counters of one parser: input bytes and top-level stanzas seen."""

    bytes_received: int
    stanzas_received: int


# -- parser -----------------------------------------------------------------

_SEP: Final = "}"
_STREAM_TAG: Final = "{" + NS_STREAM + "}stream"
_STANZA_TAGS: Final = frozenset(
    "{" + NS_CLIENT + "}" + name for name in ("message", "presence", "iq")
)
#: XEP-0198 acknowledgement elements, always on in dtx streams, and the
#: answers to a resumption (see docs/protocol.md 3.3, 3.5); reported as
#: StanzaReceived for the session to consume.
NS_SM: Final = "urn:xmpp:sm:3"
_SM_TAGS: Final = frozenset("{" + NS_SM + "}" + name
                            for name in ("r", "a", "resumed", "failed"))
_TOP_TAGS: Final = _STANZA_TAGS | _SM_TAGS
_ERROR_TAG: Final = "{" + NS_STREAM + "}error"
_FEATURES_TAG: Final = "{" + NS_STREAM + "}features"
_ERR_TEXT_TAG: Final = "{" + NS_STREAMS_ERR + "}text"
_ERR_PREFIX: Final = "{" + NS_STREAMS_ERR + "}"

#: Input is handed to expat in slices of at most this many bytes.
_SLICE_BYTES: Final = 64 * 1024

#: Bytes that make expat guess UTF-16 at the start; never valid UTF-8 XML.
_UTF16_SIGNS: Final = frozenset((0x00, 0xFE, 0xFF))

_ERR = expat.errors
# expat error code -> RFC 6120 condition; anything else is not-well-formed.
_EXPAT_CONDITIONS: Final[dict[int, Condition]] = {
    _ERR.codes[_ERR.XML_ERROR_UNDEFINED_ENTITY]: Condition.RESTRICTED_XML,
    _ERR.codes[_ERR.XML_ERROR_RECURSIVE_ENTITY_REF]: Condition.RESTRICTED_XML,
    _ERR.codes[_ERR.XML_ERROR_PARAM_ENTITY_REF]: Condition.RESTRICTED_XML,
    _ERR.codes[_ERR.XML_ERROR_BINARY_ENTITY_REF]: Condition.RESTRICTED_XML,
    _ERR.codes[_ERR.XML_ERROR_ATTRIBUTE_EXTERNAL_ENTITY_REF]: (
        Condition.RESTRICTED_XML
    ),
    _ERR.codes[_ERR.XML_ERROR_EXTERNAL_ENTITY_HANDLING]: Condition.RESTRICTED_XML,
    _ERR.codes[_ERR.XML_ERROR_UNBOUND_PREFIX]: Condition.BAD_NAMESPACE_PREFIX,
    _ERR.codes[_ERR.XML_ERROR_UNKNOWN_ENCODING]: Condition.UNSUPPORTED_ENCODING,
    _ERR.codes[_ERR.XML_ERROR_INCORRECT_ENCODING]: Condition.UNSUPPORTED_ENCODING,
}
_AMPLIFICATION_CODE = getattr(_ERR, "XML_ERROR_AMPLIFICATION_LIMIT_BREACH", None)
if _AMPLIFICATION_CODE is not None:  # expat >= 2.4
    _EXPAT_CONDITIONS[_ERR.codes[_AMPLIFICATION_CODE]] = Condition.RESTRICTED_XML


class _State(enum.Enum):
    """Where the parser is in the stream."""

    HEADER = "header"  # waiting for <stream:stream>
    OPEN = "open"  # between or inside top-level elements
    CLOSED = "closed"  # </stream:stream> seen; further input is ignored
    FAILED = "failed"  # a StreamError was raised; it is raised again


class _Closed(Exception):
    """Raised from the end handler to stop expat at ``</stream:stream>``."""


@dataclass
class _Config:
    max_stanza_bytes: int
    max_depth: int
    max_names: int
    slice_bytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.slice_bytes = min(_SLICE_BYTES, self.max_stanza_bytes)


class XmlStreamParser:
    """Incremental, strict parser of one inbound XML stream.

    Feed bytes as they arrive; get events back. On any fault the parser
    raises :class:`~dtx.errors.StreamError` whose ``condition`` is the
    RFC 6120 stream error to send; it is then dead and raises the same error
    on every later :meth:`feed`. After ``</stream:stream>`` further input,
    including the rest of the same chunk, is ignored.

    ``max_depth`` counts nesting inside one stanza: the stanza element is at
    depth 1, its children at depth 2, and so on.
    """

    def __init__(
        self,
        *,
        max_stanza_bytes: int = DEFAULT_MAX_STANZA_BYTES,
        max_depth: int = DEFAULT_MAX_DEPTH,
        max_names: int = DEFAULT_MAX_NAMES,
    ) -> None:
        if max_stanza_bytes < MIN_MAX_STANZA_BYTES:
            raise LocalProtocolError(
                f"max_stanza_bytes must be at least {MIN_MAX_STANZA_BYTES}"
                f" (RFC 6120 section 13.12), not {max_stanza_bytes}"
            )
        if max_depth < 1:
            raise LocalProtocolError(f"max_depth must be at least 1, not {max_depth}")
        if max_names < 100:
            raise LocalProtocolError(f"max_names must be at least 100, not {max_names}")
        self._config = _Config(max_stanza_bytes, max_depth, max_names)
        self._state = _State.HEADER
        self._error: StreamError | None = None
        self._events: list[XmlEvent] = []
        self._fed = 0  # bytes handed to expat so far
        self._slice_start = 0  # value of _fed before the current slice
        self._depth_limit = max_depth + 1  # counted from the stream element
        self._stanzas = 0
        # Element tree of the top-level element in progress.
        self._depth = 0  # 0 outside the stream, 1 at stream level, 2 a stanza
        self._stack: list[Element] = []
        self._last: Element | None = None  # last element opened or closed
        self._tail = False  # True: text goes to _last.tail, else _last.text
        self._text: list[str] = []
        self._top_start = 0  # byte index of the top-level element's '<'
        self._default_ns: str | None = None
        self._names: dict[str, str] = {}
        self._intern: dict[str, str] = {}
        self._prefixes: set[str] = set()
        self._parser = self._make_expat()

    # -- public --------------------------------------------------------------

    def feed(self, data: bytes) -> list[XmlEvent]:
        """Parse ``data`` and return the events it completes.

        Raises :class:`~dtx.errors.StreamError` only.
        """
        if self._error is not None:
            raise self._error
        if self._state is _State.CLOSED or not data:
            return []
        step = self._config.slice_bytes
        try:
            if self._fed < 2 and not _UTF16_SIGNS.isdisjoint(data[: 2 - self._fed]):
                # expat detects UTF-16 from a byte order mark or a NUL in the
                # first two bytes even when told the input is UTF-8; RFC 6120
                # section 11.6 allows UTF-8 only.
                raise StreamError(Condition.UNSUPPORTED_ENCODING, "UTF-8 only")
            if len(data) <= step:
                self._slice_start = self._fed
                self._fed += len(data)
                self._parser.Parse(data, False)
                self._check_pending()
            else:
                view = memoryview(data)
                for offset in range(0, len(data), step):
                    chunk = view[offset : offset + step]
                    self._slice_start = self._fed
                    self._fed += len(chunk)
                    self._parser.Parse(chunk, False)
                    self._check_pending()
        except _Closed:
            pass
        except StreamError as exc:
            self._fail(exc)
        except expat.ExpatError as exc:
            code = exc.code if isinstance(exc.code, int) else -1
            condition = _EXPAT_CONDITIONS.get(code, Condition.NOT_WELL_FORMED)
            self._fail(StreamError(condition, expat.errors.messages.get(code, str(exc))))
        except RecursionError:  # pragma: no cover - defensive, depth is bounded
            self._fail(StreamError(Condition.POLICY_VIOLATION, "nesting too deep"))
        events, self._events = self._events, []
        return events

    def statistics(self) -> XmlStreamStatistics:
        """Bytes fed and top-level stanzas received so far."""
        return XmlStreamStatistics(self._fed, self._stanzas)

    @property
    def closed(self) -> bool:
        """True once ``</stream:stream>`` was parsed."""
        return self._state is _State.CLOSED

    # -- internals -----------------------------------------------------------

    def _make_expat(self) -> expat.XMLParserType:
        p = expat.ParserCreate("UTF-8", _SEP, intern=self._intern)
        p.buffer_text = True
        # Report prefixes too ("uri}local}prefix"), so that every distinct
        # qualified name expat stores is also a distinct interned string.
        p.namespace_prefixes = True
        p.ordered_attributes = False
        p.specified_attributes = True
        p.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
        p.StartElementHandler = self._start
        p.EndElementHandler = self._end
        p.CharacterDataHandler = self._chars
        p.XmlDeclHandler = self._xml_decl
        p.StartNamespaceDeclHandler = self._ns_decl
        p.StartDoctypeDeclHandler = self._reject_dtd
        p.EntityDeclHandler = self._reject_entity
        p.UnparsedEntityDeclHandler = self._reject_entity
        p.NotationDeclHandler = self._reject_dtd
        p.ElementDeclHandler = self._reject_dtd
        p.AttlistDeclHandler = self._reject_dtd
        p.ExternalEntityRefHandler = self._reject_external
        p.SkippedEntityHandler = self._reject_skipped
        p.CommentHandler = self._reject_comment
        p.ProcessingInstructionHandler = self._reject_pi
        return p

    def _fail(self, exc: StreamError) -> None:
        self._state = _State.FAILED
        self._error = exc
        self._events = []
        self._stack = []
        self._text = []
        self._last = None
        logger.debug("xml stream failed: %s", exc)
        raise exc

    def _check_pending(self) -> None:
        """Fail if the element (or token) in progress outgrew the limit."""
        if self._depth >= 2:
            size = self._fed - self._top_start
        else:
            size = self._fed - self._parser.CurrentByteIndex
        if size > self._config.max_stanza_bytes:
            raise StreamError(
                Condition.POLICY_VIOLATION,
                f"stanza exceeds {self._config.max_stanza_bytes} bytes",
            )
        # expat keeps every distinct name (and prefix) it has seen for the
        # life of the document; pyexpat interns each name once, so the
        # intern table counts them.
        if len(self._intern) + len(self._prefixes) > self._config.max_names:
            raise StreamError(
                Condition.POLICY_VIOLATION,
                f"more than {self._config.max_names} distinct names in one stream",
            )

    def _fixname(self, name: str) -> str:
        """Map expat's ``uri}local[}prefix]`` to Clark notation, cached."""
        parts = name.split(_SEP)
        fixed = name if len(parts) == 1 else "{" + parts[0] + "}" + parts[1]
        self._names[name] = fixed
        return fixed

    def _flush_text(self) -> None:
        text = "".join(self._text)
        self._text = []
        last = self._last
        if last is None:  # pragma: no cover - text is only kept inside elements
            return
        if self._tail:
            last.tail = text if last.tail is None else last.tail + text
        else:
            last.text = text if last.text is None else last.text + text

    def _start(self, name: str, attrs: dict[str, str]) -> None:
        if self._text:
            self._flush_text()
        try:
            tag = self._names[name]
        except KeyError:
            tag = self._fixname(name)
        if attrs:
            for key in attrs:
                if _SEP in key:
                    names = self._names
                    attrs = {
                        (names.get(k) or self._fixname(k)): v for k, v in attrs.items()
                    }
                    break
        depth = self._depth + 1
        self._depth = depth
        if depth > 2:
            if depth > self._depth_limit:
                raise StreamError(
                    Condition.POLICY_VIOLATION,
                    f"stanza nested deeper than {self._config.max_depth}",
                )
            elem = SubElement(self._stack[-1], tag, attrs)
            self._stack.append(elem)
            self._last = elem
            self._tail = False
        elif depth == 2:
            if tag not in _TOP_TAGS and tag != _ERROR_TAG and tag != _FEATURES_TAG:
                if tag == _STREAM_TAG:
                    # A stream has one header (RFC 6120 section 4.2); a
                    # second <stream:stream> is not a stanza of a wrong
                    # type but a broken stream (docs/protocol.md 3.1).
                    raise StreamError(Condition.NOT_WELL_FORMED, "second stream header")
                raise StreamError(
                    Condition.UNSUPPORTED_STANZA_TYPE, f"unexpected element {tag}"
                )
            self._top_start = self._parser.CurrentByteIndex
            elem = Element(tag, attrs)
            self._stack.append(elem)
            self._last = elem
            self._tail = False
        else:
            self._open_stream(tag, attrs)

    def _open_stream(self, tag: str, attrs: dict[str, str]) -> None:
        if tag != _STREAM_TAG:
            local = tag.rpartition("}")[2]
            if local == "stream":
                raise StreamError(
                    Condition.INVALID_NAMESPACE,
                    f"stream element in namespace {tag[1:].partition('}')[0]!r}",
                )
            raise StreamError(
                Condition.NOT_WELL_FORMED, f"first element is {tag}, not stream"
            )
        if self._default_ns != NS_CLIENT:
            raise StreamError(
                Condition.INVALID_NAMESPACE,
                f"content namespace is {self._default_ns!r}, not {NS_CLIENT!r}",
            )
        version = attrs.get("version")
        if version is not None:
            # RFC 6120 section 4.7.5: MAJOR.MINOR, each ASCII digits only
            # (str.isdigit and int would take "١.٠" or "²"; int a 5,000-digit
            # number would raise ValueError).
            major_text, _, minor_text = version.partition(".")
            major = decode_count(major_text)
            if major is None or decode_count(minor_text) is None:
                raise StreamError(
                    Condition.UNSUPPORTED_VERSION, f"bad version {version[:40]!r}"
                )
            if major != 1:
                raise StreamError(
                    Condition.UNSUPPORTED_VERSION, f"version {version[:40]} not supported"
                )
        self._state = _State.OPEN
        self._events.append(StreamOpened(dict(attrs)))

    def _end(self, name: str) -> None:
        if self._text:
            self._flush_text()
        depth = self._depth
        self._depth = depth - 1
        if depth > 2:
            self._last = self._stack.pop()
            self._tail = True
            return
        if depth == 2:
            elem = self._stack.pop()
            self._last = None
            tag = elem.tag
            if self._top_start < self._slice_start:
                # Begun in an earlier slice, so possibly over the limit (one
                # that begins and ends in this slice is no bigger than it).
                # Counted from its '<' to the end of its end tag as written
                # without a prefix: a stanza of exactly the limit passes.
                local = tag.rpartition("}")[2]
                end = self._parser.CurrentByteIndex + len(local) + 3
                if end - self._top_start > self._config.max_stanza_bytes:
                    raise StreamError(
                        Condition.POLICY_VIOLATION,
                        f"stanza exceeds {self._config.max_stanza_bytes} bytes",
                    )
            if tag in _STANZA_TAGS:
                self._stanzas += 1
                self._events.append(StanzaReceived(elem))
            elif tag in _SM_TAGS:
                self._events.append(StanzaReceived(elem))
            elif tag == _ERROR_TAG:
                self._events.append(_stream_error_event(elem))
            return
        self._state = _State.CLOSED
        self._events.append(StreamClosed())
        raise _Closed

    def _chars(self, data: str) -> None:
        if self._depth >= 2:
            self._text.append(data)
        elif not data.isspace():
            raise StreamError(
                Condition.BAD_FORMAT, "text outside stanzas (only whitespace allowed)"
            )

    def _xml_decl(self, version: str, encoding: str | None, standalone: int) -> None:
        if encoding is not None and encoding.lower() not in ("utf-8", "utf8"):
            raise StreamError(
                Condition.UNSUPPORTED_ENCODING, f"encoding {encoding!r}, not UTF-8"
            )

    def _ns_decl(self, prefix: str | None, uri: str | None) -> None:
        uri = uri or ""  # expat passes None for xmlns=""
        if _SEP in uri:  # would make expat's names ambiguous
            raise StreamError(
                Condition.INVALID_NAMESPACE, f"namespace name with {_SEP!r}: {uri!r}"
            )
        if prefix is None:
            if self._depth == 0:
                self._default_ns = uri
        else:
            self._prefixes.add(prefix)

    def _reject_dtd(self, *args: object) -> None:
        raise StreamError(Condition.RESTRICTED_XML, "document type declarations")

    def _reject_entity(self, *args: object) -> None:
        raise StreamError(Condition.RESTRICTED_XML, "entity declarations")

    def _reject_external(self, *args: object) -> int:
        raise StreamError(Condition.RESTRICTED_XML, "external entity references")

    def _reject_skipped(self, name: str, is_parameter_entity: int) -> None:
        raise StreamError(Condition.RESTRICTED_XML, f"entity reference &{name};")

    def _reject_comment(self, data: str) -> None:
        raise StreamError(Condition.RESTRICTED_XML, "comments")

    def _reject_pi(self, target: str, data: str) -> None:
        raise StreamError(Condition.RESTRICTED_XML, "processing instructions")


def _stream_error_event(elem: Element) -> StreamErrorReceived:
    condition = Condition.UNDEFINED_CONDITION.value
    text = ""
    found = False
    for child in elem:
        tag = child.tag
        if tag == _ERR_TEXT_TAG:
            text = child.text or ""
        elif not found and tag.startswith(_ERR_PREFIX):
            condition = tag[len(_ERR_PREFIX) :]
            found = True
    return StreamErrorReceived(condition, text)
