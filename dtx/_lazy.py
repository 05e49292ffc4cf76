"""Modules that load on first use (cold start of one-shot commands).

A one-shot ``dtx send`` spends most of its start-up importing; the QUIC
engine (aioquic, with its TLS and the X.509 parts of cryptography) is the
largest part and is needed only for the handshake, two round trips to the
rendezvous after the device's first packet. Its modules stand deferred in
``sys.modules`` (:func:`import_lazily`): an ``import`` of them costs
nothing until an attribute is read. :func:`load_in_background` then loads
them in a thread while the device registers, so that the handshake finds
them loaded; whoever needs one first waits for the import in progress
(Python's import lock), never for a second one.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
import threading
import types
from typing import Any

logger = logging.getLogger(__name__)

_swap = threading.Lock()


class _Deferred(types.ModuleType):
    """Stands in ``sys.modules`` for a module until one of its attributes is
    read; then the real module is imported, replaces it there, and lends it
    its namespace (whoever kept a reference to the stand-in reads through)."""

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._dtx_load(), attr)

    def _dtx_load(self) -> types.ModuleType:
        name = self.__name__
        with _swap:
            if sys.modules.get(name) is self:
                del sys.modules[name]
        # Two threads may get here at once: the import system lets one
        # import and the other wait for it.
        real = importlib.import_module(name)
        self.__dict__.update(real.__dict__)
        return real


def import_lazily(name: str) -> None:
    """Make ``import name`` cheap until the module is used (a no-op when it
    is loaded already or not installed). Python's ``importlib.util.LazyLoader``
    does not do here: an import statement reads the module's ``__spec__``,
    which loads it."""
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None:
        return
    stub = _Deferred(name)
    stub.__spec__ = spec
    sys.modules[name] = stub


def deferred() -> list[str]:
    """The modules still deferred."""
    return [name for name, module in list(sys.modules.items()) if isinstance(module, _Deferred)]


def load_in_background() -> threading.Thread | None:
    """Load the QUIC engine's deferred modules (:data:`ENGINE`) in a daemon
    thread (None: nothing left to load). An import that fails there is left
    to whoever uses the module, who gets the error."""
    names = [name for name in deferred() if name in ENGINE]
    if not names:
        return None

    def load() -> None:
        for name in names:
            module = sys.modules.get(name)
            if isinstance(module, _Deferred):
                try:
                    module._dtx_load()
                except Exception:  # noqa: BLE001 - raised again where it is used
                    logger.debug("loading %s in the background failed", name, exc_info=True)

    thread = threading.Thread(target=load, name="dtx-import", daemon=True)
    thread.start()
    return thread


# aioquic's TLS imports service_identity (and with it attr and pyasn1, a
# fifth of a one-shot ``dtx send``'s imports) for the CA hostname check,
# which dtx turns off (verify_mode=CERT_NONE): it loads only if used.
import_lazily("service_identity")
ENGINE = ("dtx.proto.congestion", "dtx.proto.auth", "dtx.proto.session", "aioquic.quic.packet")
"""The QUIC engine and dtx's layers on it: needed at the first handshake."""
for _name in ENGINE:
    import_lazily(_name)
