"""The rendezvous server's sockets: :class:`~rendezvous.udp.ServerSocket`,
one per bound address, read in batches and answered once per batch (and,
on a loop without ``add_reader``, through a datagram transport)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dtx.wire.stun import binding_request, decode_stun
from rendezvous.server import Server, serve

from .conftest import BOTH_LOOPS

pytestmark = BOTH_LOOPS

DEADLINE = 10.0  # for all answers; on loopback they take milliseconds
BURST = 300  # more than one batch (256), well within the server's receive buffer


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    srv = await serve(("127.0.0.1", 0), vcards=tmp_path)
    try:
        yield srv
    finally:
        srv.close()
        await srv.wait_closed()


def client() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    return sock


async def answers(sock: socket.socket, count: int) -> list[bytes]:
    loop = asyncio.get_running_loop()
    got: list[bytes] = []
    async with asyncio.timeout(DEADLINE):
        while len(got) < count:
            got.append(await loop.sock_recv(sock, 2048))
    return got


async def test_every_datagram_of_a_burst_is_answered_once(server: Server) -> None:
    with client() as sock:
        txids = [i.to_bytes(12, "big") for i in range(BURST)]
        for txid in txids:
            sock.sendto(binding_request(txid), server.address)
        replies = [decode_stun(data) for data in await answers(sock, BURST)]
        assert sorted(r.transaction_id for r in replies) == txids
        assert {r.xor_mapped_address for r in replies} == {sock.getsockname()}
    stats = server.statistics()
    assert stats["stun_answers"] == BURST
    assert stats["socket_errors"] == 0


async def test_a_reply_that_cannot_be_sent_is_counted_not_raised(server: Server) -> None:
    loop = asyncio.get_running_loop()
    # A source the socket may not send to (broadcast, no SO_BROADCAST): the
    # core answers it; the send fails at the end of the next batch.
    server.core.receive_datagram(binding_request(bytes(12)), ("255.255.255.255", 3478),
                                 server.address, loop.time())
    with client() as sock:
        sock.sendto(binding_request(b"\x01" * 12), server.address)
        (reply,) = await answers(sock, 1)
        assert decode_stun(reply).transaction_id == b"\x01" * 12
    stats = server.statistics()
    assert stats["stun_answers"] == 2
    assert stats["socket_errors"] == 1
    assert stats.get("internal_errors", 0) == 0


async def test_close_stops_every_socket_and_is_idempotent(tmp_path: Path) -> None:
    srv = await serve(("127.0.0.1", 0), vcards=tmp_path)
    address = srv.address
    srv.close()
    srv.close()
    await asyncio.wait_for(srv.wait_closed(), DEADLINE)
    # The port is free again: nothing holds it.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as again:
        again.bind(address)


async def test_a_loop_without_add_reader_serves_by_transport(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The proactor loop's case: no ``add_reader``, a datagram transport
    instead; a burst is answered all the same."""
    loop = asyncio.get_running_loop()

    def no_reader(*_: object) -> None:
        raise NotImplementedError

    monkeypatch.setattr(loop, "add_reader", no_reader)
    srv = await serve(("127.0.0.1", 0), vcards=tmp_path)
    monkeypatch.undo()  # the server has chosen; the test's own reads need a reader
    try:
        with client() as sock:
            txids = [i.to_bytes(12, "big") for i in range(20)]
            for txid in txids:
                sock.sendto(binding_request(txid), srv.address)
            replies = [decode_stun(data) for data in await answers(sock, len(txids))]
            assert sorted(r.transaction_id for r in replies) == txids
        assert srv.statistics()["stun_answers"] == len(txids)
    finally:
        srv.close()
        await srv.wait_closed()
