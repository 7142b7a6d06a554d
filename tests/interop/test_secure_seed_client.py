"""(a, secure) The quick start client plus credentials (greeter_client_secure.py: TLS with an
explicit root certificate and a bearer token as call credentials) against the TLS + token server."""

import difflib
import os
import subprocess
import sys
from pathlib import Path

from conftest import SUBPROCESS_TIMEOUT

HERE = Path(__file__).resolve().parent
PLAIN_CLIENT = HERE / "greeter_client.py"
CLIENT = HERE / "greeter_client_secure.py"


def run_client(secure_greeter, stubs_dir, cwd, token):
    env = dict(os.environ, PYTHONPATH=stubs_dir, GREETER_CA=str(secure_greeter.pki.ca),
               GREETER_TOKEN=token)
    env.pop("GREETER_TARGET", None)
    # The CA must come from the client's own root_certificates, not from the process default.
    env.pop("GRPC_DEFAULT_SSL_ROOTS_FILE_PATH", None)
    return subprocess.run([sys.executable, str(CLIENT), secure_greeter.target],
                          cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)


def test_quickstart_client_over_tls_with_token(secure_greeter, stubs_dir, tmp_path):
    res = run_client(secure_greeter, stubs_dir, tmp_path, secure_greeter.token)
    assert res.returncode == 0, f"client exited {res.returncode}:\n{res.stdout}{res.stderr}"
    assert res.stdout.splitlines() == [
        "Will try to greet world ...",
        "Greeter client received: Hello, you!",
        "Greeter client received: Hello again, you!",
    ], res.stdout + res.stderr


def test_quickstart_client_token_without_greeter_scope_is_refused(secure_greeter, stubs_dir,
                                                                  tmp_path):
    """Control: the same client with the reflection-only token gets no greeting, so the test
    above depends on the token it sends."""
    res = run_client(secure_greeter, stubs_dir, tmp_path, secure_greeter.reflection_token)
    assert res.returncode != 0, f"client succeeded:\n{res.stdout}{res.stderr}"
    assert "StatusCode.PERMISSION_DENIED" in res.stderr, res.stdout + res.stderr
    assert "Greeter client received" not in res.stdout, res.stdout


def code_lines(path):
    """The lines of a client after its module docstring."""
    lines = path.read_text().splitlines()
    closing = [i for i, line in enumerate(lines) if line.strip() == '"""']
    assert closing, f"{path}: no module docstring"
    return lines[closing[0] + 1:]


def test_secure_client_is_the_quickstart_client_plus_credentials():
    """greeter_client_secure.py differs from greeter_client.py only by the credentials."""
    diff = list(difflib.ndiff(code_lines(PLAIN_CLIENT), code_lines(CLIENT)))
    removed = [line[2:] for line in diff if line.startswith("- ")]
    added = [line[2:] for line in diff if line.startswith("+ ")]
    assert removed == [
        "def run(target):",
        "    with grpc.insecure_channel(target) as channel:",
        '    run(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("GREETER_TARGET", "localhost:50051"))',
    ], "\n".join(diff)
    assert added == [
        "def run(target, ca, token):",
        "    creds = grpc.composite_channel_credentials(",
        "        grpc.ssl_channel_credentials(root_certificates=open(ca).read().encode()),",
        "        grpc.access_token_call_credentials(token),",
        "    )",
        "    with grpc.secure_channel(target, creds) as channel:",
        '    run(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("GREETER_TARGET", "localhost:50051"),',
        '        os.environ["GREETER_CA"], os.environ["GREETER_TOKEN"])',
    ], "\n".join(diff)
