"""(g) The secure server's probe listener: plaintext, grpc.health.v1.Health only, no credentials
(what Kubernetes' native gRPC probes need), sharing the main server's health state."""

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import helloworld_pb2 as pb
import helloworld_pb2_grpc
from conftest import RPC_TIMEOUT, grpcurl_run


@pytest.fixture
def probe_channel(secure_greeter):
    with grpc.insecure_channel(secure_greeter.probe_addr) as ch:
        yield ch


@pytest.mark.parametrize("service", ["", "helloworld.Greeter"])
def test_probe_check_serving(probe_channel, service):
    resp = health_pb2_grpc.HealthStub(probe_channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=RPC_TIMEOUT)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING, resp


def test_probe_does_not_serve_greeter(probe_channel):
    stub = helloworld_pb2_grpc.GreeterStub(probe_channel)
    with pytest.raises(grpc.RpcError) as err:
        resp = stub.SayHello(pb.HelloRequest(name="you"), timeout=RPC_TIMEOUT)
        pytest.fail(f"SayHello on the probe port answered {resp!r}")
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED, (err.value.code(), err.value.details())


def test_probe_does_not_serve_reflection_v1(probe_channel):
    import reflection_v1_pb2 as r1
    import reflection_v1_pb2_grpc

    stub = reflection_v1_pb2_grpc.ServerReflectionStub(probe_channel)
    with pytest.raises(grpc.RpcError) as err:
        responses = list(stub.ServerReflectionInfo(iter([r1.ServerReflectionRequest(list_services="")]),
                                                   timeout=RPC_TIMEOUT))
        pytest.fail(f"reflection v1 on the probe port answered {responses!r}")
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED, (err.value.code(), err.value.details())


def test_grpcurl_list_on_probe_fails(grpcurl, secure_greeter, tmp_path):
    """grpcurl reaches the probe (plaintext) but finds no reflection service there."""
    res = grpcurl_run(grpcurl, tmp_path, "-plaintext", secure_greeter.probe_addr, "list")
    out = res.stdout + res.stderr
    assert res.returncode != 0, f"{res.args} exited 0:\n{out}"
    assert "server does not support the reflection API" in out, f"{res.args}:\n{out}"
