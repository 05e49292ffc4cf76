"""PCP codec: golden bytes from RFC 6887's figures, options, round trips, malformed input."""

from __future__ import annotations

import ipaddress
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dtx.errors import DecodeError, LocalProtocolError
from dtx.wire.pcp import (
    AnswerKind,
    PcpError,
    PcpMap,
    PcpOpcode,
    PcpOption,
    PcpOptionCode,
    PcpRequest,
    PcpResponse,
    PcpResult,
    announce_request,
    classify_answer,
    decode_pcp_request,
    decode_pcp_response,
    encode_pcp,
    filter_option,
    prefer_failure_option,
    third_party_option,
    unspecified_address,
)

CLIENT = ipaddress.IPv4Address("192.168.1.10")
CLIENT6 = ipaddress.IPv6Address("2001:db8::2")
EXTERNAL = ipaddress.IPv4Address("203.0.113.7")
ANY4 = ipaddress.IPv4Address("0.0.0.0")
NONCE = bytes(range(1, 13))

# Pieces of the figures, written out by hand.
MAPPED_CLIENT = "00000000 00000000 0000ffff c0a8010a"  # ::ffff:192.168.1.10 (section 5)
MAPPED_ANY = "00000000 00000000 0000ffff 00000000"  # ::ffff:0.0.0.0 (section 11.1)
MAPPED_EXTERNAL = "00000000 00000000 0000ffff cb007107"  # ::ffff:203.0.113.7
NONCE_HEX = "01020304 05060708 090a0b0c"
RESERVED_96 = "00000000 00000000 00000000"

MAP_REQUEST = PcpRequest(PcpOpcode.MAP, 7200, CLIENT, PcpMap(NONCE, 17, 40000, 40000, ANY4))
MAP_RESPONSE = PcpResponse(PcpOpcode.MAP, PcpResult.SUCCESS, 7200, 100,
                           PcpMap(NONCE, 17, 40000, 50000, EXTERNAL))

REQUESTS: list[tuple[str, bytes, PcpRequest]] = [
    # section 7.1 header: Version 2 | R 0, Opcode 0 (ANNOUNCE) | Reserved |
    # Requested Lifetime 0 | PCP Client's IP Address; section 14.1: no data
    ("announce", bytes.fromhex("02 00 0000 00000000" + MAPPED_CLIENT), announce_request(CLIENT)),
    # section 7.1 header with Opcode 1 (MAP), lifetime 7200; section 11.1:
    # Mapping Nonce | Protocol 17 | Reserved 24 | Internal Port 40000 |
    # Suggested External Port 40000 | Suggested External Address ::ffff:0.0.0.0
    ("map", bytes.fromhex("02 01 0000 00001c20" + MAPPED_CLIENT + NONCE_HEX
                          + "11 000000 9c40 9c40" + MAPPED_ANY), MAP_REQUEST),
    # section 15: a delete is a MAP with the mapping's nonce and lifetime 0
    ("map delete", bytes.fromhex("02 01 0000 00000000" + MAPPED_CLIENT + NONCE_HEX
                                 + "11 000000 9c40 c350" + MAPPED_EXTERNAL),
     PcpRequest(PcpOpcode.MAP, 0, CLIENT, PcpMap(NONCE, 17, 40000, 50000, EXTERNAL))),
    # an IPv6 client, all-zero suggested address (section 11.1), protocol 6 (TCP)
    ("map ipv6", bytes.fromhex("02 01 0000 00000e10 20010db8 00000000 00000000 00000002"
                               + NONCE_HEX + "06 000000 0016 0000" + "00" * 16),
     PcpRequest(PcpOpcode.MAP, 3600, CLIENT6,
                PcpMap(NONCE, 6, 22, 0, ipaddress.IPv6Address("::")))),
    # section 7.3 options after the MAP data: PREFER_FAILURE (13.2, code 2,
    # length 0), an unknown optional-to-process one (code 0x80, length 3,
    # one byte of padding), THIRD_PARTY (13.1, code 1, length 16)
    ("map with options", bytes.fromhex("02 01 0000 00001c20" + MAPPED_CLIENT + NONCE_HEX
                                       + "11 000000 9c40 9c40" + MAPPED_ANY
                                       + "02 00 0000" + "80 00 0003 616263 00"
                                       + "01 00 0010" + "00000000 00000000 0000ffff c0a8010b"),
     PcpRequest(PcpOpcode.MAP, 7200, CLIENT, MAP_REQUEST.map,
                (prefer_failure_option(), PcpOption(0x80, b"abc"),
                 third_party_option(ipaddress.IPv4Address("192.168.1.11"))))),
    # section 13.3 FILTER: Reserved | Prefix Length 120 | Remote Peer Port 443 |
    # Remote Peer IP ::ffff:198.51.100.0
    ("map with filter", bytes.fromhex("02 01 0000 00001c20" + MAPPED_CLIENT + NONCE_HEX
                                      + "11 000000 9c40 9c40" + MAPPED_ANY
                                      + "03 00 0014 00 78 01bb"
                                      + "00000000 00000000 0000ffff c6336400"),
     PcpRequest(PcpOpcode.MAP, 7200, CLIENT, MAP_REQUEST.map,
                (filter_option(120, 443, ipaddress.IPv4Address("198.51.100.0")),))),
]

