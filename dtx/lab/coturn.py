"""A throwaway coturn: the TURN server beside a lab Prosody.

:class:`CoturnServer` runs ``turnserver`` with TURN REST credentials
(``use-auth-secret`` and a ``static-auth-secret``, the secret Prosody's
``mod_turn_external`` mints credentials with), on loopback or inside a
NAT-lab host (``host=``, listening and relaying on the host's address),
from a folder of its own: no configuration file (``-n``, everything on the
command line), its log, pid file and user database there. UDP only: no
TLS, DTLS or TCP listeners, no TCP relays, no CLI, no RFC 5780. With
``-v`` the log records each allocation, which :meth:`CoturnServer.sessions`
reads back.

``start()`` returns once the server answers a STUN Binding request from
the place clients are (the host's namespace in the lab), or raises
:class:`~dtx.errors.LabError` with the end of its log.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dtx.errors import DecodeError, LabError
from dtx.lab import ns
from dtx.wire.stun import binding_request, decode_stun

if TYPE_CHECKING:
    from dtx.lab.topology import Host

__all__ = ["CoturnServer", "CoturnSession", "coturn_missing"]

LOOPBACK = "127.0.0.1"
TURN_PORT = 3478
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
_PROBE_INTERVAL = 0.1


def coturn_missing() -> str | None:
    """Why coturn cannot be used here, or None when it can."""
    if shutil.which("turnserver") is None:
        return ("needs coturn's turnserver (Debian package coturn): "
                "run scripts/setup as root")
    return None


@dataclass(frozen=True)
class CoturnSession:
    """One line of coturn's ``-v`` log about an allocation: ``event`` is
    ``new`` (allocated) or ``refreshed`` (lifetime 0: released)."""

    event: str
    realm: str
    username: str
    lifetime: int


_SESSION_RE = re.compile(
    r"session \d+: (new|refreshed), realm=<([^>]*)>, username=<([^>]*)>, lifetime=(\d+)")


@dataclass
class CoturnServer:
    """One running ``turnserver``; ``start()`` then ``stop()`` (or ``with``)."""

    secret: str
    realm: str = "example.org"
    host: Host | None = None
    """A NAT-lab host to run on (its namespace, its primary address);
    None: 127.0.0.1."""
    port: int = 0
    """0: 3478 in the lab, a free port on loopback."""
    folder: str = ""
    """Where its log, pid file and database go; empty: a temporary folder,
    removed by :meth:`stop`."""
    max_allocate_lifetime: int | None = None
    extra_args: tuple[str, ...] = ()
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _owns_folder: bool = field(default=False, repr=False)

    @property
    def ip(self) -> str:
        return self.host.ip if self.host is not None else LOOPBACK

    @property
    def address(self) -> tuple[str, int]:
        return (self.ip, self.port)

    @property
    def log_path(self) -> str:
        return os.path.join(self.folder, "turn.log")

    def _argv(self) -> list[str]:
        argv = [
            "turnserver", "-n", "-v",
            "--listening-ip", self.ip, "--relay-ip", self.ip,
            "--listening-port", str(self.port),
            "--no-cli", "--no-tls", "--no-dtls", "--no-tcp", "--no-tcp-relay", "--no-rfc5780",
            "--use-auth-secret", "--static-auth-secret", self.secret, "--realm", self.realm,
            "--log-file", self.log_path, "--simple-log", "--no-stdout-log",
            "--pidfile", os.path.join(self.folder, "turn.pid"),
            "--db", os.path.join(self.folder, "turndb"),
            "--relay-threads", "1",
        ]
        if self.host is None:
            argv.append("--allow-loopback-peers")
        if self.max_allocate_lifetime is not None:
            # an optional_argument in coturn's getopt table: "=" is needed
            argv.append(f"--max-allocate-lifetime={int(self.max_allocate_lifetime)}")
        return argv + list(self.extra_args)

    def start(self) -> None:
        if not self.folder:
            self.folder = tempfile.mkdtemp(prefix="dtx-coturn-")
            self._owns_folder = True
        os.makedirs(self.folder, exist_ok=True)
        fixed = self.port or (TURN_PORT if self.host is not None else 0)
        # On loopback another process may take a probed port before coturn
        # binds it: a few tries.
        for _ in range(1 if fixed else 5):
            self.port = fixed or _free_udp_port()
            options: dict[str, Any] = {"stdin": subprocess.DEVNULL,
                                       "stdout": subprocess.DEVNULL,
                                       "stderr": subprocess.DEVNULL}
            if self.host is not None:
                self._proc = self.host.popen(self._argv(), **options)
            else:
                self._proc = subprocess.Popen(self._argv(), start_new_session=True, **options)
            if self._answers_binding():
                return
            self._terminate()
        tail = self.log_text()[-2000:]
        self.stop()
        raise LabError(f"turnserver did not answer STUN on {self.ip}:{self.port}; log:\n{tail}")

    def _probe_socket(self) -> socket.socket:
        if self.host is not None:
            return self.host.udp_socket()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((LOOPBACK, 0))
        return sock

    def _answers_binding(self) -> bool:
        """Ready when it answers a STUN Binding request (sent again every
        0.1 s until the deadline); not when the process exits."""
        with self._probe_socket() as sock:
            sock.settimeout(_PROBE_INTERVAL)
            deadline = time.monotonic() + START_TIMEOUT
            while time.monotonic() < deadline:
                if self._proc is None or self._proc.poll() is not None:
                    return False
                tid = os.urandom(12)
                sock.sendto(binding_request(tid), self.address)
                try:
                    data, _ = sock.recvfrom(2048)
                    if decode_stun(data).transaction_id == tid:
                        return True
                except (TimeoutError, ConnectionRefusedError, DecodeError):
                    continue
        return False

    def log_text(self) -> str:
        """The log so far ("" before there is one)."""
        return ns.read_log(self.log_path)

    def sessions(self, log: str | None = None) -> list[CoturnSession]:
        """The allocation lines of the log (or of ``log``), in order."""
        text = self.log_text() if log is None else log
        return [CoturnSession(m[0], m[1], m[2], int(m[3])) for m in _SESSION_RE.findall(text)]

    def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=STOP_TIMEOUT)

    def restart(self) -> None:
        """Stop the server and start it again on the same port: every
        allocation it held is gone (its clients find out at their next
        refresh)."""
        self._terminate()
        self.start()

    def stop(self) -> str:
        """Stop the server (it flushes its log on the way out) and return
        the whole log. Safe to call twice."""
        self._terminate()
        log = self.log_text()
        if self._owns_folder and self.folder:
            shutil.rmtree(self.folder, ignore_errors=True)
            self._owns_folder = False
        return log

    def __enter__(self) -> CoturnServer:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])
