"""OpenTelemetry traces ([tracing], src/ops/telemetry/, src/call/observe/trace.rs) checked against
real OTLP receivers built from the official opentelemetry-proto definitions (PyPI's
opentelemetry-proto): a grpcio server implementing
opentelemetry.proto.collector.trace.v1.TraceService, and an http.server taking OTLP/HTTP
protobuf at /v1/traces. What the server exports is decoded and compared with what the calls did.
"""

import json
import re
import threading
import time
import urllib.request
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

import helloworld_pb2
import helloworld_pb2_grpc
from conftest import (RPC_TIMEOUT, GreeterProcess, free_port, greeter_cli, make_pki, new_token,
                      tls_channel, toml_str)

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN_ID = "00f067aa0ba902b7"
SAMPLED = f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"
WAIT = 10.0  # seconds for spans to reach a receiver (batches leave every 100 ms here)


class Receiver:
    """Spans the greeter exported, with the metadata or headers of each export."""

    def __init__(self):
        self.lock = threading.Lock()
        self.resource_spans = []
        self.headers = []
        self.delay = 0.0

    def take(self, request_bytes, headers):
        request = trace_service_pb2.ExportTraceServiceRequest.FromString(request_bytes)
        with self.lock:
            self.resource_spans.extend(request.resource_spans)
            self.headers.append(headers)

    def spans(self):
        with self.lock:
            return [s for rs in self.resource_spans for ss in rs.scope_spans for s in ss.spans]

    def wait_for(self, predicate, what, timeout=WAIT):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [s for s in self.spans() if predicate(s)]
            if found:
                return found
            time.sleep(0.05)
        names = sorted({s.name for s in self.spans()})
        pytest.fail(f"no span {what} within {timeout:.0f} s; spans seen: {names}", pytrace=False)


class GrpcReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, port=None, credentials=None):
        self.received = Receiver()
        self.released = threading.Event()  # ends every delayed Export at once
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        addr = f"127.0.0.1:{port or 0}"
        if credentials is None:
            self.port = self.server.add_insecure_port(addr)
        else:
            self.port = self.server.add_secure_port(addr, credentials)
        self.server.start()

    def Export(self, request, context):
        if self.received.delay:
            self.released.wait(self.received.delay)
        self.received.take(request.SerializeToString(), dict(context.invocation_metadata()))
        return trace_service_pb2.ExportTraceServiceResponse()

    def stop(self):
        self.released.set()
        self.server.stop(grace=None).wait(5)


class HttpReceiver:
    def __init__(self):
        self.received = received = Receiver()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"]))
                if self.path != "/v1/traces" or \
                        self.headers["content-type"] != "application/x-protobuf":
                    self.send_response(404)
                else:
                    received.take(body, {k.lower(): v for k, v in self.headers.items()})
                    self.send_response(200)
                    self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def tracing_config(path, endpoint, **keys):
    """A config file turning tracing on towards `endpoint`, batches leaving every 100 ms."""
    settings = {"enabled": True, "endpoint": endpoint, "scheduled_delay": "100ms",
                "service_instance_id": "greeter-test-0", **keys}
    sections = {"tracing": settings}
    for key in list(settings):
        if "." in key:
            section, name = key.split(".", 1)
            sections.setdefault(section, {})[name] = settings.pop(key)
    text = ""
    for section, values in sections.items():
        text += f"[{section}]\n"
        for name, value in values.items():
            written = toml_str(value) if isinstance(value, Path) else json.dumps(value)
            text += f"{name} = {written}\n"
    Path(path).write_text(text)
    return Path(path)


def attrs(span_or_resource):
    out = {}
    for kv in span_or_resource.attributes:
        value = kv.value
        out[kv.key] = getattr(value, value.WhichOneof("value"))
    return out


def named(name):
    return lambda span: span.name == name


@pytest.fixture(scope="module")
def receiver():
    server = GrpcReceiver()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def traced(tmp_path_factory, receiver):
    """A greeter tracing everything to `receiver`, returning the trace id to callers, with a
    probe port whose checks are not traced (the default)."""
    workdir = tmp_path_factory.mktemp("traced")
    probe = f"127.0.0.1:{free_port()}"
    config = tracing_config(workdir / "tracing.toml", f"http://127.0.0.1:{receiver.port}",
                            response_header=True, service_instance_id="traced-0",
                            **{"probe.listen": probe})
    server = GreeterProcess(workdir, config=config, health_addr=probe, env={
        "GREETER__GREETER__STREAM_INTERVAL": "50ms", "GREETER__LOG__FORMAT": "json"})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def traced_stub(traced):
    with grpc.insecure_channel(traced.addr) as channel:
        yield helloworld_pb2_grpc.GreeterStub(channel)


