"""A real XEP-0174 client in a lab host: libpurple's Bonjour plugin (the one
Pidgin ships), run by ``finch`` (Pidgin's text front end) and driven over
libpurple's own D-Bus interface (``im.pidgin.purple.PurpleService``).

Everything runs inside the host's network namespace, and nothing touches
the machine's own buses or daemons:

* a private "system" bus (``dbus-daemon``, its socket under ``folder``),
  which the Bonjour plugin and ``avahi-daemon`` use as the system bus
  (``DBUS_SYSTEM_BUS_ADDRESS``);
* ``avahi-daemon`` with its own configuration, host name ``pidgin-box``,
  IPv4 only, its run folder bind-mounted over ``/run/avahi-daemon`` in the
  private mount namespace that ``ip netns exec`` gives each process;
* a private session bus, where finch's libpurple publishes its D-Bus API;
* ``finch`` under ``script`` (a pseudo-terminal; nobody reads the screen),
  with a prepared ``accounts.xml``: one Bonjour account, ``alice``, enabled.

The test sends messages with ``dbus-send`` (``PurpleConvImSend``) and reads
what libpurple received from ``dbus-monitor`` (the ``ReceivedImMsg``
signal). Every wait has a deadline.
"""

from __future__ import annotations

import queue
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from dtx.lab.topology import Host

TOOLS = ("finch", "avahi-daemon", "avahi-browse", "dbus-daemon", "dbus-send", "dbus-monitor",
         "script")

HOSTNAME = "pidgin-box"
USER = "alice"
NAME = f"{USER}@{HOSTNAME}"
"""The Bonjour account's instance name (libpurple's ``user@machine``)."""

_BUS_CONF = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <listen>unix:path={path}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*" eavesdrop="true"/>
    <allow receive_sender="*"/>
    <allow eavesdrop="true"/>
  </policy>
</busconfig>
"""

_AVAHI_CONF = f"""[server]
host-name={HOSTNAME}
use-ipv4=yes
use-ipv6=no
enable-dbus=yes
ratelimit-interval-usec=1000000
ratelimit-burst=1000
[wide-area]
enable-wide-area=no
[publish]
publish-hinfo=no
publish-workstation=no
"""

_ACCOUNTS = f"""<?xml version='1.0' encoding='UTF-8' ?>
<account version='1.0'>
 <account>
  <protocol>prpl-bonjour</protocol>
  <name>{NAME}</name>
  <settings>
   <setting name='first' type='string'>Alice</setting>
   <setting name='last' type='string'>Lab</setting>
  </settings>
  <settings ui='gnt-purple'>
   <setting name='auto-login' type='bool'>1</setting>
  </settings>
 </account>
</account>
"""

T = TypeVar("T")

PURPLE = ["--dest=im.pidgin.purple.PurpleService", "/im/pidgin/purple/PurpleObject"]
IFACE = "im.pidgin.purple.PurpleInterface"


def missing_tools() -> list[str]:
    return [t for t in TOOLS if shutil.which(t) is None]


def _until(predicate: Callable[[], T | None], timeout: float, what: str,
           interval: float = 0.1) -> T:
    """Poll ``predicate`` until it returns something true (bounded in time)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(interval)


@dataclass
class ReceivedIm:
    sender: str
    message: str


