"""(h) mTLS required (tls.client_auth = "required", client certificates verified against the dev
CA), on a server of this module's own; auth.mode stays "token", so calls still need a token."""

import grpc
import pytest

import helloworld_pb2 as pb
import helloworld_pb2_grpc
from conftest import RPC_TIMEOUT, start_secure_greeter, tls_channel


@pytest.fixture(scope="module")
def mtls_greeter(secure_material, tmp_path_factory):
    server, _probe = start_secure_greeter(tmp_path_factory.mktemp("mtls"), secure_material,
                                          client_auth="required")
    yield server
    server.stop()


def say_hello(mtls_greeter, secure_material, token, client_pki=None):
    pki = secure_material.pki
    client = {}
    if client_pki is not None:
        client = dict(private_key=client_pki.read("client_key"),
                      certificate_chain=client_pki.read("client_cert"))
    with tls_channel(f"localhost:{mtls_greeter.port}", pki.read("ca"), token, **client) as ch:
        stub = helloworld_pb2_grpc.GreeterStub(ch)
        return stub.SayHello(pb.HelloRequest(name="you"), timeout=RPC_TIMEOUT).message


def say_hello_error(*args, **kwargs):
    with pytest.raises(grpc.RpcError) as err:
        message = say_hello(*args, **kwargs)
        pytest.fail(f"SayHello answered {message!r}")
    return err.value


def test_client_cert_and_token(mtls_greeter, secure_material):
    assert say_hello(mtls_greeter, secure_material, secure_material.token,
                     client_pki=secure_material.pki) == "Hello, you!"


# TLS 1.3: the client finishes its side of the handshake, then reads the server's fatal alert
# (refused certificate) where it expected data. A server that is down or not speaking TLS fails
# differently ("Connection refused", "Socket closed").
REFUSED_CERT = "Unwrap failed (TSI_DATA_CORRUPTED)"


def test_no_client_cert_is_unavailable(mtls_greeter, secure_material):
    err = say_hello_error(mtls_greeter, secure_material, secure_material.token)
    assert err.code() == grpc.StatusCode.UNAVAILABLE, (err.code(), err.details())
    assert REFUSED_CERT in err.details(), err.details()
    # The same server, with the certificate: served.
    assert say_hello(mtls_greeter, secure_material, secure_material.token,
                     client_pki=secure_material.pki) == "Hello, you!"


def test_client_cert_of_unknown_ca_is_unavailable(mtls_greeter, secure_material, other_pki):
    err = say_hello_error(mtls_greeter, secure_material, secure_material.token, client_pki=other_pki)
    assert err.code() == grpc.StatusCode.UNAVAILABLE, (err.code(), err.details())
    assert REFUSED_CERT in err.details(), err.details()
    assert say_hello(mtls_greeter, secure_material, secure_material.token,
                     client_pki=secure_material.pki) == "Hello, you!"


def test_client_cert_without_token_is_unauthenticated(mtls_greeter, secure_material):
    """auth.mode = "token": the certificate gets the connection, not the call."""
    err = say_hello_error(mtls_greeter, secure_material, None, client_pki=secure_material.pki)
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED, (err.code(), err.details())