def test_the_callers_trace_is_continued_with_the_rpc_conventions(traced, traced_stub, receiver):
    reply, call = traced_stub.SayHello.with_call(
        helloworld_pb2.HelloRequest(name="otel"), timeout=RPC_TIMEOUT,
        metadata=[("traceparent", SAMPLED), ("tracestate", "vendor=1")])
    assert reply.message
    returned = dict(call.initial_metadata())["greeter-trace-id"]
    assert returned == TRACE_ID

    [span] = receiver.received.wait_for(
        lambda s: s.name == "helloworld.Greeter/SayHello" and s.trace_id.hex() == TRACE_ID,
        "for the caller's SayHello")
    assert span.parent_span_id.hex() == PARENT_SPAN_ID
    assert span.trace_state == "vendor=1"
    assert span.kind == trace_pb2.Span.SPAN_KIND_SERVER
    a = attrs(span)
    assert a["rpc.system"] == "grpc"
    assert a["rpc.service"] == "helloworld.Greeter"
    assert a["rpc.method"] == "SayHello"
    assert a["rpc.grpc.status_code"] == 0
    assert a["network.peer.address"] == "127.0.0.1"
    assert a["network.peer.port"] > 0
    assert a["greeter.auth"] == "none"
    assert a["greeter.request_id"] == dict(call.initial_metadata())["x-request-id"]
    assert (a["greeter.messages_received"], a["greeter.messages_sent"]) == (1, 1)
    assert span.status.code == trace_pb2.Status.STATUS_CODE_UNSET

    rs = next(rs for rs in receiver.received.resource_spans
              if any(span in ss.spans for ss in rs.scope_spans))
    resource = attrs(rs.resource)
    assert resource["service.name"] == "greeter"
    assert resource["service.version"]
    assert resource["service.instance.id"] == "traced-0"

    # The access line names the trace too.
    deadline = time.monotonic() + WAIT
    while TRACE_ID not in traced.stderr_path.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = [json.loads(line) for line in traced.stderr_path.read_text().splitlines()
             if TRACE_ID in line]
    assert lines and lines[0]["trace_id"] == TRACE_ID, lines


def test_grpc_trace_bin_is_read_when_there_is_no_traceparent(traced_stub, receiver):
    trace_id = "8af7651916cd43dd8448eb211c80319c"
    span_id = "53995c3f42cd8ad8"
    value = (b"\x00\x00" + bytes.fromhex(trace_id) + b"\x01" + bytes.fromhex(span_id)
             + b"\x02\x01")
    traced_stub.SayHello(helloworld_pb2.HelloRequest(name="census"), timeout=RPC_TIMEOUT,
                         metadata=[("grpc-trace-bin", value)])
    [span] = receiver.received.wait_for(lambda s: s.trace_id.hex() == trace_id,
                                        "from grpc-trace-bin")
    assert span.parent_span_id.hex() == span_id


def test_traceparent_wins_over_grpc_trace_bin(traced_stub, receiver):
    trace_id, parent = "9af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    bin_trace_id = "aaf7651916cd43dd8448eb211c80319c"
    value = (b"\x00\x00" + bytes.fromhex(bin_trace_id) + b"\x01"
             + bytes.fromhex("53995c3f42cd8ad8") + b"\x02\x01")
    traced_stub.SayHello(helloworld_pb2.HelloRequest(name="both"), timeout=RPC_TIMEOUT,
                         metadata=[("grpc-trace-bin", value),
                                   ("traceparent", f"00-{trace_id}-{parent}-01")])
    [span] = receiver.received.wait_for(lambda s: s.trace_id.hex() == trace_id,
                                        "from traceparent")
    assert span.parent_span_id.hex() == parent
    assert not [s for s in receiver.received.spans() if s.trace_id.hex() == bin_trace_id]


