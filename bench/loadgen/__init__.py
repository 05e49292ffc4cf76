"""UDP load generators for the ``rendezvous_load`` scenario.

Both take the same command line (``RATE DURATION DRAIN SPEC...``, see
``udpload.c``) and inherit their sockets, already connected to the server
under test, from the scenario; each prints one JSON line of counts.

* ``udpload.c``, built with the system C compiler into a temporary folder
  when the scenario starts: sendmmsg / recvmmsg, up to 64 datagrams a
  system call. The one the figures are measured with.
* This module's :func:`main` (``python -m bench.loadgen``), the fallback
  when there is no compiler: one ``send`` per datagram, so it caps near
  100,000 datagrams/s per core, below coturn; the results say which ran.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Generator", "GeneratorRun", "Spec", "find_generator", "main"]

SOURCE = Path(__file__).resolve().parent / "udpload.c"
ROOT = Path(__file__).resolve().parents[2]
_BATCH = 64
_BUFFER_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class Spec:
    """What one generator process does: send ``data`` on each socket of
    ``send`` (connected), count what arrives on each of ``receive``."""

    send: tuple[socket.socket, ...]
    data: bytes
    receive: tuple[socket.socket, ...]


@dataclass(frozen=True)
class GeneratorRun:
    """The counts of one run over every process."""

    sent: int
    received: int
    send_errors: int
    elapsed_s: float

    @property
    def loss(self) -> float:
        return 1.0 - self.received / self.sent if self.sent else 1.0

    @property
    def received_per_s(self) -> float:
        return self.received / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def offered_per_s(self) -> float:
        return self.sent / self.elapsed_s if self.elapsed_s > 0 else 0.0


@dataclass(frozen=True)
class Generator:
    """How to start a generator process: ``command`` then the arguments."""

    command: tuple[str, ...]
    name: str
    """``C (sendmmsg/recvmmsg)`` or ``Python (one sendto per datagram)``."""
    cpu: int | None

    def run(self, specs: list[Spec], rate: float, duration: float,
            drain: float = 0.3) -> GeneratorRun:
        """One process per spec, started together, ``rate`` split evenly
        between them (0: each as fast as it can); bounded by ``duration``
        plus a margin."""
        procs: list[subprocess.Popen[str]] = []
        try:
            for spec in specs:
                fds = [s.fileno() for s in (*spec.send, *spec.receive)]
                args = [*(f"s:{s.fileno()}:{spec.data.hex()}" for s in spec.send),
                        *(f"r:{s.fileno()}" for s in spec.receive)]
                command = [*self.command, f"{rate / len(specs):.1f}", f"{duration:g}",
                           f"{drain:g}", *args]
                if self.cpu is not None and shutil.which("taskset"):
                    command = ["taskset", "-c", str(self.cpu), *command]
                procs.append(subprocess.Popen(
                    command, pass_fds=fds, stdout=subprocess.PIPE, text=True, cwd=ROOT,
                    env=dict(os.environ, PYTHONPATH=str(ROOT))))
            counts = []
            for proc in procs:
                out, _ = proc.communicate(timeout=duration + drain + 30)
                if proc.returncode != 0:
                    raise RuntimeError(f"load generator failed ({proc.returncode})")
                counts.append(json.loads(out.strip().splitlines()[-1]))
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        return GeneratorRun(
            sent=sum(c["sent"] for c in counts), received=sum(c["received"] for c in counts),
            send_errors=sum(c["send_errors"] for c in counts),
            elapsed_s=max(c["elapsed_s"] for c in counts))


def find_generator(build_dir: Path, cpu: int | None) -> Generator:
    """The C generator built into ``build_dir``, or the Python one when
    there is no C compiler (or the build fails)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is not None:
        binary = build_dir / "udpload"
        done = subprocess.run([cc, "-O2", "-Wall", "-o", str(binary), str(SOURCE)],
                              capture_output=True, text=True, timeout=60)
        if done.returncode == 0:
            return Generator((str(binary),), "C (sendmmsg/recvmmsg)", cpu)
    return Generator((sys.executable, "-m", "bench.loadgen"),
                     "Python (one sendto per datagram; no C compiler)", cpu)


def main(argv: list[str] | None = None) -> int:
    """The Python generator: ``udpload.c``'s command line and output."""
    args = sys.argv[1:] if argv is None else argv
    rate, duration, drain = float(args[0]), float(args[1]), float(args[2])
    senders: list[tuple[socket.socket, bytes]] = []
    receivers: list[socket.socket] = []
    for spec in args[3:]:
        kind, fd, *rest = spec.split(":")
        sock = socket.socket(fileno=int(fd))
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF if kind == "r" else socket.SO_SNDBUF,
                        _BUFFER_BYTES)
        if kind == "s":
            senders.append((sock, bytes.fromhex(rest[0])))
        else:
            receivers.append(sock)
    sent = received = errors = 0

    def read() -> int:
        nonlocal received
        got = 0
        for sock in receivers:
            for _ in range(16 * _BATCH):
                try:
                    sock.recv(2048)
                except OSError:
                    break
                got += 1
        received += got
        return got

    start = time.monotonic()
    end = start + duration
    now = start
    turn = 0
    while now < end:
        due = int(rate * (now - start)) - (sent + errors) if rate > 0 else _BATCH
        if due > 0:
            sock, data = senders[turn % len(senders)]
            turn += 1
            for _ in range(min(due, _BATCH)):
                try:
                    sock.send(data)
                    sent += 1
                except OSError:
                    errors += 1
        if read() == 0 and due <= 0:
            select.select(receivers, [], [], 0.001)
        now = time.monotonic()
    elapsed = now - start
    stop = time.monotonic() + drain
    while time.monotonic() < stop:
        if read() == 0:
            select.select(receivers, [], [], 0.01)
    print(json.dumps({"sent": sent, "received": received, "send_errors": errors,
                      "elapsed_s": elapsed}), flush=True)
    return 0
