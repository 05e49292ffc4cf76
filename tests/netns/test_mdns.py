"""LAN discovery across network namespaces: advertisers and resolvers run as
``python -m dtx.aio.mdns`` inside lab hosts on one bridge, so mDNS never
touches the machine's own network. Discovery times are printed, not asserted."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from dtx.aio.mdns import host_label, instance_name, presence_instance_name
from dtx.identity import generate_identity, save_identity
from dtx.proto.caps import caps_for
from dtx.lab import Lab
from dtx.lab.topology import Host

pytestmark = pytest.mark.netns

REPO = Path(__file__).resolve().parents[2]
TV = "tv@example.org/living-room"
START_TIMEOUT = 15.0
"""Deadline for an advertiser to finish probing and say so (about 1 s here)."""


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def read_json_line(proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    """The first JSON line the process prints, within ``timeout``."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise AssertionError(f"no output within {timeout} s from {proc.args!r}")
    line = proc.stdout.readline()
    if not line:
        raise AssertionError(f"{proc.args!r} exited with {proc.wait(5)} before printing")
    result: dict[str, Any] = json.loads(line)
    return result


def advertise(host: Host, jid: str, fingerprint: str, port: int,
              *extra: str) -> dict[str, Any]:
    """Start an advertiser in ``host`` (the lab kills it at teardown) and
    return its announcement once mDNS probing is done."""
    proc = host.popen([sys.executable, "-m", "dtx.aio.mdns", "advertise", "--jid", jid,
                       "--fingerprint", fingerprint, "--port", str(port), *extra],
                      stdout=subprocess.PIPE, text=True, cwd=REPO, env=child_env())
    announced = read_json_line(proc, START_TIMEOUT)
    assert announced["event"] == "announced"
    print(f"{host.name}: announced {jid} in {announced['seconds']:.3f} s (probing included)")
    return announced


def run_json(host: Host, *argv: str, timeout: float = 20.0) -> dict[str, Any]:
    result = host.run([sys.executable, "-m", "dtx.aio.mdns", *argv], timeout=timeout,
                      cwd=REPO, env=child_env())
    if not result.stdout:
        raise AssertionError(f"no output (exit {result.returncode}): {result.stderr}")
    out: dict[str, Any] = json.loads(result.stdout)
    return out


def living_room(lab: Lab) -> tuple[Host, Host, Host]:
    lan = lab.add_lan("living-room", hosts=3)
    lab.up()
    a, b, c = lan.hosts
    return a, b, c


def test_resolve_full_jid_gives_lan_address_and_port(lab: Lab) -> None:
    a, b, _ = living_room(lab)
    tv = generate_identity(TV)
    announced = advertise(a, TV, tv.fingerprint, 41000)
    assert announced["addresses"] == [a.ip]

    out = run_json(b, "resolve", TV, "--timeout", "10")
    print(f"{b.name}: resolved {TV} in {out['seconds']:.3f} s "
          f"(zeroconf start + first answer + settle window)")
    assert len(out["records"]) == 1
    rec = out["records"][0]
    assert rec["jid"] == TV
    assert rec["fingerprint"] == tv.fingerprint
    assert rec["addresses"] == [[a.ip, 41000]]
    assert rec["version"] == "1"

    missing = run_json(b, "resolve", "tv@example.org/kitchen", "--timeout", "1.5")
    assert missing["records"] == []


def test_bare_jid_returns_every_device_of_the_account(lab: Lab) -> None:
    a, b, c = living_room(lab)
    tv = generate_identity(TV)
    kitchen = generate_identity("tv@example.org/kitchen")
    radio = generate_identity("radio@example.org/living-room")
    advertise(a, TV, tv.fingerprint, 41000)
    advertise(c, str(kitchen.jid), kitchen.fingerprint, 41001)
    advertise(c, str(radio.jid), radio.fingerprint, 41002)

    out = run_json(b, "resolve", "tv@example.org", "--count", "2", "--timeout", "10")
    print(f"{b.name}: two devices of tv@example.org found in {out['seconds']:.3f} s")
    found = {r["jid"]: r for r in out["records"]}
    assert set(found) == {TV, "tv@example.org/kitchen"}
    assert found[TV]["addresses"] == [[a.ip, 41000]]
    assert found["tv@example.org/kitchen"]["addresses"] == [[c.ip, 41001]]
    assert found["tv@example.org/kitchen"]["fingerprint"] == kitchen.fingerprint

    # The settle window of a plain resolve collects both answers too.
    settled = run_json(b, "resolve", "tv@example.org", "--timeout", "10", "--settle", "1.0")
    print(f"{b.name}: resolve with a 1 s settle window took {settled['seconds']:.3f} s")
    assert {r["jid"] for r in settled["records"]} == {TV, "tv@example.org/kitchen"}


def test_impostor_is_listed_with_its_own_fingerprint(lab: Lab) -> None:
    """Discovery is not trust: an impostor announcing the same JID shows up,
    with its own key fingerprint; the trusted one is listed first so that a
    connecting side tries it first (the handshake refuses the other)."""
    a, b, c = living_room(lab)
    tv = generate_identity(TV)
    impostor = generate_identity(TV)
    advertise(a, TV, tv.fingerprint, 41000)
    advertise(c, TV, impostor.fingerprint, 41000)

    for trusted in (tv.fingerprint, impostor.fingerprint):
        out = run_json(b, "resolve", TV, "--count", "2", "--timeout", "10", "--trusted", trusted)
        print(f"{b.name}: {TV} and its impostor found in {out['seconds']:.3f} s")
        records = out["records"]
        assert [r["jid"] for r in records] == [TV, TV]
        assert records[0]["fingerprint"] == trusted
        where = {r["fingerprint"]: r["addresses"] for r in records}
        assert where == {tv.fingerprint: [[a.ip, 41000]],
                         impostor.fingerprint: [[c.ip, 41000]]}


