"""Hostile XML: each attack ends in the right stream error, with memory bounded.

Peak allocation is measured with ``tracemalloc`` (expat allocates through
Python's allocator, so its buffers are counted too). Attack input that is
fed whole is built before tracing starts, so only the parser's own
allocations are measured.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

from dtx.errors import StreamError
from dtx.proto.xmlstream import (
    DEFAULT_MAX_STANZA_BYTES,
    StanzaReceived,
    XmlEvent,
    XmlStreamParser,
)

HEADER = (
    b"<?xml version='1.0'?><stream:stream xmlns='jabber:client'"
    b" xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>"
)
MAX = DEFAULT_MAX_STANZA_BYTES
CHUNK = 64 * 1024
MB = 1024 * 1024


@dataclass
class Peak:
    bytes: int = 0


@contextmanager
def peak_allocation() -> Iterator[Peak]:
    """Measure the peak of Python allocations inside the block."""
    peak = Peak()
    tracemalloc.start()
    try:
        yield peak
    finally:
        peak.bytes = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()


def condition_of(data: bytes) -> str:
    parser = XmlStreamParser()
    with pytest.raises(StreamError) as info:
        parser.feed(data)
    return info.value.condition


def condition_bytewise(data: bytes) -> str:
    parser = XmlStreamParser()
    with pytest.raises(StreamError) as info:
        for i in range(len(data)):
            parser.feed(data[i : i + 1])
    return info.value.condition


def feed_chunks(
    parser: XmlStreamParser, prefix: bytes, chunk: bytes, total_bytes: int
) -> tuple[StreamError | None, int]:
    """Feed ``prefix`` then ``chunk`` repeatedly up to ``total_bytes``.

    Returns the error raised (or None) and how many bytes had been fed when
    it was raised, counting the failing call.
    """
    fed = 0
    try:
        fed += len(prefix)
        parser.feed(prefix)
        for _ in range(total_bytes // len(chunk)):
            fed += len(chunk)
            parser.feed(chunk)
    except StreamError as exc:
        return exc, fed
    return None, fed


# -- entity expansion and DTDs -------------------------------------------


BILLION_LAUGHS = (
    b'<?xml version="1.0"?>\n<!DOCTYPE lolz [\n <!ENTITY lol "lol">\n'
    + b"".join(
        b' <!ENTITY lol%d "%s">\n' % (i, (b"&lol%d;" % (i - 1) if i > 1 else b"&lol;") * 10)
        for i in range(1, 10)
    )
    + b"]>\n"
    + HEADER[len(b"<?xml version='1.0'?>") :]
    + b"<message><body>&lol9;</body></message>"
)

QUADRATIC = (
    b'<!DOCTYPE stream:stream [<!ENTITY a "' + b"A" * 50_000 + b'">]>'
    + HEADER[len(b"<?xml version='1.0'?>") :]
    + b"<message><body>" + b"&a;" * 10_000 + b"</body></message>"
)

EXTERNAL_ENTITY = (
    b'<?xml version="1.0"?><!DOCTYPE stream:stream ['
    b'<!ENTITY xxe SYSTEM "file:///etc/passwd">]>'
    + HEADER[len(b"<?xml version='1.0'?>") :]
    + b"<message><body>&xxe;</body></message>"
)

EXTERNAL_PARAMETER_ENTITY = (
    b'<!DOCTYPE stream:stream [<!ENTITY % pe SYSTEM "file:///etc/passwd"> %pe;]>'
    + HEADER[len(b"<?xml version='1.0'?>") :]
)

EXTERNAL_DTD = (
    b'<?xml version="1.0"?><!DOCTYPE stream:stream SYSTEM "http://203.0.113.7/evil.dtd">'
    + HEADER[len(b"<?xml version='1.0'?>") :]
)

PUBLIC_DTD = (
    b'<!DOCTYPE stream:stream PUBLIC "-//EVIL//DTD//EN" "http://203.0.113.7/evil.dtd">'
    + HEADER[len(b"<?xml version='1.0'?>") :]
)

INTERNAL_DTD = (
    b"<!DOCTYPE stream:stream [<!ELEMENT stream:stream ANY>"
    b"<!ATTLIST stream:stream version CDATA '9.9'>]>"
    + HEADER[len(b"<?xml version='1.0'?>") :]
)

UNPARSED_ENTITY = (
    b'<!DOCTYPE stream:stream [<!NOTATION gif SYSTEM "image/gif">'
    b'<!ENTITY pic SYSTEM "file:///x.gif" NDATA gif>]>'
    + HEADER[len(b"<?xml version='1.0'?>") :]
)


@pytest.mark.parametrize(
    "data",
    [
        BILLION_LAUGHS,
        QUADRATIC,
        EXTERNAL_ENTITY,
        EXTERNAL_PARAMETER_ENTITY,
        EXTERNAL_DTD,
        PUBLIC_DTD,
        INTERNAL_DTD,
        UNPARSED_ENTITY,
    ],
    ids=[
        "billion-laughs",
        "quadratic-blowup",
        "external-entity",
        "external-parameter-entity",
        "external-dtd",
        "public-dtd",
        "internal-dtd",
        "unparsed-entity",
    ],
)
def test_dtd_attacks_are_restricted_xml(data: bytes) -> None:
    with peak_allocation() as peak:
        assert condition_of(data) == "restricted-xml"
    # Refused at <!DOCTYPE: nothing was declared, let alone expanded; in
    # particular expat's own amplification limit never came into play.
    assert peak.bytes < 1 * MB


@pytest.mark.parametrize("data", [BILLION_LAUGHS, EXTERNAL_ENTITY, INTERNAL_DTD])
def test_dtd_attacks_split_bytewise(data: bytes) -> None:
    assert condition_bytewise(data) == "restricted-xml"


def test_doctype_inside_the_stream_is_not_well_formed() -> None:
    # Where XML allows no document type declaration expat reports a syntax
    # error before any handler sees it.
    assert condition_of(HEADER + b"<!DOCTYPE x [<!ENTITY a 'b'>]>") == "not-well-formed"


@pytest.mark.parametrize(
    "data",
    [
        HEADER + b"<message><body>&foo;</body></message>",
        HEADER + b"<message to='&foo;'/>",
        HEADER + b"<message>&lol9;</message>",
        HEADER + b"&foo;",
    ],
    ids=["text", "attribute", "laughs-without-dtd", "stream-level"],
)
def test_unknown_entity_is_restricted_xml(data: bytes) -> None:
    assert condition_of(data) == "restricted-xml"
    assert condition_bytewise(data) == "restricted-xml"


def test_predefined_entities_and_char_refs_are_fine() -> None:
    parser = XmlStreamParser()
    events = parser.feed(
        HEADER + b"<message><body>&lt;&gt;&amp;&apos;&quot;&#65;&#x1F600;</body></message>"
    )
    stanza = events[-1]
    assert isinstance(stanza, StanzaReceived)
    assert stanza.element[0].text == "<>&'\"A\U0001f600"


# -- comments and processing instructions --------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"<!-- hello -->" + HEADER,
        b"<?xml version='1.0'?><!-- hello -->",
        HEADER + b"<!-- between stanzas -->",
        HEADER + b"<message><!-- inside --></message>",
        b"<?xml-stylesheet href='x'?>" + HEADER,
        HEADER + b"<?evil data?>",
        HEADER + b"<message><body><?php echo 1 ?></body></message>",
    ],
    ids=[
        "comment-before-header",
        "comment-after-declaration",
        "comment-between-stanzas",
        "comment-in-stanza",
        "pi-before-header",
        "pi-between-stanzas",
        "pi-in-stanza",
    ],
)
def test_comments_and_processing_instructions_are_restricted_xml(data: bytes) -> None:
    assert condition_of(data) == "restricted-xml"
    assert condition_bytewise(data) == "restricted-xml"


# -- size and depth ------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "prefix", "chunk", "bound"),
    [
        ("text-node", HEADER + b"<message><body>", b"a" * CHUNK, 4 * MB),
        ("attribute-value", HEADER + b"<message to='", b"a" * CHUNK, 4 * MB),
        ("start-tag-never-ends", HEADER + b"<message", b" " * CHUNK, 4 * MB),
        ("attribute-name-never-ends", HEADER + b"<message a", b"a" * CHUNK, 4 * MB),
        ("stream-header-never-ends", b"<stream:stream ", b" " * CHUNK, 4 * MB),
        ("declaration-never-ends", b"<?xml version='1.0' ", b" " * CHUNK, 4 * MB),
        ("cdata-section", HEADER + b"<message><![CDATA[", b"a" * CHUNK, 4 * MB),
        ("many-children", HEADER + b"<message>", b"<a/>" * (CHUNK // 4), 32 * MAX),
        (
            "many-attributes",
            HEADER + b"<message",
            b"".join(b" a%d=''" % i for i in range(CHUNK // 8))[:CHUNK],
            4 * MB,
        ),
    ],
)
def test_64_mb_in_chunks_fails_at_the_limit(
    name: str, prefix: bytes, chunk: bytes, bound: int
) -> None:
    parser = XmlStreamParser()
    with peak_allocation() as peak:
        error, fed = feed_chunks(parser, prefix, chunk, 64 * MB)
    assert error is not None, name
    assert error.condition == "policy-violation"
    # Fails on the chunk that crosses the limit, not after 64 MB.
    assert fed <= len(prefix) + MAX + CHUNK
    assert peak.bytes < bound, f"{name}: peak {peak.bytes} bytes"


@pytest.mark.parametrize(
    "data",
    [
        HEADER + b"<message><body>" + b"a" * (64 * MB),
        HEADER + b"<message to='" + b"a" * (64 * MB),
    ],
    ids=["text-node", "attribute-value"],
)
def test_64_mb_in_one_feed_fails_without_buffering_it(data: bytes) -> None:
    parser = XmlStreamParser()
    with peak_allocation() as peak:
        with pytest.raises(StreamError) as info:
            parser.feed(data)
    assert info.value.condition == "policy-violation"
    assert parser.statistics().bytes_received <= len(HEADER) + MAX + CHUNK
    assert peak.bytes < 4 * MB


def test_100000_deep_nesting_is_policy_violation() -> None:
    data = HEADER + b"<message>" + b"<a>" * 100_000
    with peak_allocation() as peak:
        assert condition_of(data) == "policy-violation"
    assert peak.bytes < 1 * MB


def test_deep_nesting_split_bytewise() -> None:
    assert condition_bytewise(HEADER + b"<message>" + b"<a>" * 100) == "policy-violation"


def test_small_limit_is_enforced_within_one_feed() -> None:
    # A stanza that starts and ends inside one slice is still measured.
    parser = XmlStreamParser(max_stanza_bytes=10_000)
    with pytest.raises(StreamError) as info:
        parser.feed(HEADER + b"<message><body>" + b"a" * 20_000 + b"</body></message>")
    assert info.value.condition == "policy-violation"


def test_whitespace_flood_between_stanzas_is_harmless() -> None:
    parser = XmlStreamParser()
    parser.feed(HEADER)
    events: list[XmlEvent] = []
    with peak_allocation() as peak:
        for _ in range(64):  # 4 MB of keepalive whitespace, far over the limit
            events += parser.feed(b" \n" * (CHUNK // 2))
        events += parser.feed(b"<message/>")
    assert [type(e) for e in events] == [StanzaReceived]
    assert peak.bytes < 1 * MB


@pytest.mark.parametrize(
    "template",
    [
        b"<message><x%d/></message>",
        b"<message a%d='1'/>",
        b"<message><x xmlns='urn:n%d'/></message>",
        b"<message><p%d:x xmlns:p%d='urn:x'/></message>",
    ],
    ids=["element-names", "attribute-names", "namespaces", "prefixes"],
)
def test_endless_distinct_names_are_policy_violation(template: bytes) -> None:
    # expat remembers every name for the life of the document, so a stream
    # of ever new names would grow memory without end; it is cut off.
    parser = XmlStreamParser(max_names=1000)
    parser.feed(HEADER)
    batches = [
        b"".join(template.replace(b"%d", b"%d" % (k * 100 + i)) for i in range(100))
        for k in range(40)
    ]
    delivered = 0
    with peak_allocation() as peak:
        with pytest.raises(StreamError) as info:
            for batch in batches:
                delivered += len(parser.feed(batch))
    assert info.value.condition == "policy-violation"
    assert 200 <= delivered <= 1000
    assert peak.bytes < 2 * MB


def test_a_fixed_vocabulary_never_hits_the_name_limit() -> None:
    parser = XmlStreamParser(max_names=100)
    parser.feed(HEADER)
    stanza = (
        b"<message to='a' xml:lang='en'><body>x</body>"
        b"<p:x xmlns:p='urn:p' p:y='1'/><ping xmlns='urn:xmpp:ping'/></message>"
    )
    delivered = 0
    for _ in range(100):
        delivered += len(parser.feed(stanza * 100))
    assert delivered == 10_000
    assert parser.statistics().stanzas_received == 10_000


def test_many_small_stanzas_in_one_feed_are_all_delivered() -> None:
    # The limit is per stanza; 1 MB of small stanzas in one call is fine.
    stanza = b"<message><body>" + b"x" * 1000 + b"</body></message>"
    count = MB // len(stanza)
    parser = XmlStreamParser()
    events = parser.feed(HEADER + stanza * count)
    assert sum(isinstance(e, StanzaReceived) for e in events) == count


def test_an_empty_default_namespace_is_not_a_crash() -> None:
    """expat reports ``xmlns=""`` with no URI at all; found by the fuzz test
    (a TypeError escaped the parser). Whole and byte by byte, the parser's
    answer is its typed error."""
    data = b'<?xml version=""?><s xmlns="" x="" v="">'
    for step in (len(data), 1):
        parser = XmlStreamParser()
        with pytest.raises(StreamError, match="first element"):
            for i in range(0, len(data), step):
                parser.feed(data[i:i + step])
    with pytest.raises(StreamError, match="unexpected element"):
        XmlStreamParser().feed(HEADER + b"<message xmlns=''><body>x</body></message>")
