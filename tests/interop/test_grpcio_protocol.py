"""(i) Python grpcio beyond the happy path: rich error details (google.rpc.BadRequest read with
grpcio-status), deadlines (the client's and the server's default) on every kind of RPC.
Compression: see the note at the end."""

import socket
import threading
import time

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

import helloworld_pb2 as pb
import helloworld_pb2_grpc
from conftest import RPC_TIMEOUT, GreeterProcess


def req(name):
    return pb.HelloRequest(name=name)


# ---- rich error details -----------------------------------------------------------------------

BAD_NAMES = {
    "2000-bytes": ("x" * 2000, "name is 2000 bytes long; the maximum is 1024 bytes"),
    "control-char-BEL": ("a\x07b", "name contains a control character (U+0007) at byte 1"),
}


def bad_request_of(err):
    """The google.rpc.BadRequest of an RpcError, through grpc_status.rpc_status.from_call (which
    also checks that the grpc-status-details-bin trailer agrees with the call's code and message)."""
    status = rpc_status.from_call(err)
    assert status is not None, f"no grpc-status-details-bin trailer: {err.code()} {err.details()!r}"
    assert status.code == err.code().value[0] and status.message == err.details(), status
    assert len(status.details) == 1, status
    bad_request = error_details_pb2.BadRequest()
    assert status.details[0].Is(bad_request.DESCRIPTOR), status.details[0].type_url
    status.details[0].Unpack(bad_request)
    return bad_request


@pytest.mark.parametrize("name, message", BAD_NAMES.values(), ids=BAD_NAMES.keys())
@pytest.mark.parametrize("rpc", ["SayHello", "SayHelloAgain", "SayHelloStreamReply"])
def test_invalid_name_carries_bad_request(greeter_stub, rpc, name, message):
    with pytest.raises(grpc.RpcError) as err:
        result = getattr(greeter_stub, rpc)(req(name), timeout=RPC_TIMEOUT)
        if rpc == "SayHelloStreamReply":
            result = list(result)
        pytest.fail(f"{rpc} accepted the name and answered {result!r}")
    err = err.value
    assert (err.code(), err.details()) == (grpc.StatusCode.INVALID_ARGUMENT, message)
    violations = bad_request_of(err).field_violations
    assert len(violations) == 1, violations
    assert violations[0].field == "name", violations
    assert violations[0].description == err.details(), violations


def test_bidi_invalid_name_ends_stream_with_bad_request(greeter_stub):
    """The earlier names are greeted, then the stream ends with the detailed status."""
    name, message = BAD_NAMES["2000-bytes"]
    call = greeter_stub.SayHelloBidiStream(iter([req("a"), req(name), req("c")]), timeout=RPC_TIMEOUT)
    replies = []
    with pytest.raises(grpc.RpcError) as err:
        for reply in call:
            replies.append(reply.message)
    assert replies == ["Hello, a!"], replies
    assert (err.value.code(), err.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, message)
    violations = bad_request_of(err.value).field_violations
    assert [(v.field, v.description) for v in violations] == [("name", message)], violations


def test_other_errors_have_no_details(greeter_stub, channel):
    """An unknown method gets a plain status: from_call finds no details to read."""
    unknown = channel.unary_unary("/helloworld.Greeter/NoSuchMethod",
                                  request_serializer=pb.HelloRequest.SerializeToString,
                                  response_deserializer=pb.HelloReply.FromString)
    with pytest.raises(grpc.RpcError) as err:
        unknown(req("you"), timeout=RPC_TIMEOUT)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED, err.value
    assert rpc_status.from_call(err.value) is None


# ---- deadlines --------------------------------------------------------------------------------
# A server of its own whose stream is slow: two greetings three seconds apart, and a server-side
# default deadline of 1 s for calls that bring none (the bidi stream keeps its "none" override).
#
# grpcio enforces a deadline it sends itself, so a call with the client's SHORT_DEADLINE shows what
# a grpcio caller sees, not that the server ends it. What only the server can do is checked with
# calls whose deadline the server decides or must honour: its default (test_stream_without_
# deadline_gets_the_server_default) and a client deadline longer than that default
# (test_stream_within_its_deadline_completes); tests/limits.rs does the rest with raw HTTP/2.

