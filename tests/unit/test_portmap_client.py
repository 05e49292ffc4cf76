"""The sans-IO port-mapping client against a gateway built from the codecs."""

from __future__ import annotations

import ipaddress
import random
from dataclasses import replace

import pytest

from dtx.errors import LocalProtocolError
from dtx.proto.portmap import (
    MappingClosed,
    MappingCreated,
    MappingLost,
    MappingProtocol,
    MappingRenewed,
    PortMapClient,
    PortMapConfig,
    PortMapEvent,
    PortMapState,
    ProbeFailed,
    ProbeOutcome,
    choose_protocol,
    natpmp_epoch_valid,
    pcp_epoch_valid,
)
from dtx.wire.address import Address
from dtx.wire.natpmp import (
    ExternalAddressRequest,
    ExternalAddressResponse,
    MapRequest,
    MapResponse,
    NatPmpOpcode,
    UnsupportedVersionResponse,
    decode_natpmp_request,
    encode_natpmp,
)
from dtx.wire.pcp import (
    PcpOpcode,
    PcpRequest,
    PcpResponse,
    PcpResult,
    decode_pcp_request,
    encode_pcp,
)

PCP = MappingProtocol.PCP
NATPMP = MappingProtocol.NATPMP
GATEWAY_IP = "192.168.1.1"
GATEWAY: Address = (GATEWAY_IP, 5351)
CLIENT_IP = "192.168.1.10"
PORT = 40000
EXT_IP = ipaddress.IPv4Address("203.0.113.7")
EXT_PORT = 50000
EXTERNAL: Address = (str(EXT_IP), EXT_PORT)

Request = ExternalAddressRequest | MapRequest | PcpRequest


class Gateway:
    """Answers the client's requests as a gateway would (codecs only).

    ``pcp``: "ok", "silent", "natpmp-refusal" (NAT-PMP's 8-byte Unsupported
    Version), "natpmp-refusal-op0" (the same with opcode 0), or
    "pcp-refusal" (a PCP UNSUPP_VERSION response). ``natpmp``: "ok" or
    "silent". The epoch counts seconds since ``boot``.
    """

    def __init__(self, *, pcp: str = "ok", natpmp: str = "ok",
                 pcp_map_result: int = PcpResult.SUCCESS, granted: int | None = None) -> None:
        self.pcp = pcp
        self.natpmp = natpmp
        self.pcp_map_result = pcp_map_result
        self.granted = granted
        self.address = EXT_IP
        self.port = EXT_PORT
        self.boot = -1000.0  # epoch 1000 at t=0
        self.silent = False
        self.seen: list[Request] = []

    def epoch(self, now: float) -> int:
        return int(now - self.boot)

    def answer(self, data: bytes, now: float) -> bytes | None:
        req: Request
        if data[0] == 0:
            req = decode_natpmp_request(data)
            self.seen.append(req)
            if self.silent or self.natpmp == "silent":
                return None
            if isinstance(req, ExternalAddressRequest):
                return encode_natpmp(ExternalAddressResponse(0, self.epoch(now), self.address))
            lifetime = min(req.lifetime, self.granted or req.lifetime)
            port = self.port if req.lifetime else 0
            return encode_natpmp(MapResponse(req.opcode, 0, self.epoch(now), req.internal_port,
                                             port, lifetime))
        req = decode_pcp_request(data)
        self.seen.append(req)
        if self.silent or self.pcp == "silent":
            return None
        if self.pcp == "natpmp-refusal":
            return encode_natpmp(UnsupportedVersionResponse(self.epoch(now)))
        if self.pcp == "natpmp-refusal-op0":
            return encode_natpmp(UnsupportedVersionResponse(self.epoch(now), opcode=0))
        if self.pcp == "pcp-refusal":
            return encode_pcp(PcpResponse(req.opcode, PcpResult.UNSUPP_VERSION, 0,
                                          self.epoch(now)))
        if req.opcode == PcpOpcode.ANNOUNCE:
            return encode_pcp(PcpResponse(PcpOpcode.ANNOUNCE, 0, 0, self.epoch(now)))
        assert req.map is not None
        if self.pcp_map_result:
            return encode_pcp(PcpResponse(PcpOpcode.MAP, self.pcp_map_result, 30,
                                          self.epoch(now), req.map))
        lifetime = min(req.lifetime, self.granted or req.lifetime)
        body = replace(req.map, external_port=self.port, external_address=self.address)
        return encode_pcp(PcpResponse(PcpOpcode.MAP, 0, lifetime, self.epoch(now), body))

    def pcp_map(self, request: PcpRequest, now: float, **changes: object) -> bytes:
        """A MAP success for ``request``, with ``changes`` to its data."""
        assert request.map is not None
        body = replace(request.map, external_port=self.port, external_address=self.address)
        return encode_pcp(PcpResponse(PcpOpcode.MAP, 0, request.lifetime, self.epoch(now),
                                      replace(body, **changes)))  # type: ignore[arg-type]

    def announcement(self, now: float, address: ipaddress.IPv4Address | None = None) -> bytes:
        """NAT-PMP's external-address response, as sent unsolicited (3.2.1)."""
        return encode_natpmp(ExternalAddressResponse(0, self.epoch(now), address or self.address))


