"""The standard WAN scenario with 1% loss on every link to the core, each
direction (see :mod:`bench.scenarios.wan` for the systems)."""

from __future__ import annotations

from dtx.lab import STANDARD_WAN

from .common import Options, Result
from .wan import DESCRIPTIONS, SYSTEMS, lossy, run_wan

NAME = "wan_loss"
LOSS = 0.01


def run(opts: Options) -> list[Result]:
    """The standard WAN with 1% loss per link and direction."""
    return run_wan(opts, NAME, lossy(STANDARD_WAN, LOSS))


__all__ = ["NAME", "SYSTEMS", "DESCRIPTIONS", "run"]
