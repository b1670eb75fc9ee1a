"""Development PKI and TLS contexts, exercised over real sockets on 127.0.0.1."""
from __future__ import annotations

import asyncio
import os
import ssl
import stat

import pytest

from switch import certs
from switch.certs import (
    client_context,
    ensure_dev_pki,
    issue_cert,
    load_cert,
    load_key,
    make_ca,
    make_crl,
    peer_identity,
    server_context,
    write_pem,
)

pytestmark = pytest.mark.timeout(60)

FILES = ("ca_cert", "ca_key", "server_cert", "server_key", "client_cert",
         "client_key", "acquirer_cert", "acquirer_key")
KEYS = ("ca_key", "server_key", "client_key", "acquirer_key")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return ensure_dev_pki(tmp_path_factory.mktemp("state"))


async def _exchange(server_ctx, client_ctx, *, server_hostname="localhost", payload=b"ping\n"):
    """Run one TLS server and one client; return (identities seen by the server, client outcome).

    The outcome is the echoed bytes, or the exception the client saw. With
    TLS 1.3 the client's side of the handshake completes before the server
    has judged its certificate, so a refusal can surface on the first read
    (an alert or EOF) rather than in open_connection; either way the server's
    connection callback must never run, because asyncio calls it only after
    a successful handshake.
    """
    seen: list[str | None] = []

    async def handle(reader, writer):
        seen.append(peer_identity(writer.get_extra_info("ssl_object")))
        try:
            line = await reader.readline()
            writer.write(line)
            await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(
        handle, "127.0.0.1", 0, ssl=server_ctx, ssl_handshake_timeout=5
    )
    port = server.sockets[0].getsockname()[1]
    try:
        async def client():
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=client_ctx, server_hostname=server_hostname,
                ssl_handshake_timeout=5,
            )
            try:
                writer.write(payload)
                await writer.drain()
                return await reader.readline()
            finally:
                writer.close()
                try:
                    await writer.wait_closed()
                except (ssl.SSLError, ConnectionError):
                    pass

        try:
            outcome = await asyncio.wait_for(client(), 10)
        except (ssl.SSLError, ConnectionError, OSError) as exc:
            outcome = exc
        # Let a server-side handshake that is still finishing run its course.
        await asyncio.sleep(0.05)
    finally:
        server.close()
        await server.wait_closed()
    return seen, outcome


def exchange(server_ctx, client_ctx, **kw):
    return asyncio.run(_exchange(server_ctx, client_ctx, **kw))


def assert_refused(seen, outcome):
    assert seen == [], "the server accepted a connection it should have refused"
    assert isinstance(outcome, Exception) or outcome == b"", outcome


def _mtls_server(pki, **kw):
    return server_context(pki.server_cert, pki.server_key, pki.ca_cert, **kw)


# --------------------------------------------------------------------------
# mutual TLS


def test_client_with_dev_ca_cert_exchanges_bytes(pki):
    seen, outcome = exchange(
        _mtls_server(pki), client_context(pki.ca_cert, pki.client_cert, pki.client_key)
    )
    assert outcome == b"ping\n"
    assert seen == [certs.SAMPLE_TERMINAL_CN]


def test_peer_identity_is_terminal_cn(pki):
    seen, _ = exchange(_mtls_server(pki), client_context(pki.ca_cert, pki.client_cert, pki.client_key))
    assert seen == ["TERM0001"]


def test_issue_client_cert_for_extra_terminal(pki):
    cert, key = pki.issue_client_cert("TERM0002")
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    seen, outcome = exchange(_mtls_server(pki), client_context(pki.ca_cert, cert, key))
    assert (seen, outcome) == (["TERM0002"], b"ping\n")
    # reused while valid
    before = os.stat(cert).st_mtime_ns
    assert pki.issue_client_cert("TERM0002") == (cert, key)
    assert os.stat(cert).st_mtime_ns == before


@pytest.mark.parametrize("cn", ["", "../evil", "a/b", "x" * 65, ".hidden"])
def test_issue_client_cert_rejects_unsafe_cn(pki, cn):
    with pytest.raises(ValueError):
        pki.issue_client_cert(cn)


def test_client_without_cert_is_refused(pki):
    assert_refused(*exchange(_mtls_server(pki), client_context(pki.ca_cert)))


def test_optional_client_cert_gives_no_identity(pki):
    seen, outcome = exchange(
        _mtls_server(pki, require_client_cert=False), client_context(pki.ca_cert)
    )
    assert (seen, outcome) == ([None], b"ping\n")


