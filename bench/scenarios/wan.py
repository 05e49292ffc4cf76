"""The standard WAN scenario in the NAT lab: two homes 20 ms one way from
the core each, the server 40 ms beyond it (home↔home RTT 80 ms,
home↔server 120 ms).

Homes ``a`` and ``b`` sit behind port-restricted-cone NATs (a punchable
pair: dtx ends on the direct path); home ``c`` behind a symmetric NAT (with
``b``, relay-only). dtx reaches the TV through the dtx rendezvous
(``dtx-direct``, ``dtx-relay``) and, on the same two pairs, through the
account's own XMPP server with no rendezvous (``dtx-xmpp-direct``,
``dtx-xmpp-relay``: Jingle, STUN and TURN from the server by XEP-0215, the
relay is coturn). Beside dtx on each path: the raw UDP floor on the same
path, two slixmpp clients through Prosody on the server host (the path a
stanza takes today), and aiortc data channels (ICE with the rendezvous's
STUN, coturn's TURN where punching fails). The two slixmpp clients again
with the dtx plugin registered (``xmpp+dtx-direct``, ``xmpp+dtx-relay``,
logged in to the account's own server): the first message through the
server while the plugin makes the session, the rest over it. Needs root;
the XMPP and WebRTC systems, dtx over XMPP among them, also need Prosody,
coturn and aiortc (they are left out, with a warning, when missing).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from dtx.identity import generate_identity
from dtx.lab import STANDARD_WAN, Lab, LinkSpec, WanProfile, lab_missing, ns

from .common import Metric, Options, Result
from .lab_common import (PLUGIN, TV_BARE, TV_JID, Pair, PluginDevices, alternatives_missing,
                         guarded, guarded_async, measure_webrtc, measure_xmpp, scratch,
                         start_world, udp_rtt)
from .lab_dtx import measure_dtx, measure_dtx_send, measure_dtx_xmpp

logger = logging.getLogger(__name__)

NAME = "wan"


def lossy(wan: WanProfile, loss: float) -> WanProfile:
    """``wan`` with ``loss`` on every link to the core (each direction)."""
    def with_loss(spec: LinkSpec | None, seed: int) -> LinkSpec:
        base = spec or LinkSpec()
        return LinkSpec(delay=base.delay, jitter=base.jitter, loss=loss, seed=seed)
    return WanProfile(home=with_loss(wan.home, 1), server=with_loss(wan.server, 2),
                      public=with_loss(wan.public, 3))


def run_wan(opts: Options, name: str, wan: WanProfile) -> list[Result]:
    """Build the lab for ``wan`` and measure every system ``opts.runs`` times."""
    reason = lab_missing()
    if reason:
        raise RuntimeError(f"scenario {name} {reason}")
    missing = alternatives_missing()
    if missing:
        logger.warning("scenario %s without XMPP and WebRTC: %s", name, missing)
    results: list[Result] = []
    with scratch() as tmp, Lab(wan=wan) as lab:
        opts.progress.step(f"{name}: building the lab")
        server = lab.add_server("rdv")
        a = lab.add_home("a", nat="port-restricted-cone").hosts[0]
        b = lab.add_home("b", nat="port-restricted-cone").hosts[0]
        c = lab.add_home("c", nat="symmetric").hosts[0]
        lab.up()
        ids = {
            "tv": generate_identity(TV_JID),
            "phone": generate_identity("remote@example.org/phone"),
            "tablet": generate_identity("remote@example.org/tablet"),
        }
        pairs = [Pair("dtx-direct", a, b, "direct"), Pair("dtx-relay", c, b, "relay")]
        # The TV's other devices on its own account, one per connection.
        xmpp_pairs = [Pair("dtx-xmpp-direct", a, b, "direct"),
                      Pair("dtx-xmpp-relay", c, b, "relay")]
        callers = {p.system: [generate_identity(f"{TV_BARE}/{p.system}-{i}")
                              for i in range(opts.lab_connects)] for p in xmpp_pairs}
        # The slixmpp clients with the plugin, on the same two pairs.
        plugins = [] if PLUGIN in opts.skip else [
            (f"{PLUGIN}-{p.expect}", p.a, p.b, PluginDevices.make(p.expect, opts.lab_connects))
            for p in pairs]
        world = start_world(lab, server, Path(tmp), ids, alternatives=missing is None,
                            nagle=opts.prosody_nagle,
                            account=[ids["tv"], *(d for ds in callers.values() for d in ds),
                                     *(d for *_, devs in plugins for d in devs.identities)])
        for run in range(opts.runs):
            tag = f"{name} run {run + 1}/{opts.runs}"

            async def measure(run: int = run, tag: str = tag) -> list[Result]:
                out: list[Result] = []
                for system, relay, x, y in (("udp-direct", False, a, b),
                                            ("udp-relay", True, c, b)):
                    opts.progress.step(f"{tag}: {system} rtt x{opts.lab_rtt_samples}")
                    packets: list[float] = []
                    samples, lost = await udp_rtt(world, x, y, relay=relay,
                                                  count=opts.lab_rtt_samples,
                                                  size=opts.message_bytes, packets=packets)
                    out.append(Result(scenario=name, system=system, metric=Metric.PACKETS,
                                      run=run, samples=(packets[0],),
                                      note="path " + ("relay" if relay else "direct")))
                    out.append(Result(scenario=name, system=system, metric=Metric.RTT,
                                      run=run, samples=tuple(samples), lost=lost,
                                      note="path " + ("relay" if relay else "direct")))
                for pair, key in zip(pairs, ("phone", "tablet")):
                    await guarded_async(opts, f"{tag}: {pair.system}", measure_dtx(
                        world, opts, run, name, pair.system, pair.a, pair.b, ids[key],
                        pair.expect, out))
                await guarded_async(opts, f"{tag}: dtx-send-cold", measure_dtx_send(
                    world, opts, run, name, "dtx-send-cold", a, b, ids["phone"], out))
                return out

            results += asyncio.run(measure())
            if world.account_server is not None:
                # One event loop in the caller's home: see measure_dtx_xmpp.
                out: list[Result] = []
                guarded(opts, f"{tag}: dtx over XMPP", lambda: ns.in_netns(
                    a.netns, lambda: asyncio.run(measure_dtx_xmpp(
                        world, opts, run, name, xmpp_pairs, callers, out))))
                results += out
            if missing is None:
                results += guarded(opts, f"{tag}: xmpp", lambda: measure_xmpp(
                    world, opts, run, name, "xmpp", a, b))
                for system, x, y, devices in plugins if world.account_server else ():
                    results += measure_xmpp(world, opts, run, name, system, x, y,
                                            plugin=devices)
                results += guarded(opts, f"{tag}: webrtc-direct", lambda: measure_webrtc(
                    world, opts, run, name, "webrtc-direct", a, b))
                results += guarded(opts, f"{tag}: webrtc-relay", lambda: measure_webrtc(
                    world, opts, run, name, "webrtc-relay", c, b))
    return results


def run(opts: Options) -> list[Result]:
    """The standard WAN, no loss."""
    return run_wan(opts, NAME, STANDARD_WAN)


SYSTEMS: tuple[str, ...] = (
    "udp-direct", "dtx-direct", "dtx-direct-ping", "dtx-direct-datagram", "dtx-direct-cold",
    "dtx-send-cold",
    "dtx-xmpp-direct", "webrtc-direct", "udp-relay", "dtx-relay", "dtx-relay-ping",
    "dtx-relay-datagram", "dtx-relay-cold", "dtx-xmpp-relay", "webrtc-relay", "xmpp",
    "xmpp-ping", "xmpp-login", "xmpp+dtx-direct", "xmpp+dtx-relay",
)

DESCRIPTIONS: dict[str, str] = {
    "udp-direct": "raw UDP echo, punched through both NATs (floor of the direct path)",
    "udp-relay": "raw UDP echo through a bare forwarder on the server host (floor of the relay path)",
    "dtx-direct": "dtx session, `<message/>` echo, punchable pair (direct path)",
    "dtx-direct-ping": "dtx session, XEP-0199 ping, direct path",
    "dtx-direct-datagram": "dtx DATAGRAM channel, stanza echo, direct path",
    "dtx-direct-cold": "dtx, fresh device: start, register, connect, first stanza (punchable pair)",
    "dtx-send-cold": "`dtx send` as a script runs it: process start (Python, imports), register, "
                     "connect by JID, first stanza at the TV (punchable pair)",
    "dtx-relay": "dtx session, `<message/>` echo, relay-only pair (symmetric NAT)",
    "dtx-relay-ping": "dtx session, XEP-0199 ping, relay path",
    "dtx-relay-datagram": "dtx DATAGRAM channel, stanza echo, relay path",
    "dtx-relay-cold": "dtx, fresh device: start, register, connect, first stanza (relay-only pair)",
    "dtx-xmpp-direct": "dtx session signalled through the account's own XMPP server (Jingle; "
                       "STUN and TURN by XEP-0215; no rendezvous), devices logged in, "
                       "`<message/>` echo, punchable pair",
    "dtx-xmpp-relay": "dtx session signalled through the account's own XMPP server, devices "
                      "logged in, `<message/>` echo, relay-only pair (coturn's TURN relay)",
    "webrtc-direct": "aiortc data channel, punchable pair (ICE, rendezvous STUN)",
    "webrtc-relay": "aiortc data channel, relay-only pair (coturn TURN)",
    "xmpp": "two slixmpp clients through Prosody on the server host, `<message/>` echo",
    "xmpp-ping": "slixmpp XEP-0199 ping to the other client, through Prosody",
    "xmpp-login": "slixmpp login alone (TCP, SASL PLAIN, bind)",
    "xmpp+dtx-direct": "the same two slixmpp clients with the dtx plugin registered, "
                       "`<message/>` echo over its session, punchable pair",
    "xmpp+dtx-relay": "the same two slixmpp clients with the dtx plugin registered, "
                      "`<message/>` echo over its session, relay-only pair (coturn's relay)",
}