@dataclass
class Libpurple:
    host: Host
    folder: Path
    env: dict[str, str]
    account: int = 0
    _ims: queue.Queue[ReceivedIm] = field(default_factory=queue.Queue)

    @classmethod
    def start(cls, host: Host, folder: Path, *, timeout: float = 20.0) -> Libpurple:
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o755)
        (folder / "system.conf").write_text(_BUS_CONF.format(path=folder / "system_bus"))
        (folder / "session.conf").write_text(_BUS_CONF.format(path=folder / "session_bus"))
        (folder / "avahi.conf").write_text(_AVAHI_CONF)
        (folder / "avahi-run").mkdir(exist_ok=True)
        purple_dir = folder / "home" / ".purple"
        purple_dir.mkdir(parents=True, exist_ok=True)
        (purple_dir / "accounts.xml").write_text(_ACCOUNTS)
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "HOME": str(folder / "home"), "TERM": "xterm", "LANG": "C.UTF-8",
               "DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={folder / 'system_bus'}",
               "DBUS_SESSION_BUS_ADDRESS": f"unix:path={folder / 'session_bus'}"}
        self = cls(host, folder, env)
        quiet = {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL,
                 "stderr": subprocess.DEVNULL}
        for bus in ("system", "session"):
            host.popen(["dbus-daemon", "--nofork", f"--config-file={folder / bus}.conf"],
                       env=env, **quiet)
        _until(lambda: (folder / "system_bus").exists() and (folder / "session_bus").exists()
               or None, timeout, "the private D-Bus daemons")
        with open(folder / "avahi.log", "w") as log:
            host.popen(["sh", "-c", "mkdir -p /run/avahi-daemon && "
                        f"mount --bind {folder / 'avahi-run'} /run/avahi-daemon && "
                        "exec avahi-daemon --no-drop-root --no-chroot --no-rlimits "
                        f"-f {folder / 'avahi.conf'}"],
                       env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        _until(lambda: "Server startup complete" in (folder / "avahi.log").read_text() or None,
               timeout, "avahi-daemon")
        monitor = host.popen(["dbus-monitor", "--address", env["DBUS_SESSION_BUS_ADDRESS"],
                              f"type='signal',interface='{IFACE}',member='ReceivedImMsg'"],
                             env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
        threading.Thread(target=self._read_monitor, args=(monitor,), daemon=True).start()
        host.popen(["script", "-qfec", f"stty rows 40 cols 120; exec finch -d -c {purple_dir} "
                    f"2>{folder / 'finch.log'}", "/dev/null"], env=env, **quiet)
        accounts = _until(lambda: self._ints(self.call("PurpleAccountsGetAllActive")),
                          timeout, "finch's Bonjour account")
        self.account = accounts[0]
        return self

    # -- D-Bus --------------------------------------------------------------------

    def call(self, method: str, *args: str) -> str:
        """``dbus-send`` a libpurple method; its printed reply ('' on error)."""
        done = self.host.run(["dbus-send", "--session", "--print-reply", *PURPLE,
                              f"{IFACE}.{method}", *args], env=self.env, timeout=10)
        return done.stdout if done.returncode == 0 else ""

    @staticmethod
    def _ints(reply: str) -> list[int]:
        return [int(n) for n in re.findall(r"int32 (-?\d+)", reply)]

    def _int(self, method: str, *args: str) -> int:
        values = self._ints(self.call(method, *args))
        return values[0] if values else 0

    def _read_monitor(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        args: list[str] | None = None
        for line in proc.stdout:
            if line.startswith("signal "):
                args = [] if "member=ReceivedImMsg" in line else None
                continue
            if args is None:
                continue
            found = re.match(r'\s+string "(.*)"$', line)
            if found:
                args.append(found.group(1))
                if len(args) == 2:  # sender, message
                    self._ims.put(ReceivedIm(args[0], args[1]))
                    args = None

    # -- what a person would do ------------------------------------------------------

    def wait_buddy(self, name: str, timeout: float) -> None:
        """Until ``name`` is in the buddy list and online (found over mDNS)."""
        def online() -> bool | None:
            buddy = self._int("PurpleFindBuddy", f"int32:{self.account}", f"string:{name}")
            if not buddy:
                return None
            presence = self._int("PurpleBuddyGetPresence", f"int32:{buddy}")
            return (bool(presence) and bool(self._int("PurplePresenceIsOnline",
                                                      f"int32:{presence}"))) or None
        _until(online, timeout, f"{name} online in Pidgin's buddy list", interval=0.2)

    def status_of(self, name: str) -> tuple[str, str]:
        """The id of the buddy's active status in libpurple ('' if unknown:
        ``available``, ``away`` — which Bonjour's ``dnd`` maps to — or
        ``offline``) and its message."""
        buddy = self._int("PurpleFindBuddy", f"int32:{self.account}", f"string:{name}")
        presence = self._int("PurpleBuddyGetPresence", f"int32:{buddy}") if buddy else 0
        status = self._int("PurplePresenceGetActiveStatus", f"int32:{presence}") \
            if presence else 0
        if not status:
            return "", ""
        found = re.search(r'string "(.*)"', self.call("PurpleStatusGetId", f"int32:{status}"))
        message = re.search(r'string "(.*)"', self.call(
            "PurpleStatusGetAttrString", f"int32:{status}", "string:message"))
        return (found.group(1) if found else "", message.group(1) if message else "")

    def wait_status(self, name: str, status: str, timeout: float) -> None:
        """Until libpurple shows ``name`` with ``status``."""
        _until(lambda: self.status_of(name)[0] == status or None, timeout,
               f"{name} {status} in Pidgin (now {self.status_of(name)!r})", interval=0.2)

    def send_im(self, name: str, text: str) -> None:
        """Open (or reuse) the conversation with ``name`` and send ``text``."""
        conv = self._int("PurpleConversationNew", "int32:1", f"int32:{self.account}",
                         f"string:{name}")
        im = self._int("PurpleConvIm", f"int32:{conv}")
        assert conv and im, "libpurple refused to open a conversation"
        self.call("PurpleConvImSend", f"int32:{im}", f"string:{text}")

    def wait_im(self, timeout: float) -> ReceivedIm:
        """The next message libpurple received (``ReceivedImMsg``)."""
        try:
            return self._ims.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"Pidgin received nothing within {timeout} s") from None

    def browse(self, instance: str, timeout: float = 10.0) -> dict[str, str]:
        """The TXT keys of ``instance`` as avahi-browse resolves it."""
        def resolved() -> dict[str, str] | None:
            done = self.host.run(["avahi-browse", "-rpt", "_presence._tcp"], env=self.env,
                                 timeout=15)
            for line in done.stdout.splitlines():
                fields = line.split(";")
                if fields[0] == "=" and fields[3].replace("\\064", "@") == instance:
                    txt = dict(re.findall(r'"([^"=]+)=([^"]*)"', fields[9]))
                    txt["_port"], txt["_address"] = fields[8], fields[7]
                    return txt
            return None
        return _until(resolved, timeout, f"avahi-browse resolving {instance}")

    def log(self) -> str:
        path = self.folder / "finch.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(line for line in text.splitlines() if "bonjour" in line)[-4000:]
