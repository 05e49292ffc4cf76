"""Mutual Ed25519 key authentication inside the QUIC (TLS 1.3) handshake.

Each side presents a self-signed X.509 certificate that is only a container
for its Ed25519 device key and its JID (subjectAltName ``id-on-xmppAddr``,
RFC 6120 section 13.7.1.4). No CA and no validity dates are checked: what
makes a key trusted is the trust store (vCards, pins). TLS 1.3's
CertificateVerify proves that the peer holds the private key of the
certificate, signed over this handshake's transcript, so the proof is bound
to this session.

Stock aioquic (1.2 to 1.7) neither asks a client for a certificate nor offers
a hook to check a peer certificate against anything but a CA store. dtx
therefore reaches into two private parts of ``aioquic.tls.Context``, and pins
the aioquic version range (see ``pyproject.toml`` and ``docs/security.md``):

* ``_request_client_certificate``: set on the server so it sends a
  CertificateRequest;
* ``_set_peer_certificate`` and ``_server_handle_certificate``: wrapped so
  the key is checked the moment the Certificate message arrives, and so a
  client that answers with an empty Certificate is refused
  (``certificate_required``) instead of being let in without one.

One more private hook serves flow control, not authentication:
``QuicConnection._write_stream_limits`` is replaced so a stream's receive
window follows what the application has read (see
:class:`AuthenticatedQuicConnection`). Loss recovery reads two more
(``_loss._cc``, the congestion controller, and ``_loss._pto_count``) to
send small packets twice on a lossy path, and of the 1-RTT packet number
space (``_spaces[ONE_RTT]``) ``ack_at`` is moved so that a pending ACK
leaves with the application's data and ``largest_received_packet`` is read
to see the peer's losses.

A refused key raises a TLS alert inside aioquic, which closes the connection
with ``CRYPTO_ERROR + alert`` (RFC 9001 section 4.8): the handshake ends on
both sides. The reason sent to the peer is generic; the detailed
:class:`~dtx.errors.TrustError` (with fingerprints) stays local.
"""

from __future__ import annotations

import datetime
import hashlib
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aioquic import tls
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import MAX_STREAM_DATA_FRAME_CAPACITY, QuicConnection
from aioquic.quic.packet import QuicFrameType
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID, ObjectIdentifier

from ..errors import DtxError, JIDError, TrustError
from ..jid import JID
from . import congestion

ALPN = "dtx/1"
"""The ALPN protocol identifier of dtx sessions."""

ID_ON_XMPPADDR = ObjectIdentifier("1.3.6.1.5.5.7.8.5")
"""RFC 6120 section 13.7.1.4: a JID inside a certificate's subjectAltName."""

# Certificates are key containers only, so their dates carry no meaning; a
# fixed, wide window keeps them deterministic and never "expired".
_NOT_BEFORE = datetime.datetime(2000, 1, 1, tzinfo=datetime.timezone.utc)
_NOT_AFTER = datetime.datetime(9999, 12, 31, tzinfo=datetime.timezone.utc)

ALERT_REFUSED = tls.AlertDescription.bad_certificate
ALERT_CERTIFICATE_REQUIRED = tls.AlertDescription.certificate_required
CRYPTO_ERROR_BASE = 0x100
"""QUIC CRYPTO_ERROR range: 0x100 + TLS alert (RFC 9001 section 4.8)."""


def raw_public_key(key: ed25519.Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _der_utf8string(text: str) -> bytes:
    data = text.encode("utf-8")
    n = len(data)
    if n < 0x80:
        length = bytes([n])
    else:
        size = (n.bit_length() + 7) // 8
        length = bytes([0x80 | size]) + n.to_bytes(size, "big")
    return b"\x0c" + length + data


def _parse_der_utf8string(data: bytes) -> str | None:
    if len(data) < 2 or data[0] != 0x0C:
        return None
    n = data[1]
    offset = 2
    if n & 0x80:
        size = n & 0x7F
        if size == 0 or size > 4 or len(data) < 2 + size:
            return None
        n = int.from_bytes(data[2 : 2 + size], "big")
        offset = 2 + size
    if len(data) != offset + n:
        return None
    try:
        return data[offset:].decode("utf-8")
    except UnicodeDecodeError:
        return None


def make_certificate(private_key: ed25519.Ed25519PrivateKey, jid: str) -> x509.Certificate:
    """A deterministic self-signed certificate carrying ``jid`` and the key."""
    public = private_key.public_key()
    digest = hashlib.sha256(raw_public_key(public)).digest()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dtx device")])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(int.from_bytes(digest[:16], "big") >> 1 or 1)
        .not_valid_before(_NOT_BEFORE)
        .not_valid_after(_NOT_AFTER)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.OtherName(ID_ON_XMPPADDR, _der_utf8string(jid))]
            ),
            critical=False,
        )
        .sign(private_key, None)
    )


