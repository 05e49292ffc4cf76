"""The slixmpp plugin in the NAT lab: two homes, Prosody and coturn on the
server host, standard WAN.

Two slixmpp applications of one account, the TV in home b and the remote
in home a (port-restricted cones: a punchable pair), whose code calls only
``send_message`` and ``add_event_handler``. The remote streams 10,000
numbered messages while the path goes server → direct → (the lab cuts UDP
between the homes and to the server) → server → direct again: every one
arrives once, in order. Both applications' event loops run in one thread
in home a (each device's UDP socket is made in its own home; the TV's XMPP
connection leaving from home a is something only the server can tell).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from slixmpp import ClientXMPP

from dtx.aio.peer import PeerConfig
from dtx.identity import generate_identity, save_identity
from dtx.lab import STANDARD_WAN, Lab
from dtx.lab.topology import Home, Host

from .test_xmpp_signalling import PASSWORD, in_first_home, xmpp_lab

pytestmark = pytest.mark.netns

DEADLINE = 20.0
TOTAL = 10_000
WINDOW = 400
"""Messages in flight at most (the remote waits for the TV to catch up)."""
TV, REMOTE = "alice@example.org/tv", "alice@example.org/remote"


class App:
    def __init__(self, jid: str, host: Host, key: Path, server: tuple[str, int]) -> None:
        save_identity(generate_identity(jid), str(key))
        self.xmpp = ClientXMPP(jid, PASSWORD)
        self.xmpp.register_plugin("xep_0030")
        self.xmpp.register_plugin("dtx", {
            "key_file": str(key), "sock": host.udp_socket(),
            "peer_config": PeerConfig(host_addresses=(host.ip,), idle_timeout=3.0)},
            module="dtx.slixmpp")
        self.xmpp.plugin["feature_mechanisms"].unencrypted_plain = True
        self.xmpp.enable_direct_tls = False
        self.xmpp.enable_plaintext = True
        self.server = server
        self.got: list[int] = []
        self.progress = asyncio.Event()
        self.events: list[tuple[str, Any]] = []
        self.xmpp.add_event_handler("message", self._on_message)
        for name in ("dtx_session_start", "dtx_session_end", "dtx_ready"):
            self.xmpp.add_event_handler(
                name, lambda data=None, n=name: (self.events.append((n, data)),
                                                 self.progress.set()))

    def _on_message(self, msg: Any) -> None:
        if msg["type"] == "chat" and msg["body"].startswith("n "):
            self.got.append(int(msg["body"][2:]))
            self.progress.set()

    @property
    def dtx(self) -> Any:
        return self.xmpp.plugin["dtx"]

    async def start(self) -> None:
        started = asyncio.get_running_loop().create_future()
        self.xmpp.add_event_handler("session_start", lambda _: (
            self.xmpp.get_roster(), self.xmpp.send_presence(),
            started.done() or started.set_result(None)))
        self.xmpp.connect(*self.server)
        async with asyncio.timeout(DEADLINE):
            await started
            while "dtx_ready" not in [n for n, _ in self.events]:
                self.progress.clear()
                await self.progress.wait()

    async def wait(self, what: Any, timeout: float = DEADLINE) -> None:
        async with asyncio.timeout(timeout):
            while not what():
                self.progress.clear()
                await self.progress.wait()


async def stream(lab: Lab, homes: tuple[Home, Home], server: Host, folder: Path,
                 address: tuple[str, int]) -> dict[str, Any]:
    a, b = homes[0].hosts[0], homes[1].hosts[0]
    tv = App(TV, b, folder / "tv.key", address)
    remote = App(REMOTE, a, folder / "remote.key", address)
    await tv.start()
    await remote.start()
    paths: list[str | None] = []
    phase = "server"
    cut_at = restored_at = None
    sent = 0
    while sent < TOTAL:
        batch = min(50, TOTAL - sent)
        for i in range(sent, sent + batch):
            remote.xmpp.send_message(mto=TV, mbody=f"n {i}", mtype="chat")
        sent += batch
        await tv.wait(lambda: len(tv.got) >= sent - WINDOW)
        path = remote.dtx.path(TV)
        if not paths or paths[-1] != path:
            paths.append(path)
        if phase == "server" and path in ("direct", "relay") and sent >= 2000:
            # cut every UDP path: between the homes, and to coturn
            for x, y in ((homes[0], homes[1]), (homes[0], server), (homes[1], server)):
                lab.block(x, y)
            phase, cut_at = "cut", sent
        elif phase == "cut" and path is None:
            for x, y in ((homes[0], homes[1]), (homes[0], server), (homes[1], server)):
                lab.unblock(x, y)
            phase, restored_at = "restored", sent
            asyncio.ensure_future(remote.dtx.connect(TV))
    await tv.wait(lambda: len(tv.got) >= TOTAL, timeout=3 * DEADLINE)
    outcome = {"paths": paths, "got": list(tv.got), "cut_at": cut_at,
               "restored_at": restored_at, "final": remote.dtx.path(TV),
               "events": [n for n, _ in remote.events]}
    for app in (remote, tv):
        await app.dtx.close()
        app.xmpp.disconnect()
    return outcome


def test_ten_thousand_messages_across_every_switch_arrive_once_in_order(
        netns_ready: None, tmp_path: Path) -> None:
    with Lab(wan=STANDARD_WAN) as lab, xmpp_lab(
            lab, tmp_path, "port-restricted-cone", "port-restricted-cone") as scene:
        outcome = in_first_home(scene, lambda: stream(
            lab, (scene.home_a, scene.home_b), scene.server, tmp_path, scene.prosody.address()))
    print(f"\npaths seen by the remote: {outcome['paths']}; cut after {outcome['cut_at']}, "
          f"restored after {outcome['restored_at']} messages")
    assert outcome["got"] == list(range(TOTAL)), "once each, in order"
    assert outcome["paths"][0] is None  # through the server first
    assert outcome["cut_at"] is not None and outcome["restored_at"] is not None, outcome
    assert outcome["events"].count("dtx_session_start") >= 2, outcome["events"]
    assert "dtx_session_end" in outcome["events"]
