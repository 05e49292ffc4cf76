"""XEP-0115 entity capabilities of what a dtx device answers in disco#info.

A device answers XEP-0030 disco#info queries, on its dtx sessions
(:class:`dtx.proto.session.XmlSession`) and on XEP-0174 link-local streams
(:mod:`dtx.proto.linklocal`), with one identity (``client/device``, name
``dtx``) and the features :func:`disco_features` lists: XEP-0199 ping,
disco#info itself and ``SessionConfig.features``. Its ``_presence._tcp``
record carries the XEP-0115 ``node``, ``hash`` and ``ver`` of exactly that
answer, so a XEP-0174 client learns the features without asking.

``ver`` is computed as XEP-0115 section 5.1 says: identities sorted by
category, type and xml:lang, each ``category/type/lang/name<``, then the
features sorted, each ``var<``, the whole UTF-8 string hashed with SHA-1
and written in base64. Pure functions; no I/O.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from xml.etree.ElementTree import Element

from .. import stanza as st
from ..errors import DecodeError

__all__ = [
    "CAPS_HASH",
    "DEFAULT_CAPS_NODE",
    "DTX_IDENTITY",
    "Caps",
    "Identity",
    "caps_for",
    "caps_ver",
    "disco_features",
    "disco_info_answer",
    "ver_of_disco_info",
]

CAPS_HASH = "sha-1"
"""The hash function named in ``hash`` (the one every XEP-0115 client knows)."""

DEFAULT_CAPS_NODE = "urn:dtx"
"""The ``node``: a URI naming the software (XEP-0115 section 4)."""

_XML_LANG = "{http://www.w3.org/XML/1998/namespace}lang"
_NS = "{" + st.NS_DISCO_INFO + "}"


@dataclass(frozen=True, order=True)
class Identity:
    """A disco#info identity; ``lang`` is its xml:lang ('' if none)."""

    category: str
    type: str
    lang: str = ""
    name: str = ""


DTX_IDENTITY = Identity("client", "device", "", "dtx")
"""The identity every dtx disco#info answer carries (``stanza.disco_info_result``'s defaults)."""


@dataclass(frozen=True)
class Caps:
    """The XEP-0115 keys of a ``_presence._tcp`` TXT record."""

    node: str
    hash: str
    ver: str


def disco_features(extra: Iterable[str] = ()) -> tuple[str, ...]:
    """The features a dtx device answers with: ping, disco#info and ``extra``
    (``SessionConfig.features``), sorted, each once."""
    return tuple(sorted({st.NS_PING, st.NS_DISCO_INFO, *extra}))


def caps_ver(identities: Iterable[Identity], features: Iterable[str]) -> str:
    """The XEP-0115 (section 5.1) verification string, SHA-1 and base64."""
    parts = [f"{i.category}/{i.type}/{i.lang}/{i.name}<" for i in sorted(identities)]
    parts.extend(f"{var}<" for var in sorted(set(features)))
    digest = hashlib.sha1("".join(parts).encode("utf-8"), usedforsecurity=False).digest()
    return base64.b64encode(digest).decode("ascii")


def caps_for(extra_features: Iterable[str] = (), *, node: str = DEFAULT_CAPS_NODE) -> Caps:
    """The capabilities of a device whose sessions answer with ``extra_features``."""
    return Caps(node, CAPS_HASH, caps_ver([DTX_IDENTITY], disco_features(extra_features)))


def disco_info_answer(request: Element, extra_features: Iterable[str], *,
                      from_: str | None) -> Element:
    """The disco#info result a dtx device sends: :data:`DTX_IDENTITY` and
    :func:`disco_features` (the ``node`` of the query is echoed)."""
    return st.disco_info_result(request, list(disco_features(extra_features)),
                                category=DTX_IDENTITY.category, type_=DTX_IDENTITY.type,
                                name=DTX_IDENTITY.name, from_=from_)


def ver_of_disco_info(answer: Element) -> str:
    """The ``ver`` that a disco#info result (the ``<iq/>`` or its ``<query/>``)
    hashes to, for checking an advertised ``ver`` against what the entity
    really answers. Raises :class:`DecodeError` for an answer without a
    query, an identity without category or type, or a feature without var."""
    query = answer if answer.tag == _NS + "query" else answer.find(_NS + "query")
    if query is None:
        raise DecodeError("no disco#info query in the answer")
    identities: list[Identity] = []
    features: list[str] = []
    for child in query:
        if child.tag == _NS + "identity":
            category, type_ = child.get("category"), child.get("type")
            if not category or not type_:
                raise DecodeError("disco#info identity without category or type")
            identities.append(Identity(category, type_, child.get(_XML_LANG, ""),
                                       child.get("name", "")))
        elif child.tag == _NS + "feature":
            var = child.get("var")
            if not var:
                raise DecodeError("disco#info feature without var")
            features.append(var)
    return caps_ver(identities, features)