@dataclass(frozen=True)
class PeerCredential:
    """What a peer proved in the handshake: its JID and its Ed25519 key."""

    jid: str
    key: bytes


class CertificateContentError(TrustError):
    """The peer's certificate is not a dtx device certificate."""


def credential_from_certificate(cert: x509.Certificate) -> PeerCredential:
    """Extract the JID and raw Ed25519 key from a dtx device certificate."""
    public = cert.public_key()
    if not isinstance(public, ed25519.Ed25519PublicKey):
        raise CertificateContentError("peer certificate key is not Ed25519")
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        raise CertificateContentError("peer certificate names no JID") from None
    jids = [
        _parse_der_utf8string(other.value)
        for other in san.value.get_values_for_type(x509.OtherName)
        if other.type_id == ID_ON_XMPPADDR
    ]
    valid = [j for j in jids if j]
    if len(valid) != 1:
        raise CertificateContentError("peer certificate must name exactly one JID")
    try:
        jid = JID.parse(valid[0]).full
    except JIDError as exc:
        raise CertificateContentError(f"peer certificate names a bad JID: {exc}") from None
    return PeerCredential(jid=jid, key=raw_public_key(public))


CredentialCheck = Callable[[PeerCredential], None]
"""Raises :class:`~dtx.errors.TrustError` to refuse a peer."""


class _AlertCertificateRequired(tls.Alert):
    description = tls.AlertDescription.certificate_required


class _DtxTlsContext(tls.Context):
    """aioquic's TLS context, checking the peer's key on arrival.

    Instances are made by re-classing the context aioquic builds in
    ``QuicConnection._initialize``; the only added state is set there.
    """

    _dtx_connection: AuthenticatedQuicConnection

    def _set_peer_certificate(self, certificate: tls.Certificate) -> None:
        super()._set_peer_certificate(certificate)
        self._dtx_connection._check_peer_certificate(self._peer_certificate)

    def _server_handle_certificate(self, input_buf: Any) -> None:
        # aioquic lets a client that sends an empty Certificate in without
        # authentication (RFC 8446 allows it); dtx requires a key.
        super()._server_handle_certificate(input_buf)
        if self._peer_certificate is None:
            self._dtx_connection._auth_error = TrustError(
                "peer sent no certificate"
            )
            raise _AlertCertificateRequired("a device certificate is required")


