"""Two devices in one home (one LAN bridge, one NAT), the server 40 ms
beyond the core as in the standard WAN (home↔server RTT 120 ms).

dtx finds the LAN path (host candidates from the rendezvous's
introduction) and carries stanzas host to host; beside it the raw UDP
floor on the LAN, aiortc on the LAN, and today's path: two slixmpp clients
through Prosody on the server host, and the same two clients with the dtx
plugin registered (``xmpp+dtx-lan``, logged in to the account's own
server, started here for them). LAN discovery time is the time a fresh
mDNS browser (``python -m dtx.aio.mdns resolve``, in its own process, as
zeroconf needs) takes to resolve a device that is already announced.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
from pathlib import Path

from dtx.identity import generate_identity
from dtx.lab import STANDARD_WAN, Lab, lab_missing
from dtx.lab.scene import wait_line
from dtx.lab.topology import Host

from .common import Metric, Options, Result
from .lab_common import (PLUGIN, ROOT, TV_BARE, TV_JID, Pair, PluginDevices,
                         alternatives_missing, guarded, guarded_async, measure_webrtc,
                         measure_xmpp, scratch, start_world, udp_rtt)
from .lab_dtx import measure_dtx

logger = logging.getLogger(__name__)

NAME = "lan"
MDNS_TIMEOUT = 10.0


def discovery(a: Host, b: Host, fingerprint: str, count: int) -> list[float]:
    """Seconds for a fresh browser on ``a`` to resolve the device announced
    on ``b``, ``count`` times (the advertiser stays up)."""
    adv = b.popen([sys.executable, "-m", "dtx.aio.mdns", "advertise", "--jid", TV_JID,
                   "--fingerprint", fingerprint, "--port", "41000", "--address", b.ip],
                  cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    samples: list[float] = []
    try:
        wait_line(adv, "announced", "mDNS advertiser")
        for _ in range(count):
            done = a.run([sys.executable, "-m", "dtx.aio.mdns", "resolve", TV_BARE,
                          "--count", "1", "--timeout", str(MDNS_TIMEOUT)],
                         timeout=MDNS_TIMEOUT + 20, cwd=ROOT)
            if done.returncode == 0:
                samples.append(float(json.loads(done.stdout.splitlines()[-1])["seconds"]))
            else:
                logger.warning("mDNS resolve failed: %s", done.stderr[-500:])
    finally:
        adv.terminate()
        adv.wait(timeout=10)
    return samples


def run(opts: Options) -> list[Result]:
    """Measure every LAN system ``opts.runs`` times."""
    reason = lab_missing()
    if reason:
        raise RuntimeError(f"scenario {NAME} {reason}")
    missing = alternatives_missing()
    if missing:
        logger.warning("scenario %s without XMPP and WebRTC: %s", NAME, missing)
    results: list[Result] = []
    with scratch() as tmp, Lab(wan=STANDARD_WAN) as lab:
        opts.progress.step(f"{NAME}: building the lab")
        server = lab.add_server("rdv")
        home = lab.add_lan("h", hosts=2, nat="port-restricted-cone")
        a, b = home.hosts
        lab.up()
        ids = {
            "tv": generate_identity(TV_JID),
            "phone": generate_identity("remote@example.org/phone"),
        }
        plugin = None if PLUGIN in opts.skip else PluginDevices.make("lan", opts.lab_connects)
        world = start_world(lab, server, Path(tmp), ids, alternatives=missing is None,
                            nagle=opts.prosody_nagle,
                            account=plugin.identities if plugin else ())
        pair = Pair("dtx-lan", a, b, "lan")
        for run in range(opts.runs):
            tag = f"{NAME} run {run + 1}/{opts.runs}"

            async def measure(run: int = run, tag: str = tag) -> list[Result]:
                opts.progress.step(f"{tag}: udp-lan rtt x{opts.lab_rtt_samples}")
                samples, lost = await udp_rtt(world, a, b, relay=False, lan=True,
                                              count=opts.lab_rtt_samples,
                                              size=opts.message_bytes)
                out = [Result(scenario=NAME, system="udp-lan", metric=Metric.RTT, run=run,
                              samples=tuple(samples), lost=lost, note="path lan")]
                await guarded_async(opts, f"{tag}: {pair.system}", measure_dtx(
                    world, opts, run, NAME, pair.system, pair.a, pair.b, ids["phone"],
                    pair.expect, out))
                return out

            results += asyncio.run(measure())
            opts.progress.step(f"{tag}: mDNS discovery x{opts.lab_connects}")
            found = discovery(a, b, ids["tv"].fingerprint, opts.lab_connects)
            if found:
                results.append(Result(scenario=NAME, system="mdns", metric=Metric.DISCOVERY,
                                      run=run, samples=tuple(found),
                                      note="fresh browser to the device resolved"))
            if missing is None:
                results += guarded(opts, f"{tag}: xmpp-lan", lambda: measure_xmpp(
                    world, opts, run, NAME, "xmpp-lan", a, b))
                if plugin is not None and world.account_server is not None:
                    results += measure_xmpp(world, opts, run, NAME, f"{PLUGIN}-lan", a, b,
                                            plugin=plugin)
                results += guarded(opts, f"{tag}: webrtc-lan", lambda: measure_webrtc(
                    world, opts, run, NAME, "webrtc-lan", a, b))
    return results


SYSTEMS: tuple[str, ...] = (
    "udp-lan", "dtx-lan", "dtx-lan-ping", "dtx-lan-datagram", "dtx-lan-cold", "webrtc-lan",
    "xmpp-lan", "xmpp-lan-ping", "xmpp-lan-login", "xmpp+dtx-lan", "mdns",
)

DESCRIPTIONS: dict[str, str] = {
    "udp-lan": "raw UDP echo host to host on the LAN (floor of the LAN path)",
    "dtx-lan": "dtx session, `<message/>` echo, two devices in one home (LAN path)",
    "dtx-lan-ping": "dtx session, XEP-0199 ping, LAN path",
    "dtx-lan-datagram": "dtx DATAGRAM channel, stanza echo, LAN path",
    "dtx-lan-cold": "dtx, fresh device: start, register, connect, first stanza (same home)",
    "webrtc-lan": "aiortc data channel, two devices in one home",
    "xmpp-lan": "two slixmpp clients in one home through Prosody 40 ms beyond the core",
    "xmpp-lan-ping": "slixmpp XEP-0199 ping to the other client, through Prosody",
    "xmpp-lan-login": "slixmpp login alone (TCP, SASL PLAIN, bind)",
    "xmpp+dtx-lan": "the same two slixmpp clients with the dtx plugin registered, "
                    "`<message/>` echo over its session, two devices in one home",
    "mdns": "LAN discovery: a fresh mDNS browser resolves the announced device",
}
