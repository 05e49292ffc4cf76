"""The demo: a remote control and a TV exchange stanzas over dtx.

Run with ``python -m dtx.demo`` (the README's first command). Everything is
made in a temporary folder: two device keys, a vCard folder listing them
(the embedded default trust source), and two peers on loopback, each with
its own UDP socket. It prints what happens, step by step, with timings.
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
from .identity import generate_identity, load_identity, save_identity
from .trust import PinStore, VCardDirectory, Verifier, add_key, new_vcard


def _say(text: str) -> None:
    print(text, flush=True)


async def run_demo(workdir: Path, pings: int) -> None:
    tv_key, remote_key = workdir / "tv.key", workdir / "remote.key"
    vcards = workdir / "vcards"
    vcards.mkdir()
    for jid, path in (("tv@example.org/living-room", tv_key),
                      ("remote@example.org/phone", remote_key)):
        save_identity(generate_identity(jid), path)
    tv, remote = load_identity(tv_key), load_identity(remote_key)
    for ident in (tv, remote):
        bare = str(ident.jid.bare)
        (vcards / f"{bare}.xml").write_bytes(add_key(new_vcard(bare), ident.public_key))
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
        _say(f"remote sent {stats['stanzas_sent']} stanzas, "
             f"{stats['stanzas_acknowledged']} acknowledged, path: {session.path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dtx.demo", description=__doc__)
    parser.add_argument("--pings", type=int, default=20)
    args = parser.parse_args(argv)
    _say("dtx demo: two devices on loopback (the NAT-lab version needs the "
         "traversal work and root)")
    with tempfile.TemporaryDirectory(prefix="dtx-demo-") as tmp:
        asyncio.run(run_demo(Path(tmp), args.pings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
