"""Certificate identities ([[auth.cert_rules]]): client certificates with SPIFFE IDs as URI SANs,
made by `greeter certs generate --client-uri-san`, presented by grpcio.

One greeter of this module's own: TLS with mTLS required, auth.mode = "client_cert", the client CA
a bundle of two dev CAs (one per client certificate). The rule uri =
spiffe://cluster.local/ns/shop/* grants "greeter"; a certificate no rule matches gets
client_cert_scopes = ["reflection"] (the fallback) and nothing else.
"""

import json
import time
from pathlib import Path

import grpc
import pytest

import helloworld_pb2 as pb
import helloworld_pb2_grpc
from conftest import (RPC_TIMEOUT, GreeterProcess, greeter_cli, toml_str, tls_channel,
                      two_free_ports)

CHECKOUT = "spiffe://cluster.local/ns/shop/sa/checkout"
WEB = "spiffe://cluster.local/ns/web/sa/frontend"


def pki_with_uri(out, uri):
    greeter_cli("certs", "generate", "--out", out, "--host", "localhost",
                "--client-uri-san", uri, cwd=Path(out).parent)
    return Path(out)


@pytest.fixture(scope="module")
def spiffe_greeter(tmp_path_factory):
    base = tmp_path_factory.mktemp("spiffe")
    shop = pki_with_uri(base / "shop", CHECKOUT)
    web = pki_with_uri(base / "web", WEB)
    bundle = base / "client-ca.pem"
    bundle.write_bytes((shop / "ca.pem").read_bytes() + (web / "ca.pem").read_bytes())
    port, probe_port = two_free_ports()
    probe_addr = f"127.0.0.1:{probe_port}"
    config = base / "greeter.toml"
    config.write_text(
        "[tls]\n"
        "enabled = true\n"
        f"cert = {toml_str(shop / 'server.pem')}\n"
        f"key = {toml_str(shop / 'server.key')}\n"
        f"client_ca = {toml_str(bundle)}\n"
        'client_auth = "required"\n'
        "\n[auth]\n"
        "enabled = true\n"
        'mode = "client_cert"\n'
        'client_cert_scopes = ["reflection"]\n'
        "\n[[auth.cert_rules]]\n"
        'uri = "spiffe://cluster.local/ns/shop/*"\n'
        'scopes = ["greeter"]\n'
        "\n[probe]\n"
        f"listen = {toml_str(probe_addr)}\n")
    server = GreeterProcess(base / "server", config=config, health_addr=probe_addr, port=port)
    server.pkis = {"shop": shop, "web": web}
    yield server
    server.stop()


def channel(server, who):
    pki = server.pkis[who]
    return tls_channel(f"localhost:{server.port}", (server.pkis["shop"] / "ca.pem").read_bytes(),
                       private_key=(pki / "client.key").read_bytes(),
                       certificate_chain=(pki / "client.pem").read_bytes())


def say_hello(server, who, request_id=None):
    metadata = [("x-request-id", request_id)] if request_id else None
    with channel(server, who) as ch:
        stub = helloworld_pb2_grpc.GreeterStub(ch)
        return stub.SayHello(pb.HelloRequest(name="you"), timeout=RPC_TIMEOUT,
                             metadata=metadata).message


def list_services(server, who, request_id=None):
    import reflection_v1_pb2 as r1
    import reflection_v1_pb2_grpc

    metadata = [("x-request-id", request_id)] if request_id else None
    with channel(server, who) as ch:
        stub = reflection_v1_pb2_grpc.ServerReflectionStub(ch)
        replies = stub.ServerReflectionInfo(iter([r1.ServerReflectionRequest(list_services="")]),
                                            timeout=RPC_TIMEOUT, metadata=metadata)
        return [s.name for reply in replies for s in reply.list_services_response.service]


def denied(call, *args):
    with pytest.raises(grpc.RpcError) as err:
        answer = call(*args)
        pytest.fail(f"answered {answer!r}")
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, (err.value.code(),
                                                                   err.value.details())
    return err.value.details()


def test_spiffe_id_a_rule_matches_gets_its_scopes(spiffe_greeter):
    assert say_hello(spiffe_greeter, "shop") == "Hello, you!"
    # The rule's scopes only: the fallback is for certificates no rule matches.
    assert CHECKOUT in denied(list_services, spiffe_greeter, "shop")


def test_spiffe_id_no_rule_matches_gets_the_fallback(spiffe_greeter):
    assert WEB in denied(say_hello, spiffe_greeter, "web")
    assert "helloworld.Greeter" in list_services(spiffe_greeter, "web")


def access_line(server, request_id):
    """The access line of the call whose x-request-id is `request_id` (waits up to 5 s)."""
    deadline = time.monotonic() + 5
    while True:
        for line in server.stderr_path.read_text(errors="replace").splitlines():
            if request_id in line:
                event = json.loads(line)
                if event.get("request_id") == request_id and "identity" in event:
                    return event
        if time.monotonic() > deadline:
            pytest.fail(f"no access line for request {request_id}")
        time.sleep(0.05)


def test_access_line_names_the_spiffe_id(spiffe_greeter):
    # Each call's own line, found by the request id it sent: the log already names both IDs
    # from the other tests.
    say_hello(spiffe_greeter, "shop", request_id="cert-rules-shop")
    list_services(spiffe_greeter, "web", request_id="cert-rules-web")
    assert access_line(spiffe_greeter, "cert-rules-shop")["identity"] == CHECKOUT
    assert access_line(spiffe_greeter, "cert-rules-web")["identity"] == WEB