def make(**config: object) -> PortMapClient:
    return PortMapClient(GATEWAY_IP, client_ip=CLIENT_IP, internal_port=PORT,
                         rng=random.Random(5), config=PortMapConfig(**config))  # type: ignore[arg-type]


def decode_request(data: bytes) -> Request:
    return decode_natpmp_request(data) if data[0] == 0 else decode_pcp_request(data)


def sent(client: PortMapClient, now: float = 0.0) -> list[Request]:
    out = client.datagrams_to_send(now)
    assert all(to == GATEWAY for _, to in out)
    return [decode_request(d) for d, _ in out]


def events(client: PortMapClient) -> list[PortMapEvent]:
    out = []
    while (ev := client.next_event()) is not None:
        out.append(ev)
    return out


def pump(client: PortMapClient, gateway: Gateway, now: float) -> int:
    """Deliver what the client sends and the gateway's answers until quiet."""
    count = 0
    while out := client.datagrams_to_send(now):
        for data, to in out:
            assert to == GATEWAY
            count += 1
            reply = gateway.answer(data, now)
            if reply is not None:
                client.receive_datagram(reply, GATEWAY, now)
    return count


def send_times(client: PortMapClient, until: float) -> tuple[list[float], list[PortMapEvent]]:
    """Jump from timer to timer (no answers); when each datagram went out."""
    times: list[float] = []
    evs: list[PortMapEvent] = []
    times += [0.0] * len(client.datagrams_to_send(0.0))
    while (when := client.get_timer()) is not None and when <= until:
        client.handle_timer(when)
        times += [when] * len(client.datagrams_to_send(when))
        evs += events(client)
    return times, evs


def mapped(protocol: MappingProtocol, gateway: Gateway | None = None,
           **config: object) -> tuple[PortMapClient, Gateway]:
    gw = gateway or Gateway()
    client = make(preference=(protocol,), **config)
    client.start(0.0)
    pump(client, gw, 0.0)
    assert events(client) == [MappingCreated(protocol, EXTERNAL, gw.granted or 7200)]
    return client, gw


# -- probing and the choice -------------------------------------------------------


def test_the_probe_asks_both_protocols_at_once_and_creates_nothing() -> None:
    client = make()
    client.start(0.0)
    out = sent(client)
    assert out == [PcpRequest(PcpOpcode.ANNOUNCE, 0, ipaddress.IPv4Address(CLIENT_IP)),
                   ExternalAddressRequest()]
    assert client.state is PortMapState.PROBING and events(client) == []


