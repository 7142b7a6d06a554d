"""(i) The Connect protocol on the main listener, with clients no one here wrote: plain `curl`
with JSON (HTTP/1.1 and h2c), `buf curl --protocol connect` (protobuf; through Connect server
reflection over HTTP/2, and from the proto file over HTTP/1.1), and connect-es
(@connectrpc/connect-node with code from @bufbuild/protoc-gen-es, tests/interop/node/) over
HTTP/1.1 and HTTP/2, JSON and protobuf: every Greeter RPC, an invalid name's BadRequest, a
deadline, a missing token (the TLS + token server) and gzip both ways.
"""

import base64
import filecmp
import gzip
import json
import os
import shutil
import struct
import subprocess

import pytest

from conftest import (HERE, NODE_MODULES, PROTO_DIR, ROOT, SUBPROCESS_TIMEOUT, GreeterProcess,
                      greeter_config_show)
from test_buf_curl import buf_curl, json_documents, report

CONNECT_CLIENT = HERE / "node" / "connect-client.js"
LONG_NAME = "n" * 900  # a reply past compression.min_reply_bytes (512)


def run(argv, cwd, env=None, data=None):
    try:
        return subprocess.run(argv, cwd=cwd, env=env, input=data, capture_output=True,
                              timeout=SUBPROCESS_TIMEOUT)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{argv} still running after {SUBPROCESS_TIMEOUT:.0f} s:\n{e.stdout}{e.stderr}",
                    pytrace=False)


def curl(cwd, url, *args, data=b""):
    """curl -i ARGS URL with `data` posted from stdin; returns (status, headers, body bytes)."""
    res = run(["curl", "-sS", "-i", "--max-time", "10", "--data-binary", "@-", *args, url], cwd,
              data=data)
    assert res.returncode == 0, f"curl exited {res.returncode}: {res.stderr.decode()}"
    head, _, body = res.stdout.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


def envelopes(body):
    """(flags, payload) of each Connect envelope in a streaming response body."""
    out = []
    while body:
        flags, size = struct.unpack(">BI", body[:5])
        out.append((flags, body[5:5 + size]))
        body = body[5 + size:]
    return out


def envelope(payload, flags=0):
    return struct.pack(">BI", flags, len(payload)) + payload


def url(greeter, path):
    return f"http://{greeter.addr}{path}"


JSON = ["-H", "content-type: application/json"]


# ---- plain curl ----------------------------------------------------------------------------

@pytest.mark.parametrize("http", ["--http1.1", "--http2-prior-knowledge"])
def test_curl_json_say_hello(greeter, tmp_path, http):
    status, headers, body = curl(tmp_path, url(greeter, "/helloworld.Greeter/SayHello"), http,
                                 *JSON, data=b'{"name":"you"}')
    assert status == 200, body
    assert headers["content-type"] == "application/json"
    assert json.loads(body) == {"message": "Hello, you!"}
    assert len(headers["x-request-id"]) == 32, headers


def test_curl_health_check_and_reflection_are_served(greeter, tmp_path):
    status, _, body = curl(tmp_path, url(greeter, "/grpc.health.v1.Health/Check"), *JSON,
                           data=b"{}")
    assert (status, json.loads(body)) == (200, {"status": "SERVING"})
    request = json.dumps({"listServices": ""}).encode()
    status, headers, body = curl(
        tmp_path, url(greeter, "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"),
        "--http2-prior-knowledge", "-H", "content-type: application/connect+json",
        data=envelope(request))
    assert status == 200 and headers["content-type"] == "application/connect+json", body
    (_, reply), (end_flags, end) = envelopes(body)
    names = {s["name"] for s in json.loads(reply)["listServicesResponse"]["service"]}
    assert {"helloworld.Greeter", "grpc.health.v1.Health"} <= names
    assert (end_flags, json.loads(end)) == (2, {})