def test_connect_calls_are_traced(traced, receiver):
    trace_id = "baf7651916cd43dd8448eb211c80319c"
    request = urllib.request.Request(
        f"http://{traced.addr}/helloworld.Greeter/SayHello",
        data=json.dumps({"name": "connect"}).encode(),
        headers={"content-type": "application/json",
                 "traceparent": f"00-{trace_id}-b7ad6b7169203331-01"})
    with urllib.request.urlopen(request, timeout=RPC_TIMEOUT) as response:
        assert json.loads(response.read()) == {"message": "Hello, connect!"}
    [span] = receiver.received.wait_for(lambda s: s.trace_id.hex() == trace_id, "for Connect")
    assert span.name == "helloworld.Greeter/SayHello"
    assert attrs(span)["rpc.grpc.status_code"] == 0
    assert attrs(span)["greeter.auth"] == "none"


def test_the_span_says_how_the_caller_authenticated(tmp_path, receiver):
    endpoint = f"http://127.0.0.1:{receiver.port}"
    tokens = tmp_path / "tokens.toml"
    tokens.write_text("")
    token = new_token(tokens, "traced-caller", ["greeter"])
    config = tracing_config(tmp_path / "token.toml", endpoint,
                            **{"auth.enabled": True, "auth.tokens_file": tokens})
    # The same server takes JWTs from a development issuer too (greeter jwt keygen / mint).
    greeter_cli("jwt", "keygen", "--key", tmp_path / "jwt.key", "--jwks", tmp_path / "jwks.json",
                cwd=tmp_path)
    with open(config, "a") as f:
        f.write('[[auth.jwt.issuers]]\nissuer = "https://traced.example"\n'
                f'jwks_file = {toml_str(tmp_path / "jwks.json")}\naudiences = ["greeter"]\n'
                '[[auth.jwt.rules]]\nclaim = "sub"\npattern = "*"\nscopes = ["greeter"]\n')
    jwt = greeter_cli("jwt", "mint", "--key", tmp_path / "jwt.key", "--iss",
                      "https://traced.example", "--sub", "traced-workload", "--aud", "greeter",
                      cwd=tmp_path).stdout.strip()
    jwt_trace = "eaf7651916cd43dd8448eb211c80319c"
    pki = make_pki(tmp_path / "pki")
    probe = f"127.0.0.1:{free_port()}"
    mtls = tracing_config(tmp_path / "mtls.toml", endpoint,
                          **{"tls.enabled": True, "tls.cert": pki.server_cert,
                             "tls.key": pki.server_key, "tls.client_ca": pki.ca,
                             "tls.client_auth": "required", "probe.listen": probe})
    token_trace, cert_trace = "caf7651916cd43dd8448eb211c80319c", "daf7651916cd43dd8448eb211c80319c"
    server = GreeterProcess(tmp_path / "token", config=config)
    try:
        with grpc.insecure_channel(server.addr) as channel:
            helloworld_pb2_grpc.GreeterStub(channel).SayHello(
                helloworld_pb2.HelloRequest(name="token"), timeout=RPC_TIMEOUT,
                metadata=[("authorization", f"Bearer {token}"),
                          ("traceparent", f"00-{token_trace}-b7ad6b7169203331-01")])
            helloworld_pb2_grpc.GreeterStub(channel).SayHello(
                helloworld_pb2.HelloRequest(name="jwt"), timeout=RPC_TIMEOUT,
                metadata=[("authorization", f"Bearer {jwt}"),
                          ("traceparent", f"00-{jwt_trace}-b7ad6b7169203331-01")])
    finally:
        server.stop()
    server = GreeterProcess(tmp_path / "mtls", config=mtls, health_addr=probe)
    try:
        with tls_channel(f"localhost:{server.port}", pki.ca.read_bytes(),
                         private_key=pki.client_key.read_bytes(),
                         certificate_chain=pki.client_cert.read_bytes()) as channel:
            helloworld_pb2_grpc.GreeterStub(channel).SayHello(
                helloworld_pb2.HelloRequest(name="cert"), timeout=RPC_TIMEOUT,
                metadata=[("traceparent", f"00-{cert_trace}-b7ad6b7169203331-01")])
    finally:
        server.stop()
    cases = [(token_trace, "token"), (jwt_trace, "jwt"), (cert_trace, "client_cert")]
    for trace_id, auth in cases:
        [span] = receiver.received.wait_for(lambda s: s.trace_id.hex() == trace_id, auth)
        assert attrs(span)["greeter.auth"] == auth


