"""The `dtx` command's argument types and parser, without running anything."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import pytest

from dtx import cli

Parse = Callable[[str], Any]

GOOD: list[tuple[Parse, str, Any]] = [
    (cli.parse_hostport, "127.0.0.1:5300", ("127.0.0.1", 5300)),
    (cli.parse_hostport, "rdv.example.org:3478", ("rdv.example.org", 3478)),
    (cli.parse_hostport, "[::1]:5300", ("::1", 5300)),
    (cli.parse_hostport, "[2001:db8::7]:65535", ("2001:db8::7", 65535)),
    (cli.parse_hostport, "localhost:1", ("localhost", 1)),
    (cli.parse_bind_host, "0.0.0.0", "0.0.0.0"),
    (cli.parse_bind_host, "::", "::"),
    (cli.parse_bind_host, "[::1]", "::1"),
    (cli.parse_bind_host, "localhost", "localhost"),
    (cli.parse_port, "0", 0),
    (cli.parse_port, "5300", 5300),
    (cli.parse_port, "65535", 65535),
    (cli.parse_count, "1", 1),
    (cli.parse_count, "100", 100),
    (cli.parse_sessions, "0", 0),
    (cli.parse_sessions, "3", 3),
    (cli.parse_timeout, "0.5", 0.5),
    (cli.parse_timeout, "10", 10.0),
    (cli.parse_timeout, "1e-3", 0.001),
    (cli.parse_delay, "0", 0.0),
    (cli.parse_delay, "2.5", 2.5),
    (cli.parse_jid, "tv@example.org", "tv@example.org"),
    (cli.parse_jid, "tv@example.org/living-room", "tv@example.org/living-room"),
    (cli.parse_body, "pause", "pause"),
    (cli.parse_body, "tab\tand\nnewline < & >", "tab\tand\nnewline < & >"),
]

BAD: list[tuple[Parse, str, str]] = [
    (cli.parse_hostport, "127.0.0.1", "has no port"),
    (cli.parse_hostport, "127.0.0.1:", "the port must be"),
    (cli.parse_hostport, "127.0.0.1:0", "the port must be"),
    (cli.parse_hostport, "127.0.0.1:65536", "the port must be"),
    (cli.parse_hostport, "127.0.0.1:-1", "the port must be"),
    (cli.parse_hostport, "127.0.0.1:53 00", "the port must be"),
    (cli.parse_hostport, "127.0.0.1:\u0665", "the port must be"),  # an Arabic-Indic five
    (cli.parse_hostport, "127.0.0.1:" + "9" * 5000, "the port must be"),
    (cli.parse_hostport, ":5300", "has no host"),
    (cli.parse_hostport, "[]:5300", "is not an IPv6 address"),
    (cli.parse_hostport, "[example.org]:5300", "is not an IPv6 address"),
    (cli.parse_hostport, "::1:5300", "in brackets"),
    (cli.parse_hostport, "my host:5300", "spaces or control characters"),
    (cli.parse_bind_host, "", "is not an address or host name"),
    (cli.parse_bind_host, "[]", "is not an address or host name"),
    (cli.parse_bind_host, "a\tb", "spaces or control characters"),
    (cli.parse_port, "70000", "is not a port"),
    (cli.parse_port, "65536", "is not a port"),
    (cli.parse_port, "-1", "is not a port"),
    (cli.parse_port, "5300.0", "is not a port"),
    (cli.parse_port, "", "is not a port"),
    (cli.parse_port, "0x10", "is not a port"),
    (cli.parse_count, "0", "at least 1"),
    (cli.parse_count, "-3", "at least 1"),
    (cli.parse_count, "1.5", "at least 1"),
    (cli.parse_count, "ten", "at least 1"),
    (cli.parse_sessions, "-1", "0 or more"),
    (cli.parse_sessions, "1e3", "0 or more"),
    (cli.parse_timeout, "0", "> 0"),
    (cli.parse_timeout, "-0", "> 0"),
    (cli.parse_timeout, "-1", "> 0"),
    (cli.parse_timeout, "nan", "> 0"),
    (cli.parse_timeout, "inf", "> 0"),
    (cli.parse_timeout, "-inf", "> 0"),
    (cli.parse_timeout, "1e999", "> 0"),  # overflows to inf
    (cli.parse_timeout, "soon", "> 0"),
    (cli.parse_delay, "-0.1", ">= 0"),
    (cli.parse_delay, "nan", ">= 0"),
    (cli.parse_delay, "inf", ">= 0"),
    (cli.parse_jid, "not a jid", "is not a JID"),
    (cli.parse_jid, "", "is not a JID"),
    (cli.parse_jid, "@example.org", "is not a JID"),
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
    assert cli.parse_directory(str(tmp_path)) == str(tmp_path)
    with pytest.raises(argparse.ArgumentTypeError, match="not a folder"):
        cli.parse_directory(str(tmp_path / "notes.txt"))
    with pytest.raises(argparse.ArgumentTypeError, match="no such folder"):
        cli.parse_directory(str(tmp_path / "missing"))


@pytest.mark.parametrize("host, port, text", [
    ("127.0.0.1", 5300, "127.0.0.1:5300"),
    ("::1", 5300, "[::1]:5300"),
    ("2001:db8::7", 1, "[2001:db8::7]:1"),
])
def test_an_address_is_written_with_brackets_around_ipv6(host: str, port: int,
                                                        text: str) -> None:
    assert cli.format_address(host, port) == text
    assert cli.parse_hostport(text) == (host, port)


@pytest.mark.parametrize("host, family, flag, message", [
    ("::1", "inet", "--addr", "an IPv6 address, but the local socket is IPv4"),
    ("127.0.0.1", "inet6", "--rendezvous", "an IPv4 address, but the local socket is IPv6"),
])
def test_an_address_of_the_other_family_is_a_usage_error(host: str, family: str, flag: str,
                                                         message: str) -> None:
    import socket

    fam = socket.AF_INET if family == "inet" else socket.AF_INET6
    with pytest.raises(cli.UsageError, match=message) as info:
        cli.resolve_host(host, flag, fam)
    assert str(info.value).startswith(f"{flag} {host}")


def test_an_ip_address_resolves_to_itself_without_a_lookup() -> None:
    assert cli.resolve_host("127.0.0.1", "--addr") == "127.0.0.1"
    assert cli.resolve_host("::1", "--host") == "::1"
    assert cli.resolve_host("2001:DB8:0::1", "--host") == "2001:db8::1"  # normalised


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
