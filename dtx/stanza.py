"""Building and reading XMPP stanzas as ElementTree elements.

Stanzas are :class:`xml.etree.ElementTree.Element` objects in the
``jabber:client`` namespace (tags such as ``{jabber:client}message``).
These helpers build the common ones and read their common fields.
"""

from __future__ import annotations

from xml.etree.ElementTree import Element, SubElement

NS_CLIENT = "jabber:client"
NS_PING = "urn:xmpp:ping"
NS_DISCO_INFO = "http://jabber.org/protocol/disco#info"
NS_STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"

MESSAGE = f"{{{NS_CLIENT}}}message"
PRESENCE = f"{{{NS_CLIENT}}}presence"
IQ = f"{{{NS_CLIENT}}}iq"
BODY = f"{{{NS_CLIENT}}}body"
STANZA_TAGS = frozenset({MESSAGE, PRESENCE, IQ})


def _attrs(**kw: str | None) -> dict[str, str]:
    return {k.rstrip("_"): v for k, v in kw.items() if v is not None}


def message(
    body: str | None = None,
    *,
    to: str | None = None,
    from_: str | None = None,
    type_: str | None = "chat",
    id_: str | None = None,
) -> Element:
    """A ``<message/>`` stanza, with a ``<body/>`` when ``body`` is given."""
    el = Element(MESSAGE, _attrs(to=to, from_=from_, type_=type_, id_=id_))
    if body is not None:
        SubElement(el, BODY).text = body
    return el


def presence(
    *,
    to: str | None = None,
    from_: str | None = None,
    type_: str | None = None,
    show: str | None = None,
    status: str | None = None,
) -> Element:
    """A ``<presence/>`` stanza."""
    el = Element(PRESENCE, _attrs(to=to, from_=from_, type_=type_))
    if show is not None:
        SubElement(el, f"{{{NS_CLIENT}}}show").text = show
    if status is not None:
        SubElement(el, f"{{{NS_CLIENT}}}status").text = status
    return el


def iq(
    type_: str,
    id_: str,
    *,
    to: str | None = None,
    from_: str | None = None,
    payload: Element | None = None,
) -> Element:
    """An ``<iq/>`` stanza of ``type_`` (get, set, result, error)."""
    el = Element(IQ, _attrs(type_=type_, id_=id_, to=to, from_=from_))
    if payload is not None:
        el.append(payload)
    return el


def ping(id_: str, *, to: str | None = None) -> Element:
    """A XEP-0199 ping request."""
    return iq("get", id_, to=to, payload=Element(f"{{{NS_PING}}}ping"))


def is_ping(el: Element) -> bool:
    return (
        el.tag == IQ
        and el.get("type") == "get"
        and len(el) == 1
        and el[0].tag == f"{{{NS_PING}}}ping"
    )


def is_disco_info_query(el: Element) -> bool:
    return (
        el.tag == IQ
        and el.get("type") == "get"
        and len(el) == 1
        and el[0].tag == f"{{{NS_DISCO_INFO}}}query"
    )


def result_for(request: Element, *, from_: str | None = None) -> Element:
    """An empty ``result`` answering the iq ``request``."""
    return iq(
        "result",
        request.get("id", ""),
        to=request.get("from"),
        from_=from_ or request.get("to"),
    )


def error_for(
    request: Element, condition: str, *, type_: str = "cancel", from_: str | None = None
) -> Element:
    """An ``error`` answering the iq ``request`` (RFC 6120 section 8.3)."""
    el = iq(
        "error",
        request.get("id", ""),
        to=request.get("from"),
        from_=from_ or request.get("to"),
    )
    err = SubElement(el, f"{{{NS_CLIENT}}}error", {"type": type_})
    SubElement(err, f"{{{NS_STANZAS}}}{condition}")
    return el


def disco_info_result(
    request: Element,
    features: list[str],
    *,
    category: str = "client",
    type_: str = "device",
    name: str = "dtx",
    from_: str | None = None,
) -> Element:
    """A XEP-0030 disco#info result listing ``features``."""
    el = result_for(request, from_=from_)
    query = SubElement(el, f"{{{NS_DISCO_INFO}}}query")
    node = request[0].get("node")
    if node is not None:
        query.set("node", node)
    SubElement(
        query,
        f"{{{NS_DISCO_INFO}}}identity",
        {"category": category, "type": type_, "name": name},
    )
    for var in sorted(set(features)):
        SubElement(query, f"{{{NS_DISCO_INFO}}}feature", {"var": var})
    return el


def body_of(el: Element) -> str | None:
    """The text of a message's ``<body/>``, or None."""
    body = el.find(BODY)
    return None if body is None else (body.text or "")