def test_pcp_is_preferred_when_both_answer() -> None:
    gw = Gateway()
    client = make()
    client.start(0.0)
    pump(client, gw, 0.0)
    assert events(client) == [MappingCreated(PCP, EXTERNAL, 7200)]
    assert client.state is PortMapState.MAPPED and client.external == EXTERNAL
    assert client.protocol is PCP and client.expires_at == 7200.0
    maps = [r for r in gw.seen if isinstance(r, PcpRequest) and r.opcode == PcpOpcode.MAP]
    assert not any(isinstance(r, MapRequest) for r in gw.seen)  # no NAT-PMP mapping made
    [req] = maps
    assert req.lifetime == 7200 and req.client_address == ipaddress.IPv4Address(CLIENT_IP)
    assert req.map is not None and len(req.map.nonce) == 12 and req.map.protocol == 17
    assert (req.map.internal_port, req.map.external_port) == (PORT, PORT)
    assert req.map.external_address == ipaddress.IPv4Address("0.0.0.0")


def test_a_nat_pmp_answer_waits_briefly_for_pcp() -> None:
    gw = Gateway()
    client = make()
    client.start(0.0)
    pcp_probe, natpmp_probe = client.datagrams_to_send(0.0)
    client.receive_datagram(gw.answer(natpmp_probe[0], 0.01) or b"", GATEWAY, 0.01)
    assert sent(client, 0.01) == [] and client.get_timer() == pytest.approx(1.01)
    client.receive_datagram(gw.answer(pcp_probe[0], 0.5) or b"", GATEWAY, 0.5)
    [req] = sent(client, 0.5)
    assert isinstance(req, PcpRequest) and req.opcode == PcpOpcode.MAP


def test_nat_pmp_is_used_after_the_wait_when_pcp_is_silent() -> None:
    gw = Gateway(pcp="silent")
    client = make()
    client.start(0.0)
    pump(client, gw, 0.0)
    assert events(client) == [] and client.get_timer() == pytest.approx(1.0)
    client.handle_timer(0.5)
    assert sent(client, 0.5) == []  # not yet
    client.handle_timer(1.0)
    assert sent(client, 1.0) == [MapRequest(NatPmpOpcode.MAP_UDP, PORT, PORT, 7200)]
    client.receive_datagram(encode_natpmp(MapResponse(NatPmpOpcode.MAP_UDP, 0, gw.epoch(1.0),
                                                      PORT, EXT_PORT, 3600)), GATEWAY, 1.0)
    assert events(client) == [MappingCreated(NATPMP, EXTERNAL, 3600)]


@pytest.mark.parametrize("refusal", ["natpmp-refusal", "natpmp-refusal-op0", "pcp-refusal"])
def test_a_pcp_refusal_falls_back_to_nat_pmp_at_once(refusal: str) -> None:
    gw = Gateway(pcp=refusal)
    client = make()
    client.start(0.0)
    pump(client, gw, 0.0)  # no waiting: PCP said no
    assert events(client) == [MappingCreated(NATPMP, EXTERNAL, 7200)]
    assert client.statistics().malformed == 0 and client.statistics().unexpected == 0
    assert [type(r).__name__ for r in gw.seen] == ["PcpRequest", "ExternalAddressRequest",
                                                  "MapRequest"]


def test_a_refused_pcp_map_falls_back_to_a_known_nat_pmp() -> None:
    gw = Gateway(pcp_map_result=PcpResult.NOT_AUTHORIZED)
    client = make()
    client.start(0.0)
    pcp_probe, natpmp_probe = client.datagrams_to_send(0.0)
    client.receive_datagram(gw.answer(natpmp_probe[0], 0.0) or b"", GATEWAY, 0.0)
    client.receive_datagram(gw.answer(pcp_probe[0], 0.0) or b"", GATEWAY, 0.0)
    pump(client, gw, 0.0)
    assert events(client) == [MappingCreated(NATPMP, EXTERNAL, 7200)]
    assert [type(r).__name__ for r in gw.seen] == [
        "ExternalAddressRequest", "PcpRequest", "PcpRequest", "MapRequest"]