class AuthenticatedQuicConnection(QuicConnection):
    """A :class:`QuicConnection` that requires and checks Ed25519 device keys.

    ``check`` is called with the peer's credential as soon as its
    Certificate message arrives; it raises :class:`TrustError` to refuse.
    After a refusal, :attr:`auth_error` holds the local, detailed error.
    """

    def __init__(
        self,
        *,
        configuration: QuicConfiguration,
        check: CredentialCheck,
        **kwargs: Any,
    ) -> None:
        self._check = check
        self._auth_error: DtxError | None = None
        self.peer_credential: PeerCredential | None = None
        self.datagrams_duplicated = 0
        """Datagrams sent a second time (see :attr:`duplicate_after_loss`)."""
        super().__init__(configuration=configuration, **kwargs)
        # aioquic builds its loss recovery, and the controller in it, once.
        cc = getattr(getattr(self, "_loss", None), "_cc", None)
        self._congestion = (
            cc if isinstance(cc, congestion.LossTolerantCongestionControl) else None)

    @property
    def auth_error(self) -> DtxError | None:
        return self._auth_error

    def rehome(self, old: tuple[str, int], new: tuple[str, int]) -> None:
        """The peer at ``old`` is known as ``new`` from now on (the endpoint
        mapped a real address to a link's mapped one): the same path to
        QUIC, not a migration. aioquic keeps its paths privately; this
        adapter is the one place that touches them."""
        for path in getattr(self, "_network_paths", ()):
            if path.addr == old:
                path.addr = new

    @property
    def smoothed_rtt(self) -> float:
        """The connection's smoothed RTT estimate in seconds (RFC 9002), 0
        before any sample. aioquic keeps it on its private loss recovery
        object; this adapter is the one place that reads it."""
        loss = getattr(self, "_loss", None)
        if loss is None or not getattr(loss, "_rtt_initialized", False):
            return 0.0
        return float(getattr(loss, "_rtt_smoothed", 0.0))

    @property
    def remote_max_datagram_frame_size(self) -> int | None:
        """The largest DATAGRAM frame the peer accepts (None: none at all)."""
        value = getattr(self, "_remote_max_datagram_frame_size", None)
        return None if value is None else int(value)

    # -- small packets twice on a lossy path ---------------------------------------
    #
    # A lost packet that carries a lone stanza (a "pause") is found only by
    # the probe timeout, a round trip and more after it was sent: on a relayed
    # 250 ms path a loss costs the stanza 275 ms. While the path has lost a
    # packet in the last ``duplicate_after_loss`` seconds, a flush that puts
    # ack-eliciting data in flight and leaves at most
    # ``duplicate_max_in_flight`` bytes in flight, with nothing held back by
    # the pacer or the window (an exchange, not a bulk transfer), sends its
    # datagrams twice. The receiver's QUIC drops the copy
    # of a packet it has (same packet number), so the copy costs bandwidth on
    # a small flow only and no state. On a path that does not lose packets
    # nothing is sent twice.

    #
    # A loss counts whichever way it went. The sender learns of its own
    # losses from the peer's acknowledgements; a receiver sees the peer's as
    # a gap in the packet numbers that arrive (a 1-RTT packet fills its
    # datagram, so one datagram is one number). So the end that only
    # answers (an echo, a result) sends its answers twice too once the path
    # has shown it loses, rather than paying a probe timeout for the first
    # answer lost. A reordered packet looks the same: it costs copies of a
    # few small packets, nothing else.

    duplicate_after_loss: float = 30.0
    duplicate_max_in_flight: int = 3 * 1200

    receive_gaps = 0
    """Times the peer's packet numbers skipped (its packets lost or late)."""
    last_gap_time: float | None = None
    """When the latest such gap was seen (None: never)."""

    def receive_datagram(self, data: bytes, addr: Any, now: float) -> None:
        space = self._one_rtt
        before = -1 if space is None else space.largest_received_packet
        super().receive_datagram(data, addr, now)
        if before >= 0 and space.largest_received_packet > before + 1:
            self.receive_gaps += 1
            self.last_gap_time = now

    _one_rtt: Any = None
    """aioquic's 1-RTT packet number space (from ``_initialize``)."""

    @property
    def congestion(self) -> congestion.LossTolerantCongestionControl | None:
        """The loss-tolerant controller, when the connection runs it."""
        return self._congestion

    # -- acknowledgements ride with data ---------------------------------------
    #
    # aioquic writes an ACK frame only once its 1 ms ack delay is up, so an
    # answer written within that millisecond (an echo, a result) leaves in
    # one packet and its ACK in another a moment later: four packets per
    # exchange where two do. When the application has written something, a
    # pending ACK goes with it.

    _data_written = False

    def send_stream_data(self, stream_id: int, data: bytes,
                         end_stream: bool = False) -> None:
        super().send_stream_data(stream_id, data, end_stream)
        self._data_written = True

    def send_datagram_frame(self, data: bytes) -> None:
        super().send_datagram_frame(data)
        self._data_written = True

    def _ack_with_data(self, now: float) -> None:
        self._data_written = False
        space = getattr(self, "_spaces", {}).get(tls.Epoch.ONE_RTT)
        if space is not None and space.ack_at is not None and space.ack_at > now:
            space.ack_at = now

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Any]]:
        if self._data_written:
            self._ack_with_data(now)
        cc = self.congestion
        if cc is None:
            return super().datagrams_to_send(now=now)
        lost = cc.last_loss_time
        gap = self.last_gap_time
        if gap is not None and (lost is None or gap > lost):
            lost = gap
        if lost is None or now - lost > self.duplicate_after_loss:
            return super().datagrams_to_send(now=now)
        before = cc.bytes_in_flight
        out = super().datagrams_to_send(now=now)
        after = cc.bytes_in_flight
        # Everything the application had went out (neither the pacer nor the
        # window held any back): an exchange, not the start of a transfer.
        if (out and before < after <= self.duplicate_max_in_flight
                and after < cc.congestion_window and self._pacing_at is None):
            self.datagrams_duplicated += len(out)
            out += out
        return out

    def handle_timer(self, now: float) -> None:
        # A probe timeout is the loss signal of a lone packet (aioquic does not
        # report it to the controller as a loss).
        loss = getattr(self, "_loss", None)
        before = getattr(loss, "_pto_count", 0)
        super().handle_timer(now)
        cc = self.congestion
        if (cc is not None and getattr(loss, "_pto_count", 0) > before
                and self._handshake_complete):
            cc.last_loss_time = now

    # -- receive flow control -----------------------------------------------------
    #
    # aioquic doubles a stream's receive limit whenever half of it is used,
    # whatever the application has read, so a fast sender and a slow reader
    # grow memory without bound. dtx grants credit itself instead: at most
    # ``stream_window`` bytes beyond what has arrived, and none while the
    # application is behind (``receive_paused``). The sender then stalls on
    # QUIC flow control, which is what flow control is for.

    stream_window: int = 2 * 1024 * 1024
    receive_paused: bool = False

    def _write_stream_limits(self, builder: Any, space: Any, stream: Any) -> None:
        if stream.max_stream_data_local and not self.receive_paused:
            wanted = stream.receiver.highest_offset + self.stream_window
            if wanted - stream.max_stream_data_local >= self.stream_window // 2:
                stream.max_stream_data_local = wanted
        if stream.max_stream_data_local_sent == stream.max_stream_data_local:
            return
        buf = builder.start_frame(
            QuicFrameType.MAX_STREAM_DATA,
            capacity=MAX_STREAM_DATA_FRAME_CAPACITY,
            handler=self._on_max_stream_data_delivery,
            handler_args=(stream,),
        )
        buf.push_uint_var(stream.stream_id)
        buf.push_uint_var(stream.max_stream_data_local)
        stream.max_stream_data_local_sent = stream.max_stream_data_local

    def _initialize(self, peer_cid: bytes) -> None:
        super()._initialize(peer_cid)
        self._one_rtt = self._spaces[tls.Epoch.ONE_RTT]
        self.tls.__class__ = _DtxTlsContext
        ctx: Any = self.tls
        ctx._dtx_connection = self
        if not self._is_client:
            ctx._request_client_certificate = True

    def _check_peer_certificate(self, cert: x509.Certificate | None) -> None:
        if cert is None:  # pragma: no cover - aioquic raises before this
            raise tls.AlertBadCertificate("no certificate")
        try:
            credential = credential_from_certificate(cert)
            self._check(credential)
        except TrustError as exc:
            self._auth_error = exc
            raise tls.AlertBadCertificate("dtx: device key refused") from exc
        self.peer_credential = credential


def quic_configuration(
    *,
    is_client: bool,
    private_key: ed25519.Ed25519PrivateKey,
    certificate: x509.Certificate,
    idle_timeout: float,
    max_datagram_frame_size: int | None,
    max_datagram_size: int = 1200,
    congestion_control: str = congestion.NAME,
) -> QuicConfiguration:
    """The QUIC configuration of a dtx endpoint (0-RTT and tickets off).
    ``congestion_control`` names an aioquic controller: dtx's
    ``loss-tolerant`` (:mod:`dtx.proto.congestion`), or ``reno``, ``cubic``."""
    config = QuicConfiguration(
        is_client=is_client,
        max_datagram_size=max_datagram_size,
        alpn_protocols=[ALPN],
        idle_timeout=idle_timeout,
        max_datagram_frame_size=max_datagram_frame_size,
        # CA verification is replaced by the key check above.
        verify_mode=ssl.CERT_NONE,
        certificate=certificate,
        private_key=private_key,
        # Windows: the stream's is managed by AuthenticatedQuicConnection.
        max_data=16 * 1024 * 1024,
        max_stream_data=AuthenticatedQuicConnection.stream_window,
        congestion_control_algorithm=congestion_control,
    )
    return config
