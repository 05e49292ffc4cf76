"""Congestion control that tells random loss from congestion.

NewReno (aioquic's default) halves its window at every loss. On a path
that loses 1 % of packets at random, a WiFi hop or a lossy access line,
that caps a flow at the Mathis bound, about 1.2 packets per round trip
divided by the square root of the loss rate, whatever the path could carry:
600 small stanzas/s on an 80 ms path with four lossy links, fewer than TCP
through an XMPP server gets (Linux's TCP recovers faster). A loss is a sign
of congestion only when it comes with a queue.

:class:`LossTolerantCongestionControl` is NewReno with one change: a loss
event reduces the window only when it looks congestive, the way TCP Veno
(Fu and Liew, 2003) tells the two apart, by the queue the flow has built:

* **delay**: the smallest RTT of the current round trip is above the path's
  minimum (over the last :data:`MIN_RTT_WINDOW` seconds) by at least
  ``clamp(min_rtt / 8, 4 ms, 16 ms)`` (HyStart++'s threshold, RFC 9406):
  packets are waiting in a buffer, so the loss is that buffer overflowing;
* **heavy loss**: at least :data:`HEAVY_LOSS_PACKETS` packets and
  :data:`HEAVY_LOSS_FRACTION` of those of this round trip and the one
  before are lost (a policer, a
  shallow buffer that drops before delay shows);
* **no RTT sample yet**: nothing to judge by, so congestive.

A congestive loss multiplies the window by 0.7 (CUBIC's beta, RFC 9438) and
ends slow start; a random loss changes nothing (the packet is sent again;
slow start goes on). Persistent congestion (RFC 9002 section 7.6) still
drops the window to two packets. Slow start also ends on HyStart's RTT rise,
as aioquic's NewReno. The window grows only while the flow uses at least
half of it, so an application-limited session does not bank a window it
never tested.

The loss record (:attr:`last_loss_time`, the counters) also tells the
connection when to send small packets twice (see
:class:`~dtx.proto.auth.AuthenticatedQuicConnection`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from aioquic.quic.congestion.base import (
    K_MINIMUM_WINDOW,
    QuicCongestionControl,
    QuicRttMonitor,
    register_congestion_control,
)
from aioquic.quic.packet_builder import QuicSentPacket

NAME = "loss-tolerant"
"""The name :func:`register` gives the controller in aioquic's registry."""

BETA = 0.7
"""Window kept after a congestive loss (CUBIC's, RFC 9438 section 4.6)."""

MIN_RTT_WINDOW = 10.0
"""Seconds a minimum RTT sample stands for the path (a path that changes,
relay to direct, is measured afresh within this)."""

QUEUE_MIN = 0.004
QUEUE_MAX = 0.016
"""Bounds of the queueing delay that marks congestion (RFC 9406's
MIN_RTT_THRESH and MAX_RTT_THRESH); between them, an eighth of the minimum
RTT."""

HEAVY_LOSS_PACKETS = 4
HEAVY_LOSS_FRACTION = 0.2
"""A round trip that loses this many packets and this share of its packets
is congested whatever the delay."""


