"""(d) Server reflection: grpcurl without any proto file (grpcurl 1.8.6 speaks v1alpha) and a
Python client of grpc.reflection.v1 (stubs from protos/reflection_v1.proto)."""

import json
import subprocess

import grpc
from google.protobuf import descriptor_pb2

from conftest import REFLECTION_SERVICES, RPC_TIMEOUT, SUBPROCESS_TIMEOUT, missing_greeter_rpcs

def run_grpcurl(grpcurl, cwd, *args):
    # No -proto / -protoset / -import-path: everything comes from the server's reflection.
    argv = [grpcurl, "-plaintext", "-max-time", str(int(RPC_TIMEOUT)), *args]
    res = subprocess.run(argv, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                         timeout=SUBPROCESS_TIMEOUT)
    assert res.returncode == 0, f"{argv} exited {res.returncode}:\n{res.stdout}{res.stderr}"
    return res.stdout


def test_grpcurl_list(grpcurl, greeter, tmp_path):
    services = set(run_grpcurl(grpcurl, tmp_path, greeter.addr, "list").split())
    assert {"helloworld.Greeter", "grpc.health.v1.Health"} <= services, services
    assert services & REFLECTION_SERVICES, services


def test_grpcurl_describe_greeter(grpcurl, greeter, tmp_path):
    out = run_grpcurl(grpcurl, tmp_path, greeter.addr, "describe", "helloworld.Greeter")
    missing = missing_greeter_rpcs(out)
    assert not missing, f"describe lacks {missing}:\n{out}"


def test_grpcurl_say_hello(grpcurl, greeter, tmp_path):
    out = run_grpcurl(grpcurl, tmp_path, "-d", '{"name":"you"}', greeter.addr, "helloworld.Greeter/SayHello")
    assert json.loads(out) == {"message": "Hello, you!"}, out


def test_grpcurl_health_check(grpcurl, greeter, tmp_path):
    out = run_grpcurl(grpcurl, tmp_path, "-d", '{"service":"helloworld.Greeter"}', greeter.addr,
                      "grpc.health.v1.Health/Check")
    assert json.loads(out) == {"status": "SERVING"}, out


def reflect_v1(channel, request):
    import reflection_v1_pb2_grpc

    stub = reflection_v1_pb2_grpc.ServerReflectionStub(channel)
    responses = list(stub.ServerReflectionInfo(iter([request]), timeout=RPC_TIMEOUT))
    assert len(responses) == 1, responses
    return responses[0]


def test_v1_list_services(channel):
    import reflection_v1_pb2 as r1

    resp = reflect_v1(channel, r1.ServerReflectionRequest(list_services=""))
    assert resp.WhichOneof("message_response") == "list_services_response", resp
    services = {s.name for s in resp.list_services_response.service}
    assert {"helloworld.Greeter", "grpc.health.v1.Health"} <= services, services
    assert services & REFLECTION_SERVICES, services


def test_v1_file_containing_symbol(channel):
    import reflection_v1_pb2 as r1

    resp = reflect_v1(channel, r1.ServerReflectionRequest(file_containing_symbol="helloworld.Greeter"))
    assert resp.WhichOneof("message_response") == "file_descriptor_response", resp
    files = [descriptor_pb2.FileDescriptorProto.FromString(b)
             for b in resp.file_descriptor_response.file_descriptor_proto]
    services = [s for f in files if f.package == "helloworld" for s in f.service if s.name == "Greeter"]
    assert len(services) == 1, [f.name for f in files]
    methods = {m.name: (m.input_type, m.output_type, m.client_streaming, m.server_streaming)
               for m in services[0].method}
    req, rep = ".helloworld.HelloRequest", ".helloworld.HelloReply"
    assert methods == {
        "SayHello": (req, rep, False, False),
        "SayHelloAgain": (req, rep, False, False),
        "SayHelloStreamReply": (req, rep, False, True),
        "SayHelloBidiStream": (req, rep, True, True),
    }


def test_v1_unknown_symbol_is_not_found(channel):
    """The reflection spec answers with an in-stream error_response; tonic-reflection (0.14)
    instead ends the stream with status NOT_FOUND. grpcurl and grpc-go accept both, so do we."""
    import reflection_v1_pb2 as r1
    import reflection_v1_pb2_grpc

    stub = reflection_v1_pb2_grpc.ServerReflectionStub(channel)
    request = r1.ServerReflectionRequest(file_containing_symbol="no.such.Symbol")
    try:
        responses = list(stub.ServerReflectionInfo(iter([request]), timeout=RPC_TIMEOUT))
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.NOT_FOUND, (e.code(), e.details())
        return
    assert len(responses) == 1, responses
    resp = responses[0]
    assert resp.WhichOneof("message_response") == "error_response", resp
    assert resp.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0], resp
