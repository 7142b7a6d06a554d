"""A client certificate revoked in a CRL (tls.client_crl_files) is refused at the handshake, seen
from grpcio, next to a certificate of the same CA that is not revoked. The CA, the certificates
and the CRL are made with Python's `cryptography`: an implementation independent of the server's
(rustls / webpki) and of the test suite's Rust side (rcgen)."""

import datetime

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import helloworld_pb2 as pb
import helloworld_pb2_grpc
from conftest import RPC_TIMEOUT, GreeterProcess, tls_channel, toml_str, two_free_ports

NOW = datetime.datetime.now(datetime.timezone.utc)
GOOD, REVOKED = 1001, 1002


def pem(cert):
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key):
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def issue(ca_key, ca_cert, serial, cn, usage, sans):
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(name(cn)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(serial)
            .not_valid_before(NOW - datetime.timedelta(days=1))
            .not_valid_after(NOW + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    out = tmp_path_factory.mktemp("crl-pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder()
          .subject_name(name("crl interop CA")).issuer_name(name("crl interop CA"))
          .public_key(ca_key.public_key()).serial_number(1)
          .not_valid_before(NOW - datetime.timedelta(days=1))
          .not_valid_after(NOW + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, key_cert_sign=True, crl_sign=True,
                                       encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
    server, server_key = issue(ca_key, ca, 2, "localhost", ExtendedKeyUsageOID.SERVER_AUTH,
                               [x509.DNSName("localhost")])
    clients = {serial: issue(ca_key, ca, serial, f"client-{serial}",
                             ExtendedKeyUsageOID.CLIENT_AUTH, [x509.DNSName(f"client-{serial}")])
               for serial in (GOOD, REVOKED)}
    revoked = (x509.RevokedCertificateBuilder().serial_number(REVOKED)
               .revocation_date(NOW - datetime.timedelta(hours=1)).build())
    crl = (x509.CertificateRevocationListBuilder()
           .issuer_name(ca.subject)
           .last_update(NOW - datetime.timedelta(hours=1))
           .next_update(NOW + datetime.timedelta(days=1))
           .add_revoked_certificate(revoked)
           .add_extension(x509.CRLNumber(1), critical=False)
           .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                          critical=False)
           .sign(ca_key, hashes.SHA256()))
    files = {
        "ca.pem": pem(ca), "server.pem": pem(server), "server.key": key_pem(server_key),
        "ca.crl": crl.public_bytes(serialization.Encoding.PEM),
    }
    for file, data in files.items():
        (out / file).write_bytes(data)
    return out, pem(ca), {serial: (pem(c), key_pem(k)) for serial, (c, k) in clients.items()}


@pytest.fixture(scope="module")
def crl_greeter(pki, tmp_path_factory):
    out, _ca, _clients = pki
    workdir = tmp_path_factory.mktemp("crl")
    port, probe_port = two_free_ports()
    probe_addr = f"127.0.0.1:{probe_port}"
    config = workdir / "greeter.toml"
    config.write_text(
        "[tls]\nenabled = true\n"
        f"cert = {toml_str(out / 'server.pem')}\nkey = {toml_str(out / 'server.key')}\n"
        f"client_ca = {toml_str(out / 'ca.pem')}\nclient_auth = \"required\"\n"
        f"client_crl_files = [{toml_str(out / 'ca.crl')}]\n"
        f"\n[probe]\nlisten = {toml_str(probe_addr)}\n")
    server = GreeterProcess(workdir / "server", config=config, health_addr=probe_addr, port=port)
    yield server
    server.stop()


def say_hello(server, pki, serial):
    _out, ca, clients = pki
    cert, key = clients[serial]
    with tls_channel(f"localhost:{server.port}", ca, private_key=key,
                     certificate_chain=cert) as ch:
        stub = helloworld_pb2_grpc.GreeterStub(ch)
        return stub.SayHello(pb.HelloRequest(name="crl"), timeout=RPC_TIMEOUT).message


def test_a_revoked_client_certificate_is_refused_and_another_is_served(crl_greeter, pki, capfd):
    assert say_hello(crl_greeter, pki, GOOD) == "Hello, crl!"
    capfd.readouterr()
    with pytest.raises(grpc.RpcError) as err:
        say_hello(crl_greeter, pki, REVOKED)
    # TLS 1.3: the client finishes its side of the handshake, then reads the server's fatal alert
    # where it expected data. grpcio's status says only that; its C core logs the alert itself
    # (BoringSSL's name for certificate_revoked, RFC 8446 alert 44) on stderr.
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
    assert "Unwrap failed (TSI_DATA_CORRUPTED)" in err.value.details(), err.value.details()
    assert "SSLV3_ALERT_CERTIFICATE_REVOKED" in capfd.readouterr().err
    # The server refused that handshake and serves on.
    assert say_hello(crl_greeter, pki, GOOD) == "Hello, crl!"