def test_a_refused_pcp_map_probes_nat_pmp_again_when_its_probe_was_cut_short() -> None:
    gw = Gateway(pcp_map_result=PcpResult.NO_RESOURCES)
    client = make()
    client.start(0.0)
    pcp_probe, _ = client.datagrams_to_send(0.0)  # the NAT-PMP probe is lost
    client.receive_datagram(gw.answer(pcp_probe[0], 0.0) or b"", GATEWAY, 0.0)
    pump(client, gw, 0.1)
    assert events(client) == [MappingCreated(NATPMP, EXTERNAL, 7200)]
    assert [type(r).__name__ for r in gw.seen] == [
        "PcpRequest", "PcpRequest", "ExternalAddressRequest", "MapRequest"]


def test_a_gateway_without_an_external_address_is_no_nat_pmp() -> None:
    gw = Gateway(pcp="natpmp-refusal")
    gw.address = ipaddress.IPv4Address(0)
    client = make()
    client.start(0.0)
    pump(client, gw, 0.0)
    [event] = events(client)
    assert isinstance(event, ProbeFailed) and "no external address" in event.reason
    assert client.state is PortMapState.IDLE and client.get_timer() is None


# -- retransmission and giving up ----------------------------------------------------


def test_nat_pmp_retransmits_at_250_ms_doubling_nine_times_then_gives_up() -> None:
    client = make(preference=(NATPMP,))
    client.start(0.0)
    times, evs = send_times(client, until=1000)
    # RFC 6886 section 3.1: 0.25 s, doubling; after the ninth, 64 s of waiting
    assert times == [0.0, 0.25, 0.75, 1.75, 3.75, 7.75, 15.75, 31.75, 63.75]
    [event] = evs
    assert isinstance(event, ProbeFailed) and "no answer to 9 probe requests" in event.reason
    assert client.get_timer() is None and client.state is PortMapState.IDLE
    assert client.statistics().transmissions == 9 and client.statistics().retransmissions == 8


def test_nat_pmp_gives_up_64_seconds_after_the_ninth() -> None:
    client = make(preference=(NATPMP,))
    client.start(0.0)
    send_times(client, until=127.7)
    assert events(client) == [] and client.get_timer() == pytest.approx(127.75)
    client.handle_timer(127.75)
    assert isinstance(client.next_event(), ProbeFailed)


@pytest.mark.parametrize(("config", "expected", "gives_up_at"), [
    ({}, [0.0, 3.0, 9.0, 21.0], 45.0),  # IRT 3, doubling
    ({"pcp_max_rto": 4.0}, [0.0, 3.0, 7.0, 11.0], 15.0),  # capped at MRT
    ({"pcp_max_transmissions": 2}, [0.0, 3.0], 9.0),
])
def test_pcp_retransmits_on_rfc_6887_schedule_bounded(config: dict[str, float],
                                                      expected: list[float],
                                                      gives_up_at: float) -> None:
    client = make(preference=(PCP,), pcp_rto_jitter=0.0, **config)
    client.start(0.0)
    times, evs = send_times(client, until=gives_up_at - 0.01)
    assert times == expected and evs == []
    assert client.get_timer() == pytest.approx(gives_up_at)
    client.handle_timer(gives_up_at)
    assert isinstance(client.next_event(), ProbeFailed) and client.get_timer() is None


def test_pcp_jitter_stays_within_rand() -> None:
    client = make(preference=(PCP,), pcp_max_transmissions=8, pcp_max_rto=20.0)
    client.start(0.0)
    times, _ = send_times(client, until=1000)
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert len(gaps) == 7 and 2.7 <= gaps[0] <= 3.3
    for previous, gap in zip(gaps, gaps[1:]):
        assert 0.9 * min(2 * previous, 20.0) <= gap <= 1.1 * min(2 * previous, 20.0)
    assert any(abs(gap - 3.0 * 2 ** i) > 1e-6 for i, gap in enumerate(gaps[:3]))  # jittered


def test_no_answer_from_either_fails_once_both_gave_up() -> None:
    client = make()
    client.start(0.0)
    times, evs = send_times(client, until=1000)
    assert len(times) == 9 + 4
    [event] = evs
    assert isinstance(event, ProbeFailed)
    assert "pcp: no answer to 4" in event.reason and "nat-pmp: no answer to 9" in event.reason