def test_curl_invalid_name_is_400_with_bad_request(greeter, tmp_path):
    status, headers, body = curl(tmp_path, url(greeter, "/helloworld.Greeter/SayHello"), *JSON,
                                 data=json.dumps({"name": "x" * 2000}).encode())
    assert status == 400, body
    assert headers["content-type"] == "application/json"
    error = json.loads(body)
    assert error["code"] == "invalid_argument"
    assert "2000 bytes" in error["message"]
    [detail] = error["details"]
    assert detail["type"] == "google.rpc.BadRequest"
    assert detail["debug"]["fieldViolations"][0]["field"] == "name"
    assert base64.b64decode(detail["value"] + "==").startswith(b"\n")  # field 1: violations


def test_curl_stream_deadline_ends_the_stream(greeter, tmp_path):
    status, _, body = curl(tmp_path, url(greeter, "/helloworld.Greeter/SayHelloStreamReply"),
                           "-H", "content-type: application/connect+json",
                           "-H", "connect-timeout-ms: 150",
                           data=envelope(b'{"name":"you"}'))
    assert status == 200, body
    *messages, (end_flags, end) = envelopes(body)
    assert [json.loads(m)["message"] for _, m in messages][:1] == ["Hello, you!"]
    assert 1 <= len(messages) < 5, messages
    assert end_flags == 2
    assert json.loads(end)["error"]["code"] == "deadline_exceeded"


def test_curl_gzip_both_ways(greeter, tmp_path):
    request = gzip.compress(json.dumps({"name": LONG_NAME}).encode())
    status, headers, body = curl(tmp_path, url(greeter, "/helloworld.Greeter/SayHello"), *JSON,
                                 "-H", "content-encoding: gzip", "-H", "accept-encoding: gzip",
                                 data=request)
    assert status == 200, body
    assert headers.get("content-encoding") == "gzip", headers
    assert json.loads(gzip.decompress(body)) == {"message": f"Hello, {LONG_NAME}!"}


def test_curl_unknown_encoding_is_refused(greeter, tmp_path):
    status, headers, body = curl(tmp_path, url(greeter, "/helloworld.Greeter/SayHello"), *JSON,
                                 "-H", "content-encoding: br", data=b"{}")
    assert status == 501, body
    assert json.loads(body)["code"] == "unimplemented"
    assert headers["accept-encoding"] == "gzip, identity"


def test_curl_without_token_is_401(secure_greeter, tmp_path):
    target = f"https://{secure_greeter.target}/helloworld.Greeter/SayHello"
    status, _, body = curl(tmp_path, target, "--cacert", str(secure_greeter.pki.ca), *JSON,
                           data=b'{"name":"you"}')
    assert status == 401, body
    assert json.loads(body)["code"] == "unauthenticated"
    status, _, body = curl(tmp_path, target, "--cacert", str(secure_greeter.pki.ca), *JSON,
                           "-H", f"authorization: Bearer {secure_greeter.token}",
                           data=b'{"name":"you"}')
    assert (status, json.loads(body)) == (200, {"message": "Hello, you!"})


@pytest.fixture(scope="module")
def grpc_only_greeter(tmp_path_factory):
    """The embedded default with [connect] and [web] off, as production's listener speaks."""
    server = GreeterProcess(tmp_path_factory.mktemp("grpc-only"),
                            env={"GREETER__CONNECT__ENABLED": "false",
                                 "GREETER__WEB__ENABLED": "false"})
    yield server
    server.stop()


@pytest.mark.parametrize("content_type", [[], JSON, ["-H", "content-type: text/plain"]])
def test_curl_json_to_a_grpc_only_port_is_415_saying_how_to_turn_connect_on(
        grpc_only_greeter, tmp_path, content_type):
    """The README's curl line against a port without Connect: 415 and a sentence, not a gRPC
    status from JSON read as a frame header."""
    status, headers, body = curl(tmp_path, url(grpc_only_greeter, "/helloworld.Greeter/SayHello"),
                                 "--http2-prior-knowledge", *content_type, data=b'{"name":"you"}')
    assert status == 415, body
    assert b"[connect] enabled = true" in body, body
    assert headers["accept-post"] == "application/grpc, application/grpc+proto"
    assert "grpc-status" not in headers


