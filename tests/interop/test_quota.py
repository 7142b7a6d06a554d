"""Per-caller quotas seen by grpcio: a token's burst, then RESOURCE_EXHAUSTED whose status details
(grpc-status-details-bin, read with grpcio-status' rpc_status.from_call) carry google.rpc.RetryInfo
and google.rpc.QuotaFailure. One token per 100 seconds, so the test's own pace cannot refill a
bucket; the readiness probe uses the probe port, which is never counted."""

import grpc
import pytest
from google.rpc import code_pb2, error_details_pb2
from grpc_status import rpc_status

import helloworld_pb2 as pb
import helloworld_pb2_grpc
from conftest import RPC_TIMEOUT, GreeterProcess, new_token, secure_config, tls_channel, two_free_ports

BURST = 3


@pytest.fixture(scope="module")
def quota_greeter(secure_material, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("quota")
    tokens_file = workdir / "tokens.toml"
    tokens = {name: new_token(tokens_file, name, ["greeter"]) for name in ("alice", "bob")}
    port, probe_port = two_free_ports()
    probe_addr = f"127.0.0.1:{probe_port}"
    config = secure_config(workdir / "greeter.toml", secure_material.pki, tokens_file, probe_addr)
    with open(config, "a") as f:
        f.write(f"\n[quota]\nenabled = true\nrate = 0.01\nburst = {BURST}\n"
                '\n[quota.methods."/helloworld.Greeter/SayHelloAgain"]\nrate = 0.01\nburst = 1\n')
    server = GreeterProcess(workdir / "server", config=config, health_addr=probe_addr, port=port)
    yield server, tokens
    server.stop()


def call(server, secure_material, token, method="SayHello"):
    target = f"localhost:{server.port}"
    with tls_channel(target, secure_material.pki.read("ca"), token) as ch:
        stub = helloworld_pb2_grpc.GreeterStub(ch)
        return getattr(stub, method)(pb.HelloRequest(name="q"), timeout=RPC_TIMEOUT).message


def refused(server, secure_material, token, method="SayHello"):
    with pytest.raises(grpc.RpcError) as err:
        message = call(server, secure_material, token, method)
        pytest.fail(f"{method} answered {message!r}")
    return err.value


def details(err):
    """The RetryInfo and QuotaFailure of a refused call's status details."""
    status = rpc_status.from_call(err)
    assert status is not None, "no grpc-status-details-bin"
    assert status.code == code_pb2.RESOURCE_EXHAUSTED
    assert status.message == err.details()
    found = {}
    for detail in status.details:
        for kind in (error_details_pb2.RetryInfo, error_details_pb2.QuotaFailure):
            if detail.Is(kind.DESCRIPTOR):
                message = kind()
                detail.Unpack(message)
                found[kind.__name__] = message
    return found["RetryInfo"], found["QuotaFailure"]


def test_a_burst_then_resource_exhausted_with_retry_info(quota_greeter, secure_material):
    server, tokens = quota_greeter
    for _ in range(BURST):
        assert call(server, secure_material, tokens["alice"]) == "Hello, q!"
    err = refused(server, secure_material, tokens["alice"])
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (err.code(), err.details())
    assert err.details().startswith(
        "over quota: quota of this caller: 0.01 calls per second, burst 3; retry in "), err.details()
    retry, failure = details(err)
    delay = retry.retry_delay.ToTimedelta().total_seconds()
    assert 90 < delay <= 100, delay
    assert [v.subject for v in failure.violations] == ["caller:token"]
    assert "burst 3" in failure.violations[0].description

    # bob's bucket is his own.
    assert call(server, secure_material, tokens["bob"]) == "Hello, q!"


def test_a_method_quota_names_the_method(quota_greeter, secure_material):
    server, tokens = quota_greeter
    assert call(server, secure_material, tokens["bob"], "SayHelloAgain") == "Hello again, q!"
    err = refused(server, secure_material, tokens["bob"], "SayHelloAgain")
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (err.code(), err.details())
    _retry, failure = details(err)
    assert [v.subject for v in failure.violations] == ["method:/helloworld.Greeter/SayHelloAgain"]