def listen(host: Host, keyfile: Path, *extra: str) -> tuple[subprocess.Popen[str],
                                                            dict[str, Any]]:
    """``dtx listen --lan`` in ``host``; its ``listening`` event (after probing)."""
    proc = host.popen([sys.executable, "-m", "dtx.cli", "listen", str(keyfile), "--lan",
                       "--no-pins", "--json", *extra],
                      stdout=subprocess.PIPE, text=True, cwd=REPO, env=child_env())
    listening = read_json_line(proc, START_TIMEOUT)
    assert listening["event"] == "listening"
    return proc, listening


def tcp_listeners(host: Host) -> list[int]:
    """The ports of the listening TCP sockets in ``host`` (``ss``)."""
    out = host.run(["ss", "-Htln"], check=True).stdout
    return sorted(int(line.split()[3].rpartition(":")[2]) for line in out.splitlines())


def test_presence_record_names_the_xep0174_listener(lab: Lab, tmp_path: Path) -> None:
    """With --presence, _presence._tcp names the TCP port a XEP-0174 stream
    is served on (not dtx's UDP port), txtvers first, with the XEP-0115 keys
    and status; the record goes with the listener."""
    a, b, _ = living_room(lab)
    tv = generate_identity(TV)
    save_identity(tv, tmp_path / "tv.key")
    proc, listening = listen(a, tmp_path / "tv.key", "--presence")
    port = listening["presence_port"]
    assert listening["presence_name"] == presence_instance_name(TV, tv.fingerprint)
    assert tcp_listeners(a) == [port] and port != listening["port"]

    # The type without ".local." (this died with BadTypeInNameException once).
    out = run_json(b, "lookup", "--type", "_presence._tcp", "--instance",
                   listening["presence_name"], "--timeout", "10")
    print(f"{b.name}: XEP-0174 presence looked up in {out['seconds']:.3f} s")
    assert out["found"] is True and out["port"] == port
    assert out["txt"][0] == "txtvers=1"
    caps = caps_for()
    assert set(out["txt"][1:]) == {f"port.p2pj={port}", "status=avail", "jid=tv@example.org",
                                   "nick=living-room", f"node={caps.node}", "hash=sha-1",
                                   f"ver={caps.ver}"}
    assert out["addresses"] == [a.ip]
    assert out["server"] == host_label(TV, tv.fingerprint) + ".local."

    proc.send_signal(signal.SIGINT)  # Ctrl-C: dtx says goodbye, then exits 130
    assert proc.wait(10) == 130
    gone = run_json(b, "lookup", "--type", "_presence._tcp", "--instance",
                    listening["presence_name"], "--timeout", "1.5")
    assert gone["found"] is False and tcp_listeners(a) == []


def test_without_presence_there_is_no_record_and_no_tcp_port(lab: Lab, tmp_path: Path) -> None:
    a, b, _ = living_room(lab)
    tv = generate_identity(TV)
    save_identity(tv, tmp_path / "tv.key")
    _, listening = listen(a, tmp_path / "tv.key")
    assert "presence_port" not in listening
    dtx_record = run_json(b, "lookup", "--type", "_dtx._udp", "--instance",
                          instance_name(TV, tv.fingerprint), "--timeout", "10")
    assert dtx_record["found"] is True and dtx_record["port"] == listening["port"]
    presence = run_json(b, "lookup", "--type", "_presence._tcp", "--instance",
                        presence_instance_name(TV, tv.fingerprint), "--timeout", "1.5")
    assert presence["found"] is False
    assert tcp_listeners(a) == []


def test_goodbye_removes_the_device(lab: Lab) -> None:
    """A browser that saw the device hears its goodbye (TTL 0 records) when
    the advertiser stops, long before the records would expire."""
    a, b, _ = living_room(lab)
    tv = generate_identity(TV)
    browser = b.popen([sys.executable, "-m", "dtx.aio.mdns", "browse"],
                      stdout=subprocess.PIPE, text=True, cwd=REPO, env=child_env())
    assert read_json_line(browser, START_TIMEOUT)["event"] == "browsing"
    advertiser = a.popen([sys.executable, "-m", "dtx.aio.mdns", "advertise", "--jid", TV,
                          "--fingerprint", tv.fingerprint, "--port", "41000"],
                         stdout=subprocess.PIPE, text=True, cwd=REPO, env=child_env())
    assert read_json_line(advertiser, START_TIMEOUT)["event"] == "announced"

    found = read_json_line(browser, 10)
    assert found["event"] == "found"
    assert found["record"]["fingerprint"] == tv.fingerprint
    assert found["record"]["addresses"] == [[a.ip, 41000]]

    started = time.monotonic()
    advertiser.terminate()
    lost = read_json_line(browser, 10)
    print(f"{b.name}: goodbye of {TV} seen {time.monotonic() - started:.3f} s after SIGTERM")
    assert lost["event"] == "lost"
    assert lost["record"]["instance"] == found["record"]["instance"]
    assert advertiser.wait(10) == 0
