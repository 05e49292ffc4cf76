"""A real XEP-0174 client and dtx devices on one LAN in the lab.

The client is libpurple's Bonjour plugin, the one Pidgin ships, run by
``finch`` with its own avahi-daemon and D-Bus buses in its namespace and
driven over libpurple's D-Bus API (tests/netns/libpurple.py). The TV runs
the real ``dtx listen --lan --presence --echo``; a second dtx device (the
phone, tests/netns/xep0174_worker.py) opens streams with
``LinkLocal.connect``. Three hosts on one bridge; mDNS stays in the lab.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from dtx.identity import generate_identity, save_identity
from dtx.lab import Lab
from dtx.lab.scene import write_vcards
from dtx.lab.topology import Host
from dtx.proto import xmlstream as xs
from dtx.proto.caps import caps_for, ver_of_disco_info

from .libpurple import NAME as PIDGIN, Libpurple, missing_tools
from .test_mdns import child_env

pytestmark = pytest.mark.netns

REPO = Path(__file__).resolve().parents[2]
TV = "tv@example.org/living-room"
PHONE = "remote@example.org/phone"
DEADLINE = 15.0


class Events:
    """Every JSON line a process prints, kept in order (read by a thread);
    :meth:`wait` finds the next matching one after a cursor, with a deadline."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._cursor = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(json.loads(line))
                self._cond.notify_all()

    def wait(self, match: Callable[[dict[str, Any]], bool],
             timeout: float = DEADLINE) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for i in range(self._cursor, len(self.lines)):
                    if match(self.lines[i]):
                        self._cursor = i + 1
                        return self.lines[i]
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"no matching line within {timeout} s: {self.lines}")
                self._cond.wait(remaining)

    def event(self, name: str, **fields: object) -> dict[str, Any]:
        return self.wait(lambda e: e.get("event") == name
                         and all(e.get(k) == v for k, v in fields.items()))

    def command(self, **command: object) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()


@dataclass
class Room:
    tv_host: Host
    pidgin_host: Host
    phone_host: Host
    purple: Libpurple
    tv: Events
    listening: dict[str, Any]
    phone: Events
    phone_ready: dict[str, Any]


@pytest.fixture(scope="module")
def room(netns_ready: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Room]:
    missing = missing_tools()
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (scripts/setup installs them when root)")
    tmp = tmp_path_factory.mktemp("xep0174")
    tv, phone = generate_identity(TV), generate_identity(PHONE)
    write_vcards(tmp / "vcards", tv, phone)
    save_identity(tv, tmp / "tv.key")
    save_identity(phone, tmp / "phone.key")
    with Lab() as lab, open(tmp / "tv.log", "w") as tv_log, \
            open(tmp / "phone.log", "w") as phone_log:
        lan = lab.add_lan("living-room", hosts=3)
        lab.up()
        tv_host, pidgin_host, phone_host = lan.hosts
        started = time.monotonic()
        purple = Libpurple.start(pidgin_host, tmp / "purple")
        print(f"libpurple (finch, avahi, two D-Bus buses) up in {time.monotonic() - started:.2f} s")
        proc = tv_host.popen([sys.executable, "-m", "dtx.cli", "listen", str(tmp / "tv.key"),
                              "--lan", "--presence", "--echo", "--vcards", str(tmp / "vcards"),
                              "--no-pins", "--json"],
                             stdout=subprocess.PIPE, stderr=tv_log,
                             text=True, cwd=REPO, env=child_env())
        events = Events(proc)
        listening = events.event("listening")
        worker = phone_host.popen([sys.executable, "-m", "tests.netns.xep0174_worker",
                                   str(tmp / "phone.key"), str(tmp / "vcards")],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=phone_log, text=True, cwd=REPO,
                                  env=child_env())
        phone_events = Events(worker)
        ready = phone_events.event("ready")
        yield Room(tv_host, pidgin_host, phone_host, purple, events, listening,
                   phone_events, ready)
        phone_events.command(op="quit")


def raw_stream(host: Host, address: tuple[str, int], sender: str, to: str,
               stanzas: bytes) -> socket.socket:
    """A XEP-0174 stream written by hand from ``host``: header, stanzas."""
    sock = host.tcp_socket()
    sock.settimeout(DEADLINE)
    sock.connect(address)
    sock.sendall(f"<stream:stream xmlns='jabber:client' xmlns:stream="
                 f"'http://etherx.jabber.org/streams' from='{sender}' to='{to}'>".encode()
                 + stanzas)
    return sock


def read_stanza(sock: socket.socket) -> xs.StanzaReceived:
    parser = xs.XmlStreamParser()
    for _ in range(100):  # bounded: each read blocks at most DEADLINE
        data = sock.recv(65536)
        if not data:
            break
        for event in parser.feed(data):
            if isinstance(event, xs.StanzaReceived):
                return event
    raise AssertionError("no stanza from the device")


