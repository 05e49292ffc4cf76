"""Which event loop a command runs on (dtx.aio.loop) and ``--loop``
(dtx.cliargs): uvloop where installed, asyncio's own loop otherwise.

The cases without uvloop hide it (``sys.modules["uvloop"] = None`` makes
both the lookup and the import fail, as where it is not installed), so they
run everywhere; the uvloop cases are skipped, saying so, without it.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import warnings

import pytest

from dtx import cliargs
from dtx.aio import loop as event_loop
from dtx.errors import LoopUnavailableError

HAVE_UVLOOP = event_loop.uvloop_missing() is None
needs_uvloop = pytest.mark.skipif(not HAVE_UVLOOP, reason=event_loop.UVLOOP_MISSING)


async def kind() -> str:
    return event_loop.running_loop_name()


@pytest.fixture
def no_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)


def test_asyncio_is_asyncios_own_loop_whatever_is_installed() -> None:
    assert event_loop.run(kind(), loop="asyncio") == "asyncio"


@needs_uvloop
def test_uvloop_and_auto_run_on_uvloop_where_it_is_installed() -> None:
    assert event_loop.run(kind(), loop="uvloop") == "uvloop"
    assert event_loop.run(kind(), loop="auto") == "uvloop"
    assert event_loop.run(kind()) == "uvloop"


@pytest.mark.usefixtures("no_uvloop")
def test_without_uvloop_auto_is_asyncio_and_uvloop_is_refused() -> None:
    assert event_loop.uvloop_missing() == event_loop.UVLOOP_MISSING
    assert event_loop.run(kind(), loop="auto") == "asyncio"
    main = kind()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "never awaited" would be a RuntimeWarning
        with pytest.raises(LoopUnavailableError, match=r"pip install 'dtx\[uvloop\]'"):
            event_loop.run(main, loop="uvloop")
    assert main.cr_frame is None  # closed, not left pending


def test_an_unknown_loop_is_a_value_error() -> None:
    main = kind()
    with pytest.raises(ValueError, match="'trio'"):
        event_loop.run(main, loop="trio")
    assert main.cr_frame is None


def test_run_returns_the_result_and_raises_the_error_of_the_coroutine() -> None:
    async def fail() -> None:
        await asyncio.sleep(0)
        raise KeyError("x")

    with pytest.raises(KeyError):
        event_loop.run(fail(), loop="asyncio")


@pytest.mark.parametrize("env, expected", [
    (None, "auto"), ("", "auto"), ("asyncio", "asyncio"), ("uvloop", "uvloop"),
    ("bogus", "bogus"),  # checked by --loop, not here
])
def test_the_default_is_dtx_loop_else_auto(monkeypatch: pytest.MonkeyPatch, env: str | None,
                                           expected: str) -> None:
    if env is None:
        monkeypatch.delenv(event_loop.LOOP_ENV, raising=False)
    else:
        monkeypatch.setenv(event_loop.LOOP_ENV, env)
    assert event_loop.default_loop() == expected


# -- --loop (dtx.cliargs) ----------------------------------------------------------------


def loop_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dtx")
    cliargs.add_loop_option(parser)
    return parser


@pytest.mark.parametrize("text", ["auto", "asyncio"])
def test_parse_loop_takes_auto_and_asyncio_always(text: str) -> None:
    assert cliargs.parse_loop(text) == text


@pytest.mark.parametrize("text", ["bogus", "", "AUTO", "uvloop ", "default"])
def test_parse_loop_refuses_other_names(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    monkeypatch.delenv(event_loop.LOOP_ENV, raising=False)
    with pytest.raises(argparse.ArgumentTypeError) as refused:
        cliargs.parse_loop(text)
    assert str(refused.value) == f"{text!r}: expected auto, uvloop or asyncio"


@needs_uvloop
def test_parse_loop_takes_uvloop_where_installed() -> None:
    assert cliargs.parse_loop("uvloop") == "uvloop"


@pytest.mark.usefixtures("no_uvloop")
def test_parse_loop_refuses_uvloop_without_it() -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="uvloop is not installed"):
        cliargs.parse_loop("uvloop")


def test_the_option_defaults_to_dtx_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(event_loop.LOOP_ENV, raising=False)
    assert loop_parser().parse_args([]).loop == "auto"
    monkeypatch.setenv(event_loop.LOOP_ENV, "asyncio")
    assert loop_parser().parse_args([]).loop == "asyncio"
    assert loop_parser().parse_args(["--loop", "auto"]).loop == "auto"


def test_a_bad_dtx_loop_is_named_as_the_source(monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(event_loop.LOOP_ENV, "fast")
    with pytest.raises(SystemExit) as exited:
        loop_parser().parse_args([])
    assert exited.value.code == 2
    assert "argument --loop: 'fast' (from DTX_LOOP): expected auto, uvloop or asyncio" in (
        capsys.readouterr().err)


def test_run_loop_runs_on_the_option_and_on_the_default_without_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    assert cliargs.run_loop(argparse.Namespace(loop="asyncio"), kind()) == "asyncio"
    monkeypatch.setenv(event_loop.LOOP_ENV, "asyncio")
    assert cliargs.run_loop(argparse.Namespace(), kind()) == "asyncio"


def test_a_loop_that_cannot_be_used_is_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    def command() -> int:
        raise LoopUnavailableError(event_loop.UVLOOP_MISSING)

    assert cliargs.run_command("dtx", command) == cliargs.EXIT_USAGE
    assert capsys.readouterr().err == f"dtx: {event_loop.UVLOOP_MISSING}\n"
