"""The NAT mapping check: what the server's mapping port accepts, and
what a check tells (docs/protocol.md 7.7).

A registered device sends the KEEPALIVE it sends to the primary port to
the mapping port too, from its one socket. Its NAT maps that socket to
the same public address towards both ports unless the mapping depends on
the destination port ("symmetric", RFC 4787 address-and-port-dependent
mapping): the source port the mapping port sees tells which. Both ports
are on one IP, so a NAT whose mapping depends on the destination IP only
(address-dependent) looks independent here; it keeps one public port per
server IP, which is what a peer behind another NAT can be told about
anyway.

Pure functions; the core (:mod:`rendezvous.core`) owns the registrations,
the budgets and the counters. The mapping port never answers anything
but STUN.
"""

from __future__ import annotations

from dtx.errors import DecodeError
from dtx.wire.control import MessageType, NatMapping, decode_control
from dtx.wire.demux import CONTROL_FIRST_BYTE
from dtx.wire.stun import Address

__all__ = ["check_registration", "observed_mapping"]


def check_registration(data: bytes) -> bytes | None:
    """The registration id of a mapping check (a CONTROL KEEPALIVE), or
    None for anything else, which the mapping port drops."""
    if not data or data[0] != CONTROL_FIRST_BYTE:
        return None
    try:
        msg = decode_control(data)
    except DecodeError:
        return None
    if msg.type != MessageType.KEEPALIVE:
        return None
    return msg.registration


def observed_mapping(registered: Address, src: Address) -> NatMapping | None:
    """The mapping a check from ``src`` shows for a device registered from
    ``registered`` (both normalised); None when it comes from another IP,
    which tells nothing about the device's NAT."""
    if src[0] != registered[0]:
        return None
    return NatMapping.INDEPENDENT if src[1] == registered[1] else NatMapping.DEPENDENT
