"""(g) Node: @grpc/grpc-js + @grpc/proto-loader (tests/interop/node/client.js, modules from
.tools/node) calls all four Greeter RPCs on the TLS + token server: TLS trusting only the dev CA
(grpc.credentials.createSsl(ca)), the token as call credentials (combineChannelCredentials with
createFromMetadataGenerator adding `authorization: Bearer TOKEN`). The proto is loaded at run
time from proto/helloworld.proto; no generated code."""

import base64
import json
import subprocess

import pytest

from conftest import PROTO_DIR, RPC_TIMEOUT, SUBPROCESS_TIMEOUT, greeter_config_show

UNAUTHENTICATED = 16
INVALID_ARGUMENT = 3

ALL_RPCS = [
    {"rpc": "SayHello", "names": ["you"]},
    {"rpc": "SayHelloAgain", "names": ["you"]},
    {"rpc": "SayHelloStreamReply", "names": ["you"]},
    {"rpc": "SayHelloBidiStream", "names": ["a", "b", "c"]},
]


def run_node(node_client, cwd, secure_greeter, calls, token=None):
    """Runs client.js with a plan of calls; returns its parsed JSON output. The token travels in
    GREETER_TOKEN, never on the command line."""
    argv, env = node_client
    plan = {"target": secure_greeter.target, "ca": str(secure_greeter.pki.ca),
            "proto": str(PROTO_DIR / "helloworld.proto"),
            "deadline_ms": int(RPC_TIMEOUT * 1000), "calls": calls}
    if token is not None:
        env = dict(env, GREETER_TOKEN=token)
    cmd = [*argv, json.dumps(plan)]
    try:
        res = subprocess.run(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                             text=True, timeout=SUBPROCESS_TIMEOUT)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"node client still running after {SUBPROCESS_TIMEOUT:.0f} s:\n{e.stdout}{e.stderr}",
                    pytrace=False)
    assert res.returncode == 0, f"node client exited {res.returncode}:\n{res.stdout}{res.stderr}"
    lines = res.stdout.splitlines()
    assert len(lines) == 1, f"expected one JSON line:\n{res.stdout}{res.stderr}"
    out = json.loads(lines[0])
    assert len(out["results"]) == len(calls), out
    return out


def test_all_four_rpcs_over_tls_with_token(node_client, secure_greeter, tmp_path):
    out = run_node(node_client, tmp_path, secure_greeter, ALL_RPCS, token=secure_greeter.token)
    # The secure server's config leaves [greeter] alone: the greetings are the embedded default's.
    greetings = greeter_config_show(tmp_path)["greeter"]["stream_greetings"]
    stream = [f"{g}, you!" for g in greetings]
    assert len(stream) > 1, greetings
    assert out["results"] == [
        {"rpc": "SayHello", "ok": True, "messages": ["Hello, you!"]},
        {"rpc": "SayHelloAgain", "ok": True, "messages": ["Hello again, you!"]},
        {"rpc": "SayHelloStreamReply", "ok": True, "messages": stream},
        {"rpc": "SayHelloBidiStream", "ok": True, "messages": ["Hello, a!", "Hello, b!", "Hello, c!"]},
    ], out


def test_no_token_is_unauthenticated(node_client, secure_greeter, tmp_path):
    out = run_node(node_client, tmp_path, secure_greeter, ALL_RPCS)
    for result in out["results"]:
        assert result["ok"] is False, out
        assert result["code"] == UNAUTHENTICATED, result
        assert result.get("messages", []) == [], result
        assert secure_greeter.token not in json.dumps(result), result


def test_over_long_name_is_invalid_argument_with_bad_request(node_client, secure_greeter, tmp_path):
    """The status, and the google.rpc.Status trailer (grpc-status-details-bin) that grpc-js hands
    over as metadata, decoded here with the Python googleapis protos."""
    from google.rpc import error_details_pb2, status_pb2

    calls = [{"rpc": "SayHello", "names": ["x" * 2000]},
             {"rpc": "SayHelloStreamReply", "names": ["x" * 2000]}]
    out = run_node(node_client, tmp_path, secure_greeter, calls, token=secure_greeter.token)
    for result in out["results"]:
        assert result["ok"] is False, out
        assert result["code"] == INVALID_ARGUMENT, result
        assert result["details"] == "name is 2000 bytes long; the maximum is 1024 bytes", result
        assert result["status_details_bin"], f"no grpc-status-details-bin trailer: {result}"
        status = status_pb2.Status.FromString(base64.b64decode(result["status_details_bin"]))
        assert (status.code, status.message) == (INVALID_ARGUMENT, result["details"]), status
        assert len(status.details) == 1, status
        bad_request = error_details_pb2.BadRequest()
        assert status.details[0].Unpack(bad_request), status.details[0].type_url
        violations = [(v.field, v.description) for v in bad_request.field_violations]
        assert violations == [("name", result["details"])], bad_request
