"""The argument types every command line shares (dtx.cliargs), and the
parsers of `dtx`, `dtx nat-check`, `dtx vcard publish|fetch` and
`dtx-rendezvous`, without running anything."""

from __future__ import annotations

import argparse
import errno
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dtx import cli
from dtx import cliargs
from dtx import natcheck
from dtx.errors import (
    AuthenticationError,
    ConnectError,
    DtxError,
    JIDError,
    KeyFileError,
    TrustError,
    VCardError,
    XmppError,
)
from dtx.xmpp import cli as xmpp_cli
from rendezvous import __main__ as rendezvous_main

ROOT = Path(__file__).resolve().parents[2]

Parse = Callable[[str], Any]

GOOD: list[tuple[Parse, str, Any]] = [
    (cliargs.parse_hostport, "127.0.0.1:5300", ("127.0.0.1", 5300)),
    (cliargs.parse_hostport, "rdv.example.org:3478", ("rdv.example.org", 3478)),
    (cliargs.parse_hostport, "[::1]:5300", ("::1", 5300)),
    (cliargs.parse_hostport, "[2001:db8::7]:65535", ("2001:db8::7", 65535)),
    (cliargs.parse_hostport, "localhost:1", ("localhost", 1)),
    (cliargs.parse_bind_host, "0.0.0.0", "0.0.0.0"),
    (cliargs.parse_bind_host, "::", "::"),
    (cliargs.parse_bind_host, "[::1]", "::1"),
    (cliargs.parse_bind_host, "localhost", "localhost"),
    (cliargs.parse_port, "0", 0),
    (cliargs.parse_port, "5300", 5300),
    (cliargs.parse_port, "65535", 65535),
    (cliargs.parse_count, "1", 1),
    (cliargs.parse_count, "100", 100),
    (cliargs.parse_sessions, "0", 0),
    (cliargs.parse_sessions, "3", 3),
    (cliargs.parse_timeout, "0.5", 0.5),
    (cliargs.parse_timeout, "10", 10.0),
    (cliargs.parse_timeout, "1e-3", 0.001),
    (cliargs.parse_delay, "0", 0.0),
    (cliargs.parse_delay, "2.5", 2.5),
    (cliargs.parse_jid, "tv@example.org", "tv@example.org"),
    (cliargs.parse_jid, "tv@example.org/living-room", "tv@example.org/living-room"),
    (cliargs.parse_listen_hostport, "0.0.0.0:0", ("0.0.0.0", 0)),
    (cliargs.parse_listen_hostport, "[::]:3478", ("::", 3478)),
    (cliargs.parse_listen_hostport, "localhost:65535", ("localhost", 65535)),
    (cliargs.parse_ip, "198.51.100.2", "198.51.100.2"),
    (cliargs.parse_ip, "2001:DB8::2", "2001:db8::2"),
    (cli.parse_body, "pause", "pause"),
    (cli.parse_body, "tab\tand\nnewline < & >", "tab\tand\nnewline < & >"),
]

