"""NAT-PMP codec: golden bytes from RFC 6886's figures, round trips, malformed input."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dtx.errors import DecodeError, LocalProtocolError
from dtx.wire.natpmp import (
    ExternalAddressRequest,
    ExternalAddressResponse,
    MapRequest,
    MapResponse,
    NatPmpError,
    NatPmpMessage,
    NatPmpOpcode,
    NatPmpResult,
    UnsupportedVersionResponse,
    decode_natpmp_request,
    decode_natpmp_response,
    encode_natpmp,
)

EXTERNAL = ipaddress.IPv4Address("203.0.113.7")

# Each entry: (label, bytes written out from the RFC's figure, the value).
REQUESTS: list[tuple[str, bytes, NatPmpMessage]] = [
    # section 3.2: Vers = 0 | OP = 0
    ("external address request", bytes.fromhex("0000"), ExternalAddressRequest()),
    # section 3.3: Vers 0 | OP 1 (UDP) | Reserved | Internal Port 40000 |
    # Suggested External Port 40000 | Requested Lifetime 7200
    ("map udp", bytes.fromhex("00 01 0000 9c40 9c40 00001c20"),
     MapRequest(NatPmpOpcode.MAP_UDP, 40000, 40000, 7200)),
    # section 3.3 with OP 2 (TCP), port 22, no suggestion, lifetime 3600
    ("map tcp", bytes.fromhex("00 02 0000 0016 0000 00000e10"),
     MapRequest(NatPmpOpcode.MAP_TCP, 22, 0, 3600)),
    # section 3.4: a delete is a map request with lifetime 0 and suggested port 0
    ("delete", bytes.fromhex("00 01 0000 9c40 0000 00000000"),
     MapRequest(NatPmpOpcode.MAP_UDP, 40000, 0, 0)),
    # section 3.4: internal port 0 and lifetime 0 delete every UDP mapping
    ("delete all", bytes.fromhex("00 01 0000 0000 0000 00000000"),
     MapRequest(NatPmpOpcode.MAP_UDP, 0, 0, 0)),
]

RESPONSES: list[tuple[str, bytes, NatPmpMessage]] = [
    # section 3.2: Vers 0 | OP 128 | Result 0 | SSSoE 7200 | External 203.0.113.7
    ("external address", bytes.fromhex("00 80 0000 00001c20 cb007107"),
     ExternalAddressResponse(NatPmpResult.SUCCESS, 7200, EXTERNAL)),
    # section 3.2: result 3 (Network Failure: no external address yet), 0.0.0.0
    ("external address, network failure", bytes.fromhex("00 80 0003 0000002a 00000000"),
     ExternalAddressResponse(NatPmpResult.NETWORK_FAILURE, 42,
                             ipaddress.IPv4Address("0.0.0.0"))),
    # section 3.3: Vers 0 | OP 129 | Result 0 | SSSoE 3600 | Internal 40000 |
    # Mapped External 50000 | Lifetime 7200
    ("map udp", bytes.fromhex("00 81 0000 00000e10 9c40 c350 00001c20"),
     MapResponse(NatPmpOpcode.MAP_UDP, NatPmpResult.SUCCESS, 3600, 40000, 50000, 7200)),
    # section 3.5: a failed TCP mapping (Not Authorized): ports and lifetime 0
    ("map tcp refused", bytes.fromhex("00 82 0002 00000e10 0016 0000 00000000"),
     MapResponse(NatPmpOpcode.MAP_TCP, NatPmpResult.NOT_AUTHORIZED, 3600, 22, 0, 0)),
    # section 3.4: the answer to a delete
    ("delete answer", bytes.fromhex("00 81 0000 00000e11 9c40 0000 00000000"),
     MapResponse(NatPmpOpcode.MAP_UDP, NatPmpResult.SUCCESS, 3601, 40000, 0, 0)),
    # section 3.5 (erratum 3618): Vers 0 | OP 128 | Result 1 | SSSoE
    ("unsupported version", bytes.fromhex("00 80 0001 0000002a"),
     UnsupportedVersionResponse(42)),
    # section 3.5 as first published: OP = 0
    ("unsupported version, op 0", bytes.fromhex("00 00 0001 0000002a"),
     UnsupportedVersionResponse(42, opcode=0)),
]


@pytest.mark.parametrize(("label", "wire", "msg"), REQUESTS, ids=[r[0] for r in REQUESTS])
def test_request_golden_bytes(label: str, wire: bytes, msg: NatPmpMessage) -> None:
    assert encode_natpmp(msg) == wire
    assert decode_natpmp_request(wire) == msg


@pytest.mark.parametrize(("label", "wire", "msg"), RESPONSES, ids=[r[0] for r in RESPONSES])
def test_response_golden_bytes(label: str, wire: bytes, msg: NatPmpMessage) -> None:
    assert encode_natpmp(msg) == wire
    assert decode_natpmp_response(wire) == msg


def test_unknown_result_codes_decode_as_numbers() -> None:
    decoded = decode_natpmp_response(bytes.fromhex("00 81 00c8 00000001 9c40 0000 00000000"))
    assert isinstance(decoded, MapResponse)
    assert decoded.result == 200 and not isinstance(decoded.result, NatPmpResult)
    assert decode_natpmp_response(RESPONSES[0][1]).result is NatPmpResult.SUCCESS


def test_reserved_field_is_ignored_on_reception() -> None:
    # section 3.3: Reserved MUST be ignored on reception
    decoded = decode_natpmp_request(bytes.fromhex("00 01 beef 9c40 9c40 00001c20"))
    assert decoded == MapRequest(NatPmpOpcode.MAP_UDP, 40000, 40000, 7200)
    assert decoded.is_delete is False
    assert MapRequest(NatPmpOpcode.MAP_UDP, 1, 0, 0).is_delete


@pytest.mark.parametrize(("label", "wire", "msg"), REQUESTS + RESPONSES,
                         ids=[r[0] for r in REQUESTS + RESPONSES])
def test_every_truncation_raises_the_typed_error(label: str, wire: bytes,
                                                  msg: NatPmpMessage) -> None:
    decode = decode_natpmp_request if (label, wire, msg) in REQUESTS else decode_natpmp_response
    for cut in range(len(wire)):
        with pytest.raises(NatPmpError):
            decode(wire[:cut])
    # and one byte too many is malformed as well: sizes are exact
    with pytest.raises(NatPmpError):
        decode(wire + b"\x00")


MALFORMED_RESPONSES = [
    ("empty", b""),
    ("version 2 (PCP)", bytes.fromhex("02 80 0000 00001c20 cb007107")),
    ("version 1", bytes.fromhex("01 80 0000 00001c20 cb007107")),
    ("a request", bytes.fromhex("00 01 0000 9c40 9c40 00001c20")),
    ("unknown opcode 131", bytes.fromhex("00 83 0000 00001c20 9c40 c350 00001c20")),
    ("map response with the external address size", bytes.fromhex("00 81 0000 00001c20 cb007107")),
    ("8 bytes, result 0", bytes.fromhex("00 80 0000 0000002a")),
    ("8 bytes, result 1, opcode 129", bytes.fromhex("00 81 0001 0000002a")),
]


@pytest.mark.parametrize(("label", "data"), MALFORMED_RESPONSES,
                         ids=[m[0] for m in MALFORMED_RESPONSES])
def test_malformed_responses(label: str, data: bytes) -> None:
    with pytest.raises(NatPmpError):
        decode_natpmp_response(data)


MALFORMED_REQUESTS = [
    ("empty", b""),
    ("one byte", b"\x00"),
    ("version 2", bytes.fromhex("02 00")),
    ("a response", bytes.fromhex("00 80 0000 00001c20 cb007107")),
    ("unknown opcode 3", bytes.fromhex("00 03 0000 9c40 9c40 00001c20")),
    ("external request with a body", bytes.fromhex("00 00 0000")),
]


@pytest.mark.parametrize(("label", "data"), MALFORMED_REQUESTS,
                         ids=[m[0] for m in MALFORMED_REQUESTS])
def test_malformed_requests(label: str, data: bytes) -> None:
    with pytest.raises(NatPmpError):
        decode_natpmp_request(data)


def test_the_typed_error_is_a_decode_error_and_a_value_error() -> None:
    with pytest.raises(NatPmpError) as info:
        decode_natpmp_response(b"\x07")
    assert isinstance(info.value, DecodeError) and isinstance(info.value, ValueError)


def test_construction_errors_are_local() -> None:
    with pytest.raises(LocalProtocolError):
        MapRequest(NatPmpOpcode.EXTERNAL_ADDRESS, 1, 1, 1)
    with pytest.raises(LocalProtocolError):
        MapRequest(NatPmpOpcode.MAP_UDP, 70000, 1, 1)
    with pytest.raises(LocalProtocolError):
        MapResponse(NatPmpOpcode.MAP_UDP, 0, 2**32, 1, 1, 1)
    with pytest.raises(LocalProtocolError):
        UnsupportedVersionResponse(1, opcode=129)


# -- property tests --------------------------------------------------------------

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
map_opcodes = st.sampled_from([NatPmpOpcode.MAP_UDP, NatPmpOpcode.MAP_TCP])
results = st.integers(0, 0xFFFF).filter(lambda r: r != NatPmpResult.UNSUPPORTED_VERSION).map(
    lambda r: NatPmpResult(r) if r in {int(x) for x in NatPmpResult} else r)
requests = st.one_of(st.just(ExternalAddressRequest()), st.builds(MapRequest, map_opcodes, u16, u16, u32))
responses = st.one_of(
    st.builds(ExternalAddressResponse, results, u32, st.ip_addresses(v=4)),
    st.builds(MapResponse, map_opcodes, results, u32, u16, u16, u32),
    st.builds(UnsupportedVersionResponse, u32, st.sampled_from([0, 128])),
)


@given(requests)
def test_requests_round_trip(msg: NatPmpMessage) -> None:
    assert decode_natpmp_request(encode_natpmp(msg)) == msg


@given(responses)
def test_responses_round_trip(msg: NatPmpMessage) -> None:
    assert decode_natpmp_response(encode_natpmp(msg)) == msg
