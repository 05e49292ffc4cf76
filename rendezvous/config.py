"""Tunables of the rendezvous server: one keyword-only dataclass.

Every limit the server enforces is a field here (docs/rendezvous.md lists
them with their defaults); tests build the config they need instead of
patching module globals. Seconds unless the name says otherwise.

Control messages are charged to one of two budgets, after they decode
(``rendezvous.core``): a message carrying a live registration id from
that registration's address is charged to the registration
(``control_per_registration_*``); anything else from a source that proved
nothing — HELLO, REGISTER, a registration id the server does not know —
to its source address (``control_per_address_*``) *and* its source IP
(``control_per_source_*``). The per-address bucket keeps one busy socket
from using up what its IP may send; the per-IP bucket caps what the
server sends towards one IP that proved nothing. Datagrams that do not
decode cost no budget at all.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RendezvousConfig"]


@dataclass(frozen=True, kw_only=True)
class RendezvousConfig:
    """Tunables of the rendezvous core; seconds unless the name says."""

    lifetime: float = 90.0
    keepalive: float = 25.0
    challenge_validity: float = 30.0
    max_registrations: int = 100_000
    max_devices_per_account: int = 32
    max_introductions: int = 200_000
    max_introductions_per_device: int = 256
    max_pending_introductions_per_target: int = 16
    max_used_challenges: int = 200_000
    max_pending_verifications: int = 1024
    verification_timeout: float = 10.0
    relay: bool = True
    relay_bytes_per_s: float = 2 * 1024 * 1024
    relay_burst_bytes: float = 512 * 1024
    relay_frames_per_s: float = 2000.0
    relay_burst_frames: float = 500.0
    pending_frames: int = 8
    pending_bytes: int = 16 * 1024
    pending_hold: float = 2.0
    intro_timeout: float = 5.0
    intro_retransmits: tuple[float, ...] = (0.25, 0.5, 1.0)
    control_per_source_per_s: float = 50.0
    """Control messages from unproven sources, per source IP."""
    control_per_source_burst: float = 100.0
    control_per_address_per_s: float = 10.0
    """Control messages from unproven sources, per source (IP, port)."""
    control_per_address_burst: float = 20.0
    control_per_registration_per_s: float = 50.0
    """Control messages carrying a live registration id, per registration."""
    control_per_registration_burst: float = 100.0
    max_sources: int = 65_536
    """Entries in each per-source table (IPs, addresses, log peers)."""