BAD: list[tuple[Parse, str, str]] = [
    (cliargs.parse_hostport, "127.0.0.1", "has no port"),
    (cliargs.parse_hostport, "127.0.0.1:", "the port must be"),
    (cliargs.parse_hostport, "127.0.0.1:0", "the port must be"),
    (cliargs.parse_hostport, "127.0.0.1:65536", "the port must be"),
    (cliargs.parse_hostport, "127.0.0.1:-1", "the port must be"),
    (cliargs.parse_hostport, "127.0.0.1:53 00", "the port must be"),
    (cliargs.parse_hostport, "127.0.0.1:\u0665", "the port must be"),  # an Arabic-Indic five
    (cliargs.parse_hostport, "127.0.0.1:" + "9" * 5000, "the port must be"),
    (cliargs.parse_hostport, ":5300", "has no host"),
    (cliargs.parse_hostport, "[]:5300", "is not an IPv6 address"),
    (cliargs.parse_hostport, "[example.org]:5300", "is not an IPv6 address"),
    (cliargs.parse_hostport, "::1:5300", "in brackets"),
    (cliargs.parse_hostport, "my host:5300", "spaces or control characters"),
    (cliargs.parse_bind_host, "", "is not an address or host name"),
    (cliargs.parse_bind_host, "[]", "is not an address or host name"),
    (cliargs.parse_bind_host, "a\tb", "spaces or control characters"),
    (cliargs.parse_port, "70000", "is not a port"),
    (cliargs.parse_port, "65536", "is not a port"),
    (cliargs.parse_port, "-1", "is not a port"),
    (cliargs.parse_port, "5300.0", "is not a port"),
    (cliargs.parse_port, "", "is not a port"),
    (cliargs.parse_port, "0x10", "is not a port"),
    (cliargs.parse_count, "0", "at least 1"),
    (cliargs.parse_count, "-3", "at least 1"),
    (cliargs.parse_count, "1.5", "at least 1"),
    (cliargs.parse_count, "ten", "at least 1"),
    (cliargs.parse_sessions, "-1", "0 or more"),
    (cliargs.parse_sessions, "1e3", "0 or more"),
    (cliargs.parse_timeout, "0", "> 0"),
    (cliargs.parse_timeout, "-0", "> 0"),
    (cliargs.parse_timeout, "-1", "> 0"),
    (cliargs.parse_timeout, "nan", "> 0"),
    (cliargs.parse_timeout, "inf", "> 0"),
    (cliargs.parse_timeout, "-inf", "> 0"),
    (cliargs.parse_timeout, "1e999", "> 0"),  # overflows to inf
    (cliargs.parse_timeout, "soon", "> 0"),
    (cliargs.parse_delay, "-0.1", ">= 0"),
    (cliargs.parse_delay, "nan", ">= 0"),
    (cliargs.parse_delay, "inf", ">= 0"),
    (cliargs.parse_jid, "not a jid", "is not a JID"),
    (cliargs.parse_jid, "", "is not a JID"),
    (cliargs.parse_jid, "@example.org", "is not a JID"),
    (cliargs.parse_listen_hostport, "127.0.0.1:70000", "from 0 to 65535"),
    (cliargs.parse_listen_hostport, "127.0.0.1:-1", "from 0 to 65535"),
    (cliargs.parse_listen_hostport, "127.0.0.1", "has no port"),
    (cliargs.parse_listen_hostport, "::1:3478", "in brackets"),
    (cliargs.parse_ip, "example.org", "is not an IP address"),
    (cliargs.parse_ip, "", "is not an IP address"),
    (cliargs.parse_ip, "[::1]", "is not an IP address"),
    (cli.parse_body, "a\x01b", "cannot be sent"),
    (cli.parse_body, "\ufffe", "cannot be sent"),
    (cli.parse_body, "\udcff", "cannot be sent"),  # undecodable argv byte
]


@pytest.mark.parametrize("parse, text, value", GOOD)
def test_an_argument_type_accepts(parse: Parse, text: str, value: Any) -> None:
    assert parse(text) == value


@pytest.mark.parametrize("parse, text, message", BAD)
def test_an_argument_type_refuses_with_a_message(parse: Parse, text: str, message: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=message.replace("(", r"\(")) as info:
        parse(text)
    assert "\n" not in str(info.value)


def test_a_missing_folder_and_a_file_are_not_folders(tmp_path: Any) -> None:
    (tmp_path / "notes.txt").write_text("x")
    assert cliargs.parse_directory(str(tmp_path)) == str(tmp_path)
    with pytest.raises(argparse.ArgumentTypeError, match="not a folder"):
        cliargs.parse_directory(str(tmp_path / "notes.txt"))
    with pytest.raises(argparse.ArgumentTypeError, match="no such folder"):
        cliargs.parse_directory(str(tmp_path / "missing"))


@pytest.mark.parametrize("host, port, text", [
    ("127.0.0.1", 5300, "127.0.0.1:5300"),
    ("::1", 5300, "[::1]:5300"),
    ("2001:db8::7", 1, "[2001:db8::7]:1"),
])
def test_an_address_is_written_with_brackets_around_ipv6(host: str, port: int,
                                                        text: str) -> None:
    assert cliargs.format_address(host, port) == text
    assert cliargs.parse_hostport(text) == (host, port)


@pytest.mark.parametrize("host, family, flag, message", [
    ("::1", "inet", "--addr", "an IPv6 address, but the local socket is IPv4"),
    ("127.0.0.1", "inet6", "--rendezvous", "an IPv4 address, but the local socket is IPv6"),
])
def test_an_address_of_the_other_family_is_a_usage_error(host: str, family: str, flag: str,
                                                         message: str) -> None:
    import socket

    fam = socket.AF_INET if family == "inet" else socket.AF_INET6
    with pytest.raises(cliargs.UsageError, match=message) as info:
        cliargs.resolve_host(host, flag, fam)
    assert str(info.value).startswith(f"{flag} {host}")