class LossTolerantCongestionControl(QuicCongestionControl):
    """NewReno whose window falls only at congestive losses (see the module)."""

    def __init__(self, *, max_datagram_size: int) -> None:
        super().__init__(max_datagram_size=max_datagram_size)
        self._mss = max_datagram_size
        self._recovery_start = 0.0
        self._stash = 0
        self._rtt_monitor = QuicRttMonitor()
        self._min_rtt = math.inf
        self._min_rtt_at = 0.0
        # One round trip: from ``_round_start`` until a packet sent after it
        # is acknowledged.
        self._round_start = 0.0
        self._round_min_rtt = math.inf
        self._last_round_min_rtt = math.inf
        self._round_acked = 0
        self._round_lost = 0
        self._last_round_acked = 0
        self._last_round_lost = 0
        self._round_peak = 0
        self._last_round_peak = 0
        self.last_loss_time: float | None = None
        """When the latest loss was detected (None: never)."""
        self.packets_lost = 0
        self.losses_random = 0
        """Loss events judged random: the window kept."""
        self.losses_congestive = 0
        """Loss events judged congestive: the window reduced."""

    # -- aioquic's interface ---------------------------------------------------------

    def on_packet_sent(self, *, packet: QuicSentPacket) -> None:
        self.bytes_in_flight += packet.sent_bytes
        if self.bytes_in_flight > self._round_peak:
            self._round_peak = self.bytes_in_flight

    def on_packet_acked(self, *, now: float, packet: QuicSentPacket) -> None:
        self.bytes_in_flight -= packet.sent_bytes
        self._round_acked += 1
        sent = packet.sent_time or 0.0
        if sent >= self._round_start:
            self._new_round(now)
        if sent <= self._recovery_start:
            return
        # Grow only a window the flow has been using.
        if 2 * max(self._round_peak, self._last_round_peak) < self.congestion_window:
            return
        if self.ssthresh is None or self.congestion_window < self.ssthresh:
            self.congestion_window += packet.sent_bytes
        else:
            self._stash += packet.sent_bytes
            count = self._stash // self.congestion_window
            if count:
                self._stash -= count * self.congestion_window
                self.congestion_window += count * self._mss

    def on_packets_expired(self, *, packets: Iterable[QuicSentPacket]) -> None:
        for packet in packets:
            self.bytes_in_flight -= packet.sent_bytes

    def on_packets_lost(self, *, now: float, packets: Iterable[QuicSentPacket]) -> None:
        largest_sent = 0.0
        lost = 0
        for packet in packets:
            self.bytes_in_flight -= packet.sent_bytes
            largest_sent = packet.sent_time or 0.0
            lost += 1
        if not lost:
            return
        self.packets_lost += lost
        self._round_lost += lost
        self.last_loss_time = now
        # One loss event per recovery period, as NewReno.
        if largest_sent <= self._recovery_start:
            return
        self._recovery_start = now
        if self.congestive():
            self.losses_congestive += 1
            self.congestion_window = max(
                int(self.congestion_window * BETA), K_MINIMUM_WINDOW * self._mss
            )
            self.ssthresh = self.congestion_window
        else:
            self.losses_random += 1

    def on_persistent_congestion(self) -> None:
        self.congestion_window = K_MINIMUM_WINDOW * self._mss
        self.ssthresh = self.congestion_window
        self._recovery_start = 0.0

    def on_rtt_measurement(self, *, now: float, rtt: float) -> None:
        if rtt < self._min_rtt or now - self._min_rtt_at > MIN_RTT_WINDOW:
            # An expired minimum is replaced by the best of recent rounds,
            # not by one sample that may carry a queue.
            self._min_rtt = min(rtt, self._round_min_rtt, self._last_round_min_rtt)
            self._min_rtt_at = now
        if rtt < self._round_min_rtt:
            self._round_min_rtt = rtt
        if self.ssthresh is None and self._rtt_monitor.is_rtt_increasing(now=now, rtt=rtt):
            self.ssthresh = self.congestion_window

    def get_log_data(self) -> dict[str, Any]:
        data = super().get_log_data()
        data["losses_random"] = self.losses_random
        data["losses_congestive"] = self.losses_congestive
        return data

    # -- the judgement ---------------------------------------------------------------

    def congestive(self) -> bool:
        """Whether a loss now is a sign of congestion (see the module)."""
        if math.isinf(self._min_rtt):
            return True
        # This round and the one before: a loss is found early in a round.
        lost = self._round_lost + self._last_round_lost
        acked = self._round_acked + self._last_round_acked
        if lost >= HEAVY_LOSS_PACKETS and lost >= HEAVY_LOSS_FRACTION * (lost + acked):
            return True
        rtt = self._round_min_rtt
        if math.isinf(rtt):
            rtt = self._last_round_min_rtt
        if math.isinf(rtt):
            return False
        queue = min(max(self._min_rtt / 8, QUEUE_MIN), QUEUE_MAX)
        return rtt - self._min_rtt >= queue

    def _new_round(self, now: float) -> None:
        self._round_start = now
        self._last_round_min_rtt = self._round_min_rtt
        self._round_min_rtt = math.inf
        self._last_round_acked = self._round_acked
        self._last_round_lost = self._round_lost
        self._round_acked = 0
        self._round_lost = 0
        self._last_round_peak = self._round_peak
        self._round_peak = self.bytes_in_flight


def register() -> None:
    """Make :data:`NAME` known to aioquic (idempotent)."""
    register_congestion_control(NAME, LossTolerantCongestionControl)


register()