def test_client_cert_from_foreign_ca_is_refused(pki, tmp_path):
    foreign_ca, foreign_key = make_ca("someone else's CA")
    cert, key = issue_cert(foreign_ca, foreign_key, "TERM0001", server=False, client=True)
    write_pem(tmp_path / "c.crt", cert)
    write_pem(tmp_path / "c.key", key)
    assert_refused(*exchange(
        _mtls_server(pki), client_context(pki.ca_cert, tmp_path / "c.crt", tmp_path / "c.key")
    ))


def test_expired_client_cert_is_refused(pki, tmp_path):
    cert, key = issue_cert(load_cert(pki.ca_cert), load_key(pki.ca_key), "TERM0009",
                           server=False, client=True, days=-1)
    write_pem(tmp_path / "c.crt", cert)
    write_pem(tmp_path / "c.key", key)
    assert_refused(*exchange(
        _mtls_server(pki), client_context(pki.ca_cert, tmp_path / "c.crt", tmp_path / "c.key")
    ))


def test_server_only_cert_is_refused_as_client_cert(pki):
    # The acquirer simulator's certificate has EKU serverAuth only.
    assert_refused(*exchange(
        _mtls_server(pki), client_context(pki.ca_cert, pki.acquirer_cert, pki.acquirer_key)
    ))


def test_revoked_client_cert_is_refused(pki, tmp_path):
    ca_cert, ca_key = load_cert(pki.ca_cert), load_key(pki.ca_key)
    revoked_path, revoked_key = pki.issue_client_cert("TERM0666")
    good_path, good_key = pki.issue_client_cert("TERM0007")
    crl_path = write_pem(tmp_path / "ca.crl",
                         make_crl(ca_cert, ca_key, [load_cert(revoked_path).serial_number]))

    server = _mtls_server(pki, crl=crl_path)
    assert_refused(*exchange(server, client_context(pki.ca_cert, revoked_path, revoked_key)))
    seen, outcome = exchange(server, client_context(pki.ca_cert, good_path, good_key))
    assert (seen, outcome) == (["TERM0007"], b"ping\n")


def test_crl_without_client_ca_is_an_error(pki, tmp_path):
    with pytest.raises(ValueError):
        server_context(pki.server_cert, pki.server_key, None, crl=tmp_path / "x.crl")


# --------------------------------------------------------------------------
# server verification by the client


def test_client_refuses_server_from_foreign_ca(pki, tmp_path):
    foreign_ca, foreign_key = make_ca("foreign")
    write_pem(tmp_path / "foreign.crt", foreign_ca)
    seen, outcome = exchange(
        _mtls_server(pki, require_client_cert=False), client_context(tmp_path / "foreign.crt")
    )
    assert isinstance(outcome, ssl.SSLCertVerificationError), outcome
    assert seen == []


def test_client_checks_server_hostname(pki):
    server = _mtls_server(pki, require_client_cert=False)
    seen, outcome = exchange(server, client_context(pki.ca_cert), server_hostname="acquirer.example")
    assert isinstance(outcome, ssl.SSLCertVerificationError), outcome
    seen, outcome = exchange(
        server, client_context(pki.ca_cert, server_hostname_check=False),
        server_hostname="acquirer.example",
    )
    assert outcome == b"ping\n"


def test_acquirer_cert_serves_tls(pki):
    server = server_context(pki.acquirer_cert, pki.acquirer_key, None)
    _, outcome = exchange(server, client_context(pki.ca_cert))
    assert outcome == b"ping\n"


# --------------------------------------------------------------------------
# protocol versions and ciphers


def _tls11_client(ca):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_1
    ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # OpenSSL 3 disables TLS < 1.2 at level 1+
    return ctx


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_tls11_client_is_refused(pki):
    try:
        client = _tls11_client(pki.ca_cert)
        permissive = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        permissive.load_cert_chain(pki.server_cert, pki.server_key)
        permissive.minimum_version = ssl.TLSVersion.TLSv1_1
        permissive.set_ciphers("DEFAULT:@SECLEVEL=0")
    except (ValueError, ssl.SSLError) as exc:
        pytest.skip(f"local OpenSSL cannot build a TLS 1.1 context: {exc}")
    # Only meaningful if this OpenSSL can speak TLS 1.1 at all.
    _, probe = exchange(permissive, client)
    if probe != b"ping\n":
        pytest.skip(f"local OpenSSL cannot negotiate TLS 1.1 even when allowed: {probe!r}")

    seen, outcome = exchange(_mtls_server(pki, require_client_cert=False), client)
    assert seen == []
    # OpenSSL answers with a protocol_version alert or just drops the socket.
    assert isinstance(outcome, (ssl.SSLError, ConnectionError)), outcome