def test_an_ip_address_resolves_to_itself_without_a_lookup() -> None:
    assert cliargs.resolve_host("127.0.0.1", "--addr") == "127.0.0.1"
    assert cliargs.resolve_host("::1", "--host") == "::1"
    assert cliargs.resolve_host("2001:DB8:0::1", "--host") == "2001:db8::1"  # normalised


def parse(*argv: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(list(argv))


def test_listen_needs_no_port() -> None:
    args = parse("listen", "tv.key")
    assert args.port == 0 and args.host is None and args.sessions == 0
    assert parse("listen", "tv.key", "--rendezvous", "rdv.example.org:3478").port == 0
    assert parse("listen", "tv.key", "--lan", "--port", "5300").port == 5300


def test_send_and_ping_defaults_are_unchanged() -> None:
    args = parse("send", "r.key", "--to", "tv@example.org", "--body", "x")
    assert (args.timeout, args.type, args.linger, args.bind) == (10.0, "chat", 0.0, "0.0.0.0")
    args = parse("ping", "r.key", "--to", "tv@example.org")
    assert (args.count, args.interval, args.timeout) == (10, 0.0, 10.0)


@pytest.mark.parametrize("argv", [
    ["listen", "tv.key", "--port", "70000"],
    ["listen", "tv.key", "--sessions", "-1"],
    ["ping", "r.key", "--to", "tv@example.org", "--count", "0"],
    ["send", "r.key", "--to", "tv@example.org", "--body", "x", "--timeout", "nan"],
    ["send", "r.key", "--to", "tv@example.org", "--body", "x", "--type", "error"],
    ["send", "r.key", "--to", "tv@example.org", "--body", "x", "--addr", "localhost"],
    ["pin", "forget", "not a jid"],
])
def test_the_parser_exits_2_on_a_bad_argument(argv: list[str],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse(*argv)
    assert info.value.code == 2
    assert "error: argument" in capsys.readouterr().err


def test_an_error_stanza_answers_the_sender_with_the_original_id() -> None:
    from dtx import stanza as st

    request = st.message("x" * 10, to="tv@example.org", id_="m1")
    request.set("from", "remote@example.org/phone")
    error = cli.stanza_error(request, "policy-violation", "too large")
    assert error.tag == st.MESSAGE
    assert error.attrib == {"type": "error", "id": "m1", "to": "remote@example.org/phone"}
    assert st.body_of(error) is None
    (err,) = list(error)
    assert err.tag == f"{{{st.NS_CLIENT}}}error" and err.get("type") == "modify"
    assert [child.tag for child in err] == [f"{{{st.NS_STANZAS}}}policy-violation",
                                            f"{{{st.NS_STANZAS}}}text"]
    assert err[1].text == "too large"


# -- files and folders ------------------------------------------------------------------


def test_a_file_must_exist_and_be_a_regular_file(tmp_path: Path) -> None:
    (tmp_path / "secret.txt").write_text("x")
    assert cliargs.parse_file(str(tmp_path / "secret.txt")) == str(tmp_path / "secret.txt")
    with pytest.raises(argparse.ArgumentTypeError, match="no such file"):
        cliargs.parse_file(str(tmp_path / "missing.txt"))
    with pytest.raises(argparse.ArgumentTypeError, match="not a regular file"):
        cliargs.parse_file(str(tmp_path))


def test_an_output_folder_may_be_made_but_not_be_a_file(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("x")
    assert cliargs.parse_output_directory(str(tmp_path)) == str(tmp_path)
    assert cliargs.parse_output_directory(str(tmp_path / "new")) == str(tmp_path / "new")
    assert not (tmp_path / "new").exists()  # checking makes nothing
    with pytest.raises(argparse.ArgumentTypeError, match="not a folder"):
        cliargs.parse_output_directory(str(tmp_path / "notes.txt"))
    with pytest.raises(argparse.ArgumentTypeError, match="not a folder name"):
        cliargs.parse_output_directory("")


# -- binding and exit codes -------------------------------------------------------------


@pytest.mark.parametrize("code, host, port, listen, message", [
    (errno.EADDRINUSE, "127.0.0.1", 5300, True,
     "cannot listen on 127.0.0.1:5300: Address already in use (another program uses it"),
    (errno.EADDRNOTAVAIL, "192.0.2.1", 0, True,
     "cannot listen on 192.0.2.1:0: Cannot assign requested address (not an address"),
    (errno.EADDRNOTAVAIL, "192.0.2.1", 0, False, "cannot bind 192.0.2.1: Cannot assign"),
    (errno.EADDRINUSE, "::1", 5300, False, "cannot bind [::1]:5300: Address already in use"),
    (errno.EACCES, "127.0.0.1", 80, False, "cannot bind 127.0.0.1:80: Permission denied"),
])
def test_a_bind_failure_the_command_line_can_fix_names_the_address(
        code: int, host: str, port: int, listen: bool, message: str) -> None:
    import os

    usage = cliargs.bind_failure(OSError(code, os.strerror(code)), host, port, listen=listen)
    assert isinstance(usage, cliargs.UsageError)
    assert str(usage).startswith(message)


def test_another_socket_error_is_not_a_usage_error() -> None:
    failure = OSError(errno.ENOBUFS, "No buffer space available")
    assert cliargs.bind_failure(failure, "127.0.0.1", 0, listen=True) is None


@pytest.mark.parametrize("error, code, start", [
    (cliargs.UsageError("--x: bad"), 2, "prog: --x: bad"),
    (KeyFileError("k.key: no such key file"), 2, "prog: k.key"),
    (VCardError("not well-formed"), 2, "prog: not well-formed"),
    (JIDError("bad"), 2, "prog: bad"),
    (xmpp_cli.PasswordFileError("password file p is empty"), 2, "prog: password file p"),
    (TrustError("not in the vCard"), 3, "prog: refused: not in the vCard"),
    (AuthenticationError("login refused"), 3, "prog: refused: login refused"),
    (ConnectError("no answer"), 4, "prog: could not connect: no answer"),
    (TimeoutError(), 4, "prog: could not connect: timed out"),
    (XmppError("vCard refused"), 1, "prog: vCard refused"),
    (DtxError("other"), 1, "prog: other"),
    (OSError(errno.EIO, "I/O error"), 1, "prog: [Errno 5] I/O error"),
    (ValueError("bug"), 1, "prog: internal error: ValueError: bug"),
    (KeyboardInterrupt(), 130, None),
])
def test_every_failure_is_one_line_and_its_exit_code(
        error: BaseException, code: int, start: str | None,
        capsys: pytest.CaptureFixture[str]) -> None:
    def fail() -> int:
        raise error

    assert cliargs.run_command("prog", fail) == code
    err = capsys.readouterr().err
    if start is None:
        assert err == ""
    else:
        assert err.startswith(start) and err.count("\n") == 1, err


def test_a_command_that_succeeds_gives_its_own_code(capsys: pytest.CaptureFixture[str]) -> None:
    assert cliargs.run_command("prog", lambda: 0) == 0
    assert cliargs.run_command("prog", lambda: 4) == 4
    assert capsys.readouterr().err == ""


def test_a_password_file_error_is_a_usage_error_and_an_xmpp_error() -> None:
    assert issubclass(xmpp_cli.PasswordFileError, cliargs.UsageError)
    assert issubclass(xmpp_cli.PasswordFileError, XmppError)


def test_importing_cliargs_loads_no_driver_and_not_the_dtx_command() -> None:
    code = ("import sys, dtx.cliargs\n"
            "loaded = sorted(m for m in sys.modules if m == 'asyncio' or m.startswith('dtx.aio')"
            " or m in ('dtx.cli', 'dtx.natcheck', 'dtx.xmpp.cli', 'rendezvous.__main__'))\n"
            "assert not loaded, loaded\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr


# -- every command line uses them -------------------------------------------------------

STUN = ["--stun", "127.0.0.1:3478"]
PUBLISH = ["tv.key", "--password-file", __file__]
FETCH = ["tv@example.org", "--account-key", "tv.key", "--password-file", __file__,
         "--out", "vcards"]


def dtx_args(argv: list[str]) -> argparse.Namespace:
    """``dtx ARGV`` parsed as dtx.cli.main parses it (``vcard publish`` too)."""
    words = list(argv)
    if words[:2] in (["vcard", "publish"], ["vcard", "fetch"]):
        words[:2] = [f"vcard-{words[1]}"]
    return cli.build_parser().parse_args(words)


BAD_PER_COMMAND: list[tuple[Callable[..., Any], list[str], str]] = [
    (dtx_args, ["nat-check", *STUN, "--port", "70000"], "argument --port: '70000'"),
    (dtx_args, ["nat-check", *STUN, "--port", "-1"], "argument --port: '-1'"),
    (dtx_args, ["nat-check", *STUN, "--timeout", "0"], "argument --timeout: '0'"),
    (dtx_args, ["nat-check", *STUN, "--timeout", "nan"], "argument --timeout: 'nan'"),
    (dtx_args, ["nat-check", *STUN, "--timeout", "inf"], "argument --timeout: 'inf'"),
    (dtx_args, ["nat-check", *STUN, "--bind", ""], "argument --bind: ''"),
    (dtx_args, ["nat-check", "--stun", "127.0.0.1"], "argument --stun: '127.0.0.1' has no port"),
    (dtx_args, ["nat-check", "--stun", "::1:3478"], "argument --stun: '::1:3478': write"),
    (dtx_args, ["nat-check", "--stun", "127.0.0.1:0"], "argument --stun: '127.0.0.1:0'"),
    (natcheck.build_parser().parse_args, [*STUN, "--port", "70000"], "argument --port"),
    (natcheck.build_parser().parse_args, [*STUN, "--timeout", "nan"], "argument --timeout"),
    (dtx_args, ["vcard", "publish", *PUBLISH, "--timeout", "-1"], "argument --timeout: '-1'"),
    (dtx_args, ["vcard", "publish", *PUBLISH, "--timeout", "nan"], "argument --timeout"),
    (dtx_args, ["vcard", "publish", "tv.key", "--password-file", "missing.password"],
     "argument --password-file: missing.password: no such file"),
    (dtx_args, ["vcard", "publish", *PUBLISH, "--server", "127.0.0.1"],
     "argument --server: '127.0.0.1' has no port"),
    (dtx_args, ["vcard", "publish", *PUBLISH, "--server", "127.0.0.1:0"],
     "argument --server: '127.0.0.1:0'"),
    (dtx_args, ["vcard", "publish", *PUBLISH, "--ca-file", "missing.pem"],
     "argument --ca-file: missing.pem: no such file"),
    (dtx_args, ["vcard", "fetch", *FETCH, "--timeout", "-1"], "argument --timeout: '-1'"),
    (dtx_args, ["vcard", "fetch", *FETCH, "--out", __file__], "argument --out"),
    (dtx_args, ["vcard", "fetch", "not a jid", *FETCH[1:]], "argument jid: 'not a jid'"),
    (rendezvous_main.build_parser().parse_args, ["--lifetime", "nan"], "argument --lifetime"),
    (rendezvous_main.build_parser().parse_args, ["--lifetime", "inf"], "argument --lifetime"),
    (rendezvous_main.build_parser().parse_args, ["--keepalive", "-1"], "argument --keepalive"),
    (rendezvous_main.build_parser().parse_args, ["--vcard-ttl", "0"], "argument --vcard-ttl"),
    (rendezvous_main.build_parser().parse_args, ["--listen", "127.0.0.1:70000"],
     "argument --listen: '127.0.0.1:70000'"),
    (rendezvous_main.build_parser().parse_args, ["--alt-address", "rdv.example.org"],
     "argument --alt-address: 'rdv.example.org' is not an IP address"),
    (rendezvous_main.build_parser().parse_args, ["--vcards", "missing-folder"],
     "argument --vcards: missing-folder: no such folder"),
    (rendezvous_main.build_parser().parse_args, ["--xmpp-account", "not a jid"],
     "argument --xmpp-account: 'not a jid' is not a JID"),
    (rendezvous_main.build_parser().parse_args, ["--server", "xmpp.example.org"],
     "argument --server: 'xmpp.example.org' has no port"),
]


@pytest.mark.parametrize("parse, argv, message", BAD_PER_COMMAND,
                         ids=[" ".join(argv) for _, argv, _ in BAD_PER_COMMAND])
def test_each_command_line_refuses_a_bad_value_with_exit_2(
        parse: Callable[..., Any], argv: list[str], message: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]


def test_nat_check_has_the_same_arguments_alone_and_under_dtx() -> None:
    alone = vars(natcheck.build_parser().parse_args(STUN))
    under = vars(dtx_args(["nat-check", *STUN]))
    assert alone.pop("verbose") == 0
    assert under.pop("verbose") == 0 and under.pop("command") == "nat-check"
    assert alone == under
    assert alone["stun"] == ("127.0.0.1", 3478) and alone["port"] == 0
    assert alone["timeout"] == 10.0 and alone["bind"] == "0.0.0.0"


def rendezvous_args(*argv: str) -> argparse.Namespace:
    return rendezvous_main.build_parser().parse_args(list(argv))


@pytest.mark.parametrize("argv, message", [
    (["--keepalive", "90"], "--keepalive 90 must be less than --lifetime 90"),
    (["--lifetime", "20"], "--keepalive 25 must be less than --lifetime 20"),
    (["--keepalive", "0.5"], "--keepalive 0.5: must be from 1 to 4294967295 seconds"),
    (["--lifetime", "1e10"], "--lifetime 1e+10: must be from 1 to 4294967295 seconds"),
    (["--xmpp-account", "rdv@example.org"], "--xmpp-account needs --password-file"),
    (["--xmpp-account", "rdv@example.org", "--password-file", __file__, "--vcards", "."],
     "give --vcards or --xmpp-account, not both"),
    (["--password-file", __file__], "--password-file is for --xmpp-account"),
    (["--server", "xmpp.example.org:5222"], "--server is for --xmpp-account"),
    (["--allow-plaintext"], "--allow-plaintext is for --xmpp-account"),
    (["--vcard-ttl", "5"], "--vcard-ttl is for --xmpp-account"),
    (["--alt-address", "127.0.0.2"], "--alt-address needs --listen with a concrete IP"),
    (["--listen", "127.0.0.1:0", "--alt-address", "::1"],
     "--alt-address ::1: not of the family of --listen 127.0.0.1"),
    (["--listen", "127.0.0.1:0", "--alt-address", "127.0.0.1"],
     "--alt-address 127.0.0.1: the --listen IP itself"),
    (["--mapping-port", "4000", "--no-mapping-port"],
     "give --mapping-port or --no-mapping-port, not both"),
    (["--listen", "127.0.0.1:0", "--alt-address", "127.0.0.2", "--mapping-port", "1"],
     "--mapping-port is for a server without --alt-address"),
    (["--listen", "127.0.0.1:4000", "--mapping-port", "4000"],
     "--mapping-port 4000: the --listen port itself"),
    (["--listen", "127.0.0.1:65535"], "--listen port 65535 leaves no port + 1 for the mapping"),
    (["--listen", "127.0.0.1:65535", "--alt-address", "127.0.0.2", "--no-mapping-port"],
     "--listen port 65535 leaves no port + 1 for --alt-address"),
])
def test_rendezvous_refuses_options_that_do_not_go_together(argv: list[str],
                                                             message: str) -> None:
    with pytest.raises(cliargs.UsageError) as info:
        rendezvous_main.check_arguments(rendezvous_args(*argv))
    assert str(info.value).startswith(message)


def test_rendezvous_resolves_its_listen_name_once() -> None:
    args = rendezvous_args("--listen", "localhost:0", "--lifetime", "60", "--keepalive", "20")
    rendezvous_main.check_arguments(args)
    assert args.listen == ("127.0.0.1", 0)
    defaults = rendezvous_args()
    rendezvous_main.check_arguments(defaults)
    assert defaults.listen == ("0.0.0.0", 3478)
    assert (defaults.lifetime, defaults.keepalive, defaults.vcard_ttl) == (90.0, 25.0, None)


@pytest.mark.parametrize("argv, mapping_port", [
    ([], True),
    (["--no-mapping-port"], False),
    (["--mapping-port", "0"], 0),
    (["--listen", "127.0.0.1:65535", "--mapping-port", "4000"], 4000),
    (["--listen", "127.0.0.1:65535", "--no-mapping-port"], False),
    (["--listen", "127.0.0.1:3478", "--alt-address", "127.0.0.2"], True),
])
def test_rendezvous_mapping_port_for_serve(argv: list[str], mapping_port: bool | int) -> None:
    args = rendezvous_args(*argv)
    rendezvous_main.check_arguments(args)
    got = rendezvous_main._mapping_port(args)
    assert got == mapping_port and type(got) is type(mapping_port)


def test_the_rendezvous_relay_limits_come_from_the_command_line() -> None:
    from rendezvous.__main__ import build_parser, relay_config

    default = relay_config(build_parser().parse_args([]))
    assert (default.relay_frames_per_s, default.relay_burst_frames) == (2000.0, 500.0)
    assert (default.relay_bytes_per_s, default.relay_burst_bytes) == (2 * 1024 * 1024,
                                                                      512 * 1024)
    given = relay_config(build_parser().parse_args(
        ["--relay-frames-per-s", "20000", "--relay-bytes-per-s", "8000000"]))
    assert (given.relay_frames_per_s, given.relay_burst_frames) == (20000.0, 5000.0)
    assert (given.relay_bytes_per_s, given.relay_burst_bytes) == (8e6, 2e6)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--relay-frames-per-s", "0"])
