"""A throwaway Prosody: a real XMPP server for tests, the bench and demos.

Each :class:`ProsodyServer` gets its own folder (config, data, log, TLS
certificate), its own port and its own users: on loopback by default, or on
a NAT-lab host (``host=``), where it is started inside the host's network
namespace and listens on the host's address. Only client connections are
served unless ``federation=`` asks for server-to-server links too; never
HTTP or components.

Two module sets mirror the two server behaviours dtx must cope with:

- ``"vcard4"``: as Debian's Prosody ships (``pep`` + ``vcard4`` +
  ``vcard_legacy``); vcard-temp is translated to and from vCard4 on PEP and
  fields it does not know (``KEY``) are dropped;
- ``"vcard-temp"``: ``vcard`` (vcard-temp stored as sent, as ejabberd does),
  no PEP and no vCard4.

With ``turn=TurnExternal(...)`` the server also hands out STUN and TURN
services by XEP-0215 (``mod_turn_external``, which loads
``mod_external_services``): TURN REST credentials made with the secret a
coturn beside it shares (:mod:`dtx.lab.coturn`), valid for ``ttl`` seconds.

Prosody refuses to run as root only through ``mod_posix``, which is not
loaded here; ``run_as_root`` also stops ``prosodyctl`` from switching to the
``prosody`` user (which could not read the temporary folder). As another
user the server runs as that user.
"""

from __future__ import annotations

import datetime
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal

if TYPE_CHECKING:
    from dtx.lab.topology import Host

ServerKind = Literal["vcard4", "vcard-temp"]

DOMAIN = "example.org"
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0

_MODULES: dict[ServerKind, tuple[str, ...]] = {
    "vcard4": ("roster", "saslauth", "disco", "pep", "vcard4", "vcard_legacy", "ping",
               "smacks"),
    "vcard-temp": ("roster", "saslauth", "disco", "vcard", "ping"),
}


@dataclass(frozen=True, kw_only=True)
class TurnExternal:
    """``mod_turn_external``'s options: the TURN REST secret shared with
    the TURN server, where clients reach it, and how long the credentials
    it mints stay valid (Prosody's default is a day; the lab uses a minute
    to see them expire)."""

    secret: str
    host: str
    port: int = 3478
    ttl: int = 86400
    user: str | None = None
    """``turn_external_user``: the ``user`` part of the ``expiry:user``
    username; without it the username is the expiry alone."""

    def lines(self) -> list[str]:
        """The Prosody configuration lines."""
        out = [
            f"turn_external_secret = {_lua(self.secret)}",
            f"turn_external_host = {_lua(self.host)}",
            f"turn_external_port = {int(self.port)}",
            f"turn_external_ttl = {int(self.ttl)}",
        ]
        if self.user is not None:
            out.append(f"turn_external_user = {_lua(self.user)}")
        return out


@dataclass(frozen=True, kw_only=True)
class Federation:
    """Server-to-server links to other domains: an s2s listener on
    ``port``, dialback (no certificates in the lab, so no TLS is asked
    for), and other domains found by DNS (``_xmpp-server._tcp`` SRV, then
    A) at ``nameserver`` only, through libunbound (Debian's
    ``lua-unbound``), never at this machine's resolvers."""

    nameserver: str
    port: int = 5269

    def lines(self, resolv_conf: str) -> list[str]:
        """The Prosody configuration lines."""
        return [
            f"s2s_ports = {{ {int(self.port)} }}",
            "s2s_require_encryption = false",
            "s2s_secure_auth = false",
            f"unbound = {{ resolvconf = {_lua(resolv_conf)} }}",
        ]


def unbound_missing() -> str | None:
    """Why Prosody cannot be pointed at a lab DNS server here (it needs
    libunbound's Lua binding), or None when it can."""
    if glob.glob("/usr/lib/*/lua/*/lunbound.so") or glob.glob("/usr/lib/lua/*/lunbound.so"):
        return None
    return ("needs libunbound's Lua binding for Prosody (Debian package lua-unbound, "
            "which prosody recommends): run scripts/setup as root")