def test_curl_with_a_rebound_host_is_421(greeter, tmp_path):
    """DNS rebinding: a page whose own name now resolves to 127.0.0.1 is not answered."""
    status, _, body = curl(tmp_path, url(greeter, "/helloworld.Greeter/SayHello"), "--http1.1",
                           *JSON, "-H", "host: attacker.example", data=b'{"name":"you"}')
    assert status == 421, body


# ---- buf curl --protocol connect -----------------------------------------------------------

def buf_connect(buf, cwd, *args):
    """buf curl with the Connect protocol: buf_curl's `--protocol grpc`, overridden."""
    return buf_curl(buf, cwd, "--protocol", "connect", *args)


SCHEMA = {"reflection (h2)": [], "proto file (HTTP/1.1)": ["--schema", str(PROTO_DIR / "helloworld.proto")]}


@pytest.mark.parametrize("schema", SCHEMA)
def test_buf_curl_connect_unary_and_stream(buf, greeter, tmp_path, schema):
    res = buf_connect(buf, tmp_path, *SCHEMA[schema], "-v", "-d", '{"name":"you"}',
                      url(greeter, "/helloworld.Greeter/SayHelloAgain"))
    assert res.returncode == 0, report(res)
    assert json_documents(res.stdout) == [{"message": "Hello again, you!"}], report(res)
    assert "Content-Type: application/proto" in res.stderr, report(res)
    if not SCHEMA[schema]:
        assert "POST /grpc.reflection.v1.ServerReflection/ServerReflectionInfo" in res.stderr
    res = buf_connect(buf, tmp_path, *SCHEMA[schema], "-d", '{"name":"you"}',
                      url(greeter, "/helloworld.Greeter/SayHelloStreamReply"))
    assert res.returncode == 0, report(res)
    greetings = greeter_config_show(tmp_path)["greeter"]["stream_greetings"]
    assert json_documents(res.stdout) == [{"message": f"{g}, you!"} for g in greetings]


def test_buf_curl_connect_invalid_name(buf, greeter, tmp_path):
    res = buf_connect(buf, tmp_path, "-d", json.dumps({"name": "x" * 2000}),
                      url(greeter, "/helloworld.Greeter/SayHello"))
    assert res.returncode == 3 << 3, report(res)  # INVALID_ARGUMENT
    error = json.loads(res.stderr[res.stderr.index("{"):])
    assert error["code"] == "invalid_argument", report(res)
    assert error["details"][0]["type"] == "google.rpc.BadRequest", report(res)


# ---- connect-es ----------------------------------------------------------------------------

@pytest.fixture(scope="session")
def connect_client():
    node = shutil.which("node")
    if not node:
        pytest.fail("node not found on PATH: run scripts/install-tools", pytrace=False)
    for module in ("@connectrpc/connect-node", "@connectrpc/connect", "@bufbuild/protobuf"):
        if not (NODE_MODULES / module / "package.json").is_file():
            pytest.fail(f"{module} not in {NODE_MODULES}: run scripts/install-tools", pytrace=False)
    env = {k: v for k, v in os.environ.items() if k not in ("GREETER_TOKEN", "NODE_OPTIONS")}
    env["NODE_PATH"] = str(NODE_MODULES)
    return [node, str(CONNECT_CLIENT)], env


def connect_es(connect_client, cwd, base_url, calls, token=None, **options):
    argv, env = connect_client
    if token is not None:
        env = dict(env, GREETER_TOKEN=token)
    plan = {"base_url": base_url, "calls": calls, **options}
    res = run([*argv, json.dumps(plan)], cwd, env=env)
    out = res.stdout.decode()
    assert res.returncode == 0, f"connect client exited {res.returncode}:\n{out}{res.stderr.decode()}"
    results = json.loads(out)["results"]
    assert len(results) == len(calls), out
    return results


ALL_RPCS = [
    {"rpc": "SayHello", "names": ["you"]},
    {"rpc": "SayHelloAgain", "names": ["you"]},
    {"rpc": "SayHelloStreamReply", "names": ["you"]},
    {"rpc": "SayHelloBidiStream", "names": ["a", "b", "c"]},
]


