"""Rate-limited logging of what a remote party can make happen over and over.

A peer that sends garbage, floods handshakes or breaks the protocol must not
be able to flood the log in return. :class:`LogLimiter` logs the 1st, 2nd,
4th, 8th ... occurrence of each (kind, peer) at the level asked for and the
others at DEBUG, and counts every one, so ``statistics()`` still accounts
for what the log left out. The table of peers is bounded (least recently
seen forgotten first): a flood from many sources costs bounded memory.

Sans-IO: no clock; importing this module loads no driver.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Hashable

__all__ = ["LogLimiter", "log_now"]


def log_now(count: int) -> bool:
    """True for the 1st, 2nd, 4th, 8th ... occurrence (``count`` from 1)."""
    return count > 0 and count & (count - 1) == 0


class LogLimiter:
    """Counts repeated log events per kind and per peer; logs few of them.

    ``max_peers`` bounds the per-peer table; ``counts`` holds how many of
    each kind happened, ``suppressed`` how many went to DEBUG instead of
    their level.
    """

    def __init__(self, logger: logging.Logger | logging.LoggerAdapter[logging.Logger], *,
                 max_peers: int = 1024) -> None:
        self._logger = logger
        self._max_peers = max_peers
        self._seen: OrderedDict[tuple[str, Hashable], int] = OrderedDict()
        self.counts: dict[str, int] = {}
        self.suppressed = 0

    def log(self, level: int, kind: str, peer: Hashable, msg: str, *args: object) -> bool:
        """Log ``msg % args`` at ``level`` if this (kind, peer) is due; at
        DEBUG otherwise. Returns whether it went out at ``level``."""
        self.counts[kind] = self.counts.get(kind, 0) + 1
        key = (kind, peer)
        n = self._seen.get(key, 0) + 1
        self._seen[key] = n
        self._seen.move_to_end(key)
        while len(self._seen) > self._max_peers:
            self._seen.popitem(last=False)
        if log_now(n):
            if n > 1:
                msg = f"{msg} ({n} times so far)"
            self._logger.log(level, msg, *args)
            return True
        self.suppressed += 1
        self._logger.debug(msg, *args)
        return False

    def warning(self, kind: str, peer: Hashable, msg: str, *args: object) -> bool:
        return self.log(logging.WARNING, kind, peer, msg, *args)

    def info(self, kind: str, peer: Hashable, msg: str, *args: object) -> bool:
        return self.log(logging.INFO, kind, peer, msg, *args)
