"""(c) grpc.health.v1.Health through grpcio-health-checking."""

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import RPC_TIMEOUT

SERVING = health_pb2.HealthCheckResponse.SERVING


def status_name(status):
    return health_pb2.HealthCheckResponse.ServingStatus.Name(status)


@pytest.mark.parametrize("service", ["", "helloworld.Greeter"])
def test_check_serving(channel, service):
    stub = health_pb2_grpc.HealthStub(channel)
    resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=RPC_TIMEOUT)
    assert resp.status == SERVING, status_name(resp.status)


def test_check_unknown_service_is_not_found(channel):
    stub = health_pb2_grpc.HealthStub(channel)
    with pytest.raises(grpc.RpcError) as err:
        resp = stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=RPC_TIMEOUT)
        pytest.fail(f"Check(no.such.Service) answered {status_name(resp.status)}")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND, (err.value.code(), err.value.details())


def test_watch_reports_serving(channel):
    stub = health_pb2_grpc.HealthStub(channel)
    call = stub.Watch(health_pb2.HealthCheckRequest(service="helloworld.Greeter"), timeout=RPC_TIMEOUT)
    try:
        first = next(call)
    finally:
        call.cancel()
    assert first.status == SERVING, status_name(first.status)