def test_tls12_client_negotiates_ecdhe_aead(pki):
    client = client_context(pki.ca_cert, pki.client_cert, pki.client_key)
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    negotiated = []

    async def run():
        server = await asyncio.start_server(
            lambda r, w: w.close(), "127.0.0.1", 0, ssl=_mtls_server(pki)
        )
        port = server.sockets[0].getsockname()[1]
        async with server:
            _, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=client, server_hostname="localhost"
            )
            so = writer.get_extra_info("ssl_object")
            negotiated.append((so.version(), so.cipher()[0]))
            writer.close()

    asyncio.run(asyncio.wait_for(run(), 10))
    version, cipher = negotiated[0]
    assert version == "TLSv1.2"
    assert cipher.startswith("ECDHE-") and ("GCM" in cipher or "CHACHA20" in cipher)


@pytest.mark.parametrize("which", ["server", "client"])
def test_context_settings(pki, which):
    ctx = _mtls_server(pki) if which == "server" else client_context(pki.ca_cert)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.options & ssl.OP_NO_COMPRESSION
    for c in ctx.get_ciphers():
        if c["protocol"] == "TLSv1.3":
            continue
        assert c["kea"] == "kx-ecdhe", c["name"]
        assert c["aead"], c["name"]


def test_server_without_client_ca_does_not_ask_for_certs(pki):
    ctx = server_context(pki.server_cert, pki.server_key, None)
    assert ctx.verify_mode == ssl.CERT_NONE


# --------------------------------------------------------------------------
# ensure_dev_pki


def _snapshot(pki):
    return {f: (os.stat(getattr(pki, f)).st_mtime_ns, os.stat(getattr(pki, f)).st_ino) for f in FILES}


def test_ensure_dev_pki_is_idempotent(tmp_path):
    first = ensure_dev_pki(tmp_path)
    before = _snapshot(first)
    second = ensure_dev_pki(tmp_path)
    assert second == first
    assert _snapshot(second) == before


def test_key_files_are_private(pki):
    for f in KEYS:
        assert stat.S_IMODE(os.stat(getattr(pki, f)).st_mode) == 0o600, f
    assert stat.S_IMODE(os.stat(pki.dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(pki.ca_cert).st_mode) == 0o644


def test_dev_certificates_have_the_expected_extensions(pki):
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    ca = load_cert(pki.ca_cert)
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign
    ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)

    server = load_cert(pki.server_cert)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)][:1] == ["127.0.0.1"]
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]

    client = load_cert(pki.client_cert)
    eku = client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    server.verify_directly_issued_by(ca)
    client.verify_directly_issued_by(ca)


def test_expired_leaf_is_reissued_others_kept(tmp_path):
    pki = ensure_dev_pki(tmp_path)
    ca_cert, ca_key = load_cert(pki.ca_cert), load_key(pki.ca_key)
    cert, key = issue_cert(ca_cert, ca_key, "localhost", server=True, client=False, days=10)
    write_pem(pki.server_key, key)
    write_pem(pki.server_cert, cert)  # inside the renewal window
    before = _snapshot(pki)

    ensure_dev_pki(tmp_path)
    after = _snapshot(pki)
    assert after["server_cert"] != before["server_cert"]
    assert after["server_key"] != before["server_key"]
    for f in FILES:
        if not f.startswith("server"):
            assert after[f] == before[f], f
    renewed = load_cert(pki.server_cert)
    assert renewed.serial_number != cert.serial_number
    assert renewed.not_valid_after_utc > cert.not_valid_after_utc


def test_replaced_ca_reissues_every_leaf(tmp_path):
    pki = ensure_dev_pki(tmp_path)
    old_client = load_cert(pki.client_cert)
    pki.ca_key.unlink()
    ensure_dev_pki(tmp_path)
    new_ca = load_cert(pki.ca_cert)
    new_client = load_cert(pki.client_cert)
    assert new_client.serial_number != old_client.serial_number
    new_client.verify_directly_issued_by(new_ca)


def test_mismatched_key_is_repaired(tmp_path):
    pki = ensure_dev_pki(tmp_path)
    _, stray = make_ca("stray")
    write_pem(pki.client_key, stray)
    ensure_dev_pki(tmp_path)
    seen, outcome = exchange(_mtls_server(pki), client_context(pki.ca_cert, pki.client_cert, pki.client_key))
    assert (seen, outcome) == (["TERM0001"], b"ping\n")


def test_peer_identity_without_tls_or_cert():
    assert peer_identity(None) is None

    class Transport:
        def get_extra_info(self, name):
            return None

    assert peer_identity(Transport()) is None