# -- renewal -----------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [PCP, NATPMP])
def test_renews_at_half_the_lifetime_suggesting_the_granted_port(
        protocol: MappingProtocol) -> None:
    client, gw = mapped(protocol)
    first = gw.seen[-1]
    assert client.get_timer() == pytest.approx(3600.0)
    client.handle_timer(3599.0)
    assert sent(client, 3599.0) == []
    client.handle_timer(3600.0)
    [renewal] = client.datagrams_to_send(3600.0)
    req = decode_request(renewal[0])
    if isinstance(req, PcpRequest):
        assert isinstance(first, PcpRequest) and first.map is not None and req.map is not None
        assert req.map.nonce == first.map.nonce  # the same mapping
        assert (req.map.external_port, req.map.external_address) == (EXT_PORT, EXT_IP)
    else:
        assert req == MapRequest(NatPmpOpcode.MAP_UDP, PORT, EXT_PORT, 7200)
    assert client.state is PortMapState.RENEWING
    client.receive_datagram(gw.answer(renewal[0], 3600.0) or b"", GATEWAY, 3600.0)
    assert events(client) == [MappingRenewed(protocol, EXTERNAL, 7200)]
    assert client.get_timer() == pytest.approx(7200.0) and client.expires_at == 10800.0


def test_a_shorter_grant_renews_sooner() -> None:
    client, _ = mapped(PCP, Gateway(granted=600))
    assert client.lifetime == 600 and client.get_timer() == pytest.approx(300.0)


def test_an_unanswered_renewal_is_retried_then_the_mapping_is_lost() -> None:
    client, gw = mapped(NATPMP, Gateway(granted=600))
    gw.silent = True
    times, evs = send_times(client, until=10_000)
    # first round from 300 s (nine tries, 127.75 s), the next at half of the
    # 172.25 s then left, cut off by the expiry at 600 s
    assert times[:9] == [300 + t for t in (0, .25, .75, 1.75, 3.75, 7.75, 15.75, 31.75, 63.75)]
    assert times[9] == pytest.approx(427.75 + 172.25 / 2)
    assert max(times) < 600
    [event] = evs
    assert isinstance(event, MappingLost) and event.external == EXTERNAL
    assert "expired" in event.reason and client.state is PortMapState.IDLE
    assert client.external is None and client.get_timer() is None


def test_a_refused_renewal_loses_the_mapping() -> None:
    client, gw = mapped(PCP)
    gw.pcp_map_result = PcpResult.NOT_AUTHORIZED
    client.handle_timer(3600.0)
    pump(client, gw, 3600.0)
    [event] = events(client)
    assert isinstance(event, MappingLost) and "NOT_AUTHORIZED" in event.reason


# -- closing -----------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [PCP, NATPMP])
def test_close_deletes_the_mapping(protocol: MappingProtocol) -> None:
    client, gw = mapped(protocol)
    first = gw.seen[-1]
    client.close(10.0)
    [delete] = client.datagrams_to_send(10.0)
    req = decode_request(delete[0])
    if isinstance(req, PcpRequest):
        assert isinstance(first, PcpRequest) and first.map is not None and req.map is not None
        assert req.lifetime == 0 and req.map.nonce == first.map.nonce
    else:
        assert req == MapRequest(NatPmpOpcode.MAP_UDP, PORT, 0, 0)  # RFC 6886 section 3.4
    assert (client.state, events(client)) == (PortMapState.CLOSING, [])
    client.receive_datagram(gw.answer(delete[0], 10.0) or b"", GATEWAY, 10.0)
    assert events(client) == [MappingClosed(deleted=True)]
    assert client.state is PortMapState.CLOSED and client.get_timer() is None
    client.close(11.0)  # idempotent
    assert events(client) == [] and sent(client, 11.0) == []