def test_a_stream_counts_its_messages_and_a_client_error_leaves_the_status_unset(
        traced_stub, receiver):
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    replies = list(traced_stub.SayHelloStreamReply(
        helloworld_pb2.HelloRequest(name="stream"), timeout=RPC_TIMEOUT,
        metadata=[("traceparent", f"00-{trace_id}-b7ad6b7169203331-01")]))
    [span] = receiver.received.wait_for(
        lambda s: s.trace_id.hex() == trace_id, "for the stream")
    a = attrs(span)
    assert span.name == "helloworld.Greeter/SayHelloStreamReply"
    assert (a["greeter.messages_received"], a["greeter.messages_sent"]) == (1, len(replies))
    assert len(replies) > 1

    bad_trace = "1af7651916cd43dd8448eb211c80319c"
    with pytest.raises(grpc.RpcError) as e:
        traced_stub.SayHello(helloworld_pb2.HelloRequest(name="bell\a"), timeout=RPC_TIMEOUT,
                             metadata=[("traceparent", f"00-{bad_trace}-b7ad6b7169203331-01")])
    [span] = receiver.received.wait_for(lambda s: s.trace_id.hex() == bad_trace, "for the error")
    assert attrs(span)["rpc.grpc.status_code"] == e.value.code().value[0]
    assert span.status.code == trace_pb2.Status.STATUS_CODE_UNSET


def test_deadline_exceeded_and_cancelled_calls_have_events(tmp_path, traced, receiver):
    # The server's own bound on deadlines ends the stream before the client gives up (a client
    # that gives up first resets the stream: a cancellation).
    config = tracing_config(tmp_path / "t.toml", f"http://127.0.0.1:{receiver.port}")
    short = GreeterProcess(tmp_path, config=config, env={
        "GREETER__GREETER__STREAM_INTERVAL": "50ms", "GREETER__DEADLINE__MAX": "150ms"})
    late = "2af7651916cd43dd8448eb211c80319c"
    try:
        with grpc.insecure_channel(short.addr) as channel:
            with pytest.raises(grpc.RpcError) as e:
                list(helloworld_pb2_grpc.GreeterStub(channel).SayHelloStreamReply(
                    helloworld_pb2.HelloRequest(name="slow"), timeout=RPC_TIMEOUT,
                    metadata=[("traceparent", f"00-{late}-b7ad6b7169203331-01")]))
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        short.stop()
    with grpc.insecure_channel(traced.addr) as channel:
        cancelled = "3af7651916cd43dd8448eb211c80319c"
        call = helloworld_pb2_grpc.GreeterStub(channel).SayHelloStreamReply(
            helloworld_pb2.HelloRequest(name="gone"), timeout=RPC_TIMEOUT,
            metadata=[("traceparent", f"00-{cancelled}-b7ad6b7169203331-01")])
        next(call)
        call.cancel()
    [span] = receiver.received.wait_for(lambda s: s.trace_id.hex() == late, "past its deadline")
    assert attrs(span)["rpc.grpc.status_code"] == 4
    assert [ev.name for ev in span.events] == ["deadline_exceeded"]
    assert span.status.code == trace_pb2.Status.STATUS_CODE_ERROR
    [span] = receiver.received.wait_for(lambda s: s.trace_id.hex() == cancelled, "cancelled")
    assert attrs(span)["rpc.grpc.status_code"] == 1
    assert [ev.name for ev in span.events] == ["cancelled"]


def test_shed_calls_have_an_event(tmp_path, receiver):
    config = tracing_config(tmp_path / "t.toml", f"http://127.0.0.1:{receiver.port}")
    server = GreeterProcess(tmp_path, config=config, env={
        "GREETER__GREETER__STREAM_INTERVAL": "1s", "GREETER__LIMITS__MAX_CONCURRENT_CALLS": "1"})
    shed = "4af7651916cd43dd8448eb211c80319c"
    try:
        with grpc.insecure_channel(server.addr) as channel:
            stub = helloworld_pb2_grpc.GreeterStub(channel)
            holding = stub.SayHelloStreamReply(helloworld_pb2.HelloRequest(name="hold"),
                                               timeout=RPC_TIMEOUT)
            next(holding)
            with pytest.raises(grpc.RpcError) as e:
                stub.SayHello(helloworld_pb2.HelloRequest(name="shed"), timeout=RPC_TIMEOUT,
                              metadata=[("traceparent", f"00-{shed}-b7ad6b7169203331-01")])
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            holding.cancel()
    finally:
        server.stop()
    [span] = receiver.received.wait_for(lambda s: s.trace_id.hex() == shed, "shed")
    assert attrs(span)["rpc.grpc.status_code"] == 8
    [event] = span.events
    assert event.name == "shed" and attrs(event) == {"greeter.shed_limit": "server"}


