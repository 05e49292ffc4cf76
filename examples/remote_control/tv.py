"""The TV: a service provider that answers its owner's remote controls.

An ordinary slixmpp client. It answers chat messages from the other
devices of its own account (anyone else is ignored)::

    pause     -> paused
    play      -> playing
    volume N  -> volume N      (N from 0 to 100)

and prints each command with the path it came over: ``server``, or the
dtx session's ``lan``, ``direct`` or ``relay``. That is the plugin's
``path(sender)``, the path of the session with the sender when there is
one: it cannot say how one stanza came, so a command that comes through
the server while a session is there (just before the switch to it) shows
the session's path. It runs until Ctrl-C or SIGTERM (exit 0).

    python tv.py alice@example.org/tv --password-file alice.pw --key-file tv.key
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

import common

from dtx.jid import JID

MAX_VOLUME = 100


class Tv:
    """What the TV plays and how loud."""

    def __init__(self) -> None:
        self.playing = True
        self.volume = 5

    def obey(self, command: str) -> str:
        """The answer to one command: the new state, or what went wrong."""
        words = command.split()
        if words == ["pause"]:
            self.playing = False
            return "paused"
        if words == ["play"]:
            self.playing = True
            return "playing"
        if len(words) == 2 and words[0] == "volume":
            if not (words[1].isascii() and words[1].isdigit()) \
                    or int(words[1]) > MAX_VOLUME:
                return f"volume goes from 0 to {MAX_VOLUME}"
            self.volume = int(words[1])
            return f"volume {self.volume}"
        return "unknown command; say pause, play or volume N"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tv.py", description="A TV that answers pause, play and volume N.")
    common.add_options(p, "tv")
    return p


async def run(args: argparse.Namespace, password: str) -> int:
    xmpp = common.make_client(args, password)
    owner = JID.parse(args.jid).bare.full
    tv = Tv()

    def on_message(msg: Any) -> None:
        if msg["type"] not in ("chat", "normal") or not msg["body"]:
            return
        sender = str(msg["from"])
        if sender == str(xmpp.boundjid):
            return  # our own answer, handed back by the server: never answer it
        if str(msg["from"].bare) != owner:
            print(f"ignored a message from {sender} (not a device of {owner})", flush=True)
            return
        path = common.path_of(xmpp, sender)
        answer = tv.obey(msg["body"])
        print(f"{msg['body']!r} from {sender} over {path}: {answer}", flush=True)
        msg.reply(answer).send()

    xmpp.add_event_handler("message", on_message)
    xmpp.add_event_handler("dtx_path_changed", lambda change: print(
        f"dtx path to {change['jid']}: {change['path']}", flush=True))
    stop = common.stop_on_signals()
    await common.log_in(xmpp, args)
    print(f"tv {xmpp.boundjid} ready ({'no dtx' if args.no_dtx else 'dtx'})", flush=True)
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait([xmpp.disconnected, stopping], return_when=asyncio.FIRST_COMPLETED)
    if not stop.is_set():
        stopping.cancel()
        print("tv.py: the server closed the connection", file=sys.stderr, flush=True)
        return 4
    await common.log_out(xmpp)
    return 0


if __name__ == "__main__":
    sys.exit(common.main("tv", parser(), run))
