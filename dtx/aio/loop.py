"""The event loop a command runs on: uvloop where it is installed (the
``uvloop`` extra), asyncio's own loop otherwise.

Every dtx command starts its loop with :func:`run` (``dtx``'s commands,
``dtx-rendezvous``, ``python -m dtx.natcheck``, ``python -m dtx.aio.mdns``,
``python -m dtx.demo``), so ``--loop`` (default ``$DTX_LOOP``, else
``auto``) means the same everywhere:

- ``auto`` (the default): uvloop if it can be imported, else asyncio's;
- ``uvloop``: uvloop, or :class:`~dtx.errors.LoopUnavailableError` when
  it is not installed;
- ``asyncio``: asyncio's own loop, even with uvloop installed.

The library itself (:class:`~dtx.aio.peer.Peer`, the rendezvous server,
:class:`~dtx.aio.xmpp.XmppSignalling` over slixmpp) runs on either loop;
it never starts one. An application picks its own, with this function or
with ``asyncio.Runner(loop_factory=...)``.

uvloop is imported when a loop is started, never when this module is: a
command that fails on its arguments pays nothing for it.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from ..errors import LoopUnavailableError

__all__ = ["LOOPS", "LOOP_ENV", "UVLOOP_MISSING", "default_loop", "loop_factory",
           "running_loop_name", "run", "uvloop_missing"]

T = TypeVar("T")

LOOPS = ("auto", "uvloop", "asyncio")
"""The values of ``--loop`` (and of ``run(loop=...)``)."""

LOOP_ENV = "DTX_LOOP"
"""The environment variable whose value is the default of ``--loop``."""

UVLOOP_MISSING = "uvloop is not installed (pip install 'dtx[uvloop]')"


def default_loop() -> str:
    """The default of ``--loop``: ``$DTX_LOOP`` when set (and not empty),
    else ``auto``. Not checked here: the command line checks it as it
    checks ``--loop``."""
    return os.environ.get(LOOP_ENV) or "auto"


def uvloop_missing() -> str | None:
    """Why uvloop cannot be used (it is not installed), or None. Looks the
    package up without importing it."""
    try:
        found = importlib.util.find_spec("uvloop") is not None
    except (ImportError, ValueError):
        found = False
    return None if found else UVLOOP_MISSING


def loop_factory(loop: str = "auto") -> Callable[[], asyncio.AbstractEventLoop] | None:
    """What makes the event loop for ``loop`` (one of :data:`LOOPS`):
    ``uvloop.new_event_loop``, or None for asyncio's own (the
    ``loop_factory`` of :class:`asyncio.Runner`). Raises ``ValueError``
    for another name, :class:`~dtx.errors.LoopUnavailableError` for
    ``uvloop`` when it cannot be imported."""
    if loop not in LOOPS:
        raise ValueError(f"loop {loop!r}: expected one of {', '.join(LOOPS)}")
    if loop == "asyncio":
        return None
    try:
        import uvloop
    except ImportError as exc:
        if loop == "uvloop":
            raise LoopUnavailableError(f"{UVLOOP_MISSING}: {exc}") from exc
        return None
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T], *, loop: str = "auto", debug: bool | None = None) -> T:
    """Run ``main`` to completion on a new event loop, as ``asyncio.run``
    does, on the loop ``loop`` names (see the module's documentation), and
    return its result. Raises what :func:`loop_factory` raises (with
    ``main`` closed, never left unawaited)."""
    try:
        factory = loop_factory(loop)
    except BaseException:
        main.close()
        raise
    with asyncio.Runner(debug=debug, loop_factory=factory) as runner:
        return runner.run(main)


def running_loop_name() -> str:
    """``uvloop`` or ``asyncio``: the kind of the running event loop (what
    ``dtx listen --json`` reports as ``loop``)."""
    kind = type(asyncio.get_running_loop())
    return "uvloop" if kind.__module__.split(".")[0] == "uvloop" else "asyncio"
