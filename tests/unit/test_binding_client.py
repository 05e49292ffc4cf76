"""The sans-IO STUN Binding client: one transaction, RFC 8489's schedule."""

from __future__ import annotations

import random

import pytest

from dtx.proto.binding import BindingClient, BindingConfig, ReflexiveFailed, ReflexiveFound
from dtx.wire.stun import (
    StunClass,
    StunMessage,
    StunMethod,
    decode_stun,
    encode_stun,
    error_code_attribute,
    xor_address_attribute,
)

SERVER = ("192.0.2.10", 3478)
MAPPED = ("203.0.113.7", 40001)


def answer(request: bytes, cls: StunClass = StunClass.SUCCESS, *,
           txid: bytes | None = None) -> bytes:
    req = decode_stun(request)
    tid = txid or req.transaction_id
    attrs = ((xor_address_attribute(MAPPED, tid),)
             if cls is StunClass.SUCCESS else (error_code_attribute(400, "Bad Request"),))
    return encode_stun(StunMessage(StunMethod.BINDING, cls, tid, attrs))


def started(now: float = 0.0) -> tuple[BindingClient, bytes]:
    client = BindingClient(SERVER, rng=random.Random(3))
    client.start(now)
    [(request, to)] = client.datagrams_to_send()
    assert to == SERVER and decode_stun(request).method == StunMethod.BINDING
    return client, request


def test_the_answer_gives_the_reflexive_address() -> None:
    client, request = started()
    client.receive(answer(request), 0.05)
    assert client.next_event() == ReflexiveFound(SERVER, MAPPED)
    assert client.mapped == MAPPED and client.done and client.get_timer() is None
    client.receive(answer(request), 0.06)  # a late duplicate changes nothing
    assert client.next_event() is None and client.ignored == 1


def test_retransmits_on_the_rfc_schedule_then_fails() -> None:
    client, _ = started()
    sent_at = [0.0]
    for _ in range(100):
        when = client.get_timer()
        if when is None:
            break
        client.handle_timer(when)
        if client.datagrams_to_send():
            sent_at.append(when)
    assert sent_at == [0.0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5]  # 7 transmissions
    event = client.next_event()
    assert isinstance(event, ReflexiveFailed) and "7 requests" in event.reason
    assert client.get_timer() is None  # bounded: nothing more


@pytest.mark.parametrize("bad", ["other-txid", "garbage", "request", "error"])
def test_what_does_not_answer_is_ignored_or_fails(bad: str) -> None:
    client, request = started()
    if bad == "other-txid":
        client.receive(answer(request, txid=bytes(12)), 0.1)
    elif bad == "garbage":
        client.receive(b"\x00\x01\x00\x00garbage", 0.1)
    elif bad == "request":
        client.receive(request, 0.1)  # our own request reflected back
    else:
        client.receive(answer(request, StunClass.ERROR), 0.1)
        event = client.next_event()
        assert isinstance(event, ReflexiveFailed) and client.done
        return
    assert client.next_event() is None and not client.done and client.ignored == 1
    client.receive(answer(request), 0.2)  # the real answer still counts
    assert client.next_event() == ReflexiveFound(SERVER, MAPPED)


def test_start_twice_and_bad_config_are_refused() -> None:
    client, _ = started()
    with pytest.raises(Exception, match="twice"):
        client.start(1.0)
    with pytest.raises(ValueError):
        BindingConfig(initial_rto=0)
