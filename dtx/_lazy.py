"""Modules that load on first use (cold start of one-shot commands)."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import Any


class _Deferred(types.ModuleType):
    """Stands in ``sys.modules`` for a module until one of its attributes is
    read; then the real module is imported, replaces it there, and lends it
    its namespace (whoever kept a reference to the stand-in reads through)."""

    def __getattr__(self, attr: str) -> Any:
        name = self.__name__
        if sys.modules.get(name) is self:
            del sys.modules[name]
        real = importlib.import_module(name)
        self.__dict__.update(real.__dict__)
        return getattr(real, attr)


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


# aioquic's TLS imports service_identity (and with it attr and pyasn1, a
# fifth of a one-shot ``dtx send``'s imports) for the CA hostname check,
# which dtx turns off (verify_mode=CERT_NONE): it loads only if used.
import_lazily("service_identity")
