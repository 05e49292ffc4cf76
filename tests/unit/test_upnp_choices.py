"""UPnP IGD's choices (``dtx.aio.upnp``), which need no router: the service,
the external ports, what a refusal calls for, the lease granted, when to
renew; the configuration's bounds; what ``nat-check`` prints of UPnP's
answer; and a start without async-upnp-client."""

from __future__ import annotations

import random
import sys

import pytest

from dtx.aio.portmap import PortMappingReport, ProtocolAnswer
from dtx.aio.upnp import (
    IGD2_MAX_LEASE,
    UPNP_MISSING,
    WAN_IP_CONNECTION_1,
    WAN_IP_CONNECTION_2,
    WAN_PPP_CONNECTION_1,
    AddRetry,
    UpnpConfig,
    UpnpMapper,
    UpnpUnavailable,
    after_add_failure,
    choose_service,
    external_ports,
    granted_lease,
    renewal_delay,
    upnp_missing,
)
from dtx.natcheck import Behaviour, NatReport, format_report
from dtx.proto.portmap import MappingProtocol, PortMapConfig

PREFERENCE = UpnpConfig().services


@pytest.mark.parametrize("offered, chosen", [
    ([WAN_IP_CONNECTION_1, WAN_IP_CONNECTION_2], WAN_IP_CONNECTION_2),
    ([WAN_PPP_CONNECTION_1, WAN_IP_CONNECTION_1], WAN_IP_CONNECTION_1),
    ([WAN_PPP_CONNECTION_1], WAN_PPP_CONNECTION_1),
    (["urn:schemas-upnp-org:service:Layer3Forwarding:1"], None),
    ([], None),
])
def test_choose_service(offered: list[str], chosen: str | None) -> None:
    assert choose_service(offered, PREFERENCE) == chosen


def test_external_ports_start_with_the_internal_one_and_are_bounded() -> None:
    rng = random.Random(1900)
    ports = external_ports(40000, 4, rng)
    assert ports[0] == 40000 and len(ports) == 4 and len(set(ports)) == 4
    assert all(1024 <= p <= 65535 for p in ports)
    # below the mappable range the internal port is not asked for
    low = external_ports(500, 3, rng)
    assert 500 not in low and len(low) == 3
    # a range as small as the tries: every port once, no endless drawing
    assert sorted(external_ports(65534, 2, rng, low=65534)) == [65534, 65535]
    assert external_ports(40000, 1, rng) == [40000]


@pytest.mark.parametrize("code, retry", [
    (718, AddRetry.OTHER_PORT),         # ConflictInMappingEntry
    (729, AddRetry.OTHER_PORT),         # ConflictWithOtherMechanisms
    (725, AddRetry.PERMANENT_LEASE),    # OnlyPermanentLeasesSupported
    (606, AddRetry.GIVE_UP),            # Action not authorized
    (724, AddRetry.GIVE_UP),            # SamePortValuesRequired
    (728, AddRetry.GIVE_UP),            # NoPortMapsAvailable
    (501, AddRetry.GIVE_UP),
    (None, AddRetry.GIVE_UP),           # no answer
])
def test_after_add_failure(code: int | None, retry: AddRetry) -> None:
    assert after_add_failure(code) is retry


@pytest.mark.parametrize("service, asked, granted", [
    (WAN_IP_CONNECTION_1, 3600, 3600),
    (WAN_IP_CONNECTION_1, 0, 0),                     # permanent
    (WAN_IP_CONNECTION_2, 3600, 3600),
    (WAN_IP_CONNECTION_2, 0, IGD2_MAX_LEASE),        # version 2: a week
    (WAN_IP_CONNECTION_2, 10 ** 6, IGD2_MAX_LEASE),
    (WAN_PPP_CONNECTION_1, 0, 0),
])
def test_granted_lease(service: str, asked: int, granted: int) -> None:
    assert granted_lease(service, asked) == granted


