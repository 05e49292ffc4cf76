"""The remote control: a controller that sends commands to the TV.

An ordinary slixmpp client. It sends each command (from the command line,
or else one per line typed on stdin) as a chat message to the TV's full
JID, waits for the answer and prints the path the command went over
(``server`` until the dtx session's first stanza, then ``lan``,
``direct`` or ``relay``) and the round trip in milliseconds::

    python remote.py alice@example.org/remote --password-file alice.pw \\
        --key-file remote.key --tv alice@example.org/tv pause play "volume 7"

The dtx session opens by itself once the two devices see each other's
presence; ``--wait-dtx SECONDS`` makes a scripted run wait for it (up to
SECONDS) before each command after the first, to show the switch.
``--json`` prints one JSON object per command instead. Exit 0 when every
command was answered, 1 when one was not within ``--timeout``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
from typing import Any

import common

from dtx.cliargs import parse_delay, parse_jid
from dtx.jid import JID


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="remote.py", description="Send commands to the TV and time its answers.")
    common.add_options(p, "remote")
    p.add_argument("commands", nargs="*", metavar="COMMAND",
                   help="e.g. pause, play, 'volume 7' (none: read them from stdin, "
                   "one a line)")
    p.add_argument("--tv", type=parse_jid, metavar="JID",
                   help="the TV's full JID (default: the account's /tv)")
    p.add_argument("--wait-dtx", type=parse_delay, default=0.0, metavar="SECONDS",
                   help="before each command after the first, wait up to SECONDS for "
                   "the dtx session with the TV (default 0: do not wait)")
    p.add_argument("--json", action="store_true",
                   help="one JSON object a command on stdout: command, answer, path, rtt_ms")
    return p


def read_lines(loop: asyncio.AbstractEventLoop) -> asyncio.Queue[str | None]:
    """Lines typed on stdin, None at its end (read by a thread that does
    not hold the program up when it ends)."""
    lines: asyncio.Queue[str | None] = asyncio.Queue()

    def pump() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(lines.put_nowait, line.strip())
        loop.call_soon_threadsafe(lines.put_nowait, None)

    threading.Thread(target=pump, name="stdin", daemon=True).start()
    return lines


async def run(args: argparse.Namespace, password: str) -> int:
    loop = asyncio.get_running_loop()
    xmpp = common.make_client(args, password)
    xmpp.register_plugin("xep_0203")  # delayed delivery: tells old answers apart
    tv = args.tv or f"{JID.parse(args.jid).bare}/tv"
    answers: asyncio.Queue[str] = asyncio.Queue()
    over_dtx = asyncio.Event()
    """Set while our stanzas to the TV go over the dtx session."""

    def on_message(msg: Any) -> None:
        if str(msg["from"]) != tv or msg["delay"]["stamp"] is not None:
            return  # not the TV, or an answer the server kept for an earlier run
        if msg["type"] == "error":
            answers.put_nowait(f"error: {msg['error']['condition']}")
        elif msg["body"]:
            answers.put_nowait(msg["body"])

    def on_session(jid: str, up: bool) -> None:
        if jid == tv:
            (over_dtx.set if up else over_dtx.clear)()

    xmpp.add_event_handler("message", on_message)
    xmpp.add_event_handler("dtx_session_start", lambda jid: on_session(jid, True))
    xmpp.add_event_handler("dtx_session_end", lambda jid: on_session(jid, False))
    await common.log_in(xmpp, args)
    if args.commands:
        script: asyncio.Queue[str | None] = asyncio.Queue()
        for command in args.commands:
            script.put_nowait(command)
        script.put_nowait(None)
    else:
        script = read_lines(loop)
        if sys.stdin.isatty():
            print(f"commands for {tv} (pause, play, volume N), one a line; Ctrl-D ends",
                  flush=True)
    sent = 0
    try:
        while (command := await script.get()) is not None:
            if not command:
                continue
            if sent and args.wait_dtx and "dtx" in xmpp.plugin:
                try:
                    await asyncio.wait_for(over_dtx.wait(), args.wait_dtx)
                except TimeoutError:
                    pass
            path = common.path_of(xmpp, tv) if over_dtx.is_set() else "server"
            start = loop.time()
            xmpp.send_message(mto=tv, mbody=command, mtype="chat")
            sent += 1
            try:
                answer = await asyncio.wait_for(answers.get(), args.timeout)
            except TimeoutError:
                print(f"remote.py: no answer from {tv} to {command!r} within "
                      f"{args.timeout} s (is it online?)", file=sys.stderr, flush=True)
                return 1
            rtt_ms = (loop.time() - start) * 1000
            if args.json:
                print(json.dumps({"command": command, "answer": answer, "path": path,
                                  "rtt_ms": round(rtt_ms, 3)}), flush=True)
            else:
                print(f"{command!r} -> {answer!r} over {path}: {rtt_ms:.1f} ms", flush=True)
    finally:
        await common.log_out(xmpp)
    return 0


if __name__ == "__main__":
    sys.exit(common.main("remote", parser(), run))
