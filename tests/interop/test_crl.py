"""A client certificate revoked in a CRL (tls.client_crl_files) is refused at the handshake, seen
from grpcio, next to a certificate of the same CA that is not revoked; a CRL reloaded while grpcio
channels are connected closes the revoked certificate's connection and no other. The CA, the
certificates and the CRLs are made with Python's `cryptography`: an implementation independent of
the server's (rustls / webpki) and of the test suite's Rust side (rcgen)."""

import datetime
import json
import queue
import threading

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

    def crl_of(number, serials):
        """A PEM CRL of the CA, numbered `number`, revoking `serials`."""
        builder = (x509.CertificateRevocationListBuilder()
                   .issuer_name(ca.subject)
                   .last_update(NOW - datetime.timedelta(hours=1))
                   .next_update(NOW + datetime.timedelta(days=1))
                   .add_extension(x509.CRLNumber(number), critical=False)
                   .add_extension(
                       x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False))
        for serial in serials:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial)
                .revocation_date(NOW - datetime.timedelta(hours=1)).build())
        return builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    files = {
        "ca.pem": pem(ca), "server.pem": pem(server), "server.key": key_pem(server_key),
        "ca.crl": crl_of(1, [REVOKED]),
    }
    for file, data in files.items():
        (out / file).write_bytes(data)
    clients = {serial: (pem(c), key_pem(k)) for serial, (c, k) in clients.items()}
    return out, pem(ca), clients, crl_of


@pytest.fixture(scope="module")
def crl_greeter(pki, tmp_path_factory):
    out = pki[0]
    server = start_crl_greeter(pki, out / "ca.crl", tmp_path_factory.mktemp("crl"))
    yield server
    server.stop()


def start_crl_greeter(pki, crl, workdir, extra_tls=""):
    """A greeter requiring client certificates of the test CA, checked against the CRL file `crl`."""
    out = pki[0]
    port, probe_port = two_free_ports()
    probe_addr = f"127.0.0.1:{probe_port}"
    config = workdir / "greeter.toml"
    config.write_text(
        "[tls]\nenabled = true\n"
        f"cert = {toml_str(out / 'server.pem')}\nkey = {toml_str(out / 'server.key')}\n"
        f"client_ca = {toml_str(out / 'ca.pem')}\nclient_auth = \"required\"\n"
        f"client_crl_files = [{toml_str(crl)}]\n{extra_tls}"
        f"\n[probe]\nlisten = {toml_str(probe_addr)}\n")
    return GreeterProcess(workdir / "server", config=config, health_addr=probe_addr, port=port)


def channel_as(server, pki, serial):
    _out, ca, clients, _crl_of = pki
    cert, key = clients[serial]
    return tls_channel(f"localhost:{server.port}", ca, private_key=key, certificate_chain=cert)


def say_hello(server, pki, serial):
    with channel_as(server, pki, serial) as ch:
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


class Connectivity:
    """The connectivity states a grpcio channel goes through, as grpcio reports them."""

    def __init__(self, channel):
        """Subscribes to `channel`, which is connected: returns once grpcio has said READY."""
        self.states = []
        self.ready, self.left_ready = threading.Event(), threading.Event()
        channel.subscribe(self._seen, try_to_connect=False)
        assert self.ready.wait(RPC_TIMEOUT), self.states

    def _seen(self, state):
        self.states.append(state)
        if state == grpc.ChannelConnectivity.READY:
            self.ready.set()
        elif self.ready.is_set():
            self.left_ready.set()

    def since_ready(self):
        ready = self.states.index(grpc.ChannelConnectivity.READY)
        return self.states[ready:]


class OpenStream:
    """A SayHelloBidiStream held open: one greeting per name put."""

    def __init__(self, stub):
        self.names = queue.Queue()
        self.replies = stub.SayHelloBidiStream(iter(self.names.get, None), timeout=RPC_TIMEOUT * 3)

    def greet(self, name):
        self.names.put(pb.HelloRequest(name=name))
        return next(self.replies).message

    def finish(self):
        self.names.put(None)
        assert list(self.replies) == []


def revocation_lines(server):
    return [json.loads(line) for line in server.stderr_path.read_text().splitlines()
            if "no longer trusted" in line]


def test_a_crl_reloaded_under_open_channels_fails_the_revoked_ones_next_call_only(pki, tmp_path):
    crl_of = pki[3]
    crl = tmp_path / "ca.crl"
    crl.write_bytes(crl_of(1, []))
    server = start_crl_greeter(pki, crl, tmp_path, extra_tls='reload_interval = "100ms"\n')
    try:
        with channel_as(server, pki, GOOD) as good, channel_as(server, pki, REVOKED) as revoked:
            good_stub = helloworld_pb2_grpc.GreeterStub(good)
            revoked_stub = helloworld_pb2_grpc.GreeterStub(revoked)
            hello = pb.HelloRequest(name="crl")
            assert revoked_stub.SayHello(hello, timeout=RPC_TIMEOUT).message == "Hello, crl!"
            stream = OpenStream(good_stub)
            assert stream.greet("before") == "Hello, before!"
            good_states, revoked_states = Connectivity(good), Connectivity(revoked)

            staged = tmp_path / "ca.crl.new"
            staged.write_bytes(crl_of(2, [REVOKED]))
            staged.replace(crl)
            # The server sends GOAWAY and closes the connection (no call in flight); grpcio sees
            # its channel leave READY.
            assert revoked_states.left_ready.wait(RPC_TIMEOUT), revoked_states.states
            with pytest.raises(grpc.RpcError) as err:
                revoked_stub.SayHello(hello, timeout=RPC_TIMEOUT)
            # The reconnection's handshake is refused by the CRL, as in the test above.
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()

            assert stream.greet("after") == "Hello, after!"
            assert good_stub.SayHello(hello, timeout=RPC_TIMEOUT).message == "Hello, crl!"
            stream.finish()
            assert good_states.since_ready() == [grpc.ChannelConnectivity.READY], \
                good_states.states
    finally:
        server.stop()
    lines = revocation_lines(server)
    assert [line["subject"] for line in lines] == ["CN=client-1002"], lines
    assert lines[0]["level"] == "WARN", lines
