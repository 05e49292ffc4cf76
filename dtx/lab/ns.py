"""Network-namespace plumbing for the NAT lab: create, enter, list, delete.

Namespaces are the named ones that ``ip netns`` manages (a bind mount under
``/run/netns``). Entering one is done by ``setns(2)`` in a short-lived
thread: the namespace of a thread applies to the sockets it creates, the
``/proc/sys/net`` files it opens and the children it forks, and it ends with
the thread, so the calling thread never changes namespace. Python 3.11 has
no ``os.setns``, hence ``ctypes``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from typing import TypeVar

from dtx.errors import LabError

logger = logging.getLogger(__name__)

NETNS_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000
T = TypeVar("T")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def read_log(path: str) -> str:
    """A lab daemon's log file so far ("" before there is one)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def in_netns(name: str, fn: Callable[[], T]) -> T:
    """Call ``fn`` in a fresh thread that has entered namespace ``name``."""
    result: list[T] = []
    failure: list[BaseException] = []

    def body() -> None:
        try:
            fd = os.open(os.path.join(NETNS_DIR, name), os.O_RDONLY | os.O_CLOEXEC)
            try:
                _setns(fd)
            finally:
                os.close(fd)
            result.append(fn())
        except BaseException as exc:  # re-raised in the caller's thread
            failure.append(exc)

    thread = threading.Thread(target=body, name=f"netns-{name}", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


def socket_in(name: str, family: int, type_: int, proto: int = 0) -> socket.socket:
    """A socket that lives in namespace ``name`` but is usable from here."""
    return in_netns(name, lambda: socket.socket(family, type_, proto))


def write_sysctls(name: str, values: dict[str, str]) -> None:
    """Write ``net.*`` sysctls (dotted names) inside namespace ``name``."""

    def body() -> None:
        for key, value in values.items():
            path = "/proc/sys/" + key.replace(".", "/")
            with open(path, "w", encoding="ascii") as f:
                f.write(value)

    in_netns(name, body)


def run(argv: list[str], *, input_text: str | None = None, timeout: float = 10.0,
        check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command, capture its output, raise :class:`LabError` on failure."""
    try:
        proc = subprocess.run(argv, input=input_text, capture_output=True, text=True,
                              timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"{' '.join(argv)} did not finish in {timeout} s") from exc
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(argv)} failed ({proc.returncode}): "
                       f"{proc.stderr.strip()}\n{input_text or ''}")
    return proc


def ip_batch(netns: str | None, commands: Iterable[str]) -> None:
    """Run ``ip`` commands as one batch, inside ``netns`` when given."""
    lines = "\n".join(commands) + "\n"
    argv = ["ip"] + (["-n", netns] if netns else []) + ["-batch", "-"]
    run(argv, input_text=lines)


def nft_load(netns: str, ruleset: str) -> None:
    """Load an nftables ruleset (``nft -f``) inside ``netns``."""
    run(["ip", "netns", "exec", netns, "nft", "-f", "-"], input_text=ruleset)


def add_netns(names: Iterable[str]) -> None:
    """Create named namespaces (one ``ip -batch`` for all of them)."""
    ip_batch(None, [f"netns add {n}" for n in names])


def list_netns() -> list[str]:
    """Names of all named namespaces."""
    try:
        return sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []


def netns_pids(name: str) -> list[int]:
    """Pids of processes whose network namespace is ``name``."""
    proc = run(["ip", "netns", "pids", name], check=False)
    return [int(p) for p in proc.stdout.split() if p.isdigit()]


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def kill_pids(pids: Iterable[int], *, grace: float = 1.0) -> None:
    """SIGTERM, then SIGKILL what is still alive after ``grace`` seconds."""
    pids = [p for p in pids if p != os.getpid()]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if pid_alive(p) and not _is_zombie(p)]
        if pids:
            time.sleep(0.02)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] == "Z"


def delete_netns(names: Iterable[str]) -> None:
    """Kill every process left in the namespaces, then delete them."""
    names = [n for n in names if n in set(list_netns())]
    if not names:
        return
    pids: list[int] = []
    for name in names:
        pids.extend(netns_pids(name))
    if pids:
        kill_pids(pids)
    proc = run(["ip", "-force", "-batch", "-"],
               input_text="".join(f"netns del {n}\n" for n in names), check=False)
    if proc.returncode != 0:
        logger.warning("netns delete: %s", proc.stderr.strip())


def processes_with_arg(arg: str) -> list[int]:
    """Pids whose command line contains the argument ``arg`` exactly."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if arg.encode() in argv:
            found.append(int(entry))
    return found