STREAM_INTERVAL = 3.0
SERVER_DEFAULT_DEADLINE = 1.0
SHORT_DEADLINE = 0.3  # the client's, in seconds
DEADLINE_BOUND = 3.0  # a call past its deadline must be over within this many seconds of its start
# How late after the server's deadline the status may arrive: generous, and well short of the
# stream interval, so a server that only looks at the deadline between messages is caught.
DEADLINE_SLACK = 1.0


@pytest.fixture(scope="module")
def slow_greeter(tmp_path_factory):
    server = GreeterProcess(tmp_path_factory.mktemp("slow"), env={
        "GREETER__GREETER__STREAM_INTERVAL": f"{STREAM_INTERVAL:g}s",
        "GREETER__GREETER__STREAM_GREETINGS": "Hello,Bonjour",
        "GREETER__DEADLINE__DEFAULT": f"{int(SERVER_DEFAULT_DEADLINE * 1000)}ms",
    })
    yield server
    server.stop()


@pytest.fixture(scope="module")
def slow_stub(slow_greeter):
    with grpc.insecure_channel(slow_greeter.addr) as ch:
        yield helloworld_pb2_grpc.GreeterStub(ch)


def collect_until_error(call, start=None):
    """(replies, RpcError or None, seconds) of a reply stream, read to its end; the seconds are
    counted from `start` (a monotonic time taken before the call was made) when given."""
    start, replies = time.monotonic() if start is None else start, []
    try:
        for reply in call:
            replies.append(reply.message)
    except grpc.RpcError as e:
        return replies, e, time.monotonic() - start
    return replies, None, time.monotonic() - start


def bounded(call, seconds=RPC_TIMEOUT):
    """Cancels the call after `seconds`, for calls that carry no deadline of their own."""
    timer = threading.Timer(seconds, call.cancel)
    timer.daemon = True
    timer.start()
    return timer


def test_unary_with_deadline_works(slow_stub):
    for timeout in (SHORT_DEADLINE, RPC_TIMEOUT):
        assert slow_stub.SayHello(req("you"), timeout=timeout).message == "Hello, you!"
        assert slow_stub.SayHelloAgain(req("you"), timeout=timeout).message == "Hello again, you!"


def test_stream_deadline_exceeded_after_first_reply(slow_stub):
    replies, err, took = collect_until_error(slow_stub.SayHelloStreamReply(req("you"),
                                                                           timeout=SHORT_DEADLINE))
    assert err is not None, f"stream completed within {SHORT_DEADLINE} s: {replies}"
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED, (err.code(), err.details())
    assert replies == ["Hello, you!"], replies
    assert took < DEADLINE_BOUND, took
    # The server serves on.
    assert slow_stub.SayHello(req("you"), timeout=RPC_TIMEOUT).message == "Hello, you!"


def test_stream_within_its_deadline_completes(slow_stub):
    """The client's deadline (10 s, sent as grpc-timeout) replaces the server's 1 s default: a
    server that ignored grpc-timeout would end the stream after 1 s."""
    replies, err, took = collect_until_error(slow_stub.SayHelloStreamReply(req("you"),
                                                                           timeout=RPC_TIMEOUT))
    assert err is None, (err.code(), err.details(), replies)
    assert replies == ["Hello, you!", "Bonjour, you!"], replies
    assert took >= STREAM_INTERVAL * 0.9, took


def test_stream_without_deadline_gets_the_server_default(slow_stub):
    """No grpc-timeout from the client: the server's default ends the stream after the first
    greeting, at 1 s and not at the second greeting (3 s)."""
    # From before the call: the server's clock starts when the request arrives, after this.
    started = time.monotonic()
    call = slow_stub.SayHelloStreamReply(req("you"))
    timer = bounded(call)
    try:
        replies, err, took = collect_until_error(call, started)
    finally:
        timer.cancel()
    assert err is not None, f"stream completed despite the server's default deadline: {replies}"
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED, (err.code(), err.details(), replies)
    assert err.details() == "deadline exceeded after 1s", err.details()  # the server's words
    assert replies == ["Hello, you!"], replies
    assert SERVER_DEFAULT_DEADLINE <= took < SERVER_DEFAULT_DEADLINE + DEADLINE_SLACK, took