RESPONSES: list[tuple[str, bytes, PcpResponse]] = [
    # section 7.2: Version 2 | R 1, Opcode 0 | Reserved | Result 0 | Lifetime 0 |
    # Epoch Time 0x1234 | Reserved 96
    ("announce", bytes.fromhex("02 80 00 00 00000000 00001234" + RESERVED_96),
     PcpResponse(PcpOpcode.ANNOUNCE, PcpResult.SUCCESS, 0, 0x1234)),
    # section 7.2 header (Opcode 1, Lifetime 7200, Epoch 100) and section 11.1's
    # response data: Nonce | Protocol 17 | Internal 40000 | Assigned External
    # Port 50000 | Assigned External Address ::ffff:203.0.113.7
    ("map", bytes.fromhex("02 81 00 00 00001c20 00000064" + RESERVED_96 + NONCE_HEX
                          + "11 000000 9c40 c350" + MAPPED_EXTERNAL), MAP_RESPONSE),
    # section 7.3: an unknown mandatory-to-process option (code 0x7f) in a
    # response is carried, not refused
    ("map with unknown mandatory option",
     bytes.fromhex("02 81 00 00 00001c20 00000064" + RESERVED_96 + NONCE_HEX
                   + "11 000000 9c40 c350" + MAPPED_EXTERNAL + "7f 00 0004 deadbeef"),
     PcpResponse(PcpOpcode.MAP, PcpResult.SUCCESS, 7200, 100, MAP_RESPONSE.map,
                 (PcpOption(0x7F, bytes.fromhex("deadbeef")),))),
]

# Error responses: valid, but their truncation to the header is valid too.
ERROR_RESPONSES: list[tuple[str, bytes, PcpResponse]] = [
    # section 9: UNSUPP_VERSION (result 1) as the bare header
    ("unsupported version", bytes.fromhex("02 81 00 01 00000000 00000064" + RESERVED_96),
     PcpResponse(PcpOpcode.MAP, PcpResult.UNSUPP_VERSION, 0, 100)),
    # section 7.4: NO_RESOURCES (8), a short-lifetime error of 30 s, MAP data copied
    ("no resources", bytes.fromhex("02 81 00 08 0000001e 00000064" + RESERVED_96 + NONCE_HEX
                                   + "11 000000 9c40 0000" + MAPPED_ANY),
     PcpResponse(PcpOpcode.MAP, PcpResult.NO_RESOURCES, 30, 100,
                 PcpMap(NONCE, 17, 40000, 0, ANY4))),
]


@pytest.mark.parametrize(("label", "wire", "msg"), REQUESTS, ids=[r[0] for r in REQUESTS])
def test_request_golden_bytes(label: str, wire: bytes, msg: PcpRequest) -> None:
    assert encode_pcp(msg) == wire
    assert decode_pcp_request(wire) == msg
    assert len(wire) % 4 == 0


