"""XML stream parser and serialiser: golden bytes, round trips, splits, rules."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from xml.etree.ElementTree import Element, SubElement

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dtx.errors import LocalProtocolError, StreamError
from dtx.proto.xmlstream import (
    DEFAULT_MAX_STANZA_BYTES,
    MIN_MAX_STANZA_BYTES,
    NS_CLIENT,
    NS_STREAM,
    NS_STREAMS_ERR,
    NS_XML,
    Condition,
    StanzaReceived,
    StreamClosed,
    StreamErrorReceived,
    StreamOpened,
    XmlEvent,
    XmlStreamParser,
    encode_stanza,
    encode_stream_error,
    encode_stream_footer,
    encode_stream_header,
)

HEADER = encode_stream_header(from_="romeo@example.net/orchard", to="juliet@example.com/balcony")
RAW_HEADER = (
    b"<stream:stream xmlns='jabber:client'"
    b" xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>"
)
C = "{" + NS_CLIENT + "}"


# -- test plumbing ------------------------------------------------------------


def feed_split(data: bytes, cuts: Iterable[int], **limits: int) -> list[XmlEvent]:
    """Feed ``data`` to a fresh parser in pieces cut at ``cuts``."""
    parser = XmlStreamParser(**limits)
    events: list[XmlEvent] = []
    start = 0
    for cut in sorted(set(cuts)):
        if 0 < cut < len(data):
            events += parser.feed(data[start:cut])
            start = cut
    events += parser.feed(data[start:])
    return events


def feed_whole(data: bytes, **limits: int) -> list[XmlEvent]:
    return feed_split(data, [], **limits)


def feed_bytewise(data: bytes, **limits: int) -> list[XmlEvent]:
    return feed_split(data, range(len(data)), **limits)


def error_of(data: bytes, **limits: int) -> StreamError:
    with pytest.raises(StreamError) as info:
        feed_whole(data, **limits)
    return info.value


def canon(elem: Element) -> tuple[object, ...]:
    """Comparable form of an element: tag, attributes, text, children, tail."""
    return (
        elem.tag,
        dict(elem.attrib),
        elem.text or "",
        [canon(child) for child in elem],
        elem.tail or "",
    )


def stanzas(events: Sequence[XmlEvent]) -> list[tuple[object, ...]]:
    return [canon(e.element) for e in events if isinstance(e, StanzaReceived)]


def kinds(events: Sequence[XmlEvent]) -> list[str]:
    return [type(e).__name__ for e in events]


def roundtrip(elem: Element) -> Element:
    events = feed_whole(HEADER + encode_stanza(elem))
    assert kinds(events) == ["StreamOpened", "StanzaReceived"]
    received = events[1]
    assert isinstance(received, StanzaReceived)
    return received.element


def message(**attrs: str) -> Element:
    return Element(C + "message", attrs)


# -- golden bytes ---------------------------------------------------------


def test_stream_header_golden() -> None:
    assert encode_stream_header(
        from_="a@example.net/x", to="b@example.com/y", stream_id="s1", lang="en"
    ) == (
        b'<?xml version="1.0"?><stream:stream xmlns="jabber:client"'
        b' xmlns:stream="http://etherx.jabber.org/streams"'
        b' from="a@example.net/x" to="b@example.com/y" id="s1" version="1.0"'
        b' xml:lang="en">'
    )


def test_stream_header_escapes_values() -> None:
    header = encode_stream_header(from_='a"&<b', to="c'd")
    assert b'from="a&quot;&amp;&lt;b"' in header
    [opened] = feed_whole(header)
    assert opened == StreamOpened({"from": 'a"&<b', "to": "c'd", "version": "1.0"})


def test_footer_and_error_golden() -> None:
    assert encode_stream_footer() == b"</stream:stream>"
    assert encode_stream_error("policy-violation", "too big & <bad>") == (
        b"<stream:error><policy-violation"
        b" xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>"
        b"<text xmlns='urn:ietf:params:xml:ns:xmpp-streams'>"
        b"too big &amp; &lt;bad&gt;</text></stream:error>"
    )
    assert encode_stream_error(Condition.CONFLICT) == (
        b"<stream:error><conflict xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>"
        b"</stream:error>"
    )


def test_stanza_golden_foreign_namespaces() -> None:
    iq = Element(C + "iq", {"type": "get", "id": "p1"})
    SubElement(iq, "{urn:xmpp:ping}ping")
    assert encode_stanza(iq) == b"<iq type='get' id='p1'><ping xmlns='urn:xmpp:ping'/></iq>"
    result = Element(C + "iq", {"type": "result"})
    query = SubElement(result, "{http://jabber.org/protocol/disco#info}query")
    SubElement(query, "{http://jabber.org/protocol/disco#info}feature", {"var": "urn:xmpp:ping"})
    assert encode_stanza(result) == (
        b"<iq type='result'><query xmlns='http://jabber.org/protocol/disco#info'>"
        b"<feature var='urn:xmpp:ping'/></query></iq>"
    )
    assert b"ns0" not in encode_stanza(result)


def test_stanza_escaping_golden() -> None:
    msg = message(to="a'b\"<&>\n\t\r", **{"{" + NS_XML + "}lang": "de"})
    SubElement(msg, C + "body").text = "<&>\r\n\"'"
    assert encode_stanza(msg) == (
        b"<message to='a&apos;b\"&lt;&amp;&gt;&#10;&#9;&#13;' xml:lang='de'>"
        b"<body>&lt;&amp;&gt;&#13;\n\"'</body></message>"
    )


def test_unqualified_children_inherit_namespace() -> None:
    msg = Element("message", {"to": "x@example.org"})
    SubElement(msg, "body").text = "hi"
    ext = SubElement(msg, "{urn:example:ext}x")
    SubElement(ext, "y")
    data = encode_stanza(msg)
    assert data == b"<message to='x@example.org'><body>hi</body><x xmlns='urn:example:ext'><y/></x></message>"
    back = roundtrip(msg)
    assert back.tag == C + "message"
    assert [c.tag for c in back] == [C + "body", "{urn:example:ext}x"]
    assert back[1][0].tag == "{urn:example:ext}y"


def test_foreign_attribute_namespace_gets_prefix() -> None:
    msg = message()
    SubElement(msg, "{urn:example:a}x", {"{urn:example:b}flag": "1", "plain": "2"})
    back = roundtrip(msg)
    assert canon(back) == canon(msg)


@pytest.mark.parametrize(
    "build",
    [
        lambda: Element("{urn:example}message"),
        lambda: Element(C + "bad name"),
        lambda: Element(C + "message", {"1x": "v"}),
        lambda: Element(C + "message", {"{}x": "v"}),
        lambda: message(to="nul\x00"),
        lambda: message(to="\ufffe"),
        lambda: message(to="\ud800"),
        lambda: message(to=5),  # type: ignore[arg-type]
    ],
)
def test_encode_refuses_what_cannot_round_trip(build: object) -> None:
    with pytest.raises(LocalProtocolError):
        encode_stanza(build())  # type: ignore[operator]


def test_encode_refuses_absurd_nesting() -> None:
    msg = message()
    elem = msg
    for _ in range(100_000):
        elem = SubElement(elem, C + "x")
    with pytest.raises(LocalProtocolError):
        encode_stanza(msg)


def test_encode_refuses_bad_text_and_conditions() -> None:
    msg = message()
    SubElement(msg, C + "body").text = "bell\x07"
    with pytest.raises(LocalProtocolError):
        encode_stanza(msg)
    with pytest.raises(LocalProtocolError):
        encode_stream_error("not-a-condition")
    with pytest.raises(LocalProtocolError):
        encode_stream_header(from_="a\x01", to="b")


# -- round trips ----------------------------------------------------------


def _disco() -> Element:
    iq = Element(C + "iq", {"type": "result", "id": "d1", "to": "a@b/c"})
    q = SubElement(iq, "{http://jabber.org/protocol/disco#info}query")
    SubElement(q, "{http://jabber.org/protocol/disco#info}identity", {"category": "client", "type": "pc", "name": "TV & <Remote>"})
    for var in ("urn:xmpp:ping", "http://jabber.org/protocol/disco#info"):
        SubElement(q, "{http://jabber.org/protocol/disco#info}feature", {"var": var})
    return iq


def _mixed() -> Element:
    msg = message(type="chat", id="m1")
    body = SubElement(msg, C + "body")
    body.text = "  leading and trailing  "
    html = SubElement(msg, "{http://jabber.org/protocol/xhtml-im}html")
    b = SubElement(html, "{http://www.w3.org/1999/xhtml}body")
    b.text = "a "
    strong = SubElement(b, "{http://www.w3.org/1999/xhtml}strong")
    strong.text = "bold"
    strong.tail = " and ünïcödé 😀 tail"
    return msg


def _lang() -> Element:
    msg = message(**{"{" + NS_XML + "}lang": "fr"})
    SubElement(msg, C + "body", {"{" + NS_XML + "}lang": "en"}).text = "hello"
    SubElement(msg, C + "body").text = "bonjour"
    return msg


def _empty() -> Element:
    presence = Element(C + "presence")
    SubElement(presence, C + "show").text = ""
    SubElement(presence, "{urn:xmpp:idle:1}idle", {"since": "1969-07-21T02:56:15Z"})
    return presence


def _escapes() -> Element:
    msg = message(to="x'\"<>&\t\n\r y")
    SubElement(msg, C + "body").text = "]]> <![CDATA[ &amp; &#38; \r\n\r"
    SubElement(msg, C + "subject").text = "\t tab \n newline"
    return msg


@pytest.mark.parametrize("build", [_disco, _mixed, _lang, _empty, _escapes])
def test_round_trip_table(build: object) -> None:
    elem = build()  # type: ignore[operator]
    assert canon(roundtrip(elem)) == canon(elem)


# -- split invariance -----------------------------------------------------


def _stream_bytes() -> bytes:
    parts = [HEADER, b"\n  "]
    for build in (_disco, _mixed, _lang, _empty, _escapes):
        parts += [encode_stanza(build()), b" "]
    parts += [encode_stream_error("system-shutdown", "bye ✓"), encode_stream_footer()]
    return b"".join(parts)


STREAM = _stream_bytes()


def _summary(events: Sequence[XmlEvent]) -> list[object]:
    return [canon(e.element) if isinstance(e, StanzaReceived) else e for e in events]


def test_split_whole_and_bytewise_agree() -> None:
    whole = feed_whole(STREAM)
    assert kinds(whole) == ["StreamOpened"] + ["StanzaReceived"] * 5 + [
        "StreamErrorReceived",
        "StreamClosed",
    ]
    assert whole[-2] == StreamErrorReceived("system-shutdown", "bye ✓")
    assert _summary(feed_bytewise(STREAM)) == _summary(whole)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=40))
def test_split_anywhere(cuts: list[int]) -> None:
    assert _summary(feed_split(STREAM, cuts)) == _summary(feed_whole(STREAM))


def test_utf8_split_inside_a_character() -> None:
    msg = message()
    SubElement(msg, C + "body").text = "😀é中"
    data = HEADER + encode_stanza(msg)
    assert stanzas(feed_bytewise(data)) == [canon(msg)]


# -- stream rules ---------------------------------------------------------


def test_stream_opened_attributes() -> None:
    [opened] = feed_whole(
        b"<?xml version='1.0' encoding='UTF-8'?>"
        b"<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'"
        b" from='a@x' to='b@y' id='i' version='1.0' xml:lang='en'>"
    )
    assert opened == StreamOpened(
        {"from": "a@x", "to": "b@y", "id": "i", "version": "1.0", "{" + NS_XML + "}lang": "en"}
    )


def test_whitespace_keepalives_are_ignored() -> None:
    parser = XmlStreamParser()
    assert kinds(parser.feed(HEADER)) == ["StreamOpened"]
    for _ in range(100):
        assert parser.feed(b" \n\t\r ") == []
    assert kinds(parser.feed(b"<presence/>")) == ["StanzaReceived"]
    assert parser.statistics().stanzas_received == 1


def test_features_are_ignored() -> None:
    events = feed_whole(
        RAW_HEADER + b"<stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"
        b"</stream:features><message/>"
    )
    assert kinds(events) == ["StreamOpened", "StanzaReceived"]


def test_stream_management_acks_are_delivered() -> None:
    # XEP-0198 <r/> and <a/> travel at stream level in dtx streams.
    events = feed_whole(RAW_HEADER + b"<r xmlns='urn:xmpp:sm:3'/><a xmlns='urn:xmpp:sm:3' h='3'/>")
    assert stanzas(events) == [
        ("{urn:xmpp:sm:3}r", {}, "", [], ""),
        ("{urn:xmpp:sm:3}a", {"h": "3"}, "", [], ""),
    ]


def test_prefixed_stanza_namespace_is_resolved() -> None:
    events = feed_whole(RAW_HEADER + b"<c:iq xmlns:c='jabber:client' type='get'/>")
    assert stanzas(events) == [(C + "iq", {"type": "get"}, "", [], "")]


def test_stream_error_without_text_or_condition() -> None:
    events = feed_whole(
        RAW_HEADER + b"<stream:error><host-unknown xmlns='" + NS_STREAMS_ERR.encode() + b"'/></stream:error>"
        b"<stream:error/>"
    )
    assert events[1:] == [
        StreamErrorReceived("host-unknown", ""),
        StreamErrorReceived("undefined-condition", ""),
    ]


def test_after_close_input_is_ignored() -> None:
    parser = XmlStreamParser()
    events = parser.feed(RAW_HEADER + b"<message/></stream:stream><junk>&bad;")
    assert kinds(events) == ["StreamOpened", "StanzaReceived", "StreamClosed"]
    assert parser.closed
    assert parser.feed(b"<more/>") == []


@pytest.mark.parametrize(
    ("data", "condition"),
    [
        (b"<message xmlns='jabber:client'/>", "not-well-formed"),
        (b"<stream:stream xmlns:stream='urn:wrong' xmlns='jabber:client'>", "invalid-namespace"),
        (b"<stream:stream xmlns:stream='" + NS_STREAM.encode() + b"' xmlns='jabber:server'>", "invalid-namespace"),
        (b"<stream:stream xmlns:stream='" + NS_STREAM.encode() + b"'>", "invalid-namespace"),
        (RAW_HEADER.replace(b"'1.0'", b"'2.0'"), "unsupported-version"),
        (RAW_HEADER.replace(b"'1.0'", b"'one'"), "unsupported-version"),
        (RAW_HEADER + b"<foo/>", "unsupported-stanza-type"),
        (RAW_HEADER + b"<message xmlns='jabber:server'/>", "unsupported-stanza-type"),
        # a second header is a broken stream, as docs/protocol.md 3.1 says
        (RAW_HEADER + b"<stream:stream/>", "not-well-formed"),
        (RAW_HEADER + RAW_HEADER, "not-well-formed"),
        (RAW_HEADER + b"<message/>" + HEADER[len(b'<?xml version="1.0"?>'):], "not-well-formed"),
        # versions: ASCII digits only, and no number long enough to make int() raise
        (RAW_HEADER.replace(b"'1.0'", "'١.٠'".encode()), "unsupported-version"),
        (RAW_HEADER.replace(b"'1.0'", "'１.0'".encode()), "unsupported-version"),
        (RAW_HEADER.replace(b"'1.0'", "'¹.0'".encode()), "unsupported-version"),
        (RAW_HEADER.replace(b"'1.0'", b"'1." + b"9" * 5000 + b"'"), "unsupported-version"),
        (RAW_HEADER.replace(b"'1.0'", b"'" + b"1" * 5000 + b".0'"), "unsupported-version"),
        (RAW_HEADER.replace(b"'1.0'", b"' 1.0'"), "unsupported-version"),
        (RAW_HEADER.replace(b"'1.0'", b"'+1.0'"), "unsupported-version"),
        (RAW_HEADER + b"hello", "bad-format"),
        # expat refuses its own separator in a namespace name as a syntax error
        (RAW_HEADER + b"<message><x xmlns='urn:a}b'/></message>", "not-well-formed"),
        (RAW_HEADER + b"<message><x:y/></message>", "bad-namespace-prefix"),
        (RAW_HEADER + b"<message></presence>", "not-well-formed"),
        (RAW_HEADER + b"<message a='1' a='2'/>", "not-well-formed"),
        (RAW_HEADER + b"<message>\xff</message>", "not-well-formed"),
        (RAW_HEADER + b"<message>\xc3\x28</message>", "not-well-formed"),
        (RAW_HEADER + b"<message>&#0;</message>", "not-well-formed"),
        (RAW_HEADER + b"<message><![CDATA[x]]></message><message>\x01</message>", "not-well-formed"),
        (b"<?xml version='1.0' encoding='ISO-8859-1'?>" + RAW_HEADER, "unsupported-encoding"),
        ("\ufeff<x/>".encode("utf-16-le"), "unsupported-encoding"),
        ("\ufeff<x/>".encode("utf-16-be"), "unsupported-encoding"),
        (b"<\x00s\x00", "unsupported-encoding"),
        (b"\x00<\x00s", "unsupported-encoding"),
        (RAW_HEADER + b"<?xml version='1.0'?>", "not-well-formed"),
    ],
)
def test_stream_rule_violations(data: bytes, condition: str) -> None:
    assert error_of(data).condition == condition


@pytest.mark.parametrize("data", [b"<\x00s\x00", "\ufeff<s/>".encode("utf-16-be")])
def test_utf16_is_refused_when_split_after_first_byte(data: bytes) -> None:
    with pytest.raises(StreamError) as info:
        feed_bytewise(data)
    assert info.value.condition == "unsupported-encoding"


def test_error_is_sticky() -> None:
    parser = XmlStreamParser()
    parser.feed(RAW_HEADER)
    with pytest.raises(StreamError) as first:
        parser.feed(b"<foo/>")
    with pytest.raises(StreamError) as again:
        parser.feed(b"<message/>")
    assert again.value is first.value
    assert first.value.condition == Condition.UNSUPPORTED_STANZA_TYPE


def test_events_before_error_in_same_feed_are_dropped() -> None:
    parser = XmlStreamParser()
    with pytest.raises(StreamError):
        parser.feed(RAW_HEADER + b"<message/><!-- no -->")


def test_utf8_bom_is_accepted() -> None:
    assert kinds(feed_whole(b"\xef\xbb\xbf" + HEADER)) == ["StreamOpened"]


def test_cdata_is_text() -> None:
    events = feed_whole(RAW_HEADER + b"<message><body><![CDATA[<a>&]]></body></message>")
    assert stanzas(events)[0][3] == [(C + "body", {}, "<a>&", [], "")]


def test_statistics_count_bytes_and_stanzas() -> None:
    parser = XmlStreamParser()
    parser.feed(STREAM)
    stats = parser.statistics()
    assert stats.bytes_received == len(STREAM)
    assert stats.stanzas_received == 5


# -- limits ---------------------------------------------------------------


def test_limits_cannot_go_below_rfc_minimum() -> None:
    with pytest.raises(LocalProtocolError):
        XmlStreamParser(max_stanza_bytes=MIN_MAX_STANZA_BYTES - 1)
    with pytest.raises(LocalProtocolError):
        XmlStreamParser(max_depth=0)
    XmlStreamParser(max_stanza_bytes=MIN_MAX_STANZA_BYTES)
    assert DEFAULT_MAX_STANZA_BYTES >= MIN_MAX_STANZA_BYTES


def _stanza_of(size: int) -> bytes:
    frame = b"<message><body></body></message>"
    data = b"<message><body>" + b"x" * (size - len(frame)) + b"</body></message>"
    assert len(data) == size
    return data


@pytest.mark.parametrize("feed", [feed_whole, feed_bytewise])
def test_stanza_of_exactly_the_limit_passes(feed: object) -> None:
    limit = MIN_MAX_STANZA_BYTES
    data = RAW_HEADER + _stanza_of(limit) + _stanza_of(100)
    events = feed(data, max_stanza_bytes=limit)  # type: ignore[operator]
    assert kinds(events) == ["StreamOpened", "StanzaReceived", "StanzaReceived"]


@pytest.mark.parametrize("feed", [feed_whole, feed_bytewise])
def test_stanza_one_byte_over_the_limit_fails(feed: object) -> None:
    limit = MIN_MAX_STANZA_BYTES
    with pytest.raises(StreamError) as info:
        feed(RAW_HEADER + _stanza_of(limit + 1), max_stanza_bytes=limit)  # type: ignore[operator]
    assert info.value.condition == "policy-violation"


def _nested(depth: int) -> bytes:
    # The stanza element is depth 1.
    return b"<message>" + b"<a>" * (depth - 1) + b"</a>" * (depth - 1) + b"</message>"


def test_depth_limit_is_exact() -> None:
    events = feed_whole(RAW_HEADER + _nested(4), max_depth=4)
    assert len(stanzas(events)) == 1
    assert error_of(RAW_HEADER + _nested(5), max_depth=4).condition == "policy-violation"


def test_many_stanzas_in_one_feed_over_limit_total() -> None:
    # The limit is per stanza, not per feed.
    one = _stanza_of(5000)
    count = 3 * DEFAULT_MAX_STANZA_BYTES // len(one)
    events = feed_whole(RAW_HEADER + one * count)
    assert len(stanzas(events)) == count


# -- hypothesis -----------------------------------------------------------


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_arbitrary_bytes_raise_only_stream_error(data: bytes) -> None:
    parser = XmlStreamParser()
    try:
        parser.feed(data)
    except StreamError:
        pass


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=60), max_size=8))
def test_arbitrary_bytes_after_header_raise_only_stream_error(chunks: list[bytes]) -> None:
    parser = XmlStreamParser()
    parser.feed(HEADER)
    try:
        for chunk in chunks:
            parser.feed(chunk)
    except StreamError:
        pass


_xml_chars = st.characters(
    codec="utf-8",  # no lone surrogates
    exclude_characters="\ufffe\uffff",
    min_codepoint=0x09,
).filter(lambda ch: ch in "\t\n\r" or ord(ch) >= 0x20)
_texts = st.text(_xml_chars, max_size=30)
_namespaces = st.sampled_from(
    [NS_CLIENT, "urn:xmpp:ping", "http://jabber.org/protocol/disco#info", "urn:x:a&b'c"]
)
_local_names = st.sampled_from(["body", "x", "item", "a.b-c_d", "ünï"])
_attr_names = st.sampled_from(
    ["to", "from", "id", "type", "{" + NS_XML + "}lang", "{urn:example:attr}flag", "v"]
)


@st.composite
def _elements(draw: st.DrawFn, depth: int = 0) -> Element:
    ns = draw(_namespaces)
    elem = Element("{" + ns + "}" + draw(_local_names), draw(st.dictionaries(_attr_names, _texts, max_size=4)))
    elem.text = draw(_texts)
    if depth < 3:
        for child in draw(st.lists(_elements(depth + 1), max_size=3)):
            child.tail = draw(_texts)
            elem.append(child)
    return elem


@st.composite
def _stanzas(draw: st.DrawFn) -> Element:
    root = Element(C + draw(st.sampled_from(["message", "presence", "iq"])), draw(st.dictionaries(_attr_names, _texts, max_size=4)))
    root.text = draw(_texts)
    for child in draw(st.lists(_elements(1), max_size=3)):
        child.tail = draw(_texts)
        root.append(child)
    return root


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_stanzas())
def test_generated_stanzas_round_trip(elem: Element) -> None:
    assert canon(roundtrip(elem)) == canon(elem)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_stanzas(), min_size=1, max_size=5), st.data())
def test_generated_streams_are_split_invariant(elems: list[Element], data: st.DataObject) -> None:
    stream = HEADER + b"".join(encode_stanza(e) + b"\n" for e in elems) + encode_stream_footer()
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=30))
    events = feed_split(stream, cuts)
    assert stanzas(events) == [canon(e) for e in elems]
    assert isinstance(events[-1], StreamClosed)
