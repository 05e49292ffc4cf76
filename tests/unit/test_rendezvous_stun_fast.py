"""The rendezvous's precomputed STUN answers are byte for byte those of
:func:`rendezvous.stun.answer_stun`, for every server shape, receiving
address and request, the common ones (answered from templates) and the
ones that take the full path."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dtx.wire.stun import binding_request
from rendezvous.stun import BindingResponder, ServerAddresses, answer_stun

PRIMARY = ("192.0.2.1", 3478)
SERVERS = {
    "full": ServerAddresses(primary=PRIMARY, alt_ip="192.0.2.2", alt_port=3479),
    "basic": ServerAddresses(primary=PRIMARY),
    "mapping": ServerAddresses(primary=PRIMARY, mapping_port=3479),
    "port-only": ServerAddresses(primary=PRIMARY, alt_port=3479),
    "ip-only": ServerAddresses(primary=PRIMARY, alt_ip="192.0.2.2"),
    "any": ServerAddresses(primary=("0.0.0.0", 3478)),
}


def _same(responder: BindingResponder, addresses: ServerAddresses, data: bytes,
          src: tuple[str, int], local: tuple[str, int]) -> None:
    assert responder.answer(data, src, local) == answer_stun(
        data, src=src, local=local, addresses=addresses)


@pytest.mark.parametrize("name", sorted(SERVERS))
@pytest.mark.parametrize("software", [None, "dtx-rendezvous"])
def test_common_requests_match_the_full_path(name: str, software: str | None) -> None:
    addresses = SERVERS[name]
    responder = BindingResponder(addresses, software)
    rng = random.Random(name)
    for local in addresses.sockets():
        for _ in range(50):
            tid = rng.randbytes(12)
            src = (f"{rng.randrange(1, 224)}.{rng.randrange(256)}.{rng.randrange(256)}."
                   f"{rng.randrange(256)}", rng.randrange(1, 65536))
            for fingerprint in (True, False):
                data = binding_request(tid, fingerprint=fingerprint)
                assert responder.answer(data, src, local) == answer_stun(
                    data, src=src, local=local, addresses=addresses, software=software)
    templates = responder._templates  # noqa: SLF001 - that the templates were used
    assert len(templates) == 2 * len(addresses.sockets())
    assert all(t is not None for t in templates.values())


def test_other_requests_take_the_full_path() -> None:
    addresses = SERVERS["full"]
    responder = BindingResponder(addresses)
    good = binding_request(bytes(12))
    bad_fingerprint = good[:-1] + bytes([good[-1] ^ 1])
    wrong_length = good[:2] + b"\x00\x0c" + good[4:]
    for data in (bad_fingerprint, wrong_length, good[:20] + b"\x00" * 8,
                 binding_request(bytes(12), change_ip=True), binding_request(bytes(16)),
                 b"\x01\x01" + good[2:]):
        _same(responder, addresses, data, ("203.0.113.5", 50000), PRIMARY)
    _same(responder, addresses, good, ("2001:db8::5", 50000), PRIMARY)
    assert responder.answer(bad_fingerprint, ("203.0.113.5", 1), PRIMARY) is None


@given(data=st.binary(min_size=20, max_size=28), port=st.integers(0, 65535))
def test_any_bytes_match_the_full_path(data: bytes, port: int) -> None:
    addresses = SERVERS["full"]
    prefix = binding_request(bytes(12))[:8]
    for candidate in (data, prefix + data[8:]):
        _same(BindingResponder(addresses), addresses, candidate, ("198.51.100.7", port),
              PRIMARY)