def test_bidi_deadline_with_request_stream_open(slow_stub):
    """One name greeted, then the client keeps its side open and sends nothing: the deadline
    ends the call."""
    release = threading.Event()

    def requests():
        yield req("a")
        release.wait(RPC_TIMEOUT)  # held open until the test is over (bounded all the same)

    try:
        replies, err, took = collect_until_error(
            slow_stub.SayHelloBidiStream(requests(), timeout=SHORT_DEADLINE))
    finally:
        release.set()
    assert err is not None, f"bidi stream ended without error: {replies}"
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED, (err.code(), err.details())
    assert replies == ["Hello, a!"], replies
    assert took < DEADLINE_BOUND, took
    assert slow_stub.SayHello(req("you"), timeout=RPC_TIMEOUT).message == "Hello, you!"


def test_bidi_within_its_deadline_completes(slow_stub):
    call = slow_stub.SayHelloBidiStream(iter([req("a"), req("b"), req("c")]), timeout=RPC_TIMEOUT)
    assert [r.message for r in call] == ["Hello, a!", "Hello, b!", "Hello, c!"]


# ---- compression ------------------------------------------------------------------------------
# The default config accepts gzip and zstd requests, and gzips unary replies of 512 bytes or more
# for clients that accept gzip (grpcio does by default); with min_reply_bytes = 0 every reply,
# streamed ones included.


@pytest.mark.parametrize("compression", [grpc.Compression.Gzip, grpc.Compression.Deflate])
def test_compressed_requests(greeter_stub, compression):
    if compression == grpc.Compression.Deflate:
        # Not offered by the server: refused as the compression spec says, not misread.
        with pytest.raises(grpc.RpcError) as err:
            greeter_stub.SayHello(req("you"), timeout=RPC_TIMEOUT, compression=compression)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED, err.value
        return
    reply = greeter_stub.SayHello(req("x" * 800), timeout=RPC_TIMEOUT, compression=compression)
    assert reply.message == "Hello, " + "x" * 800 + "!"


@pytest.fixture(scope="module")
def gzip_greeter(tmp_path_factory):
    server = GreeterProcess(tmp_path_factory.mktemp("gzip"), env={
        "GREETER__COMPRESSION__SEND": "gzip",
        "GREETER__COMPRESSION__MIN_REPLY_BYTES": "0",
    })
    yield server
    server.stop()


@pytest.fixture(scope="module")
def plain_greeter(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("plain")
    config = workdir / "plain.toml"
    config.write_text("[compression]\nsend = []\n")
    server = GreeterProcess(workdir, config=config)
    yield server
    server.stop()


class CountingRelay:
    """A TCP relay in front of a server that counts the bytes the server sends back: what
    grpcio does not show, whether replies travelled compressed."""

    def __init__(self, target):
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.addr = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.from_server = 0
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        client, _ = self.listener.accept()
        upstream = socket.create_connection(self.target)
        threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
        threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, source, sink, count):
        try:
            while data := source.recv(65536):
                if count:
                    with self.lock:
                        self.from_server += len(data)
                sink.sendall(data)
        except OSError:
            pass  # the other side went away: the call is over
        finally:
            source.close()
            sink.close()


def bytes_for_one_long_reply(server):
    """Bytes the server sends on a connection of its own carrying one SayHello whose reply is
    807 bytes long (plus connection setup, headers and trailers)."""
    relay = CountingRelay(server.addr)
    with grpc.insecure_channel(relay.addr, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
        stub = helloworld_pb2_grpc.GreeterStub(ch)
        assert stub.SayHello(req("y" * 800), timeout=RPC_TIMEOUT).message == "Hello, " + "y" * 800 + "!"
    with relay.lock:
        return relay.from_server


def test_gzip_replies_decode_in_grpcio(gzip_greeter, plain_greeter):
    # grpcio hides grpc-encoding from the application (tests/greeter.rs asserts the header): the
    # bytes on the wire show the reply travelled gzipped, next to a server that sends it plain.
    compressed, plain = bytes_for_one_long_reply(gzip_greeter), bytes_for_one_long_reply(plain_greeter)
    assert plain > 807 > 400 > compressed, (plain, compressed)
    # grpcio's decoder reads the compressed replies, streamed ones too.
    with grpc.insecure_channel(gzip_greeter.addr, compression=grpc.Compression.Gzip) as ch:
        stub = helloworld_pb2_grpc.GreeterStub(ch)
        replies = [r.message for r in stub.SayHelloStreamReply(req("z"), timeout=RPC_TIMEOUT)]
        assert replies and all(r.endswith(", z!") for r in replies), replies