def grpc_web_say_hello(addr, name, traceparent):
    message = helloworld_pb2.HelloRequest(name=name).SerializeToString()
    request = urllib.request.Request(
        f"http://{addr}/helloworld.Greeter/SayHello",
        data=b"\x00" + len(message).to_bytes(4, "big") + message,
        headers={"content-type": "application/grpc-web+proto", "x-grpc-web": "1",
                 "traceparent": traceparent})
    with urllib.request.urlopen(request, timeout=RPC_TIMEOUT) as response:
        body = response.read()
    assert b"grpc-status:0" in body, body


def test_grpc_web_calls_are_traced_and_probe_checks_are_not_by_default(traced, receiver):
    web_trace = "5af7651916cd43dd8448eb211c80319c"
    grpc_web_say_hello(traced.addr, "browser", f"00-{web_trace}-b7ad6b7169203331-01")
    [span] = receiver.received.wait_for(lambda s: s.trace_id.hex() == web_trace, "for grpc-web")
    assert span.name == "helloworld.Greeter/SayHello"
    assert attrs(span)["rpc.grpc.status_code"] == 0
    # Readiness went through the probe port (health_addr), more than once in most runs.
    with grpc.insecure_channel(traced.health_addr) as channel:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                  timeout=RPC_TIMEOUT)
    # A main-port call after it, then the probe's calls would be exported by now.
    after = "6af7651916cd43dd8448eb211c80319c"
    grpc_web_say_hello(traced.addr, "after", f"00-{after}-b7ad6b7169203331-01")
    receiver.received.wait_for(lambda s: s.trace_id.hex() == after, "after the probe")
    with receiver.received.lock:
        from_traced = [s for rs in receiver.received.resource_spans
                       if attrs(rs.resource)["service.instance.id"] == "traced-0"
                       for ss in rs.scope_spans for s in ss.spans]
    assert [s for s in from_traced if s.trace_id.hex() == after]
    assert not [s for s in from_traced if s.name.startswith("grpc.health")]


def test_probe_spans_when_configured(tmp_path):
    receiver = GrpcReceiver()
    try:
        probe = f"127.0.0.1:{free_port()}"
        config = tracing_config(tmp_path / "t.toml", f"http://127.0.0.1:{receiver.port}",
                                probe_spans=True, **{"probe.listen": probe})
        server = GreeterProcess(tmp_path, config=config, health_addr=probe)
        try:
            receiver.received.wait_for(named("grpc.health.v1.Health/Check"), "for the probe")
        finally:
            server.stop()
    finally:
        receiver.stop()


def test_sampling_follows_the_ratio_and_the_callers_flag(tmp_path):
    receiver = GrpcReceiver()
    try:
        # Batches leave only when the server stops: the drain's flush must send them all.
        config = tracing_config(tmp_path / "t.toml", f"http://127.0.0.1:{receiver.port}",
                                sample_ratio=0.25, scheduled_delay="1h")
        server = GreeterProcess(tmp_path, config=config)
        try:
            with grpc.insecure_channel(server.addr) as channel:
                stub = helloworld_pb2_grpc.GreeterStub(channel)
                for i in range(400):
                    stub.SayHello(helloworld_pb2.HelloRequest(name="ratio"), timeout=RPC_TIMEOUT)
                for i in range(20):
                    stub.SayHello(helloworld_pb2.HelloRequest(name="sampled"), timeout=RPC_TIMEOUT,
                                  metadata=[("traceparent", f"00-{i + 1:032x}-{i + 1:016x}-01")])
                    stub.SayHello(helloworld_pb2.HelloRequest(name="unsampled"),
                                  timeout=RPC_TIMEOUT,
                                  metadata=[("traceparent", f"00-{i + 100:032x}-{i + 1:016x}-00")])
            assert not receiver.received.spans()
        finally:
            # The drain flushes what is still queued: every span is in the receiver after this.
            assert server.stop()
        spans = [s for s in receiver.received.spans() if s.name == "helloworld.Greeter/SayHello"]
        with_parent = [s for s in spans if s.parent_span_id]
        # The caller's flag decides: all 20 sampled, none of the 20 unsampled.
        assert sorted(int(s.trace_id.hex(), 16) for s in with_parent) == list(range(1, 21))
        # Binomial(400, 0.25): mean 100, standard deviation 8.7; this bound is 5.8 of them.
        assert 50 <= len(spans) - len(with_parent) <= 150, len(spans) - len(with_parent)
    finally:
        receiver.stop()


