"""Link impairment in user space: delay, jitter, loss, duplication, reordering.

The kernel of the lab machines has no ``tc netem``, so an impaired link is
two TAP devices (one in each namespace it joins) whose file descriptors are
held by one forwarder process. The forwarder reads each Ethernet frame from
one side, decides its fate with :class:`Direction` (a sans-IO scheduler that
takes ``now`` and a seeded ``random.Random``), and writes it to the other
side when its deadline comes. ARP passes through like any other frame.

Run as ``python -m dtx.lab.forwarder --lab PREFIX``: the first line on stdin is
the JSON link table; the forwarder creates the TAP devices inside the named
namespaces, answers ``ready``, then reads one JSON line per link change
(``{"id": n, "spec": {...}}``, answered ``ok``). End of stdin (the lab
closed it, or its owner died) ends the forwarder; the TAP devices vanish
with it.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import heapq
import json
import logging
import os
import random
import select
import struct
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

from dtx.errors import LabError

logger = logging.getLogger(__name__)

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
MAX_FRAME_BYTES = 65536
#: Frames read from one TAP per wake-up, so one busy link cannot starve others.
READ_BURST = 64
#: Frames held at once per direction; more are dropped (a full router queue).
MAX_QUEUED_FRAMES = 10000


@dataclass(frozen=True)
class LinkSpec:
    """Impairment of one link, applied to each direction separately.

    ``delay`` and ``jitter`` are seconds (each frame waits ``delay`` plus a
    uniform draw in ``[-jitter, +jitter]``, never less than zero, and never
    leaves before a frame that came in earlier, unless chosen for
    reordering). ``loss``, ``duplicate`` and ``reorder`` are probabilities;
    a reordered frame skips the delay and overtakes the queue, as netem's
    ``reorder`` does. ``seed`` makes every decision reproducible.
    """

    delay: float = 0.0
    jitter: float = 0.0
    loss: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.delay < 0 or self.jitter < 0:
            raise LabError("delay and jitter cannot be negative")
        for name in ("loss", "duplicate", "reorder"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise LabError(f"{name} must be a probability in [0, 1], not {value}")

    def to_json(self) -> dict[str, Any]:
        """Plain dict for the forwarder's control channel."""
        return asdict(self)

    @staticmethod
    def from_json(data: dict[str, Any]) -> LinkSpec:
        """Inverse of :meth:`to_json`."""
        return LinkSpec(delay=float(data["delay"]), jitter=float(data["jitter"]),
                        loss=float(data["loss"]), duplicate=float(data["duplicate"]),
                        reorder=float(data["reorder"]), seed=int(data["seed"]))


class Direction:
    """Fate of the frames crossing one link in one direction (sans-IO)."""

    def __init__(self, spec: LinkSpec, rng: random.Random) -> None:
        self.spec = spec
        self.rng = rng
        self._last_deadline = 0.0

    def schedule(self, now: float) -> list[float]:
        """Deadlines at which to deliver the frame that arrived at ``now``:
        empty when it is lost, two entries when it is duplicated."""
        spec = self.spec
        if spec.loss and self.rng.random() < spec.loss:
            return []
        copies = 2 if spec.duplicate and self.rng.random() < spec.duplicate else 1
        deadlines = []
        for _ in range(copies):
            if spec.reorder and self.rng.random() < spec.reorder:
                deadlines.append(now)
                continue
            wait = spec.delay
            if spec.jitter:
                wait = max(0.0, wait + self.rng.uniform(-spec.jitter, spec.jitter))
            deadline = max(now + wait, self._last_deadline)
            self._last_deadline = deadline
            deadlines.append(deadline)
        return deadlines


def direction_rng(seed: int, link_id: int, direction: int) -> random.Random:
    """The seeded generator of one direction of one link."""
    return random.Random(f"{seed}/{link_id}/{direction}")


# -- the forwarder process ----------------------------------------------------


def _open_tap(netns: str, ifname: str) -> int:
    from dtx.lab import ns

    def create() -> int:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            ifr = struct.pack("16sH22x", ifname.encode(), IFF_TAP | IFF_NO_PI)
            fcntl.ioctl(fd, TUNSETIFF, ifr)
        except OSError:
            os.close(fd)
            raise
        return fd

    return ns.in_netns(netns, create)


