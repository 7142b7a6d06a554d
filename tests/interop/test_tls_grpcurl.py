"""(f) grpcurl over TLS with a bearer token (-cacert, -H 'authorization: Bearer TOKEN'),
everything through reflection (grpcurl 1.8.6 speaks v1alpha), no proto files."""

import json

from conftest import REFLECTION_SERVICES, grpcurl_run, missing_greeter_rpcs

def grpcurl_tls(grpcurl, cwd, secure_greeter, token, *command, data=None, ca=None):
    """grpcurl -cacert CA [-H 'authorization: Bearer TOKEN'] [-d DATA] localhost:PORT COMMAND..."""
    args = ["-cacert", str(ca or secure_greeter.pki.ca)]
    if token is not None:
        args += ["-H", f"authorization: Bearer {token}"]
    if data is not None:
        args += ["-d", data]
    return grpcurl_run(grpcurl, cwd, *args, secure_greeter.target, *command)


def report(res):
    return f"{res.args} exited {res.returncode}:\n{res.stdout}{res.stderr}"


def test_list_with_reflection_token(grpcurl, secure_greeter, tmp_path):
    res = grpcurl_tls(grpcurl, tmp_path, secure_greeter, secure_greeter.reflection_token, "list")
    assert res.returncode == 0, report(res)
    services = set(res.stdout.split())
    assert {"helloworld.Greeter", "grpc.health.v1.Health"} <= services, report(res)
    assert services & REFLECTION_SERVICES, report(res)


def test_describe_greeter(grpcurl, secure_greeter, tmp_path):
    res = grpcurl_tls(grpcurl, tmp_path, secure_greeter, secure_greeter.reflection_token,
                      "describe", "helloworld.Greeter")
    assert res.returncode == 0, report(res)
    missing = missing_greeter_rpcs(res.stdout)
    assert not missing, f"describe lacks {missing}:\n{report(res)}"


def test_say_hello(grpcurl, secure_greeter, tmp_path):
    res = grpcurl_tls(grpcurl, tmp_path, secure_greeter, secure_greeter.token,
                      "helloworld.Greeter/SayHello", data='{"name":"you"}')
    assert res.returncode == 0, report(res)
    assert json.loads(res.stdout) == {"message": "Hello, you!"}, report(res)


def test_say_hello_without_greeter_scope_is_permission_denied(grpcurl, secure_greeter, tmp_path):
    """Reflection (which the token may use) resolves the method; the call itself is refused."""
    res = grpcurl_tls(grpcurl, tmp_path, secure_greeter, secure_greeter.reflection_token,
                      "helloworld.Greeter/SayHello", data='{"name":"you"}')
    assert res.returncode != 0, report(res)
    assert "Code: PermissionDenied" in res.stdout + res.stderr, report(res)
    assert "Hello" not in res.stdout, report(res)


def test_list_without_token_is_unauthenticated(grpcurl, secure_greeter, tmp_path):
    res = grpcurl_tls(grpcurl, tmp_path, secure_greeter, None, "list")
    assert res.returncode != 0, report(res)
    assert "code = Unauthenticated" in res.stdout + res.stderr, report(res)
    assert "helloworld.Greeter" not in res.stdout, report(res)


def test_list_with_unknown_ca_fails_the_handshake(grpcurl, secure_greeter, other_pki, tmp_path):
    res = grpcurl_tls(grpcurl, tmp_path, secure_greeter, secure_greeter.token, "list",
                      ca=other_pki.ca)
    assert res.returncode != 0, report(res)
    assert "certificate signed by unknown authority" in res.stdout + res.stderr, report(res)