def metric(server, name):
    with urllib.request.urlopen(f"http://{server.metrics_addr}/metrics", timeout=RPC_TIMEOUT) as r:
        text = r.read().decode()
    match = re.search(rf"^{re.escape(name)} (\d+)", text, re.M)
    assert match, f"{name} not in /metrics"
    return int(match.group(1))


def test_the_exporter_survives_the_receiver_being_down_and_coming_back(tmp_path):
    port = free_port()
    config = tracing_config(tmp_path / "t.toml", f"http://127.0.0.1:{port}",
                            export_timeout="1s")
    server = GreeterProcess(tmp_path, config=config)
    receiver = None
    try:
        with grpc.insecure_channel(server.addr) as channel:
            stub = helloworld_pb2_grpc.GreeterStub(channel)
            stub.SayHello(helloworld_pb2.HelloRequest(name="lost"), timeout=RPC_TIMEOUT)
            failed = 'greeter_trace_spans_dropped_total{reason="export_failed"}'
            deadline = time.monotonic() + WAIT
            while metric(server, failed) == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert metric(server, failed) > 0
            receiver = GrpcReceiver(port=port)
            back = "7af7651916cd43dd8448eb211c80319c"
            deadline = time.monotonic() + WAIT
            # A call per round: the first export after the receiver is up may still meet the
            # channel's reconnect backoff.
            while not [s for s in receiver.received.spans() if s.trace_id.hex() == back]:
                assert time.monotonic() < deadline, "no span after the receiver came back"
                stub.SayHello(helloworld_pb2.HelloRequest(name="back"), timeout=RPC_TIMEOUT,
                              metadata=[("traceparent", f"00-{back}-b7ad6b7169203331-01")])
                time.sleep(0.2)
    finally:
        assert server.stop()
        if receiver:
            receiver.stop()


def test_a_full_queue_drops_and_counts_spans_without_slowing_calls(tmp_path):
    # The collector holds every export until the test ends: calls that waited for the queue to
    # drain would wait for that, not for a time the machine's load decides.
    receiver = GrpcReceiver()
    receiver.received.delay = 60.0
    try:
        config = tracing_config(tmp_path / "t.toml", f"http://127.0.0.1:{receiver.port}",
                                max_queue_size=4, max_export_batch_size=2,
                                export_timeout="60s")
        server = GreeterProcess(tmp_path, config=config)
        try:
            with grpc.insecure_channel(server.addr) as channel:
                stub = helloworld_pb2_grpc.GreeterStub(channel)
                for _ in range(50):
                    stub.SayHello(helloworld_pb2.HelloRequest(name="many"), timeout=RPC_TIMEOUT)
            assert receiver.received.headers == [], "every export is still held"
            assert metric(server, 'greeter_trace_spans_dropped_total{reason="queue_full"}') > 0
        finally:
            receiver.released.set()
            server.stop()
    finally:
        receiver.stop()


def test_a_collector_that_does_not_answer_cannot_hold_up_the_shutdown(tmp_path):
    receiver = GrpcReceiver()
    receiver.received.delay = 60.0
    try:
        config = tracing_config(tmp_path / "t.toml", f"http://127.0.0.1:{receiver.port}",
                                export_timeout="1s", scheduled_delay="1h")
        server = GreeterProcess(tmp_path, config=config)
        with grpc.insecure_channel(server.addr) as channel:
            helloworld_pb2_grpc.GreeterStub(channel).SayHello(
                helloworld_pb2.HelloRequest(name="last"), timeout=RPC_TIMEOUT)
        # The flush gives up after tracing.export_timeout (1 s), so the server exits on SIGTERM
        # within STOP_TIMEOUT (10 s), long before the collector would answer (60 s).
        assert server.stop()
        assert "took longer than tracing.export_timeout" in server.stderr_path.read_text() or \
            "span export failed" in server.stderr_path.read_text()
    finally:
        receiver.stop()


