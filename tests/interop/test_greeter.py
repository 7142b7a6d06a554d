"""(b) helloworld.Greeter through grpcio: unary, server streaming, bidi, name validation."""

import queue

import grpc
import pytest

import helloworld_pb2 as pb
from conftest import RPC_TIMEOUT


def req(name):
    return pb.HelloRequest(name=name)


def test_say_hello(greeter_stub):
    assert greeter_stub.SayHello(req("you"), timeout=RPC_TIMEOUT).message == "Hello, you!"


def test_say_hello_again(greeter_stub):
    assert greeter_stub.SayHelloAgain(req("you"), timeout=RPC_TIMEOUT).message == "Hello again, you!"


def test_empty_name_greets_world(greeter_stub):
    assert greeter_stub.SayHello(req(""), timeout=RPC_TIMEOUT).message == "Hello, world!"


def test_non_ascii_name_is_greeted(greeter_stub):
    name = "Grüße 世界"
    assert greeter_stub.SayHello(req(name), timeout=RPC_TIMEOUT).message == f"Hello, {name}!"


def test_stream_reply(greeter_stub):
    replies = [r.message for r in greeter_stub.SayHelloStreamReply(req("you"), timeout=RPC_TIMEOUT)]
    assert len(replies) > 1, replies
    assert replies[0] == "Hello, you!", replies
    assert all(r.endswith(", you!") for r in replies), replies


def test_bidi_stream_in_order(greeter_stub):
    call = greeter_stub.SayHelloBidiStream(iter([req("a"), req("b"), req("c")]), timeout=RPC_TIMEOUT)
    assert [r.message for r in call] == ["Hello, a!", "Hello, b!", "Hello, c!"]


def test_bidi_stream_replies_as_names_arrive(greeter_stub):
    """Lock-step: each name is sent only after the previous greeting came back, so a server
    that waits for the end of the request stream runs into the deadline."""
    sendq = queue.Queue()

    def requests():
        while True:
            item = sendq.get(timeout=RPC_TIMEOUT)
            if item is None:
                return
            yield item

    call = greeter_stub.SayHelloBidiStream(requests(), timeout=RPC_TIMEOUT)
    try:
        for name in ["x", "y", "z"]:
            sendq.put(req(name))
            assert next(call).message == f"Hello, {name}!"
        sendq.put(None)
        assert [r.message for r in call] == []
    finally:
        sendq.put(None)
        call.cancel()


BAD_NAMES = {"2000-bytes": "x" * 2000, "control-char-BEL": "a\x07b"}


@pytest.mark.parametrize("name", BAD_NAMES.values(), ids=BAD_NAMES.keys())
@pytest.mark.parametrize("rpc", ["SayHello", "SayHelloAgain", "SayHelloStreamReply"])
def test_invalid_name_is_invalid_argument(greeter_stub, rpc, name):
    with pytest.raises(grpc.RpcError) as err:
        result = getattr(greeter_stub, rpc)(req(name), timeout=RPC_TIMEOUT)
        if rpc == "SayHelloStreamReply":
            result = list(result)
        pytest.fail(f"{rpc} accepted the name and answered {result!r}")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.value.code(), err.value.details())