def test_an_unanswered_delete_is_retried_a_bounded_number_of_times() -> None:
    client, gw = mapped(NATPMP)
    gw.silent = True
    client.close(10.0)
    times = [10.0] * len(client.datagrams_to_send(10.0))
    while (when := client.get_timer()) is not None:
        client.handle_timer(when)
        times += [when] * len(client.datagrams_to_send(when))
    assert times == [10.0, 10.25, 10.75]
    assert events(client) == [MappingClosed(deleted=False)]


def test_close_before_any_mapping_sends_nothing() -> None:
    client = make()
    client.start(0.0)
    client.datagrams_to_send(0.0)
    client.close(0.1)
    assert sent(client, 0.1) == [] and events(client) == [MappingClosed(deleted=False)]
    assert client.get_timer() is None and client.state is PortMapState.CLOSED


def test_close_while_a_map_request_is_out_deletes_what_it_may_have_made() -> None:
    client = make(preference=(NATPMP,))
    client.start(0.0)
    gw = Gateway()
    client.receive_datagram(gw.answer(client.datagrams_to_send(0.0)[0][0], 0.0) or b"",
                            GATEWAY, 0.0)
    assert sent(client, 0.0) == [MapRequest(NatPmpOpcode.MAP_UDP, PORT, PORT, 7200)]
    client.close(0.1)
    assert sent(client, 0.1) == [MapRequest(NatPmpOpcode.MAP_UDP, PORT, 0, 0)]
    # a late answer to the map request is not the delete's answer
    client.receive_datagram(encode_natpmp(MapResponse(NatPmpOpcode.MAP_UDP, 0, 1000, PORT,
                                                      EXT_PORT, 7200)), GATEWAY, 0.1)
    assert events(client) == [] and client.state is PortMapState.CLOSING


# -- the gateway's state --------------------------------------------------------------


def test_nat_pmp_epoch_going_back_maps_again_after_a_random_delay() -> None:
    client, gw = mapped(NATPMP)
    client.receive_datagram(gw.announcement(300.0), GATEWAY, 300.0)  # a plausible epoch
    assert sent(client, 300.0) == [] and events(client) == []
    gw.boot = 590.0  # rebooted: its epoch restarts
    client.receive_datagram(gw.announcement(600.0), GATEWAY, 600.0)
    assert sent(client, 600.0) == [] and client.state is PortMapState.MAPPING
    when = client.get_timer()
    assert when is not None and 600.0 <= when <= 605.0  # RFC 6886 section 3.7
    client.handle_timer(when)
    assert sent(client, when) == [MapRequest(NatPmpOpcode.MAP_UDP, PORT, EXT_PORT, 7200)]
    client.receive_datagram(encode_natpmp(MapResponse(NatPmpOpcode.MAP_UDP, 0, gw.epoch(when),
                                                      PORT, EXT_PORT + 1, 7200)), GATEWAY, when)
    assert events(client) == [MappingCreated(NATPMP, (str(EXT_IP), EXT_PORT + 1), 7200)]


def test_a_renewal_answered_after_a_reboot_is_a_new_mapping() -> None:
    client, gw = mapped(PCP)
    gw.boot = 3000.0
    client.handle_timer(3600.0)
    pump(client, gw, 3600.0)
    assert events(client) == [MappingCreated(PCP, EXTERNAL, 7200)]
    assert client.state is PortMapState.MAPPED


def test_a_pcp_announce_with_a_reset_epoch_maps_again() -> None:
    client, gw = mapped(PCP)
    gw.boot = 95.0
    client.receive_datagram(encode_pcp(PcpResponse(PcpOpcode.ANNOUNCE, 0, 0, gw.epoch(100.0))),
                            GATEWAY, 100.0)
    assert client.state is PortMapState.MAPPING
    when = client.get_timer()
    assert when is not None
    client.handle_timer(when)
    pump(client, gw, when)
    assert events(client) == [MappingCreated(PCP, EXTERNAL, 7200)]