class Forwarder:
    """The forwarding loop: TAP fds in, frames out at their deadlines."""

    def __init__(self, links: list[dict[str, Any]], control_in: int, control_out: Any) -> None:
        self.control_in = control_in
        self.control_out = control_out
        self.peer: dict[int, int] = {}            # fd -> fd it forwards to
        self.direction: dict[int, Direction] = {}  # input fd -> its direction
        self.link_fds: dict[int, tuple[int, int]] = {}
        self.queued: dict[int, int] = {}
        self.heap: list[tuple[float, int, int, bytes]] = []
        self.seq = 0
        self.buffer = b""
        for link in links:
            link_id = int(link["id"])
            spec = LinkSpec.from_json(link["spec"])
            fd_a = _open_tap(link["a"][0], link["a"][1])
            fd_b = _open_tap(link["b"][0], link["b"][1])
            self.link_fds[link_id] = (fd_a, fd_b)
            self.peer[fd_a], self.peer[fd_b] = fd_b, fd_a
            self.direction[fd_a] = Direction(spec, direction_rng(spec.seed, link_id, 0))
            self.direction[fd_b] = Direction(spec, direction_rng(spec.seed, link_id, 1))
            self.queued[fd_a] = self.queued[fd_b] = 0

    def set_spec(self, link_id: int, spec: LinkSpec) -> None:
        """Change one link's impairment; frames already queued keep theirs."""
        fd_a, fd_b = self.link_fds[link_id]
        for index, fd in enumerate((fd_a, fd_b)):
            self.direction[fd] = Direction(spec, direction_rng(spec.seed, link_id, index))

    def _control(self) -> bool:
        data = os.read(self.control_in, 65536)
        if not data:
            return False
        self.buffer += data
        while b"\n" in self.buffer:
            line, _, self.buffer = self.buffer.partition(b"\n")
            msg = json.loads(line)
            self.set_spec(int(msg["id"]), LinkSpec.from_json(msg["spec"]))
            self.control_out.write("ok\n")
            self.control_out.flush()
        return True

    def _receive(self, fd: int, now: float, burst: int = READ_BURST) -> None:
        out = self.peer[fd]
        direction = self.direction[fd]
        for _ in range(burst):
            try:
                frame = os.read(fd, MAX_FRAME_BYTES)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EIO):
                    return
                raise
            for deadline in direction.schedule(now):
                if deadline <= now and not self.heap:
                    self._write(out, frame)
                elif self.queued[fd] < MAX_QUEUED_FRAMES:
                    self.seq += 1
                    self.queued[fd] += 1
                    heapq.heappush(self.heap, (deadline, self.seq, fd, frame))

    def _write(self, fd: int, frame: bytes) -> None:
        try:
            os.write(fd, frame)
        except OSError as exc:  # a full or vanished queue loses the frame, like a wire
            logger.debug("frame dropped on write: %s", exc)

    def run(self) -> None:
        """Forward until the control channel closes."""
        fds = [self.control_in, *self.peer]
        while True:
            now = time.monotonic()
            while self.heap and self.heap[0][0] <= now:
                _, _, src, frame = heapq.heappop(self.heap)
                self.queued[src] -= 1
                self._write(self.peer[src], frame)
            timeout = max(0.0, self.heap[0][0] - now) if self.heap else None
            readable, _, _ = select.select(fds, [], [], timeout)
            now = time.monotonic()
            for fd in readable:
                if fd != self.control_in:
                    self._receive(fd, now)
            if self.control_in in readable:
                # Frames sent before a change was asked for take the old
                # fate: drain every queue before applying the change.
                for fd in self.peer:
                    self._receive(fd, now, burst=MAX_QUEUED_FRAMES)
                if not self._control():
                    return


def _die_with_parent() -> None:
    import ctypes
    import ctypes.util
    import signal

    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the forwarder process."""
    parser = argparse.ArgumentParser(description="TAP-to-TAP link impairment forwarder")
    parser.add_argument("--lab", required=True, help="name prefix of the owning lab")
    args = parser.parse_args(argv)
    _die_with_parent()
    stdin = sys.stdin.buffer.raw.fileno() if hasattr(sys.stdin.buffer, "raw") else 0
    first = b""
    while not first.endswith(b"\n"):
        chunk = os.read(stdin, 65536)
        if not chunk:
            return 1
        first += chunk
    line, _, rest = first.partition(b"\n")
    config = json.loads(line)
    forwarder = Forwarder(config["links"], stdin, sys.stdout)
    forwarder.buffer = rest
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    logger.info("lab %s: forwarding %d links", args.lab, len(config["links"]))
    forwarder.run()
    return 0

