"""Random identifiers unique in their table (registration and
introduction ids, relay channel numbers)."""

from __future__ import annotations

from collections.abc import Callable, Container
from typing import TypeVar

from dtx.errors import DtxError

__all__ = ["unique"]

_TRIES = 16
_T = TypeVar("_T")


def unique(draw: Callable[[], _T], taken: Container[_T]) -> _T:
    """A value from ``draw()`` that is not in ``taken``. The spaces drawn
    from (2**64 ids, 2**32 channels for at most a few hundred per device)
    make a second draw rare and a 16th practically impossible."""
    for _ in range(_TRIES):
        value = draw()
        if value not in taken:
            return value
    raise DtxError("no free identifier")