@pytest.mark.parametrize(("label", "wire", "msg"), RESPONSES + ERROR_RESPONSES,
                         ids=[r[0] for r in RESPONSES + ERROR_RESPONSES])
def test_response_golden_bytes(label: str, wire: bytes, msg: PcpResponse) -> None:
    assert encode_pcp(msg) == wire
    assert decode_pcp_response(wire) == msg
    assert classify_answer(wire) is AnswerKind.PCP


def test_ipv4_mapped_addresses_unmap() -> None:
    decoded = decode_pcp_request(REQUESTS[1][1])
    assert decoded.client_address == CLIENT and isinstance(decoded.client_address,
                                                           ipaddress.IPv4Address)
    assert decoded.map is not None and decoded.map.external_address == ANY4
    assert unspecified_address(CLIENT) == ANY4
    assert unspecified_address(CLIENT6) == ipaddress.IPv6Address("::")


def test_reserved_fields_are_ignored_on_reception() -> None:
    wire = bytearray(RESPONSES[1][1])
    wire[2] = 0xAA  # reserved byte of the response header
    wire[12:24] = b"\xff" * 12  # the 96 reserved bits
    wire[37:40] = b"\x55" * 3  # MAP's 24 reserved bits
    assert decode_pcp_response(bytes(wire)) == MAP_RESPONSE


def test_option_padding_and_mandatory_flag() -> None:
    assert PcpOption(1).mandatory and PcpOption(127).mandatory and not PcpOption(128).mandatory
    wire = encode_pcp(PcpRequest(PcpOpcode.ANNOUNCE, 0, CLIENT, None, (PcpOption(0xC0, b"x"),)))
    assert wire[24:] == bytes.fromhex("c0 00 0001 78 000000")


ALL_VALID: list[tuple[str, bytes, PcpRequest | PcpResponse]] = [*REQUESTS, *RESPONSES]


@pytest.mark.parametrize(("label", "wire", "msg"), ALL_VALID, ids=[r[0] for r in ALL_VALID])
def test_every_truncation_raises_the_typed_error(label: str, wire: bytes,
                                                 msg: PcpRequest | PcpResponse) -> None:
    # Options are a list with no overall length (section 7.3): a cut at an
    # option boundary is the same message with fewer options. Any other cut
    # raises.
    decode = decode_pcp_request if isinstance(msg, PcpRequest) else decode_pcp_response
    boundaries = {len(encode_pcp(replace(msg, options=msg.options[:n]))): n
                  for n in range(len(msg.options))}
    for cut in range(len(wire)):
        if cut in boundaries:
            assert decode(wire[:cut]) == replace(msg, options=msg.options[:boundaries[cut]])
            continue
        with pytest.raises(PcpError):
            decode(wire[:cut])


@pytest.mark.parametrize(("label", "wire", "msg"), ERROR_RESPONSES,
                         ids=[r[0] for r in ERROR_RESPONSES])
def test_error_responses_truncate_only_to_the_bare_header(label: str, wire: bytes,
                                                          msg: PcpResponse) -> None:
    for cut in range(len(wire)):
        if cut == 24:
            assert decode_pcp_response(wire[:cut]).map is None
            continue
        with pytest.raises(PcpError):
            decode_pcp_response(wire[:cut])


