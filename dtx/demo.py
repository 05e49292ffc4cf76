"""The demo: a remote control and a TV exchange stanzas over dtx.

Run with ``python -m dtx.demo`` (the README's first command). Everything is
made in a temporary folder: two device keys and a vCard folder listing them
(the embedded default trust source). As root, with the NAT lab's tools, the
two devices sit in two homes behind different kernel NATs with a
rendezvous server 40 ms beyond the core: the remote connects to the TV by
JID, and the demo prints the path and the timings (once for a pair whose
NATs can be punched, once for a pair that needs the relay). Elsewhere it
runs on loopback and says why.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

from . import stanza as st
from .aio.peer import open_peer
from .cliargs import add_loop_option, run_loop
from .identity import generate_identity, load_identity, save_identity
from .errors import LabError
from .lab.scene import start_rendezvous, write_vcards
from .trust import PinStore, VCardDirectory, Verifier


def _say(text: str) -> None:
    print(text, flush=True)


async def run_demo(workdir: Path, pings: int) -> None:
    tv_key, remote_key = workdir / "tv.key", workdir / "remote.key"
    vcards = workdir / "vcards"
    for jid, path in (("tv@example.org/living-room", tv_key),
                      ("remote@example.org/phone", remote_key)):
        save_identity(generate_identity(jid), path)
    tv, remote = load_identity(tv_key), load_identity(remote_key)
    write_vcards(vcards, tv, remote)
    for ident in (tv, remote):
        _say(f"device {ident.jid}: key {ident.fingerprint}")
    _say(f"vCards with both keys in {vcards.name}/ (the trust source)")

    def verifier() -> Verifier:
        return Verifier([VCardDirectory(vcards)], PinStore(None))

    async with open_peer(tv, verifier(), host="127.0.0.1") as tv_peer, \
            open_peer(remote, verifier(), host="127.0.0.1", listen=False) as remote_peer:
        host, port = tv_peer.address
        _say(f"tv listening on udp {host}:{port}")
        loop = asyncio.get_running_loop()
        start = loop.time()
        session = await remote_peer.connect("tv@example.org", tv_peer.address)
        handshake_ms = (loop.time() - start) * 1000
        _say(f"remote -> tv: QUIC handshake done, tv's key checked "
             f"({session.peer_jid}) in {handshake_ms:.1f} ms")
        session.send(st.message("pause", to="tv@example.org"))
        tv_session = await tv_peer.accept()
        got = await tv_session.receive()
        first_ms = (loop.time() - start) * 1000
        _say(f"tv <- {got.get('from')}: <message> body={st.body_of(got)!r} "
             f"(authenticated; {first_ms:.1f} ms after connect was called)")

        tv_session.send(st.presence(status="paused"))
        pres = await session.receive()
        _say(f"remote <- {pres.get('from')}: <presence> status="
             f"{pres.findtext(f'{{{st.NS_CLIENT}}}status')!r}")

        rtts = [await session.ping() * 1000 for _ in range(pings)]
        _say(f"XEP-0199 ping x{pings}: p50 {statistics.median(rtts):.2f} ms, "
             f"max {max(rtts):.2f} ms")

        session.send_datagram(st.message("volume 11", to="tv@example.org"))
        dgram = await tv_session.receive_datagram()
        _say(f"tv <- datagram channel: body={st.body_of(dgram)!r}")

        t0 = time.perf_counter()
        n = 2000
        for i in range(n):
            session.send(st.message(f"step {i}", to="tv@example.org"))
        for _ in range(n):
            await tv_session.receive()
        rate = n / (time.perf_counter() - t0)
        _say(f"{n} stanzas remote -> tv in order: {rate:,.0f} stanzas/s")

        ended = await session.close()
        _say("remote closed the stream gracefully: "
             f"{'every stanza acknowledged' if not ended.unacknowledged else ended}")
        stats = session.statistics()
        _say(f"remote sent {stats.stanzas_sent} stanzas, "
             f"{stats.stanzas_acknowledged} acknowledged, path: {session.path}")


async def lab_pair(lab_host_a: object, lab_host_b: object, vcards: Path,
                   rendezvous: tuple[str, int], tv: object, remote: object) -> dict[str, object]:
    """Connect remote (in home A) to the TV (in home B) by JID; report."""
    from .aio.peer import Peer, PeerConfig

    def make(ident: object, host: object) -> Peer:
        config = PeerConfig(rendezvous=rendezvous, host_addresses=(host.ip,))  # type: ignore[attr-defined]
        return Peer(ident, Verifier([VCardDirectory(vcards)], PinStore(None)), config=config)  # type: ignore[arg-type]

    tv_peer, remote_peer = make(tv, lab_host_b), make(remote, lab_host_a)
    await tv_peer.start(sock=lab_host_b.udp_socket(), listen=True)  # type: ignore[attr-defined]
    await remote_peer.start(sock=lab_host_a.udp_socket(), listen=False)  # type: ignore[attr-defined]
    loop = asyncio.get_running_loop()
    try:
        await tv_peer.wait_registered(10)
        await remote_peer.wait_registered(10)
        start = loop.time()
        session = await remote_peer.connect("tv@example.org", timeout=10)
        session.send(st.message("pause", to="tv@example.org"))
        tv_session = await tv_peer.accept()
        got = await tv_session.receive()
        first_ms = (loop.time() - start) * 1000
        try:
            await session.wait_path("direct", timeout=3.0)
        except TimeoutError:
            pass
        rtts = [await session.ping() * 1000 for _ in range(10)]
        direct = session.direct_after()
        result: dict[str, object] = {
            "body": st.body_of(got),
            "from": got.get("from"),
            "first_stanza_ms": first_ms,
            "path": session.path,
            "direct_after_ms": None if direct is None
            else (session.started_at - start + direct) * 1000,
            "rtt_p50_ms": statistics.median(rtts),
        }
        await session.close()
        return result
    finally:
        await remote_peer.close()
        await tv_peer.close()


def run_lab_demo(workdir: Path, args: argparse.Namespace) -> None:
    from .lab import STANDARD_WAN, Lab

    tv, remote = (generate_identity("tv@example.org/living-room"),
                  generate_identity("remote@example.org/phone"))
    vcards = workdir / "vcards"
    write_vcards(vcards, tv, remote)
    _say("NAT lab: each home 20 ms from the core, the rendezvous 40 ms beyond it "
         "(home-home RTT 80 ms, home-server 120 ms)")
    for nat_a, nat_b in (("port-restricted-cone", "restricted-cone"),
                         ("symmetric", "port-restricted-cone")):
        with Lab(wan=STANDARD_WAN) as lab:
            server = lab.add_server("rdv")
            home_a = lab.add_home("a", nat=nat_a)
            home_b = lab.add_home("b", nat=nat_b)
            lab.up()
            try:
                _, rdv = start_rendezvous(server, vcards)
            except LabError as exc:
                raise SystemExit(str(exc)) from None
            _say(f"\nremote behind {nat_a} ({home_a.public_ip}), "
                 f"tv behind {nat_b} ({home_b.public_ip}), rendezvous {rdv[0]}:{rdv[1]}")
            r = run_loop(args, lab_pair(home_a.hosts[0], home_b.hosts[0], vcards, rdv,
                                          tv, remote))
            _say(f"  tv <- {r['from']}: {r['body']!r}, first stanza "
                 f"{r['first_stanza_ms']:.0f} ms after connect('tv@example.org')")
            if r["direct_after_ms"] is not None:
                _say(f"  hole punched: direct path took over after {r['direct_after_ms']:.0f} ms")
            else:
                _say("  no direct path possible for this pair: the session stays on the relay")
            _say(f"  path: {r['path']}, ping RTT p50 {r['rtt_p50_ms']:.1f} ms")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dtx.demo", description=__doc__)
    parser.add_argument("--pings", type=int, default=20)
    parser.add_argument("--loopback", action="store_true",
                        help="run on loopback even when the NAT lab is available")
    add_loop_option(parser)
    args = parser.parse_args(argv)
    from .lab import lab_missing

    reason = "asked for with --loopback" if args.loopback else lab_missing()
    with tempfile.TemporaryDirectory(prefix="dtx-demo-") as tmp:
        if reason is None:
            _say("dtx demo: two homes behind different NATs, a rendezvous, connect by JID")
            run_lab_demo(Path(tmp), args)
        else:
            _say(f"dtx demo on loopback: the NAT-lab demo needs root ({reason})")
            run_loop(args, run_demo(Path(tmp), args.pings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
