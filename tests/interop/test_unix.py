"""The Unix domain socket listener (server.unix), called the way sidecars in other languages would:
grpcio's `unix:` target, grpcurl's -unix flag, and greeter's own CLI. The socket's mode is the
access control, so it is checked too.

grpcio (since 1.57) and grpcurl 1.8.6 send the socket path as `:authority`, which is not a valid
HTTP/2 authority; hyper's h2 refuses such a stream with PROTOCOL_ERROR (hyperium/h2#487, open).
Clients therefore name the authority `localhost`, as grpc-go and Kubernetes do for Unix sockets:
grpcio's `grpc.default_authority` option, grpcurl's `-authority`. README.md says so, and the
server logs a WARN naming the option when it refuses such a call."""

import json
import os
import stat
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import helloworld_pb2 as pb
import helloworld_pb2_grpc
from conftest import RPC_TIMEOUT, GreeterProcess, greeter_cli, grpcurl_run


@pytest.fixture(scope="module")
def unix_greeter(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("unix")
    socket_path = workdir / "greeter.sock"
    server = GreeterProcess(workdir, env={
        "GREETER__SERVER__UNIX": str(socket_path),
        "GREETER__SERVER__UNIX_MODE": "0660",
    })
    server.socket_path = socket_path
    yield server
    server.stop()


@pytest.fixture
def unix_channel(unix_greeter):
    options = [("grpc.default_authority", "localhost")]
    with grpc.insecure_channel(f"unix:{unix_greeter.socket_path}", options=options) as ch:
        yield ch


def test_grpcio_without_default_authority_is_refused_and_the_server_says_why(unix_greeter):
    with grpc.insecure_channel(f"unix:{unix_greeter.socket_path}") as ch:
        with pytest.raises(grpc.RpcError) as refused:
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=RPC_TIMEOUT)
    assert refused.value.code() == grpc.StatusCode.INTERNAL, refused.value
    deadline = time.monotonic() + 5
    while "grpc.default_authority" not in unix_greeter.stderr_path.read_text():
        assert time.monotonic() < deadline, unix_greeter.stderr_path.read_text()
        time.sleep(0.05)
    warnings = [json.loads(line) for line in unix_greeter.stderr_path.read_text().splitlines()
                if "grpc.default_authority" in line]
    assert len(warnings) == 1 and warnings[0]["level"] == "WARN", warnings
    assert "h2#487" in warnings[0]["message"], warnings


def test_socket_has_the_configured_mode(unix_greeter):
    st = os.stat(unix_greeter.socket_path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660


def test_grpcio_unary_and_streams_over_the_socket(unix_channel):
    stub = helloworld_pb2_grpc.GreeterStub(unix_channel)
    assert stub.SayHello(pb.HelloRequest(name="you"), timeout=RPC_TIMEOUT).message == "Hello, you!"
    assert stub.SayHelloAgain(pb.HelloRequest(name="you"),
                              timeout=RPC_TIMEOUT).message == "Hello again, you!"
    greetings = [r.message for r in stub.SayHelloStreamReply(pb.HelloRequest(name="you"),
                                                              timeout=RPC_TIMEOUT)]
    assert len(greetings) == 10 and greetings[0] == "Hello, you!", greetings
    names = ["a", "b", "c"]
    replies = [r.message for r in stub.SayHelloBidiStream(
        iter(pb.HelloRequest(name=n) for n in names), timeout=RPC_TIMEOUT)]
    assert replies == [f"Hello, {n}!" for n in names]


def test_grpcio_health_over_the_socket(unix_channel):
    resp = health_pb2_grpc.HealthStub(unix_channel).Check(
        health_pb2.HealthCheckRequest(service="helloworld.Greeter"), timeout=RPC_TIMEOUT)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_grpcurl_over_the_socket(grpcurl, unix_greeter, tmp_path):
    res = grpcurl_run(grpcurl, tmp_path, "-plaintext", "-unix", "-authority", "localhost", "-d", '{"name": "unix"}',
                      str(unix_greeter.socket_path), "helloworld.Greeter/SayHello")
    assert res.returncode == 0, res.stdout + res.stderr
    assert '"message": "Hello, unix!"' in res.stdout, res.stdout


def test_greeter_cli_over_the_socket(unix_greeter, tmp_path):
    res = greeter_cli("health", "--addr", f"unix:{unix_greeter.socket_path}", cwd=tmp_path)
    assert "SERVING" in res.stdout, res.stdout + res.stderr


def test_socket_is_removed_when_the_server_stops(tmp_path):
    socket_path = tmp_path / "gone.sock"
    server = GreeterProcess(tmp_path, env={"GREETER__SERVER__UNIX": str(socket_path)})
    assert socket_path.exists()
    assert server.stop(), "the server exits on SIGTERM"
    assert not socket_path.exists()