@pytest.mark.parametrize("binary", [False, True], ids=["json", "proto"])
@pytest.mark.parametrize("http_version", ["1.1", "2"])
def test_connect_es_every_rpc(connect_client, greeter, tmp_path, http_version, binary):
    """Bidi over HTTP/1.1 is half duplex (connect-node sends every request before reading)."""
    results = connect_es(connect_client, tmp_path, f"http://{greeter.addr}", ALL_RPCS,
                         http_version=http_version, binary=binary)
    greetings = greeter_config_show(tmp_path)["greeter"]["stream_greetings"]
    assert [(r["rpc"], r["ok"], r["messages"]) for r in results] == [
        ("SayHello", True, ["Hello, you!"]),
        ("SayHelloAgain", True, ["Hello again, you!"]),
        ("SayHelloStreamReply", True, [f"{g}, you!" for g in greetings]),
        ("SayHelloBidiStream", True, ["Hello, a!", "Hello, b!", "Hello, c!"]),
    ], results


@pytest.mark.parametrize("http_version", ["1.1", "2"])
def test_connect_es_errors_deadline_and_gzip(connect_client, greeter, tmp_path, http_version):
    calls = [
        {"rpc": "SayHello", "names": ["x" * 2000]},
        {"rpc": "SayHelloBidiStream", "names": ["ok", "bad\u0000"]},
        {"rpc": "SayHelloStreamReply", "names": ["you"], "timeout_ms": 150},
        {"rpc": "SayHello", "names": [LONG_NAME]},
    ]
    invalid, bidi_invalid, deadline, compressed = connect_es(
        connect_client, tmp_path, f"http://{greeter.addr}", calls, http_version=http_version,
        gzip=True)
    for result in (invalid, bidi_invalid):
        assert (result["ok"], result["code"]) == (False, "InvalidArgument"), result
        [detail] = result["details"]
        assert detail["type"] == "google.rpc.BadRequest", result
        assert detail["debug"]["fieldViolations"][0]["field"] == "name", result
    assert (deadline["ok"], deadline["code"]) == (False, "DeadlineExceeded"), deadline
    assert compressed["messages"] == [f"Hello, {LONG_NAME}!"], compressed
    assert compressed["content_encoding"] == "gzip", compressed


@pytest.mark.parametrize("http_version", ["1.1", "2"])
def test_connect_es_tls_token(connect_client, secure_greeter, tmp_path, http_version):
    base = f"https://{secure_greeter.target}"
    calls = [{"rpc": "SayHello", "names": ["you"]}, {"rpc": "SayHelloStreamReply", "names": ["you"]}]
    without = connect_es(connect_client, tmp_path, base, calls, http_version=http_version,
                         ca=str(secure_greeter.pki.ca))
    assert [(r["ok"], r["code"]) for r in without] == [(False, "Unauthenticated")] * 2, without
    with_token = connect_es(connect_client, tmp_path, base, calls, http_version=http_version,
                            ca=str(secure_greeter.pki.ca), token=secure_greeter.token)
    assert [r["ok"] for r in with_token] == [True, True], with_token


def test_generated_code_is_current(buf, tmp_path):
    """gen/helloworld_pb.js is what protoc-gen-es writes from proto/helloworld.proto today."""
    template = (HERE / "node" / "buf.gen.yaml").read_text().replace(
        "out: tests/interop/node/gen", f"out: {tmp_path / 'gen'}")
    (tmp_path / "buf.gen.yaml").write_text(template)
    res = run([buf, "generate", "proto", "--template", str(tmp_path / "buf.gen.yaml")], ROOT,
              env={"PATH": os.environ["PATH"], "HOME": str(tmp_path),
                   "BUF_CACHE_DIR": str(tmp_path / "cache")})
    assert res.returncode == 0, res.stderr.decode()
    assert filecmp.cmp(tmp_path / "gen" / "helloworld_pb.js",
                       HERE / "node" / "gen" / "helloworld_pb.js", shallow=False)