def test_renewal_at_half_then_half_of_what_remains_a_bounded_number_of_times() -> None:
    lease, remaining = 3600.0, 3600.0
    delays = []
    while (delay := renewal_delay(remaining, fraction=0.5, min_interval=1.0)) is not None:
        delays.append(delay)
        remaining -= delay       # that renewal went unanswered
        assert len(delays) < 20
    assert delays[:3] == [1800.0, 900.0, 450.0]
    assert len(delays) == 11 and sum(delays) < lease   # floor(log2(3600)); then it expires
    assert renewal_delay(1.5, fraction=0.5, min_interval=1.0) is None


@pytest.mark.parametrize("bad", [
    {"lease_duration": -1}, {"discovery_timeout": 0}, {"request_timeout": 0},
    {"search_transmissions": 0}, {"search_transmissions": 11}, {"mx": 0},
    {"services": ()}, {"search_targets": ()}, {"external_port_tries": 0},
    {"min_external_port": 65535, "external_port_tries": 2}, {"renew_fraction": 1.0},
])
def test_config_bounds(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        UpnpConfig(**bad)  # type: ignore[arg-type]


def test_upnp_is_no_protocol_of_the_pcp_client() -> None:
    assert MappingProtocol.UPNP.value == "upnp"
    with pytest.raises(ValueError, match="UPnP"):
        PortMapConfig(preference=(MappingProtocol.PCP, MappingProtocol.UPNP))


def test_start_without_the_library_raises_a_typed_error(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m.split(".")[0] == "async_upnp_client"]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "async_upnp_client", None)
    assert upnp_missing() == UPNP_MISSING == "async-upnp-client is not installed"
    with pytest.raises(UpnpUnavailable) as raised:
        UpnpMapper(5000, gateway="192.0.2.1").start()
    assert "pip install 'dtx[upnp]'" in str(raised.value)


def _report(upnp: ProtocolAnswer | None) -> NatReport:
    refused = ProtocolAnswer(True, reason="pcp: refused")
    silent = ProtocolAnswer(False, reason="nat-pmp: no answer")
    return NatReport(mapping=Behaviour.UNKNOWN, filtering=Behaviour.UNKNOWN, public=None,
                     local=("10.1.0.10", 4000), nat=None, hairpin=None, classic=None,
                     rfc5780=False, server=("203.0.113.10", 3478),
                     port_mapping=PortMappingReport("10.1.0.1", refused, silent, upnp))


@pytest.mark.parametrize("upnp, text", [
    (ProtocolAnswer(True, ("1.2.3.10", 4000), 3600), "UPnP 1.2.3.10:4000 for 3600 s"),
    (ProtocolAnswer(True, ("1.2.3.10", 4000), 0), "UPnP 1.2.3.10:4000 with no expiry"),
    (ProtocolAnswer(True, reason="upnp: AddPortMapping refused"),
     "UPnP refused (upnp: AddPortMapping refused)"),
    (ProtocolAnswer(False, reason="upnp: no UPnP IGD answered"),
     "UPnP no answer (upnp: no UPnP IGD answered)"),
    (ProtocolAnswer(False, reason=UPNP_MISSING),
     "UPnP not probed (async-upnp-client is not installed)"),
    (None, "UPnP not probed"),
])
def test_nat_check_says_what_upnp_answered(upnp: ProtocolAnswer | None, text: str) -> None:
    line = format_report(_report(upnp)).splitlines()[-1]
    assert line.startswith("port mapping     gateway 10.1.0.1: PCP refused (pcp: refused); "
                           "NAT-PMP no answer (nat-pmp: no answer); ")
    assert line.endswith(text)
    doc = _report(upnp).to_json()["port_mapping"]
    assert set(doc) == {"gateway", "pcp", "nat_pmp", "upnp", "external"}
    assert doc["upnp"] == (None if upnp is None else upnp.to_json())