MAP_HEAD = "02 01 0000 00001c20" + MAPPED_CLIENT + NONCE_HEX + "11 000000 9c40 9c40" + MAPPED_ANY
MALFORMED_REQUESTS = [
    ("version 1", "01" + MAP_HEAD[2:], PcpResult.UNSUPP_VERSION),
    ("version 0", "00" + MAP_HEAD[2:], PcpResult.UNSUPP_VERSION),
    ("R bit set", "02 81" + MAP_HEAD[5:], PcpResult.MALFORMED_REQUEST),
    ("PEER opcode", "02 02" + MAP_HEAD[5:] + "00" * 20, PcpResult.UNSUPP_OPCODE),
    ("opcode 5", "02 05" + MAP_HEAD[5:], PcpResult.UNSUPP_OPCODE),
    ("not a multiple of 4", MAP_HEAD + "00", PcpResult.MALFORMED_REQUEST),
    ("unknown mandatory option", MAP_HEAD + "7f 00 0000", PcpResult.UNSUPP_OPTION),
    ("option code 0", MAP_HEAD + "00 00 0000", PcpResult.UNSUPP_OPTION),
    ("THIRD_PARTY of 4 bytes", MAP_HEAD + "01 00 0004 c0a8010b", PcpResult.MALFORMED_OPTION),
    ("PREFER_FAILURE with data", MAP_HEAD + "02 00 0004 00000000", PcpResult.MALFORMED_OPTION),
    ("PREFER_FAILURE twice", MAP_HEAD + "02 00 0000 02 00 0000", PcpResult.MALFORMED_OPTION),
    ("option past the end", MAP_HEAD + "80 00 0008 00000000", PcpResult.MALFORMED_OPTION),
    ("options after a short option header", MAP_HEAD + "80 00 0000 80 00 0001",
     PcpResult.MALFORMED_OPTION),
    ("option data past the padded end", MAP_HEAD + "80 00 0005 00000000",
     PcpResult.MALFORMED_OPTION),
]


@pytest.mark.parametrize(("label", "hex_", "result"), MALFORMED_REQUESTS,
                         ids=[m[0] for m in MALFORMED_REQUESTS])
def test_malformed_requests_name_the_server_answer(label: str, hex_: str,
                                                   result: PcpResult) -> None:
    with pytest.raises(PcpError) as info:
        decode_pcp_request(bytes.fromhex(hex_))
    assert info.value.result is result
    assert isinstance(info.value, DecodeError) and isinstance(info.value, ValueError)


def test_oversized_messages_are_malformed() -> None:
    big = bytes.fromhex(MAP_HEAD) + bytes.fromhex("80 00 0410") + bytes(1040)
    assert len(big) > 1100
    with pytest.raises(PcpError):
        decode_pcp_request(big)
    with pytest.raises(LocalProtocolError):
        encode_pcp(PcpRequest(PcpOpcode.ANNOUNCE, 0, CLIENT, None,
                              (PcpOption(0x80, bytes(600)), PcpOption(0x81, bytes(600)))))


MALFORMED_RESPONSES = [
    ("a request", REQUESTS[0][1]),
    ("version 0", "00" + RESPONSES[1][1].hex()[2:]),
    ("success MAP, bare header", "02 81 00 00 00001c20 00000064" + RESERVED_96),
    ("known option of the wrong size", RESPONSES[1][1].hex() + "02 00 0004 00000000"),
    ("trailing half option", RESPONSES[1][1].hex() + "80 00"),
]


@pytest.mark.parametrize(("label", "data"), MALFORMED_RESPONSES,
                         ids=[m[0] for m in MALFORMED_RESPONSES])
def test_malformed_responses(label: str, data: bytes | str) -> None:
    raw = bytes.fromhex(data) if isinstance(data, str) else data
    with pytest.raises(PcpError):
        decode_pcp_response(raw)


def test_announce_with_mapping_data_is_options_not_data() -> None:
    # 36 zero bytes after an ANNOUNCE header read as options: code 0, length 0
    # each, which a response carries (section 7.3) -- nine of them
    raw = bytes.fromhex("02 80 00 00 00000000 00000001" + RESERVED_96) + bytes(36)
    with pytest.raises(PcpError):
        decode_pcp_response(raw[:-2])
    assert len(decode_pcp_response(raw).options) == 9