def test_pidgin_lists_the_device_and_they_exchange_messages_both_ways(room: Room) -> None:
    name = room.listening["presence_name"]
    started = time.monotonic()
    room.purple.wait_buddy(name, DEADLINE)
    print(f"the TV is an online buddy in Pidgin {time.monotonic() - started:.2f} s after it "
          "listened")
    started = time.monotonic()
    room.purple.send_im(name, "hello from pidgin")
    got = room.tv.event("link_local_stanza", body="hello from pidgin")
    print(f"Pidgin -> dtx: {1000 * (time.monotonic() - started):.0f} ms")
    assert got["claimed"] == PIDGIN and got["from"] == PIDGIN
    assert got["authenticated"] is False and got["kind"] == "message"
    echoed = room.purple.wait_im(DEADLINE)
    print(f"Pidgin -> dtx -> Pidgin: {1000 * (time.monotonic() - started):.0f} ms")
    assert echoed.sender == name and echoed.message == "hello from pidgin"
    assert not [e for e in room.tv.lines if e.get("event") in ("session", "stanza")]


def test_pidgin_sees_the_caps_keys_and_disco_answers_what_ver_covers(room: Room) -> None:
    name = room.listening["presence_name"]
    txt = room.purple.browse(name)
    port = room.listening["presence_port"]
    assert txt["_port"] == txt["port.p2pj"] == str(port) != str(room.listening["port"])
    assert txt["_address"] == room.tv_host.ip
    assert txt["txtvers"] == "1" and txt["status"] == "avail" and txt["jid"] == "tv@example.org"
    assert (txt["node"], txt["hash"], txt["ver"]) == ("urn:dtx", "sha-1", caps_for().ver)
    sock = raw_stream(room.pidgin_host, (room.tv_host.ip, port), PIDGIN, name,
                      b"<iq type='get' id='disco1'>"
                      b"<query xmlns='http://jabber.org/protocol/disco#info'/></iq>")
    answer = read_stanza(sock).element
    sock.close()
    assert answer.get("type") == "result" and answer.get("id") == "disco1"
    assert ver_of_disco_info(answer) == txt["ver"]


def test_a_dtx_device_opens_a_xep0174_stream_to_pidgin(room: Room) -> None:
    phone_name = room.phone_ready["name"]
    room.purple.wait_buddy(phone_name, DEADLINE)  # Pidgin accepts only buddies it sees
    room.phone.command(op="connect", to=PIDGIN)
    connected = room.phone.event("connected", to=PIDGIN)
    assert connected["kind"] == "link_local" and connected["authenticated"] is False
    assert connected["peer"] == PIDGIN
    room.phone.command(op="send", to=PIDGIN, body="hello pidgin")
    got = room.purple.wait_im(DEADLINE)
    assert got.sender == phone_name and got.message == "hello pidgin"
    room.purple.send_im(phone_name, "hi dtx")  # on the stream the phone opened
    answer = room.phone.event("stanza", to=PIDGIN)
    assert answer["body"] == "hi dtx" and answer["from"] == PIDGIN


def test_a_trusted_dtx_device_is_reached_over_dtx_not_xep0174(room: Room) -> None:
    tv_name = room.listening["presence_name"]
    room.phone.command(op="connect", to=tv_name)
    connected = room.phone.event("connected", to=tv_name)
    assert connected["kind"] == "session" and connected["authenticated"] is True
    assert connected["peer"] == TV and connected["path"] == "lan"
    room.tv.event("session", peer=PHONE)  # the TV accepted an authenticated session


def test_a_link_local_stanza_claiming_a_known_jid_stays_unauthenticated(room: Room) -> None:
    """The phone has an authenticated session with the TV. A stream from the
    Pidgin host claiming the phone's JID is reported as link-local,
    unauthenticated, and its stanza is not a stanza of that session."""
    tv_name = room.listening["presence_name"]
    room.phone.command(op="connect", to=tv_name)
    assert room.phone.event("connected", to=tv_name)["kind"] == "session"
    sock = raw_stream(room.pidgin_host, (room.tv_host.ip, room.listening["presence_port"]),
                      PHONE, tv_name, f"<message from='{PHONE}' type='chat'>"
                      "<body>unlock the door</body></message>".encode())
    spoof = room.tv.event("link_local_stanza", body="unlock the door")
    assert spoof["claimed"] == PHONE and spoof["from"] == PHONE
    assert spoof["authenticated"] is False
    room.phone.command(op="send", to=tv_name, body="real")
    real = room.tv.event("stanza", body="real")
    assert real["peer"] == PHONE and real["from"] == PHONE
    session_bodies = [e["body"] for e in room.tv.lines if e.get("event") == "stanza"]
    assert "unlock the door" not in session_bodies and "real" in session_bodies
    sock.close()


def test_a_status_change_reaches_pidgin(room: Room) -> None:
    """LinkLocal.set_status announces the new TXT record (after a goodbye of
    the old one, which avahi needs to report a change): libpurple shows the
    phone as away with its message (Bonjour's dnd; libpurple treats
    ``away``, which XEP-0174 means as idle, as available), and avahi-browse
    reads the new keys."""
    phone_name = room.phone_ready["name"]
    room.purple.wait_status(phone_name, "available", DEADLINE)
    started = time.monotonic()
    room.phone.command(op="status", status="dnd", msg="watching TV")
    room.phone.event("status", status="dnd")
    room.purple.wait_status(phone_name, "away", DEADLINE)
    print(f"status change seen by Pidgin {time.monotonic() - started:.2f} s after set_status")
    assert room.purple.status_of(phone_name) == ("away", "watching TV")
    txt = room.purple.browse(phone_name)
    assert txt["status"] == "dnd" and txt["msg"] == "watching TV"
    assert txt["ver"] == caps_for().ver  # the rest of the record is unchanged
    room.phone.command(op="status", status="avail")
    room.purple.wait_status(phone_name, "available", DEADLINE)
