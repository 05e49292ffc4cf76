"""What every scenario shares: its options, its results, its progress line.

A scenario is a module under ``bench.scenarios`` with a function
``run(opts: Options) -> list[Result]``. It measures, and returns raw samples;
summarising and reporting happen elsewhere (``bench.stats``,
``bench.report``), so a scenario never formats a number.
"""

from __future__ import annotations

import enum
import sys
import time
from dataclasses import dataclass, field
from typing import TextIO


class Metric(enum.StrEnum):
    """What a :class:`Result` measured; fixes the unit of its samples."""

    RTT = "rtt"
    """Sequential round trips, seconds each."""
    CONNECT = "connect"
    """From the connect call to the first message delivered, seconds."""
    THROUGHPUT = "throughput"
    """One-way messages per second, one sample per batch."""
    CPU = "cpu_per_message"
    """Process CPU seconds per message (sender and receiver together)."""
    BYTES = "bytes_per_message"
    """Bytes both ends put on the wire per one-way message (headers included)."""
    TAKEOVER = "direct_after"
    """From the session's start until a direct (or LAN) path carried it, seconds."""
    DISCOVERY = "discovery"
    """From a browser's start until it resolved the peer on the LAN, seconds."""
    PACKETS = "packets_per_exchange"
    """UDP datagrams both ends sent per request and answer (raw UDP: 2)."""
    FIRST_MESSAGE = "first_message"
    """From an application's first message to the peer until its echo, both
    logged in, seconds."""


UNITS: dict[Metric, str] = {
    Metric.RTT: "s",
    Metric.CONNECT: "s",
    Metric.THROUGHPUT: "messages/s",
    Metric.CPU: "s",
    Metric.BYTES: "bytes",
    Metric.TAKEOVER: "s",
    Metric.DISCOVERY: "s",
    Metric.FIRST_MESSAGE: "s",
    Metric.PACKETS: "packets",
}


@dataclass(frozen=True, kw_only=True)
class Result:
    """Raw samples of one metric of one system in one run."""

    scenario: str
    system: str
    metric: Metric
    run: int
    samples: tuple[float, ...]
    lost: int = 0
    """Round trips that got no answer (unreliable channels only)."""
    note: str = ""

    @property
    def unit(self) -> str:
        return UNITS[self.metric]


class Progress:
    """A terse progress display on a stream (stderr by default).

    On a terminal, one line is rewritten in place; elsewhere each step gets
    its own line, so logs stay readable.
    """

    def __init__(self, stream: TextIO | None = None, *, enabled: bool = True) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self._enabled = enabled
        self._tty = self._stream.isatty()
        self._start = time.monotonic()
        self._width = 0

    def step(self, text: str) -> None:
        """Show that ``text`` is now being done."""
        if not self._enabled:
            return
        line = f"[{time.monotonic() - self._start:6.1f} s] {text}"
        if self._tty:
            pad = max(0, self._width - len(line))
            self._stream.write("\r" + line + " " * pad)
            self._width = len(line)
        else:
            self._stream.write(line + "\n")
        self._stream.flush()

    def done(self, text: str = "done") -> None:
        self.step(text)
        if self._enabled and self._tty:
            self._stream.write("\n")
            self._stream.flush()


@dataclass(frozen=True, kw_only=True)
class Options:
    """How much to measure. Counts are per run."""

    runs: int = 3
    rtt_samples: int = 2000
    """Sequential round trips per system."""
    stanzas: int = 50_000
    """Messages per one-way throughput batch."""
    burst: int = 64
    """Sends between two yields to the event loop in throughput batches:
    the application keeps calling ``send()`` one message at a time, and
    the event loop gets a turn to put packets on the wire every ``burst``
    calls, as it would in an application that has other work."""
    connects: int = 20
    """Connections opened (one after the other) to time connection setup."""
    message_bytes: int = 200
    timeout: float = 30.0
    """Upper bound on any one phase, so a stuck system cannot hang a run."""
    lab_rtt_samples: int = 100
    """Sequential round trips per system in the NAT-lab scenarios (each
    takes 80 to 250 ms there)."""
    lab_stanzas: int = 5000
    """Messages per one-way batch in the NAT-lab scenarios."""
    lab_connects: int = 5
    """Connections timed per system in the NAT-lab scenarios."""
    trials: int = 50
    """Seeded trials of the ``birthday`` scenario (fresh devices each)."""
    minutes: float = 30.0
    """How long the ``soak`` scenario runs its faults."""
    prosody_nagle: bool = False
    """Run the NAT lab's Prosody servers with Nagle's algorithm on, as
    Prosody ships (``--prosody-nagle``); off by default, as
    docs/xmpp-server.md recommends."""
    skip: tuple[str, ...] = ()
    """Families of systems left out (``--skip``): ``xmpp+dtx``."""
    progress: Progress = field(default_factory=lambda: Progress(enabled=False))

    @classmethod
    def quick(cls, **overrides: object) -> Options:
        """The ``--quick`` preset: one run, small counts."""
        base: dict[str, object] = {
            "runs": 1, "rtt_samples": 300, "stanzas": 10_000, "connects": 5,
            "lab_rtt_samples": 30, "lab_stanzas": 1000, "lab_connects": 2, "trials": 5,
            "minutes": 1.0,
        }
        base.update(overrides)
        return cls(**base)  # type: ignore[arg-type]