CLASSIFY = [
    ("NAT-PMP external address", bytes.fromhex("00 80 0000 00001c20 cb007107"), AnswerKind.NATPMP),
    ("NAT-PMP map", bytes.fromhex("00 81 0000 00000e10 9c40 c350 00001c20"), AnswerKind.NATPMP),
    ("NAT-PMP refusing PCP", bytes.fromhex("00 80 0001 0000002a"), AnswerKind.PCP_UNSUPPORTED),
    ("NAT-PMP refusing PCP, op 0", bytes.fromhex("00 00 0001 0000002a"),
     AnswerKind.PCP_UNSUPPORTED),
    ("PCP announce", RESPONSES[0][1], AnswerKind.PCP),
    ("PCP unsupported version", ERROR_RESPONSES[0][1], AnswerKind.PCP),
    ("PCP request (R bit clear)", REQUESTS[0][1], AnswerKind.UNKNOWN),
    ("version 1", bytes.fromhex("01 80 0000") + bytes(20), AnswerKind.UNKNOWN),
    ("STUN request", bytes.fromhex("0001 0000 2112a442") + bytes(12), AnswerKind.NATPMP),
    ("STUN success", bytes.fromhex("0101 0000 2112a442") + bytes(12), AnswerKind.UNKNOWN),
    ("short", b"\x00\x80\x00", AnswerKind.UNKNOWN),
    ("empty", b"", AnswerKind.UNKNOWN),
]


@pytest.mark.parametrize(("label", "data", "kind"), CLASSIFY, ids=[c[0] for c in CLASSIFY])
def test_classify_answer(label: str, data: bytes, kind: AnswerKind) -> None:
    # (a STUN message on 5351 reads as version 0; its decoder refuses it)
    assert classify_answer(data) is kind


def test_construction_errors_are_local() -> None:
    with pytest.raises(LocalProtocolError):
        PcpMap(bytes(11), 17, 1, 1, ANY4)
    with pytest.raises(LocalProtocolError):
        PcpRequest(PcpOpcode.MAP, 1, CLIENT)
    with pytest.raises(LocalProtocolError):
        PcpRequest(PcpOpcode.ANNOUNCE, 0, CLIENT, MAP_REQUEST.map)
    with pytest.raises(LocalProtocolError):
        PcpRequest(PcpOpcode.PEER, 0, CLIENT)
    with pytest.raises(LocalProtocolError):
        PcpResponse(PcpOpcode.MAP, PcpResult.SUCCESS, 1, 1)
    with pytest.raises(LocalProtocolError):
        PcpOption(256)


# -- property tests --------------------------------------------------------------


def _not_ipv4_mapped(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    # an IPv4-mapped IPv6 address is how PCP writes IPv4: it reads back as IPv4
    return not isinstance(addr, ipaddress.IPv6Address) or addr.ipv4_mapped is None


addresses = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6).filter(_not_ipv4_mapped))
maps = st.builds(PcpMap, st.binary(min_size=12, max_size=12), st.integers(0, 255),
                 st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), addresses)
known_option_codes = {int(c) for c in PcpOptionCode}
response_options = st.lists(
    st.builds(PcpOption, st.integers(0, 255).filter(lambda c: c not in known_option_codes),
              st.binary(max_size=20)), max_size=3).map(tuple)
request_options = st.lists(
    st.builds(PcpOption, st.integers(128, 255), st.binary(max_size=20)), max_size=3).map(tuple)
u32 = st.integers(0, 0xFFFFFFFF)


@st.composite
def requests(draw: st.DrawFn) -> PcpRequest:
    opcode = draw(st.sampled_from([PcpOpcode.ANNOUNCE, PcpOpcode.MAP]))
    body = draw(maps) if opcode == PcpOpcode.MAP else None
    return PcpRequest(opcode, draw(u32), draw(addresses), body, draw(request_options))


@st.composite
def responses(draw: st.DrawFn) -> PcpResponse:
    opcode = draw(st.sampled_from([PcpOpcode.ANNOUNCE, PcpOpcode.MAP]))
    result = draw(st.integers(0, 255))
    bare = result != 0 and draw(st.booleans())
    body = draw(maps) if opcode == PcpOpcode.MAP and not bare else None
    options = draw(response_options) if body is not None or opcode == PcpOpcode.ANNOUNCE else ()
    return PcpResponse(opcode, result, draw(u32), draw(u32), body, options)


@given(requests())
def test_requests_round_trip(msg: PcpRequest) -> None:
    assert decode_pcp_request(encode_pcp(msg)) == msg


@given(responses())
def test_responses_round_trip(msg: PcpResponse) -> None:
    assert decode_pcp_response(encode_pcp(msg)) == msg