def prosody_missing() -> str | None:
    """Why Prosody cannot be used here, or None when it can."""
    for tool in ("prosody", "prosodyctl"):
        if shutil.which(tool) is None:
            return (
                f"needs Debian's prosody package ({tool} not on PATH): "
                f"run scripts/setup as root"
            )
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _lua(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def self_signed_certificate(name: str) -> tuple[Any, Any]:
    """A throwaway self-signed certificate and EC key for ``name``, made in
    memory; it is its own CA (so a client given it as CA file trusts it)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def make_self_signed(folder: str, domain: str) -> tuple[str, str]:
    """A self-signed certificate for ``domain`` written to ``folder``;
    returns (cert, key) paths."""
    from cryptography.hazmat.primitives import serialization

    cert, key = self_signed_certificate(domain)
    cert_path = os.path.join(folder, f"{domain}.crt")
    key_path = os.path.join(folder, f"{domain}.key")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            )
        )
    os.chmod(key_path, 0o600)
    return cert_path, key_path


NO_NAGLE: Final = "network_settings = { nagle = false }"
"""The line that turns Nagle's algorithm off on Prosody's connections."""


@dataclass
class ProsodyServer:
    """One running Prosody; ``start()`` then ``stop()`` (or a ``with`` block)."""

    kind: ServerKind
    tls: bool = False
    domain: str = DOMAIN
    folder: str = ""
    port: int = 0
    ca_file: str | None = None
    host: Host | None = None
    """A NAT-lab host to run on (its namespace, its address); None: loopback."""
    turn: TurnExternal | None = None
    """Offer STUN and TURN by XEP-0215 (``mod_turn_external``)."""
    federation: Federation | None = None
    """Talk to other domains' servers (s2s); None: client connections only."""
    stun: tuple[str, int] | None = None
    """List this STUN server, and no TURN one, by XEP-0215
    (``mod_external_services``): the server of a domain that runs STUN
    but no relay."""
    nagle: bool = True
    """Nagle's algorithm on the client connections, as Prosody ships it;
    False writes ``network_settings = { nagle = false }``, which
    docs/xmpp-server.md recommends (a small stanza is not held behind
    another one the client has not acknowledged yet)."""
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _owns_folder: bool = field(default=False, repr=False)

    @property
    def config_path(self) -> str:
        return os.path.join(self.folder, "prosody.cfg.lua")

    @property
    def log_path(self) -> str:
        return os.path.join(self.folder, "prosody.log")

    def address(self) -> tuple[str, int]:
        return (self.host.ip if self.host is not None else "127.0.0.1", self.port)

    def _config(self) -> str:
        # mod_tls only with our own certificate: without one, Prosody would
        # pick up the system's certificates folder.
        names = _MODULES[self.kind] + (("tls",) if self.tls else ())
        if self.turn is not None:
            names += ("turn_external",)
        elif self.stun is not None:
            names += ("external_services",)
        if self.federation is not None:
            names += ("dialback",)
        modules = "; ".join(_lua(m) for m in names)
        lines = [
            "-- throwaway configuration written by the dtx tests",
            "run_as_root = true",
            f"data_path = {_lua(os.path.join(self.folder, 'data'))}",
            f"pidfile = {_lua(os.path.join(self.folder, 'prosody.pid'))}",
            f"log = {{ debug = {_lua(self.log_path)} }}",
            f"interfaces = {{ {_lua(self.address()[0])} }}",
            f"local_interfaces = {{ {_lua(self.address()[0])} }}",
            f"c2s_ports = {{ {self.port} }}",
            "c2s_direct_tls_ports = { }",
            "legacy_ssl_ports = { }",
            "component_ports = { }",
            "http_ports = { }",
            "https_ports = { }",
            f"modules_enabled = {{ {modules} }}",
            'authentication = "internal_plain"',
            'storage = "internal"',
            "allow_registration = false",
            "use_libevent = false",
            f"certificates = {_lua(self.folder)}",
        ]
        if not self.nagle:
            lines.append(NO_NAGLE)
        if self.tls:
            cert, key = make_self_signed(self.folder, self.domain)
            self.ca_file = cert
            lines += [
                f"ssl = {{ certificate = {_lua(cert)}; key = {_lua(key)} }}",
                "c2s_require_encryption = true",
            ]
        else:
            lines += [
                "c2s_require_encryption = false",
                "allow_unencrypted_plain_auth = true",
            ]
        if self.turn is not None:
            lines += self.turn.lines()
        elif self.stun is not None:
            host, port = self.stun
            lines.append("external_services = { { type = \"stun\", transport = \"udp\", "
                         f"host = {_lua(host)}, port = {int(port)} }} }}")
        if self.federation is None:
            lines += ["s2s_ports = { }", 'modules_disabled = { "s2s" }']
        else:
            resolv_conf = os.path.join(self.folder, "resolv.conf")
            with open(resolv_conf, "w", encoding="ascii") as f:
                f.write(f"nameserver {self.federation.nameserver}\n")
            lines += self.federation.lines(resolv_conf)
        lines += [f"VirtualHost {_lua(self.domain)}", ""]
        return "\n".join(lines)

    def start(self) -> None:
        if not self.folder:
            self.folder = tempfile.mkdtemp(prefix="dtx-prosody-")
            self._owns_folder = True
        os.makedirs(os.path.join(self.folder, "data"), mode=0o700, exist_ok=True)
        # A restart keeps the port: clients log back in where they were.
        self.port = self.port or (_free_port() if self.host is None else 5222)
        with open(self.config_path, "w", encoding="utf-8") as f:
            f.write(self._config())
        argv = ["prosody", "--config", self.config_path, "-F"]
        options: dict[str, Any] = {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL,
                                   "stderr": subprocess.DEVNULL}
        if self.host is not None:
            self._proc = self.host.popen(argv, **options)
        else:
            self._proc = subprocess.Popen(argv, start_new_session=True, **options)
        self._wait_listening()

    def _connect(self) -> None:
        """One TCP connection to the server (from its namespace in the lab)."""
        if self.host is None:
            with socket.create_connection(self.address(), timeout=1.0):
                return
        else:
            with self.host.tcp_socket() as sock:
                sock.settimeout(1.0)
                sock.connect(self.address())

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        for _ in range(10_000):
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(f"prosody exited at start; log:\n{self.log_tail()}")
            try:
                self._connect()
                return
            except OSError:
                pass
            if time.monotonic() > deadline:
                break
            # Polling a port that is not open yet: nothing to await on.
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"prosody did not listen within {START_TIMEOUT} s; log:\n{self.log_tail()}")

    def register(self, user: str, password: str) -> str:
        """Create an account; returns its bare JID."""
        argv = ["prosodyctl", "--config", self.config_path, "register", user, self.domain,
                password]
        if self.host is not None:
            done = self.host.run(argv, stdin=subprocess.DEVNULL, timeout=30)
        else:
            done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                                  text=True, timeout=30, check=False)
        if done.returncode != 0:
            raise RuntimeError(
                f"prosodyctl register {user} failed ({done.returncode}): "
                f"{done.stdout}{done.stderr}"
            )
        return f"{user}@{self.domain}"

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return "(no log)"

    def restart(self) -> None:
        """Stop the server (its clients' connections drop) and start it
        again on the same port, with the same accounts and data."""
        self._terminate()
        self.start()

    def stop(self) -> None:
        self._terminate()
        if self._owns_folder and self.folder:
            shutil.rmtree(self.folder, ignore_errors=True)

    def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=STOP_TIMEOUT)

    def __enter__(self) -> ProsodyServer:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()
