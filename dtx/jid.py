"""Jabber IDs (RFC 7622), parsed and compared in a simple, practical form.

A JID is ``[local@]domain[/resource]``. dtx does not implement the full
PRECIS profiles (RFC 8264/8265/8266) that RFC 7622 asks for. Instead it:

- applies Unicode NFC to every part;
- lower-cases the local part and the domain (so ``Alice@Example.ORG`` and
  ``alice@example.org`` are the same JID); the resource is kept as given,
  because RFC 7622 makes it case-sensitive;
- drops one trailing dot from the domain (RFC 7622 section 3.2);
- refuses parts longer than 1023 bytes of UTF-8, an empty domain, an empty
  local part or resource when its separator is present, whitespace and
  control characters in the local part and domain, the characters
  ``" & ' / : < > @`` in the local part (RFC 7622 section 3.3.1), and
  ``@ / \\ " & ' < >`` or empty labels in the domain (an IPv6 literal in
  brackets is accepted as is). Resources may hold spaces, ``@`` and ``/``
  but no control characters.

This is stricter than RFC 7622 in places and looser in others (no width
mapping, no bidi rule); two strings dtx considers equal are equal to any
XMPP server too, which is what matters for key lookup.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

from dtx.errors import JIDError

__all__ = ["JID", "MAX_PART_BYTES", "jid_matches", "parse_jid"]

MAX_PART_BYTES = 1023
"""Longest local part, domain or resource, in bytes of UTF-8 (RFC 7622)."""

_LOCAL_FORBIDDEN = frozenset("\"&'/:<>@")
_DOMAIN_FORBIDDEN = frozenset("@/\\\"&'<>")


def _has_space_or_control(s: str) -> bool:
    return any(
        ch.isspace() or unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp")
        for ch in s
    )


def _has_control(s: str) -> bool:
    return any(unicodedata.category(ch) in ("Cc", "Zl", "Zp") for ch in s)


def _check_length(what: str, value: str) -> None:
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError as exc:  # lone surrogates
        raise JIDError(f"{what} is not valid Unicode: {value!r}") from exc
    if size > MAX_PART_BYTES:
        raise JIDError(f"{what} is {size} bytes long; the limit is {MAX_PART_BYTES}")


def _normalize_local(local: str) -> str:
    local = unicodedata.normalize("NFC", local).lower()
    if not local:
        raise JIDError("empty local part")
    _check_length("local part", local)
    bad = sorted(set(local) & _LOCAL_FORBIDDEN)
    if bad:
        raise JIDError(f"local part {local!r} contains forbidden {''.join(bad)!r}")
    if _has_space_or_control(local):
        raise JIDError(f"local part {local!r} contains whitespace or control characters")
    return local


def _normalize_domain(domain: str) -> str:
    domain = unicodedata.normalize("NFC", domain).lower()
    if domain.endswith(".") and len(domain) > 1:
        domain = domain[:-1]
    if not domain:
        raise JIDError("empty domain")
    _check_length("domain", domain)
    if _has_space_or_control(domain):
        raise JIDError(f"domain {domain!r} contains whitespace or control characters")
    bad = sorted(set(domain) & _DOMAIN_FORBIDDEN)
    if bad:
        raise JIDError(f"domain {domain!r} contains forbidden {''.join(bad)!r}")
    if domain.startswith("[") and domain.endswith("]"):
        inner = domain[1:-1]
        if not inner or any(ch not in "0123456789abcdef:." for ch in inner):
            raise JIDError(f"domain {domain!r} is not an IPv6 literal")
        return domain
    if any(not label for label in domain.split(".")):
        raise JIDError(f"domain {domain!r} has an empty label")
    if any(ch in "[]:" for ch in domain):
        raise JIDError(f"domain {domain!r} contains '[', ']' or ':'")
    return domain


def _normalize_resource(resource: str) -> str:
    resource = unicodedata.normalize("NFC", resource)
    if not resource:
        raise JIDError("empty resource")
    _check_length("resource", resource)
    if _has_control(resource):
        raise JIDError(f"resource {resource!r} contains control characters")
    return resource


@dataclass(frozen=True)
class JID:
    """A parsed, normalised JID. Construct with :meth:`parse` or directly
    (``JID("tv", "example.org", "living-room")``); both validate and
    normalise, so equal JIDs compare equal and hash alike."""

    local: str | None
    domain: str
    resource: str | None = None

    def __post_init__(self) -> None:
        if self.local is not None:
            object.__setattr__(self, "local", _normalize_local(self.local))
        object.__setattr__(self, "domain", _normalize_domain(self.domain))
        if self.resource is not None:
            object.__setattr__(self, "resource", _normalize_resource(self.resource))

    @classmethod
    def parse(cls, s: str) -> JID:
        """Parse ``[local@]domain[/resource]``; raise :class:`JIDError`.

        As RFC 7622 section 3.2 says, the resource starts at the first
        ``/``, and the local part ends at the first ``@`` before it.
        """
        if not isinstance(s, str):
            raise JIDError(f"a JID is a string, not {type(s).__name__}")
        rest, slash, resource = s.partition("/")
        local, at, domain = rest.partition("@")
        if not at:
            local, domain = "", rest
        return cls(
            local if at else None,
            domain,
            resource if slash else None,
        )

    @property
    def bare(self) -> JID:
        """This JID without its resource."""
        if self.resource is None:
            return self
        return JID(self.local, self.domain, None)

    @property
    def is_bare(self) -> bool:
        """True when there is no resource (an account, not a device)."""
        return self.resource is None

    @property
    def full(self) -> str:
        """The JID as a string, resource included when there is one."""
        s = self.domain if self.local is None else f"{self.local}@{self.domain}"
        return s if self.resource is None else f"{s}/{self.resource}"

    def with_resource(self, resource: str) -> JID:
        """The same account with the given device resource."""
        return JID(self.local, self.domain, resource)

    def __str__(self) -> str:
        return self.full


def jid_matches(requested: str | JID, peer: str | JID) -> bool:
    """True when ``peer`` is a device that a request for ``requested``
    reaches: a full JID only that device, a bare JID every device of the
    account. A string that is not a valid JID matches nothing."""
    try:
        wanted = requested if isinstance(requested, JID) else JID.parse(requested)
        have = peer if isinstance(peer, JID) else JID.parse(peer)
    except JIDError:
        return False
    return have == wanted if wanted.resource is not None else have.bare == wanted


def parse_jid(s: str) -> JID:
    """Same as :meth:`JID.parse`."""
    return JID.parse(s)
