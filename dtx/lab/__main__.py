"""Command line for people: ``python -m dtx.lab up|exec|down|list|cleanup``.

``up`` builds a topology and keeps it up in the foreground until Ctrl-C or
``down``; ``exec`` runs a command inside one of its hosts.

    python -m dtx.lab up --wan standard --server rdv --home a=port-restricted-cone \\
        --home b=symmetric --double-nat d=port-restricted-cone/symmetric --lan lr=3
    python -m dtx.lab exec a-h0 -- ping -c 3 203.0.113.10
    python -m dtx.lab down
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from typing import Any

from dtx.errors import LabError
from dtx.lab import ns
from dtx.lab.topology import STANDARD_WAN, Lab, state_dir


def _split(value: str, default: str) -> tuple[str, str]:
    name, _, rest = value.partition("=")
    return name, rest or default


def _live_labs() -> list[dict[str, Any]]:
    labs = []
    if os.path.isdir(state_dir()):
        for entry in sorted(os.listdir(state_dir())):
            if not entry.endswith(".json"):
                continue
            try:
                with open(os.path.join(state_dir(), entry), encoding="utf-8") as f:
                    state = json.load(f)
            except (OSError, ValueError):
                continue
            if ns.pid_alive(int(state.get("pid", 0))):
                labs.append(state)
    return labs


def _pick(prefix: str | None) -> dict[str, Any]:
    labs = _live_labs()
    if prefix:
        labs = [s for s in labs if s["prefix"] == prefix]
    if len(labs) != 1:
        names = ", ".join(s["prefix"] for s in labs) or "none"
        raise LabError(f"need exactly one running lab (found: {names}); use --lab PREFIX")
    return labs[0]


def cmd_up(args: argparse.Namespace) -> int:
    lab = Lab(args.prefix, wan=STANDARD_WAN if args.wan == "standard" else None)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with lab:
        for name in args.server:
            lab.add_server(name)
        for spec in args.home:
            name, profile = _split(spec, "port-restricted-cone")
            lab.add_home(name, nat=profile)
        for spec in args.double_nat:
            name, profiles = _split(spec, "port-restricted-cone/symmetric")
            inner, _, outer = profiles.partition("/")
            lab.add_double_nat_home(name, nat=inner, cgn_nat=outer or "symmetric")
        for spec in args.lan:
            name, count = _split(spec, "3")
            lab.add_lan(name, hosts=int(count))
        for name in args.public:
            lab.add_public_host(name)
        lab.up()
        print(f"lab {lab.prefix} up in {lab.bringup_seconds:.2f} s (Ctrl-C or "
              f"'python -m dtx.lab down --lab {lab.prefix}' to tear down)")
        for host in lab.hosts:
            print(f"  {host.name:<16} {host.netns:<28} {' '.join(host.addresses)}")
        for home in lab.homes:
            print(f"  home {home.name}: {home.nat.describe()}; public {home.public_ip}")
        sys.stdout.flush()
        while not stop.wait(1.0):
            pass
    print(f"lab {lab.prefix} torn down")
    return 0


def cmd_exec(args: argparse.Namespace) -> int:
    state = _pick(args.lab)
    host = state["hosts"].get(args.host)
    if host is None:
        raise LabError(f"no host {args.host!r}; hosts: {', '.join(state['hosts'])}")
    argv = args.command[1:] if args.command[:1] == ["--"] else args.command
    os.execvp("ip", ["ip", "netns", "exec", host["netns"], *(argv or ["bash"])])
    return 1  # not reached


def cmd_down(args: argparse.Namespace) -> int:
    state = _pick(args.lab)
    pid = int(state["pid"])
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while ns.pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if ns.pid_alive(pid):
        print(f"lab {state['prefix']} (pid {pid}) did not stop", file=sys.stderr)
        return 1
    print(f"lab {state['prefix']} down")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    for state in _live_labs():
        print(f"{state['prefix']} (pid {state['pid']}): {', '.join(state['hosts'])}")
    return 0


def cmd_cleanup(args: argparse.Namespace) -> int:
    removed = Lab.cleanup_stale()
    print("removed: " + (", ".join(removed) if removed else "nothing"))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dtx.lab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="build a topology and hold it until Ctrl-C / down")
    up.add_argument("--prefix", help="name prefix (default: dtx + 6 hex)")
    up.add_argument("--wan", choices=["standard", "none"], default="standard")
    up.add_argument("--server", action="append", default=[], metavar="NAME")
    up.add_argument("--home", action="append", default=[], metavar="NAME[=PROFILE]")
    up.add_argument("--double-nat", action="append", default=[],
                    metavar="NAME[=HOME_PROFILE/CGN_PROFILE]")
    up.add_argument("--lan", action="append", default=[], metavar="NAME[=HOSTS]")
    up.add_argument("--public", action="append", default=[], metavar="NAME")
    up.set_defaults(func=cmd_up)
    ex = sub.add_parser("exec", help="run a command inside a host of the running lab")
    ex.add_argument("--lab", help="prefix of the lab, when several run")
    ex.add_argument("host")
    ex.add_argument("command", nargs=argparse.REMAINDER)
    ex.set_defaults(func=cmd_exec)
    dn = sub.add_parser("down", help="tear the running lab down")
    dn.add_argument("--lab")
    dn.set_defaults(func=cmd_down)
    sub.add_parser("list", help="running labs").set_defaults(func=cmd_list)
    sub.add_parser("cleanup", help="remove leftovers of crashed labs").set_defaults(
        func=cmd_cleanup)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING)
    try:
        result: int = args.func(args)
    except LabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return result


if __name__ == "__main__":
    sys.exit(main())
