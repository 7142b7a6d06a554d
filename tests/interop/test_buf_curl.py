"""(h) `buf curl` (buf-bin from PyPI), schema from the server's reflection only, no proto files:
both reflection protocols (grpc-v1 and grpc-v1alpha, chosen with --reflect-protocol and checked in
buf's verbose trace), the gRPC protocol over h2c (plaintext) and over TLS with a bearer token.

buf sends -H headers with the RPC only; reflection requests get theirs from --reflect-header
('*' repeats the -H ones). Exit codes: 0 ok, < 8 usage or other failure, else the gRPC code << 3.
"""

import base64
import json
import subprocess

import pytest

from conftest import REFLECTION_SERVICES, RPC_TIMEOUT, SUBPROCESS_TIMEOUT

REFLECT_PROTOCOLS = {"grpc-v1": "grpc.reflection.v1.ServerReflection",
                     "grpc-v1alpha": "grpc.reflection.v1alpha.ServerReflection"}
GREETER_METHODS = {f"helloworld.Greeter/{m}" for m in
                   ("SayHello", "SayHelloAgain", "SayHelloStreamReply", "SayHelloBidiStream")}
INVALID_ARGUMENT = 3


def buf_curl(buf, cwd, *args):
    """buf curl --protocol grpc ARGS, bounded (--connect-timeout, --timeout, SUBPROCESS_TIMEOUT),
    with its cache in cwd; returns the CompletedProcess whatever its exit code."""
    argv = [buf, "curl", "--protocol", "grpc", "--connect-timeout", "5",
            "--timeout", f"{RPC_TIMEOUT:.0f}s", *args]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(cwd), "BUF_CACHE_DIR": str(cwd / "buf-cache"),
           "BUF_LOG_FORMAT": "text", "NO_COLOR": "1"}
    try:
        return subprocess.run(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=SUBPROCESS_TIMEOUT)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{argv} still running after {SUBPROCESS_TIMEOUT:.0f} s:\n{e.stdout}{e.stderr}",
                    pytrace=False)


def report(res):
    return f"{res.args} exited {res.returncode}:\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}"


def json_documents(text):
    """The JSON values buf printed one after another (one per reply message)."""
    decoder, values, i = json.JSONDecoder(), [], 0
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if i == len(text):
            return values
        value, i = decoder.raw_decode(text, i)
        values.append(value)


def h2c(greeter, path=""):
    return f"http://{greeter.addr}{path}"


# ---- plaintext (h2c) --------------------------------------------------------------------------

@pytest.mark.parametrize("protocol", REFLECT_PROTOCOLS)
def test_say_hello_through_reflection(buf, greeter, tmp_path, protocol):
    """-v traces the requests: the reflection stream must be the chosen protocol's, and only it."""
    res = buf_curl(buf, tmp_path, "--http2-prior-knowledge", "--reflect-protocol", protocol, "-v",
                   "-d", '{"name":"you"}', h2c(greeter, "/helloworld.Greeter/SayHello"))
    assert res.returncode == 0, report(res)
    assert json_documents(res.stdout) == [{"message": "Hello, you!"}], report(res)
    for proto, service in REFLECT_PROTOCOLS.items():
        used = f"POST /{service}/ServerReflectionInfo" in res.stderr
        assert used == (proto == protocol), f"{service} used: {used}\n{report(res)}"


@pytest.mark.parametrize("protocol", REFLECT_PROTOCOLS)
def test_list_services(buf, greeter, tmp_path, protocol):
    res = buf_curl(buf, tmp_path, "--http2-prior-knowledge", "--reflect-protocol", protocol,
                   "--list-services", h2c(greeter))
    assert res.returncode == 0, report(res)
    services = set(res.stdout.split())
    assert {"helloworld.Greeter", "grpc.health.v1.Health"} | REFLECTION_SERVICES <= services, report(res)


@pytest.mark.parametrize("protocol", REFLECT_PROTOCOLS)
def test_list_methods(buf, greeter, tmp_path, protocol):
    res = buf_curl(buf, tmp_path, "--http2-prior-knowledge", "--reflect-protocol", protocol,
                   "--list-methods", h2c(greeter))
    assert res.returncode == 0, report(res)
    methods = set(res.stdout.split())
    assert GREETER_METHODS <= methods, report(res)
    assert {"grpc.health.v1.Health/Check", "grpc.health.v1.Health/Watch"} <= methods, report(res)
    assert f"{REFLECT_PROTOCOLS[protocol]}/ServerReflectionInfo" in methods, report(res)


def test_say_hello_again(buf, greeter, tmp_path):
    res = buf_curl(buf, tmp_path, "--http2-prior-knowledge", "-d", '{"name":"you"}',
                   h2c(greeter, "/helloworld.Greeter/SayHelloAgain"))
    assert res.returncode == 0, report(res)
    assert json_documents(res.stdout) == [{"message": "Hello again, you!"}], report(res)