def test_http_protobuf_export_with_headers_from_a_file(tmp_path):
    receiver = HttpReceiver()
    try:
        headers = tmp_path / "headers.toml"
        headers.write_text('authorization = "Bearer collector-secret"\n')
        config = tracing_config(tmp_path / "t.toml", f"http://127.0.0.1:{receiver.port}",
                                protocol="http/protobuf", headers_file=headers)
        server = GreeterProcess(tmp_path, config=config)
        try:
            with grpc.insecure_channel(server.addr) as channel:
                _, call = helloworld_pb2_grpc.GreeterStub(channel).SayHello.with_call(
                    helloworld_pb2.HelloRequest(name="http"), timeout=RPC_TIMEOUT,
                    metadata=[("traceparent", SAMPLED)])
            # tracing.response_header is off by default.
            assert "greeter-trace-id" not in dict(call.initial_metadata())
            [span] = receiver.received.wait_for(
                lambda s: s.trace_id.hex() == TRACE_ID, "over OTLP/HTTP")
            assert span.parent_span_id.hex() == PARENT_SPAN_ID
            assert receiver.received.headers[0]["authorization"] == "Bearer collector-secret"
            # The secret is in no output of the server's.
            assert "collector-secret" not in greeter_cli(
                "config", "show", "--config", config, cwd=tmp_path).stdout
        finally:
            server.stop()
    finally:
        receiver.stop()


def test_grpc_export_over_tls_with_headers(tmp_path):
    pki = make_pki(tmp_path / "pki")
    credentials = grpc.ssl_server_credentials([(pki.read("server_key"), pki.read("server_cert"))])
    receiver = GrpcReceiver(credentials=credentials)
    try:
        headers = tmp_path / "headers.toml"
        headers.write_text('x-tenant = "greeter"\n')
        config = tracing_config(tmp_path / "t.toml", f"https://localhost:{receiver.port}",
                                ca_file=pki.ca, headers_file=headers)
        server = GreeterProcess(tmp_path, config=config)
        try:
            with grpc.insecure_channel(server.addr) as channel:
                helloworld_pb2_grpc.GreeterStub(channel).SayHello(
                    helloworld_pb2.HelloRequest(name="tls"), timeout=RPC_TIMEOUT,
                    metadata=[("traceparent", SAMPLED)])
            receiver.received.wait_for(lambda s: s.trace_id.hex() == TRACE_ID, "over TLS")
            assert receiver.received.headers[0]["x-tenant"] == "greeter"
        finally:
            server.stop()
    finally:
        receiver.stop()


@pytest.mark.parametrize("keys, key, message", [
    ({"sample_ratio": 1.5}, "tracing.sample_ratio", "between 0.0 and 1.0"),
    ({"endpoint": "otel-collector:4317"}, "tracing.endpoint", "http:// or https://"),
    ({"ca_file": "/ca.pem"}, "tracing.ca_file", "https://"),
    ({"max_export_batch_size": 4096}, "tracing.max_export_batch_size", "max_queue_size"),
])
def test_bad_tracing_settings_name_the_key_and_the_file(tmp_path, keys, key, message):
    keys = {"endpoint": "http://127.0.0.1:4317", **keys}
    config = tracing_config(tmp_path / "bad.toml", **keys)
    res = greeter_cli("config", "check", "--config", config, cwd=tmp_path, check=False)
    assert res.returncode != 0
    assert key in res.stderr and str(config) in res.stderr and message in res.stderr, res.stderr


def test_a_missing_headers_file_stops_the_start(tmp_path):
    missing = tmp_path / "nowhere.toml"
    config = tracing_config(tmp_path / "t.toml", "http://127.0.0.1:4317", headers_file=missing)
    res = greeter_cli("config", "check", "--config", config, cwd=tmp_path, check=False)
    assert res.returncode != 0
    assert "tracing.headers_file" in res.stderr and str(missing) in res.stderr, res.stderr
