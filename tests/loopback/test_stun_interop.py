"""The STUN responder on loopback, against third-party clients.

A small thread-and-socket driver serves :func:`rendezvous.stun.answer_stun`
on 127.0.0.1:P, 127.0.0.1:P+1, 127.0.0.2:P and 127.0.0.2:P+1 (all of 127/8 is
loopback on Linux), so RFC 5780 and RFC 3489 change requests really come
back from another address and port. Clients: dtx's own codec, pystun3
(RFC 3489) and, when Debian's coturn is installed, turnutils_stunclient.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import selectors
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator

import pytest
import stun as pystun3  # type: ignore[import-untyped]

from dtx.wire.stun import binding_request, decode_stun
from rendezvous.stun import ServerAddresses, answer_stun

PRIMARY_IP = "127.0.0.1"
ALT_IP = "127.0.0.2"
CLIENT_TIMEOUT = 30.0  # whole-client deadline; answers normally take milliseconds


class LoopbackStunServer:
    """Serves :func:`answer_stun` on every address of ``ServerAddresses.sockets()``."""

    def __init__(self, addresses: ServerAddresses) -> None:
        self.addresses = addresses
        self.socks: dict[tuple[str, int], socket.socket] = {}
        self.received = 0
        self.answered = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="stun-responder", daemon=True)

    @classmethod
    def open(cls) -> LoopbackStunServer:
        """Bind P and P+1 on both IPs, retrying a few ports if taken."""
        for _ in range(20):
            probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            probe.bind((PRIMARY_IP, 0))
            port = probe.getsockname()[1]
            probe.close()
            if port >= 65535:
                continue
            server = cls(ServerAddresses((PRIMARY_IP, port), ALT_IP, port + 1))
            try:
                for addr in server.addresses.sockets():
                    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    server.socks[addr] = sock
                    sock.bind(addr)
            except OSError:
                server.close()
                continue
            server._thread.start()
            return server
        raise RuntimeError("no free port pair on 127.0.0.1 and 127.0.0.2")

    def _serve(self) -> None:
        with selectors.DefaultSelector() as sel:
            for addr, sock in self.socks.items():
                sock.setblocking(False)
                sel.register(sock, selectors.EVENT_READ, addr)
            while not self._stop.is_set():
                for key, _ in sel.select(timeout=0.05):
                    local: tuple[str, int] = key.data
                    try:
                        data, src = self.socks[local].recvfrom(2048)
                    except BlockingIOError:
                        continue
                    self.received += 1
                    reply = answer_stun(
                        data, src=src, local=local, addresses=self.addresses, software="dtx-test"
                    )
                    if reply is not None:
                        # counted before sending, so a client that has its
                        # answer always sees the count include it
                        self.answered += 1
                        self.socks[reply.send_from].sendto(reply.data, reply.send_to)

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        for sock in self.socks.values():
            sock.close()


@pytest.fixture
def server() -> Iterator[LoopbackStunServer]:
    try:
        srv = LoopbackStunServer.open()
    except OSError as exc:
        pytest.skip(f"needs 127.0.0.2 usable as a loopback address: {exc}")
    try:
        yield srv
    finally:
        srv.close()


def _free_port(ip: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((ip, 0))
        return int(sock.getsockname()[1])


def _ask(
    client: socket.socket, server: tuple[str, int], request: bytes
) -> tuple[bytes, tuple[str, int]]:
    client.sendto(request, server)
    data, src = client.recvfrom(2048)
    return data, src


@pytest.mark.parametrize(
    ("change_ip", "change_port"), [(False, False), (True, False), (False, True), (True, True)]
)
def test_dtx_client_rfc5780(server: LoopbackStunServer, change_ip: bool, change_port: bool) -> None:
    port = server.addresses.primary[1]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.bind((PRIMARY_IP, 0))
        client.settimeout(5)
        tid = os.urandom(12)
        req = binding_request(tid, change_ip=change_ip, change_port=change_port)
        data, src = _ask(client, (PRIMARY_IP, port), req)
        msg = decode_stun(data)
        assert msg.transaction_id == tid
        assert msg.has_fingerprint
        assert msg.xor_mapped_address == client.getsockname()
        want = (ALT_IP if change_ip else PRIMARY_IP, port + 1 if change_port else port)
        assert src == want
        assert msg.response_origin == want
        assert msg.other_address == (ALT_IP, port + 1)


def test_pystun3_open_internet(server: LoopbackStunServer) -> None:
    port = server.addresses.primary[1]
    source_port = _free_port(PRIMARY_IP)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(
            pystun3.get_ip_info,
            source_ip=PRIMARY_IP,
            source_port=source_port,
            stun_host=PRIMARY_IP,
            stun_port=port,
        )
        nat_type, external_ip, external_port = future.result(timeout=CLIENT_TIMEOUT)
    assert (nat_type, external_ip, external_port) == (
        pystun3.OpenInternet,
        PRIMARY_IP,
        source_port,
    )
    # test I, then test II with change IP and port: two answers
    assert server.answered == 2


def test_pystun3_sees_classic_attributes(server: LoopbackStunServer) -> None:
    port = server.addresses.primary[1]
    pystun3._initialize()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((PRIMARY_IP, 0))
        sock.settimeout(5)
        result = pystun3.stun_test(sock, PRIMARY_IP, port, PRIMARY_IP, sock.getsockname()[1])
        assert result == {
            "Resp": True,
            "ExternalIP": PRIMARY_IP,
            "ExternalPort": sock.getsockname()[1],
            "SourceIP": PRIMARY_IP,
            "SourcePort": port,
            "ChangedIP": ALT_IP,
            "ChangedPort": port + 1,
        }


def test_coturn_stunclient(server: LoopbackStunServer) -> None:
    exe = shutil.which("turnutils_stunclient")
    if exe is None:
        pytest.skip("needs turnutils_stunclient from Debian's coturn package (scripts/setup installs it as root)")
    port = server.addresses.primary[1]
    proc = subprocess.run(
        [exe, "-f", "-L", PRIMARY_IP, "-p", str(port), PRIMARY_IP],
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    # three rounds: plain; change IP+port with RESPONSE-PORT (its port+1);
    # change IP+port with PADDING, from that second socket
    assert "RFC 5780 response 3" in out, out
    assert "error" not in out.lower(), out
    reflexive = [int(p) for p in re.findall(r"UDP reflexive addr: 127\.0\.0\.1:(\d+)", out)]
    assert len(reflexive) == 3, out
    assert reflexive[1] == reflexive[0]
    assert reflexive[2] == reflexive[0] + 1
    origins = re.findall(r"Response origin: : ([\d.]+:\d+)", out)
    assert origins[0] == f"{PRIMARY_IP}:{port}", out
    assert origins[-1] == f"{ALT_IP}:{port + 1}", out
    assert f"Other addr: : {ALT_IP}:{port + 1}" in out, out
    assert server.answered == 3