def test_stream_reply(buf, greeter, tmp_path):
    res = buf_curl(buf, tmp_path, "--http2-prior-knowledge", "-d", '{"name":"you"}',
                   h2c(greeter, "/helloworld.Greeter/SayHelloStreamReply"))
    assert res.returncode == 0, report(res)
    replies = [doc["message"] for doc in json_documents(res.stdout)]
    assert len(replies) > 1 and replies[0] == "Hello, you!", report(res)
    assert all(r.endswith(", you!") for r in replies), report(res)


def test_bidi_stream(buf, greeter, tmp_path):
    """A client-streaming body is JSON documents one after another."""
    res = buf_curl(buf, tmp_path, "--http2-prior-knowledge",
                   "-d", '{"name":"a"} {"name":"b"} {"name":"c"}',
                   h2c(greeter, "/helloworld.Greeter/SayHelloBidiStream"))
    assert res.returncode == 0, report(res)
    assert json_documents(res.stdout) == [
        {"message": "Hello, a!"}, {"message": "Hello, b!"}, {"message": "Hello, c!"}], report(res)


def test_invalid_name_carries_bad_request(buf, greeter, tmp_path):
    """buf prints the error (on stderr) as Connect JSON, details included: the google.rpc.BadRequest
    naming the field, its value base64 (unpadded) protobuf."""
    from google.rpc import error_details_pb2

    res = buf_curl(buf, tmp_path, "--http2-prior-knowledge", "-d", json.dumps({"name": "a\x07b"}),
                   h2c(greeter, "/helloworld.Greeter/SayHello"))
    assert res.returncode == INVALID_ARGUMENT << 3, report(res)
    assert res.stdout == "", report(res)
    error = json_documents(res.stderr)[0]
    message = "name contains a control character (U+0007) at byte 1"
    assert (error["code"], error["message"]) == ("invalid_argument", message), report(res)
    assert [d["type"] for d in error.get("details", [])] == ["google.rpc.BadRequest"], report(res)
    value = error["details"][0]["value"]
    bad_request = error_details_pb2.BadRequest.FromString(base64.b64decode(value + "=" * (-len(value) % 4)))
    violations = [(v.field, v.description) for v in bad_request.field_violations]
    assert violations == [("name", message)], bad_request


# ---- TLS + bearer token -----------------------------------------------------------------------

def https(secure_greeter, path=""):
    return f"https://{secure_greeter.target}{path}"


@pytest.mark.parametrize("protocol", REFLECT_PROTOCOLS)
def test_tls_say_hello_with_token(buf, secure_greeter, tmp_path, protocol):
    """--cacert trusts the dev CA only; the token goes with the call and, through
    --reflect-header '*', with the reflection requests."""
    res = buf_curl(buf, tmp_path, "--cacert", str(secure_greeter.pki.ca),
                   "-H", f"authorization: Bearer {secure_greeter.token}", "--reflect-header", "*",
                   "--reflect-protocol", protocol, "-d", '{"name":"you"}',
                   https(secure_greeter, "/helloworld.Greeter/SayHello"))
    assert res.returncode == 0, report(res)
    assert json_documents(res.stdout) == [{"message": "Hello, you!"}], report(res)


@pytest.mark.parametrize("protocol", REFLECT_PROTOCOLS)
def test_tls_list_services_with_reflection_token(buf, secure_greeter, tmp_path, protocol):
    res = buf_curl(buf, tmp_path, "--cacert", str(secure_greeter.pki.ca), "--reflect-protocol", protocol,
                   "--reflect-header", f"authorization: Bearer {secure_greeter.reflection_token}",
                   "--list-services", https(secure_greeter))
    assert res.returncode == 0, report(res)
    assert {"helloworld.Greeter", "grpc.health.v1.Health"} <= set(res.stdout.split()), report(res)


def test_tls_reflection_token_cannot_call_the_greeter(buf, secure_greeter, tmp_path):
    """The reflection-only token resolves the method through reflection; the call is refused."""
    token = f"authorization: Bearer {secure_greeter.reflection_token}"
    res = buf_curl(buf, tmp_path, "--cacert", str(secure_greeter.pki.ca), "-H", token,
                   "--reflect-header", "*", "-d", '{"name":"you"}',
                   https(secure_greeter, "/helloworld.Greeter/SayHello"))
    permission_denied = 7
    assert res.returncode == permission_denied << 3, report(res)
    assert "Hello" not in res.stdout, report(res)


def test_tls_without_token_lists_nothing(buf, secure_greeter, tmp_path):
    res = buf_curl(buf, tmp_path, "--cacert", str(secure_greeter.pki.ca), "--list-services",
                   https(secure_greeter))
    assert res.returncode == 1, report(res)
    assert res.stdout == "", report(res)
    # buf's wording for the reflection call's UNAUTHENTICATED (a down server: "connection refused").
    assert "Failure: you are not authenticated." in res.stderr, report(res)
