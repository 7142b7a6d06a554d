"""(e) TLS + bearer tokens through grpcio: the default auth policy on the secure server
(health open, helloworld.Greeter needs scope "greeter", reflection needs "reflection"), and
TLS failures (unknown CA, plaintext client)."""

import os

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import helloworld_pb2 as pb
import helloworld_pb2_grpc
from conftest import RPC_TIMEOUT, greeter_cli, tls_channel

GREETER_RPCS = ["SayHello", "SayHelloAgain", "SayHelloStreamReply", "SayHelloBidiStream"]


def call(channel, rpc, names=("you",), metadata=None):
    """Calls a Greeter RPC and returns the reply messages as a list."""
    stub = helloworld_pb2_grpc.GreeterStub(channel)
    kwargs = dict(timeout=RPC_TIMEOUT, metadata=metadata)
    if rpc == "SayHelloBidiStream":
        return [r.message for r in stub.SayHelloBidiStream(iter([pb.HelloRequest(name=n) for n in names]), **kwargs)]
    (name,) = names
    if rpc == "SayHelloStreamReply":
        return [r.message for r in stub.SayHelloStreamReply(pb.HelloRequest(name=name), **kwargs)]
    return [getattr(stub, rpc)(pb.HelloRequest(name=name), **kwargs).message]


def call_error(channel, rpc, **kwargs):
    with pytest.raises(grpc.RpcError) as err:
        replies = call(channel, rpc, **kwargs)
        pytest.fail(f"{rpc} succeeded with {replies!r}")
    return err.value


def ca(secure_greeter):
    return secure_greeter.pki.read("ca")


# ---- authorized ---------------------------------------------------------------------------------

def test_say_hello(secure_greeter):
    with tls_channel(secure_greeter.target, ca(secure_greeter), secure_greeter.token) as ch:
        assert call(ch, "SayHello") == ["Hello, you!"]


def test_say_hello_again(secure_greeter):
    with tls_channel(secure_greeter.target, ca(secure_greeter), secure_greeter.token) as ch:
        assert call(ch, "SayHelloAgain") == ["Hello again, you!"]


def test_stream_reply(secure_greeter):
    with tls_channel(secure_greeter.target, ca(secure_greeter), secure_greeter.token) as ch:
        replies = call(ch, "SayHelloStreamReply")
    assert len(replies) > 1, replies
    assert replies[0] == "Hello, you!", replies
    assert all(r.endswith(", you!") for r in replies), replies


def test_bidi_stream(secure_greeter):
    with tls_channel(secure_greeter.target, ca(secure_greeter), secure_greeter.token) as ch:
        assert call(ch, "SayHelloBidiStream", names=["a", "b", "c"]) == [
            "Hello, a!", "Hello, b!", "Hello, c!"]


def test_health_is_open_without_token(secure_greeter):
    with tls_channel(secure_greeter.target, ca(secure_greeter)) as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""),
                                                    timeout=RPC_TIMEOUT)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING, resp


def test_reflection_scope_is_enough_for_reflection(secure_greeter):
    """The reflection-only token is valid: it lists services through reflection v1."""
    import reflection_v1_pb2 as r1
    import reflection_v1_pb2_grpc

    with tls_channel(secure_greeter.target, ca(secure_greeter), secure_greeter.reflection_token) as ch:
        stub = reflection_v1_pb2_grpc.ServerReflectionStub(ch)
        responses = list(stub.ServerReflectionInfo(iter([r1.ServerReflectionRequest(list_services="")]),
                                                   timeout=RPC_TIMEOUT))
    assert len(responses) == 1, responses
    services = {s.name for s in responses[0].list_services_response.service}
    assert "helloworld.Greeter" in services, responses[0]


def test_greeter_cli_over_tls(secure_greeter, tmp_path):
    """The binary's own client: `greeter hello --ca --token` (token through GREETER_TOKEN)."""
    res = greeter_cli("hello", "you", "--addr", secure_greeter.target, "--ca", secure_greeter.pki.ca,
                      "--timeout", f"{RPC_TIMEOUT:.0f}s", cwd=tmp_path,
                      env=dict(os.environ, GREETER_TOKEN=secure_greeter.token))
    assert res.stdout == "Hello, you!\n", res.stdout + res.stderr


# ---- refused by the auth policy -----------------------------------------------------------------

@pytest.mark.parametrize("rpc", GREETER_RPCS)
def test_no_token_is_unauthenticated(secure_greeter, rpc):
    with tls_channel(secure_greeter.target, ca(secure_greeter)) as ch:
        err = call_error(ch, rpc)
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED, (err.code(), err.details())


@pytest.mark.parametrize("rpc", GREETER_RPCS)
def test_token_without_greeter_scope_is_permission_denied(secure_greeter, rpc):
    with tls_channel(secure_greeter.target, ca(secure_greeter), secure_greeter.reflection_token) as ch:
        err = call_error(ch, rpc)
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED, (err.code(), err.details())


def test_unknown_token_is_unauthenticated(secure_greeter):
    bogus = secure_greeter.token[:-4] + ("AAAA" if not secure_greeter.token.endswith("AAAA") else "BBBB")
    with tls_channel(secure_greeter.target, ca(secure_greeter), bogus) as ch:
        err = call_error(ch, "SayHello")
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED, (err.code(), err.details())


@pytest.mark.parametrize("header", ["Basic dXNlcjpwYXNz", "{token}", "Bearer"],
                         ids=["basic-scheme", "no-scheme", "no-token"])
def test_malformed_authorization_is_unauthenticated(secure_greeter, header):
    value = header.format(token=secure_greeter.token)
    with tls_channel(secure_greeter.target, ca(secure_greeter)) as ch:
        err = call_error(ch, "SayHello", metadata=[("authorization", value)])
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED, (err.code(), err.details())


def test_tokens_file_holds_no_token(secure_greeter):
    text = secure_greeter.tokens_file.read_text()
    assert text.count("[[tokens]]") == 2, text
    for token in (secure_greeter.token, secure_greeter.reflection_token):
        assert token not in text


# ---- TLS failures -------------------------------------------------------------------------------

def test_unknown_ca_is_unavailable(secure_greeter, other_pki):
    """A client trusting another CA (with a token that would be accepted) does not connect."""
    with tls_channel(secure_greeter.target, other_pki.read("ca"), secure_greeter.token) as ch:
        err = call_error(ch, "SayHello")
    assert err.code() == grpc.StatusCode.UNAVAILABLE, (err.code(), err.details())
    # The certificate was refused, not e.g. a handshake with something that is not TLS.
    assert "CERTIFICATE_VERIFY_FAILED" in err.details(), err.details()


def test_plaintext_client_on_tls_port_is_unavailable(secure_greeter):
    with grpc.insecure_channel(secure_greeter.target,
                               options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
        err = call_error(ch, "SayHello")
    assert err.code() == grpc.StatusCode.UNAVAILABLE, (err.code(), err.details())
    # The port accepted the connection and closed it on the HTTP/2 preface (a down server
    # refuses the connection instead).
    assert err.details().endswith(": Socket closed"), err.details()
    with tls_channel(secure_greeter.target, ca(secure_greeter), secure_greeter.token) as ch:
        reply = helloworld_pb2_grpc.GreeterStub(ch).SayHello(pb.HelloRequest(name="you"),
                                                             timeout=RPC_TIMEOUT)
    assert reply.message == "Hello, you!"
