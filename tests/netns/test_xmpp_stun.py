"""A domain whose server lists STUN and no TURN, in the NAT lab.

Prosody names only a STUN server by XEP-0215 (``mod_external_services``;
coturn answers the Bindings, no allocation is possible with no
credentials). Each device asks it, from its peer's one UDP socket, for its
reflexive address (a STUN Binding, :class:`~dtx.proto.binding.BindingClient`)
and offers that with its host candidate: a punchable pair (port-restricted
cone and restricted cone) ends on the direct path with no relay at all.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dtx.lab import STANDARD_WAN, Lab
from dtx.wire.jingle import CandidateType

from ..loopback.test_xmpp_signalling import stanzas_both_ways
from .test_xmpp_signalling import DEADLINE, connected, in_first_home, xmpp_lab

pytestmark = pytest.mark.netns


def test_a_stun_only_server_gives_reflexive_candidates_that_punch(
        netns_ready: None, tmp_path: Path) -> None:
    async def main() -> dict[str, object]:
        async with connected(scene, turn=False) as c:
            sigs = c.signalling
            await c.session.wait_path("direct", timeout=DEADLINE)
            await stanzas_both_ways(c.session, c.accepted)
            return {
                "kinds": [sorted(k.type.value for k in sig.local_candidates()) for sig in sigs],
                "reflexive": [next((k.addr[0] for k in sig.local_candidates()
                                    if k.type is CandidateType.SRFLX), None) for sig in sigs],
                "public": [h.public_ip for h in (scene.home_a, scene.home_b)],
                "turn": [sig.turn for sig in sigs],
                "paths": (str(c.session.path), str(c.accepted.path)),
            }

    with Lab(wan=STANDARD_WAN) as lab, xmpp_lab(
            lab, tmp_path, "port-restricted-cone", "restricted-cone", stun_only=True) as scene:
        outcome = in_first_home(scene, main)
        log = scene.coturn.stop()
    assert outcome["kinds"] == [["host", "srflx"], ["host", "srflx"]], outcome
    assert outcome["reflexive"] == outcome["public"], outcome  # each home's NAT address
    assert outcome["turn"] == [None, None], outcome
    assert outcome["paths"] == ("direct", "direct"), outcome
    # nothing allocated
    assert [s for s in scene.coturn.sessions(log) if s.event == "new"] == [], log
