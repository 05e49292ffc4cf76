"""First-byte demultiplexing (RFC 9443) with real STUN and aioquic packets."""

from __future__ import annotations

import datetime

import pytest
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import HandshakeCompleted
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from dtx.wire.demux import DTX_FIRST_BYTE_MAX, DTX_FIRST_BYTE_MIN, PacketKind, classify
from dtx.wire.stun import binding_request

CLIENT_ADDR = ("192.0.2.10", 40000)
SERVER_ADDR = ("198.51.100.20", 4433)
NOW = 1000.0


def expected_kind(first: int) -> PacketKind:
    """The RFC 9443 table written out range by range, independently of demux.py."""
    if 0 <= first <= 3:
        return PacketKind.STUN
    if 16 <= first <= 19:
        return PacketKind.DTX
    if 64 <= first <= 127 or 192 <= first <= 255:
        return PacketKind.QUIC
    return PacketKind.UNKNOWN  # 4..15, 20..63, 128..191


@pytest.mark.parametrize("first", range(256))
def test_every_first_byte(first: int) -> None:
    assert classify(bytes([first]) + bytes(30)) == expected_kind(first)


def test_dtx_range_is_disjoint_from_stun_and_quic() -> None:
    assert (DTX_FIRST_BYTE_MIN, DTX_FIRST_BYTE_MAX) == (16, 19)
    for first in range(DTX_FIRST_BYTE_MIN, DTX_FIRST_BYTE_MAX + 1):
        assert not first & 0x40  # never a QUIC packet with the fixed bit set
        assert first > 3  # never STUN


def test_empty_datagram() -> None:
    assert classify(b"") == PacketKind.UNKNOWN


def test_stun_requests() -> None:
    assert classify(binding_request(bytes(12))) == PacketKind.STUN
    assert classify(binding_request(bytes(16), change_ip=True)) == PacketKind.STUN


def _certificate() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dtx.test")])
    start = datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=36500))
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _pair() -> tuple[QuicConnection, QuicConnection]:
    cert, key = _certificate()
    client = QuicConnection(
        configuration=QuicConfiguration(is_client=True, server_name="dtx.test", verify_mode=0)
    )
    server_conf = QuicConfiguration(is_client=False)
    server_conf.certificate = cert
    server_conf.private_key = key
    server = QuicConnection(
        configuration=server_conf,
        original_destination_connection_id=client.original_destination_connection_id,
    )
    return client, server


def _drain_events(conn: QuicConnection) -> bool:
    done = False
    for _ in range(1000):
        event = conn.next_event()
        if event is None:
            break
        done = done or isinstance(event, HandshakeCompleted)
    return done


def test_aioquic_packets_classify_as_quic() -> None:
    client, server = _pair()
    client.connect(SERVER_ADDR, now=NOW)
    initial = client.datagrams_to_send(now=NOW)
    assert initial
    for data, _ in initial:
        assert data[0] & 0x80  # long header
        assert classify(data) == PacketKind.QUIC
    seen_short = []
    client_done = server_done = False
    pending = [(server, d) for d, _ in initial]
    for _ in range(50):  # a handshake takes a handful of flights
        if not pending:
            break
        flights: list[tuple[QuicConnection, bytes]] = []
        for receiver, data in pending:
            sender_addr = CLIENT_ADDR if receiver is server else SERVER_ADDR
            receiver.receive_datagram(data, sender_addr, now=NOW)
        for conn, peer in ((client, server), (server, client)):
            for data, _ in conn.datagrams_to_send(now=NOW):
                assert classify(data) == PacketKind.QUIC
                if not data[0] & 0x80:
                    seen_short.append(data)
                flights.append((peer, data))
        client_done = _drain_events(client) or client_done
        server_done = _drain_events(server) or server_done
        pending = flights
    assert client_done and server_done
    # 1-RTT data goes out in short-header packets
    stream_id = client.get_next_available_stream_id()
    client.send_stream_data(stream_id, b"<presence/>", end_stream=False)
    for data, _ in client.datagrams_to_send(now=NOW):
        if not data[0] & 0x80:
            seen_short.append(data)
    assert seen_short
    for data in seen_short:
        assert data[0] & 0x40  # fixed bit
        assert classify(data) == PacketKind.QUIC