def test_a_new_nat_pmp_address_renews_at_once() -> None:
    client, gw = mapped(NATPMP)
    moved = ipaddress.IPv4Address("198.51.100.9")
    gw.address = moved
    client.receive_datagram(gw.announcement(50.0), GATEWAY, 50.0)
    assert sent(client, 50.0) == [MapRequest(NatPmpOpcode.MAP_UDP, PORT, EXT_PORT, 7200)]
    client.handle_timer(50.0)
    client.receive_datagram(encode_natpmp(MapResponse(NatPmpOpcode.MAP_UDP, 0, gw.epoch(50.0),
                                                      PORT, EXT_PORT, 7200)), GATEWAY, 50.0)
    assert events(client) == [MappingRenewed(NATPMP, (str(moved), EXT_PORT), 7200)]


def test_a_pcp_server_update_of_the_mapping_is_reported_once() -> None:
    client, gw = mapped(PCP)
    first = gw.seen[-1]
    assert isinstance(first, PcpRequest)
    update = gw.pcp_map(first, 20.0, external_port=EXT_PORT + 5)
    client.receive_datagram(update, GATEWAY, 20.0)
    assert events(client) == [MappingRenewed(PCP, (str(EXT_IP), EXT_PORT + 5), 7200)]
    client.receive_datagram(update, GATEWAY, 20.1)  # a repeat changes nothing
    assert events(client) == [] and client.statistics().unexpected == 1


@pytest.mark.parametrize(("previous", "elapsed", "current", "valid"), [
    (1000, 600.0, 1600, True),
    (1000, 600.0, 1527, True),  # 7/8 of 600 is 525, less 2
    (1000, 600.0, 1522, False),
    (1000, 600.0, 10, False),
    (0, 0.0, 0, True),
])
def test_nat_pmp_epoch_rule(previous: int, elapsed: float, current: int, valid: bool) -> None:
    assert natpmp_epoch_valid(previous, elapsed, current) is valid


@pytest.mark.parametrize(("previous", "elapsed", "current", "valid"), [
    (1000, 600.0, 1600, True),
    (1000, 0.0, 999, True),  # back by one second is tolerated
    (1000, 600.0, 999, False),  # but not when 600 s went by
    (1000, 0.0, 998, False),
    (1000, 600.0, 1000 + 600 - 39, True),  # within 2 s plus a sixteenth
    (1000, 600.0, 1000 + 600 - 40, False),
    (1000, 600.0, 2000, False),  # jumped ahead
])
def test_pcp_epoch_rule(previous: int, elapsed: float, current: int, valid: bool) -> None:
    assert pcp_epoch_valid(previous, elapsed, current) is valid


# -- what is ignored ---------------------------------------------------------------


def test_a_pcp_answer_with_another_nonce_is_ignored() -> None:
    gw = Gateway()
    client = make(preference=(PCP,))
    client.start(0.0)
    [announce] = client.datagrams_to_send(0.0)
    client.receive_datagram(gw.answer(announce[0], 0.0) or b"", GATEWAY, 0.0)
    [map_request] = sent(client, 0.0)
    assert isinstance(map_request, PcpRequest)
    client.receive_datagram(gw.pcp_map(map_request, 0.1, nonce=bytes(12)), GATEWAY, 0.1)
    assert events(client) == [] and client.state is PortMapState.MAPPING
    assert client.statistics().nonce_mismatch == 1
    client.receive_datagram(gw.pcp_map(map_request, 0.2), GATEWAY, 0.2)
    assert events(client) == [MappingCreated(PCP, EXTERNAL, 7200)]


@pytest.mark.parametrize("source", [("192.168.1.2", 5351), ("192.168.1.1", 5350),
                                    ("203.0.113.7", 5351)])
def test_answers_from_anywhere_but_the_gateway_are_ignored(source: Address) -> None:
    gw = Gateway()
    client = make(preference=(NATPMP,))
    client.start(0.0)
    [probe] = client.datagrams_to_send(0.0)
    answer = gw.answer(probe[0], 0.0) or b""
    client.receive_datagram(answer, source, 0.0)
    assert client.state is PortMapState.PROBING and sent(client, 0.0) == []
    assert client.statistics().foreign == 1
    # the same answer from the gateway (as a dual-stack socket reports it) counts
    client.receive_datagram(answer, ("::ffff:192.168.1.1", 5351), 0.0)
    assert sent(client, 0.0) == [MapRequest(NatPmpOpcode.MAP_UDP, PORT, PORT, 7200)]


