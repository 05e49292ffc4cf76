"""Introductions, and the relay channels each one opens.

An introduction pairs two registrations (the initiator, who asked, and the
responder), gives each a relay channel number unique among its own
channels, and holds the few relay frames that race the responder's ACCEPT
(docs/protocol.md 7.6, 8). :class:`IntroductionTable` owns every
introduction and the channel entries on both registrations, so that
removing one never leaves a channel behind; it also counts each target's
introductions that are not accepted yet.

Sans-IO: time and randomness are arguments.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field

from dtx.wire.control import (
    Candidate,
    CandidateKind,
    ControlMessage,
    MessageType,
    Role,
    encode_control,
)
from dtx.wire.relay import encode_relay
from rendezvous.ids import unique
from rendezvous.registrations import NO_CHANNELS, Registration

__all__ = [
    "ROLE_INITIATOR",
    "ROLE_RESPONDER",
    "Introduction",
    "IntroductionTable",
    "introduction_message",
]

ROLE_INITIATOR = Role.INITIATOR
ROLE_RESPONDER = Role.RESPONDER
_ID_BYTES = 8
_PROBE_KEY_BYTES = 32
_TXID_BYTES = 8


@dataclass(eq=False, slots=True)
class Introduction:
    id: bytes
    probe_key: bytes
    initiator: Registration
    responder: Registration
    channel_initiator: int
    channel_responder: int
    created: float
    responder_txid: bytes
    accepted: bool = False
    retransmits: int = 0
    pending: deque[tuple[float, bytes]] = field(default_factory=deque)
    """Frames towards the responder held until it accepts: (arrival, payload)."""
    pending_bytes: int = 0
    header_initiator: bytes = field(init=False)
    """The relay frame header towards the initiator (its channel)."""
    header_responder: bytes = field(init=False)

    def __post_init__(self) -> None:
        self.header_initiator = encode_relay(self.channel_initiator, b"")
        self.header_responder = encode_relay(self.channel_responder, b"")

    def header_of(self, reg: Registration) -> bytes:
        """The header of a relay frame to ``reg`` (on its channel)."""
        return self.header_responder if reg is self.responder else self.header_initiator

    def other(self, reg: Registration) -> Registration:
        return self.responder if reg is self.initiator else self.initiator

    def channel_of(self, reg: Registration) -> int:
        return self.channel_responder if reg is self.responder else self.channel_initiator

    def hold(self, payload: bytes, now: float, *, max_frames: int, max_bytes: int) -> bool:
        """Keep a frame for the responder until it accepts; False when full."""
        if len(self.pending) >= max_frames or self.pending_bytes + len(payload) > max_bytes:
            return False
        self.pending.append((now, payload))
        self.pending_bytes += len(payload)
        return True

    def expire_held(self, now: float, hold: float) -> int:
        """Drop held frames that have waited ``hold`` seconds; how many."""
        dropped = 0
        while self.pending and self.pending[0][0] + hold <= now:
            _, payload = self.pending.popleft()
            self.pending_bytes -= len(payload)
            dropped += 1
        return dropped

    def take_held(self) -> list[bytes]:
        """Every held frame, oldest first; none are held afterwards."""
        frames = [payload for _, payload in self.pending]
        self.pending.clear()
        self.pending_bytes = 0
        return frames


def introduction_message(
    intro: Introduction, role: Role, txid: bytes, *, nat_mapping: bool
) -> bytes:
    """The INTRODUCTION for one side of ``intro`` (``role`` names which);
    with ``nat_mapping`` (the server has a mapping port) it carries both
    sides' mappings as they stand now, the receiver's first."""
    me = intro.initiator if role == ROLE_INITIATOR else intro.responder
    peer = intro.other(me)
    reflexive = Candidate(CandidateKind.SERVER_REFLEXIVE, peer.addr)
    cands = [c for c in peer.candidates if c.addr != peer.addr] + [reflexive]
    return encode_control(
        ControlMessage(
            MessageType.INTRODUCTION,
            txid,
            intro=intro.id,
            role=role,
            peer_jid=peer.full_jid,
            peer_key=peer.key,
            channel=intro.channel_of(me),
            probe_key=intro.probe_key,
            candidates=tuple(cands),
            nat_mapping=(me.nat_mapping, peer.nat_mapping) if nat_mapping else None,
        )
    )


class IntroductionTable:
    """Every introduction, by id, and the relay channels they open."""

    def __init__(self) -> None:
        self._intros: dict[bytes, Introduction] = {}
        self._pending_per_target: dict[bytes, int] = {}

    def __len__(self) -> int:
        return len(self._intros)

    def __contains__(self, intro_id: object) -> bool:
        return intro_id in self._intros

    def get(self, intro_id: bytes) -> Introduction | None:
        return self._intros.get(intro_id)

    def held_frames(self) -> int:
        return sum(len(i.pending) for i in self._intros.values() if i.pending)

    def pending_for(self, target: Registration) -> int:
        """How many introductions to ``target`` it has not accepted yet."""
        return self._pending_per_target.get(target.id, 0)

    def recent(
        self, initiator: Registration, responder: Registration, now: float, within: float
    ) -> Introduction | None:
        """An introduction of ``initiator`` to ``responder`` made less than
        ``within`` seconds ago."""
        for intro in initiator.channels.values():
            if (
                intro.initiator is initiator
                and intro.responder is responder
                and now - intro.created < within
            ):
                return intro
        return None

    def create(
        self, initiator: Registration, responder: Registration, now: float, rng: random.Random
    ) -> Introduction:
        intro = Introduction(
            id=unique(lambda: rng.randbytes(_ID_BYTES), self._intros),
            probe_key=rng.randbytes(_PROBE_KEY_BYTES),
            initiator=initiator,
            responder=responder,
            channel_initiator=unique(lambda: rng.getrandbits(32), initiator.channels),
            channel_responder=unique(lambda: rng.getrandbits(32), responder.channels),
            created=now,
            responder_txid=rng.randbytes(_TXID_BYTES),
        )
        self._intros[intro.id] = intro
        for reg in (initiator, responder):
            if reg.channels is NO_CHANNELS:
                reg.channels = {}
        initiator.channels[intro.channel_initiator] = intro
        responder.channels[intro.channel_responder] = intro
        self._pending_per_target[responder.id] = self.pending_for(responder) + 1
        return intro

    def accept(self, intro: Introduction) -> None:
        if not intro.accepted:
            intro.accepted = True
            self._unpend(intro)

    def remove(self, intro: Introduction) -> int:
        """Forget ``intro`` and its channels; the number of held frames dropped."""
        if self._intros.pop(intro.id, None) is None:
            return 0
        if not intro.accepted:
            self._unpend(intro)
        for reg in (intro.initiator, intro.responder):
            channel = intro.channel_of(reg)
            if reg.channels.get(channel) is intro:
                del reg.channels[channel]
                if not reg.channels:
                    reg.channels = NO_CHANNELS
        return len(intro.take_held())

    def _unpend(self, intro: Introduction) -> None:
        peer_id = intro.responder.id
        left = self._pending_per_target.get(peer_id, 0) - 1
        if left > 0:
            self._pending_per_target[peer_id] = left
        else:
            self._pending_per_target.pop(peer_id, None)
