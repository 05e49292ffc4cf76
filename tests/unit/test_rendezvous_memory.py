"""What the rendezvous keeps per registered device, measured with tracemalloc.

The target (the speed issue's item for ``bench/scenarios/load.py``'s
``bytes_per_device``) is at most 2 kB of server RSS per registered device.
RSS is more than what tracemalloc sees: pymalloc hands out memory in 4 kB
pools and 256 kB arenas, so partly used pools and the freed garbage of each
datagram (the decoded message, the reply) stay resident, and the
interpreter's own caches grow a little. In-process, with the setup below
and 10,000 devices, RSS grew 2,868 B per device where tracemalloc counted
2,582 B (about 10% more), and the bench's figure was 2,912 B; so the traced
bound here is 2 kB less a 15% margin for that slack.

The devices register as the bench's do, through the real core and the
server's key source: each from its own source address (a fresh address
tuple per datagram, as a socket returns it; 250 IPs), HELLO then REGISTER,
each of its own account with a vCard in a folder (``VCardDirectory``, the
server's ``--vcards``). Deterministic: the clock does not move, and the
measured figure does not depend on timing.
"""

from __future__ import annotations

import gc
import random
import tracemalloc
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ed25519

from dtx.trust.store import VCardDirectory
from dtx.trust.vcard import add_key, new_vcard
from dtx.wire.control import MessageType, decode_control, encode_hello, encode_register
from rendezvous.core import RendezvousConfig, RendezvousCore
from rendezvous.stun import ServerAddresses

SERVER = ("198.51.100.1", 3478)
DEVICES = 2000
SOURCE_IPS = 250
RSS_TARGET_BYTES = 2048
TRACED_BOUND_BYTES = RSS_TARGET_BYTES * 85 // 100
NOW = 1000.0


def _source(i: int) -> tuple[str, int]:
    """Device ``i``'s address, as a new tuple (of a new string and a new
    int), as each datagram from a socket brings it."""
    return (f"203.0.113.{1 + i % SOURCE_IPS}", int(str(20000 + i)))


def test_a_registered_device_costs_under_2_kb(tmp_path: Path) -> None:
    keys = [ed25519.Ed25519PrivateKey.generate() for _ in range(DEVICES)]
    publics = [key.public_key().public_bytes_raw() for key in keys]
    for i, public in enumerate(publics):
        bare = f"dev{i}@load.example"
        (tmp_path / f"{bare}.xml").write_bytes(add_key(new_vcard(bare), public))
    core = RendezvousCore(keys=VCardDirectory(tmp_path), addresses=ServerAddresses(SERVER),
                          config=RendezvousConfig(), secret=b"s" * 32, rng=random.Random(1))
    hellos = [encode_hello(i.to_bytes(8, "big")) for i in range(DEVICES)]
    registers = [
        encode_register(txid=i.to_bytes(8, "big"), jid=f"dev{i}@load.example/d", key=publics[i],
                        challenge=core.make_challenge(_source(i), NOW), candidates=(),
                        sign=keys[i].sign)
        for i in range(DEVICES)
    ]
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(DEVICES):
            core.receive_datagram(hellos[i], _source(i), SERVER, NOW)
            core.datagrams_to_send()
            core.receive_datagram(registers[i], _source(i), SERVER, NOW)
            (reply, _, _), = core.datagrams_to_send()
            assert decode_control(reply).type == MessageType.REGISTERED
        del reply
        gc.collect()
        per_device = (tracemalloc.get_traced_memory()[0] - before) / DEVICES
    finally:
        tracemalloc.stop()
    assert core.statistics()["registrations"] == DEVICES
    assert per_device < TRACED_BOUND_BYTES, f"{per_device:.0f} B per registered device"