@pytest.mark.parametrize("data", [b"", b"\x00\x80\x00\x00", b"\x02\x80", bytes(24),
                                  b"\x01\x80\x00\x00" + bytes(20), b"\xc0" + bytes(40)])
def test_undecodable_answers_are_counted_and_dropped(data: bytes) -> None:
    client = make()
    client.start(0.0)
    client.datagrams_to_send(0.0)
    client.receive_datagram(data, GATEWAY, 0.0)
    assert client.statistics().malformed == 1 and events(client) == []
    assert client.state is PortMapState.PROBING and sent(client, 0.0) == []


def test_answers_to_nothing_outstanding_are_ignored() -> None:
    client, gw = mapped(NATPMP)
    late = encode_natpmp(MapResponse(NatPmpOpcode.MAP_UDP, 0, gw.epoch(5.0), PORT, 1, 7200))
    client.receive_datagram(late, GATEWAY, 5.0)
    other_port = encode_natpmp(MapResponse(NatPmpOpcode.MAP_UDP, 0, gw.epoch(5.0), 1, 1, 7200))
    client.receive_datagram(other_port, GATEWAY, 5.0)
    client.receive_datagram(encode_pcp(PcpResponse(PcpOpcode.ANNOUNCE, 0, 0, 5)), GATEWAY, 5.0)
    assert events(client) == [] and client.external == EXTERNAL
    assert client.statistics().unexpected == 3


# -- the policy and the API ----------------------------------------------------------

A, U, P, K = (ProbeOutcome.AVAILABLE, ProbeOutcome.UNAVAILABLE, ProbeOutcome.PENDING,
              ProbeOutcome.UNKNOWN)


@pytest.mark.parametrize(("outcomes", "waited", "chosen"), [
    ({PCP: A, NATPMP: A}, False, PCP),
    ({PCP: P, NATPMP: A}, False, None),  # PCP may still answer
    ({PCP: P, NATPMP: A}, True, NATPMP),
    ({PCP: U, NATPMP: A}, False, NATPMP),
    ({PCP: A, NATPMP: P}, False, PCP),  # the best already answered
    ({PCP: U, NATPMP: U}, True, None),
    ({PCP: K, NATPMP: A}, False, NATPMP),
    ({NATPMP: A}, False, NATPMP),
])
def test_choose_protocol(outcomes: dict[MappingProtocol, ProbeOutcome], waited: bool,
                         chosen: MappingProtocol | None) -> None:
    assert choose_protocol((PCP, NATPMP), outcomes, waited=waited) is chosen


def test_preference_can_reverse_the_order() -> None:
    gw = Gateway()
    client = make(preference=(NATPMP, PCP))
    client.start(0.0)
    pump(client, gw, 0.0)
    assert events(client) == [MappingCreated(NATPMP, EXTERNAL, 7200)]


def test_start_twice_and_bad_config_are_refused() -> None:
    client = make()
    client.start(0.0)
    with pytest.raises(LocalProtocolError, match="start"):
        client.start(1.0)
    for bad in ({"lifetime": 0}, {"preference": ()}, {"preference": (PCP, PCP)},
                {"renew_fraction": 1.0}, {"natpmp_max_transmissions": 0},
                {"pcp_rto_jitter": 1.0}, {"pcp_initial_rto": 2000.0}):
        with pytest.raises(ValueError):
            PortMapConfig(**bad)
    with pytest.raises(LocalProtocolError):
        PortMapClient(GATEWAY_IP, client_ip=CLIENT_IP, internal_port=0, rng=random.Random())


def test_start_again_after_a_failure() -> None:
    client = make(preference=(NATPMP,))
    client.start(0.0)
    send_times(client, until=1000)
    assert client.state is PortMapState.IDLE
    client.start(2000.0)
    pump(client, Gateway(), 2000.0)
    assert events(client) == [MappingCreated(NATPMP, EXTERNAL, 7200)]
