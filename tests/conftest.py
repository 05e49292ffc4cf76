"""Suite-wide options.

``--fuzz-examples N`` sets how many hypothesis examples each decoder fuzz
test in ``tests/unit/test_fuzz_decoders.py`` runs (default: enough to
matter, within about a minute for all of them on CI). A longer run:
``pytest tests/unit/test_fuzz_decoders.py --fuzz-examples 200000``.
"""

from __future__ import annotations

import pytest

DEFAULT_FUZZ_EXAMPLES = 2000
_fuzz = {"examples": DEFAULT_FUZZ_EXAMPLES}


def fuzz_examples() -> int:
    """The ``--fuzz-examples`` value (read when a fuzz module is imported)."""
    return _fuzz["examples"]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--fuzz-examples",
        type=int,
        default=DEFAULT_FUZZ_EXAMPLES,
        metavar="N",
        help=f"hypothesis examples per decoder fuzz test (default {DEFAULT_FUZZ_EXAMPLES})",
    )


def pytest_configure(config: pytest.Config) -> None:
    _fuzz["examples"] = max(1, int(config.getoption("--fuzz-examples")))
