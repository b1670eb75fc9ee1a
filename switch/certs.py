"""Development PKI and the TLS contexts every socket of the switch uses.

Terminals connect over mutually authenticated TLS: the switch presents a
server certificate and accepts only client certificates issued by the
configured terminal CA; the client certificate's CN is the terminal's
authenticated identity (:func:`peer_identity`). Acquirer links may use TLS
too (:func:`client_context`).

For development and tests, :func:`ensure_dev_pki` creates a small private
PKI under ``<state_dir>/pki/``::

    ca.crt / ca.key                 development root CA (5 years)
    server.crt / server.key         switch listener (localhost, 127.0.0.1, ::1)
    client.crt / client.key         sample terminal, CN "TERM0001"
    acquirer.crt / acquirer.key     simulated acquirers (localhost, 127.0.0.1, ::1)
    clients/<CN>.crt / <CN>.key     extra terminals (DevPKI.issue_client_cert)

Keys are EC P-256 (fast to generate, and every TLS 1.2/1.3 stack speaks
ECDHE-ECDSA), written unencrypted with mode 0600 in a 0700 directory: this
PKI is for development only and its CA key sits next to the certificates.
Production deployments configure their own cert/key/client_ca paths.

PCI DSS v4 4.2.1 binds the TLS settings here: TLS 1.2 or newer only, forward
secret AEAD cipher suites only, certificates verified (optionally against a
CRL), no TLS compression.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import ipaddress
import os
import re
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Union

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

try:  # serialise concurrent first runs (two switch processes, one state_dir)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "DevPKI",
    "SAMPLE_TERMINAL_CN",
    "client_context",
    "dev_pki_paths",
    "ensure_dev_pki",
    "issue_cert",
    "load_cert",
    "load_key",
    "make_ca",
    "make_crl",
    "peer_identity",
    "server_context",
    "write_pem",
]

PrivateKey = ec.EllipticCurvePrivateKey
Pem = Union[x509.Certificate, x509.CertificateRevocationList, PrivateKey]

SAMPLE_TERMINAL_CN = "TERM0001"
CA_DAYS = 5 * 365
LEAF_DAYS = 365
# A leaf closer than this to expiry is reissued at start-up, so a long-running
# development switch never starts with a certificate about to lapse.
RENEW_BEFORE = _dt.timedelta(days=30)
# The CA is replaced (and every leaf with it) when it is this close to expiry.
CA_RENEW_BEFORE = _dt.timedelta(days=90)
# Backdating absorbs clock skew between the machine that issued a certificate
# and the peer that verifies it.
_BACKDATE = _dt.timedelta(minutes=5)
_LOCAL_SANS = ("localhost", "127.0.0.1", "::1")

# TLS 1.2 suites: ECDHE key exchange (forward secrecy, no static-RSA key
# transport) with AEAD ciphers only. TLS 1.3 suites are all AEAD + (EC)DHE and
# keep OpenSSL's defaults.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL:!MD5:!DSS:!SHA1"

# A CN becomes a file name under pki/clients/: keep it to a safe alphabet.
_CN_FILE_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


# --------------------------------------------------------------------------
# Certificates


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def _new_key() -> PrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str, org: str = "isoswitch development") -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _san_entry(value: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(value))
    except ValueError:
        return x509.DNSName(value)


def make_ca(cn: str = "isoswitch development CA", *, days: int = CA_DAYS) -> tuple[x509.Certificate, PrivateKey]:
    """A self-signed root CA certificate and its private key."""
    key = _new_key()
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + _dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return cert, key


def issue_cert(
    ca_cert: x509.Certificate,
    ca_key: PrivateKey,
    cn: str,
    *,
    server: bool,
    client: bool,
    sans: Iterable[str] = (),
    days: int = LEAF_DAYS,
) -> tuple[x509.Certificate, PrivateKey]:
    """An end-entity certificate signed by ``ca_cert``/``ca_key``.

    ``server``/``client`` select the extended key usages (serverAuth,
    clientAuth); ``sans`` are DNS names or IP addresses (IP literals become
    iPAddress entries, as hostname checking requires). ``days`` may be
    negative to make an already expired certificate for tests.
    """
    if not (server or client):
        raise ValueError("issue_cert: at least one of server, client must be true")
    key = _new_key()
    now = _now()
    not_after = now + _dt.timedelta(days=days)
    not_before = min(now - _BACKDATE, not_after - _dt.timedelta(days=1))
    usages = []
    if server:
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
    if client:
        usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    sans = list(sans)
    if sans:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_san_entry(s) for s in sans]), critical=False
        )
    return builder.sign(ca_key, hashes.SHA256()), key


def make_crl(
    ca_cert: x509.Certificate,
    ca_key: PrivateKey,
    revoked_serials: Iterable[int],
    *,
    days: int = 7,
) -> x509.CertificateRevocationList:
    """A CRL signed by the CA listing ``revoked_serials`` (certificate serial numbers)."""
    now = _now()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - _BACKDATE)
        .next_update(now + _dt.timedelta(days=days))
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .add_extension(x509.CRLNumber(int(now.timestamp())), critical=False)
    )
    for serial in revoked_serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(now - _BACKDATE)
            .build()
        )
    return builder.sign(ca_key, hashes.SHA256())


def _pem_bytes(obj: Pem) -> bytes:
    if isinstance(obj, (x509.Certificate, x509.CertificateRevocationList)):
        return obj.public_bytes(serialization.Encoding.PEM)
    return obj.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def write_pem(path: Path, *objs: Pem) -> Path:
    """Write certificates, CRLs or private keys to ``path`` as PEM, atomically.

    A file holding a private key is created with mode 0600 from the start (it
    never exists world-readable, not even for an instant); other files get
    0644. Several objects may go in one file, for example a certificate chain.
    """
    path = Path(path)
    if not objs:
        raise ValueError("write_pem: nothing to write")
    secret = any(hasattr(o, "private_bytes") for o in objs)
    data = b"".join(_pem_bytes(o) for o in objs)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # mkstemp: 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if not secret:
            os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(Path(path).read_bytes())


def load_key(path: Path) -> PrivateKey:
    return serialization.load_pem_private_key(Path(path).read_bytes(), password=None)  # type: ignore[return-value]


# --------------------------------------------------------------------------
# Development PKI


@dataclass(frozen=True)
class DevPKI:
    """Paths of the development PKI under ``<state_dir>/pki``."""

    dir: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    acquirer_cert: Path
    acquirer_key: Path

    def issue_client_cert(self, cn: str, *, days: int = LEAF_DAYS) -> tuple[Path, Path]:
        """(cert_path, key_path) of a terminal certificate with CN ``cn``.

        Reuses an existing certificate while it is valid, issued by the
        current CA and not near expiry; otherwise issues a new one.
        """
        if not _CN_FILE_SAFE.match(cn):
            raise ValueError(
                f"terminal CN {cn!r} must be 1-64 characters of A-Z a-z 0-9 . _ - "
                "(it becomes a file name)"
            )
        cert_path = self.dir / "clients" / f"{cn}.crt"
        key_path = self.dir / "clients" / f"{cn}.key"
        with _locked(self.dir):
            ca_cert, ca_key = load_cert(self.ca_cert), load_key(self.ca_key)
            if not _leaf_usable(cert_path, key_path, ca_cert):
                cert, key = issue_cert(ca_cert, ca_key, cn, server=False, client=True, days=days)
                write_pem(key_path, key)
                write_pem(cert_path, cert)
        return cert_path, key_path


def dev_pki_paths(state_dir: Path) -> DevPKI:
    """Where the development PKI lives; creates nothing (config uses this)."""
    d = Path(state_dir) / "pki"
    return DevPKI(
        dir=d,
        ca_cert=d / "ca.crt",
        ca_key=d / "ca.key",
        server_cert=d / "server.crt",
        server_key=d / "server.key",
        client_cert=d / "client.crt",
        client_key=d / "client.key",
        acquirer_cert=d / "acquirer.crt",
        acquirer_key=d / "acquirer.key",
    )


@contextlib.contextmanager
def _locked(pki_dir: Path) -> Iterator[None]:
    pki_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    if fcntl is None:  # pragma: no cover
        yield
        return
    with open(pki_dir / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _valid_for(cert: x509.Certificate, margin: _dt.timedelta) -> bool:
    now = _now()
    return cert.not_valid_before_utc <= now and cert.not_valid_after_utc - margin > now


def _key_matches(cert: x509.Certificate, key: PrivateKey) -> bool:
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    return cert.public_key().public_bytes(enc, pub) == key.public_key().public_bytes(enc, pub)


def _leaf_usable(cert_path: Path, key_path: Path, ca_cert: x509.Certificate) -> bool:
    """True when the pair on disk can be reused as is."""
    try:
        cert, key = load_cert(cert_path), load_key(key_path)
    except (OSError, ValueError, TypeError):
        return False
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return False  # issued by an earlier CA
    return _key_matches(cert, key) and _valid_for(cert, RENEW_BEFORE)


def _ca_usable(pki: DevPKI) -> bool:
    try:
        cert, key = load_cert(pki.ca_cert), load_key(pki.ca_key)
    except (OSError, ValueError, TypeError):
        return False
    return _key_matches(cert, key) and _valid_for(cert, CA_RENEW_BEFORE)


def ensure_dev_pki(state_dir: Path) -> DevPKI:
    """Create the development PKI under ``state_dir/pki`` or reuse what is there.

    Idempotent: files that are valid, match their keys, chain to the current
    CA and are not near expiry are left untouched (not even rewritten). A
    missing, damaged or near-expiry CA is replaced together with every leaf;
    a bad or near-expiry leaf is reissued alone.
    """
    pki = dev_pki_paths(state_dir)
    with _locked(pki.dir):
        os.chmod(pki.dir, 0o700)
        if _ca_usable(pki):
            ca_cert, ca_key = load_cert(pki.ca_cert), load_key(pki.ca_key)
        else:
            ca_cert, ca_key = make_ca()
            write_pem(pki.ca_key, ca_key)
            write_pem(pki.ca_cert, ca_cert)
        leaves = (
            (pki.server_cert, pki.server_key, "localhost", True, False, _LOCAL_SANS),
            (pki.client_cert, pki.client_key, SAMPLE_TERMINAL_CN, False, True, ()),
            (pki.acquirer_cert, pki.acquirer_key, "acquirer-simulator", True, False, _LOCAL_SANS),
        )
        for cert_path, key_path, cn, server, client, sans in leaves:
            if _leaf_usable(cert_path, key_path, ca_cert):
                continue
            cert, key = issue_cert(ca_cert, ca_key, cn, server=server, client=client, sans=sans)
            # Key first: a crash between the two writes leaves a mismatched
            # pair, which the next run detects and reissues.
            write_pem(key_path, key)
            write_pem(cert_path, cert)
    return pki


# --------------------------------------------------------------------------
# TLS contexts


def _harden(ctx: ssl.SSLContext) -> None:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION  # CRIME; on by default, stated for the reader
    ctx.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    # RFC 5280 conformance checks (Python 3.13 turns this on by default).
    ctx.verify_flags |= getattr(ssl, "VERIFY_X509_STRICT", 0)


def server_context(
    cert: Path,
    key: Path,
    client_ca: Path | None,
    require_client_cert: bool = True,
    *,
    crl: Path | None = None,
) -> ssl.SSLContext:
    """TLS server context for a listener.

    With ``client_ca`` the server verifies client certificates against it
    (mutual TLS); ``require_client_cert=False`` makes a certificate optional
    (CERT_OPTIONAL) instead of refusing the handshake without one. ``crl``
    (PEM, issued by ``client_ca``) enables revocation checking of the client
    certificate (VERIFY_CRL_CHECK_LEAF); OpenSSL then refuses every client
    whose issuer has no CRL loaded, so pass the CRL of each CA you trust.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(ctx)
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.load_cert_chain(str(cert), str(key))
    if client_ca is not None:
        ctx.load_verify_locations(cafile=str(client_ca))
        ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
        if crl is not None:
            ctx.load_verify_locations(cafile=str(crl))
            ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    elif crl is not None:
        raise ValueError("server_context: crl given without client_ca")
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def client_context(
    ca: Path,
    cert: Path | None = None,
    key: Path | None = None,
    server_hostname_check: bool = True,
) -> ssl.SSLContext:
    """TLS client context (acquirer links, test terminals).

    The server is always verified against ``ca``; ``server_hostname_check``
    additionally requires the certificate to name the host dialled (or the
    ``server_hostname`` passed to ``open_connection``). ``cert``/``key`` add
    a client certificate for mutual TLS; ``key`` may be omitted when the
    certificate file also holds the key.
    """
    if key is not None and cert is None:
        raise ValueError("client_context: key given without cert")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _harden(ctx)
    ctx.check_hostname = server_hostname_check
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=str(ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert), None if key is None else str(key))
    return ctx


def peer_identity(ssl_object) -> str | None:
    """The verified client certificate's CN, or None.

    Accepts an ``ssl.SSLObject``/``ssl.SSLSocket`` or an asyncio transport.
    Only a certificate that passed verification counts (``getpeercert()``
    returns an empty dict otherwise); a subject with no CN, or with more
    than one, gives None because it names no single terminal.
    """
    if ssl_object is None:
        return None
    if not hasattr(ssl_object, "getpeercert") and hasattr(ssl_object, "get_extra_info"):
        ssl_object = ssl_object.get_extra_info("ssl_object")
        if ssl_object is None:
            return None
    try:
        peer = ssl_object.getpeercert()
    except (ValueError, ssl.SSLError):  # handshake not done
        return None
    if not peer:
        return None
    cns = [
        value
        for rdn in peer.get("subject", ())
        for attr, value in rdn
        if attr == "commonName"
    ]
    return cns[0] if len(cns) == 1 and cns[0] else None
