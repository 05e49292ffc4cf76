"""The pin store's file format: a journal of changes, one JSON record per line.

Version 2 (written by dtx since the pin store has a background writer)::

    {"version": 2, "format": "dtx pin journal"}
    {"pin": "tv@example.org/living-room", "key": "<base64>", "fingerprint": "SHA256:..."}
    {"forget": "tv@example.org"}

Replaying the records in order gives the pins; a bare JID in ``forget``
forgets every device of the account. Version 1 (one JSON document,
``{"version": 1, "pins": {JID: {"key": ...}}}``) is still read, one value
at a time. Pure functions on bytes and file objects; the writer is
:mod:`dtx.trust.pinjournal`, the store :mod:`dtx.trust.pins`. Internal:
the public API is :class:`dtx.trust.PinStore`.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import BinaryIO, Final

from dtx.errors import JIDError, TrustError
from dtx.identity import PUBLIC_KEY_BYTES, fingerprint
from dtx.jid import JID

_JOURNAL_VERSION: Final = 2
HEADER: Final = b'{"version": 2, "format": "dtx pin journal"}\n'
#: A journal line longer than this is malformed (a JID is at most 3 KiB of
#: UTF-8, about 9 KiB escaped); it is skipped.
MAX_LINE_BYTES: Final = 16 * 1024
#: A legacy (version 1) file is parsed one JSON value at a time; no value
#: in it may be larger than this.
_MAX_V1_VALUE_CHARS: Final = 1 << 20
_READ_BYTES: Final = 64 * 1024


def bare_of(full: str) -> str:
    """The account of a normalised JID string (no '/' before the resource)."""
    return full.partition("/")[0]



@dataclass(frozen=True, slots=True)
class Change:
    """One change: pin ``key`` for ``jid``, or forget ``jid`` (``key`` None;
    a bare JID forgets the whole account). Replaying a sequence of changes
    twice gives the same pins as replaying it once."""

    jid: str
    key: bytes | None



def encode_change(op: Change) -> bytes:
    if op.key is None:
        doc: dict[str, str] = {"forget": op.jid}
    else:
        doc = {
            "pin": op.jid,
            "key": base64.b64encode(op.key).decode("ascii"),
            "fingerprint": fingerprint(op.key),
        }
    return json.dumps(doc).encode("ascii") + b"\n"


def decode_change(line: bytes) -> Change | None:
    """One journal line, or None if it is not a valid record."""
    try:
        doc = json.loads(line)
    except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError
        return None
    if not isinstance(doc, dict):
        return None
    try:
        if isinstance(doc.get("pin"), str) and isinstance(doc.get("key"), str):
            key = base64.b64decode(doc["key"], validate=True)
            if len(key) != PUBLIC_KEY_BYTES:
                return None
            return Change(JID.parse(doc["pin"]).full, key)
        if isinstance(doc.get("forget"), str):
            return Change(JID.parse(doc["forget"]).full, None)
    except (JIDError, binascii.Error, ValueError):
        return None
    return None


@dataclass
class Scan:
    """What reading (part of) a journal found."""

    ops: list[Change]
    records: int = 0
    skipped: int = 0
    end: int = 0
    """Offset just after the last complete line."""
    partial: bool = False
    """Bytes after ``end`` that do not end in a newline (a torn append)."""


def scan_lines(f: BinaryIO, start: int, limit: int | None = None) -> Scan:
    """Read journal records from ``start`` to the end of the file (with
    ``limit``, stop once more than ``limit`` records were read)."""
    f.seek(start)
    scan = Scan([], end=start)
    while limit is None or scan.records <= limit:
        line = f.readline(MAX_LINE_BYTES + 1)
        if not line:
            break
        if not line.endswith(b"\n"):
            if len(line) <= MAX_LINE_BYTES:
                scan.partial = True  # torn: the file ends inside this line
                break
            while line and not line.endswith(b"\n"):  # overlong: skip it
                line = f.readline(MAX_LINE_BYTES + 1)
            if not line:
                scan.partial = True
                break
            scan.skipped += 1
        else:
            op = decode_change(line)
            if op is None:
                scan.skipped += 1
            else:
                scan.ops.append(op)
        scan.records += 1
        scan.end = f.tell()
    return scan


def is_journal_header(line: bytes) -> bool:
    try:
        doc = json.loads(line)
    except (ValueError, RecursionError):
        return False
    return isinstance(doc, dict) and doc.get("version") == _JOURNAL_VERSION and "pins" not in doc


_WS = re.compile(r"[ \t\r\n]*")


class V1Reader:
    """Reads a version-1 pin file (one JSON object, ``{"version": 1,
    "pins": {JID: {"key": ...}}}``) one value at a time, so a file of any
    size costs memory for one entry, not for the whole document."""

    def __init__(self, f: BinaryIO, where: str) -> None:
        self._f = f
        self._where = where
        self._buf = ""
        self._pos = 0
        self._eof = False
        self._utf8 = codecs.getincrementaldecoder("utf-8")()
        self._json = json.JSONDecoder()

    def _error(self, what: str) -> TrustError:
        return TrustError(f"{self._where}: {what}")

    def _not_json(self, what: str) -> TrustError:
        return TrustError(f"{self._where} is not valid JSON: {what}")

    def _more(self) -> None:
        chunk = self._f.read(_READ_BYTES)
        try:
            text = self._utf8.decode(chunk, final=not chunk)
        except UnicodeDecodeError as exc:
            raise self._not_json(f"not UTF-8 ({exc.reason})") from None
        self._eof = not chunk
        self._buf = self._buf[self._pos :] + text
        self._pos = 0

    def peek(self) -> str:
        """The next character that is not whitespace; "" at the end."""
        while True:
            match = _WS.match(self._buf, self._pos)
            self._pos = match.end() if match else self._pos
            if self._pos < len(self._buf):
                return self._buf[self._pos]
            if self._eof:
                return ""
            self._more()

    def expect(self, chars: str) -> str:
        c = self.peek()
        if not c or c not in chars:
            raise self._not_json(f"expected one of {chars!r}, found {c!r}")
        self._pos += 1
        return c

    def value(self) -> object:
        self.peek()
        while True:
            try:
                obj, end = self._json.raw_decode(self._buf, self._pos)
            except json.JSONDecodeError:
                end = -1
            except RecursionError:
                raise self._not_json("nested too deeply") from None
            # A value that ends where the buffer does may go on (a number).
            if end >= 0 and (end < len(self._buf) or self._eof):
                self._pos = end
                return obj
            if self._eof:
                raise self._not_json("malformed value")
            if len(self._buf) - self._pos > _MAX_V1_VALUE_CHARS:
                raise self._error(f"a value longer than {_MAX_V1_VALUE_CHARS} characters")
            self._more()

    def pins(self, full: Callable[[], bool]) -> Iterable[tuple[str, bytes] | None]:
        """Every entry, validated as the version-1 reader always did (a bad
        entry makes the file unusable); then the document's own checks.
        While ``full()`` says no more pins can be kept, entries are yielded
        as None, unchecked (reading on only to find the document's end)."""
        version: object = None
        seen_pins = False
        self.expect("{")
        if self.peek() == "}":
            self._pos += 1
        else:
            while True:
                name = self.value()
                if not isinstance(name, str):
                    raise self._error("an object key is not a string")
                self.expect(":")
                if name == "pins":
                    if self.peek() != "{":
                        raise self._error('"pins" is not an object')
                    seen_pins = True
                    yield from self._entries(full)
                else:
                    value = self.value()
                    if name == "version":
                        version = value
                if self.expect(",}") == "}":
                    break
        if self.peek():
            raise self._not_json("data after the document")
        if version != 1 or not seen_pins:
            raise self._error('expected an object with "version": 1 and "pins" (or a journal)')

    def _entries(self, full: Callable[[], bool]) -> Iterable[tuple[str, bytes] | None]:
        self.expect("{")
        if self.peek() == "}":
            self._pos += 1
            return
        while True:
            jid_text = self.value()
            self.expect(":")
            entry = self.value()
            if full():
                yield None
                if self.expect(",}") == "}":
                    return
                continue
            key_text = entry.get("key") if isinstance(entry, dict) else None
            if not isinstance(jid_text, str) or not isinstance(key_text, str):
                raise self._error(f'entry for {jid_text!r} has no "key" string')
            try:
                jid = JID.parse(jid_text)
                key = base64.b64decode(key_text, validate=True)
            except (JIDError, binascii.Error, ValueError) as exc:
                raise self._error(f"bad entry for {jid_text!r}: {exc}") from exc
            if len(key) != PUBLIC_KEY_BYTES:
                raise self._error(f"key for {jid_text!r} is not {PUBLIC_KEY_BYTES} bytes")
            yield jid.full, key
            if self.expect(",}") == "}":
                return
