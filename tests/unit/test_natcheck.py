"""The RFC 5780 discovery machine against a modelled NAT and the real responder.

No sockets, no sleeps: a :class:`MemoryNat` translates and filters like the
RFC 4787 classes, :func:`rendezvous.stun.answer_stun` (or a scripted variant)
answers, and a fake clock jumps to the machine's timer.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from dtx.errors import LocalProtocolError
from dtx.natcheck import (
    Behaviour,
    NatCheck,
    NatCheckConfig,
    NatReport,
    Step,
    add_cli,
    cmd_nat_check,
    format_report,
)
from dtx.wire.stun import (
    Attribute,
    AttrType,
    StunClass,
    StunMessage,
    address_attribute,
    binding_request,
    decode_stun,
    encode_stun,
    error_code_attribute,
    xor_address_attribute,
)
from rendezvous.stun import ServerAddresses, answer_stun

Address = tuple[str, int]
EIM = EIF = Behaviour.ENDPOINT_INDEPENDENT
ADM = ADF = Behaviour.ADDRESS_DEPENDENT
APDM = APDF = Behaviour.ADDRESS_AND_PORT_DEPENDENT
UNKNOWN = Behaviour.UNKNOWN

PRIMARY: Address = ("203.0.113.10", 3478)
FULL = ServerAddresses(PRIMARY, "203.0.113.11", 3479)
LOCAL: Address = ("10.1.0.10", 40000)
PUBLIC_IP = "198.51.100.10"


@dataclass
class MemoryNat:
    """One LAN endpoint behind a NAT of the given RFC 4787 classes."""

    mapping: Behaviour = EIM
    filtering: Behaviour = APDF
    translate: bool = True
    hairpin: bool = True
    ports: dict[object, int] = field(default_factory=dict)
    contacted: set[Address] = field(default_factory=set)

    def outbound(self, dest: Address) -> Address:
        """The public source address of a packet to ``dest``."""
        self.contacted.add(dest)
        if not self.translate:
            return LOCAL
        key: object = {EIM: (), ADM: dest[0], APDM: dest}[self.mapping]
        if key not in self.ports:
            self.ports[key] = 50000 + len(self.ports)
        return (PUBLIC_IP, self.ports[key])

    def lets_in(self, src: Address) -> bool:
        if self.filtering is EIF:
            return True
        if self.filtering is ADF:
            return any(ip == src[0] for ip, _ in self.contacted)
        return src in self.contacted

    def is_public(self, dest: Address) -> bool:
        own = LOCAL if not self.translate else None
        return dest == own or (dest[0] == PUBLIC_IP and dest[1] in self.ports.values())


Responder = Callable[[bytes, Address, Address], tuple[bytes, Address] | None]
"""(request, public source, server socket) -> (reply, sent from) or None."""


def real_server(addresses: ServerAddresses) -> Responder:
    def answer(data: bytes, src: Address, local: Address) -> tuple[bytes, Address] | None:
        if local not in addresses.sockets():
            return None
        reply = answer_stun(data, src=src, local=local, addresses=addresses)
        if reply is None:
            return None
        return reply.data, reply.send_from

    return answer


@dataclass
class Run:
    report: NatReport
    sent: list[tuple[float, Step, Address]]
    elapsed: float


def run(
    nat: MemoryNat,
    server: Responder,
    *,
    lose: Callable[[Step, int], bool] = lambda step, n: False,
    config: NatCheckConfig | None = None,
    local: Address = LOCAL,
) -> Run:
    """Drive a check to the end; ``lose(step, n)`` drops the n-th send of a step."""
    machine = NatCheck(PRIMARY, local=local, rng=random.Random(7), config=config)
    now = 0.0
    sent: list[tuple[float, Step, Address]] = []
    counts: dict[Step, int] = {}
    second: set[Step] = set()
    for _ in range(200):
        if machine.done:
            break
        for data, dest in machine.datagrams_to_send(now):
            step = machine.step
            if machine.from_second_socket:
                second.add(step)
            counts[step] = counts.get(step, 0) + 1
            sent.append((now, step, dest))
            if lose(step, counts[step]):
                continue
            src = nat.outbound(dest)
            if nat.is_public(dest):
                if nat.hairpin:
                    machine.receive_datagram(data, src, now)
                continue
            out = server(data, src, dest)
            if out is not None and nat.lets_in(out[1]):
                machine.receive_datagram(out[0], out[1], now)
        timer = machine.get_timer()
        if timer is not None:
            now = max(now, timer)
            machine.handle_timer(now)
    assert machine.done
    assert second <= {Step.HAIRPIN}  # only the hairpin request leaves from elsewhere
    if Step.HAIRPIN in counts:
        assert second == {Step.HAIRPIN}
    return Run(machine.report(), sent, now)


# -- classification ------------------------------------------------------------


@pytest.mark.parametrize("mapping", [EIM, ADM, APDM])
@pytest.mark.parametrize("filtering", [EIF, ADF, APDF])
def test_each_mapping_and_filtering_class(mapping: Behaviour, filtering: Behaviour) -> None:
    r = run(MemoryNat(mapping=mapping, filtering=filtering), real_server(FULL))
    assert r.report.mapping is mapping
    assert r.report.filtering is filtering
    assert r.report.public == (PUBLIC_IP, 50000)
    assert r.report.local == LOCAL
    assert r.report.nat is True
    assert r.report.rfc5780 is True
    assert r.report.other == ("203.0.113.11", 3479)
    assert r.report.hairpin is True


def test_filtering_tests_run_before_the_other_address_is_contacted() -> None:
    # an address-dependent filter would let the other IP in after mapping test II
    r = run(MemoryNat(mapping=EIM, filtering=ADF), real_server(FULL))
    steps = [step for _, step, _ in r.sent]
    first_other = min(i for i, (_, _, dest) in enumerate(r.sent) if dest[0] == "203.0.113.11")
    assert Step.FILTERING_III in steps[:first_other]
    assert all(dest == PRIMARY for _, step, dest in r.sent
               if step in (Step.MAPPING_I, Step.FILTERING_II, Step.FILTERING_III))


def test_mapping_test_destinations() -> None:
    r = run(MemoryNat(mapping=APDM, filtering=APDF), real_server(FULL))
    dests = {step: dest for _, step, dest in r.sent}
    assert dests[Step.MAPPING_II] == ("203.0.113.11", 3478)
    assert dests[Step.MAPPING_III] == ("203.0.113.11", 3479)
    assert dests[Step.HAIRPIN] == (PUBLIC_IP, 50000)


def test_no_nat_open() -> None:
    r = run(MemoryNat(translate=False, filtering=EIF), real_server(FULL))
    assert r.report.nat is False
    assert r.report.public == LOCAL
    assert r.report.mapping is EIM
    assert r.report.filtering is EIF
    assert r.report.hairpin is None
    assert {step for _, step, _ in r.sent} == {Step.MAPPING_I, Step.FILTERING_II}


def test_no_nat_behind_a_firewall() -> None:
    r = run(MemoryNat(translate=False, filtering=APDF), real_server(FULL))
    assert (r.report.nat, r.report.mapping, r.report.filtering) == (False, EIM, APDF)


def test_wildcard_local_address_cannot_tell_nat() -> None:
    r = run(MemoryNat(mapping=EIM, filtering=EIF), real_server(FULL), local=("0.0.0.0", 40000))
    assert r.report.nat is None
    assert (r.report.mapping, r.report.filtering) == (EIM, EIF)


def test_no_hairpin() -> None:
    r = run(MemoryNat(hairpin=False), real_server(FULL))
    assert r.report.hairpin is False
    assert (r.report.mapping, r.report.filtering) == (EIM, APDF)


def test_hairpin_can_be_skipped() -> None:
    r = run(MemoryNat(), real_server(FULL), config=NatCheckConfig(hairpin=False))
    assert r.report.hairpin is None
    assert Step.HAIRPIN not in {step for _, step, _ in r.sent}


# -- servers that cannot do RFC 5780 --------------------------------------------------


def test_server_without_other_address() -> None:
    r = run(MemoryNat(mapping=APDM, filtering=APDF), real_server(ServerAddresses(PRIMARY)))
    assert r.report.rfc5780 is False
    assert r.report.other is None
    assert (r.report.mapping, r.report.filtering) == (UNKNOWN, UNKNOWN)
    assert r.report.public == (PUBLIC_IP, 50000)
    assert r.report.nat is True
    steps = [step for _, step, _ in r.sent]
    assert Step.FILTERING_II not in steps and Step.MAPPING_II not in steps


def test_server_with_only_an_alternate_port() -> None:
    r = run(MemoryNat(), real_server(ServerAddresses(PRIMARY, alt_port=3479)))
    assert r.report.rfc5780 is False
    assert (r.report.mapping, r.report.filtering) == (UNKNOWN, UNKNOWN)


def scripted(*, refuse_change: bool) -> Responder:
    """A server that claims an OTHER-ADDRESS but mishandles CHANGE-REQUEST:
    it answers from the socket asked, or refuses with 420."""
    inner = real_server(FULL)

    def answer(data: bytes, src: Address, local: Address) -> tuple[bytes, Address] | None:
        req = decode_stun(data)
        if req.change_request is None:
            return inner(data, src, local)
        attrs: tuple[Attribute, ...]
        if refuse_change:
            attrs = (error_code_attribute(420, "Unknown Attribute"),)
            cls = StunClass.ERROR
        else:
            attrs = (xor_address_attribute(src, req.transaction_id),
                     address_attribute(AttrType.OTHER_ADDRESS, ("203.0.113.11", 3479)))
            cls = StunClass.SUCCESS
        msg = StunMessage(req.method, cls, req.transaction_id, attrs)
        return encode_stun(msg), local  # always from the socket asked

    return answer


@pytest.mark.parametrize("how", ["ignores", "refuses"])
def test_change_request_not_honoured_leaves_filtering_unknown(how: str) -> None:
    server = scripted(refuse_change=how == "refuses")
    r = run(MemoryNat(mapping=ADM, filtering=EIF), server)
    assert r.report.filtering is UNKNOWN
    assert r.report.mapping is ADM  # the mapping tests need no CHANGE-REQUEST
    assert r.report.rfc5780 is True


# -- loss and retransmission ----------------------------------------------------------


def test_silent_server_gives_up_after_the_bound() -> None:
    r = run(MemoryNat(), real_server(FULL), lose=lambda step, n: True)
    assert [t for t, _, _ in r.sent] == pytest.approx([0.0, 0.1, 0.3, 0.7])
    assert {step for _, step, _ in r.sent} == {Step.MAPPING_I}
    assert r.elapsed == pytest.approx(1.5)
    rep = r.report
    assert (rep.public, rep.nat, rep.rfc5780, rep.hairpin) == (None, None, False, None)
    assert (rep.mapping, rep.filtering) == (UNKNOWN, UNKNOWN)


def test_retransmission_bound_is_configurable() -> None:
    config = NatCheckConfig(rto=0.05, max_rto=0.1, max_transmissions=6)
    r = run(MemoryNat(), real_server(FULL), lose=lambda step, n: True, config=config)
    assert [t for t, _, _ in r.sent] == pytest.approx([0.0, 0.05, 0.15, 0.25, 0.35, 0.45])
    assert r.elapsed == pytest.approx(0.55)


def test_lost_requests_are_retransmitted_and_answered() -> None:
    r = run(MemoryNat(mapping=ADM, filtering=ADF), real_server(FULL),
            lose=lambda step, n: n <= 3)
    assert (r.report.mapping, r.report.filtering) == (ADM, ADF)
    first = [t for t, step, _ in r.sent if step is Step.MAPPING_I]
    assert first == pytest.approx([0.0, 0.1, 0.3, 0.7])


def test_lost_mapping_answer_leaves_mapping_unknown() -> None:
    r = run(MemoryNat(mapping=APDM), real_server(FULL),
            lose=lambda step, n: step is Step.MAPPING_II)
    assert r.report.mapping is UNKNOWN
    assert r.report.filtering is APDF
    assert sum(step is Step.MAPPING_II for _, step, _ in r.sent) == 4


def test_whole_check_is_bounded_in_time() -> None:
    # worst case: both filtering tests and the hairpin go unanswered
    r = run(MemoryNat(mapping=APDM, filtering=APDF, hairpin=False), real_server(FULL))
    assert r.elapsed == pytest.approx(3 * 1.5)
    assert len(r.sent) == 1 + 4 + 4 + 1 + 1 + 4


# -- what the machine ignores -------------------------------------------------------


def test_unrelated_datagrams_are_ignored() -> None:
    machine = NatCheck(PRIMARY, local=LOCAL, rng=random.Random(1))
    [(request, _)] = machine.datagrams_to_send(0.0)
    tid = decode_stun(request).transaction_id
    junk = [
        b"",
        b"\x17\xfe\xfd" + bytes(40),  # DTLS-ish, not STUN
        request[:-1],
        binding_request(bytes(12)),  # a request, other id
        encode_stun(StunMessage(1, StunClass.SUCCESS, bytes(12))),  # other id
        encode_stun(StunMessage(1, StunClass.SUCCESS, tid + bytes(4), classic=True)),
        encode_stun(StunMessage(1, StunClass.REQUEST, tid)),  # our id, but a request
        bytes(20),
        bytes.fromhex("0101000c") + bytes(16) + bytes.fromhex("00200008") + bytes(8),
    ]
    for data in junk:
        machine.receive_datagram(data, PRIMARY, 0.01)
    assert machine.step is Step.MAPPING_I
    assert machine.public is None
    assert machine.datagrams_to_send(0.01) == []
    assert machine.get_timer() == pytest.approx(0.1)


def test_success_without_mapped_address_counts_as_no_answer() -> None:
    machine = NatCheck(PRIMARY, local=LOCAL, rng=random.Random(1))
    [(request, _)] = machine.datagrams_to_send(0.0)
    tid = decode_stun(request).transaction_id
    machine.receive_datagram(encode_stun(StunMessage(1, StunClass.SUCCESS, tid)), PRIMARY, 0.0)
    assert machine.done
    assert machine.report().public is None


def test_config_is_checked() -> None:
    with pytest.raises(LocalProtocolError):
        NatCheckConfig(rto=0)
    with pytest.raises(LocalProtocolError):
        NatCheckConfig(max_transmissions=0)
    with pytest.raises(LocalProtocolError):
        NatCheckConfig(rto=1.0, max_rto=0.5)


# -- report and command line ----------------------------------------------------------


def test_report_json_and_summary() -> None:
    rep = run(MemoryNat(mapping=EIM, filtering=ADF), real_server(FULL)).report
    obj = json.loads(json.dumps(rep.to_json()))
    assert obj["mapping"] == "endpoint-independent"
    assert obj["filtering"] == "address-dependent"
    assert obj["public"] == [PUBLIC_IP, 50000]
    assert obj["local"] == list(LOCAL)
    assert obj["nat"] is True and obj["rfc5780"] is True
    assert obj["classic"] is None
    text = format_report(rep)
    assert "address-dependent" in text and f"{PUBLIC_IP}:50000" in text


def test_add_cli_registers_nat_check() -> None:
    parser = argparse.ArgumentParser(prog="dtx")
    sub = parser.add_subparsers(dest="command", required=True)
    add_cli(sub)
    args = parser.parse_args(["nat-check", "--stun", "203.0.113.10:3478", "--json",
                              "--no-classic", "--bind", "10.1.0.10"])
    assert args.func is cmd_nat_check
    assert args.stun == ("203.0.113.10", 3478)
    assert (args.json, args.no_classic, args.bind, args.port) == (True, True, "10.1.0.10", 0)
    defaults = parser.parse_args(["nat-check", "--stun", "[2001:db8::1]:3478"])
    assert defaults.stun == ("2001:db8::1", 3478)
    assert (defaults.json, defaults.no_classic, defaults.bind) == (False, False, "0.0.0.0")
    for bad in (["nat-check"], ["nat-check", "--stun", "nohost"],
                ["nat-check", "--stun", "h:0"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
